"""`TokenSFTTrainer.train()` on CPU gloo ranks (DDP or accelerate's own FSDP2 preparation), or in one process, on the
same global batches; rank 0 writes what to compare.

    python train_ranks.py OUT_DIR MODE [--train] [--fsdp2] [--peft] [--ga 2] [--steps 4] [--scope global]
    torchrun --nproc_per_node 2 train_ranks.py OUT_DIR MODE ...                 # 2 ranks, half the batch each
    MASTER_ADDR=127.0.0.1 MASTER_PORT=P WORLD_SIZE=2 RANK=i LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 GROUP_RANK=i \
        python train_ranks.py OUT_DIR MODE ...        # node i of 2 nodes of 1 rank each (as a cluster launcher starts it)

Full fine-tuning uses a frozen model reference (`ref_source=model`, the starting model plus seeded noise, so the
reference really differs from the policy); `--peft` trains a LoRA adapter against the adapter-off reference. The global
batch per optimizer step is 4 sequences x `--ga` micro-batches, distinct rows every step.

FSDP2 on CPU:
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


def enable_deepspeed_on_cpu() -> None:
    """Configure accelerate's process state for DeepSpeed over gloo before the trainer does: accelerate takes its
    DeepSpeed path only with a torch accelerator (CUDA, XPU, ...) and on a CPU-only box falls back to one process
    (`DistributedType.NO`); with `ACCELERATE_USE_DEEPSPEED` and an explicit gloo backend it initialises DeepSpeed's
    own communication (its CPU accelerator, `DS_ACCELERATOR=cpu`) as it would NCCL on GPUs. The trainer then uses this
    state (`accelerator_config={"use_configured_state": True}`)."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("mode")
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--fsdp2", action="store_true")
    ap.add_argument("--zero3", action="store_true", help="DeepSpeed ZeRO-3 (its CPU accelerator, gloo)")
    ap.add_argument("--save_final", action="store_true", help="also save the model as the CLI does, to OUT/final")
    ap.add_argument("--peft", action="store_true")
    ap.add_argument("--ga", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--scope", default="micro_batch")
    ap.add_argument("--save_steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    ap.add_argument("--kill_rank", type=int, default=None, help="this rank SIGKILLs itself ...")
    ap.add_argument("--kill_step", type=int, default=None, help="... at the end of this optimizer step")
    ap.add_argument("--resume", action="store_true", help="resume from the newest complete checkpoint")
    ap.add_argument("--data_weights", action="store_true", help="a seeded per-token data weight in [0, 2] per token")
    ap.add_argument("--ref_cache", action="store_true",
                    help="ref_source=cache: a seeded cached reference log-prob per token, a dataset column")
    ap.add_argument("--trace", type=int, default=0, help="--trace_every_n_steps")
    ap.add_argument("--log_premise", action="store_true")
    a = ap.parse_args()
    out, mode = a.out, a.mode
    if a.fsdp2:
        enable_fsdp_on_cpu()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    zero3 = a.zero3 and world > 1  # one process is the plain reference run
    if zero3:
        enable_deepspeed_on_cpu()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from tests.conftest import tiny_model, tiny_rows, tiny_tokenizer
    from tests.distributed.fsdp2_step import GLOBAL_BATCH, LR_WEIGHT_ALPHA, ROWS_SEED, reference_model
    from torch.distributed.tensor import DTensor

    from tokensft.data import CompletionCollator
    from tokensft.trainer.config import TokenSFTConfig
    from tokensft.trainer.trainer import TokenSFTTrainer

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    kw = {"lr_weight_alpha": LR_WEIGHT_ALPHA} if mode == "sft-lr" else {}
    cfg = TokenSFTConfig(
        output_dir=str(out / "run"), mode=mode,
        ref_source="cache" if a.ref_cache else "adapter" if a.peft else "model",
        per_device_train_batch_size=GLOBAL_BATCH // world, gradient_accumulation_steps=a.ga, max_steps=a.steps,
        learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=not zero3, bf16=False, seed=0,
        save_strategy="steps" if a.save_steps else "no", save_steps=a.save_steps or 500,
        stat_scope=a.scope, trace_every_n_steps=a.trace, trace_at_start=False, log_premise=a.log_premise,
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
        max_length=None, disable_tqdm=True, gradient_checkpointing=False, ddp_find_unused_parameters=False, **kw,
        **({"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT",
                                                  "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
           if a.fsdp2 and world > 1 else {}),
        **({"deepspeed": {"train_micro_batch_size_per_gpu": "auto",
                          "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
                          "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True,
                          "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}},
            "accelerator_config": {"use_configured_state": True}} if zero3 else {}))
    peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"],
                      task_type="CAUSAL_LM") if a.peft else None
    rows = tiny_rows(GLOBAL_BATCH * a.ga * a.steps, seed=ROWS_SEED)
    if a.ref_cache:  # what `tokensft ref-cache` adds to each row: the reference's log-prob of every token
        g = torch.Generator().manual_seed(4)
        for r in rows:
            r["ref_log_probs"] = (-4 * torch.rand(len(r["input_ids"]), generator=g)).tolist()
    if a.data_weights:
        g = torch.Generator().manual_seed(3)
        for r in rows:
            r["weights"] = (2 * torch.rand(len(r["input_ids"]), generator=g)).tolist()
    callbacks = []
    dataset = Dataset.from_list(rows)
    if a.trace:
        from tokensft.tracing.callback import build_trace_callback

        callbacks.append(build_trace_callback(cfg, dataset, tok))
    trainer = TokenSFTTrainer(model=tiny_model(0), args=cfg, train_dataset=dataset,
                              processing_class=tok, data_collator=CompletionCollator(0), peft_config=peft,
                              ref_model=None if a.peft or a.ref_cache else reference_model(),
                              callbacks=callbacks)
    report = {
        "world_size": world,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp_enabled": bool(trainer.is_fsdp_enabled),
        "is_fsdp2": bool(trainer.accelerator.is_fsdp2),
    }
    if trainer.ref_model is not None:
        params = list(trainer.ref_model.parameters())
        # FSDP2: DTensor shards; ZeRO-3: each parameter's `ds_tensor` is this rank's partition (`ds_numel` the whole)
        report.update(ref_all_dtensor=all(isinstance(p, DTensor) for p in params),
                      ref_all_zero3=all(hasattr(p, "ds_tensor") for p in params),
                      ref_local_numel=sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else
                                          (p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
                      ref_full_numel=sum(getattr(p, "ds_numel", p.numel()) for p in params))
    if a.kill_rank is not None and int(os.environ.get("RANK", "0")) == a.kill_rank:
        import signal

        from transformers import TrainerCallback

        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == a.kill_step:
                    (out / f"killed-rank{a.kill_rank}").parent.mkdir(parents=True, exist_ok=True)
                    (out / f"killed-rank{a.kill_rank}").write_text(str(os.getpid()))
                    os.kill(os.getpid(), signal.SIGKILL)

        trainer.add_callback(Kill())
    if a.train:
        resume = None
        if a.resume:
            from tokensft.trainer.outputs import newest_complete_checkpoint

            resume, _ = newest_complete_checkpoint(out / "run")
            report["resumed_from"] = resume.name if resume is not None else None
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        report["history"] = [{k: v for k, v in h.items() if isinstance(v, (int, float))}
                             for h in trainer.state.log_history if "loss" in h]
        report["policy_all_dtensor"] = all(isinstance(p, DTensor) for p in trainer.model.parameters())
        if a.save_final:  # the CLI's final save (one loadable directory, whatever the checkpoints' format)
            from tokensft.trainer.run import save_whole_model

            save_whole_model(trainer, out / "final")
        # full tensors, gathered on rank 0 (ZeRO-3: from the engine, `stage3_gather_16bit_weights_on_model_save`)
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped if zero3 else trainer.model)
        if int(os.environ.get("RANK", "0")) == 0:
            from safetensors.torch import save_file

            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(out / "final.safetensors"))
    if int(os.environ.get("RANK", "0")) == 0:
        if a.trace:
            from tokensft.tracing.schema import read_manifest

            report["trace_steps"] = [e["step"] for e in read_manifest(out / "run")]
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1))
    if zero3:  # DeepSpeed's communication threads, stopped before exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
