"""`weighted_lm_loss` and the chunked softmax against closed forms and a slow plain-torch reference."""

import math

import pytest
import torch

from tokensft.losses import TokenInputs, chunked_softmax_stats, shift_labels, token_weights, weighted_lm_loss

MODES = ["sft", "dft", "sft+kl", "asft", "sft-topk", "sft-antiop", "sft-lr", "sft-pk", "rho1", "eaft"]


def naive_loss(logits, labels, mode, ref_logits, *, kl_weight=0.05, kl_direction="forward", normalization="token",
               num_items_in_batch=None, **kw):
    """Slow reference: full float32 log-softmax, python loops for the weights' statistics."""
    logits, ref_logits = logits.float(), ref_logits.float()
    targets = labels[:, 1:]
    mask = targets != -100
    logq = torch.log_softmax(logits[:, :-1], -1)
    lp = logq.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    logr = torch.log_softmax(ref_logits[:, :-1], -1)
    ref_lp = logr.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    losses = [float(-lp[b, t]) for b in range(lp.shape[0]) for t in range(lp.shape[1]) if mask[b, t]]
    srt = sorted(losses)
    excess = sorted((float(ref_lp[b, t] - lp[b, t]) for b in range(lp.shape[0]) for t in range(lp.shape[1])
                     if mask[b, t]), reverse=True)
    w = torch.zeros_like(lp)
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not mask[b, t]:
                continue
            l_ = float(-lp[b, t])
            p = math.exp(-l_)
            if mode in ("sft", "sft+kl"):
                w[b, t] = 1
            elif mode in ("dft", "asft"):
                w[b, t] = p
            elif mode == "sft-topk":
                k = max(1, math.floor(len(srt) * kw.get("topk_keep_ratio", 0.7) + 1e-9))
                w[b, t] = 1.0 if l_ <= srt[k - 1] else 0.0
            elif mode == "sft-antiop":
                cap = kw.get("antiop_clip_mult", 3.0) * srt[(len(srt) - 1) // 2]
                w[b, t] = 1.0 if l_ <= cap else cap / (l_ + 1e-8)
            elif mode == "sft-lr":
                d = max(-1.0, min(1.0, math.exp(float(ref_lp[b, t])) - p))
                w[b, t] = max(0.1, 1 + kw.get("lr_weight_alpha", 1.0) * d)
            elif mode == "sft-pk":
                w[b, t] = p ** kw.get("pk_power", 10.0) if p >= kw.get("pk_min_prob", 0.0) else 0.0
            elif mode == "rho1":
                k = max(1, math.floor(len(excess) * kw.get("rho1_keep_ratio", 0.6) + 1e-9))
                w[b, t] = 1.0 if float(ref_lp[b, t] - lp[b, t]) >= excess[k - 1] else 0.0
            elif mode == "eaft":
                top = sorted(logits[b, t].tolist(), reverse=True)[: kw.get("entropy_top_k", 20)]
                z = max(top)
                q = [math.exp(v - z) for v in top]
                q = [v / sum(q) for v in q]
                h = -sum(v * math.log(v) for v in q if v > 0)
                w[b, t] = (h / kw.get("eaft_entropy_norm", 3.0)) ** kw.get("eaft_alpha", 1.0)
    if kl_direction == "forward":
        kl = (logr.exp() * (logr - logq)).sum(-1)
    else:
        kl = (logq.exp() * (logq - logr)).sum(-1)
    use_kl = mode in ("sft+kl", "asft")
    total = (w * -lp * mask).sum() + (kl_weight * (kl * mask).sum() if use_kl else 0.0)
    if normalization == "token":
        n = mask.sum() if num_items_in_batch is None else num_items_in_batch
        return total / n
    if normalization == "micro_batch":
        return total / (mask & (w > 0)).sum()
    out = (w * -lp * mask).sum() / (w * mask).sum()
    return out + (kl_weight * (kl * mask).sum() / mask.sum() if use_kl else 0.0)


def test_uniform_logits_closed_form():
    logits = torch.zeros(1, 4, 4, requires_grad=True)
    labels = torch.tensor([[7, 2, -100, 1]])  # targets after shift: [2, -100, 1]
    sft = weighted_lm_loss(logits, labels, mode="sft")
    assert sft.token_loss[0].tolist() == pytest.approx([math.log(4), 0.0, math.log(4)], abs=1e-6)
    assert sft.loss.item() == pytest.approx(1.3863, abs=1e-4)
    assert sft.mask[0].tolist() == [True, False, True]
    dft = weighted_lm_loss(logits, labels, mode="dft")
    assert dft.weights[0].tolist() == pytest.approx([0.25, 0.0, 0.25])
    assert dft.loss.item() == pytest.approx(0.3466, abs=1e-4)
    (g_sft,) = torch.autograd.grad(sft.loss, logits)
    (g_dft,) = torch.autograd.grad(dft.loss, logits)
    torch.testing.assert_close(g_dft, 0.25 * g_sft)


def test_target_count_is_taken_after_the_shift():
    out = weighted_lm_loss(torch.randn(1, 5, 20), torch.tensor([[11, 12, 13, 14, 15]]), mode="sft")
    assert int(out.mask.sum()) == 4
    assert out.stats["num_tokens"] == 4


# parameters that make each scheme's weights non-trivial on random logits (p_t is small: p^10 would be ~0 everywhere)
NON_TRIVIAL = {"sft-pk": {"pk_power": 0.5, "pk_min_prob": 0.01}, "eaft": {"eaft_alpha": 2.0, "entropy_top_k": 7},
               "rho1": {"rho1_keep_ratio": 0.4}, "sft-antiop": {"antiop_clip_mult": 1.5}}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalization", ["token", "micro_batch", "weight"])
def test_value_and_gradient_match_naive_fp32_odd_shapes(mode, normalization):
    g = torch.Generator().manual_seed(hash((mode, normalization)) % 2**31)
    B, T, V = 3, 47, 123
    logits = (torch.randn(B, T, V, generator=g) * 2).requires_grad_(True)
    ref = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :10] = -100
    labels[2, 30:] = -100
    kw = NON_TRIVIAL.get(mode, {})
    out = weighted_lm_loss(logits, labels, mode=mode, ref_logits=ref, normalization=normalization, chunk_size=17,
                           **kw)
    expected = naive_loss(logits, labels, mode, ref, normalization=normalization, **kw)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    w = out.weights[out.mask]
    assert float(w.max() - w.min()) > 0.01 or mode in ("sft", "sft+kl")  # the weights are not constant
    (g_ours,) = torch.autograd.grad(out.loss, logits)
    (g_ref,) = torch.autograd.grad(naive_loss(logits, labels, mode, ref, normalization=normalization, **kw), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["sft", "dft", "sft+kl", "sft-antiop", "sft-lr"])
