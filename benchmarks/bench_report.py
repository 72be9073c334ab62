"""What every benchmark does with its result (print it as JSON and, with `--out`, write it whole or not at all), and
the arguments every training-step benchmark shares."""

from __future__ import annotations

import json


def emit(result: dict, out: str | None) -> None:
    """Print `result` as indented JSON; also write it to `out` (atomically: a reader never sees half a file)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        from tokensft.io import atomic_write

        atomic_write(out, text + "\n")


def add_step_args(ap, *, seq: int, lora_r: int, rounds: int) -> None:
    """The shape of a training-step benchmark on `ap` (an `argparse.ArgumentParser`): --model, --batch (rows),
    --seq (tokens per row), --lora_r, --rounds (interleaved repetitions, medians reported) and --threads."""
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=seq)
    ap.add_argument("--lora_r", type=int, default=lora_r)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--threads", type=int, default=1)


def random_step_rows(tok, batch: int, seq: int) -> list[dict]:
    """`batch` rows of `seq` random token ids (ids >= 10, from torch's current RNG), the first quarter a prompt
    (labels -100): the training-step benchmarks' input."""
    import torch

    rows = []
    for _ in range(batch):
        ids = torch.randint(10, len(tok), (seq,)).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (seq // 4) + ids[seq // 4:]})
    return rows


def lora_step_trainer(path, tok, rows: list[dict], *, lora_r: int, bf16: bool, mode: str = "sft"):
    """A `TokenSFTTrainer` over `rows` with a LoRA adapter (r = `lora_r`, alpha 2r, every linear layer), optimizer
    built and in train mode, ready for `training_step` calls (one micro-batch per step)."""
    import tempfile

    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from tokensft.data import CompletionCollator
    from tokensft.trainer.config import TokenSFTConfig
    from tokensft.trainer.trainer import TokenSFTTrainer

    cfg = TokenSFTConfig(output_dir=tempfile.mkdtemp(), mode=mode, report_to="none",
                         per_device_train_batch_size=len(rows), gradient_checkpointing=False, max_length=None,
                         dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
                         disable_tqdm=True, bf16=bf16, use_cpu=not torch.cuda.is_available())
    tr = TokenSFTTrainer(model=path, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         data_collator=CompletionCollator(tok.pad_token_id),
                         peft_config=LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    tr.create_optimizer_and_scheduler(num_training_steps=100)
    tr.current_gradient_accumulation_steps = 1
    tr.model.train()
    return tr
