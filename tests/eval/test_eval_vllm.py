"""vLLM backend: a clear error without vLLM; a real run only with vLLM and a GPU."""

from __future__ import annotations

import importlib.util

import pytest

from tokensft.eval import VLLMBackend

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_missing_vllm_raises_clear_error():
    with pytest.raises(ImportError, match=r"tokensft\[vllm\]"):
        VLLMBackend("some/model", tokenizer=None, stop_token_ids=[2])


@pytest.mark.gpu
@pytest.mark.slow
def test_vllm_greedy_matches_contract(smol_tokenizer):
    torch = pytest.importorskip("torch")
    if not HAS_VLLM or not torch.cuda.is_available():
        pytest.skip("needs vLLM and a CUDA GPU")
    from tokensft.eval import build_prompt, stop_token_ids
    from tokensft.models import resolve_model

    backend = VLLMBackend(
        resolve_model("smollm2-135m-instruct"),
        smol_tokenizer,
        stop_token_ids(smol_tokenizer),
        gpu_memory_utilization=0.3,
    )
    prompts = [build_prompt("What is 2+3?", smol_tokenizer, "chat")] * 2
    out = backend.generate(prompts, max_new_tokens=64)
    assert len(out) == 2 and out[0][0].finish_reason in ("stop", "length")
    assert out[0][0].text == out[1][0].text
