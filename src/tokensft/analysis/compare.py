"""`compare_runs`: the headline metrics of several runs side by side (Markdown + CSV + HTML) and overlaid figures."""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from tokensft.analysis.figures import _lorenz_ax, qlabel, render
from tokensft.analysis.load import QUANTITIES, load_run
from tokensft.analysis.report import atomic_write, compare_report_html, fmt_value, write_json
from tokensft.analysis.summary import TABLE_CATEGORIES, compute_summary, summary_headline_rows, to_jsonable

RUN_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
DEFAULT_COMPARE_OUT = "trace_compare"


def _names(run_dirs: list[Path], names: list[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(run_dirs):
            raise ValueError(f"got {len(names)} names for {len(run_dirs)} runs")
        return list(names)
    base = [p.resolve().name for p in run_dirs]
    return [b if base.count(b) == 1 else f"{b}#{i + 1}" for i, b in enumerate(base)]


def comparison_table(summaries: list[dict], names: list[str]) -> dict:
    """Metric x run table from run summaries.

    Returns:
        {"names": [...], "rows": [{"key", "quantity", "label", "values": [one per run, None if missing]}]}; the
        first rows are run facts (mode, trace steps, completion tokens), then every headline metric for each
        quantity any run traced, labelled `metric [per-position]` / `metric [per-token-loss]`.
    """
    rows = [
        {"key": "mode", "quantity": None, "label": "loss mode", "values": [s["run"]["mode"] for s in summaries]},
        {"key": "n_steps", "quantity": None, "label": "trace steps",
         "values": [s["run"]["n_steps"] for s in summaries]},
    ]
    qs = [q for q in QUANTITIES if any(q in s["headline"] for s in summaries)]
    headline = dict(kv for s in summaries for kv in summary_headline_rows(s))  # every run's schemes, in order
    for q in qs:
        for key, label in headline.items():
            vals = [s["headline"].get(q, {}).get(key) for s in summaries]
            vals = [None if (isinstance(v, float) and not math.isfinite(v)) else v for v in vals]
            rows.append({"key": key, "quantity": q, "label": f"{label} [{qlabel(q)}]", "values": vals})
    return {"names": names, "rows": rows}


def _cell(key: str, v) -> str:
    if isinstance(v, str):
        return v
    return fmt_value(key, v)


def table_markdown(table: dict) -> str:
    """GitHub Markdown of a `comparison_table`."""
    names = table["names"]
    lines = ["| metric | " + " | ".join(n.replace("|", "\\|") for n in names) + " |", "| --- | " + " | ".join("---:" for _ in names) + " |"]
    for r in table["rows"]:
        cells = [r["label"], *(_cell(r["key"], v) for v in r["values"])]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(table: dict) -> str:
    """CSV of a `comparison_table`: columns metric, quantity, one per run (full precision, empty when missing)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "quantity", *table["names"]])
    for r in table["rows"]:
        w.writerow([r["key"], r["quantity"] or "", *("" if v is None else v for v in r["values"])])
    return buf.getvalue()


def _quantities(summaries: list[dict]) -> list[str]:
    return [q for q in QUANTITIES if any(q in s["run"]["quantities"] for s in summaries)]


def fig_lorenz(summaries: list[dict], names: list[str]) -> Figure:
    qs = _quantities(summaries)
    fig = Figure(figsize=(5.5 * len(qs), 5.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(qs), squeeze=False)).ravel()
    for ax, q in zip(axes, qs):
        for i, (s, n) in enumerate(zip(summaries, names)):
            lz = s["lorenz"].get(q)
            if lz:
                h = s["headline"][q]
                _lorenz_ax(ax, lz, RUN_COLORS[i % len(RUN_COLORS)], f"{n}: Gini {h['gini']:.3f}", band=False)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(xlabel="cumulative share of tokens (ascending ||g_t||)", ylabel="cumulative share of sum ||g_t||",
               title=qlabel(q), xlim=(0, 1), ylim=(0, 1), aspect="equal")  # fmt: skip
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Lorenz curves of per-token gradient magnitude (mean over steps)")
    return fig


def fig_by_category(summaries: list[dict], names: list[str]) -> Figure:
    qs = _quantities(summaries)
    fig = Figure(figsize=(8, 3.8 * len(qs)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(qs), 1, squeeze=False)).ravel()
    x = np.arange(len(TABLE_CATEGORIES))
    width = 0.8 / len(summaries)
    for ax, q in zip(axes, qs):
        for i, (s, n) in enumerate(zip(summaries, names)):
            bc = s["by_category"].get(q)
            if not bc:
                continue
            mean = [np.nan if bc[c]["mean"] is None else bc[c]["mean"] for c in TABLE_CATEGORIES]
            ci = [np.nan if bc[c]["ci"] is None else bc[c]["ci"] for c in TABLE_CATEGORIES]
            ax.bar(x + (i - (len(summaries) - 1) / 2) * width, mean, width=width, yerr=ci, capsize=2,
                   color=RUN_COLORS[i % len(RUN_COLORS)], label=n)  # fmt: skip
        ax.set_xticks(x, TABLE_CATEGORIES)
        ax.axhline(0, color="k", lw=0.6)
        ax.set(ylabel="mean cos(g_t, G) (95% CI)", title=qlabel(q))
        ax.legend(fontsize=8)
    fig.suptitle("Alignment by token category")
    return fig


def fig_position(summaries: list[dict], names: list[str]) -> Figure:
    qs = _quantities(summaries)
    fig = Figure(figsize=(6.5 * len(qs), 4.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(qs), squeeze=False)).ravel()
    for ax, q in zip(axes, qs):
        labels = []
        for i, (s, n) in enumerate(zip(summaries, names)):
            p = s["position"].get(q)
            if not p:
                continue
            labels = p["labels"] if len(p["labels"]) > len(labels) else labels
            mean = [np.nan if v is None else v for v in p["mean"]]
            ci = [np.nan if v is None else v for v in p["ci"]]
            ax.errorbar(np.arange(len(mean)) + (i - (len(summaries) - 1) / 2) * 0.08, mean, yerr=ci, fmt="o-",
                        ms=3, capsize=2, color=RUN_COLORS[i % len(RUN_COLORS)], label=n)  # fmt: skip
        ax.set_xticks(np.arange(len(labels)), labels, rotation=45)
        ax.axhline(0, color="k", lw=0.6)
        ax.set(xlabel="position in the response (tokens, log2 bins)", ylabel="mean cos(g_t, G) (95% CI)",
               title=qlabel(q))  # fmt: skip
        ax.legend(fontsize=8)
    fig.suptitle("Alignment vs. position in the response")
    return fig


COMPARE_FIGURES = [
    ("compare_lorenz", "Lorenz curves", fig_lorenz,
     "The more a run's curve sags below the diagonal, the more its gradient is concentrated on few tokens."),
    ("compare_alignment_by_category", "Alignment by token category", fig_by_category,
     "Per category, each run's mean alignment; a scheme that fixes opposition should lift the categories that "
     "were below 0."),
    ("compare_alignment_vs_position", "Alignment vs. position", fig_position,
     "Each run's mean alignment per response-position bin (bins are offset slightly so error bars do not overlap)."),
]  # fmt: skip


def compare_runs(
    run_dirs: list[str | os.PathLike],
    names: list[str] | None = None,
    out_dir: str | os.PathLike = DEFAULT_COMPARE_OUT,
    *,
    progress: bool = True,
    formats: tuple[str, ...] = ("png", "pdf"),
) -> dict:
    """Compare the traces of several runs (e.g. `sft` vs. `sft-antiop`), like the reference study's 1.5B vs. 7B table.

    Writes into `out_dir` (atomically): `comparison.md` and `comparison.csv` (metric x run), `comparison.json`
    (the table plus each run's summary), the overlaid figures `compare_lorenz`, `compare_alignment_by_category`,
    `compare_alignment_vs_position` (.png/.pdf) and `compare.html` (all of it, self-contained).

    Args:
        run_dirs: two or more run directories, each holding `traces/`.
        names: column names (default: directory names, de-duplicated).
        out_dir: output directory.
        progress: tqdm bars over each run's trace files.
        formats: figure formats written.

    Returns:
        The table, as `comparison_table` returns it.

    Raises:
        ValueError: fewer than two runs, a names list of the wrong length, or unreadable traces (see `load_run`).
        FileNotFoundError: a run without `traces/`.
    """
    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(dirs)}")
    names = _names(dirs, names)
    out = Path(out_dir)
    summaries = []
    for d, n in zip(dirs, names):
        data = load_run(d, name=n, progress=progress)
        summaries.append(compute_summary(data))
        del data
    table = comparison_table(summaries, names)
    figures = []
    for stem, title, fn, guide in COMPARE_FIGURES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            fig = fn(summaries, names)
            png = render(fig, "png")
            for fmt in formats:
                atomic_write(out / f"{stem}.{fmt}", png if fmt == "png" else render(fig, fmt))
        figures.append({"title": title, "guide": guide, "png": png})
    atomic_write(out / "comparison.md", table_markdown(table))
    atomic_write(out / "comparison.csv", table_csv(table))
    write_json(out / "comparison.json", {"table": table, "summaries": dict(zip(names, summaries))})
    md_rows = [[r["label"], *(_cell(r["key"], v) for v in r["values"])] for r in table["rows"]]
    atomic_write(out / "compare.html", compare_report_html(md_rows, names, figures))
    return to_jsonable(table)
