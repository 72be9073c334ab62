"""The bundle of per-token inputs and the registry of needs: one declaration per need, producers looked up by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tokensft.losses import (
    NEEDS,
    SchemeParam,
    TokenInputs,
    get_scheme,
    head_options,
    loss_from_log_probs,
    produce_needs,
    register_scheme,
    token_weights,
)
from tokensft.losses.inputs import FIELDS


def test_each_need_fills_one_optional_field_and_no_two_share_one():
    fields = [n.field for n in NEEDS.values()]
    assert len(set(fields)) == len(fields)
    assert set(fields) <= set(FIELDS) - {"log_probs", "mask"}
    with pytest.raises(TypeError):
        NEEDS["entropy"] = NEEDS["entropy"]  # read-only


def test_a_needs_knobs_are_declared_on_the_need_and_given_to_every_scheme_that_needs_it():
    for name in ("asft", "sft+kl"):
        assert [p.name for p in get_scheme(name).params][-2:] == ["kl_weight", "kl_direction"]
    assert [p.name for p in get_scheme("eaft").params][-1] == "entropy_top_k"
    assert [p.name for p in get_scheme("sft-align").params] == ["align_rule", "align_clip_quantile",
                                                                 "align_norm_directions"]
    s = register_scheme("needs-topk", lambda ctx: ctx.topk_entropy, needs=("topk_entropy",))
    assert [p.name for p in s.params] == ["entropy_top_k"] and s.resolve_params({})["entropy_top_k"] == 20


def test_head_options_are_the_merged_options_of_the_head_needs():
    assert head_options(get_scheme("sft").needs, {}) == {}
    assert head_options(get_scheme("eaft").needs, {"entropy_top_k": 7}) == {"topk_entropy_k": 7}
    assert head_options(["ref_distribution", "topk_entropy", "ref_log_probs", "entropy"],
                        {"kl_direction": "reverse", "entropy_top_k": 3}) == {"kl_direction": "reverse",
                                                                            "topk_entropy_k": 3}


def test_produce_needs_calls_each_producer_with_its_options():
    calls = []

    def alignment(norm_directions):
        calls.append(norm_directions)
        return torch.full((1, 3), float(norm_directions))

    producers = {"token_alignment": alignment, "ref_log_probs": lambda: torch.ones(1, 3)}
    align = get_scheme("sft-align")
    for rule, k in (("drop", 0), ("clip", 0), ("clip-cosine", 5)):  # the cosine only for clip-cosine, with its k
        fields = produce_needs(align.needs, align.resolve_params({"align_rule": rule, "align_norm_directions": 5}),
                               producers)
        assert calls[-1] == k and list(fields) == ["alignment"] and fields["alignment"].tolist() == [[float(k)] * 3]
    assert produce_needs(get_scheme("rho1").needs, {}, producers)["ref_log_probs"].tolist() == [[1.0] * 3]
    # head needs are the head pass's, unless the path asks for them (the tracer's path has no such head)
    eaft = get_scheme("eaft")
    assert produce_needs(eaft.needs, eaft.resolve_params({}), {}) == {}
    with pytest.raises(ValueError, match="no producer of the need 'topk_entropy'"):
        produce_needs(eaft.needs, eaft.resolve_params({}), {}, head=True)
    # in phases: what has a producer now, in the registry's order whatever the order asked
    both = ["token_alignment", "ref_log_probs"]
    assert list(produce_needs(both, {}, {"token_alignment": alignment}, partial=True)) == ["alignment"]
    assert list(produce_needs(both, {}, producers)) == ["ref_log_probs", "alignment"]


def test_a_missing_need_is_named_with_its_field():
    lp, mask = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mode 'sft-lr' needs ref_log_probs \(TokenInputs.ref_log_probs\)"):
        token_weights("sft-lr", TokenInputs(lp, mask))
    with pytest.raises(ValueError, match=r"needs token_alignment \(TokenInputs.alignment\)"):
        loss_from_log_probs(TokenInputs(lp, mask), "sft-align")
    # the weights never read the KL: token_weights does without it, the loss does not
    assert token_weights("asft", TokenInputs(lp, mask)).tolist() == [[1.0, 1.0]]
    with pytest.raises(ValueError, match=r"needs ref_distribution \(TokenInputs.kl\)"):
        loss_from_log_probs(TokenInputs(lp, mask), "asft")
    with pytest.raises(ValueError, match=r"entropy \(1, 3\) and mask \(1, 2\) differ in shape"):
        token_weights("sft", TokenInputs(lp, mask, entropy=torch.zeros(1, 3)))


def test_a_scheme_reads_every_bundle_field_from_its_context():
    seen = {}

    def spy(ctx):
        seen.update({f: getattr(ctx, f) for f in FIELDS})
        return torch.ones_like(ctx.log_probs)

    register_scheme("spy", spy, needs=tuple(NEEDS))
    mask = torch.tensor([[True, True, False]])
    values = {f: torch.tensor([[1.0, 2.0, float("inf")]]) for f in FIELDS if f not in ("mask", "segment_ids")}
    tok = TokenInputs(mask=mask, segment_ids=torch.tensor([[0, 0, 1]]), **values)
    out = loss_from_log_probs(tok, "spy")
    for f in set(values) - {"kl", "data_weights"}:  # detached float32, 0 outside the mask (the inf is gone)
        assert seen[f].tolist() == [[1.0, 2.0, 0.0]], f
    assert seen["kl"] is None and seen["data_weights"] is None  # never the weights' business: both enter later
    assert torch.equal(seen["segment_ids"], tok.segment_ids) and torch.equal(seen["mask"], mask)
    assert out.kl is tok.kl  # the KL the reduction adds is the bundle's own (differentiable) tensor
    assert out.weights.tolist() == [[1.0, 2.0, 0.0]]  # the data weights multiply the scheme's 1s afterwards
    with pytest.raises(ValueError, match="parameter name 'entropy' is taken by the scheme context"):
        register_scheme("clash", spy, params=(SchemeParam("entropy", float, 1.0, "clashes with ctx.entropy."),))
    assert [f.name for f in dataclasses.fields(TokenInputs)] == list(FIELDS)
