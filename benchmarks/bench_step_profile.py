"""Where a LoRA training step's time goes, part by part, in fp32 and under bf16 autocast, on this CPU.

Builds `TokenSFTTrainer` on SmolLM2-135M-Instruct (LoRA r=32 on every linear layer, one fixed batch of B sequences of T
tokens, the first quarter prompt), then per precision: times whole optimizer steps (`training_step` + `optimizer.step`)
interleaved fp32/bf16 over `--rounds` rounds, and profiles one more step of each with `torch.profiler`, splitting the
operators' self time into parts:

- `backbone_matmul`: matmuls of the frozen transformer weights (forward and backward);
- `lora`: matmuls with a dimension equal to the LoRA rank;
- `lm_head`: everything inside the chunked LM head / log-softmax (`_ChunkedSoftmaxStats`, forward and backward);
- `attention`: the attention kernels (SDPA or eager softmax attention);
- `casts`: dtype conversions and copies (`aten::to`, `_to_copy`, `copy_`): autocast's re-casts of the weights;
- `optimizer`: AdamW's step;
- `elementwise`: everything else (norms, activations, residual adds, loss weights and reduction, autograd glue).

It also measures this CPU's matmul peak in both dtypes at the backbone's shape in the same run, counts the step's
matmul FLOPs (the profiler's), and reports the step's achieved GFLOP/s against that peak.

    python benchmarks/bench_step_profile.py [--rounds 3] [--threads 1] [--out benchmarks/results/step_profile_<cpu>.json]

The JSON (with the CPU model, flags, thread count, load and versions) goes to stdout and, with `--out`, to that file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PARTS = ("backbone_matmul", "lora", "lm_head", "attention", "casts", "optimizer", "elementwise")
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
CASTS = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous"}


def part_of(event, rank: int, vocab: int) -> str:
    """The part (`PARTS`) an operator event's self time belongs to."""
    node = event
    while node is not None:
        name = node.name
        if "ChunkedSoftmaxStats" in name:
            return "lm_head"
        if name == "tokensft::optimizer":
            return "optimizer"
        if "scaled_dot_product" in name or "flash_attention" in name:
            return "attention"
        node = node.cpu_parent
    if event.name in MATMULS:
        dims = {d for shape in (event.input_shapes or []) for d in (shape or [])}
        if rank in dims:
            return "lora"
        if vocab in dims:
            return "lm_head"
        return "backbone_matmul"
    if event.name in CASTS:
        return "casts"
    return "elementwise"


def main() -> None:
    from bench_report import add_step_args, lora_step_trainer, random_step_rows

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(ap, seq=512, lora_r=32, rounds=3)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args()

    import torch
    from bench_report import emit
    from torch.profiler import ProfilerActivity, profile, record_function

    from tokensft.data import CompletionCollator
    from tokensft.models import load_tokenizer, resolve_model
    from tokensft.runtime import PHASE_SHAPES, best_matmul_seconds, environment

    torch.set_num_threads(a.threads)
    load = [round(os.getloadavg()[0], 2)]
    torch.manual_seed(0)
    tok = load_tokenizer(a.model)
    path = resolve_model(a.model)
    vocab = len(tok)
    rows = random_step_rows(tok, a.batch, a.seq)
    batch = CompletionCollator(tok.pad_token_id)(rows)
    n_items = torch.tensor(float(a.batch * (a.seq - a.seq // 4)))
    trainers = {}
    for prec in a.precisions.split(","):
        trainers[prec] = lora_step_trainer(path, tok, rows, lora_r=a.lora_r, bf16=prec == "bf16")

    def step(tr) -> float:
        tr.model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss = tr.training_step(tr.model, dict(batch), num_items_in_batch=n_items)
        with record_function("tokensft::optimizer"):
            tr.optimizer.step()
        return float(loss), time.perf_counter() - t

    for tr in trainers.values():  # warm-up: kernels picked, buffers allocated
        step(tr)
    times = {p: [] for p in trainers}
    for r in range(a.rounds):
        order = list(trainers)[r % len(trainers):] + list(trainers)[:r % len(trainers)]
        for prec in order:
            times[prec].append(step(trainers[prec])[1])
            print(f"{prec}: {times[prec][-1]:.2f} s", file=sys.stderr)
    m, k, n = PHASE_SHAPES["train"]
    x, w = torch.randn(m, k), torch.randn(k, n)
    peak = {"fp32": 2 * m * k * n / best_matmul_seconds(x, w, 1.0) / 1e9,
            "bf16": 2 * m * k * n / best_matmul_seconds(x.bfloat16(), w.bfloat16(), 1.0) / 1e9}
    result = {}
    for prec, tr in trainers.items():
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
            step(tr)
        parts = dict.fromkeys(PARTS, 0.0)
        flops = 0
        for ev in prof.events():
            parts[part_of(ev, a.lora_r, vocab)] += ev.self_cpu_time_total / 1e6
            flops += ev.flops or 0
        total = sum(parts.values())
        med = statistics.median(times[prec])
        result[prec] = {
            "step_s": [round(t, 3) for t in times[prec]], "median_step_s": round(med, 3),
            "profiled_s": round(total, 3),
            "parts_s": {p: round(v, 3) for p, v in parts.items()},
            "parts_share": {p: round(v / total, 3) for p, v in parts.items()},
            "matmul_gflop": round(flops / 1e9, 1),
            "achieved_gflops": round(flops / 1e9 / med, 1),
            "share_of_peak": round(flops / 1e9 / med / peak[prec], 3),
        }
    load.append(round(os.getloadavg()[0], 2))
    res = {"benchmark": "step_profile", "config": vars(a), "machine": environment(), "threads": a.threads,
           "load_avg_1m": {"start": load[0], "end": load[1]},
           "matmul_peak_gflops": {p: round(v, 1) for p, v in peak.items()}, "peak_shape": [m, k, n],
           "bf16_over_fp32_step": round(result["bf16"]["median_step_s"] / result["fp32"]["median_step_s"], 3)
           if {"bf16", "fp32"} <= result.keys() else None,
           "precisions": result,
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    emit(res, a.out)


if __name__ == "__main__":
    main()
