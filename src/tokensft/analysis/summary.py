"""Numbers behind every analysis: the headline table and the series each figure draws, as one JSON-able dict.

Which tokens count: completion tokens (`is_completion == 1`) with a finite value of the quantity, except for the
instruction-vs-response analysis. Which tokens are pooled:

- scale-dependent statistics (Gini, tokens-for-80%, magnitude-alignment Pearson r, loss-alignment Spearman rho) are
  computed over the tokens of one trace step (gradient norms shrink over training, so pooling steps would measure
  the schedule, not the tokens) and averaged over steps;
- fractions and means of alignment (a cosine, scale-free) pool all completion tokens of all steps.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from tokensft.analysis.load import (
    N_POS_BINS,
    QUANTITIES,
    QUANTITY_LABELS,
    RunData,
    display_piece,
    parse_module_name,
    pos_bin,
    pos_bin_labels,
)
from tokensft.analysis.metrics import (
    autocorrelation,
    gini,
    lorenz_curve,
    mean_ci,
    opposing_fraction,
    pearson,
    scheme_agreement,
    share_for_mass,
    spearman,
)
from tokensft.tracing.schema import CATEGORIES

TABLE_CATEGORIES = ("number", "operator", "latex", "word", "subword", "punctuation", "whitespace")


def agreement_schemes(data: RunData) -> dict[str, dict]:
    """Scheme key -> affected-token rule (`{"name", "affects", "label"}`) of every traced scheme that declares one
    (`RunData.scheme_rules`, from the trace metadata): the schemes of the headline table and of figure 16."""
    return {k: r for k, r in data.scheme_rules.items() if r["affects"] is not None}

LORENZ_GRID = 101
TOP_K = 20
MAX_LAG = 32

BASE_HEADLINE_ROWS: list[tuple[str, str]] = [
    ("n_tokens", "completion tokens analysed"),
    ("gini", "Gini coefficient of ‖g_t‖"),
    ("share80", "tokens for 80% gradient weight"),
    ("opposing_fraction", "opposing fraction (alignment < 0)"),
    ("mean_alignment", "mean alignment"),
    *[(f"align_{c}", f"alignment: {c}") for c in TABLE_CATEGORIES],
    ("pearson_mag_align", "magnitude-alignment Pearson r"),
    ("spearman_loss_align", "loss-alignment Spearman rho"),
]
"""Headline rows of every run; `headline_rows` adds two per traced scheme with an affected-token rule."""


def headline_rows(rules: dict[str, dict] | None = None) -> list[tuple[str, str]]:
    """Headline table rows `(key, label)`: `BASE_HEADLINE_ROWS`, then for each scheme of `rules` (trace key ->
    `{"name", "affects", "label"}`, e.g. `RunData.scheme_rules`) that declares a rule, `<key>_opposing_hit` and
    `<key>_aligned_hit` labelled with its `label` ("sft-topk drops: share of opposing")."""
    rows = list(BASE_HEADLINE_ROWS)
    for k, r in (rules or {}).items():
        if r.get("affects") is not None:
            rows += [(f"{k}_opposing_hit", f"{r['label']}: share of opposing"),
                     (f"{k}_aligned_hit", f"{r['label']}: share of aligned")]
    return rows


def summary_headline_rows(summary: dict) -> list[tuple[str, str]]:
    """The headline rows of a `compute_summary` result (its `headline_labels`, in order)."""
    return list((summary.get("headline_labels") or dict(BASE_HEADLINE_ROWS)).items())


def _nanmean(values) -> float:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def _sel(data: RunData, q: str) -> np.ndarray:
    return data.completion & np.isfinite(data.alignment[q])


def headline_and_steps(data: RunData, q: str) -> tuple[dict, dict]:
    """Headline metrics (see `headline_rows`) and per-step series of quantity `q`."""
    a, n = data.alignment[q].astype(np.float64), data.norm[q].astype(np.float64)
    sel = _sel(data, q)
    per_step = {k: [] for k in ("step", "n", "mean_alignment", "opposing_fraction", "mean_norm", "G_norm", "gini",
                                "share80", "pearson_mag_align", "spearman_loss_align")}  # fmt: skip
    for s, m in data.step_indices(sel).items():
        per_step["step"].append(int(s))
        per_step["n"].append(int(m.size))
        per_step["mean_alignment"].append(float(a[m].mean()) if m.size else math.nan)
        per_step["opposing_fraction"].append(opposing_fraction(a[m]))
        per_step["mean_norm"].append(float(np.nanmean(n[m])) if np.isfinite(n[m]).any() else math.nan)
        per_step["G_norm"].append(data.g_norm.get(q, {}).get(s, math.nan))
        per_step["gini"].append(gini(n[m]))
        per_step["share80"].append(share_for_mass(n[m], 0.8))
        per_step["pearson_mag_align"].append(pearson(n[m], a[m]))
        per_step["spearman_loss_align"].append(spearman(data.loss[m], a[m]))
    h = {
        "n_tokens": int(sel.sum()),
        "gini": _nanmean(per_step["gini"]),
        "share80": _nanmean(per_step["share80"]),
        "opposing_fraction": opposing_fraction(a[sel]),
        "mean_alignment": float(a[sel].mean()) if sel.any() else math.nan,
        "pearson_mag_align": _nanmean(per_step["pearson_mag_align"]),
        "spearman_loss_align": _nanmean(per_step["spearman_loss_align"]),
    }
    for c in TABLE_CATEGORIES:
        h[f"align_{c}"] = mean_ci(a[sel & (data.category == CATEGORIES.index(c))])[0]
    for s, rule in agreement_schemes(data).items():
        w = data.weight.get(s)
        ag = scheme_agreement(a[sel], w[sel], affects=rule["affects"]) if w is not None else None
        ok = ag is not None and ag["n"] > 0
        h[f"{s}_opposing_hit"] = ag["opposing_hit"] if ok else math.nan
        h[f"{s}_aligned_hit"] = ag["aligned_hit"] if ok else math.nan
    return h, per_step


def _lorenz(data: RunData, q: str) -> dict:
    """Lorenz curve averaged over steps on a common grid, with its min/max band over steps."""
    sel = _sel(data, q)
    n = data.norm[q]
    grid = np.linspace(0, 1, LORENZ_GRID)
    curves = []
    for m in data.step_indices(sel).values():
        x, y = lorenz_curve(n[m])
        if x.size:
            curves.append(np.interp(grid, x, y))
    if not curves:
        return {}
    c = np.stack(curves)
    return {"share_tokens": grid.tolist(), "mean": c.mean(0).tolist(), "lo": c.min(0).tolist(),
            "hi": c.max(0).tolist(), "n_steps": len(curves)}  # fmt: skip


def _by_category(data: RunData, q: str) -> dict:
    sel = _sel(data, q)
    a = data.alignment[q]
    out = {}
    for i, c in enumerate(CATEGORIES):
        mean, ci, cnt = mean_ci(a[sel & (data.category == i)])
        out[c] = {"mean": mean, "ci": ci, "n": cnt}
    return out


def _position(data: RunData, q: str) -> dict:
    sel = _sel(data, q)
    a = data.alignment[q]
    bins = pos_bin(data.rpos)
    rows = [mean_ci(a[sel & (bins == b)]) for b in range(N_POS_BINS)]
    last = max((b for b, r in enumerate(rows) if r[2] > 0), default=-1) + 1
    return {"labels": pos_bin_labels()[:last], "mean": [r[0] for r in rows[:last]],
            "ci": [r[1] for r in rows[:last]], "n": [r[2] for r in rows[:last]]}  # fmt: skip


def _step_position(data: RunData, q: str) -> dict:
    sel = _sel(data, q)
    a = data.alignment[q]
    bins = pos_bin(data.rpos)
    nb = int(bins[sel].max()) + 1 if sel.any() else 0
    grid = np.full((len(data.steps), nb), np.nan)
    for i, m in enumerate(data.step_indices(sel).values()):
        sums = np.bincount(bins[m], weights=a[m], minlength=nb)
        cnt = np.bincount(bins[m], minlength=nb)
        with np.errstate(invalid="ignore", divide="ignore"):
            grid[i] = np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan)
    return {"steps": [int(s) for s in data.steps], "labels": pos_bin_labels()[:nb], "mean": grid.tolist()}


def _prompt_vs_response(data: RunData, q: str) -> dict | None:
    a, n = data.alignment[q], data.norm[q]
    out = {}
    for part, m in (("prompt", ~data.completion), ("response", data.completion)):
        m = m & np.isfinite(a)
        out[part] = {"n": int(m.sum()), "mean_alignment": float(a[m].mean()) if m.any() else math.nan,
                     "mean_norm": float(np.nanmean(n[m])) if m.any() else math.nan,
                     "opposing_fraction": opposing_fraction(a[m]),
                     "share_of_magnitude": float(np.nansum(n[m]))}  # fmt: skip
    total = out["prompt"]["share_of_magnitude"] + out["response"]["share_of_magnitude"]
    for part in out:
        out[part]["share_of_magnitude"] = out[part]["share_of_magnitude"] / total if total > 0 else math.nan
    return out if out["prompt"]["n"] > 0 else None


def _context(data: RunData, sid: int, t: int, left: int = 8, right: int = 3) -> tuple[str, str, str]:
    pieces = data.tokens[sid]
    before = "".join(display_piece(p) for p in pieces[max(0, t - left) : t])
    after = "".join(display_piece(p) for p in pieces[t + 1 : t + 1 + right])
    return before, display_piece(pieces[t]), after


def _top_opposing(data: RunData, q: str, k: int = TOP_K) -> list[dict]:
    """The k most opposing token occurrences, one per (example, position): an example traced at several steps is
    listed once, at its most opposing step, with the number of traced steps where it was opposing / traced."""
    sel = _sel(data, q)
    a = data.alignment[q]
    # occurrence key: (example_index, position); a sequence without an example index is its own example
    seq_ex = np.asarray([e for _, e in data.seq_info], dtype=np.int64)
    ex = seq_ex[data.seq] if data.seq.size else np.zeros(0, np.int64)
    owner = np.where(ex >= 0, ex, -1 - data.seq)
    code = owner * (int(data.t.max(initial=0)) + 1) + data.t
    opp = sel & (a < 0)
    traced_codes, traced_n = np.unique(code[sel], return_counts=True)
    opp_codes, opp_n = np.unique(code[opp], return_counts=True)
    idx = np.flatnonzero(opp)
    idx = idx[np.argsort(a[idx], kind="stable")]
    out, seen = [], set()
    for i in idx:
        c = int(code[i])
        if c in seen:
            continue
        seen.add(c)
        before, tok, after = _context(data, int(data.seq[i]), int(data.t[i]))
        out.append({
            "step": int(data.step[i]), "example_index": int(ex[i]), "position": int(data.t[i]), "token": tok,
            "context_before": before, "context_after": after, "category": CATEGORIES[int(data.category[i])],
            "alignment": float(a[i]), "norm": float(data.norm[q][i]), "loss": float(data.loss[i]),
            "steps_opposing": int(opp_n[np.searchsorted(opp_codes, c)]),
            "steps_traced": int(traced_n[np.searchsorted(traced_codes, c)]),
            "weights": {sch: float(w[i]) for sch, w in data.weight.items() if np.isfinite(w[i])},
        })  # fmt: skip
        if len(out) == k:
            break
    return out


def _autocorr(data: RunData, q: str) -> dict:
    a = np.where(data.completion, data.alignment[q], np.nan)
    order = np.lexsort((data.t, data.seq))
    seqs = np.split(a[order], np.flatnonzero(np.diff(data.seq[order])) + 1) if a.size else []
    acf, n_pairs = autocorrelation(seqs, MAX_LAG)
    return {"lag": list(range(MAX_LAG + 1)), "acf": acf.tolist(), "n_pairs": n_pairs.tolist()}


def _loss_alignment(data: RunData, q: str) -> dict:
    sel = _sel(data, q) & np.isfinite(data.loss)
    a, loss = data.alignment[q][sel], data.loss[sel]
    if a.size < 2:
        return {}
    edges = np.unique(np.quantile(loss, np.linspace(0, 1, 11)))
    b = np.clip(np.searchsorted(edges, loss, side="right") - 1, 0, max(len(edges) - 2, 0))
    centers, means, cis, ns = [], [], [], []
    for i in range(max(len(edges) - 1, 1)):
        m = b == i
        if m.any():
            mean, ci, cnt = mean_ci(a[m])
            centers.append(float(np.median(loss[m])))
            means.append(mean)
            cis.append(ci)
            ns.append(cnt)
    return {"loss_median": centers, "mean_alignment": means, "ci": cis, "n": ns,
            "spearman_pooled": spearman(loss, a)}  # fmt: skip


def _scheme_agreement(data: RunData, q: str) -> dict:
    sel = _sel(data, q)
    out = {}
    for s, rule in agreement_schemes(data).items():
        w = data.weight.get(s)
        if w is not None:
            ag = scheme_agreement(data.alignment[q][sel], w[sel], affects=rule["affects"])
            if ag["n"] > 0:
                out[s] = ag
    return out


def _layers(data: RunData) -> dict | None:
    ls = data.layers
    if ls is None:
        return None
    parsed = {nm: parse_module_name(nm) for nm in ls.names}
    layer_ids = sorted({p[0] for p in parsed.values() if p[0] is not None})

    def pooled(names):
        cnt = sum(ls.count[n] for n in names)
        return (sum(ls.sum_align[n] for n in names) / cnt if cnt else math.nan,
                sum(ls.sum_norm[n] for n in names) / cnt if cnt else math.nan, cnt)  # fmt: skip

    per_layer = {"layer": layer_ids, "mean_alignment": [], "mean_norm": [], "g_share": []}
    for li in layer_ids:
        names = [n for n, p in parsed.items() if p[0] == li]
        al, nm, _ = pooled(names)
        per_layer["mean_alignment"].append(al)
        per_layer["mean_norm"].append(nm)
        shares = [np.asarray(ls.g_share[n]) for n in names if ls.g_share.get(n)]
        per_layer["g_share"].append(float(np.nanmean(np.sum(shares, axis=0))) if shares else math.nan)

    modules: dict[str, dict[str, dict]] = {}
    for kind in dict.fromkeys(p[1] for p in parsed.values()):
        for lora in dict.fromkeys(p[2] for p in parsed.values()):
            names = [n for n, p in parsed.items() if p[1] == kind and p[2] == lora]
            if names:
                al, nm, cnt = pooled(names)
                modules.setdefault(kind, {})[lora] = {"mean_alignment": al, "mean_norm": nm, "n": cnt}

    lora = None
    if any(p[2] == "lora_A" for p in parsed.values()) and any(p[2] == "lora_B" for p in parsed.values()):
        lora = {"layer": layer_ids}
        for part in ("lora_A", "lora_B"):
            norms, gns = [], []
            for li in layer_ids:
                names = [n for n, p in parsed.items() if p[0] == li and p[2] == part]
                norms.append(pooled(names)[1] if names else math.nan)
                g = [float(np.mean(ls.g_norm[n])) for n in names if ls.g_norm.get(n)]
                gns.append(float(np.mean(g)) if g else math.nan)
            lora[part] = {"mean_norm": norms, "mean_G_norm": gns}

    nb = N_POS_BINS
    grid = np.full((len(layer_ids), nb), np.nan)
    for i, li in enumerate(layer_ids):
        names = [n for n, p in parsed.items() if p[0] == li]
        s = np.sum([ls.bin_sum_align[n] for n in names], axis=0)
        c = np.sum([ls.bin_count[n] for n in names], axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            grid[i] = np.where(c > 0, s / np.maximum(c, 1), np.nan)
    used = np.flatnonzero(np.isfinite(grid).any(0))
    last = int(used.max()) + 1 if used.size else 0
    return {
        "n_modules": len(ls.names),
        "per_layer": per_layer,
        "modules": modules,
        "lora": lora,
        "layer_position": {"layer": layer_ids, "labels": pos_bin_labels()[:last], "mean": grid[:, :last].tolist()},
    }


def compute_summary(data: RunData) -> dict:
    """Every number of the analysis of one run (JSON-able after `to_jsonable`): run info, the headline table per
    quantity, and the series behind each figure. Quantities the trace lacks are absent from the per-quantity dicts."""
    qs = data.quantities
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        headline, per_step = {}, {}
        for q in qs:
            headline[q], per_step[q] = headline_and_steps(data, q)
        summary = {
            "run": {
                "run_dir": str(data.run_dir), "name": data.name, "mode": data.mode, "steps": data.steps,
                "n_steps": len(data.steps), "n_sequences": len(data.tokens), "n_tokens": data.n_tokens,
                "n_completion_tokens": int(data.completion.sum()), "quantities": qs,
                "quantity_labels": {q: QUANTITY_LABELS[q] for q in qs},
                "schemes_recorded": sorted(s for s, w in data.weight.items() if np.isfinite(w).any()),
                "scheme_params": data.scheme_params,
                "scheme_rules": data.scheme_rules,
            },  # fmt: skip
            "headline": headline,
            "headline_labels": dict(headline_rows(data.scheme_rules)),
            "per_step": per_step,
            "lorenz": {q: _lorenz(data, q) for q in qs},
            "by_category": {q: _by_category(data, q) for q in qs},
            "position": {q: _position(data, q) for q in qs},
            "step_position": {q: _step_position(data, q) for q in qs},
            "prompt_vs_response": {q: v for q in qs if (v := _prompt_vs_response(data, q)) is not None},
            "top_opposing": {q: _top_opposing(data, q) for q in qs},
            "autocorrelation": {q: _autocorr(data, q) for q in qs},
            "loss_alignment": {q: _loss_alignment(data, q) for q in qs},
            "scheme_agreement": {q: _scheme_agreement(data, q) for q in qs},
            "layers": _layers(data),
        }
    return summary


def to_jsonable(obj):
    """Replace NaN/inf by None and numpy scalars/arrays by Python values, recursively (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


__all__ = ["compute_summary", "to_jsonable", "BASE_HEADLINE_ROWS", "headline_rows", "summary_headline_rows",
           "QUANTITIES"]


def premise_summary(run_dir) -> dict | None:
    """The `premise/*` metrics a `--log_premise` run logged (`RUN/train_results.json` key `premise`): per metric the
    mean over the logged steps, the first and the last value, and the number of steps; None when the run has none.

    Source: ours (issue: test the reference study's premise directly).
    """
    import json
    from pathlib import Path

    path = Path(run_dir) / "train_results.json"
    try:
        series = json.loads(path.read_text()).get("premise") or []
    except (OSError, ValueError, AttributeError):
        return None
    series = [s for s in series if isinstance(s, dict)]
    if not series:
        return None
    keys = sorted({k for s in series for k in s if k.startswith("premise/")})
    out = {"steps": len(series), "metrics": {}}
    for k in keys:
        vals = [float(s[k]) for s in series if isinstance(s.get(k), (int, float)) and math.isfinite(float(s[k]))]
        out["metrics"][k] = {"mean": float(np.mean(vals)) if vals else math.nan,
                             "first": vals[0] if vals else math.nan, "last": vals[-1] if vals else math.nan}
    return out
