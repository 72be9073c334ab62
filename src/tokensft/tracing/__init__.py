"""Per-token gradient tracing: hooks, the TrainerCallback and the on-disk schema (`tokensft.tracing.schema`).

Public API (imported lazily, so `tokensft.tracing.schema` stays free of transformers for the analysis; it imports
`tokensft.losses.schemes`, and so torch, only when the affected-token rule is first read):
- `TraceConfig` (`tokensft.tracing.config`): the `--trace_*` options.
- `TokenGradTraceCallback`, `build_trace_callback` (`tokensft.tracing.callback`).
- `trace_per_position`, `per_token_loss_alignment`, `select_trace_modules`, `Projector`, `eager_attention`
  (`tokensft.tracing.core`): the math, usable without a Trainer.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TraceConfig": "config",
    "TokenGradTraceCallback": "callback",
    "build_trace_callback": "callback",
    "trace_per_position": "core",
    "per_token_loss_alignment": "core",
    "select_trace_modules": "core",
    "Projector": "core",
    "eager_attention": "core",
    "position_alignment": "core",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
