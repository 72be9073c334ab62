"""`TokenSFTTrainer.compute_loss` and its backward on one global batch, with the policy and its frozen reference
sharded by FSDP2 on 2 ranks, or unsharded in one process; no optimizer step.

    python fsdp2_step.py OUT.safetensors MODE                      # 1 process, the whole global batch
    accelerate launch --multi_gpu --num_processes 2 fsdp2_step.py OUT.safetensors MODE   # 2 ranks, half each

accelerate does not apply FSDP on CPU: with `--use_fsdp` and `use_cpu=True` its state is `MULTI_CPU` and the FSDP
plugin is dropped without a word (`AcceleratorState` enables FSDP only for GPU-like distributed types), so
`Trainer.train()` cannot be run sharded here. What can run is torch's own FSDP2 on a gloo CPU mesh: under 2 ranks
this script builds the trainer (reference = `reference_model()`, the starting model with seeded noise added, so that
sft-lr's weights are not all 1 and asft's KL is not 0; `ref_source=model`, prepared by accelerate as in training),
then `fully_shard`s the decoder layers and the root of both the policy and the reference — the layout accelerate's
FSDP2 plugin gives them on GPUs, parameters as `DTensor` shards — and runs the training loss path (`compute_loss`,
exact `num_items_in_batch` over both ranks) on its half of the global batch and its backward. Rank 0 writes the full
(all-gathered) gradients, and in the metadata the loss, the logged token statistics (`TokenSFTTrainer.log`, reduced
over both ranks: `weight/mean`, `weight/frac_reduced`, `kl` for KL modes) and the largest |w_t - 1| over the valid
tokens of all ranks. One process computes the same on the whole batch, unsharded.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tests.conftest import tiny_model, tiny_rows, tiny_tokenizer  # noqa: E402

from tokensft.data import CompletionCollator  # noqa: E402
from tokensft.trainer.config import TokenSFTConfig  # noqa: E402
from tokensft.trainer.trainer import TokenSFTTrainer  # noqa: E402

GLOBAL_BATCH = 4
ROWS_SEED = 11
REF_NOISE = 0.1  # std of the noise added to every reference parameter
LR_WEIGHT_ALPHA = 10.0  # p ~ 1/64 on the tiny model: alpha 1 would leave sft-lr's weights within 0.02 of 1


def reference_model() -> torch.nn.Module:
    """The policy's starting model (`tiny_model(0)`) plus seeded Gaussian noise: the same reference on every rank and
    in every run, and one that differs from the policy."""
    ref = tiny_model(0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(REF_NOISE * torch.randn(p.shape, generator=g))
    return ref


def shard(model: torch.nn.Module, mesh) -> None:
    """FSDP2 as accelerate wraps a transformers model: each decoder layer, then the root (embeddings, norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def main(out: str, mode: str) -> None:
    tok = tiny_tokenizer()
    cfg = TokenSFTConfig(
        output_dir=str(Path(out).parent / "trainer"), per_device_train_batch_size=2, report_to="none", use_cpu=True, bf16=False,
        save_strategy="no", seed=0, mode=mode, ref_source="model", dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False, max_length=None, disable_tqdm=True, gradient_checkpointing=False,
        lr_weight_alpha=LR_WEIGHT_ALPHA,
    )
    rows = tiny_rows(GLOBAL_BATCH, seed=ROWS_SEED)
    tr = TokenSFTTrainer(model=tiny_model(0), args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         data_collator=CompletionCollator(tok.pad_token_id), ref_model=reference_model())
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    sharded = world > 1
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        shard(tr.model, mesh)
        shard(tr.ref_model, mesh)
    # before the step: after a forward FSDP2 keeps the root's parameters unsharded until the backward, which a
    # frozen reference never runs
    policy_is_dtensor = [type(p).__name__ == "DTensor" for p in tr.model.parameters()]
    ref_is_dtensor = [type(p).__name__ == "DTensor" for p in tr.ref_model.parameters()]
    collate = CompletionCollator(tok.pad_token_id)
    full = collate(rows)
    n_items = int((full["labels"][:, 1:] != -100).sum())  # the valid targets of the whole step, all ranks
    per_rank = GLOBAL_BATCH // world
    inputs = collate(rows[rank * per_rank:(rank + 1) * per_rank])
    tr.model.train()
    loss, outputs = tr.compute_loss(tr.model, inputs, num_items_in_batch=torch.tensor(n_items), return_outputs=True)
    loss.backward()
    total = loss.detach() / world  # compute_loss scales by the world size, which the gradient average undoes
    mask = inputs["labels"][:, 1:] != -100
    max_dev = (outputs["weights"].detach()[mask] - 1).abs().max()
    if sharded:
        dist.all_reduce(total)
        dist.all_reduce(max_dev, op=dist.ReduceOp.MAX)
    tr.log({})  # the token statistics of this micro-batch, reduced over all ranks (a collective)
    logged = tr.state.log_history[-1]
    grads = {}
    for name, p in tr.model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = g.detach().contiguous()
    if rank == 0:
        stats = {k: repr(float(logged[k])) for k in ("weight/mean", "weight/frac_reduced", "kl") if k in logged}
        save_file(grads, out, metadata={"loss": repr(float(total)), "policy_sharded": str(all(policy_is_dtensor)),
                                        "ref_sharded": str(all(ref_is_dtensor)), "world": str(world),
                                        "weight/max_abs_dev": repr(float(max_dev)), **stats})
    if sharded:
        # every rank waits until rank 0 has written its outputs, then leaves without tearing gloo down: at exit its
        # threads aborted the interpreter now and then ("terminate called"), and destroy_process_group once hung
        # rank 0 after the other rank had gone (CI, 2026-12-03); nothing is left to flush but the streams
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
