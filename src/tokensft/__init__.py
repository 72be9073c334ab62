"""tokensft: token-weighted supervised fine-tuning of LLMs on TRL, with per-token gradient tracing and evaluation."""

__version__ = "0.1.0"
