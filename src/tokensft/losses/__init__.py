"""Loss schemes for token-weighted SFT: pure torch on per-token log-probs (imports nothing from trl/transformers).

Public API:
- `loss_from_log_probs(inputs, scheme, params=..., reduction=...)`: the one pipeline (weights -> reduced loss ->
  statistics) that the trainer, the functional entry point and the tracer all run, on one `TokenInputs` bundle.
- `TokenInputs` / `NEEDS`: the bundle of per-token inputs, and the needs that fill it (one declaration each).
- `weighted_lm_loss(logits, labels, mode=..., ...)`: the whole loss from logits, returning `LossOutput`.
- `register_scheme(name, fn, params=..., needs=..., scope=...)`: add a scheme usable as `--mode name`, its
  parameters declared once (`SchemeParam`); `load_scheme_file(path)` imports a user's file of such calls.
- `token_weights(mode, inputs, ...)`: detached per-token weights of a scheme.
- `reduce_token_loss(...)`: the single place that owns normalisation.
- `token_stat_sums` / `StepTokenStats`: the logged statistics, reduced over tokens like the loss.
- `chunked_softmax_stats(...)`: target log-probs / entropy / KL in token chunks, from logits or hidden states + head.
"""

from .core import (
    IGNORE_INDEX,
    NORMALIZATIONS,
    PREMISE_DETECTORS,
    PREMISE_NEED,
    LossOutput,
    Reduction,
    StepTokenStats,
    loss_from_log_probs,
    premise_counts,
    premise_metrics,
    reduce_token_loss,
    segment_ids_from_position_ids,
    shift_labels,
    stats_from_sums,
    token_stat_sums,
    validate_loss_options,
    weighted_lm_loss,
)
from .fused import KL_DIRECTIONS, SoftmaxStats, chunked_softmax_stats, topk_entropy
from .inputs import FIELDS, NEEDS, Need, TokenInputs, head_options, produce_needs
from .schemes import (
    AFFECTED_TOL,
    AFFECTS,
    BUILTIN_MODES,
    STAT_SCOPES,
    Scheme,
    SchemeContext,
    SchemeParam,
    affected,
    all_params,
    available_modes,
    builtin_params,
    get_scheme,
    load_scheme_file,
    param_users,
    register_scheme,
    scope_statistic,
    scope_values_of,
    token_losses,
    token_weights,
    topk_keep_count,
    traced_rules,
)

__all__ = [
    "AFFECTED_TOL", "AFFECTS", "affected", "traced_rules", "BUILTIN_MODES", "builtin_params", "IGNORE_INDEX", "KL_DIRECTIONS", "NEEDS", "NORMALIZATIONS", "STAT_SCOPES", "FIELDS", "Need", "TokenInputs", "produce_needs", "head_options",
    "LossOutput", "Reduction", "Scheme",
    "SchemeContext", "SchemeParam", "SoftmaxStats", "StepTokenStats", "all_params", "available_modes", "chunked_softmax_stats",
    "get_scheme", "load_scheme_file", "loss_from_log_probs", "param_users", "premise_counts",
    "premise_metrics", "PREMISE_DETECTORS", "PREMISE_NEED", "reduce_token_loss",
    "register_scheme", "scope_statistic", "scope_values_of", "segment_ids_from_position_ids", "shift_labels",
    "stats_from_sums", "token_losses", "token_stat_sums", "token_weights", "topk_entropy", "topk_keep_count", "validate_loss_options",
    "weighted_lm_loss",
]
