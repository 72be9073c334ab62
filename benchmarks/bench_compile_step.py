"""Does `torch.compile` pay for the LoRA training step on this CPU? Compile time against the seconds it saves.

Builds two `TokenSFTTrainer`s on SmolLM2-135M-Instruct (LoRA on every linear layer, one fixed batch of B sequences of
T tokens, the first quarter prompt, fp32 or bf16), compiles the second one's decoder layers with inductor (regional
compilation: `layer.compile()` per decoder layer, one graph shared by all layers, the norms, SiLU·up, residual adds
and LoRA scaling fused), then times whole optimizer steps (`training_step` + `optimizer.step`) of the two,
interleaved over `--rounds` rounds. Reports the first compiled step (compilation included), the step medians, their
ratio, the steps a run needs before the compilation has paid for itself, and the first step's loss on both sides.
By default inductor compiles into a fresh cache directory (what a first run pays); `--warm_cache` reuses the
machine's (what every later run of the same shapes pays).

    python benchmarks/bench_compile_step.py [--batch 4 --seq 160 --rounds 5 --threads 1 --out ...]

The defaults are the arithmetic study's shape (4 sequences of about 160 tokens, LoRA r = 16).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from bench_report import add_step_args, lora_step_trainer, random_step_rows

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(ap, seq=160, lora_r=16, rounds=5)
    ap.add_argument("--mode", default="sft")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--warm_cache", action="store_true",
                    help="reuse inductor's on-disk cache (default: a fresh one, the cost a first run pays)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args()
    if not a.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")

    import torch
    from bench_report import emit

    from tokensft.data import CompletionCollator
    from tokensft.models import load_tokenizer, resolve_model
    from tokensft.runtime import environment

    torch.set_num_threads(a.threads)
    load = [round(os.getloadavg()[0], 2)]
    torch.manual_seed(0)
    tok = load_tokenizer(a.model)
    path = resolve_model(a.model)
    rows = random_step_rows(tok, a.batch, a.seq)
    batch = CompletionCollator(tok.pad_token_id)(rows)
    n_items = torch.tensor(float(a.batch * (a.seq - a.seq // 4)))

    def make():
        return lora_step_trainer(path, tok, rows, lora_r=a.lora_r, bf16=a.bf16, mode=a.mode)

    def step(tr) -> tuple[float, float]:
        tr.model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss = tr.training_step(tr.model, dict(batch), num_items_in_batch=n_items)
        tr.optimizer.step()
        return float(loss), time.perf_counter() - t

    eager, compiled = make(), make()
    for layer in compiled.model.get_base_model().model.layers:
        layer.compile()
    loss_eager, first_eager = step(eager)
    loss_compiled, first_compiled = step(compiled)  # compiles
    step(compiled)  # a second shape-identical step: no recompilation
    times = {"eager": [], "compiled": []}
    for r in range(a.rounds):
        for side in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            times[side].append(step(eager if side == "eager" else compiled)[1])
        print(f"round {r}: eager {times['eager'][-1]:.2f} s, compiled {times['compiled'][-1]:.2f} s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    saved = med["eager"] - med["compiled"]
    compile_s = first_compiled - med["compiled"]
    load.append(round(os.getloadavg()[0], 2))
    emit({"benchmark": "compile_step", "config": vars(a), "machine": environment(), "threads": a.threads,
          "load_avg_1m": {"start": load[0], "end": load[1]},
          "step_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
          "median_step_s": {k: round(v, 3) for k, v in med.items()},
          "compiled_over_eager": round(med["compiled"] / med["eager"], 3),
          "first_step_s": {"eager": round(first_eager, 3), "compiled": round(first_compiled, 3)},
          "compile_s": round(compile_s, 1),
          "break_even_steps": round(compile_s / saved) if saved > 0 else None,
          "first_loss": {"eager": loss_eager, "compiled": loss_compiled},
          "date": time.strftime("%Y-%m-%d %H:%M:%S")}, a.out)


if __name__ == "__main__":
    main()
