"""What each tab of the visualizer shows, as functions of a `RunStore` and the UI selection.

They return HTML strings, pandas DataFrames and matplotlib Figures, so they are tested without a browser; the
Gradio app (`tokensft.viz.app`) only wires them to widgets. Errors a user can cause (a quantity that was not
traced, a missing step) come back as a boxed message rather than an exception.
"""

from __future__ import annotations

import html
import math
import threading
from collections import OrderedDict

import numpy as np

from tokensft.tracing.schema import CATEGORIES, TraceSequence, TraceStep, affected
from tokensft.viz.cluster import gradient_directions, pca_2d, tsne_2d
from tokensft.viz.colors import DIVERGING_ANCHORS, category_color
from tokensft.viz.data import (
    ALL_LAYERS,
    GRAD_METRICS,
    METRICS,
    QUANTITIES,
    MissingDataError,
    RunStore,
    auto_vmax,
    completion_mask,
    fmt,
    metric_values,
    scheme_name,
    step_layers,
    step_scheme_rules,
    token_records,
)
from tokensft.viz.render import STYLE, legend_html, message_html, summary_table_html, tokens_html, tooltip


def find_sequence(step: TraceStep, index: int) -> TraceSequence:
    """The sequence of `step` whose metadata `index` is `index`.

    Raises:
        KeyError: no such sequence in the step.
    """
    for s in step.sequences:
        if int(s.meta.get("index", -1)) == int(index):
            return s
    raise KeyError(f"step {step.step}: no sequence {index} (has {[s.meta.get('index') for s in step.sequences]})")


def sequence_choices(step: TraceStep) -> list[tuple[str, str]]:
    """(label, value) of the sequences of a step: `#i · example e · T tokens`."""
    out = []
    for s in step.sequences:
        m = s.meta
        out.append((f"#{m.get('index')} · example {m.get('example_index', '?')} · {m.get('length', len(s.tokens))} tokens",
                    str(m.get("index"))))
    return out


def layer_choices(step: TraceStep) -> list[tuple[str, str]]:
    """(label, value) of the layer selector: all layers aggregated, then each traced layer by name."""
    return [("all layers (sum)", ALL_LAYERS)] + [(f"{i}: {n}", str(i)) for i, n in enumerate(step_layers(step))]


def metric_label(metric: str, quantity: str, layer: str, scheme: str | None, step: TraceStep | None = None) -> str:
    """Human-readable name of a selection, e.g. `alignment cos(g_t, G) · per-position · layer 3: ...`; a scheme is
    named as the step's metadata declares it (`step_scheme_rules`)."""
    if metric == "weight":
        return f"weight given by {scheme_name(scheme, step_scheme_rules(step))}"
    lab = METRICS.get(metric, metric)
    if metric in GRAD_METRICS:
        lab += f" · {QUANTITIES.get(quantity, quantity)}"
        if quantity == "pos":
            if layer in (None, "", ALL_LAYERS):
                lab += " · all layers"
            else:
                names = step_layers(step) if step is not None else []
                i = int(layer)
                lab += f" · layer {i}" + (f": {names[i]}" if i < len(names) else "")
    return lab


def _sequence_parts(seq: TraceSequence, metric: str, quantity: str, layer: str, scheme: str | None,
                    rules: dict[str, dict]):
    values = metric_values(seq, metric, quantity, layer, scheme)
    recs = token_records(seq, quantity, layer)
    return values, [tooltip(r, rules) for r in recs]


def token_view(store: RunStore, run: str, step: int, seq_index: int, metric: str, quantity: str = "pos",
               layer: str = ALL_LAYERS, scheme: str | None = None, vmax: float = 0.0) -> str:
    """HTML of the Token view: legend + the sequence's tokens coloured by `metric` (diverging, centred at 0).

    `vmax <= 0` (or NaN) means automatic: the largest finite |value| of the sequence.
    """
    try:
        ts = store.load(run, int(step))
        seq = find_sequence(ts, seq_index)
        values, tips = _sequence_parts(seq, metric, quantity, layer, scheme, step_scheme_rules(ts))
    except (KeyError, ValueError, FileNotFoundError) as e:
        return message_html(str(e))
    vm = float(vmax) if vmax and math.isfinite(float(vmax)) and float(vmax) > 0 else auto_vmax(values)
    label = metric_label(metric, quantity, layer, scheme, ts)
    head = (f'<div style="font:12px ui-sans-serif,system-ui,sans-serif;color:rgb(90,90,90)">{store.run(run).label} · '
            f'step {ts.step} · sequence {seq.meta.get("index")} (example {seq.meta.get("example_index", "?")}) · '
            f'mode {ts.meta.get("mode", "?")}</div>')
    return STYLE + head + legend_html(vm, label) + tokens_html(
        seq.tokens, values, seq.categories, completion_mask(seq), vm, tooltips=tips, metric=metric,
        elem_class="tsft-main")


