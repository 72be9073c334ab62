"""Issue 32: `Trainer.train()` on 2 CPU gloo ranks, as 2 processes of one node or as 2 nodes of one rank each, and
under accelerate's own FSDP2 preparation, equals one process on the same global batches: every logged value
(loss, nll, weight statistics, entropy, KL, grad norm) and the final weights. The only differences allowed are float32
reduction orders: 1e-5 relative on logged values, 1e-4 absolute on the weights after AdamW (measured: at most 4e-7
relative, and 2e-6 absolute but 3.1e-5 on one near-zero-gradient LoRA element, `WEIGHT_ATOL`). Each run
is `train_ranks.py` (its docstring says how FSDP2 is enabled on CPU).

CI runs one case of each kind; `pytest -m scale tests/distributed/test_ranks.py` (`make test-scale`) runs the matrix.
Under ranks, the tracer (rank 0 writes each trace once) and per-token data weights run and are tested; --log_premise,
sft-align, and tracing under FSDP are refused before training (tested). The reference cache is a dataset column like
the data weights: sft-lr and rho1 from a cache on 2 ranks equal one process (`-m scale`).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tests.distributed.test_ddp import _free_port

SCRIPT = Path(__file__).with_name("train_ranks.py")
# AdamW divides each update by sqrt(v) + eps: an element whose gradient is near zero turns a reduction-order difference
# of 1e-7 into an update difference far larger (measured: 2e-6 on most runs, 3.1e-5 on one LoRA A element of rho1)
WEIGHT_ATOL = 1e-4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def _run_one(out: Path, args: list[str]) -> dict:
    subprocess.run([sys.executable, str(SCRIPT), str(out), *args, "--train"], check=True, env=ENV, cwd=out.parent,
                   capture_output=True, timeout=600)
    return json.loads((out / "report.json").read_text())


def _run_ranks(out: Path, args: list[str]) -> dict:
    r = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(SCRIPT), str(out),
                        *args, "--train"], env=ENV, cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def _node_env(rank: int, port: int) -> dict:
    """The environment a multi-node launcher (SLURM, MPI, or torchrun's agent on each node) gives the one process of
    node `rank`: global rank = node rank, local rank 0, one process per node, the rendezvous on node 0."""
    return {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
            "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": str(rank), "NODE_RANK": str(rank)}


def _start_nodes(out: Path, args: list[str]) -> list[subprocess.Popen]:
    """Two nodes of one rank each on 127.0.0.1. Started as a cluster launcher starts them (one process per node with
    its rank in the environment) rather than with two `torchrun --nnodes 2` agents: those agents' c10d exit barrier
    timed out after 300 s on a loaded box when one agent left first, although training had finished on both."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(SCRIPT), str(out), *args, "--train"], env=_node_env(rank, port),
                             cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank in (0, 1)]


def _run_nodes(out: Path, args: list[str]) -> dict:
    procs = _start_nodes(out, args)
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    return json.loads((out / "report.json").read_text())


