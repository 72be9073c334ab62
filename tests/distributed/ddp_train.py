"""Train a tiny model for 2 steps and save its parameters (run under `accelerate launch` or plain python).

    python ddp_train.py OUT.safetensors BATCH_PER_DEVICE MODE STAT_SCOPE
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from datasets import Dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tests.conftest import tiny_model, tiny_rows, tiny_tokenizer  # noqa: E402

from tokensft.data import CompletionCollator  # noqa: E402
from tokensft.trainer.config import TokenSFTConfig  # noqa: E402
from tokensft.trainer.trainer import TokenSFTTrainer  # noqa: E402


def main(out: str, bs: int, mode: str, scope: str) -> None:
    tok = tiny_tokenizer()
    cfg = TokenSFTConfig(
        output_dir=str(Path(out).parent / "trainer"), per_device_train_batch_size=bs, max_steps=2, learning_rate=0.5,
        optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
        report_to="none", use_cpu=True, save_strategy="no", seed=0, data_seed=0, mode=mode, stat_scope=scope,
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, max_length=None,
        disable_tqdm=True, gradient_checkpointing=False, ddp_find_unused_parameters=False,
    )
    tr = TokenSFTTrainer(model=tiny_model(0), args=cfg, train_dataset=Dataset.from_list(tiny_rows(8, seed=11)),
                         processing_class=tok, data_collator=CompletionCollator(tok.pad_token_id))
    tr.train()
    if tr.is_world_process_zero():
        params = {n: p.detach().contiguous() for n, p in tr.accelerator.unwrap_model(tr.model).named_parameters()}
        losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
        nlls = [h["nll"] for h in tr.state.log_history if "nll" in h]
        medians = [h["token_loss/median"] for h in tr.state.log_history if "nll" in h]
        save_file(params, out, metadata={"losses": ",".join(map(str, losses)), "nlls": ",".join(map(str, nlls)),
                                         "medians": ",".join(map(str, medians))})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
