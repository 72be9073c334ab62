"""The one loss pipeline: per-token log-probs -> scheme weights -> reduced loss -> token statistics.

`loss_from_log_probs` is the single function every caller runs: the trainer's `compute_loss` (log-probs from
`chunked_softmax_stats` on hidden states, the CPU default and always for KL / top-K entropy, or from TRL's fused LM
head, the CUDA default, or from plain logits: `--loss_head`), the functional `weighted_lm_loss` (log-probs from full
logits, in chunks) and the tracer's scheme overlay. `reduce_token_loss` inside it is the one place that owns normalisation;
`token_stat_sums` the one definition of the logged statistics, as sums over tokens so that they can be reduced over
micro-batches and ranks exactly like the loss (`StepTokenStats`).

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

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .fused import DEFAULT_CHUNK_SIZE, chunked_softmax_stats
from .inputs import TokenInputs, head_options, produce_needs
from .schemes import STAT_SCOPES, Scheme, affected, available_modes, get_scheme, token_losses, token_weights

IGNORE_INDEX = -100
NORMALIZATIONS = ("token", "micro_batch", "weight")


@dataclass
class LossOutput:
    """Result of `weighted_lm_loss` (shapes after the causal shift: `(B, T-1)`).

    Attributes:
        loss: scalar objective (differentiable).
        token_loss: `(B, T-1)` float32 unweighted CE l_t in nats, 0 at ignored positions.
        weights: `(B, T-1)` float32 detached weights (scheme x data weights), 0 at ignored positions.
        mask: `(B, T-1)` bool, True at supervised targets.
        kl: `(B, T-1)` float32 KL_t in nats (KL modes) or None.
        stat_sums: detached 0-d tensors: sums over the valid tokens (see `token_stat_sums`).
        params: the scheme parameters the weights were computed with (declared defaults filled in).
    """

    loss: Tensor
    token_loss: Tensor
    weights: Tensor
    mask: Tensor
    kl: Tensor | None = None
    stat_sums: dict[str, Tensor] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def stats(self) -> dict[str, float]:
        """This micro-batch's statistics as floats (`stats_from_sums` of `stat_sums`, with the median)."""
        return stats_from_sums(self.stat_sums, self.token_loss[self.mask])


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


STAT_KEYS = ("nll", "weight/mean", "weight/frac_reduced", "weight/frac_zero", "entropy", "kl", "ref/p_mean")


