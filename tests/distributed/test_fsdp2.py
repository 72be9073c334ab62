"""FSDP2 on CPU (gloo, 2 processes through `accelerate launch`): `sft-lr` and `asft` with the frozen reference
(`ref_source=model`) sharded like the policy give the same loss, logged token statistics and full gradients of one
`compute_loss` + backward (no optimizer step) as one process on the same global batch. The reference is the
starting model plus seeded noise, so both runs must really use it: sft-lr's weights move off 1, asft's KL is clearly
positive, and the one-process loss equals the functional loss with that reference, not the one with reference =
policy.

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
from tests.conftest import tiny_model, tiny_rows
from tests.distributed.fsdp2_step import GLOBAL_BATCH, LR_WEIGHT_ALPHA, ROWS_SEED, reference_model
from tests.distributed.test_ddp import _free_port

from tokensft.data import CompletionCollator
from tokensft.losses import weighted_lm_loss

SCRIPT = Path(__file__).with_name("fsdp2_step.py")


def _load(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _functional_losses(mode: str) -> tuple[float, float]:
    """`weighted_lm_loss` of the script's global batch from full logits: with its reference, and with reference =
    policy (what a trainer that lost the reference, or the KL, would compute)."""
    batch = CompletionCollator(0)(tiny_rows(GLOBAL_BATCH, seed=ROWS_SEED))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        logits = tiny_model(0)(**inputs).logits
        ref_logits = reference_model()(**inputs).logits
    kw = {"lr_weight_alpha": LR_WEIGHT_ALPHA} if mode == "sft-lr" else {}
    return tuple(float(weighted_lm_loss(logits, batch["labels"], mode=mode, ref_logits=r, **kw).loss)
                 for r in (ref_logits, logits))


# one reference mode in CI (the FSDP2 train() of test_ranks.py adds another); asft under `-m scale`
@pytest.mark.parametrize("mode", ["sft-lr", pytest.param("asft", marks=pytest.mark.scale)])
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
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    g1, m1 = _load(one)
    g2, m2 = _load(two)
    assert m1["world"] == "1" and m2["world"] == "2"
    assert m2["policy_sharded"] == "True" and m2["ref_sharded"] == "True"  # DTensor shards, both models
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
    for key in ("weight/mean", "weight/frac_reduced", "weight/max_abs_dev", "kl"):
        assert (key in m1) == (key in m2), key
        if key in m1:
            assert float(m2[key]) == pytest.approx(float(m1[key]), rel=1e-5, abs=1e-7), key
    # the reference is not the policy: the weights / the KL are not those of reference = policy
    if mode == "sft-lr":
        assert float(m1["weight/max_abs_dev"]) > 0.1 and float(m1["weight/frac_reduced"]) > 0.3, m1
    else:
        assert float(m1["kl"]) > 0.1, m1
    expected, with_policy_as_ref = _functional_losses(mode)
    assert float(m1["loss"]) == pytest.approx(expected, rel=1e-5)
    assert abs(expected - with_policy_as_ref) > 0.01 * abs(with_policy_as_ref)
    assert g1.keys() == g2.keys()
    for n in g1:
        assert g1[n].abs().sum() > 0, n  # every parameter receives a gradient
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
