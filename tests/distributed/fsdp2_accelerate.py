"""`TokenSFTTrainer` built and trained under accelerate's own FSDP2 preparation on 2 CPU gloo ranks.

    torchrun --nproc_per_node 2 fsdp2_accelerate.py OUT_DIR MODE [train]   # FSDP2, half the global batch each
    python fsdp2_accelerate.py OUT_DIR MODE [train]                        # one process, the whole global batch

accelerate enables FSDP only for GPU-like distributed types: on CPU, `AcceleratorState` sees `MULTI_CPU` and drops
the FSDP plugin without a word. `enable_fsdp_on_cpu` below is the one change made to accelerate: after its state is
built, a `MULTI_CPU` state whose environment asks for FSDP (`ACCELERATE_USE_FSDP=true`, which transformers'
`TrainingArguments(fsdp=...)` sets) is switched to `DistributedType.FSDP` with the plugin accelerate would have kept.
From there everything is accelerate's, transformers' and tokensft's own code: `Trainer` sees FSDP enabled,
`accelerator.prepare` runs `fsdp2_prepare_model` on the policy (each decoder layer, then the root, on a gloo CPU
mesh), and `prepare_reference_model` shards the frozen reference with TRL's `prepare_fsdp`.

Rank 0 writes OUT_DIR/report.json: whether every reference parameter is a `DTensor` shard, its local and full
element counts, and with `train` the logged history and the final loss of a short `train()`.
What this proves and what it does not: docs/reference_model.md, "The scale path on a CPU".
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def enable_fsdp_on_cpu() -> None:
    """Let accelerate's FSDP code path run on CPU ranks (see the module docstring); nothing else is patched."""
    import accelerate.state as state
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    original = state.AcceleratorState.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if (self.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP)
                and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
            # the state is shared: an early PartialState-only init, then the Accelerator's with its plugin
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = (kwargs.get("fsdp_plugin") or getattr(self, "fsdp_plugin", None)
                                or FullyShardedDataParallelPlugin())

    state.AcceleratorState.__init__ = __init__


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    train = len(sys.argv) > 3 and sys.argv[3] == "train"
    enable_fsdp_on_cpu()
    import torch
    from datasets import Dataset
    from tests.conftest import tiny_model, tiny_rows, tiny_tokenizer
    from tests.distributed.fsdp2_step import GLOBAL_BATCH, LR_WEIGHT_ALPHA, ROWS_SEED, reference_model
    from torch.distributed.tensor import DTensor

    from tokensft.data import CompletionCollator
    from tokensft.trainer.config import TokenSFTConfig
    from tokensft.trainer.trainer import TokenSFTTrainer

    torch.manual_seed(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tok = tiny_tokenizer()
    kw = {"lr_weight_alpha": LR_WEIGHT_ALPHA} if mode == "sft-lr" else {}
    cfg = TokenSFTConfig(
        output_dir=str(out / "run"), mode=mode, ref_source="model", per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=2, learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
        save_strategy="no", seed=0, dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
        max_length=None, disable_tqdm=True, gradient_checkpointing=False, **kw,
        **({"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2,
                                                  "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
           if world > 1 else {}))
    trainer = TokenSFTTrainer(model=tiny_model(0), args=cfg, train_dataset=Dataset.from_list(
        tiny_rows(GLOBAL_BATCH * 2, seed=ROWS_SEED)), processing_class=tok, data_collator=CompletionCollator(0),
        ref_model=reference_model())
    ref = trainer.ref_model
    params = list(ref.parameters())
    report = {
        "world_size": world,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp_enabled": bool(trainer.is_fsdp_enabled),
        "is_fsdp2": bool(trainer.accelerator.is_fsdp2),
        "ref_all_dtensor": all(isinstance(p, DTensor) for p in params),
        "ref_local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
        "ref_full_numel": sum(p.numel() for p in params),
    }
    if train:
        trainer.train()
        report["history"] = [{k: v for k, v in h.items() if isinstance(v, (int, float))}
                             for h in trainer.state.log_history if "loss" in h]
        report["policy_all_dtensor"] = all(isinstance(p, DTensor) for p in trainer.model.parameters())
        state = trainer.accelerator.get_state_dict(trainer.model)  # full tensors, gathered on rank 0
        if int(os.environ.get("RANK", "0")) == 0:
            from safetensors.torch import save_file

            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(out / "final.safetensors"))
    if int(os.environ.get("RANK", "0")) == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
