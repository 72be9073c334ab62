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


@pytest.mark.parametrize("argv,message", [
    (["--mode", "sft-topk", "--topk_keep_ratio", "1.5"], r"--topk_keep_ratio must be in \(0, 1\], got 1.5"),
    (["--mode", "sft-antiop", "--antiop_clip_mult", "-1"], r"--antiop_clip_mult must be > 0, got -1"),
    (["--mode", "asft", "--kl_weight", "-0.1"], r"--kl_weight must be >= 0, got -0.1"),
    (["--antiop_clip_mult", "0"], r"--antiop_clip_mult must be > 0"),  # a flag of another mode is checked too
    (["--loss_type", "dft", "--mode", "sft"], r"--loss_type dft is not supported: .*--mode dft"),
    (["--use_liger_kernel", "true"], r"--use_liger_kernel True is not supported"),
    (["--packing", "true"], r"--packing True is not supported"),
    (["--scheme_args", "topk_keep_ratio=0.5"], r"has its own flag; use --topk_keep_ratio 0.5"),
    (["--scheme_args", "nope"], r"'nope' is not key=value"),
    (["--scheme_files", "/no/such/file.py"], r"/no/such/file.py: not a Python file"),
])
def test_bad_loss_options_fail_at_parse_time_naming_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(argv)


def test_cli_reports_a_bad_option_in_one_line_with_exit_code_2(tmp_path, capsys):
    from tokensft.cli.train import main

    out = tmp_path / "run"
    assert main(["--mode", "sft-topk", "--topk_keep_ratio", "1.5", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tokensft train: error: --topk_keep_ratio must be in (0, 1], got 1.5"]
    assert not out.exists()  # nothing loaded, nothing written


def test_every_declared_parameter_is_a_flag_with_its_declared_default_and_range_in_help():
    import dataclasses

    from tokensft.cli.train import modes_epilog
    from tokensft.losses import all_params
    from tokensft.trainer.config import TokenSFTConfig

    fields = {f.name: f for f in dataclasses.fields(TokenSFTConfig)}
    epilog = modes_epilog()
    for name, p in all_params().items():
        assert fields[name].default == p.default
        assert p.range_text() in fields[name].metadata["help"]
        assert f"--{name} {p.default}" in epilog
    for mode in available_modes():
        assert f"  {mode} " in epilog


def test_every_builtin_mode_has_a_doc_page_naming_its_parameters_and_defaults():
    from tokensft.losses import get_scheme

    docs = Path(__file__).resolve().parents[2] / "docs" / "modes"
    index = (docs / "README.md").read_text()
    for mode in ("sft", "dft", "sft+kl", "asft", "sft-topk", "sft-antiop", "sft-lr", "sft-pk", "rho1", "eaft",
                 "sft-align"):
        page = (docs / f"{mode.replace('+', '-')}.md").read_text()
        assert f"| `{mode}` |" in index
        for p in get_scheme(mode).params:
            assert p.name in page and str(p.default) in page, (mode, p.name)
