"""bf16 against fp32 matmul throughput on this CPU, at SmolLM2-135M's shapes, 1 thread and all cores (issue 25).

The performance numbers in docs/performance.md are fractions of the fp32 matmul peak. On a CPU with AVX-512 BF16
(`avx512_bf16` in /proc/cpuinfo, e.g. AMD Zen 4) oneDNN can run bf16 matmuls on the dot-product instructions, so the
bf16 peak may be well above fp32's. This measures it before anything is switched: for each shape `(M, K) @ (K, N)`
— a training step's rows (M = 4 x 384 = 1,536) and a decoding step's (M = 64) through the MLP projections (576 x
1,536, 1,536 x 576) and the LM head (576 x 49,152) — the best time of repeated matmuls, fp32 and bf16 interleaved
round by round, at 1 thread and at every core; GFLOP/s = 2 M K N / seconds. bf16 results are not compared for
accuracy here (that is the training and decoding comparison of issue 25).

    python benchmarks/bench_bf16_cpu.py [--rounds 5] [--out benchmarks/results/bf16_matmul_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

SHAPES = {  # name: (M, K, N)
    "train mlp up (1536x576 @ 576x1536)": (1536, 576, 1536),
    "train mlp down (1536x1536 @ 1536x576)": (1536, 1536, 576),
    "train lm head (1536x576 @ 576x49152)": (1536, 576, 49152),
    "decode mlp up (64x576 @ 576x1536)": (64, 576, 1536),
    "decode lm head (64x576 @ 576x49152)": (64, 576, 49152),
}


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(x for x in line.split(":", 1)[1].split() if "avx512" in x or x in ("amx_bf16", "avx2"))
    except OSError:
        pass
    return []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median is reported)")
    ap.add_argument("--out", default=None, help="also write the JSON here (whole or not at all)")
    args = ap.parse_args()
    import torch

    from tokensft.runtime import available_cores, best_matmul_seconds

    cores = available_cores()
    load_start = os.getloadavg()[0]
    threads = sorted({1, cores})
    g = torch.Generator().manual_seed(0)
    mats = {name: (torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)) for name, (m, k, n) in SHAPES.items()}
    gflops: dict[str, dict[str, list[float]]] = {}
    for r in range(args.rounds):
        for t in threads:
            torch.set_num_threads(t)
            for dtype in (torch.float32, torch.bfloat16) if r % 2 == 0 else (torch.bfloat16, torch.float32):
                for name, (a, b) in mats.items():
                    m, k, n = SHAPES[name]
                    s = best_matmul_seconds(a.to(dtype), b.to(dtype), budget_s=0.3)
                    key = f"{str(dtype).split('.')[-1]}@{t}"
                    gflops.setdefault(name, {}).setdefault(key, []).append(2 * m * k * n / s / 1e9)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    med = {name: {k: round(statistics.median(v), 1) for k, v in d.items()} for name, d in gflops.items()}
    ratio = {name: {f"bf16/fp32@{t}": round(d[f"bfloat16@{t}"] / d[f"float32@{t}"], 2) for t in threads}
             for name, d in med.items()}
    res = {
        "benchmark": "bf16_matmul_cpu", "torch": torch.__version__, "cpu_flags": cpu_flags(), "cores": cores,
        "threads": threads, "rounds": args.rounds,
        "load_avg_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "median_gflops": med, "bf16_over_fp32": ratio,
        "peak_gflops": {k: max(d[k] for d in med.values()) for k in next(iter(med.values()))},
    }
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
