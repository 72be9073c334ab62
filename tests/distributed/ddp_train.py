"""Train a tiny model for 2 steps and save its parameters (run under `accelerate launch` or plain python).

    python ddp_train.py OUT.safetensors BATCH_PER_DEVICE MODE STAT_SCOPE [REF_SOURCE]

With REF_SOURCE `model` the reference is a frozen copy of the starting model (`ref_source=model`, full fine-tuning),
prepared by accelerate: under FSDP2 it is sharded like the policy. The parameters are gathered with
`accelerator.get_state_dict` (a collective under FSDP), so every rank takes part and rank 0 writes the file.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tests.conftest import tiny_model, tiny_rows, tiny_tokenizer  # noqa: E402

from tokensft.data import CompletionCollator  # noqa: E402
from tokensft.trainer.config import TokenSFTConfig  # noqa: E402
from tokensft.trainer.trainer import TokenSFTTrainer  # noqa: E402


def main(out: str, bs: int, mode: str, scope: str, ref_source: str | None = None) -> None:
    tok = tiny_tokenizer()
    cfg = TokenSFTConfig(
        output_dir=str(Path(out).parent / "trainer"), per_device_train_batch_size=bs, max_steps=2, learning_rate=0.5,
        optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
        report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0, data_seed=0, mode=mode, stat_scope=scope, ref_source=ref_source,
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, max_length=None,
        disable_tqdm=True, gradient_checkpointing=False, ddp_find_unused_parameters=False,
    )
    tr = TokenSFTTrainer(model=tiny_model(0), args=cfg, train_dataset=Dataset.from_list(tiny_rows(8, seed=11)),
                         processing_class=tok, data_collator=CompletionCollator(tok.pad_token_id),
                         ref_model=tiny_model(0) if ref_source == "model" else None)
    tr.train()
    state = tr.accelerator.get_state_dict(tr.model)  # full (unsharded) parameters; a collective under FSDP
    if tr.is_world_process_zero():
        names = {n for n, _ in tr.accelerator.unwrap_model(tr.model).named_parameters()}
        params = {n: t.detach().cpu().contiguous() for n, t in state.items() if n in names}
        losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
        nlls = [h["nll"] for h in tr.state.log_history if "nll" in h]
        medians = [h["token_loss/median"] for h in tr.state.log_history if "nll" in h]
        sharded = [type(p).__name__ == "DTensor" for p in tr.model.parameters()]
        ref_sharded = [type(p).__name__ == "DTensor" for p in tr.ref_model.parameters()] if tr.ref_model else []
        save_file(params, out, metadata={"policy_sharded": str(all(sharded)), "ref_sharded": str(all(ref_sharded)),
                                         "ref_source": str(tr.ref_source), "losses": ",".join(map(str, losses)), "nlls": ",".join(map(str, nlls)),
                                         "medians": ",".join(map(str, medians))})
    if torch.distributed.is_initialized():
        # every rank waits until rank 0 has written its outputs, then leaves without tearing gloo down: at exit its
        # threads aborted the interpreter now and then ("terminate called"), and destroy_process_group once hung
        # rank 0 after the other rank had gone (CI, 2026-12-03); nothing is left to flush but the streams
        torch.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], *sys.argv[5:6])
