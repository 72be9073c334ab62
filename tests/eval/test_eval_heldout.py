"""Held-out NLL: per-sequence sums against a naive one-sequence-at-a-time reference, and the paired difference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_model, tiny_rows
from tokensft.eval.heldout import paired_nll_difference, sequence_nll


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
    base = {"per_sequence": [[2.0, 2], [3.0, 3], [8.0, 4]]}  # means 1, 1, 2
    tuned = {"per_sequence": [[1.0, 2], [3.0, 3], [4.0, 4]]}  # means 0.5, 1, 1 → diffs -0.5, 0, -1
    d = paired_nll_difference(tuned, base)
    assert d["mean_diff"] == pytest.approx(-0.5)
    sd = math.sqrt(((0.0) ** 2 + 0.5**2 + 0.5**2) / 2)
    half = 1.959963984540054 * sd / math.sqrt(3)
    assert d["ci95"][0] == pytest.approx(-0.5 - half)
    assert d["ci95"][1] == pytest.approx(-0.5 + half)
    assert d["frac_improved"] == pytest.approx(2 / 3)


def test_paired_difference_refuses_different_sequences():
    with pytest.raises(ValueError, match="same sequences"):
        paired_nll_difference({"per_sequence": [[1.0, 2]]}, {"per_sequence": [[1.0, 3]]})
