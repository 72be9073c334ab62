"""pass@k against its closed form, Wilson interval against a textbook value, summaries."""

from __future__ import annotations

import math

import pytest

from tokensft.eval import pass_at_k, summarize, wilson_interval


@pytest.mark.parametrize(
    "n, c, k", [(10, 3, 1), (10, 3, 2), (10, 3, 5), (16, 0, 4), (16, 16, 8), (20, 7, 13), (5, 1, 5)]
)
def test_pass_at_k_closed_form(n, c, k):
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_1_is_fraction_correct():
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


def test_wilson_known_value():
    # 8 / 10 at 95%: (0.4902, 0.9433), e.g. Newcombe 1998, Statistics in Medicine 17, table I.
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4)
    assert hi == pytest.approx(0.9433, abs=1e-4)


def test_wilson_edges():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_summarize_truncation_and_groups():
    records = [
        {"correct": True, "finish_reason": "stop", "num_tokens": 10, "subject": "Algebra", "level": 1},
        {"correct": False, "finish_reason": "length", "num_tokens": 20, "subject": "Algebra", "level": 2},
        {"correct": False, "finish_reason": "length", "num_tokens": 30, "subject": "Geometry", "level": 2},
    ]
    m = summarize(records)
    assert m["num_truncated"] == 2
    assert m["truncation_rate"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["per_subject"]["Algebra"] == {"accuracy": 0.5, "num_problems": 2}
    assert m["per_level"]["2"]["accuracy"] == 0.0
    assert m["mean_num_tokens"] == pytest.approx(20.0)


def test_summarize_n_samples():
    records = [
        {"correct": [True, False, False, False], "finish_reason": ["stop"] * 4, "num_tokens": [1] * 4},
        {"correct": [False] * 4, "finish_reason": ["stop"] * 3 + ["length"], "num_tokens": [1] * 4},
    ]
    m = summarize(records, n=4)
    assert m["per_problem"] == {}  # records without ids
    m = summarize([{**r, "id": f"p{i}"} for i, r in enumerate(records)], n=4)
    assert m["per_problem"] == {"p0": 0.25, "p1": 0.0}  # each problem's fraction of correct samples
    assert m["accuracy"] == pytest.approx(0.125)
    assert m["avg_at_4"] == pytest.approx(0.125)
    assert m["pass_at_k"]["1"] == pytest.approx(0.125)
    assert m["pass_at_k"]["4"] == pytest.approx(0.5)
    assert m["pass_at_k"]["2"] == pytest.approx((1 - math.comb(3, 2) / math.comb(4, 2)) / 2)
    assert m["num_samples"] == 8 and m["num_truncated"] == 1


def test_paired_sign_test_is_mcnemar_exact():
    """One seed: McNemar's exact test. 37 problems only the baseline solves, 2 only the result: p = 2 * P(X <= 2),
    X ~ Bin(39, 1/2) (the issue's sft vs sft-antiop split: about 8e-10)."""
    from tokensft.eval.metrics import paired_sign_test

    base = {f"p{i}": float(i < 37 + 20) for i in range(128)}  # 37 discordant + 20 both right
    res = {f"p{i}": float(37 <= i < 37 + 20 + 2) for i in range(128)}
    t = paired_sign_test(res, base)
    assert (t["result_better"], t["baseline_better"], t["n"]) == (2, 37, 128)
    expect = 2 * sum(math.comb(39, k) for k in range(3)) / 2**39
    assert t["p"] == pytest.approx(expect, rel=1e-9) and 1e-10 < t["p"] < 1e-8
    # seed means: 0.67 vs 0.33 counts for the result, equal means are ties
    t = paired_sign_test({"a": 2 / 3, "b": 0.5, "c": 0.0}, {"a": 1 / 3, "b": 0.5, "c": 1.0})
    assert (t["result_better"], t["baseline_better"], t["p"]) == (1, 1, 1.0)
    assert paired_sign_test({"a": 1.0}, {"a": 1.0})["p"] == 1.0
    with pytest.raises(ValueError, match="different problems"):
        paired_sign_test({"a": 1.0}, {"b": 1.0})
