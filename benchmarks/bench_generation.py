"""Generation throughput of the transformers evaluation backend: batched (left-padded) vs one prompt at a time.

SmolLM2-135M-Instruct (fp32, CPU by default) on the first 32 MATH-500 problems, greedy, at most 256 new tokens,
chat-template CoT prompts as in `tokensft eval`, batched by prompt length as `evaluate` does. Batched and
one-at-a-time generation alternate chunk by chunk so both see the same load; tokens/s counts generated tokens up to and including the stop
token (padding after a finished sequence is not counted). Prints one JSON object.

    nice python benchmarks/bench_generation.py [--num_problems 32] [--batch_size 16] [--max_new_tokens 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=None, help="MATH-500 file (default: ../shared/data/math500/test.jsonl)")
    p.add_argument("--num_problems", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--no_sort", action="store_true", help="batch in file order instead of by prompt length")
    args = p.parse_args()

    import torch

    from tokensft.eval import TransformersBackend, build_prompt, load_benchmark, stop_token_ids
    from tokensft.models import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype="float32", device=args.device)
    problems = load_benchmark("math500", data=args.data, limit=args.num_problems)
    prompts = [build_prompt(q.problem, tok, "chat") for q in problems]
    if not args.no_sort:  # as `evaluate` does: batches of similar prompt length, longest first
        prompts.sort(key=lambda s: -len(s))
    backend = TransformersBackend(model, tok, stop_token_ids(tok, model))
    backend.generate(prompts[:2], max_new_tokens=8)  # warm-up

    # Batched and one-at-a-time runs are interleaved chunk by chunk, so both see the same load on a shared
    # machine; CPU time (process time) is reported beside wall time as the load-robust measure.
    totals = {mode: {"seconds": 0.0, "cpu_seconds": 0.0, "tokens": 0, "truncated": 0} for mode in ("batched", "single")}
    outputs: dict[str, list] = {"batched": [], "single": []}
    for i in range(0, len(prompts), args.batch_size):
        chunk = prompts[i : i + args.batch_size]
        for mode, groups in (("batched", [chunk]), ("single", [[q] for q in chunk])):
            t0, c0 = time.perf_counter(), time.process_time()
            samples = [row[0] for g in groups for row in backend.generate(g, max_new_tokens=args.max_new_tokens)]
            totals[mode]["seconds"] += time.perf_counter() - t0
            totals[mode]["cpu_seconds"] += time.process_time() - c0
            totals[mode]["tokens"] += sum(s.num_tokens for s in samples)
            totals[mode]["truncated"] += sum(s.finish_reason == "length" for s in samples)
            outputs[mode] += samples

    def report(mode: str, batch_size: int) -> dict:
        t = totals[mode]
        return {
            "batch_size": batch_size,
            "seconds": round(t["seconds"], 2),
            "cpu_seconds": round(t["cpu_seconds"], 2),
            "generated_tokens": t["tokens"],
            "tokens_per_s": round(t["tokens"] / t["seconds"], 2),
            "tokens_per_cpu_s": round(t["tokens"] / t["cpu_seconds"], 2),
            "truncated": t["truncated"],
        }

    batched, single = report("batched", args.batch_size), report("single", 1)
    same = sum(a == b for a, b in zip(outputs["batched"], outputs["single"]))
    print(
        json.dumps(
            {
                "benchmark": "generation",
                "model": args.model,
                "device": args.device,
                "dtype": "float32",
                "torch_threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "num_problems": len(prompts),
                "max_new_tokens": args.max_new_tokens,
                "sorted_by_prompt_length": not args.no_sort,
                "batched": batched,
                "one_at_a_time": single,
                "speedup": round(batched["tokens_per_s"] / single["tokens_per_s"], 2),
                "speedup_cpu_time": round(batched["tokens_per_cpu_s"] / single["tokens_per_cpu_s"], 2),
                "load_average_1min_at_end": round(os.getloadavg()[0], 2),
                "identical_completions": f"{same}/{len(prompts)}",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