def token_stat_sums(
    token_loss: Tensor,
    weights: Tensor,
    mask: Tensor,
    *,
    entropy: Tensor | None = None,
    kl: Tensor | None = None,
    ref_log_probs: Tensor | None = None,
) -> dict[str, Tensor]:
    """The logged statistics as sums over the valid tokens (detached float32 0-d tensors, on the input's device).

    Keys: `num_tokens` (valid targets) and, each to be divided by it: `nll` (sum of l_t), `weight/mean` (sum of
    w_t), `weight/frac_reduced` (#w_t < 1), `weight/frac_zero` (#w_t = 0), `entropy` (sum of H_t, when given),
    `kl` (sum of KL_t, KL modes), `ref/p_mean` (sum of p_ref(y_t), reference modes). Sums, not means, so that the
    statistic of an optimizer step is the token mean over all its micro-batches and ranks, like the loss.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=token_loss.device)

    def total(x: Tensor) -> Tensor:
        return torch.where(mask, x.detach().float(), zero).sum()

    w = weights.detach().float()
    out = {
        "num_tokens": mask.sum().float(),
        "nll": total(token_loss),
        "weight/mean": total(w),
        "weight/frac_reduced": (mask & (w < 1)).sum().float(),
        "weight/frac_zero": (mask & (w == 0)).sum().float(),
    }
    if entropy is not None:
        out["entropy"] = total(entropy)
    if kl is not None:
        out["kl"] = total(kl)
    if ref_log_probs is not None:
        out["ref/p_mean"] = total(ref_log_probs.detach().float().exp())
    return out


def stats_from_sums(sums: Mapping[str, Tensor | float], token_losses: Tensor | None = None) -> dict[str, float]:
    """Means from `token_stat_sums` sums (added over any number of micro-batches / ranks), plus
    `token_loss/median` (lower median) of `token_losses` (1-D, the valid tokens). `{"num_tokens": 0.0}` when empty."""
    n = float(sums.get("num_tokens", 0.0))
    if n == 0:
        return {"num_tokens": 0.0}
    out = {k: float(sums[k]) / n for k in STAT_KEYS if k in sums}
    if token_losses is not None and token_losses.numel():
        out["token_loss/median"] = float(torch.median(token_losses.detach().float()))
    out["num_tokens"] = n
    return out


class StepTokenStats:
    """Logging statistics accumulated over the micro-batches of one logging window, reduced like the loss.

    `add` each micro-batch's `LossOutput`; `compute` divides the token sums of all micro-batches (and, given
    `sum_across`, of all ranks) by their token count, and takes the median over all their token losses (given
    `cat_across`, gathered from all ranks). So `nll` logged at GA=4 equals `nll` at GA=1 on the same data, and
    1 process equals 2.

    Args:
        max_median_tokens: token losses kept per rank for the median (4 bytes each); past it (a very long logging
            window) the median is that of the first `max_median_tokens` tokens. The means are always exact.
    """

    def __init__(self, max_median_tokens: int = 1 << 22) -> None:
        self.sums: dict[str, Tensor] = {}
        self.token_losses: list[Tensor] = []
        self.max_median_tokens = max_median_tokens
        self._kept = 0

    def add(self, out: LossOutput) -> None:
        for k, v in out.stat_sums.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        if self._kept < self.max_median_tokens:
            losses = out.token_loss.detach().float()[out.mask][: self.max_median_tokens - self._kept]
            self.token_losses.append(losses)
            self._kept += losses.numel()

    def __bool__(self) -> bool:
        return bool(self.sums)

    def compute(
        self,
        *,
        sum_across: Callable[[Tensor], Tensor] | None = None,
        cat_across: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, float]:
        """Token-weighted means (and the median) of everything added; then empties itself.

        Args:
            sum_across: sums a 1-D tensor over ranks (e.g. `accelerator.reduce(x, "sum")`); None for one process.
            cat_across: concatenates a 1-D tensor over ranks (e.g. pad with NaN + `accelerator.gather`, NaN dropped).

        Returns:
            `stats_from_sums` of the totals, without `num_tokens`; `{}` when nothing was added or no token was valid.
        """
        keys = sorted(self.sums)
        if not keys:
            return {}
        totals = torch.stack([self.sums[k] for k in keys])
        if sum_across is not None:
            totals = sum_across(totals)
        losses = torch.cat(self.token_losses) if self.token_losses else totals.new_zeros(0)
        if cat_across is not None:
            losses = cat_across(losses)
        self.sums, self.token_losses, self._kept = {}, [], 0
        out = stats_from_sums(dict(zip(keys, totals.tolist())), losses)
        out.pop("num_tokens", None)
        return out


def validate_loss_options(
    mode: str | Scheme, *, params: Mapping[str, Any] | None = None, stat_scope: str = "micro_batch",
    normalization: str = "token",
) -> dict[str, Any]:
    """Check a loss configuration before anything loads; returns the mode's resolved parameters.

    Raises:
        ValueError: one line naming the flag: unknown `--mode`, `--stat_scope`, `--normalization` or scheme
            parameter, or a parameter out of its declared range.
    """
    scheme = get_scheme(mode)
    if stat_scope not in STAT_SCOPES:
        raise ValueError(f"--stat_scope must be one of {', '.join(STAT_SCOPES)}, got {stat_scope!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"--normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
    return scheme.resolve_params(params)


@dataclass(frozen=True)
class Reduction:
    """How `loss_from_log_probs` reduces per-token losses to the objective (`reduce_token_loss`; module docstring).

    Attributes:
        normalization: "token" | "micro_batch" | "weight".
        num_items_in_batch: valid targets of the whole optimizer step (all micro-batches and ranks), for "token";
            None = this micro-batch's valid count.
    """

    normalization: str = "token"
    num_items_in_batch: int | Tensor | None = None


def loss_from_log_probs(
    inputs: TokenInputs,
    scheme: str | Scheme = "sft",
    *,
    params: Mapping[str, Any] | None = None,
    stat_scope: str = "micro_batch",
    scope_values: Tensor | None = None,
    reduction: Reduction = Reduction(),
) -> LossOutput:
    """The loss pipeline: detached scheme weights, the reduced objective and the token statistics (module docstring).

    L = reduce_token_loss(l, w, mask, kl) with l_t = -log p_theta(y_t), w_t = scheme weight x data weight, and the
    KL term (beta = `kl_weight`) for schemes that need the reference's distribution.

    Args:
        inputs: the micro-batch's `TokenInputs`, `(B, T)` each (already shifted targets): `log_probs` (float32,
            differentiable), `mask`, and the fields of the scheme's needs (`ref_log_probs`, `topk_entropy`,
            `alignment`, `kl` (differentiable) ...); `entropy` is logged when present; `data_weights` multiply the
            scheme's weights; `segment_ids` separate packed samples (`stat_scope="sequence"`).
        scheme: a registered scheme name (or `Scheme`).
        params: the scheme's parameters by name; missing ones take the declared defaults; other schemes' ignored.
        stat_scope: `micro_batch` | `sequence` | `global`.
        scope_values: 1-D scope values of every valid token of the optimizer step (`global`).
        reduction: normalisation and `num_items_in_batch` (`Reduction`).

    Returns:
        `LossOutput` (`token_loss`, `weights`, `mask`, `kl` of shape `(B, T)`).

    Raises:
        ValueError: unknown mode/scope/normalization or parameter, a parameter out of range, a needed input missing
            (naming the need and its `TokenInputs` field), or shapes that disagree.
    """
    scheme = get_scheme(scheme)
    inputs.check(scheme.name, scheme.needs)
    resolved = scheme.resolve_params(params)
    mask = inputs.mask.bool()
    weights = token_weights(scheme, inputs, params=resolved, stat_scope=stat_scope, scope_values=scope_values)
    if inputs.data_weights is not None:
        weights = weights * torch.where(mask, inputs.data_weights.detach().float(),
                                        torch.zeros((), device=weights.device))
    log_probs = inputs.log_probs.float()
    token_loss = torch.where(mask, -log_probs, torch.zeros((), device=log_probs.device))
    kl_used = inputs.kl if scheme.uses_kl else None
    loss = reduce_token_loss(
        token_loss, weights, mask, kl=kl_used, kl_weight=resolved["kl_weight"] if scheme.uses_kl else 0.0,
        normalization=reduction.normalization, num_items_in_batch=reduction.num_items_in_batch,
    )
    sums = token_stat_sums(token_loss, weights, mask, entropy=inputs.entropy, kl=kl_used,
                           ref_log_probs=inputs.ref_log_probs if scheme.needs_reference else None)
    return LossOutput(loss=loss, token_loss=token_loss, weights=weights, mask=mask, kl=kl_used, stat_sums=sums,
                      params=resolved)


def weighted_lm_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    mode: str = "sft",
    ref_logits: Tensor | None = None,
    ref_log_probs: Tensor | None = None,
    num_items_in_batch: int | Tensor | None = None,
    normalization: str = "token",
    position_ids: Tensor | None = None,
    stat_scope: str = "micro_batch",
    scope_values: Tensor | None = None,
    data_weights: Tensor | None = None,
    alignment: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **scheme_params: Any,
) -> LossOutput:
    """Token-weighted causal-LM loss from full logits (the functional entry point; `loss_from_log_probs` inside).

    This path's producers of the scheme's needs (`tokensft.losses.inputs.NEEDS`): the head needs (entropy, KL,
    top-K entropy) from one `chunked_softmax_stats` pass over the logits (and `ref_logits` for the KL);
    `ref_log_probs` as given, else from `ref_logits`; `alignment` as given (it needs a model: see
    `tokensft.tracing.core.micro_batch_alignment`).

    Args:
        logits: `(B, T, V)` any float dtype (bf16 fine: softmax math is float32).
        labels: `(B, T)` int64, unshifted, `-100` ignored; the function shifts (HF convention).
        mode: a registered scheme (`sft`, `dft`, `sft+kl`, `asft`, `sft-topk`, `sft-antiop`, `sft-lr`, ...).
        ref_logits: `(B, T, V)` reference logits: needed by KL modes, and by `sft-lr` unless `ref_log_probs` given.
        ref_log_probs: `(B, T-1)` reference log-probs of the shifted targets (e.g. from a cache), for `sft-lr`.
        num_items_in_batch: valid targets of the whole optimizer step, for `normalization="token"`.
        normalization: "token" | "micro_batch" | "weight" (see module docstring).
        position_ids: `(B, T)` for packed rows: no target across samples; `sequence` scope per sample.
        stat_scope / scope_values: as in `loss_from_log_probs`.
        data_weights / alignment: `(B, T-1)` (shifted), the `TokenInputs` fields of the same name.
        chunk_size: tokens per softmax chunk: neither the `(B, T, V)` float32 log-softmax of the policy nor of the
            reference is ever built.
        **scheme_params: the mode's parameters (`topk_keep_ratio`, `antiop_clip_mult`, `lr_weight_alpha`,
            `kl_weight`, `kl_direction`, or a registered scheme's own); missing ones take the declared defaults.

    Returns:
        `LossOutput` with `(B, T-1)` tensors.

    Raises:
        ValueError: shapes disagree, unknown mode or parameter, or a reference is needed and missing.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, T, V) and labels (B, T); got {tuple(logits.shape)}, {tuple(labels.shape)}")
    scheme = get_scheme(mode)
    params = scheme.resolve_params(scheme_params)
    targets = shift_labels(labels, position_ids)  # (B, T-1)
    mask = targets != IGNORE_INDEX
    B, Tm1 = targets.shape
    V = logits.shape[-1]
    flat_targets = targets.clamp(min=0).reshape(-1)  # (B*(T-1),)

    def ref_x() -> Tensor | None:  # (B*(T-1), V) reference logits, for the KL or the reference log-probs
        return ref_logits[:, :-1].reshape(-1, V) if ref_logits is not None else None

    def reference_log_probs() -> Tensor | None:
        if ref_log_probs is not None or ref_logits is None:
            return ref_log_probs  # None: `TokenInputs.check` names the need
        with torch.no_grad():
            return chunked_softmax_stats(ref_x(), flat_targets, chunk_size=chunk_size).log_probs.view(B, Tm1)

    head = {"kl_direction": "none", **head_options(scheme.needs, params)}  # the head needs' options (KL, top-K)
    stats = chunked_softmax_stats(logits[:, :-1].reshape(-1, V), flat_targets, chunk_size=chunk_size,
                                  ref_x=ref_x() if head["kl_direction"] != "none" else None, **head)
    segment_ids = segment_ids_from_position_ids(position_ids)[:, 1:] if position_ids is not None else None
    fields = {f: None if v is None else v.view(B, Tm1) for f, v in stats._asdict().items()}
    inputs = TokenInputs(mask=mask, data_weights=data_weights, segment_ids=segment_ids, **fields)
    inputs = inputs.replace(**produce_needs(scheme.needs, params, {
        "ref_log_probs": reference_log_probs, "token_alignment": lambda norm_directions: alignment}))
    return loss_from_log_probs(inputs, scheme, params=params, stat_scope=stat_scope, scope_values=scope_values,
                               reduction=Reduction(normalization, num_items_in_batch))


