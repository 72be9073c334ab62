"""Every shipped recipe in configs/ parses into the train dataclasses, and overrides beat the YAML."""

from pathlib import Path

import pytest

from tokensft.cli.train import parse
from tokensft.losses import available_modes

ROOT = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if "accelerate" not in p.parts)
ACCELERATE = sorted((ROOT / "accelerate").glob("*.yaml"))


def test_every_reference_mode_has_a_recipe():
    names = {p.stem for p in CONFIGS}
    for mode in ("sft", "dft", "asft", "sft-topk", "sft-antiop", "sft-lr"):
        assert f"qwen2.5-7b-lora-{mode}" in names


@pytest.mark.parametrize("path", ACCELERATE, ids=[p.stem for p in ACCELERATE])
def test_accelerate_configs_are_valid(path):
    import yaml
    from accelerate.utils import DistributedType

    cfg = yaml.safe_load(path.read_text())
    assert DistributedType(cfg["distributed_type"])
    assert cfg["num_processes"] >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses(path):
    import torch
    import yaml

    gpu_recipe = bool(yaml.safe_load(path.read_text()).get("bf16"))
    extra = ["--bf16", "false"] if gpu_recipe and not torch.cuda.is_available() else []  # bf16 needs a GPU
    cfg, model_args, data_args = parse(["--config", str(path), *extra])
    assert cfg.mode in available_modes()
    assert model_args.model
    assert data_args.dataset


def test_command_line_overrides_yaml(tmp_path):
    path = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    cfg, model_args, _ = parse(["--config", str(path), "--mode", "sft-topk", "--lora_r", "8", "--antiop_clip_mult", "2"])
    assert (cfg.mode, model_args.lora_r, cfg.antiop_clip_mult) == ("sft-topk", 8, 2.0)
    assert cfg.topk_keep_ratio == 0.7 and cfg.lr_weight_alpha == 1.0 and cfg.kl_weight == 0.05  # issue defaults


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="known|choose one of"):
        parse(["--mode", "sft-nope"])
