"""Scalar metrics of per-token gradient traces: concentration, opposition, correlation, scheme agreement.

Pure numpy on 1-D arrays; NaN entries (tokens that are not supervised targets, or values a trace did not record) are
dropped pairwise before computing. Every function returns NaN when there is nothing to compute on (empty input, zero
variance) instead of raising, so a sparse trace still yields a summary; bad input (negative magnitudes, mismatched
lengths) raises `ValueError`.

Definitions follow the reference study (Gini, tokens-for-80%, opposing fraction, alignment by category, lag
autocorrelation); loss-alignment rank correlation and scheme agreement are ours (the study did not measure them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tokensft.tracing.schema import affected

# Relative tolerance of the cumulative-mass comparison in `share_for_mass`: 8 equal values of 0.1 sum to
# 0.7999999999999999 in float64, which must still count as reaching 80%.
_MASS_RTOL = 1e-9


def _finite(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def _pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"x and y must have the same length, got {a.size} and {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    return a[ok], b[ok]


def _magnitudes(x) -> np.ndarray:
    a = _finite(x)
    if (a < 0).any():
        raise ValueError(f"magnitudes must be non-negative, got min {a.min():.4g}")
    return a


def gini(magnitudes) -> float:
    """Gini coefficient of non-negative values (0 = all equal, 1 - 1/n = one value carries everything).

    G = sum_i (2i - n - 1) x_(i) / (n sum_i x_i), x_(1) <= ... <= x_(n) ascending, i = 1..n.

    Args:
        magnitudes: (N,) non-negative values, e.g. per-token gradient norms ||g_t||; NaN entries are dropped.

    Returns:
        Gini in [0, 1 - 1/n]; 0.0 when all values are zero; NaN when no finite value is left.

    Raises:
        ValueError: a negative value.

    Source: the reference study (concentration of per-token gradient magnitude).
    """
    x = np.sort(_magnitudes(magnitudes))
    n = x.size
    if n == 0:
        return math.nan
    total = x.sum()
    if total == 0:
        return 0.0
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(np.sum((2 * i - n - 1) * x) / (n * total))


def share_for_mass(magnitudes, mass: float = 0.8) -> float:
    """Smallest share of values whose sum reaches `mass` of the total ("tokens for 80% of gradient weight").

    Sort descending, take the smallest k with cumsum_k >= mass * total (up to a 1e-9 relative tolerance for float
    rounding), return k / n. Equal values -> `mass` rounded up to a multiple of 1/n; one non-zero value -> 1/n.

    Args:
        magnitudes: (N,) non-negative values; NaN entries are dropped.
        mass: fraction of the total in (0, 1].

    Returns:
        k / n in (0, 1]; NaN when there is no finite value or the total is zero.

    Raises:
        ValueError: a negative value, or `mass` outside (0, 1].

    Source: the reference study ("tokens for 80% gradient weight").
    """
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    x = _magnitudes(magnitudes)
    n = x.size
    total = x.sum() if n else 0.0
    if n == 0 or total == 0:
        return math.nan
    cs = np.cumsum(np.sort(x)[::-1])
    k = int(np.searchsorted(cs, mass * total * (1 - _MASS_RTOL), side="left")) + 1
    return min(k, n) / n


def lorenz_curve(magnitudes) -> tuple[np.ndarray, np.ndarray]:
    """Lorenz curve: cumulative share of tokens (ascending magnitude) vs. cumulative share of total magnitude.

    Args:
        magnitudes: (N,) non-negative values; NaN entries are dropped.

    Returns:
        (share_tokens, share_mass), both (n + 1,) starting at (0, 0) and ending at (1, 1); twice the area between the
        diagonal and the curve is the Gini coefficient. Empty arrays when there is no finite value or the total is 0.

    Source: the reference study (figure 12).
    """
    x = np.sort(_magnitudes(magnitudes))
    if x.size == 0 or x.sum() == 0:
        return np.zeros(0), np.zeros(0)
    share_tokens = np.arange(x.size + 1, dtype=np.float64) / x.size
    share_mass = np.concatenate([[0.0], np.cumsum(x) / x.sum()])
    return share_tokens, share_mass


def opposing_fraction(alignments) -> float:
    """Share of tokens whose gradient opposes the total gradient: mean(alignment < 0) over finite values.

    Args:
        alignments: (N,) cosines cos(g_t, G) in [-1, 1]; NaN entries are dropped.

    Returns:
        Fraction in [0, 1]; NaN when empty. Source: the reference study.
    """
    a = _finite(alignments)
    return float(np.mean(a < 0)) if a.size else math.nan


def pearson(x, y) -> float:
    """Pearson correlation of finite (x, y) pairs; NaN with fewer than 2 pairs or zero variance.

    Raises:
        ValueError: x and y of different lengths.
    """
    a, b = _pairs(x, y)
    if a.size < 2:
        return math.nan
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    return float(np.dot(a, b) / den) if den > 0 else math.nan


def rankdata(x) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank (like `scipy.stats.rankdata(method="average")`)."""
    a = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # start index of each run of equal values
    new_run = np.concatenate([[True], sorted_a[1:] != sorted_a[:-1]])
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.concatenate([starts[1:], [a.size]])
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = avg[run_id]
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation of finite (x, y) pairs (Pearson of average ranks); NaN when undefined.

    Raises:
        ValueError: x and y of different lengths.
    """
    a, b = _pairs(x, y)
    if a.size < 2:
        return math.nan
    return pearson(rankdata(a), rankdata(b))


def autocorrelation(sequences: Sequence[np.ndarray], max_lag: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Autocorrelation of a per-token series over lags, pooled over sequences (pairs never cross sequences).

    r(k) = sum over pairs (a_t - m)(a_{t+k} - m) / (n_pairs(k) * var), with the mean m and variance var of all finite
    values; a pair counts when both members are finite (so prompt tokens, NaN, are skipped).

    Args:
        sequences: per-sequence arrays (T_i,), e.g. alignments of one traced sequence in token order.
        max_lag: largest lag k.

    Returns:
        (acf, n_pairs), both (max_lag + 1,); acf[0] = 1, NaN where a lag has no pair or the variance is zero.

    Source: the reference study (alignment autocorrelation over lags).
    """
    seqs = [np.asarray(s, dtype=np.float64).ravel() for s in sequences]
    vals = np.concatenate([s[np.isfinite(s)] for s in seqs]) if seqs else np.zeros(0)
    acf = np.full(max_lag + 1, np.nan)
    n_pairs = np.zeros(max_lag + 1, dtype=np.int64)
    if vals.size < 2 or vals.var() == 0:
        return acf, n_pairs
    m, var = vals.mean(), vals.var()
    for k in range(max_lag + 1):
        num, cnt = 0.0, 0
        for s in seqs:
            if s.size <= k:
                continue
            a, b = s[: s.size - k], s[k:]
            ok = np.isfinite(a) & np.isfinite(b)
            cnt += int(ok.sum())
            num += float(np.sum((a[ok] - m) * (b[ok] - m)))
        n_pairs[k] = cnt
        if cnt:
            acf[k] = num / (cnt * var)
    return acf, n_pairs


