"""The demo's "what the weighting did" table: scheme weights from the loss pipeline on held-out per-token NLL."""

import math

import numpy as np
import pytest

from tokensft.cli.demo import format_tokens_table, reweighted_tokens


def _nll():
    # two sequences; token texts repeat across them
    mode = [np.array([0.1, 2.0, 0.5]), np.array([2.2, 0.05])]
    base = [np.array([0.3, 2.5, 0.6]), np.array([2.0, 0.2])]
    sft = [np.array([0.2, 1.9, 0.4]), np.array([2.1, 0.1])]
    texts = [["The", " 7", " is"], [" 7", "."]]
    return {"base": base, "sft": sft, "dft": mode}, texts


def test_dft_weights_are_the_tuned_models_probabilities_grouped_by_token():
    nll, texts = _nll()
    picked = reweighted_tokens(nll, texts, "dft", top=2)
    # dft: w = p = exp(-nll); " 7" occurs twice (nll 2.0 and 2.2): mean weight (e^-2 + e^-2.2) / 2, the smallest
    assert [r["token"] for r in picked] == [" 7", " is"]
    assert picked[0]["count"] == 2 and picked[0]["context"] == "The"
    assert picked[0]["weight"] == pytest.approx((math.exp(-2.0) + math.exp(-2.2)) / 2, rel=1e-6)
    assert picked[0]["nll"] == pytest.approx({"base": 2.25, "sft": 2.0, "dft": 2.1})
    assert picked[1]["weight"] == pytest.approx(math.exp(-0.5), rel=1e-6)
    table = format_tokens_table("dft", picked, ["base", "sft", "dft"])
    assert "| `␣7` | `The` | 2 | 0.123 | 2.25 | 2.00 | 2.10 |" in table


def test_reference_schemes_use_the_base_model_and_others_are_skipped():
    nll, texts = _nll()
    nll["rho1"] = nll.pop("dft")
    picked = reweighted_tokens(nll, texts, "rho1", top=5)
    # excess loss nll - nll_base: The -0.2, " 7" -0.5, " is" -0.1 | " 7" +0.2, "." -0.15; rho1 keeps the
    # floor(5 * 0.6) = 3 largest (+0.2, -0.1, -0.15): "The" 0, " 7" (0 + 1) / 2, " is" 1, "." 1
    assert [(r["token"], r["weight"]) for r in picked] == [("The", 0.0), (" 7", 0.5), (" is", 1.0), (".", 1.0)]
    nll["eaft"] = nll.pop("rho1")
    assert reweighted_tokens(nll, texts, "eaft") == []  # needs top-K entropy, which the table does not have
