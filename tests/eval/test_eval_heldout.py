"""Held-out NLL: per-sequence sums against a naive one-sequence-at-a-time reference, and the paired difference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_model, tiny_rows
from tokensft.eval.heldout import paired_nll_difference, sequence_nll, t975


def _naive(model, row):
    ids = torch.tensor([row["input_ids"]])
    labels = torch.tensor(row["labels"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # (T, V)
    target = labels[1:]
    keep = target != -100
    nll = F.cross_entropy(logits[:-1][keep].double(), target[keep], reduction="sum")
    return float(nll), int(keep.sum())


def test_sequence_nll_equals_one_sequence_at_a_time():
    model = tiny_model(3)
    rows = tiny_rows(7, seed=5)
    got = sequence_nll(model, rows, pad_token_id=0, batch_size=3, progress=False)
    assert len(got) == len(rows)
    for (s, n), row in zip(got, rows):
        ref_s, ref_n = _naive(model, row)
        assert n == ref_n
        assert s == pytest.approx(ref_s, rel=1e-5, abs=1e-5)
    assert model.training  # left as it was found (a fresh model is in training mode)


def test_paired_difference_closed_form():
    base = {"per_sequence": [[2.0, 2], [3.0, 3], [8.0, 4]]}
    tuned = {"per_sequence": [[1.0, 2], [3.0, 3], [4.0, 4]]}  # summed differences -1, 0, -4 over 2, 3, 4 tokens
    d = paired_nll_difference(tuned, base)
    delta = -5 / 9
    assert d["mean_diff"] == pytest.approx(delta)
    # = difference of the two token-weighted NLLs
    assert d["mean_diff"] == pytest.approx((1 + 3 + 4) / 9 - (2 + 3 + 8) / 9)
    resid = [-1 - delta * 2, 0 - delta * 3, -4 - delta * 4]
    se = math.sqrt(sum(r * r for r in resid) / 81 * 3 / 2)
    half = 4.303 * se  # t_{0.975, 2}
    assert d["ci95"][0] == pytest.approx(delta - half)
    assert d["ci95"][1] == pytest.approx(delta + half)
    assert d["frac_improved"] == pytest.approx(2 / 3) and d["n"] == 3


def test_paired_difference_one_sequence_has_no_interval():
    d = paired_nll_difference({"per_sequence": [[1.0, 2]]}, {"per_sequence": [[3.0, 2]]})
    assert d["mean_diff"] == -1.0 and all(math.isnan(x) for x in d["ci95"])


def test_t975_table():
    assert t975(1) == pytest.approx(12.706) and t975(30) == pytest.approx(2.042)
    assert t975(31) == pytest.approx(1.96, abs=1e-3) and math.isnan(t975(0))


def test_paired_difference_refuses_different_sequences():
    with pytest.raises(ValueError, match="row 0 has 2 scored tokens"):
        paired_nll_difference({"per_sequence": [[1.0, 2]]}, {"per_sequence": [[1.0, 3]]})
    with pytest.raises(ValueError, match="'max_length'"):
        paired_nll_difference({"settings": {"max_length": 10}, "per_sequence": []},
                              {"settings": {"max_length": 20}, "per_sequence": []})
    with pytest.raises(ValueError, match="different sequences"):
        paired_nll_difference({"per_sequence": [[1.0, 2]], "rows": [0]}, {"per_sequence": [[1.0, 2]], "rows": [1]})