def test_bf16_error_no_worse_than_naive_bf16(mode):
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 47, 123
    logits32 = torch.randn(B, T, V, generator=g) * 3
    ref32 = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    truth = naive_loss(logits32, labels, mode, ref32)
    x = logits32.bfloat16()
    out = weighted_lm_loss(x, labels, mode=mode, ref_logits=ref32.bfloat16())
    assert out.token_loss.dtype == torch.float32
    # the naive bf16 path: softmax computed in bf16
    lq = torch.log_softmax(x[:, :-1], -1)
    naive_bf16_nll = -lq.gather(-1, labels[:, 1:, None])[..., 0].float().mean()
    truth_nll = naive_loss(logits32, labels, "sft", ref32)
    err_naive = abs(naive_bf16_nll.item() - truth_nll.item())
    err_ours = abs(out.loss.item() - truth.item())
    assert err_ours <= err_naive + 2e-2 * max(1.0, abs(truth.item()))


@pytest.mark.parametrize("chunk", [7, 64])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_chunked_log_probs_and_kl_equal_full(chunk, direction):
    g = torch.Generator().manual_seed(1)
    B, T, V = 2, 64, 1000
    x = torch.randn(B * T, V, generator=g)
    r = torch.randn(B * T, V, generator=g)
    y = torch.randint(0, V, (B * T,), generator=g)
    lp, ent, kl, _ = chunked_softmax_stats(x, y, ref_x=r, kl_direction=direction, chunk_size=chunk)
    logq, logr = torch.log_softmax(x, -1), torch.log_softmax(r, -1)
    torch.testing.assert_close(lp, logq.gather(1, y[:, None])[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, -(logq.exp() * logq).sum(-1), atol=1e-5, rtol=0)
    full_kl = (logr.exp() * (logr - logq)).sum(-1) if direction == "forward" else (logq.exp() * (logq - logr)).sum(-1)
    torch.testing.assert_close(kl, full_kl, atol=1e-6, rtol=1e-5)
    # bf16 inputs give float32 outputs
    lp16 = chunked_softmax_stats(x.bfloat16(), y, chunk_size=chunk).log_probs
    assert lp16.dtype == torch.float32


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_fused_linear_head_matches_logits_path_gradients(direction):
    g = torch.Generator().manual_seed(2)
    N, H, V = 37, 16, 91
    h = torch.randn(N, H, generator=g, requires_grad=True)
    W = (torch.randn(V, H, generator=g) * 0.3).requires_grad_(True)
    b = torch.randn(V, generator=g, requires_grad=True)
    hr, Wr = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    c = torch.randn(N, generator=g)
    lp, _, kl, _ = chunked_softmax_stats(h, y, weight=W, bias=b, ref_x=hr, ref_weight=Wr, kl_direction=direction,
                                      chunk_size=8)
    ours = (c * lp).sum() + 0.3 * kl.sum()
    grads = torch.autograd.grad(ours, (h, W, b))
    z = h @ W.T + b
    logq, logr = torch.log_softmax(z, -1), torch.log_softmax(hr @ Wr.T, -1)
    kl_ref = (logr.exp() * (logr - logq)).sum(-1) if direction == "forward" else (logq.exp() * (logq - logr)).sum(-1)
    naive = (c * logq.gather(1, y[:, None])[:, 0]).sum() + 0.3 * kl_ref.sum()
    torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-5)
    for a, e in zip(grads, torch.autograd.grad(naive, (h, W, b))):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("direction", ["none", "forward", "reverse"])