RULE_TEXT = {"zero": "weight = 0", "below_one": "weight < 1"}
"""How the overlay writes an affected-token rule (`tokensft.losses.schemes.AFFECTS`)."""


def overlay_schemes(rules: dict[str, dict]) -> list[str]:
    """Schemes shown in the overlay: every scheme of `rules` (`step_scheme_rules`: the trace metadata's, even when a
    sequence lacks its weights, to say so) that declares an affected-token rule."""
    return [k for k, r in rules.items() if r["affects"] is not None]


def scheme_flags(seq: TraceSequence, scheme: str, rules: dict[str, dict]) -> np.ndarray:
    """(T,) bool: completion tokens that `scheme` affects by its declared rule (`rules[scheme]["affects"]`, from the
    trace metadata; NaN weight: False).

    Raises:
        MissingDataError: the trace has no `weight.<scheme>` array.
        KeyError: `scheme` is not in `rules`.
    """
    w = metric_values(seq, "weight", scheme=scheme)
    return affected(w, rules[scheme]["affects"]) & completion_mask(seq)


def overlay_rows(seq: TraceSequence, rules: dict[str, dict], quantity: str = "pos",
                 layer: str = ALL_LAYERS) -> list[dict]:
    """Per scheme of `rules` with an affected-token rule: how many completion tokens it affects and the mean alignment
    of affected vs other tokens."""
    comp = completion_mask(seq)
    align = metric_values(seq, "alignment", quantity, layer).astype(np.float64)
    rows = []
    for s in overlay_schemes(rules):
        rule = RULE_TEXT[rules[s]["affects"]]
        try:
            f = scheme_flags(seq, s, rules)
            w = metric_values(seq, "weight", scheme=s)
        except MissingDataError:
            rows.append({"scheme": scheme_name(s, rules), "rule": rule, "affected": "not traced"})
            continue
        known = comp & np.isfinite(w)
        rest = known & ~f

        def _m(sel):
            a = align[sel]
            a = a[np.isfinite(a)]
            return float(a.mean()) if a.size else math.nan

        rows.append({"scheme": scheme_name(s, rules), "rule": rule,
                     "affected": f"{int(f.sum())} / {int(known.sum())}" if known.any() else "no weights (NaN)",
                     "align_affected": _m(f), "align_rest": _m(rest)})
    return rows


def overlay_view(store: RunStore, run: str, step: int, seq_index: int, quantity: str = "pos",
                 layer: str = ALL_LAYERS, vmax: float = 0.0) -> str:
    """HTML of the Scheme overlay: per scheme, the completion tokens of the sequence coloured by alignment, with the
    tokens the scheme drops, clips or down-weights outlined, and a table of their mean alignment vs the other completion tokens."""
    try:
        ts = store.load(run, int(step))
        seq = find_sequence(ts, seq_index)
        rules = step_scheme_rules(ts)
        align, tips = _sequence_parts(seq, "alignment", quantity, layer, None, rules)
    except (KeyError, ValueError, FileNotFoundError) as e:
        return message_html(str(e))
    vm = float(vmax) if vmax and math.isfinite(float(vmax)) and float(vmax) > 0 else auto_vmax(align)
    rows = overlay_rows(seq, rules, quantity, layer)
    parts = [STYLE, legend_html(vm, metric_label("alignment", quantity, layer, "", ts)),
             summary_table_html(rows, [("scheme", "scheme"), ("rule", "affected when"), ("affected", "tokens affected"),
                                       ("align_affected", "mean alignment, affected"),
                                       ("align_rest", "mean alignment, others")])]
    comp = completion_mask(seq)
    described = ts.meta.get("schemes") or {}
    for s in overlay_schemes(rules):
        title, rule = rules[s]["label"], RULE_TEXT[rules[s]["affects"]]
        why = (described.get(s) or {}).get("description") or "weight from its declaration"
        parts.append(f'<div class="tsft-scheme" data-scheme="{html.escape(s)}"><h4>{html.escape(title)} <span '
                     f'style="font-weight:400;color:rgb(100,100,100)">(outlined: {rule}; '
                     f'{html.escape(why)})</span></h4>')
        try:
            flags = scheme_flags(seq, s, rules)
        except MissingDataError as e:
            parts.append(f'<div class="tsft-msg">{e}</div></div>')
            continue
        parts.append(tokens_html(seq.tokens, align, seq.categories, comp, vm, tooltips=tips, marks=flags,
                                 metric="alignment", elem_class=f"tsft-overlay-{s}", skip_prompt=True))
        parts.append("</div>")
    return "".join(parts)


