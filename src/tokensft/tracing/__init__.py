"""Per-token gradient tracing: hooks, the TrainerCallback and the on-disk schema (`tokensft.tracing.schema`)."""
