"""Exact values of the weighting schemes and of the reduction (the loss-schemes issue's expectations)."""

import math

import pytest
import torch

from tokensft.losses import (
    TokenInputs,
    available_modes,
    reduce_token_loss,
    register_scheme,
    token_weights,
    weighted_lm_loss,
)


def _w(mode, losses, mask=None, **kw):
    losses = torch.as_tensor(losses, dtype=torch.float32)
    if losses.dim() == 1:
        losses = losses[None]
    mask = torch.ones_like(losses, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    return token_weights(mode, TokenInputs(-losses, mask), **kw)


def test_antiop_closed_form():
    w = _w("sft-antiop", [0.1, 0.2, 0.3, 0.4, 5.0])
    # median 0.3 -> cap 0.9 -> w5 = 0.9 / 5.0
    torch.testing.assert_close(w[0], torch.tensor([1, 1, 1, 1, 0.9 / (5.0 + 1e-8)]))
    assert w[0, 4].item() == pytest.approx(0.18, abs=1e-6)
    w = _w("sft-antiop", [0.1, 0.2, 0.3, 4.0])  # lower median 0.2 -> cap 0.6 -> 0.15
    assert w[0, :3].tolist() == [1, 1, 1]
    assert w[0, 3].item() == pytest.approx(0.15, abs=1e-6)


def test_topk_drops_exactly_the_three_highest():
    losses = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0]
    w = _w("sft-topk", losses, topk_keep_ratio=0.7)[0]
    dropped = sorted(v for v, wi in zip(losses, w.tolist()) if wi == 0)
    assert dropped == [0.8, 0.9, 1.0]
    assert set(w.tolist()) == {0.0, 1.0}


def test_topk_keeps_ties_and_at_least_one():
    assert _w("sft-topk", [0.5, 0.5, 0.5, 0.5])[0].tolist() == [1, 1, 1, 1]  # ties at the threshold kept
    assert _w("sft-topk", [3.0, 1.0], topk_keep_ratio=0.1)[0].tolist() == [0, 1]  # k = max(1, floor(0.2)) = 1


@pytest.mark.parametrize(
    "p_ref,p,alpha,expected", [(0.9, 0.2, 1.0, 1.7), (0.1, 0.95, 1.0, 0.15), (0.1, 0.95, 2.0, 0.1)]
)
def test_lr_weights(p_ref, p, alpha, expected):
    w = token_weights("sft-lr", TokenInputs(torch.tensor([[math.log(p)]]), torch.tensor([[True]]), ref_log_probs=torch.tensor([[math.log(p_ref)]])), lr_weight_alpha=alpha)
    assert w.item() == pytest.approx(expected, abs=1e-6)


def test_lr_needs_reference():
    with pytest.raises(ValueError, match="ref_log_probs"):
        token_weights("sft-lr", TokenInputs(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)))


def test_dft_and_sft_weights():
    lp = torch.log(torch.tensor([[0.25, 0.5, 0.9]]))
    m = torch.tensor([[True, False, True]])
    torch.testing.assert_close(token_weights("dft", TokenInputs(lp, m)), torch.tensor([[0.25, 0.0, 0.9]]))
    torch.testing.assert_close(token_weights("sft", TokenInputs(lp, m)), torch.tensor([[1.0, 0.0, 1.0]]))


def test_masked_huge_loss_moves_neither_median_nor_threshold():
    losses = torch.tensor([[0.1, 0.2, 0.3, 0.4, 5.0, 1e6]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    w = token_weights("sft-antiop", TokenInputs(-losses, mask))
    torch.testing.assert_close(w[0, :5], _w("sft-antiop", [0.1, 0.2, 0.3, 0.4, 5.0])[0])
    assert w[0, 5].item() == 0.0
    lt = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0, -50.0, float("inf")]])
    mt = torch.ones_like(lt, dtype=torch.bool)
    mt[0, 10:] = False
    wt = token_weights("sft-topk", TokenInputs(-lt, mt))
    torch.testing.assert_close(wt[0, :10], _w("sft-topk", lt[0, :10].tolist())[0])
    assert wt[0, 10:].tolist() == [0.0, 0.0]


