"""FSDP2 on CPU (gloo, 2 processes through `accelerate launch`): `sft-lr` and `asft` with the frozen reference
(`ref_source=model`) sharded like the policy give the same loss and the same full gradients as one process on the
same global batch.

accelerate applies FSDP only on GPU-like devices (on CPU `--use_fsdp` is dropped and the state is `MULTI_CPU`), so
the two ranks shard the policy and the reference with torch's `fully_shard` on a CPU mesh, in the layout accelerate's
FSDP2 plugin uses (each decoder layer, then the root), and run the training loss path `compute_loss`
(`fsdp2_step.py`). What this leaves untested on CPU: accelerate's own FSDP2 preparation and `Trainer.train()`'s
sharded optimizer step.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tests.distributed.test_ddp import _free_port

SCRIPT = Path(__file__).with_name("fsdp2_step.py")


def _load(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("mode", ["sft-lr", "asft"])
def test_fsdp2_sharded_reference_equals_one_process(tmp_path, mode):
    if shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists():
        pytest.skip("accelerate CLI not installed")
    accelerate = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, str(SCRIPT), str(one), mode], check=True, env=env, cwd=tmp_path,
                   capture_output=True)
    r = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(SCRIPT), str(two), mode],
        env=env, cwd=tmp_path, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    g1, m1 = _load(one)
    g2, m2 = _load(two)
    assert m1["world"] == "1" and m2["world"] == "2"
    assert m2["policy_sharded"] == "True" and m2["ref_sharded"] == "True"  # DTensor shards, both models
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
    assert g1.keys() == g2.keys()
    for n in g1:
        assert g1[n].abs().sum() > 0, n  # every parameter receives a gradient
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
