"""The 16 figures of a run's trace analysis (the reference study's 14, plus loss vs. alignment and scheme agreement).

Each analysis is an `Analysis` (number, slug, title, reading guide, draw function). A draw function takes the run's
summary (`tokensft.analysis.summary.compute_summary`) and its `RunData` and returns a matplotlib `Figure`, or raises
`SkipAnalysis` with the reason when the trace lacks what it needs (e.g. no `pos.layer.*` arrays). Figures are built
with the object-oriented API (`matplotlib.figure.Figure`, Agg canvas), never pyplot, so no global backend state is
touched.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from tokensft.analysis.load import QUANTITY_LABELS, RunData
from tokensft.tracing.schema import CATEGORIES

from .summary import TABLE_CATEGORIES

Q_COLORS = {"pos": "#1f77b4", "tokloss": "#ff7f0e"}
CAT_COLORS = dict(zip(CATEGORIES, ["#1f77b4", "#d62728", "#9467bd", "#2ca02c", "#8c564b", "#e377c2", "#7f7f7f",
                                   "#bcbd22"]))  # fmt: skip
MAX_SCATTER = 20_000


class SkipAnalysis(Exception):
    """Raised by a draw function when the trace lacks what the analysis needs; the message says what."""


@dataclass(frozen=True)
class Analysis:
    number: int
    slug: str
    title: str
    guide: str
    draw: Callable[[dict, RunData], Figure]

    @property
    def stem(self) -> str:
        return f"{self.number:02d}_{self.slug}"


def qlabel(q: str) -> str:
    return f"{QUANTITY_LABELS[q]} ({q})"


def _quantities(summary: dict) -> list[str]:
    qs = summary["run"]["quantities"]
    if not qs:
        raise SkipAnalysis("the trace records neither pos.* nor tokloss.* arrays")
    return qs


def _fig(ncols: int = 1, nrows: int = 1, w: float = 6.0, h: float = 4.2, **kw) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False, **kw)).ravel()
    return fig, axes


def _log(ax, axis: str = "y") -> None:
    """Log scale with plain tick labels (`0.5`, `2`): no mathtext `10^x` labels, which are slow to lay out. An axis
    with no positive value (LoRA A's gradient is exactly 0 while B is still at its zero init) stays linear."""
    i = 1 if axis == "y" else 0
    values = [np.asarray(line.get_xydata(), dtype=float)[:, i] for line in ax.lines]
    values += [np.asarray(c.get_offsets(), dtype=float).reshape(-1, 2)[:, i] for c in ax.collections]
    if not any(np.any(v[np.isfinite(v)] > 0) for v in values):
        return
    a = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    a.set_major_formatter(FormatStrFormatter("%g"))
    a.set_minor_formatter(NullFormatter())


def _integer_ticks(*axes) -> None:
    """Optimizer steps are whole numbers: no 12.5 on the axis."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _sparse_ticks(ax, x, labels=None, max_labels: int = 16) -> None:
    """Every k-th tick of `x`, so that at most `max_labels` labels share the axis (30 layers do not fit)."""
    k = max(1, math.ceil(len(x) / max_labels))
    labels = [str(v) for v in (x if labels is None else labels)]
    ax.set_xticks(list(x)[::k], labels[::k])


def _nan(v):
    return np.asarray([math.nan if x is None else x for x in v], dtype=np.float64)


def _run_title(summary: dict, title: str) -> str:
    r = summary["run"]
    mode = f", mode {r['mode']}" if r.get("mode") else ""
    return f"{title}\n{r['name']}{mode}: {r['n_steps']} trace steps, {r['n_completion_tokens']:,} completion tokens"


# --- (1) alignment over training steps ---------------------------------------------------------------------------
def draw_alignment_over_steps(s: dict, d: RunData) -> Figure:
    fig, (ax1, ax2) = _fig(2)
    for q in _quantities(s):
        ps = s["per_step"][q]
        ax1.plot(ps["step"], _nan(ps["mean_alignment"]), "o-", color=Q_COLORS[q], label=qlabel(q), ms=3)
        ax2.plot(ps["step"], _nan(ps["opposing_fraction"]), "o-", color=Q_COLORS[q], label=qlabel(q), ms=3)
    ax1.axhline(0, color="k", lw=0.6)
    ax1.set(xlabel="optimizer step", ylabel="mean cos(g_t, G) over completion tokens", title="mean alignment")
    ax2.axhline(0.5, color="k", lw=0.6, ls=":")
    ax2.set(xlabel="optimizer step", ylabel="share of tokens with alignment < 0", title="opposing fraction",
            ylim=(0, 1))  # fmt: skip
    ax1.legend()
    _integer_ticks(ax1, ax2)
    fig.suptitle(_run_title(s, "(1) Alignment over training steps"))
    return fig


# --- (2) instruction vs. response tokens --------------------------------------------------------------------------
def draw_prompt_vs_response(s: dict, d: RunData) -> Figure:
    qs = [q for q in _quantities(s) if q in s["prompt_vs_response"]]
    if not qs:
        raise SkipAnalysis("no finite value on prompt (instruction) tokens: the tracer stores NaN for tokens that "
                           "are not supervised targets, so instruction-token gradients were not recorded")
    fig, (ax1, ax2, ax3) = _fig(3, w=4.3)
    x = np.arange(2)
    width = 0.8 / len(qs)
    for i, q in enumerate(qs):
        pr = s["prompt_vs_response"][q]
        off = (i - (len(qs) - 1) / 2) * width
        kw = dict(width=width, color=Q_COLORS[q], label=qlabel(q))
        ax1.bar(x + off, [pr[p]["mean_alignment"] for p in ("prompt", "response")], **kw)
        ax2.bar(x + off, [pr[p]["mean_norm"] for p in ("prompt", "response")], **kw)
        ax3.bar(x + off, [pr[p]["share_of_magnitude"] for p in ("prompt", "response")], **kw)
    for ax, yl in ((ax1, "mean cos(g_t, G)"), (ax2, "mean ||g_t||"), (ax3, "share of total sum of ||g_t||")):
        ax.set_xticks(x, ["instruction", "response"])
        ax.set_ylabel(yl)
    ax1.axhline(0, color="k", lw=0.6)
    ax1.legend()
    fig.suptitle(_run_title(s, "(2) Instruction vs. response tokens"))
    return fig


# --- (3) per-layer contribution ------------------------------------------------------------------------------------
def _layers(s: dict) -> dict:
    if not s.get("layers"):
        raise SkipAnalysis("the trace has no per-layer arrays (pos.layer.*): trace with the per-position quantity "
                           "and at least one traced layer")
    return s["layers"]


def draw_per_layer(s: dict, d: RunData) -> Figure:
    pl = _layers(s)["per_layer"]
    if not pl["layer"]:
        raise SkipAnalysis("no layer index could be parsed from the traced module names")
    fig, (ax1, ax2) = _fig(2)
    ax1.bar(pl["layer"], _nan(pl["g_share"]), color="#1f77b4")
    ax1.set(xlabel="layer index", ylabel="share of ||G||^2 (mean over sequences)",
            title="contribution to the total gradient")  # fmt: skip
    ax2.bar(pl["layer"], _nan(pl["mean_alignment"]), color="#2ca02c")
    ax2.axhline(0, color="k", lw=0.6)
    ax2.set(xlabel="layer index", ylabel="mean cos(g_t,l, G_l) over completion tokens",
            title="per-token alignment within the layer")  # fmt: skip
    fig.suptitle(_run_title(s, "(3) Per-layer contribution (per-position, pos.layer.*)"))
    return fig


# --- (4) gradient magnitude over steps -----------------------------------------------------------------------------
def draw_magnitude_over_steps(s: dict, d: RunData) -> Figure:
    fig, (ax1, ax2) = _fig(2)
    any_g = False
    for q in _quantities(s):
        ps = s["per_step"][q]
        ax1.plot(ps["step"], _nan(ps["mean_norm"]), "o-", ms=3, color=Q_COLORS[q], label=qlabel(q))
        g = _nan(ps["G_norm"])
        if np.isfinite(g).any():
            any_g = True
            ax2.plot(ps["step"], g, "s-", ms=3, color=Q_COLORS[q], label=qlabel(q))
    ax1.set(xlabel="optimizer step", ylabel="mean ||g_t|| over completion tokens", title="per-token gradient magnitude")
    _log(ax1)
    ax2.set(xlabel="optimizer step", ylabel="||G|| (total traced gradient)", title="total gradient norm")
    if any_g:
        _log(ax2)
        ax2.legend()
    else:
        ax2.text(0.5, 0.5, "G_norm not recorded", ha="center", va="center", transform=ax2.transAxes)
    ax1.legend()
    _integer_ticks(ax1, ax2)
    fig.suptitle(_run_title(s, "(4) Gradient magnitude over training steps"))
    return fig


# --- (5) alignment vs. position ------------------------------------------------------------------------------------
def draw_alignment_vs_position(s: dict, d: RunData) -> Figure:
    fig, (ax,) = _fig(1, w=8)
    labels = []
    for q in _quantities(s):
        p = s["position"][q]
        labels = p["labels"] if len(p["labels"]) > len(labels) else labels
        x = np.arange(len(p["labels"]))
        ax.errorbar(x, _nan(p["mean"]), yerr=_nan(p["ci"]), fmt="o-", ms=4, capsize=3, color=Q_COLORS[q],
                    label=qlabel(q))  # fmt: skip
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(np.arange(len(labels)), labels, rotation=45)
    ax.set(xlabel="position in the response (tokens, log2 bins)", ylabel="mean cos(g_t, G) (95% CI)")
    ax.legend()
    fig.suptitle(_run_title(s, "(5) Alignment vs. position in the response"))
    return fig


# --- (6) most opposing tokens --------------------------------------------------------------------------------------
def _primary(s: dict) -> str:
    return _quantities(s)[0]


def _short(text: str, n: int) -> str:
    text = text.replace("\n", "↵").replace("\t", "→")
    text = text if len(text) <= n else "…" + text[-(n - 1) :]
    return text.replace("$", "\\$")  # a literal $, not matplotlib mathtext


def draw_top_opposing(s: dict, d: RunData) -> Figure:
    q = _primary(s)
    rows = s["top_opposing"][q]
    if not rows:
        raise SkipAnalysis("no completion token has alignment < 0")
    fig, (ax,) = _fig(1, w=10, h=0.32 * len(rows) + 1.6)
    y = np.arange(len(rows))[::-1]
    ax.barh(y, [r["alignment"] for r in rows], color=[CAT_COLORS[r["category"]] for r in rows])
    labels = [f"{_short(r['context_before'], 28)}«{_short(r['token'], 12)}»{_short(r['context_after'][:12], 12)}"
              for r in rows]  # fmt: skip
    ax.set_yticks(y, labels, fontsize=8, family="monospace")
    for yy, r in zip(y, rows):
        ax.text(-0.01, yy, f"{r['category']}, loss {r['loss']:.2f}, step {r['step']}, opposing in "
                f"{r['steps_opposing']}/{r['steps_traced']} traced steps", va="center", ha="right", fontsize=7,
                color="white")  # fmt: skip
    lowest = min(r["alignment"] for r in rows)  # the axis spans the data (cosines of -0.03 are not drawn on -1..0)
    ax.set(xlabel=f"cos(g_t, G), {qlabel(q)}", xlim=(1.15 * lowest, 0))
    fig.suptitle(_run_title(s, f"(6) The {len(rows)} most opposing tokens (token in «», with context)"))
    return fig


# --- (7) step x position heatmap -----------------------------------------------------------------------------------
def _heat(ax, fig, grid, xlabels, ylabels, xlabel, ylabel, title):
    g = np.array([[math.nan if v is None else v for v in row] for row in grid], dtype=np.float64)
    v = float(np.nanmax(np.abs(g))) if np.isfinite(g).any() else 1.0
    im = ax.imshow(g, aspect="auto", cmap="RdBu", vmin=-v, vmax=v, interpolation="nearest", origin="lower")
    ax.set_xticks(np.arange(len(xlabels)), xlabels, rotation=45, fontsize=8)
    step = max(1, len(ylabels) // 12)
    ax.set_yticks(np.arange(len(ylabels))[::step], [str(v) for v in ylabels][::step])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.colorbar(im, ax=ax, label="mean cos(g_t, G)")


def draw_step_position(s: dict, d: RunData) -> Figure:
    qs = _quantities(s)
    fig, axes = _fig(len(qs), w=6.5, h=4.8)
    for ax, q in zip(axes, qs):
        sp = s["step_position"][q]
        if not sp["labels"]:
            raise SkipAnalysis("no completion token with a finite alignment")
        _heat(ax, fig, sp["mean"], sp["labels"], sp["steps"], "position in the response (log2 bins)",
              "optimizer step", qlabel(q))  # fmt: skip
    fig.suptitle(_run_title(s, "(7) Step x position: mean alignment (blue = aligned, red = opposing)"))
    return fig


# --- (8) LoRA A vs. B norms ----------------------------------------------------------------------------------------
def draw_lora_ab(s: dict, d: RunData) -> Figure:
    lo = _layers(s).get("lora")
    if not lo:
        raise SkipAnalysis("the traced modules are not LoRA lora_A/lora_B pairs (no 'lora_A'/'lora_B' in the names)")
    fig, (ax1, ax2) = _fig(2)
    x = np.asarray(lo["layer"])
    for part, c in (("lora_A", "#9467bd"), ("lora_B", "#17becf")):
        ax1.plot(x, _nan(lo[part]["mean_norm"]), "o-", color=c, label=part)
        ax2.plot(x, _nan(lo[part]["mean_G_norm"]), "s-", color=c, label=part)
    for ax in (ax1, ax2):
        _sparse_ticks(ax, x)
    ax1.set(xlabel="layer index", ylabel="mean per-token ||g_t|| (modules of the layer)",
            title="per-token gradient norm")
    ax2.set(xlabel="layer index", ylabel="mean ||G_module||", title="total gradient norm per module")
    _log(ax1)
    _log(ax2)
    ax1.legend()
    fig.suptitle(_run_title(s, "(8) LoRA A vs. B gradient norms (per-position)"))
    return fig


# --- (9) alignment by token category -------------------------------------------------------------------------------
def draw_by_category(s: dict, d: RunData) -> Figure:
    qs = _quantities(s)
    cats = [c for c in CATEGORIES if any(s["by_category"][q][c]["n"] for q in qs)]
    fig, (ax,) = _fig(1, w=9)
    x = np.arange(len(cats))
    width = 0.8 / len(qs)
    for i, q in enumerate(qs):
        bc = s["by_category"][q]
        ax.bar(x + (i - (len(qs) - 1) / 2) * width, _nan([bc[c]["mean"] if bc[c]["n"] else None for c in cats]),
               width=width, yerr=_nan([bc[c]["ci"] if bc[c]["n"] else None for c in cats]), capsize=3,
               color=Q_COLORS[q], label=qlabel(q))  # fmt: skip
    # n per category: the tokens with a value; with several quantities, the most any of them has (bars are NaN at 0)
    n = {c: max(s["by_category"][q][c]["n"] for q in qs) for c in cats}
    ax.set_xticks(x, [f"{c}\n(n={n[c]:,})" for c in cats])
    ax.axhline(0, color="k", lw=0.6)
    ax.set(ylabel="mean cos(g_t, G) (95% CI)", xlabel="token category")
    ax.legend()
    fig.suptitle(_run_title(s, "(9) Alignment by token category"))
    return fig


# --- (10) magnitude vs. alignment ----------------------------------------------------------------------------------
def _relative_norm(d: RunData, q: str, sel: np.ndarray) -> np.ndarray:
    """||g_t|| divided by the mean ||g|| of the completion tokens of the same step (scale-free across steps)."""
    rel = np.full(d.n_tokens, np.nan)
    for m in d.step_indices(sel).values():
        mean = np.nanmean(d.norm[q][m]) if m.size else np.nan
        if np.isfinite(mean) and mean > 0:
            rel[m] = d.norm[q][m] / mean
    return rel


def _subsample(idx: np.ndarray, n: int = MAX_SCATTER) -> np.ndarray:
    if idx.size <= n:
        return idx
    return np.sort(np.random.default_rng(0).choice(idx, n, replace=False))


def draw_mag_vs_align(s: dict, d: RunData) -> Figure:
    qs = _quantities(s)
    fig, axes = _fig(len(qs), w=6.2, h=4.8)
    for ax, q in zip(axes, qs):
        sel = d.completion & np.isfinite(d.alignment[q]) & np.isfinite(d.norm[q])
        rel = _relative_norm(d, q, sel)
        idx = _subsample(np.flatnonzero(sel & (rel > 0)))
        for i, c in enumerate(CATEGORIES):
            m = idx[d.category[idx] == i]
            if m.size:
                ax.scatter(rel[m], d.alignment[q][m], s=5, alpha=0.5, color=CAT_COLORS[c], label=c, linewidths=0)
        _log(ax, "x")
        ax.axhline(0, color="k", lw=0.6)
        r = s["headline"][q]["pearson_mag_align"]
        ax.set(xlabel="||g_t|| / mean ||g|| of its step (log)", ylabel="cos(g_t, G)",
               title=f"{qlabel(q)}: Pearson r = {r:.3f} (mean over steps)" if r is not None and np.isfinite(r)
               else qlabel(q))  # fmt: skip
    axes[0].legend(markerscale=3, fontsize=8)
    fig.suptitle(_run_title(s, "(10) Magnitude vs. alignment, coloured by token category"))
    return fig


# --- (11) alignment by module type ---------------------------------------------------------------------------------
_KIND_ORDER = ["q", "k", "v", "o", "qkv", "gate", "up", "down"]


def draw_by_module(s: dict, d: RunData) -> Figure:
    mods = _layers(s)["modules"]
    kinds = sorted(mods, key=lambda k: (_KIND_ORDER.index(k) if k in _KIND_ORDER else 99, k))
    parts = [p for p in ("lora_A", "lora_B", "base") if any(p in mods[k] for k in kinds)]
    fig, (ax,) = _fig(1, w=8)
    x = np.arange(len(kinds))
    width = 0.8 / len(parts)
    colors = {"lora_A": "#9467bd", "lora_B": "#17becf", "base": "#7f7f7f"}
    for i, p in enumerate(parts):
        vals = _nan([mods[k].get(p, {}).get("mean_alignment") for k in kinds])
        ax.bar(x + (i - (len(parts) - 1) / 2) * width, vals, width=width, color=colors[p], label=p)
    ax.set_xticks(x, kinds)
    ax.axhline(0, color="k", lw=0.6)
    ax.set(xlabel="module type", ylabel="mean cos(g_t, G) within the module")
    ax.legend(loc="best")
    fig.suptitle(_run_title(s, "(11) Alignment by module type (per-position)"))
    return fig


# --- (12) Lorenz curve + Gini --------------------------------------------------------------------------------------
def _lorenz_ax(ax, lz: dict, color: str, label: str, band: bool = True) -> None:
    x = np.asarray(lz["share_tokens"])
    ax.plot(x, lz["mean"], color=color, lw=2, label=label)
    if band and lz.get("n_steps", 1) > 1:
        ax.fill_between(x, lz["lo"], lz["hi"], color=color, alpha=0.15)


def draw_lorenz(s: dict, d: RunData) -> Figure:
    fig, (ax,) = _fig(1, w=6.5, h=6)
    drawn = False
    for q in _quantities(s):
        lz = s["lorenz"].get(q)
        if not lz:
            continue
        h = s["headline"][q]
        _lorenz_ax(ax, lz, Q_COLORS[q], f"{qlabel(q)}: Gini {h['gini']:.3f}, 80% of weight in "
                                         f"{100 * h['share80']:.1f}% of tokens")  # fmt: skip
        if h["share80"] is not None and np.isfinite(h["share80"]):
            ax.plot([1 - h["share80"]] * 2, [0, 0.2], ":", color=Q_COLORS[q])
        drawn = True
    if not drawn:
        raise SkipAnalysis("no finite gradient magnitude on completion tokens")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect equality")
    ax.axhline(0.2, color="grey", lw=0.5, ls=":")
    ax.set(xlabel="cumulative share of tokens (ascending ||g_t||)", ylabel="cumulative share of sum ||g_t||",
           xlim=(0, 1), ylim=(0, 1), aspect="equal")  # fmt: skip
    ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(_run_title(s, "(12) Lorenz curve of per-token gradient magnitude\n(mean over steps; band = min-max)"))
    return fig


# --- (13) autocorrelation ------------------------------------------------------------------------------------------
def draw_autocorr(s: dict, d: RunData) -> Figure:
    fig, (ax,) = _fig(1, w=8)
    for q in _quantities(s):
        ac = s["autocorrelation"][q]
        lag, acf, n = np.asarray(ac["lag"]), _nan(ac["acf"]), np.asarray(ac["n_pairs"], dtype=np.float64)
        ax.plot(lag, acf, "o-", ms=3, color=Q_COLORS[q], label=qlabel(q))
        with np.errstate(divide="ignore", invalid="ignore"):
            band = 1.96 / np.sqrt(n)
        ax.fill_between(lag[1:], -band[1:], band[1:], color=Q_COLORS[q], alpha=0.12)
    ax.axhline(0, color="k", lw=0.6)
    ax.set(xlabel="lag (tokens)", ylabel="autocorrelation of cos(g_t, G)")
    ax.legend()
    fig.suptitle(_run_title(s, "(13) Alignment autocorrelation over lags (band: 95% null for no correlation)"))
    return fig


# --- (14) layer x position heatmap ---------------------------------------------------------------------------------
def draw_layer_position(s: dict, d: RunData) -> Figure:
    lp = _layers(s)["layer_position"]
    if not lp["layer"] or not lp["labels"]:
        raise SkipAnalysis("no layer index parsed from the module names, or no completion token")
    fig, (ax,) = _fig(1, w=8, h=5)
    _heat(ax, fig, lp["mean"], lp["labels"], lp["layer"], "position in the response (log2 bins)", "layer index",
          "per-position, all modules of the layer")  # fmt: skip
    fig.suptitle(_run_title(s, "(14) Layer x position: mean alignment (blue = aligned, red = opposing)"))
    return fig


# --- (15) loss vs. alignment ---------------------------------------------------------------------------------------
def draw_loss_vs_align(s: dict, d: RunData) -> Figure:
    qs = [q for q in _quantities(s) if s["loss_alignment"][q]]
    if not qs:
        raise SkipAnalysis("the trace records no per-token loss on completion tokens")
    fig, axes = _fig(len(qs), w=6.2, h=4.8)
    for ax, q in zip(axes, qs):
        sel = d.completion & np.isfinite(d.alignment[q]) & np.isfinite(d.loss)
        idx = _subsample(np.flatnonzero(sel))
        loss = np.maximum(d.loss[idx], 1e-4)  # log axis: p = 1 (loss 0) stored in float16 is drawn at 1e-4
        ax.scatter(loss, d.alignment[q][idx], s=4, alpha=0.25, color="grey", linewidths=0, label="tokens")
        la = s["loss_alignment"][q]
        ax.errorbar(la["loss_median"], _nan(la["mean_alignment"]), yerr=_nan(la["ci"]), fmt="o-", color=Q_COLORS[q],
                    capsize=3, label="mean per loss decile")  # fmt: skip
        rho = s["headline"][q]["spearman_loss_align"]
        ax.axhline(0, color="k", lw=0.6)
        ax.set(xlabel="token loss -log p(y_t) (nats, log scale)", ylabel="cos(g_t, G)",
               title=f"{qlabel(q)}: Spearman rho = {rho:.3f} (mean over steps)" if rho is not None and np.isfinite(rho)
               else qlabel(q))  # fmt: skip
        _log(ax, "x")
        ax.legend(fontsize=8)
    fig.suptitle(_run_title(s, "(15) Loss vs. alignment: does high loss mean opposing?"))
    return fig


# --- (16) scheme agreement -----------------------------------------------------------------------------------------
def draw_scheme_agreement(s: dict, d: RunData) -> Figure:
    qs = [q for q in _quantities(s) if s["scheme_agreement"][q]]
    if not qs:
        raise SkipAnalysis("the trace records no weights of a scheme with an affected-token rule (weight.topk, ...)")
    fig, axes = _fig(len(qs), w=6)
    for ax, q in zip(axes, qs):
        sa = s["scheme_agreement"][q]
        schemes = list(sa)  # in the order of the trace metadata's schemes
        rules = s["run"].get("scheme_rules") or {}
        x = np.arange(len(schemes))
        opp = [sa[k]["opposing_hit"] for k in schemes]
        al = [sa[k]["aligned_hit"] for k in schemes]
        ax.bar(x - 0.2, _nan(opp), width=0.4, color="#d62728", label="opposing tokens (alignment < 0)")
        ax.bar(x + 0.2, _nan(al), width=0.4, color="#1f77b4", label="aligned tokens (alignment >= 0)")
        for xi, o, a in zip(x, opp, al):
            if o is not None and a is not None and np.isfinite(o) and np.isfinite(a):
                ax.text(xi, max(o, a) + 0.02, f"{o:.2f} vs {a:.2f}", ha="center", fontsize=8)
        ax.set_xticks(x, [(rules.get(k) or {}).get("label", f"{k} down-weights") for k in schemes])
        ax.set(ylabel="share of tokens affected (declared rule)", ylim=(0, 1.1), title=qlabel(q))
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(_run_title(s, "(16) Scheme agreement: do the schemes hit the opposing tokens?"))
    return fig


ANALYSES: list[Analysis] = [
    Analysis(1, "alignment_over_steps", "Alignment over training steps",
             "Left: mean cosine between each completion token's gradient g_t and the total gradient G, per trace "
             "step. Right: share of tokens pulling against G. A mean near 0 with an opposing fraction near 0.5 means "
             "the update is a tug of war between tokens; a rising mean means tokens agree more as training goes on.",
             draw_alignment_over_steps),
    Analysis(2, "instruction_vs_response", "Instruction vs. response tokens",
             "Gradient contributions at instruction (prompt) positions versus response positions. Prompt tokens are "
             "not loss targets, but their positions still carry gradient through attention; a large prompt share "
             "means the update is shaped by how the model reads the instruction.",
             draw_prompt_vs_response),
    Analysis(3, "per_layer", "Per-layer contribution",
             "Left: each layer's share of the squared norm of the total traced gradient (shares sum to 1). Right: "
             "mean per-token alignment within the layer. Layers with a large share dominate the update; layers with "
             "low alignment are where tokens disagree most.",
             draw_per_layer),
    Analysis(4, "magnitude_over_steps", "Gradient magnitude over steps",
             "Mean per-token gradient norm (left) and the norm of the total gradient (right) per trace step, log "
             "scale. ||G|| shrinking faster than the per-token norms means tokens increasingly cancel each other.",
             draw_magnitude_over_steps),
    Analysis(5, "alignment_vs_position", "Alignment vs. position",
             "Mean alignment by position inside the response (log2 bins: 0, 1, 2-3, 4-7, ...), with 95% confidence "
             "intervals. Shows whether the first tokens of an answer (format, restating) pull in a different "
             "direction than the reasoning that follows.",
             draw_alignment_vs_position),
    Analysis(6, "top_opposing", "The most opposing tokens",
             "The completion tokens whose gradient points most against the total gradient, with the text before "
             "(and after) them; bar colour = token category. An example traced at several steps is listed once (at "
             "its most opposing step). Look for systematic patterns: numbers in arithmetic, formatting, rare words.",
             draw_top_opposing),
    Analysis(7, "step_position_heatmap", "Step x position heatmap",
             "Mean alignment for each trace step (rows) and response-position bin (columns). Red cells are "
             "opposing on average. Vertical stripes = a position effect stable over training; horizontal stripes = "
             "steps where the whole batch disagrees.",
             draw_step_position),
    Analysis(8, "lora_a_vs_b", "LoRA A vs. B norms",
             "Per layer, the gradient norms of the LoRA down-projection A and up-projection B. With B initialised to "
             "0, A's gradient starts at exactly 0 and B carries the early update; the ratio shows how far training "
             "has moved from that start.",
             draw_lora_ab),
    Analysis(9, "alignment_by_category", "Alignment by token category",
             "Mean alignment per token category (number, operator, LaTeX, word, subword, punctuation, whitespace), "
             "with 95% confidence intervals and the token count of each. Categories below 0 pull against the update "
             "on average; a scheme that down-weights them would remove a systematic counter-force.",
             draw_by_category),
    Analysis(10, "magnitude_vs_alignment", "Magnitude vs. alignment",
             "Each dot is a completion token (up to 20,000 sampled): x = its gradient norm relative to the mean of "
             "its step (log), y = its alignment, colour = category. If large-gradient tokens were the opposing ones, "
             "the cloud would tilt down to the right (negative Pearson r).",
             draw_mag_vs_align),
    Analysis(11, "alignment_by_module", "Alignment by module type",
             "Mean per-token alignment for each module type (attention q/k/v/o, MLP gate/up/down), split into LoRA "
             "A and B, pooled over layers. Module types with low alignment are where tokens disagree most.",
             draw_by_module),
    Analysis(12, "lorenz_gini", "Lorenz curve and Gini",
             "Cumulative share of the total gradient magnitude carried by the weakest x% of tokens. The diagonal is "
             "perfect equality; the further the curve sags, the more a few tokens dominate (Gini = twice the area "
             "between diagonal and curve). The dotted mark shows the share of tokens that carries 80% of the weight.",
             draw_lorenz),
    Analysis(13, "alignment_autocorrelation", "Alignment autocorrelation",
             "Correlation between a token's alignment and that of the token k positions later in the same response. "
             "Values above the shaded null band mean opposing tokens come in runs (spans, e.g. a whole wrong "
             "computation), not as isolated tokens; then span-level weighting makes sense.",
             draw_autocorr),
    Analysis(14, "layer_position_heatmap", "Layer x position heatmap",
             "Mean per-token alignment for each layer (rows) and response-position bin (columns), from the "
             "per-layer per-position contributions. Shows whether early positions disagree in all layers or only in "
             "some.",
             draw_layer_position),
    Analysis(15, "loss_vs_alignment", "Loss vs. alignment",
             "Token loss against alignment, with mean alignment per loss decile. topk and antiop assume that high-"
             "loss tokens oppose the update; that holds when the decile means fall to the right and Spearman rho is "
             "clearly negative. rho near 0 means loss is a poor proxy for opposition.",
             draw_loss_vs_align),
    Analysis(16, "scheme_agreement", "Scheme agreement",
             "For each scheme, the share of opposing tokens it drops / clips / down-weights (red) versus the share "
             "of aligned tokens it hits (blue), computed from the weights the trace records, by the affected-token "
             "rule each scheme declares (weight 0, or weight < 1; recorded in the trace metadata). A "
             "scheme that targets opposition has red well above blue; equal bars mean it hits tokens regardless of "
             "their alignment.",
             draw_scheme_agreement),
]  # fmt: skip


def render(fig: Figure, fmt: str, dpi: int = 110) -> bytes:
    """Bytes of `fig` in `fmt` ('png' or 'pdf')."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    return buf.getvalue()


__all__ = ["ANALYSES", "Analysis", "SkipAnalysis", "render", "TABLE_CATEGORIES", "Q_COLORS", "CAT_COLORS", "qlabel"]