def test_sequence_and_global_scope():
    losses = torch.tensor([[0.1, 0.2, 9.0], [10.0, 20.0, 30.0]])
    mask = torch.ones_like(losses, dtype=torch.bool)
    # per sequence: row 0 median 0.2 -> cap 0.6 -> w(9.0) = 0.6/9; row 1 median 20 -> cap 60 -> all 1
    w = token_weights("sft-antiop", TokenInputs(-losses, mask), stat_scope="sequence")
    assert w[1].tolist() == [1, 1, 1]
    assert w[0, 2].item() == pytest.approx(0.6 / 9.0, rel=1e-6)
    # global with the step's losses = this batch's -> same as micro_batch
    g = token_weights("sft-antiop", TokenInputs(-losses, mask), stat_scope="global", scope_values=losses.flatten())
    torch.testing.assert_close(g, token_weights("sft-antiop", TokenInputs(-losses, mask)))
    # global with a different step population changes the cap: median of [1, 1, 1] = 1 -> cap 3
    g2 = token_weights("sft-antiop", TokenInputs(-losses, mask), stat_scope="global", scope_values=torch.ones(3))
    assert g2[0, :2].tolist() == [1, 1]
    assert g2[1, 0].item() == pytest.approx(3 / 10, rel=1e-6)
    # packed row: segment ids split the statistics like separate rows
    packed = token_weights("sft-antiop", TokenInputs(-losses.reshape(1, 6), mask.reshape(1, 6), segment_ids=torch.tensor([[0, 0, 0, 1, 1, 1]])), stat_scope="sequence")
    torch.testing.assert_close(packed.reshape(2, 3), w)


def test_reduction_masks_and_normalizations():
    tl = torch.tensor([[1.0, 100.0], [1.0, -50.0]], requires_grad=True)
    mask = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)
    w = torch.ones(2, 2)
    loss = reduce_token_loss(tl, w, mask)
    assert loss.item() == 1.0
    loss.backward()
    assert tl.grad[:, 1].tolist() == [0.0, 0.0]
    assert tl.grad[:, 0].tolist() == [0.5, 0.5]
    # weight normalisation: sum w l / sum w; micro_batch: counted (w > 0) tokens
    tl2 = torch.tensor([[1.0, 2.0, 4.0]])
    m2 = torch.ones(1, 3, dtype=torch.bool)
    w2 = torch.tensor([[1.0, 0.5, 0.0]])
    assert reduce_token_loss(tl2, w2, m2, normalization="weight").item() == pytest.approx(2.0 / 1.5)
    assert reduce_token_loss(tl2, w2, m2, normalization="micro_batch").item() == pytest.approx(2.0 / 2)
    assert reduce_token_loss(tl2, w2, m2, normalization="token").item() == pytest.approx(2.0 / 3)
    assert reduce_token_loss(tl2, w2, m2, num_items_in_batch=10).item() == pytest.approx(0.2)


def test_gradient_accumulation_normalization_closed_form():
    # micro-batch A: 10 targets of loss 1.0, B: 100 of loss 2.0 -> 210 / 110, not the mean of means 1.5
    a = reduce_token_loss(torch.ones(1, 10), torch.ones(1, 10), torch.ones(1, 10, dtype=torch.bool), num_items_in_batch=110)
    b = reduce_token_loss(torch.full((1, 100), 2.0), torch.ones(1, 100), torch.ones(1, 100, dtype=torch.bool),
                          num_items_in_batch=110)
    assert (a + b).item() == pytest.approx(210 / 110)
    assert (a + b).item() == pytest.approx(1.909, abs=1e-3)


def test_all_masked_gives_exact_zero_and_zero_grad():
    for mode in available_modes():
        logits = torch.randn(2, 5, 7, requires_grad=True)
        labels = torch.full((2, 5), -100)
        ref = torch.randn(2, 5, 7)
        align = torch.randn(2, 4) if mode == "sft-align" else None
        for norm in ("token", "micro_batch", "weight"):
            out = weighted_lm_loss(logits, labels, mode=mode, ref_logits=ref, normalization=norm, alignment=align)
            assert out.loss.item() == 0.0
            assert torch.isfinite(out.loss)
            (g,) = torch.autograd.grad(out.loss, logits)
            assert torch.count_nonzero(g) == 0


def test_registry_adds_a_scheme_by_name():
    register_scheme("half", lambda ctx: torch.full_like(ctx.log_probs, 0.5))
    assert "half" in available_modes()
    w = token_weights("half", TokenInputs(torch.zeros(1, 3), torch.tensor([[True, True, False]])))
    assert w.tolist() == [[0.5, 0.5, 0.0]]
    with pytest.raises(ValueError, match="known modes"):
        token_weights("nope", TokenInputs(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool)))


