"""The weighted language-modelling loss: one reduction that owns normalisation, and a functional entry point.

Objective of every mode (the loss-schemes issue), with l_t = -log p_theta(y_t), w_t the scheme's detached weight,
beta = `kl_weight`, KL_t = KL(p_ref || p_theta) at position t (KL modes only):

    normalization="token"        L = sum_valid (w_t l_t + beta KL_t) / N,  N = num_items_in_batch (all valid targets
                                 of the optimizer step, all ranks) when given, else this micro-batch's valid count
    normalization="micro_batch"  L = sum_valid (w_t l_t + beta KL_t) / #{valid t : w_t > 0}  (the reference study:
                                 a mean over the counted tokens of the micro-batch; for topk the kept ones)
    normalization="weight"       L = sum_valid w_t l_t / sum_valid w_t + beta sum_valid KL_t / #valid

A micro-batch without valid targets gives exactly 0.0 with zero gradients. Only `token` with `num_items_in_batch`
is exact under gradient accumulation (batch 8 x GA1 equals batch 2 x GA4); the other two average per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .fused import DEFAULT_CHUNK_SIZE, chunked_softmax_stats
from .schemes import get_scheme, token_weights

IGNORE_INDEX = -100
NORMALIZATIONS = ("token", "micro_batch", "weight")


@dataclass
class LossOutput:
    """Result of `weighted_lm_loss` (shapes after the causal shift: `(B, T-1)`).

    Attributes:
        loss: scalar objective (differentiable).
        token_loss: `(B, T-1)` float32 unweighted CE l_t in nats, 0 at ignored positions.
        weights: `(B, T-1)` float32 detached weights, 0 at ignored positions.
        mask: `(B, T-1)` bool, True at supervised targets.
        kl: `(B, T-1)` float32 KL_t in nats (KL modes) or None.
        stats: floats for logging (see `loss_stats`).
    """

    loss: Tensor
    token_loss: Tensor
    weights: Tensor
    mask: Tensor
    kl: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)


def shift_labels(labels: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """Causal shift: targets `(B, T-1)` = labels[:, 1:]; with packing, a target that starts a new sample is ignored.

    Args:
        labels: `(B, T)` int64, `-100` = ignored (the Hugging Face convention).
        position_ids: `(B, T)` optional; where `position_ids[:, t] == 0` token t starts a packed sample, so
            predicting it from the previous sample's last token is never trained.

    Returns:
        `(B, T-1)` int64 targets with `-100` at ignored positions.
    """
    targets = labels[:, 1:].clone()
    if position_ids is not None:
        targets[position_ids[:, 1:] == 0] = IGNORE_INDEX
    return targets


def segment_ids_from_position_ids(position_ids: Tensor) -> Tensor:
    """Sample index of every position of packed rows: `(B, T)` -> `(B, T)` int64, a new id at each position id 0."""
    starts = (position_ids == 0).long()
    starts[:, 0] = 1
    row_offset = torch.arange(position_ids.shape[0], device=position_ids.device)[:, None] * position_ids.shape[1]
    return starts.cumsum(1) + row_offset


def reduce_token_loss(
    token_loss: Tensor,
    weights: Tensor,
    mask: Tensor,
    *,
    kl: Tensor | None = None,
    kl_weight: float = 0.0,
    normalization: str = "token",
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Reduce per-token losses to the scalar objective (the one place that owns normalisation; formulas above).

    Args:
        token_loss: `(B, T)` per-token CE l_t (differentiable); values at masked positions are ignored, even inf/nan.
        weights: `(B, T)` detached weights.
        mask: `(B, T)` bool.
        kl: `(B, T)` per-token KL or None.
        kl_weight: beta.
        normalization: "token" | "micro_batch" | "weight".
        num_items_in_batch: valid targets of the whole optimizer step (all micro-batches and ranks), for "token".

    Returns:
        Scalar tensor; exactly 0.0 (with zero gradients) when no position is valid.

    Raises:
        ValueError: unknown normalization.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    mask = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=token_loss.device)
    wl = torch.where(mask, weights.float() * token_loss.float(), zero)
    kl_term = torch.where(mask, kl.float(), zero) if (kl is not None and kl_weight) else None
    n_valid = mask.sum()
    if normalization == "token":
        denom = n_valid if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=wl.device)
        total = wl.sum() + (kl_weight * kl_term.sum() if kl_term is not None else 0.0)
        return total / denom.clamp(min=1).to(total.dtype)
    if normalization == "micro_batch":
        counted = (mask & (weights > 0)).sum()
        total = wl.sum() + (kl_weight * kl_term.sum() if kl_term is not None else 0.0)
        return total / counted.clamp(min=1).to(total.dtype)
    wsum = torch.where(mask, weights.float(), zero).sum()
    loss = wl.sum() / wsum.clamp(min=1e-12)
    if kl_term is not None:
        loss = loss + kl_weight * kl_term.sum() / n_valid.clamp(min=1).to(loss.dtype)
    return loss


def loss_stats(
    token_loss: Tensor, weights: Tensor, mask: Tensor, *, kl: Tensor | None = None, ref_log_probs: Tensor | None = None
) -> dict[str, float]:
    """Logging statistics of a micro-batch (plain floats).

    Keys: `nll` (mean CE over valid targets, comparable across modes), `weight/mean`, `weight/frac_reduced` (w < 1),
    `weight/frac_zero`, `token_loss/median` (lower median), `kl` (mean, KL modes), `ref/p_mean` (mean p_ref(y_t)),
    `num_tokens` (valid targets).
    """
    mask = mask.bool()
    n = int(mask.sum())
    if n == 0:
        return {"num_tokens": 0.0}
    tl = token_loss.detach().float()[mask]
    w = weights.detach().float()[mask]
    out = {
        "nll": float(tl.mean()),
        "weight/mean": float(w.mean()),
        "weight/frac_reduced": float((w < 1).float().mean()),
        "weight/frac_zero": float((w == 0).float().mean()),
        "token_loss/median": float(torch.median(tl)),
        "num_tokens": float(n),
    }
    if kl is not None:
        out["kl"] = float(kl.detach().float()[mask].mean())
    if ref_log_probs is not None:
        out["ref/p_mean"] = float(ref_log_probs.detach().float()[mask].exp().mean())
    return out


def weighted_lm_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    mode: str = "sft",
    ref_logits: Tensor | None = None,
    ref_log_probs: Tensor | None = None,
    num_items_in_batch: int | Tensor | None = None,
    normalization: str = "token",
    kl_weight: float = 0.05,
    kl_direction: str = "forward",
    position_ids: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **scheme_kwargs,
) -> LossOutput:
    """Token-weighted causal-LM loss from full logits (the functional entry point).

    Args:
        logits: `(B, T, V)` any float dtype (bf16 fine: softmax math is float32).
        labels: `(B, T)` int64, unshifted, `-100` ignored; the function shifts (HF convention).
        mode: a registered scheme (`sft`, `dft`, `sft+kl`, `asft`, `sft-topk`, `sft-antiop`, `sft-lr`, ...).
        ref_logits: `(B, T, V)` reference logits: needed by KL modes, and by `sft-lr` unless `ref_log_probs` given.
        ref_log_probs: `(B, T-1)` reference log-probs of the shifted targets (e.g. from a cache), for `sft-lr`.
        num_items_in_batch: valid targets of the whole optimizer step, for `normalization="token"`.
        normalization: "token" | "micro_batch" | "weight" (see module docstring).
        kl_weight: beta of the KL modes (0.05).
        kl_direction: "forward" = KL(p_ref || p_theta) (the reference study's) or "reverse".
        position_ids: `(B, T)` for packed rows: no target across samples; `sequence` scope per sample.
        chunk_size: tokens per softmax chunk; the `(B, T, V)` float32 log-softmax is never built.
        **scheme_kwargs: `topk_keep_ratio`, `antiop_clip_mult`, `lr_weight_alpha`, `stat_scope`, `scope_losses`.

    Returns:
        `LossOutput`.

    Raises:
        ValueError: shapes disagree, unknown mode, or a reference is needed and missing.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, T, V) and labels (B, T); got {tuple(logits.shape)}, {tuple(labels.shape)}")
    scheme = get_scheme(mode)
    targets = shift_labels(labels, position_ids)  # (B, T-1)
    mask = targets != IGNORE_INDEX
    B, Tm1 = targets.shape
    V = logits.shape[-1]
    x = logits[:, :-1].reshape(-1, V)  # (B*(T-1), V)
    need_ref_dist = scheme.uses_kl or (scheme.needs_reference and ref_log_probs is None)
    if need_ref_dist and ref_logits is None:
        raise ValueError(f"mode {mode!r} needs ref_logits (or ref_log_probs for sft-lr)")
    ref_x = ref_logits[:, :-1].reshape(-1, V) if (need_ref_dist and ref_logits is not None) else None
    log_probs, _entropy, kl = chunked_softmax_stats(
        x,
        targets.clamp(min=0).reshape(-1),
        ref_x=ref_x,
        kl_direction=kl_direction if scheme.uses_kl else "none",
        chunk_size=chunk_size,
    )
    log_probs = log_probs.view(B, Tm1)
    kl = kl.view(B, Tm1) if kl is not None else None
    if scheme.needs_reference and ref_log_probs is None:
        with torch.no_grad():
            ref_lp = torch.log_softmax(ref_x.float(), -1) if ref_x is not None else None
            ref_log_probs = ref_lp.gather(1, targets.clamp(min=0).reshape(-1, 1)).view(B, Tm1)
    segment_ids = segment_ids_from_position_ids(position_ids)[:, 1:] if position_ids is not None else None
    weights = token_weights(
        mode, log_probs, mask, ref_log_probs=ref_log_probs, segment_ids=segment_ids, **scheme_kwargs
    )
    token_loss = torch.where(mask, -log_probs, torch.zeros((), device=log_probs.device))
    loss = reduce_token_loss(
        token_loss, weights, mask, kl=kl, kl_weight=kl_weight if scheme.uses_kl else 0.0,
        normalization=normalization, num_items_in_batch=num_items_in_batch,
    )
    stats = loss_stats(token_loss, weights, mask, kl=kl, ref_log_probs=ref_log_probs if scheme.needs_reference else None)
    return LossOutput(loss=loss, token_loss=token_loss, weights=weights, mask=mask, kl=kl, stats=stats)