def token_table(store: RunStore, run: str, step: int, seq_index: int, quantity: str = "pos",
                layer: str = ALL_LAYERS, completion_only: bool = False):
    """pandas DataFrame of every per-token value of a sequence (one row a token), for the sortable table.

    Raises:
        KeyError / FileNotFoundError / ValueError: unknown run, step or sequence.
    """
    import pandas as pd

    seq = find_sequence(store.load(run, int(step)), seq_index)
    df = pd.DataFrame(token_records(seq, quantity, layer))
    df["token"] = df["token"].map(repr)
    if completion_only:
        df = df[df["role"] == "completion"]
    num = df.select_dtypes("number").columns.drop("t", errors="ignore")
    df[num] = df[num].astype(float).round(5)
    return df.reset_index(drop=True)


TREND_METRICS: dict[str, str] = {
    "alignment": "mean alignment", "dot": "mean ⟨g_t, G⟩", "norm": "mean ‖g_t‖", "G_norm": "‖G‖ (mean over sequences)",
    "loss": "mean CE loss (nats)", "p": "mean p_t", "entropy": "mean entropy (nats)",
}
"""Metrics of the Trends tab every run has -> axis label (means over the completion tokens of all traced sequences of
a step); `trend_metrics` adds the schemes' own."""


def trend_metrics(rules: dict[str, dict] | None = None) -> dict[str, str]:
    """Trends metric -> label: `TREND_METRICS`, then per scheme of `rules` (`runs_scheme_rules`) `weight.<key>` (mean
    weight) and, for a scheme with an affected-token rule, `affected.<key>` (fraction of tokens it affects)."""
    out = dict(TREND_METRICS)
    for k, r in (rules or {}).items():
        out[f"weight.{k}"] = f"mean weight of {r['name']}"
        if r["affects"] is not None:
            out[f"affected.{k}"] = f"fraction affected: {r['label']} ({RULE_TEXT[r['affects']]})"
    return out


def runs_scheme_rules(store: RunStore, runs: list[str]) -> dict[str, dict]:
    """The schemes of the first trace step of each run (`step_scheme_rules`), merged in order."""
    out: dict[str, dict] = {}
    for run in runs:
        try:
            steps = store.steps(run)
            rules = step_scheme_rules(store.load(run, steps[0])) if steps else {}
        except (KeyError, ValueError, FileNotFoundError):
            continue
        out.update({k: r for k, r in rules.items() if k not in out})
    return out


def trend_label(store: RunStore, runs: list[str], metric: str) -> str:
    """Axis label of a Trends metric for these runs (`trend_metrics`)."""
    return TREND_METRICS.get(metric) or trend_metrics(runs_scheme_rules(store, runs)).get(metric, metric)


def trends_data(store: RunStore, runs: list[str], quantity: str = "pos", layer: str = ALL_LAYERS):
    """Long DataFrame (run, step, category, metric columns...) of step summaries; category `all` is every token."""
    import pandas as pd

    rows = []
    for run in runs:
        for st in store.steps(run):
            try:
                s = store.step_summary(run, st, quantity, layer)
            except (ValueError, FileNotFoundError):
                continue
            rows.append({"run": store.run(run).label, "step": st, "category": "all", "n_tokens": s["n_tokens"],
                         **s["all"]})
            for c, d in s["by_category"].items():
                rows.append({"run": store.run(run).label, "step": st, "category": c, **d})
    return pd.DataFrame(rows)


