"""`tokensft eval` and `tokensft eval compare`: argument parsing, the comparison table, a tiny end-to-end run."""

from __future__ import annotations

import argparse
import json

import pytest

from tokensft.cli import eval as eval_cli


def _parse(argv):
    root = argparse.ArgumentParser(prog="tokensft")
    eval_cli.add_parser(root.add_subparsers(dest="command"))
    return root.parse_args(argv)


def test_both_forms_parse():
    args = _parse(["eval", "--model", "m", "--limit", "3", "--backend", "vllm", "--n", "4", "--temperature", "0.6"])
    assert args.eval_command is None and args.model == "m" and args.limit == 3 and args.n == 4
    assert args.benchmark == "math500" and args.max_new_tokens == 512 and args.batch_size == 64
    assert args.func is eval_cli.main
    args = _parse(["eval", "compare", "r1", "r2", "--baseline", "r0", "--names", "A", "B", "--out", "d"])
    assert args.eval_command == "compare" and args.runs == ["r1", "r2"] and args.baseline == "r0"
    assert args.names == ["A", "B"] and args.out == "d"


def test_help_explains_flags(capsys):
    with pytest.raises(SystemExit):
        _parse(["eval", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--model",
        "--adapter",
        "--benchmark",
        "--data",
        "--limit",
        "--output_dir",
        "--batch_size",
        "--max_new_tokens",
        "--backend",
        "--temperature",
        "--top_p",
        "--n",
        "--seed",
        "--prompt_template",
        "--dtype",
        "compare",
    ):
        assert flag in text


def _fake_run(path, acc, benchmark="math500", n=500, **extra):
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"accuracy": acc, "benchmark": benchmark, "num_problems": n,
                                                   **extra}))
    return str(path)


def test_compare_table(tmp_path, capsys):
    base = _fake_run(tmp_path / "base", 0.30, truncation_rate=0.56)
    sft = _fake_run(tmp_path / "sft", 0.352, accuracy_ci95=[0.311, 0.396], truncation_rate=0.1)
    dft = _fake_run(tmp_path / "dft", 0.418)  # no interval, no truncation recorded
    out = tmp_path / "cmp"
    assert eval_cli.main(["compare", sft, dft, "--baseline", base, "--names", "SFT", "DFT", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "| Method | MATH-500 Acc (%) | 95% CI | n | Δ vs baseline | Truncated (%) |"
    # Wilson interval of 150/500 recomputed where metrics.json has none: 26.1–34.2
    assert "| base | 30.0 | 26.1–34.2 | 500 | — | 56 |" in printed
    assert "| SFT | 35.2 | 31.1–39.6 | 500 | +5.2 | 10 |" in printed
    assert "| DFT | 41.8 | 37.6–46.2 | 500 | +11.8 |  |" in printed
    assert (out / "comparison.md").read_text() == printed
    csv_lines = (out / "comparison.csv").read_text().splitlines()
    assert csv_lines[0].startswith("Method,MATH-500 Acc (%),ci95_low,ci95_high,n,Δ vs baseline") and len(csv_lines) == 4


def test_compare_writes_nothing_without_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = _fake_run(tmp_path / "base", 0.30)
    run = _fake_run(tmp_path / "run", 0.40)
    assert eval_cli.main(["compare", run, "--baseline", base]) == 0
    assert "| run | 40.0 |" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "run"]


def test_compare_uses_benchmark_name_and_rejects_mixed(tmp_path, capsys):
    base = _fake_run(tmp_path / "b", 0.5, benchmark="gsm8k")
    run = _fake_run(tmp_path / "r", 0.25, benchmark="gsm8k")
    eval_cli.main(["compare", run, "--baseline", base, "--out", str(tmp_path)])
    assert "| Method | GSM8K Acc (%) | 95% CI |" in capsys.readouterr().out
    other = _fake_run(tmp_path / "m", 0.1)
    assert eval_cli.main(["compare", other, "--baseline", base, "--out", str(tmp_path)]) == 2  # one line, exit 2
    assert "gsm8k" in capsys.readouterr().err


def test_eval_without_model_is_an_error(capsys):
    assert eval_cli.main([]) == 2
    assert "--model is required" in capsys.readouterr().err


def test_cli_end_to_end_from_a_saved_checkpoint(smol_tokenizer, tiny_llama, math500_path, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    tiny_llama.save_pretrained(ckpt)
    smol_tokenizer.save_pretrained(ckpt)
    out = tmp_path / "run"
    argv = [
        "--model",
        str(ckpt),
        "--data",
        str(math500_path),
        "--limit",
        "2",
        "--max_new_tokens",
        "4",
        "--batch_size",
        "2",
        "--output_dir",
        str(out),
        "--device",
        "cpu",
        "--no_progress",
    ]
    assert eval_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "truncated" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_problems"] == 2 and metrics["model"] == str(ckpt) and metrics["dtype"] == "float32"
    assert len((out / "generations.jsonl").read_text().splitlines()) == 2


def test_nll_cli_matches_the_models_own_loss(smol_tokenizer, tiny_llama_factory, math500_path, tmp_path, capsys):
    """`eval nll` = Σ of HF's own mean label loss × tokens per row, and the paired Δ of a model with itself is 0."""
    import torch

    from tokensft.data import build_sft_dataset, load_records

    ckpt = tmp_path / "ckpt"
    model = tiny_llama_factory(seed=4)
    model.save_pretrained(ckpt)
    smol_tokenizer.save_pretrained(ckpt)
    base = ["nll", "--model", str(ckpt), "--data", str(math500_path), "--limit", "3", "--max_length", "200",
            "--batch_size", "2", "--device", "cpu", "--no_progress"]
    assert eval_cli.main([*base, "--output_dir", str(tmp_path / "a")]) == 0
    assert eval_cli.main([*base, "--output_dir", str(tmp_path / "b"), "--baseline", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "Δ vs baseline  +0.0000" in printed
    got = json.loads((tmp_path / "a" / "heldout_nll.json").read_text())
    ds = build_sft_dataset(load_records(str(math500_path), limit=3), smol_tokenizer, max_length=200)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row, (s, n) in zip(ds, got["per_sequence"]):
            labels = torch.tensor([row["labels"]])
            k = int((labels[:, 1:] != -100).sum())
            ref = float(model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss) * k
            assert n == k and s == pytest.approx(ref, rel=1e-4)
            total, tokens = total + ref, tokens + k
    assert got["num_sequences"] == 3 and got["nll_per_token"] == pytest.approx(total / tokens, rel=1e-4)
