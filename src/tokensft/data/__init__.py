"""Training data: loading (JSONL / JSON / parquet / hub), column presets, chat templates, completion-only labels.

Pipeline: `load_records(source)` → rows; `build_sft_dataset(rows, tokenizer, preset=...)` → a `datasets.Dataset`
with `input_ids` and `labels`; `CompletionCollator(pad_token_id)` → padded (or padding-free) batches.
`generate_arithmetic(n)` is the built-in demo data set. This package imports nothing else from tokensft.
"""

from .arithmetic import generate_arithmetic, split_of
from .collator import IGNORE_INDEX, CompletionCollator, labels_from_attention
from .loading import DataFileError, load_records
from .presets import (
    DEFAULT_INSTRUCTION,
    PRESETS,
    MissingFieldError,
    Preset,
    detect_preset,
    gsm8k_to_boxed,
    prompt_messages,
    split_conversation,
    to_conversation,
)
from .tokenize import build_sft_dataset, encode_prompt, prompt_text, resolve_template, tokenize_conversation

__all__ = [
    "prompt_text",
    "DEFAULT_INSTRUCTION",
    "IGNORE_INDEX",
    "PRESETS",
    "CompletionCollator",
    "DataFileError",
    "MissingFieldError",
    "Preset",
    "build_sft_dataset",
    "detect_preset",
    "encode_prompt",
    "generate_arithmetic",
    "gsm8k_to_boxed",
    "labels_from_attention",
    "load_records",
    "prompt_messages",
    "resolve_template",
    "split_conversation",
    "split_of",
    "to_conversation",
    "tokenize_conversation",
]