def _weights(out: Path) -> dict:
    with safe_open(str(out / "final.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_training(one: Path, many: Path, a: dict, b: dict, steps: int) -> None:
    assert len(a["history"]) == len(b["history"]) == steps
    for h1, h2 in zip(a["history"], b["history"]):
        assert h1.keys() == h2.keys()
        for key in h1:
            assert h2[key] == pytest.approx(h1[key], rel=1e-5, abs=1e-7), (key, h1[key], h2[key])
    w1, w2 = _weights(one), _weights(many)
    assert w1.keys() == w2.keys()
    for n in w1:
        torch.testing.assert_close(w2[n], w1[n], rtol=0, atol=WEIGHT_ATOL, msg=lambda m, n=n: f"{n}: {m}")


CASES = [  # (id, how, args, in CI)
    # traced every 2 steps (rank 0 writes each trace once) and with per-token data weights: both run under ranks
    ("ddp-lora-sft-lr-adapter-traced-weighted", "ranks",
     ["sft-lr", "--peft", "--ga", "2", "--steps", "4", "--trace", "2", "--data_weights"], True),
    ("ddp-lora-sft-lr-adapter", "ranks", ["sft-lr", "--peft", "--ga", "2", "--steps", "4"], False),
    ("nodes-full-asft-model", "nodes", ["asft", "--ga", "2", "--steps", "4"], True),
    ("fsdp2-full-sft-lr-model", "fsdp2", ["sft-lr"], True),
    ("fsdp2-full-asft-model", "fsdp2", ["asft"], False),
    ("ddp-full-sft", "ranks", ["sft", "--ga", "2", "--steps", "4"], False),
    ("ddp-full-antiop-global", "ranks", ["sft-antiop", "--scope", "global", "--ga", "2", "--steps", "4"], False),
    ("ddp-lora-antiop-global", "ranks", ["sft-antiop", "--peft", "--scope", "global", "--ga", "2", "--steps", "4"],
     False),
    ("ddp-full-sft-lr-model", "ranks", ["sft-lr", "--ga", "2", "--steps", "4"], False),
    # rho1 and antiop keep a fraction of the tokens of their scope: equal to one process with stat_scope global only
    ("ddp-lora-rho1-adapter-global", "ranks", ["rho1", "--peft", "--scope", "global", "--ga", "2", "--steps", "4"],
     False),
    ("ddp-full-rho1-model-global", "ranks", ["rho1", "--scope", "global", "--ga", "2", "--steps", "4"], False),
    ("ddp-lora-asft-adapter", "ranks", ["asft", "--peft", "--ga", "2", "--steps", "4"], False),
    ("ddp-full-asft-model", "ranks", ["asft", "--ga", "2", "--steps", "4"], False),
    # the reference cache is a dataset column (per-token log-probs), sharded with the rows like the data weights
    ("ddp-full-sft-lr-cache", "ranks", ["sft-lr", "--ref_cache", "--ga", "2", "--steps", "4"], False),
    ("nodes-lora-rho1-cache-global", "nodes", ["rho1", "--peft", "--ref_cache", "--scope", "global", "--ga", "2",
                                                "--steps", "4"], False),
    ("nodes-lora-sft-lr-adapter", "nodes", ["sft-lr", "--peft", "--ga", "2", "--steps", "4"], False),
    ("nodes-full-antiop-global", "nodes", ["sft-antiop", "--scope", "global", "--ga", "2", "--steps", "4"], False),
    # DeepSpeed ZeRO-3 through its CPU accelerator over gloo (train_ranks.enable_deepspeed_on_cpu); skipped without
    # DeepSpeed, which the dev extra does not install (docs/scale.md)
    ("zero3-full-sft-lr-model", "zero3", ["sft-lr", "--ga", "2", "--steps", "4"], False),
    ("zero3-full-rho1-model-global", "zero3", ["rho1", "--scope", "global", "--ga", "2", "--steps", "4"], False),
    ("zero3-lora-sft-lr-adapter", "zero3", ["sft-lr", "--peft", "--ga", "2", "--steps", "4"], False),
    ("zero3-full-antiop-global", "zero3", ["sft-antiop", "--scope", "global", "--ga", "2", "--steps", "4"], False),
]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0], marks=() if c[3] else pytest.mark.scale) for c in CASES])
def test_ranks_and_nodes_train_exactly_like_one_process(tmp_path, case):
    _, how, args, _ = case
    if how == "zero3" and not HAS_DEEPSPEED:
        pytest.skip("needs DeepSpeed (pip install deepspeed; docs/scale.md)")
    steps = int(args[args.index("--steps") + 1]) if "--steps" in args else 2
    one, many = tmp_path / "one", tmp_path / "many"
    a = _run_one(one, args)
    if how == "zero3":
        b = _run_ranks(many, [*args, "--zero3"])
        # the reference partitioned like the policy (TRL's prepare_deepspeed): each rank holds half of each parameter
        assert b["distributed_type"] == "DistributedType.DEEPSPEED" and b["world_size"] == 2
        if args[0] in ("sft-lr", "rho1") and "--peft" not in args:  # a frozen model reference
            assert b["ref_all_zero3"] and b["ref_local_numel"] * 2 == pytest.approx(b["ref_full_numel"], rel=0.01)
    elif how == "fsdp2":
        b = _run_ranks(many, [*args, "--fsdp2"])
        # issue 32, item 1: the reference was a full copy on every rank (accelerate's prepare_model never shards)
        assert b["distributed_type"] == "DistributedType.FSDP" and b["is_fsdp2"] and b["policy_all_dtensor"]
        assert b["ref_all_dtensor"] and b["ref_local_numel"] * 2 == pytest.approx(b["ref_full_numel"], rel=0.01)
    else:
        b = (_run_ranks if how == "ranks" else _run_nodes)(many, args)
        assert b["distributed_type"] == "DistributedType.MULTI_CPU" and b["world_size"] == 2
    assert a["world_size"] == 1
    assert_same_training(one, many, a, b, steps)
    if "--ref_cache" in args:  # the cached log-probs are read (mean p ≈ 0.25), not a model's (p ≈ 0.016 here)
        assert a["history"][0]["ref/p_mean"] > 0.1
    if args[0] in ("asft", "sft+kl"):
        assert a["history"][-1]["kl"] > 0  # the reference is used (reference = policy would give KL 0 at step 1)
    if "--trace" in args:
        assert a["trace_steps"] == b["trace_steps"] == [2, 4]  # once each, by rank 0, without changing the run


