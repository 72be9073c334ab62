"""Fixtures of the tracer tests: tiny LoRA / full models (fp32 or fp64, eager attention) and a sequence."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_model


def lora_model(seed: int = 0, *, dtype=torch.float32, attn: str = "eager", r: int = 4, targets=("q_proj", "v_proj")):
    """Tiny Llama + LoRA on `targets`, lora_B randomised (PEFT initialises it to 0, which makes B-side dy x trivial)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model(seed, attn=attn).to(dtype)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.1))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return pm.eval()


def sequence(T: int = 19, prompt: int = 6, seed: int = 0, vocab: int = 64):
    """`input_ids`, `labels` `(T,)`: random tokens, the first `prompt` labels -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (T,), generator=g)
    labels = ids.clone()
    labels[:prompt] = -100
    return ids, labels


@pytest.fixture
def peft_model():
    return lora_model(0)


@pytest.fixture
def full_model():
    return tiny_model(0, attn="eager").eval()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are dominated by OpenMP synchronisation on a busy machine (100x slower with 2 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