def scheme_agreement(alignments, weights, *, affects: str = "below_one") -> dict[str, float]:
    """How well a weighting scheme targets opposing tokens.

    A token is *hit* when the scheme affects it by its declared rule `affects` (`tokensft.tracing.schema.affected`:
    `zero`, topk drops it: weight 0; `below_one`, antiop clips it or lr down-weights it: weight < 1); *opposing* when
    alignment < 0, *aligned* otherwise. Tokens whose weight or alignment is NaN (e.g. lr without a reference model)
    are dropped.

    Args:
        alignments: (N,) cos(g_t, G).
        weights: (N,) the scheme's weight of each token.
        affects: the scheme's affected-token rule, `"zero"` or `"below_one"` (trace metadata, `RunData.scheme_rules`).

    Returns:
        dict with `opposing_hit` = P(hit | opposing), `aligned_hit` = P(hit | aligned), `precision` =
        P(opposing | hit), `lift` = opposing_hit / aligned_hit, `n`, `n_opposing`, `n_hit`. NaN where undefined;
        `n` = 0 when no token has both values.

    Source: ours (the reference study never measured whether the schemes hit the opposing tokens).

    Raises:
        ValueError: arrays of different lengths, or an unknown rule.
    """
    a, w = _pairs(alignments, weights)
    opp = a < 0
    hit = affected(w, affects)
    n_opp, n_al, n_hit = int(opp.sum()), int((~opp).sum()), int(hit.sum())
    opp_hit = float(hit[opp].mean()) if n_opp else math.nan
    al_hit = float(hit[~opp].mean()) if n_al else math.nan
    return {
        "opposing_hit": opp_hit,
        "aligned_hit": al_hit,
        "precision": float(opp[hit].mean()) if n_hit else math.nan,
        "lift": opp_hit / al_hit if (n_opp and n_al and al_hit > 0) else math.nan,
        "n": int(a.size),
        "n_opposing": n_opp,
        "n_hit": n_hit,
    }


def mean_ci(values) -> tuple[float, float, int]:
    """Mean, half-width of a normal 95% confidence interval (1.96 standard errors), and count of finite values."""
    v = _finite(values)
    if v.size == 0:
        return math.nan, math.nan, 0
    half = 1.96 * v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else math.nan
    return float(v.mean()), float(half), int(v.size)
