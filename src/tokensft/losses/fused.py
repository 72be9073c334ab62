"""Chunked per-token statistics of a softmax over the vocabulary, without keeping `(N, V)` activations.

One autograd function serves two inputs:

- logits `x: (N, V)` (pass `weight=None`), or
- hidden states `x: (N, H)` with an LM head `weight: (V, H)` (and optional `bias: (V,)`): the logits of a chunk
  of tokens are built, used and dropped, so `(N, V)` logits never exist (Liger-Kernel's fused linear
  cross-entropy idea, Hsu et al. 2024, arXiv:2410.10989, applied to log-probs and KL).

Per token it returns the target log-prob `log p(y)`, the entropy `H(p)` (no gradient), on request the entropy of the
softmax renormalised over the K largest logits `H^(K)` (no gradient; EAFT's), and, when a reference is given,
`KL(p_ref || p)` ("forward", the reference study's direction) or `KL(p || p_ref)` ("reverse"). The backward pass
recomputes each chunk's softmax: with q = softmax(z), r = softmax(z_ref),

    d log q_y / dz = onehot(y) - q
    d KL(r || q) / dz = q - r
    d KL(q || r) / dz = q * (log q - log r - KL(q || r))

and `dL/dx = dL/dz @ weight`, `dL/dweight = dL/dz^T @ x`. Softmax math is in float32 whatever the input dtype.
The reference side gets no gradient.

With hidden states whose head is frozen (LoRA: no gradient for `weight` or `bias`), the forward pass also keeps, per
token, `u_t = (onehot(y_t) - q_t) @ weight` (and the KL's `v_t = (dKL_t/dz_t) @ weight`), `(N, H)` each: none of
these depends on the upstream gradient, so the backward is `dL/dx_t = g_logp_t u_t + g_kl_t v_t` with no second pass
over the vocabulary. That is two `(C, V)` matmuls per chunk in all (the logits and `u`) instead of three (the
logits, their recomputation, `dL/dz @ weight`), at the memory of one more copy of `x`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

KL_DIRECTIONS = {"none": 0, "forward": 1, "reverse": 2}
DEFAULT_CHUNK_SIZE = 256


class SoftmaxStats(NamedTuple):
    """Per-token outputs of `chunked_softmax_stats`, each `(N,)` float32 in nats."""

    log_probs: Tensor  # log p(y_t), differentiable
    entropy: Tensor  # H(p_t), no gradient
    kl: Tensor | None  # KL per `kl_direction`, differentiable; None without a KL
    topk_entropy: Tensor | None  # H^(K)(p_t) over the K largest logits, no gradient; None unless `topk_entropy_k`


def topk_entropy(logits: Tensor, k: int) -> Tensor:
    """Entropy of the softmax renormalised over the `k` largest logits: `(..., V)` -> `(...)` float32 nats, no gradient.

    H^(K) = -sum_{j in top-K} q_j log q_j, q = softmax(z_topK). Source: EAFT (arXiv:2601.02151), K = 20 in
    LLaMA-Factory's `use_eaft_loss`.
    """
    with torch.no_grad():
        top = torch.topk(logits.detach().float(), min(int(k), logits.shape[-1]), dim=-1).values
        logq = torch.log_softmax(top, dim=-1)
        return -(logq.exp() * logq).sum(-1)


def _chunk_logits(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    z = x if weight is None else x @ weight.t()
    if bias is not None:
        z = z + bias
    return z.float()


class _ChunkedSoftmaxStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, ref_x, ref_weight, ref_bias, chunk_size, kl_mode, topk):
        n = x.shape[0]
        log_probs = torch.zeros(n, dtype=torch.float32, device=x.device)
        entropy = torch.zeros_like(log_probs)
        kl = torch.zeros_like(log_probs)
        top_ent = torch.zeros_like(log_probs)
        # frozen head, gradient only for x: d log p / dx and d KL / dx per token now, no second vocabulary pass later
        ahead = (weight is not None and ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
                 and not (bias is not None and ctx.needs_input_grad[2]))
        u = torch.empty(n, x.shape[1], dtype=torch.float32, device=x.device) if ahead else None
        v = torch.empty_like(u) if ahead and kl_mode else None
        with torch.no_grad():
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                z = _chunk_logits(x[s:e], weight, bias)  # (C, V) float32
                if topk:
                    top_ent[s:e] = topk_entropy(z, topk)
                logq = torch.log_softmax(z, dim=-1)  # (C, V)
                del z
                log_probs[s:e] = logq.gather(1, targets[s:e, None]).squeeze(1)
                q = logq.exp()
                entropy[s:e] = -(q * logq).sum(-1)
                if kl_mode:
                    logr = torch.log_softmax(_chunk_logits(ref_x[s:e], ref_weight, ref_bias), dim=-1)
                    if kl_mode == 1:
                        kl[s:e] = (logr.exp() * (logr - logq)).sum(-1)
                        dkl = q - logr.exp() if ahead else None
                    else:
                        diff = logq - logr
                        kl[s:e] = (q * diff).sum(-1)
                        dkl = q * (diff - kl[s:e, None]) if ahead else None
                    del logr
                    if ahead:
                        v[s:e] = dkl.to(weight.dtype) @ weight
                        del dkl
                if ahead:  # u = (onehot(y) - q) @ weight = weight[y] - q @ weight
                    q.neg_()
                    q.scatter_add_(1, targets[s:e, None], torch.ones_like(log_probs[s:e, None]))
                    u[s:e] = q.to(weight.dtype) @ weight
                del logq, q
        if ahead:
            ctx.save_for_backward(u, v)
        else:
            ctx.save_for_backward(x, weight, bias, targets, ref_x, ref_weight, ref_bias)
        ctx.ahead, ctx.x_dtype = ahead, x.dtype
        ctx.chunk_size, ctx.kl_mode = chunk_size, kl_mode
        ctx.mark_non_differentiable(entropy, top_ent)
        return log_probs, entropy, kl, top_ent

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_kl, g_top):
        if ctx.ahead:  # dL/dx_t = g_logp_t u_t (+ g_kl_t v_t), from the forward's per-token vectors
            u, v = ctx.saved_tensors
            grad_x = u * g_logp.float()[:, None] if g_logp is not None else torch.zeros_like(u)
            if v is not None and g_kl is not None:
                grad_x.addcmul_(v, g_kl.float()[:, None])
            return grad_x.to(ctx.x_dtype), None, None, None, None, None, None, None, None, None
        x, weight, bias, targets, ref_x, ref_weight, ref_bias = ctx.saved_tensors
        chunk_size, kl_mode = ctx.chunk_size, ctx.kl_mode
        need_x = ctx.needs_input_grad[0]
        need_w = weight is not None and ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        g_logp = torch.zeros_like(g_logp, dtype=torch.float32) if g_logp is None else g_logp.float()
        g_kl = None if (g_kl is None or not kl_mode) else g_kl.float()
        n = x.shape[0]
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            with torch.no_grad():
                logq = torch.log_softmax(_chunk_logits(x[s:e], weight, bias), dim=-1)  # (C, V)
                q = logq.exp()
                gz = q * (-g_logp[s:e, None])  # (C, V) float32
                gz.scatter_add_(1, targets[s:e, None], g_logp[s:e, None])
                if g_kl is not None:
                    logr = torch.log_softmax(_chunk_logits(ref_x[s:e], ref_weight, ref_bias), dim=-1)
                    if kl_mode == 1:
                        gz += g_kl[s:e, None] * (q - logr.exp())
                    else:
                        diff = logq - logr
                        klc = (q * diff).sum(-1, keepdim=True)
                        gz += g_kl[s:e, None] * q * (diff - klc)
                    del logr
                del logq, q
                if weight is None:
                    if need_x:
                        grad_x[s:e] = gz.to(x.dtype)
                else:
                    if need_x:
                        grad_x[s:e] = (gz.to(weight.dtype) @ weight).to(x.dtype)
                    if need_w:
                        grad_w += gz.t() @ x[s:e].float()
                if need_b:
                    grad_b += gz.sum(0)
        return (
            grad_x,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None, None, None, None, None,
        )


def chunked_softmax_stats(
    x: Tensor,
    targets: Tensor,
    *,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    ref_x: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    kl_direction: str = "none",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    topk_entropy_k: int = 0,
) -> SoftmaxStats:
    """Target log-probs, entropy, KL and top-K entropy per token, in token chunks.

    Args:
        x: `(N, V)` logits (with `weight=None`) or `(N, H)` hidden states (with `weight`), any float dtype.
        targets: `(N,)` int64 target ids in `[0, V)` (pass only valid positions, or clamp ignored ones to 0).
        weight: `(V, H)` LM head weight, or None when `x` already holds logits.
        bias: `(V,)` LM head bias or None.
        ref_x / ref_weight / ref_bias: the reference model's logits or hidden states and head (no gradient flows).
        kl_direction: "none", "forward" = KL(p_ref || p_theta) (the reference study's), or "reverse" = KL(p_theta || p_ref).
        chunk_size: tokens per chunk; peak extra memory is about `4 * chunk_size * V * 4` bytes.
        topk_entropy_k: K > 0 also computes `topk_entropy` (EAFT's H^(K)) in the same chunks, never `(N, V)` at once.

    Returns:
        `SoftmaxStats`: `log_probs (N,)` float32 (differentiable), `entropy (N,)` float32 in nats (not
        differentiable), `kl (N,)` float32 in nats (differentiable w.r.t. `x`/`weight`) or None when
        `kl_direction == "none"`, `topk_entropy (N,)` float32 in nats (not differentiable) or None when K = 0.

    Raises:
        ValueError: unknown `kl_direction`, or a KL without `ref_x`.
    """
    if kl_direction not in KL_DIRECTIONS:
        raise ValueError(f"kl_direction must be one of {list(KL_DIRECTIONS)}, got {kl_direction!r}")
    kl_mode = KL_DIRECTIONS[kl_direction]
    if kl_mode and ref_x is None:
        raise ValueError("a KL needs the reference's logits or hidden states (ref_x; weighted_lm_loss: ref_logits)")
    if not kl_mode:  # nothing reads the reference: not saved for backward either
        ref_x = ref_weight = ref_bias = None
    if ref_x is not None:
        ref_x = ref_x.detach()
        ref_weight = None if ref_weight is None else ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()
    logp, ent, kl, top = _ChunkedSoftmaxStats.apply(
        x, weight, bias, targets.long(), ref_x, ref_weight, ref_bias, int(chunk_size), kl_mode, int(topk_entropy_k)
    )
    return SoftmaxStats(logp, ent, kl if kl_mode else None, top if topk_entropy_k else None)