REFUSALS = [  # (train_ranks.py arguments, the one line the CLI prints)
    (["sft", "--log_premise"], "--log_premise runs in one process"),
    (["sft-align"], "--mode sft-align needs each token's gradient alignment, computed in one process"),
    (["sft", "--fsdp2", "--trace", "1"], "--trace_every_n_steps: tracing needs whole parameters on rank 0"),
    # KL and top-K entropy come only from the chunked head, which reads the LM head's weight outside its forward
    (["asft", "--zero3"], "--mode asft needs the chunked LM head, which reads the LM head's weight outside"),
]


@pytest.mark.parametrize(("args", "message"), REFUSALS)
def test_the_refusals_under_ranks_from_the_trainer_state(args, message):
    """The three refusals of `_refuse_under_ranks`, from the state a 2-rank trainer has (accelerate's process count,
    FSDP on or off), in this process; the real 2-rank launches below run them end to end (one in CI, all under
    `-m scale`). One process, DDP with tracing, or a scheme without alignment, is let through."""
    from types import SimpleNamespace

    from tokensft.io import InputError
    from tokensft.losses.schemes import get_scheme
    from tokensft.trainer.trainer import TokenSFTTrainer

    cfg = SimpleNamespace(log_premise="--log_premise" in args, mode=args[0], loss_head="auto",
                          trace_every_n_steps=int(args[args.index("--trace") + 1]) if "--trace" in args else 0)
    scheme = get_scheme(args[0])

    def state(ranks: int, fsdp: bool, zero3: bool = False):
        return SimpleNamespace(accelerator=SimpleNamespace(num_processes=ranks), scheme=scheme,
                               scheme_params={p.name: p.default for p in scheme.params},
                               is_fsdp_enabled=fsdp, _zero3=zero3)

    with pytest.raises(InputError, match=re.escape(message)):
        TokenSFTTrainer._refuse_under_ranks(state(2, "--fsdp2" in args, "--zero3" in args), cfg)
    TokenSFTTrainer._refuse_under_ranks(state(1, False), cfg)  # one process: everything runs
    if "--fsdp2" in args or "--zero3" in args:
        TokenSFTTrainer._refuse_under_ranks(state(2, False), cfg)  # DDP: the tracer and the chunked head run


