"""bf16 against fp32 on this CPU for evaluation: greedy decoding tokens/s and held-out NLL (issue #25 item 3).

SmolLM2-135M-Instruct loaded twice by `tokensft.models.load_model`, once with `dtype=float32` and once with
`dtype=bfloat16` (bf16 weights and activations, no autocast: what `tokensft eval` does with a bf16 dtype), on the
first `--num_problems` MATH-500 problems:

- decoding: the transformers evaluation backend (`TransformersBackend`, its default greedy path that drops finished
  sequences), chat-template CoT prompts sorted by length as `evaluate` does, `--batch` prompts per call, at most
  `--max_new_tokens`; fp32 and bf16 alternate chunk by chunk (order rotated every chunk) so they see the same load.
  tokens/s counts generated tokens up to and including the stop token; `identical` counts problems whose bf16
  completion equals the fp32 one (text, finish reason, token count), `mean_first_divergence_char` is the mean
  character index where the texts first differ over the others;
- held-out NLL: teacher-forced per-token NLL of the same problems' reference solutions, formatted as training formats
  them (`tokensft.eval.heldout.heldout_rows` + `token_nll`: log-softmax in float32, float64 sums), per model, with
  the paired difference bf16 - fp32 (nats per token).

    python benchmarks/bench_bf16_decode_cpu.py [--num_problems 16] [--max_new_tokens 256] [--threads 1] \
        [--out benchmarks/results/bf16_decode_cpu.json]

The JSON goes to stdout and, with `--out`, to that file (written whole or not at all).
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

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "math500", "test.jsonl")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=os.path.normpath(DATA), help="MATH-500 JSONL (problem + solution)")
    p.add_argument("--num_problems", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="prompts per generate call (= per interleaved chunk)")
    p.add_argument("--nll_max_length", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None, help="also write the JSON here (whole or not at all)")
    args = p.parse_args()

    import numpy as np
    import torch

    from tokensft.eval import TransformersBackend, build_prompt, load_benchmark, stop_token_ids
    from tokensft.eval.heldout import heldout_rows, token_nll
    from tokensft.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    tok = load_tokenizer(args.model)
    dtypes = ("float32", "bfloat16")
    models = {d: load_model(args.model, dtype=d, device="cpu") for d in dtypes}
    problems = load_benchmark("math500", data=args.data, limit=args.num_problems)
    prompts = sorted((build_prompt(q.problem, tok, "chat") for q in problems), key=lambda s: -len(s))
    stops = stop_token_ids(tok, models["float32"])
    backends = {d: TransformersBackend(m, tok, stops) for d, m in models.items()}
    for be in backends.values():  # warm-up
        be.generate(prompts[:2], max_new_tokens=4)

    gen = {d: {"seconds": 0.0, "tokens": 0, "truncated": 0, "samples": []} for d in dtypes}
    for c, start in enumerate(range(0, len(prompts), args.batch)):
        chunk = prompts[start: start + args.batch]
        for d in dtypes[c % 2:] + dtypes[: c % 2]:  # rotate: neither always runs first
            t0 = time.perf_counter()
            samples = [r[0] for r in backends[d].generate(chunk, max_new_tokens=args.max_new_tokens)]
            gen[d]["seconds"] += time.perf_counter() - t0
            gen[d]["tokens"] += sum(s.num_tokens for s in samples)
            gen[d]["truncated"] += sum(s.finish_reason == "length" for s in samples)
            gen[d]["samples"] += samples
            print(f"generate {d}: chunk {c}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    # held-out NLL of the same problems' reference solutions, interleaved the same way (one forward batch each)
    ds = heldout_rows(tok, args.data, max_length=args.nll_max_length, limit=args.num_problems)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in ds]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    nll, nll_s = {}, {d: 0.0 for d in dtypes}
    parts = {d: [] for d in dtypes}
    for c, start in enumerate(range(0, len(rows), args.batch)):
        for d in dtypes[c % 2:] + dtypes[: c % 2]:
            t0 = time.perf_counter()
            parts[d] += token_nll(models[d], rows[start: start + args.batch], pad_token_id=int(pad),
                                  batch_size=args.batch, progress=False)
            nll_s[d] += time.perf_counter() - t0
    for d in dtypes:
        n_tok = sum(a.size for a in parts[d])
        nll[d] = {"nll_per_token": round(float(sum(a.sum() for a in parts[d]) / n_tok), 6), "num_tokens": int(n_tok),
                  "seconds": round(nll_s[d], 2), "scored_tokens_per_s": round(n_tok / nll_s[d], 1)}
    diff = np.concatenate([b - a for a, b in zip(parts["float32"], parts["bfloat16"])])  # per token, bf16 - fp32

    same, diverge = 0, []
    for a, b in zip(gen["float32"]["samples"], gen["bfloat16"]["samples"]):
        if a == b:  # text, finish reason and token count
            same += 1
        else:
            diverge.append(next((i for i, (x, y) in enumerate(zip(a.text, b.text)) if x != y),
                                min(len(a.text), len(b.text))))
    tps = {d: gen[d]["tokens"] / gen[d]["seconds"] for d in dtypes}
    from importlib.metadata import version

    res = {
        "benchmark": "bf16_decode_cpu",
        "model": args.model, "torch_threads": args.threads, "batch": args.batch,
        "versions": {"torch": torch.__version__, "transformers": version("transformers")},
        "cpu": platform.processor() or platform.machine(),
        "num_problems": len(prompts), "max_new_tokens": args.max_new_tokens,
        "load_avg": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()],
                     "cores": os.cpu_count()},
        "decode": {d: {"seconds": round(gen[d]["seconds"], 1), "generated_tokens": gen[d]["tokens"],
                       "tokens_per_s": round(tps[d], 2), "truncated": gen[d]["truncated"]} for d in dtypes},
        "decode_tokens_per_s_ratio_bf16_to_fp32": round(tps["bfloat16"] / tps["float32"], 3),
        "greedy_agreement": {"identical": f"{same}/{len(prompts)}",
                             "mean_first_divergence_char": round(float(np.mean(diverge)), 1) if diverge else None},
        "heldout_nll": nll,
        "heldout_nll_diff_bf16_minus_fp32": {
            "per_token_mean": round(float(diff.mean()), 6),
            "relative": round(float(diff.mean()) / nll["float32"]["nll_per_token"], 5),
            "per_token_abs_mean": round(float(np.abs(diff).mean()), 6),
            "per_token_abs_max": round(float(np.abs(diff).max()), 4),
        },
        "nll_time_ratio_bf16_to_fp32": round(nll_s["bfloat16"] / nll_s["float32"], 3),
    }
    emit(res, args.out)


if __name__ == "__main__":
    main()
