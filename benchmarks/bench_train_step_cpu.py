"""One `sft` LoRA training step on CPU as a fraction of this CPU's fp32 matmul peak, per LM-head path.

SmolLM2-135M-Instruct, LoRA r=32 (alpha 64) on all linear layers, B=4, T=384 (the first quarter of each row is
prompt, the rest supervised), fp32. Paths, each a forward + backward of the same batch (no optimizer step):

- `trl`: plain TRL `SFTTrainer.training_step` (its fused LM head over every position, entropy and accuracy);
- `tokensft:fused|chunked|logits`: `TokenSFTTrainer.training_step` with `--loss_head` fused (TRL's head), chunked
  (supervised positions only, token chunks) or logits (plain `(B, T, V)` logits, log-softmax of the supervised rows);
  `auto`, the default, picks `logits` on CPU at this shape;
- `bare`: a PEFT forward returning full logits, `F.cross_entropy` on the supervised positions, backward: the floor
  of what any trainer can do with these kernels.

The paths run round-robin (order rotated every round) with a matmul peak probe between steps, so they and the peak
see the same load. `model_flops` is the FLOP count of the bare step (`torch.utils.flop_counter`, matmuls and
attention: forward, and backward through the frozen base for activations plus LoRA weight gradients); every path's
`fraction_of_peak` is model_flops / its median step time / the median peak, so the fractions compare speed on the
same useful work. The peak is the best fp32 GFLOP/s of three matmul shapes of the model (MLP projection, LM-head
chunk, square 1024) at the same thread count.

    python benchmarks/bench_train_step_cpu.py [--rounds 3] [--threads 1] \
        [--out benchmarks/results/train_step_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PATHS = ("trl", "tokensft:fused", "tokensft:chunked", "tokensft:logits", "bare")
PEAK_SHAPES = ((1532, 576, 1536), (256, 576, 49152), (1024, 1024, 1024))


def peak_gflops(torch, reps: int = 3) -> float:
    """Best fp32 GFLOP/s over `PEAK_SHAPES` at the current thread count."""
    best = 0.0
    for m, k, n in PEAK_SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best


def main() -> None:
    from bench_report import add_step_args, random_step_rows

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(ap, seq=384, lora_r=32, rounds=3)
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--out", default=None, help="also write the JSON here (whole or not at all)")
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from tokensft.data import CompletionCollator
    from tokensft.models import load_tokenizer, resolve_model
    from tokensft.trainer.config import TokenSFTConfig
    from tokensft.trainer.trainer import TokenSFTTrainer

    torch.set_num_threads(a.threads)
    load_start = os.getloadavg()[0]
    torch.manual_seed(0)
    tok = load_tokenizer(a.model)
    path = resolve_model(a.model)
    rows = random_step_rows(tok, a.batch, a.seq)
    batch = CompletionCollator(tok.pad_token_id)(rows)
    n_items = torch.tensor(float((batch["labels"][:, 1:] != -100).sum()))
    lora = dict(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0, target_modules="all-linear",
                task_type="CAUSAL_LM")
    out = tempfile.mkdtemp()
    common = dict(output_dir=out, report_to="none", per_device_train_batch_size=a.batch, gradient_checkpointing=False,
                  max_length=None, dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
                  disable_tqdm=True, use_cpu=True, bf16=False)
    steps = {}
    for spec in a.paths.split(","):
        kind, _, head = spec.partition(":")
        if kind == "bare":
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                   LoraConfig(**lora)).train()

            def bare_step(model=model):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                       ignore_index=-100, reduction="sum") / n_items
                loss.backward()
                model.zero_grad(set_to_none=True)
            steps[spec] = bare_step
            continue
        if kind == "trl":
            tr = SFTTrainer(model=path, args=SFTConfig(**common), train_dataset=Dataset.from_list(rows),
                            processing_class=tok, data_collator=CompletionCollator(tok.pad_token_id),
                            peft_config=LoraConfig(**lora))
        else:
            tr = TokenSFTTrainer(model=path, args=TokenSFTConfig(**common, mode="sft", loss_head=head),
                                 train_dataset=Dataset.from_list(rows), processing_class=tok,
                                 data_collator=CompletionCollator(tok.pad_token_id), peft_config=LoraConfig(**lora))
        tr.create_optimizer_and_scheduler(num_training_steps=10)
        tr.current_gradient_accumulation_steps = 1
        tr.model.train()

        def trainer_step(tr=tr):
            tr.training_step(tr.model, dict(batch), num_items_in_batch=n_items)
            tr.model.zero_grad(set_to_none=True)
        steps[spec] = trainer_step
    for step in steps.values():  # warm-up
        step()
    model_flops = None
    if "bare" in steps:
        with FlopCounterMode(display=False) as counter:
            steps["bare"]()
        model_flops = counter.get_total_flops()
    times = {s: [] for s in steps}
    peaks = [peak_gflops(torch)]
    specs = list(steps)
    for r in range(a.rounds):
        for spec in specs[r % len(specs):] + specs[: r % len(specs)]:
            t = time.perf_counter()
            steps[spec]()
            times[spec].append(time.perf_counter() - t)
            print(f"{spec}: {times[spec][-1]:.2f} s", file=sys.stderr)
            peaks.append(peak_gflops(torch))
    med = {s: statistics.median(v) for s, v in times.items()}
    peak = statistics.median(peaks)
    res = {
        "benchmark": "train_step_cpu",
        "config": vars(a),
        "load_avg_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2), "cores": os.cpu_count()},
        "peak_gflops": {"median": round(peak, 1), "max": round(max(peaks), 1), "min": round(min(peaks), 1),
                        "shapes_mkn": PEAK_SHAPES},
        "model_flops_per_step": model_flops,
        "median_step_s": {s: round(v, 3) for s, v in med.items()},
        "achieved_gflops": {s: round(model_flops / v / 1e9, 1) for s, v in med.items()} if model_flops else None,
        "fraction_of_peak": {s: round(model_flops / v / 1e9 / peak, 3) for s, v in med.items()} if model_flops
        else None,
        "ratio_to_trl": {s: round(v / med["trl"], 3) for s, v in med.items()} if "trl" in med else None,
        "steps_s": {s: [round(x, 3) for x in v] for s, v in times.items()},
    }
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        from tokensft.io import atomic_write

        atomic_write(a.out, text + "\n")


if __name__ == "__main__":
    main()
