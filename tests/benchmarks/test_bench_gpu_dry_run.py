"""`benchmarks/bench_gpu.py --dry-run` (CPU, tiny Qwen2-shaped model) so the GPU benchmark cannot rot unseen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_dry_run_times_every_mode_and_matches_trl(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1",
                                                                             **__import__("os").environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    (model,) = res["models"]
    v = model["variants"]
    modes = res["config"]["modes"].split(",")
    assert set(v) == {*modes, "trl"} | ({"trl+liger"} if res["config"]["liger"] else set())
    assert not [k for k, x in v.items() if "error" in x], v
    assert all(x["median_step_s"] > 0 for x in v.values())
    # the same batch, the same weights: tokensft's sft objective is TRL's nll, and antiop/lr/rho1 at their
    # defaults leave a random model's first step unchanged (no token above the cap, p_ref = p, keep ratio)
    assert v["sft"]["loss"] == pytest.approx(v["trl"]["loss"], rel=1e-5)
    assert v["sft-lr"]["loss"] == pytest.approx(v["sft"]["loss"], rel=1e-5)  # p_ref = p_θ: every weight is 1
    assert model["ratio_to_trl"]["trl"] == 1.0