def test_frozen_head_precomputed_gradient_matches_logits_path(direction):
    """A frozen head (LoRA): the backward reads the per-token vectors the forward kept (u = (onehot - q) W, and the
    KL's), with no second pass over the vocabulary; gradients equal the full-logits path's, and the trainable-head
    path's (which recomputes each chunk)."""
    g = torch.Generator().manual_seed(5)
    N, H, V = 41, 16, 97
    h = torch.randn(N, H, generator=g, requires_grad=True)
    W, b = torch.randn(V, H, generator=g) * 0.3, torch.randn(V, generator=g)
    hr, Wr = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    c = torch.randn(N, generator=g)
    kw = dict(ref_x=hr, ref_weight=Wr, kl_direction=direction) if direction != "none" else {}
    stats = chunked_softmax_stats(h, y, weight=W, bias=b, chunk_size=8, **kw)
    ours = (c * stats.log_probs).sum() + (0.3 * stats.kl.sum() if stats.kl is not None else 0)
    (grad,) = torch.autograd.grad(ours, (h,))
    z = h @ W.T + b
    logq = torch.log_softmax(z, -1)
    naive = (c * logq.gather(1, y[:, None])[:, 0]).sum()
    if direction != "none":
        logr = torch.log_softmax(hr @ Wr.T, -1)
        kl = (logr.exp() * (logr - logq)).sum(-1) if direction == "forward" else (logq.exp() * (logq - logr)).sum(-1)
        naive = naive + 0.3 * kl.sum()
    torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-5)
    (expect,) = torch.autograd.grad(naive, (h,))
    torch.testing.assert_close(grad, expect, rtol=1e-4, atol=1e-5)
    Wt = W.clone().requires_grad_(True)  # a trainable head takes the recomputing backward: same dL/dx
    stats = chunked_softmax_stats(h, y, weight=Wt, bias=b, chunk_size=8, **kw)
    again = (c * stats.log_probs).sum() + (0.3 * stats.kl.sum() if stats.kl is not None else 0)
    torch.testing.assert_close(torch.autograd.grad(again, (h,))[0], grad, rtol=1e-5, atol=1e-6)


