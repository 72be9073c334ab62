"""Metric functions against closed forms and naive reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tokensft.analysis.metrics import (
    autocorrelation,
    gini,
    lorenz_curve,
    mean_ci,
    opposing_fraction,
    pearson,
    rankdata,
    scheme_agreement,
    share_for_mass,
    spearman,
)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 37])
def test_gini_closed_forms(n):
    assert gini(np.full(n, 3.7)) == pytest.approx(0.0, abs=1e-12)
    one = np.zeros(n)
    one[n // 2] = 5.0
    assert gini(one) == pytest.approx(1 - 1 / n, abs=1e-12)
    assert share_for_mass(one, 0.8) == pytest.approx(1 / n, abs=1e-12)


def test_share_for_mass_equal_values():
    # 8 x 0.1 sums to 0.7999999999999999 in float64: must still count as 80%
    assert share_for_mass(np.full(10, 0.1), 0.8) == 0.8
    assert share_for_mass(np.full(10, 1.0), 0.8) == 0.8
    assert share_for_mass(np.full(7, 1.0), 0.8) == pytest.approx(6 / 7)  # ceil(5.6) = 6 of 7
    assert share_for_mass([4.0, 3.0, 2.0, 1.0], 0.7) == 0.5  # 4 + 3 = 7 = 70% of 10
    assert share_for_mass([4.0, 3.0, 2.0, 1.0], 0.71) == 0.75


def test_gini_matches_mean_absolute_difference():
    rng = np.random.default_rng(0)
    for n in (3, 17, 200):
        x = rng.lognormal(0, 1.2, n)
        naive = np.abs(x[:, None] - x[None, :]).sum() / (2 * n * n * x.mean())  # G = E|X - X'| / (2 mu)
        assert gini(x) == pytest.approx(naive, rel=1e-10)
        # invariances: scale and order
        assert gini(7.5 * x) == pytest.approx(gini(x), rel=1e-12)
        assert gini(rng.permutation(x)) == pytest.approx(gini(x), rel=1e-12)


def test_lorenz_area_is_gini():
    x = np.random.default_rng(1).exponential(1.0, 50)
    sx, sy = lorenz_curve(x)
    assert sx[0] == 0 and sy[0] == 0 and sx[-1] == 1 and sy[-1] == pytest.approx(1)
    area = np.sum(np.diff(sx) * (sy[1:] + sy[:-1]) / 2)  # trapezoid area under the curve
    assert 1 - 2 * area == pytest.approx(gini(x), rel=1e-10)


def test_metrics_edge_cases():
    assert math.isnan(gini([]))
    assert gini([0.0, 0.0]) == 0.0
    assert math.isnan(share_for_mass([0.0, 0.0]))
    assert gini([np.nan, 1.0, 1.0]) == 0.0  # NaN dropped
    with pytest.raises(ValueError, match="non-negative"):
        gini([1.0, -0.5])
    with pytest.raises(ValueError, match="mass"):
        share_for_mass([1.0], 0.0)
    with pytest.raises(ValueError, match="same length"):
        pearson([1, 2, 3], [1, 2])
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))  # zero variance


def test_opposing_fraction():
    assert opposing_fraction([0.5, -0.2, 0.1, -0.4]) == 0.5
    assert opposing_fraction([0.5, -0.2, np.nan, 0.1, -0.4]) == 0.5
    assert opposing_fraction([0.0, 0.3]) == 0.0  # exactly orthogonal is not opposing
    assert math.isnan(opposing_fraction([]))


def _naive_ranks(x):
    x = np.asarray(x, float)
    return np.array([np.sum(x < v) + (np.sum(x == v) + 1) / 2 for v in x])


def test_rankdata_and_spearman_against_naive():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 6, 40).astype(float)  # many ties
    y = x + rng.normal(0, 2, 40)
    np.testing.assert_allclose(rankdata(x), _naive_ranks(x))
    np.testing.assert_allclose(rankdata([1, 2, 2, 3]), [1, 2.5, 2.5, 4])
    expected = np.corrcoef(_naive_ranks(x), _naive_ranks(y))[0, 1]
    assert spearman(x, y) == pytest.approx(expected, rel=1e-12)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    z = rng.normal(size=30)
    assert spearman(z, np.exp(3 * z)) == pytest.approx(1.0)  # monotone transform
    assert spearman(z, -(z**3)) == pytest.approx(-1.0)
    # NaN pairs are dropped
    assert spearman([1, 2, np.nan, 3], [1, 2, 5, 3]) == pytest.approx(1.0)


def test_autocorrelation_closed_form_and_naive():
    alt = np.tile([1.0, -1.0], 50)
    acf, n = autocorrelation([alt], 3)
    np.testing.assert_allclose(acf, [1, -1, 1, -1])
    assert list(n) == [100, 99, 98, 97]
    rng = np.random.default_rng(3)
    seqs = [rng.normal(size=m) for m in (5, 12, 30)]
    seqs[1][[0, 4]] = np.nan  # e.g. prompt tokens
    acf, n = autocorrelation(seqs, 4)
    vals = np.concatenate([s[np.isfinite(s)] for s in seqs])
    m, var = vals.mean(), vals.var()
    for k in range(5):
        pairs = [(s[t], s[t + k]) for s in seqs for t in range(len(s) - k)
                 if np.isfinite(s[t]) and np.isfinite(s[t + k])]  # fmt: skip
        assert n[k] == len(pairs)
        assert acf[k] == pytest.approx(sum((a - m) * (b - m) for a, b in pairs) / (len(pairs) * var), rel=1e-10)


def test_scheme_agreement_by_hand():
    align = [-0.5, -0.1, 0.2, 0.3, 0.4]
    topk = scheme_agreement(align, [0, 1, 0, 1, 1])  # drops one of 2 opposing, one of 3 aligned
    assert topk["opposing_hit"] == 0.5 and topk["aligned_hit"] == pytest.approx(1 / 3)
    assert topk["precision"] == 0.5 and topk["lift"] == pytest.approx(1.5)
    assert (topk["n"], topk["n_opposing"], topk["n_hit"]) == (5, 2, 2)
    antiop = scheme_agreement(align, [0.5, 0.9995, 1.0, 1.0, 1.0])  # float16 just below 1 still counts as clipped
    assert antiop["opposing_hit"] == 1.0 and antiop["aligned_hit"] == 0.0 and antiop["precision"] == 1.0
    lr = scheme_agreement(align, [0.5, 1.5, 0.9, 2.0, 1.0])  # up-weighting (w > 1) is not a hit
    assert lr["opposing_hit"] == 0.5 and lr["aligned_hit"] == pytest.approx(1 / 3)
    none = scheme_agreement(align, [np.nan] * 5)  # lr without a reference model
    assert none["n"] == 0 and math.isnan(none["opposing_hit"])


def test_mean_ci():
    mean, half, n = mean_ci([1.0, 2.0, 3.0, np.nan])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(1.96 * 1.0 / math.sqrt(3))
