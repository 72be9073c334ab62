"""Token-weighting schemes: detached per-token weights from per-token log-probs.

Every scheme is a function of per-token log-probs (and, for `sft-lr`, reference log-probs) that returns detached
weights `(B, T)`, zero where the mask is False. Schemes are picked by their string name from a registry, so a user
adds one with `register_scheme` without touching the trainer. Normalisation is not a scheme's business: it lives in
`tokensft.losses.core.reduce_token_loss`.

Notation (the loss-schemes issue): l_t = -log p_theta(y_t), p_t = exp(-l_t); all weights are detached.

| mode | weight w_t | source |
| --- | --- | --- |
| `sft`, `sft+kl` | 1 | plain cross-entropy |
| `dft`, `asft` | p_t | DFT, Wu et al. 2025 "On the Generalization of SFT" (arXiv:2508.05629), eq. 9; ASFT adds KL |
| `sft-topk` | 1 if l_t <= k-th smallest l in scope else 0, k = max(1, floor(n * keep_ratio)) (ties kept) | the reference study |
| `sft-antiop` | 1 if l_t <= c*m else c*m / (l_t + 1e-8), m = lower median of l in scope | the reference study |
| `sft-lr` | max(0.1, 1 + alpha * clamp(p_ref - p_t, -1, 1)) | the reference study |

Scope of the statistics (median, k-th smallest), `stat_scope`:
- `micro_batch`: all valid tokens of the tensor passed in (the reference study's behaviour);
- `sequence`: each sequence separately (`segment_ids` separates packed samples inside one row);
- `global`: all valid tokens of the optimizer step, across gradient-accumulation micro-batches and data-parallel
  ranks, passed in as `scope_losses` (1-D). The trainer gathers them with one extra no-grad forward per
  micro-batch. Without `scope_losses`, `global` falls back to the tokens passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

STAT_SCOPES = ("micro_batch", "sequence", "global")


@dataclass(frozen=True)
class SchemeContext:
    """Inputs of a weighting scheme (all `(B, T)`; `log_probs` float32 nats, `mask` bool)."""

    log_probs: Tensor
    mask: Tensor
    ref_log_probs: Tensor | None
    topk_keep_ratio: float
    antiop_clip_mult: float
    lr_weight_alpha: float
    stat_scope: str
    segment_ids: Tensor | None
    scope_losses: Tensor | None

    @property
    def losses(self) -> Tensor:
        return -self.log_probs


@dataclass(frozen=True)
class Scheme:
    """A registered weighting scheme."""

    name: str
    fn: Callable[[SchemeContext], Tensor]
    needs_reference: bool = False  # needs `ref_log_probs` (per-token)
    uses_kl: bool = False  # adds beta * KL(p_ref || p_theta) over the full vocabulary
    description: str = ""


_REGISTRY: dict[str, Scheme] = {}


def register_scheme(
    name: str,
    fn: Callable[[SchemeContext], Tensor],
    *,
    needs_reference: bool = False,
    uses_kl: bool = False,
    description: str = "",
    overwrite: bool = False,
) -> None:
    """Register a weighting scheme under `name` (then usable as `--mode name`).

    Args:
        fn: maps a `SchemeContext` to weights `(B, T)`; the result is detached and zeroed outside the mask for you.
        needs_reference: the scheme reads `ctx.ref_log_probs`; the trainer then runs a reference forward.
        uses_kl: the loss adds `kl_weight * KL(p_ref || p_theta)` per token (needs the reference's full distribution).

    Raises:
        ValueError: `name` already registered and `overwrite` is False.
    """
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"loss scheme {name!r} is already registered")
    _REGISTRY[name] = Scheme(name, fn, needs_reference, uses_kl, description)


def get_scheme(name: str) -> Scheme:
    """The registered scheme `name`. Raises ValueError listing the known modes when unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown loss mode {name!r}; known modes: {', '.join(available_modes())}") from None


def available_modes() -> list[str]:
    """Names of all registered schemes."""
    return list(_REGISTRY)


def topk_keep_count(n: int, keep_ratio: float) -> int:
    """k = max(1, floor(n * keep_ratio)), robust to float error (0.7 * 10 -> 7)."""
    return max(1, math.floor(n * keep_ratio + 1e-9))


def _lower_median(x: Tensor) -> Tensor:
    return torch.median(x)  # torch.median returns the lower of the two middle values


def _kth_smallest(keep_ratio: float) -> Callable[[Tensor], Tensor]:
    def stat(x: Tensor) -> Tensor:
        return torch.kthvalue(x, topk_keep_count(x.numel(), keep_ratio)).values

    return stat


def scope_statistic(ctx: SchemeContext, stat: Callable[[Tensor], Tensor]) -> Tensor:
    """Broadcast a statistic of the valid losses in each token's scope to `(B, T)`.

    Args:
        ctx: scheme inputs; `ctx.stat_scope` selects the scope (see module docstring).
        stat: reduces a 1-D tensor of losses (>= 1 element) to a scalar.

    Returns:
        `(B, T)` float32; arbitrary (0) where no valid token is in scope.
    """
    losses = ctx.losses.detach().float()
    mask = ctx.mask
    out = torch.zeros_like(losses)
    if ctx.stat_scope == "global" and ctx.scope_losses is not None and ctx.scope_losses.numel() > 0:
        return out + stat(ctx.scope_losses.detach().float().to(losses.device))
    if ctx.stat_scope in ("micro_batch", "global"):
        valid = losses[mask]
        return out + stat(valid) if valid.numel() else out
    if ctx.stat_scope == "sequence":
        seg = ctx.segment_ids
        if seg is None:
            seg = torch.arange(losses.shape[0], device=losses.device)[:, None].expand_as(losses)
        for s in torch.unique(seg[mask]):
            sel = mask & (seg == s)
            out[sel] = stat(losses[sel])
        return out
    raise ValueError(f"stat_scope must be one of {STAT_SCOPES}, got {ctx.stat_scope!r}")


def _ones(ctx: SchemeContext) -> Tensor:
    return torch.ones_like(ctx.log_probs)


def _prob(ctx: SchemeContext) -> Tensor:
    return ctx.log_probs.detach().float().exp()


def _topk(ctx: SchemeContext) -> Tensor:
    if not 0.0 < ctx.topk_keep_ratio <= 1.0:
        raise ValueError(f"topk_keep_ratio must be in (0, 1], got {ctx.topk_keep_ratio}")
    thr = scope_statistic(ctx, _kth_smallest(ctx.topk_keep_ratio))
    return (ctx.losses.detach().float() <= thr).float()


def _antiop(ctx: SchemeContext) -> Tensor:
    if ctx.antiop_clip_mult <= 0:
        raise ValueError(f"antiop_clip_mult must be > 0, got {ctx.antiop_clip_mult}")
    losses = ctx.losses.detach().float()
    cap = ctx.antiop_clip_mult * scope_statistic(ctx, _lower_median)
    return torch.where(losses <= cap, torch.ones_like(losses), cap / (losses + 1e-8))


def _lr(ctx: SchemeContext) -> Tensor:
    if ctx.ref_log_probs is None:
        raise ValueError("mode 'sft-lr' needs ref_log_probs (a reference model: ref_source adapter | model | cache)")
    diff = (ctx.ref_log_probs.detach().float().exp() - ctx.log_probs.detach().float().exp()).clamp(-1.0, 1.0)
    return (1.0 + ctx.lr_weight_alpha * diff).clamp(min=0.1)


register_scheme("sft", _ones, description="plain cross-entropy")
register_scheme("dft", _prob, description="CE x detached p_t (DFT, arXiv:2508.05629)")
register_scheme("sft+kl", _ones, uses_kl=True, description="CE + beta * KL(p_ref || p_theta)")
register_scheme("asft", _prob, uses_kl=True, description="DFT + beta * KL(p_ref || p_theta) (ASFT)")
register_scheme("sft-topk", _topk, description="keep the lowest-loss keep_ratio of tokens")
register_scheme("sft-antiop", _antiop, description="clip the loss of tokens above c x median loss")
register_scheme("sft-lr", _lr, needs_reference=True, description="w = max(0.1, 1 + alpha (p_ref - p_theta))")


def token_weights(
    mode: str,
    log_probs: Tensor,
    mask: Tensor,
    *,
    ref_log_probs: Tensor | None = None,
    topk_keep_ratio: float = 0.7,
    antiop_clip_mult: float = 3.0,
    lr_weight_alpha: float = 1.0,
    stat_scope: str = "micro_batch",
    segment_ids: Tensor | None = None,
    scope_losses: Tensor | None = None,
) -> Tensor:
    """Detached per-token weights of a loss mode.

    Args:
        mode: a registered scheme name (`sft`, `dft`, `sft+kl`, `asft`, `sft-topk`, `sft-antiop`, `sft-lr`, ...).
        log_probs: `(B, T)` log p_theta(y_t) of the target tokens (any float dtype; weights are float32).
        mask: `(B, T)` bool, True at supervised targets.
        ref_log_probs: `(B, T)` log p_ref(y_t), needed by `sft-lr`.
        topk_keep_ratio: share of tokens `sft-topk` keeps (0.7).
        antiop_clip_mult: c of `sft-antiop` (3.0).
        lr_weight_alpha: alpha of `sft-lr` (1.0).
        stat_scope: `micro_batch` | `sequence` | `global` (see module docstring).
        segment_ids: `(B, T)` ints separating packed samples for `stat_scope="sequence"` (default: one per row).
        scope_losses: 1-D losses of every valid token of the optimizer step, for `stat_scope="global"`.

    Returns:
        `(B, T)` float32 weights, detached, exactly 0 where `mask` is False.

    Raises:
        ValueError: unknown mode or scope, `sft-lr` without `ref_log_probs`, out-of-range parameters.
    """
    scheme = get_scheme(mode)
    if stat_scope not in STAT_SCOPES:
        raise ValueError(f"stat_scope must be one of {STAT_SCOPES}, got {stat_scope!r}")
    if log_probs.shape != mask.shape:
        raise ValueError(f"log_probs {tuple(log_probs.shape)} and mask {tuple(mask.shape)} differ in shape")
    mask = mask.bool()
    # Masked positions may hold anything (even inf): neutralise them before any statistic is taken
    safe_lp = torch.where(mask, log_probs.detach().float(), torch.zeros((), device=log_probs.device))
    safe_ref = None
    if ref_log_probs is not None:
        safe_ref = torch.where(mask, ref_log_probs.detach().float(), torch.zeros((), device=log_probs.device))
    ctx = SchemeContext(
        safe_lp, mask, safe_ref, topk_keep_ratio, antiop_clip_mult, lr_weight_alpha, stat_scope, segment_ids,
        scope_losses,
    )
    with torch.no_grad():
        w = scheme.fn(ctx).float()
        return torch.where(mask, w, torch.zeros((), device=w.device))