def test_the_affected_token_rule_is_declared_on_the_scheme():
    """`affects` (default `below_one`) and its label live on the `Scheme`; `affected` is the one comparison."""
    import numpy as np

    from tokensft.losses import affected, get_scheme, traced_rules

    s = register_scheme("half", lambda ctx: torch.full_like(ctx.log_probs, 0.5))
    assert (s.affects, s.affects_label) == ("below_one", "half down-weights")
    s = register_scheme("cut", lambda ctx: torch.ones_like(ctx.log_probs), affects="zero", affects_label="cut drops",
                        trace_key="c")
    assert traced_rules()["c"] == {"name": "cut", "affects": "zero", "label": "cut drops"}
    with pytest.raises(ValueError, match="affects must be one of zero, below_one or None, got 'some'"):
        register_scheme("bad", lambda ctx: ctx.log_probs, affects="some")
    assert {m: get_scheme(m).affects for m in ("sft-topk", "rho1", "sft-align", "sft-antiop", "sft-lr", "sft-pk",
                                               "eaft", "sft", "sft+kl", "dft", "asft")} == {
        "sft-topk": "zero", "rho1": "zero", "sft-align": "zero", "sft-antiop": "below_one", "sft-lr": "below_one",
        "sft-pk": "below_one", "eaft": "below_one", "sft": None, "sft+kl": None, "dft": None, "asft": None}
    w = [0.0, 0.5, 0.9995, 1 - 1e-7, 1.0, 1.5, math.nan]  # 0.9995: float16's value below 1, a real clip
    assert affected(np.asarray(w), "zero").tolist() == [True, False, False, False, False, False, False]
    assert affected(torch.tensor(w), "below_one").tolist() == [True, True, True, False, False, False, False]
    assert affected(w, "below_one").tolist() == [True, True, True, False, False, False, False]
    with pytest.raises(ValueError, match="affected-token rule must be one of zero, below_one, got None"):
        affected(w, None)


def test_a_builtin_scheme_cannot_be_replaced_and_the_registry_is_scoped():
    """No file can silently swap a built-in (not even with overwrite=True); the fixture undid the previous test's
    `half`, so registering it again works without overwrite."""
    from tokensft.losses import BUILTIN_MODES, builtin_params

    for name in ("sft", "rho1", "sft-antiop"):
        with pytest.raises(ValueError, match="built in and cannot be replaced"):
            register_scheme(name, lambda ctx: torch.zeros_like(ctx.log_probs), overwrite=True)
    assert "half" not in available_modes()
    register_scheme("half", lambda ctx: torch.full_like(ctx.log_probs, 0.5))
    assert set(BUILTIN_MODES) == set(available_modes()) - {"half"} and len(BUILTIN_MODES) == 11
    assert "topk_keep_ratio" in builtin_params() and "kl_weight" in builtin_params()


def test_step_token_stats_are_token_weighted_over_micro_batches():
    from tokensft.losses import StepTokenStats, loss_from_log_probs

    # micro-batch A: 1 token of loss 1.0; B: 3 tokens of loss 3.0 -> nll 10/4 = 2.5 (mean of means would be 2.0)
    a = loss_from_log_probs(TokenInputs(torch.tensor([[-1.0]]), torch.tensor([[True]])))
    b = loss_from_log_probs(TokenInputs(torch.tensor([[-3.0, -3.0, -3.0, 5.0]]), torch.tensor([[True, True, True, False]])))
    acc = StepTokenStats()
    acc.add(a)
    acc.add(b)
    stats = acc.compute()
    assert stats["nll"] == pytest.approx(2.5) and stats["token_loss/median"] == pytest.approx(3.0)
    assert stats["weight/mean"] == 1.0 and stats["weight/frac_zero"] == 0.0
    assert not acc and acc.compute() == {}  # emptied
    capped = StepTokenStats(max_median_tokens=2)
    capped.add(b)
    capped.add(a)
    assert capped.compute()["nll"] == pytest.approx(2.5)  # the means stay exact past the cap


def test_pk_weights_closed_form_and_k1_is_dft():
    lp = torch.log(torch.tensor([[0.25, 0.5, 0.9, 0.1]]))
    m = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(token_weights("sft-pk", TokenInputs(lp, m), pk_power=1.0), token_weights("dft", TokenInputs(lp, m)))
    w = token_weights("sft-pk", TokenInputs(lp, m))  # default k = 10
    torch.testing.assert_close(w, torch.tensor([[0.25**10, 0.5**10, 0.9**10, 0.0]]))
    # the paper's thresholded variant (OnlyTopP): p < tau -> 0; with k = 1 the objective is -p on the kept tokens
    w = token_weights("sft-pk", TokenInputs(lp, m), pk_power=1.0, pk_min_prob=0.3)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.5, 0.9, 0.0]]))


