"""Loss schemes for token-weighted SFT: pure torch on per-token log-probs (imports nothing from trl/transformers).

Public API:
- `token_weights(mode, log_probs, mask, ...)`: detached per-token weights of a scheme.
- `weighted_lm_loss(logits, labels, mode=..., ...)`: the whole loss from logits, returning `LossOutput`.
- `reduce_token_loss(...)`: the single place that owns normalisation.
- `chunked_softmax_stats(...)`: target log-probs / entropy / KL in token chunks, from logits or hidden states + head.
- `register_scheme(name, fn, ...)`: add a scheme usable as `--mode name`.
"""

from .core import (
    IGNORE_INDEX,
    NORMALIZATIONS,
    LossOutput,
    loss_stats,
    reduce_token_loss,
    segment_ids_from_position_ids,
    shift_labels,
    weighted_lm_loss,
)
from .fused import KL_DIRECTIONS, chunked_softmax_stats
from .schemes import (
    STAT_SCOPES,
    Scheme,
    SchemeContext,
    available_modes,
    get_scheme,
    register_scheme,
    scope_statistic,
    token_weights,
    topk_keep_count,
)

__all__ = [
    "IGNORE_INDEX", "KL_DIRECTIONS", "NORMALIZATIONS", "STAT_SCOPES", "LossOutput", "Scheme", "SchemeContext",
    "available_modes", "chunked_softmax_stats", "get_scheme", "loss_stats", "reduce_token_loss", "register_scheme",
    "scope_statistic", "segment_ids_from_position_ids", "shift_labels", "token_weights", "topk_keep_count",
    "weighted_lm_loss",
]
