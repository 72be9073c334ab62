"""Comparison table of evaluation runs, from each run's `metrics.json`:
`Method | MATH-500 Acc (%) | 95% CI | n | Δ vs baseline | Truncated (%)` (`tokensft eval compare`)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from .benchmarks import get_benchmark
from .metrics import wilson_interval
from .records import METRICS_FILE

__all__ = ["compare_runs", "format_markdown", "load_metrics"]


def load_metrics(run: str | os.PathLike) -> dict[str, Any]:
    """`metrics.json` of a run (a run directory or the file itself).

    Raises:
        FileNotFoundError: no metrics.json there.
        ValueError: the file has no `accuracy`.
    """
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No {METRICS_FILE} in {run} (run `tokensft eval` with --output_dir {run} first)")
    metrics = json.loads(path.read_text())
    if "accuracy" not in metrics:
        raise ValueError(f"{path} has no 'accuracy' field; fields present: {sorted(metrics)}")
    return metrics


def _run_name(run: str | os.PathLike) -> str:
    p = Path(run)
    if p.name == METRICS_FILE:
        p = p.parent
    return p.resolve().name or str(run)


def compare_runs(
    runs: list[str | os.PathLike],
    baseline: str | os.PathLike,
    names: list[str] | None = None,
    baseline_name: str | None = None,
) -> dict[str, Any]:
    """Rows of the comparison table: the baseline first, then each run (the baseline is not repeated).

    Args:
        runs: run directories (or `metrics.json` files).
        baseline: the run Δ is taken against.
        names: one display name per entry of `runs` (default: the directory names).
        baseline_name: display name of the baseline (default: its directory name).

    Returns:
        `{"benchmark": display name, "header": [...], "rows": [{"method", "accuracy", "ci95", "delta",
        "num_problems", "truncation_rate", "complete", "run"}]}` with accuracy, its 95% Wilson interval, delta and
        truncation in percent (truncation None where the run did not record it; the interval is recomputed from
        accuracy and `num_problems` where `metrics.json` has none).

    Raises:
        ValueError: `names` of the wrong length, or runs on different benchmarks.
    """
    if names is not None and len(names) != len(runs):
        raise ValueError(f"--names has {len(names)} names for {len(runs)} runs")
    base = load_metrics(baseline)
    bench_key = base.get("benchmark", "math500")
    entries = [(baseline_name or _run_name(baseline), baseline, base)]
    base_resolved = Path(baseline).resolve()
    for i, run in enumerate(runs):
        if Path(run).resolve() in (base_resolved, base_resolved / METRICS_FILE):
            continue
        m = load_metrics(run)
        if m.get("benchmark", "math500") != bench_key:
            raise ValueError(f"{run} is a {m.get('benchmark')} run, the baseline {baseline} is {bench_key}")
        entries.append((names[i] if names else _run_name(run), run, m))
    display = get_benchmark(bench_key).display_name
    base_acc = 100.0 * base["accuracy"]
    rows = []
    for name, run, m in entries:
        acc = 100.0 * m["accuracy"]
        n = m.get("num_problems")
        ci = m.get("accuracy_ci95") or (wilson_interval(m["accuracy"] * n, n) if n else None)
        trunc = m.get("truncation_rate")
        rows.append(
            {
                "method": name,
                "accuracy": acc,
                "ci95": None if ci is None else (100.0 * ci[0], 100.0 * ci[1]),
                "delta": acc - base_acc,
                "num_problems": n,
                "truncation_rate": None if trunc is None else 100.0 * trunc,
                "complete": m.get("complete", True),
                "run": str(run),
            }
        )
    header = ["Method", f"{display} Acc (%)", "95% CI", "n", "Δ vs baseline", "Truncated (%)"]
    return {"benchmark": display, "header": header, "rows": rows}


def _fmt_row(row: dict[str, Any], is_baseline: bool) -> list[str]:
    name = row["method"] + ("" if row["complete"] else " (incomplete)")
    delta = "—" if is_baseline else f"{row['delta']:+.1f}"
    ci = "" if row["ci95"] is None else f"{row['ci95'][0]:.1f}–{row['ci95'][1]:.1f}"
    trunc = "" if row["truncation_rate"] is None else f"{row['truncation_rate']:.0f}"
    return [name, f"{row['accuracy']:.1f}", ci, str(row["num_problems"] or ""), delta, trunc]


def format_markdown(table: dict[str, Any]) -> str:
    """The table as GitHub Markdown (accuracy in %, Δ in percentage points, `—` for the baseline row)."""
    lines = ["| " + " | ".join(table["header"]) + " |", "| --- |" + " ---: |" * (len(table["header"]) - 1)]
    for i, row in enumerate(table["rows"]):
        lines.append("| " + " | ".join(_fmt_row(row, i == 0)) + " |")
    return "\n".join(lines) + "\n"


def format_csv(table: dict[str, Any]) -> str:
    """The table as CSV with full-precision numbers (the interval as two columns) and each run's directory."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    h = table["header"]
    w.writerow([h[0], h[1], "ci95_low", "ci95_high", h[3], h[4], h[5], "run"])

    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.4f}"

    for i, row in enumerate(table["rows"]):
        lo, hi = row["ci95"] or (None, None)
        w.writerow([row["method"], num(row["accuracy"]), num(lo), num(hi), row["num_problems"],
                    "" if i == 0 else num(row["delta"]), num(row["truncation_rate"]), row["run"]])
    return buf.getvalue()