def test_rho1_keeps_the_tokens_of_largest_excess_loss():
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    ref_losses = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])  # excess loss 0, 1, 2, 3, 4
    m = torch.ones(1, 5, dtype=torch.bool)
    # k = floor(5 * 0.6) = 3 -> keep excess >= 2
    w = token_weights("rho1", TokenInputs(-losses, m, ref_log_probs=-ref_losses))
    assert w[0].tolist() == [0, 0, 1, 1, 1]
    # the reference predicting a token worse than the policy (negative excess) is dropped first
    w = token_weights("rho1", TokenInputs(-losses, m, ref_log_probs=-torch.tensor([[0.5, 9.0, 9.0, 9.0, 0.5]])), rho1_keep_ratio=0.4)
    assert w[0].tolist() == [1, 0, 0, 0, 1]  # excess 0.5, -7, -6, -5, 4.5 -> k = 2
    assert token_weights("rho1", TokenInputs(-losses, m, ref_log_probs=-losses))[0].tolist() == [1] * 5  # ties kept
    with pytest.raises(ValueError, match="ref_log_probs"):
        token_weights("rho1", TokenInputs(-losses, m))
    # sequence scope: per row
    w = token_weights("rho1", TokenInputs(-torch.cat([losses, losses + 10]), torch.ones(2, 5, dtype=torch.bool), ref_log_probs=-torch.cat([ref_losses, ref_losses])), stat_scope="sequence")
    assert w.tolist() == [[0, 0, 1, 1, 1]] * 2


def test_eaft_weights_closed_form():
    V = 64
    labels = torch.tensor([[5, 6, 7, -100]])
    uniform = torch.zeros(1, 4, V)
    out = weighted_lm_loss(uniform, labels, mode="eaft")  # top-20 of 64 equal logits: H = ln 20
    torch.testing.assert_close(out.weights[0], torch.tensor([math.log(20) / 3.0] * 2 + [0.0]))
    out = weighted_lm_loss(uniform, labels, mode="eaft", eaft_alpha=2.0, entropy_top_k=8, eaft_entropy_norm=math.log(8))
    torch.testing.assert_close(out.weights[0], torch.tensor([1.0, 1.0, 0.0]))
    peaked = torch.zeros(1, 4, V)
    peaked[..., 3] = 30.0  # one logit dominates the top-20: H^(20) ~ 0 -> the token is nearly unsupervised
    assert weighted_lm_loss(peaked, labels, mode="eaft").weights[0, :2].max() < 1e-9
    with pytest.raises(ValueError, match="topk_entropy"):
        token_weights("eaft", TokenInputs(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)))


@pytest.mark.parametrize("norm", ["constant", "ln_k"])
def test_eaft_normaliser_choice_closed_form(norm):
    """`eaft_norm`: H^(K) / eaft_entropy_norm (LLaMA-Factory's 3.0) or H^(K) / ln K. Top-4 logits (2, 2, 0, 0), the
    rest far below: q = (e^2, e^2, 1, 1) / (2 e^2 + 2), H^(4) = -sum q ln q in closed form."""
    V, K = 32, 4
    logits = torch.full((1, 4, V), -50.0)
    logits[..., :4] = torch.tensor([2.0, 2.0, 0.0, 0.0])
    labels = torch.tensor([[0, 0, 2, -100]])  # shifted: two supervised targets
    z = 2 * math.e**2 + 2
    q = [math.e**2 / z] * 2 + [1 / z] * 2
    h = -sum(x * math.log(x) for x in q)
    out = weighted_lm_loss(logits, labels, mode="eaft", entropy_top_k=K, eaft_alpha=1.5, eaft_norm=norm)
    expected = (h / (3.0 if norm == "constant" else math.log(K))) ** 1.5
    torch.testing.assert_close(out.weights[0, :2], torch.tensor([expected] * 2), rtol=1e-5, atol=0)
    # uniform top-K: H = ln K, so ln_k gives weight 1 for any K and the constant gives ln K / 3
    uniform = weighted_lm_loss(torch.zeros(1, 4, V), labels, mode="eaft", entropy_top_k=K, eaft_norm=norm)
    torch.testing.assert_close(uniform.weights[0, :2], torch.tensor([1.0 if norm == "ln_k" else math.log(K) / 3] * 2))


def test_eaft_norm_is_validated():
    with pytest.raises(ValueError, match=r"--eaft_norm must be one of constant, ln_k"):
        token_weights("eaft", TokenInputs(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), topk_entropy=torch.ones(1, 2)), eaft_norm="ln20")


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_eaft_top1_entropy_gives_the_same_weight_for_both_normalisers(alpha):
    """K = 1: H^(1) = 0 everywhere and ln 1 = 0; `ln_k` gives w = 0^alpha like the constant norm (1 at alpha = 0:
    plain SFT; 0 otherwise), never NaN."""
    logits = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[0, 3, 5, -100]])
    for norm in ("constant", "ln_k"):
        w = weighted_lm_loss(logits, labels, mode="eaft", entropy_top_k=1, eaft_alpha=alpha, eaft_norm=norm).weights
        torch.testing.assert_close(w[0, :2], torch.full((2,), 1.0 if alpha == 0 else 0.0))
