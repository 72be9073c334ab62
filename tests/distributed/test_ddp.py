"""2-process CPU DDP (gloo, through `accelerate launch`) equals 1 process with the same global batch.

accelerate's `--cpu` flag alone starts a single process unless an MPI host file is given, so the two gloo
processes are launched with `accelerate launch --multi_gpu --num_processes 2` and the training arguments say
`use_cpu=True` (the DDP backend is then gloo on CPU).
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

SCRIPT = Path(__file__).with_name("ddp_train.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        logged = {k: [float(x) for x in meta[k].split(",")] for k in ("losses", "nlls", "medians")}
        return {k: f.get_tensor(k) for k in f.keys()}, logged


# sft on 2 ranks runs in CI through train() in tests/distributed/test_ranks.py; here under `-m scale`
@pytest.mark.parametrize("mode,scope", [pytest.param("sft", "micro_batch", marks=pytest.mark.scale),
                                        ("sft-antiop", "global")])
def test_two_process_ddp_equals_one_process(tmp_path, mode, scope):
    if shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists():
        pytest.skip("accelerate CLI not installed")
    accelerate = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, str(SCRIPT), str(one), "4", mode, scope], check=True, env=env, cwd=tmp_path,
                   capture_output=True)
    r = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(SCRIPT), str(two), "2", mode, scope],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    p1, l1 = _load(one)
    p2, l2 = _load(two)
    # the loss and the logged statistics (token sums / gathered tokens over both ranks) equal one process's
    for key in ("losses", "nlls", "medians"):
        assert len(l1[key]) == 2 and l2[key] == pytest.approx(l1[key], rel=1e-4), key
    for n in p1:
        torch.testing.assert_close(p2[n], p1[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
