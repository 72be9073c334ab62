"""Generation throughput of the transformers evaluation backend: batched (left-padded) vs one prompt at a time.

SmolLM2-135M-Instruct (fp32, CPU by default) on the first 32 MATH-500 problems, greedy, at most 256 new tokens,
chat-template CoT prompts as in `tokensft eval`. Tokens/s counts generated tokens up to and including the stop
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
    backend = TransformersBackend(model, tok, stop_token_ids(tok, model))
    backend.generate(prompts[:2], max_new_tokens=8)  # warm-up

    def run(batch_size: int):
        t0 = time.perf_counter()
        samples = []
        for i in range(0, len(prompts), batch_size):
            samples += [row[0] for row in backend.generate(prompts[i : i + batch_size], max_new_tokens=args.max_new_tokens)]
        seconds = time.perf_counter() - t0
        tokens = sum(s.num_tokens for s in samples)
        return samples, {
            "batch_size": batch_size,
            "seconds": round(seconds, 2),
            "generated_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2),
            "truncated": sum(s.finish_reason == "length" for s in samples),
        }

    batched_samples, batched = run(args.batch_size)
    single_samples, single = run(1)
    same = sum(a == b for a, b in zip(batched_samples, single_samples))
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
                "batched": batched,
                "one_at_a_time": single,
                "speedup": round(batched["tokens_per_s"] / single["tokens_per_s"], 2),
                "identical_completions": f"{same}/{len(prompts)}",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