PREMISE_NEED = "token_alignment"
"""The need the premise metrics (`premise_counts`, `--log_premise`) add to a run's: the token alignment."""

PREMISE_DETECTORS: dict[str, str] = {
    s.trace_key: s.name for s in map(get_scheme, available_modes())
    if s.scope is token_losses and not s.needs and s.affects is not None
}
"""Trace key -> mode of the detectors `premise_counts` scores: the built-in schemes whose weights are a statistic of the
policy's token losses alone (`scope=token_losses`, no needs: `sft-topk`, `sft-antiop`) and that declare an
affected-token rule; which tokens each flags is that rule (`register_scheme(affects=...)`)."""


def premise_counts(inputs: TokenInputs, *, params: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """Counts for the reference study's premise "high loss => opposing gradient", on one micro-batch.

    A token *opposes* when d_t = <grad l_t, G> < 0 (G: the micro-batch's aggregate gradient). A detector *flags* a
    token when its scheme would affect it (micro-batch statistics, `params` or the declared defaults), by the rule the
    scheme declares (`register_scheme(affects=...)`, read through `affected`: `sft-topk` weight 0, `sft-antiop`
    weight < 1).

    Args:
        inputs: the micro-batch's `TokenInputs`: `log_probs`, `mask` and `alignment` (`(B, T)`, from
            `tokensft.tracing.core.micro_batch_alignment`).
        params: scheme parameters (`topk_keep_ratio`, `antiop_clip_mult`); declared defaults for the rest.

    Returns:
        detached 0-d float tensors: `n` (valid tokens), `opposing`, and per detector `<key>/flagged`,
        `<key>/flagged_opposing`; sums, to be added over micro-batches and ranks before `premise_metrics`.

    Source: ours (issue: test the reference study's premise directly).
    """
    if inputs.alignment is None:
        raise ValueError("premise_counts needs the token alignment (TokenInputs.alignment)")
    mask = inputs.mask.bool()
    opp = mask & (inputs.alignment.detach() < 0)
    out = {"n": mask.sum().float(), "opposing": opp.sum().float()}
    for key, mode in PREMISE_DETECTORS.items():
        w = token_weights(mode, inputs, params=params or {})
        flagged = mask & affected(w, get_scheme(mode).affects)
        out[f"{key}/flagged"] = flagged.sum().float()
        out[f"{key}/flagged_opposing"] = (flagged & opp).sum().float()
    return out


def premise_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    """`premise/*` metrics from summed `premise_counts`: `opposing_frac`, and per detector `precision` (share of the
    flagged tokens that oppose), `recall` (share of the opposing tokens flagged) and `aligned_hit` (share of the
    aligned tokens flagged). NaN where a denominator is 0."""
    def ratio(a: float, b: float) -> float:
        return a / b if b else math.nan

    n, opp = float(sums.get("n", 0.0)), float(sums.get("opposing", 0.0))
    out = {"premise/opposing_frac": ratio(opp, n)}
    for key in PREMISE_DETECTORS:
        f, fo = float(sums.get(f"{key}/flagged", 0.0)), float(sums.get(f"{key}/flagged_opposing", 0.0))
        out[f"premise/{key}_precision"] = ratio(fo, f)
        out[f"premise/{key}_recall"] = ratio(fo, opp)
        out[f"premise/{key}_aligned_hit"] = ratio(f - fo, n - opp)
    return out