def trends_figure(store: RunStore, runs: list[str], metric: str, quantity: str = "pos", layer: str = ALL_LAYERS,
                  by_category: bool = False):
    """Figure of `metric` over training steps, one line per run (or per run x category when `by_category`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    df = trends_data(store, runs, quantity, layer)
    ax.set_xlabel("optimizer step")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    label = trend_label(store, runs, metric)
    ax.set_ylabel(label)
    if df.empty or metric not in df.columns:
        ax.text(0.5, 0.5, "no trace steps", ha="center", va="center", transform=ax.transAxes)
        return fig
    styles = ["-", "--", ":", "-."]
    for i, (run, d) in enumerate(df.groupby("run", sort=False)):
        ls = styles[i % len(styles)]
        if by_category:
            for c in CATEGORIES:
                dc = d[d["category"] == c].sort_values("step")
                if len(dc) and np.isfinite(dc[metric]).any():
                    ax.plot(dc["step"], dc[metric], ls, marker="o", ms=3, color=category_color(c), label=f"{run} · {c}")
        else:
            da = d[d["category"] == "all"].sort_values("step")
            ax.plot(da["step"], da[metric], ls, marker="o", ms=3, label=run)
    if metric in ("alignment", "dot"):
        ax.axhline(0, color="0.6", lw=0.8)
    ax.grid(alpha=0.3)
    if by_category:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{label} · {QUANTITIES.get(quantity, quantity)}"
                 + ("" if metric not in GRAD_METRICS + ("G_norm",) or quantity != "pos" or layer == ALL_LAYERS
                    else f" · layer {layer}"), fontsize=10)
    return fig


_TRENDS_HTML: OrderedDict[tuple, str] = OrderedDict()
_TRENDS_LOCK = threading.Lock()
TRENDS_CACHE_SIZE = 64


def trends_html(store: RunStore, runs: list[str], metric: str, quantity: str = "pos", layer: str = ALL_LAYERS,
                by_category: bool = False) -> str:
    """`trends_figure` as an `<img>` (PNG, inline), cached by its arguments and the size and modification time of
    every trace file it reads: a repeated view costs a dictionary lookup, not a render (the trends tab under many
    clients); at most `TRENDS_CACHE_SIZE` renders are kept."""
    import base64
    import io

    files = []
    for run in runs:
        for st in store.steps(run):
            path = store.step_path(run, st)
            stat = path.stat() if path.exists() else None
            files.append((str(path), stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0))
    key = (tuple(runs), metric, quantity, layer, bool(by_category), tuple(files))
    with _TRENDS_LOCK:
        if key in _TRENDS_HTML:
            _TRENDS_HTML.move_to_end(key)
            return _TRENDS_HTML[key]
    fig = trends_figure(store, runs, metric, quantity, layer, by_category)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    title = html.escape(f"{trend_label(store, runs, metric)} over training steps")
    out = (f'<img alt="{title}" style="max-width:100%" '
           f'src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>')
    with _TRENDS_LOCK:
        _TRENDS_HTML[key] = out
        while len(_TRENDS_HTML) > TRENDS_CACHE_SIZE:
            _TRENDS_HTML.popitem(last=False)
    return out


def cluster_figure(store: RunStore, run: str, step: int, seq_index: int | None, quantity: str = "tokloss",
                   layer: str = ALL_LAYERS, color_by: str = "category", method: str = "PCA"):
    """Scatter of a 2-D embedding of unit gradient directions of completion tokens, and a note saying what was used.

    Args:
        seq_index: one sequence, or None for all sequences of the step.
        color_by: `category` (categorical colours) or `alignment` (diverging, centred at 0).
        method: `PCA` or `t-SNE` (needs scikit-learn).

    Returns:
        (Figure or None, note markdown). None when the trace has no projections (the note says so).
    """
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    try:
        ts = store.load(run, int(step))
        seqs = ts.sequences if seq_index is None else [find_sequence(ts, seq_index)]
        d = gradient_directions(seqs, quantity, layer)
    except (KeyError, ValueError, FileNotFoundError) as e:
        return None, f"**Clustering unavailable:** {e}"
    if d.X.shape[0] < 3:
        return None, f"**Clustering unavailable:** only {d.X.shape[0]} completion tokens with a projection."
    note = f"{d.X.shape[0]} completion tokens · directions from `{d.source}` (rows scaled to unit norm)"
    if method == "t-SNE":
        try:
            Y = tsne_2d(d.X)
            axes = ("t-SNE 1", "t-SNE 2")
        except (ImportError, ValueError) as e:
            return None, f"**t-SNE unavailable:** {e}"
    else:
        Y, ev = pca_2d(d.X)
        axes = (f"PC1 ({ev[0]:.0%} of variance)", f"PC2 ({ev[1]:.0%})")
    fig = Figure(figsize=(7.5, 5.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if color_by == "alignment":
        cmap = LinearSegmentedColormap.from_list("rdbu_tsft", [tuple(c / 255 for c in a) for a in DIVERGING_ANCHORS])
        vm = auto_vmax(d.alignment)
        a = np.where(np.isfinite(d.alignment), d.alignment, 0.0)
        sc = ax.scatter(Y[:, 0], Y[:, 1], c=a, cmap=cmap, vmin=-vm, vmax=vm, s=18, edgecolors="0.3", linewidths=0.3)
        fig.colorbar(sc, ax=ax, label="alignment")
    else:
        cats = np.asarray(d.categories)
        for c in CATEGORIES:
            sel = cats == c
            if sel.any():
                ax.scatter(Y[sel, 0], Y[sel, 1], s=18, color=category_color(c), label=f"{c} ({int(sel.sum())})",
                           edgecolors="0.3", linewidths=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, title="category")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.grid(alpha=0.3)
    ax.set_title(f"{method} of per-token gradient directions · step {ts.step}"
                 + ("" if seq_index is None else f" · sequence {seq_index}"), fontsize=10)
    return fig, note


def common_examples(store: RunStore, run_a: str, step_a: int, run_b: str, step_b: int) -> list[int]:
    """`example_index` values traced by both runs at the given steps, ascending."""
    ea = {int(s.meta.get("example_index", -1)) for s in store.load(run_a, int(step_a)).sequences}
    eb = {int(s.meta.get("example_index", -1)) for s in store.load(run_b, int(step_b)).sequences}
    return sorted((ea & eb) - {-1})


def _by_example(ts: TraceStep, example: int) -> TraceSequence:
    for s in ts.sequences:
        if int(s.meta.get("example_index", -1)) == int(example):
            return s
    raise KeyError(f"step {ts.step} did not trace example {example}")


def compare_view(store: RunStore, run_a: str, step_a: int, run_b: str, step_b: int, example: int, metric: str,
                 quantity: str = "pos", layer: str = ALL_LAYERS, scheme: str | None = None) -> str:
    """HTML of two runs side by side on the same example, coloured by `metric` on one shared scale."""
    try:
        ta, tb = store.load(run_a, int(step_a)), store.load(run_b, int(step_b))
        sa, sb = _by_example(ta, example), _by_example(tb, example)
        va, tips_a = _sequence_parts(sa, metric, quantity, layer, scheme, step_scheme_rules(ta))
        vb, tips_b = _sequence_parts(sb, metric, quantity, layer, scheme, step_scheme_rules(tb))
    except (KeyError, ValueError, FileNotFoundError) as e:
        return message_html(str(e))
    vm = auto_vmax(va, vb)
    same = list(sa.meta.get("tokens", [])) == list(sb.meta.get("tokens", []))
    cols = []
    for side, ts, s, v, tips, r in (("a", ta, sa, va, tips_a, run_a), ("b", tb, sb, vb, tips_b, run_b)):
        fin = v[completion_mask(s) & np.isfinite(v)]
        mean = fmt(float(fin.mean())) if fin.size else "–"
        cols.append(
            f'<div style="flex:1;min-width:0" data-side="{side}"><div style="font:600 13px ui-sans-serif,system-ui,'
            f'sans-serif">{store.run(r).label} · step {ts.step} · mode {ts.meta.get("mode", "?")} · '
            f'mean over completion {mean}</div>'
            + tokens_html(s.tokens, v, s.categories, completion_mask(s), vm, tooltips=tips, metric=metric,
                          elem_class=f"tsft-compare-{side}") + "</div>")
    warn = "" if same else '<div class="tsft-msg">the two runs tokenised this example differently</div>'
    return (STYLE + legend_html(vm, metric_label(metric, quantity, layer, scheme, ta) + f" · example {example}")
            + warn + '<div style="display:flex;gap:16px">' + "".join(cols) + "</div>")