@pytest.mark.parametrize(("args", "message"), [
    pytest.param(*REFUSALS[0], marks=pytest.mark.scale), pytest.param(*REFUSALS[1], marks=pytest.mark.scale),
    REFUSALS[2]])
def test_what_cannot_run_on_several_ranks_is_refused_before_training(tmp_path, args, message):
    """Issue 32, item 4: the per-token alignment of --log_premise and sft-align is one process's micro-batch gradient,
    and tracing needs whole parameters: refused at trainer construction on 2 ranks (the CLI prints the one line)."""
    r = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(SCRIPT),
                        str(tmp_path / "out"), *args, "--train"], env=ENV, cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out" / "run" / "checkpoint-1").exists()


@pytest.mark.parametrize("how", ["ranks", pytest.param("nodes", marks=pytest.mark.scale),
                                 pytest.param("fsdp2", marks=pytest.mark.scale)])
def test_a_killed_rank_ends_the_job_and_the_resume_trains_exactly_like_an_uninterrupted_run(tmp_path, how):
    """Issue 32, item 3: `kill -9` of rank 1 after step 3 of 6 (checkpoints every 2 steps): the whole job exits
    non-zero within 60 s with no process left; resuming from the newest complete checkpoint (step 2) logs steps 3-6
    and ends with the weights of a run that was never interrupted. Under FSDP2 (full fine-tuning, a frozen model
    reference) the checkpoints are sharded (`pytorch_model_fsdp_0/*.distcp`, `SHARDED_STATE_DICT`), and the final save
    is one loadable Hugging Face directory all the same (transformers alone would write no weights there)."""
    import time

    args = ["sft-lr", "--peft", "--ga", "2", "--steps", "6", "--save_steps", "2"]
    if how == "fsdp2":
        args = ["sft-lr", "--fsdp2", "--ga", "2", "--steps", "6", "--save_steps", "2", "--save_final"]
    whole = tmp_path / "whole"
    full = _run_ranks(whole, args)
    job = tmp_path / "job"
    if how in ("ranks", "fsdp2"):
        r = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(SCRIPT),
                            str(job), *args, "--train", "--kill_rank", "1", "--kill_step", "3"], env=ENV,
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
        codes = [r.returncode]
    else:
        procs = _start_nodes(job, [*args, "--kill_rank", "1", "--kill_step", "3"])
        codes = [p.communicate(timeout=300) and p.returncode for p in procs]
    ended = time.time()
    assert (job / "killed-rank1").exists() and all(c != 0 for c in codes), codes
    assert ended - (job / "killed-rank1").stat().st_mtime < 60  # the job is over within 60 s of the kill
    left = subprocess.run(["pgrep", "-f", str(job)], capture_output=True, text=True).stdout.split()
    assert left == [], left  # no rank left hanging
    if how == "fsdp2":
        assert sorted(p.name for p in (job / "run" / "checkpoint-2" / "pytorch_model_fsdp_0").iterdir()) \
            == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    resumed = (_run_nodes if how == "nodes" else _run_ranks)(job, [*args, "--resume"])
    assert resumed["resumed_from"] == "checkpoint-2"
    after = [h for h in full["history"] if h["step"] > 2]
    new = [h for h in resumed["history"] if h["step"] > 2]  # steps 1-2 come back with checkpoint-2's state
    assert [h["step"] for h in new] == [3, 4, 5, 6]
    for h1, h2 in zip(after, new):
        for key in h1:
            if key != "epoch":
                assert h2[key] == pytest.approx(h1[key], rel=1e-5, abs=1e-7), (key, h1[key], h2[key])
    w1, w2 = _weights(whole), _weights(job)
    for n in w1:
        torch.testing.assert_close(w2[n], w1[n], rtol=0, atol=WEIGHT_ATOL, msg=lambda m, n=n: f"{n}: {m}")
    if how == "fsdp2":  # the final save: a plain directory that from_pretrained loads, with the trained weights
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(job / "final").state_dict()
        for n, w in w2.items():
            torch.testing.assert_close(loaded[n].float(), w, rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")