def test_packing_never_trains_across_samples_and_matches_unpacked():
    labels = torch.tensor([[-100, 1, 2, -100, 8, 9]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert shift_labels(labels, position_ids)[0].tolist() == [1, 2, -100, 8, 9]
    # even with a label on the boundary token, the position ids stop 2 -> 7
    assert shift_labels(torch.tensor([[0, 1, 2, 7, 8, 9]]), position_ids)[0].tolist() == [1, 2, -100, 8, 9]
    # per-sample log-probs equal the unpacked ones when the model is position-local (here: logits given directly)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 6, 11, generator=g)
    packed = weighted_lm_loss(logits, labels, mode="sft-antiop", position_ids=position_ids, stat_scope="sequence")
    a = weighted_lm_loss(logits[:, :3], labels[:, :3], mode="sft-antiop")
    b = weighted_lm_loss(logits[:, 3:], labels[:, 3:], mode="sft-antiop")
    assert int(packed.mask.sum()) == 4
    torch.testing.assert_close(packed.token_loss[0, [0, 1, 3, 4]], torch.cat([a.token_loss[0], b.token_loss[0]]))
    torch.testing.assert_close(packed.weights[0, [0, 1, 3, 4]], torch.cat([a.weights[0], b.weights[0]]))


def test_weights_are_detached():
    lp = torch.log(torch.tensor([[0.3, 0.6]])).requires_grad_(True)
    w = token_weights("dft", TokenInputs(lp, torch.ones(1, 2, dtype=torch.bool)))
    assert not w.requires_grad


def test_dft_weight_is_detached_closed_form_on_both_paths():
    """DFT's w = sg(p): at p = 0.1 the gradient of the target logit is w (p - 1) = 0.1 * (-0.9) = -0.09; a weight
    that let the gradient through would give p (1 - p) (-log p - 1) = +0.117, the opposite sign. The same through the
    chunked head the trainer runs (`chunked_softmax_stats` -> `loss_from_log_probs`) and through full logits
    (`weighted_lm_loss`); issue 24 (users of fused kernels report non-detached DFT weights as a bug)."""
    from tokensft.losses import chunked_softmax_stats, loss_from_log_probs, weighted_lm_loss

    V = 10
    p = 0.1
    # target logit z0, the other 9 at 0: exp(z0) / (exp(z0) + 9) = 0.1 -> z0 = log(0.1 * 9 / 0.9) = 0
    z = torch.zeros(1, 2, V)
    z[0, 0, 0] = math.log(p * (V - 1) / (1 - p))
    labels = torch.tensor([[0, 0]])  # the target of position 0 is token 0 (position 1 has no target)
    logits = z.clone().requires_grad_(True)
    out = weighted_lm_loss(logits, labels, mode="dft")
    (g,) = torch.autograd.grad(out.loss, logits)
    assert out.loss.item() == pytest.approx(p * -math.log(p), rel=1e-6)
    assert g[0, 0, 0].item() == pytest.approx(-0.09, abs=1e-6)
    assert g[0, 0, 1].item() == pytest.approx(p * (1 - p) / (V - 1), abs=1e-6)  # w * q_j on every other logit
    x = z[0, :1].clone().requires_grad_(True)  # (1, V) "hidden states" with an identity head
    stats = chunked_softmax_stats(x, torch.tensor([0]), weight=torch.eye(V))
    res = loss_from_log_probs(TokenInputs(stats.log_probs[None], torch.ones(1, 1, dtype=torch.bool)), "dft")
    (gx,) = torch.autograd.grad(res.loss, x)
    assert gx[0, 0].item() == pytest.approx(-0.09, abs=1e-6)
    assert res.weights.item() == pytest.approx(p, rel=1e-6)
