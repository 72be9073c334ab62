"""How much the demo's table moves when the CPU's kernels change: the same `tokensft demo` under several kernel paths.

A fresh clone on another CPU runs the same code with other matmul and elementwise kernels (MKL picks its code path
per CPU: AVX2 kernels on AMD, AVX-512 on Intel; ATen's vectorised ops dispatch on the CPU's capability; the
thread count changes reduction order). Each kernel path is reproduced here on one machine by the libraries' own
switches, each variant in its own process:

- `default`: this CPU's own paths, 1 thread;
- `threads2`: 2 threads (other reduction order in the GEMMs);
- `aten_avx2`: `ATEN_CPU_CAPABILITY=avx2` (ATen's elementwise and reduction kernels as on an AVX2-only CPU);
- `mkl_avx2`: `MKL_ENABLE_INSTRUCTIONS=AVX2` and `ONEDNN_MAX_CPU_ISA=AVX2` (GEMMs through MKL's and oneDNN's AVX2 code,
  the path MKL takes on AMD EPYC);
- `all_avx2`: both of the above.

For each variant it records the demo's rows (`sweep.sweep_tables`: accuracy, truncation, train NLL, held-out NLL and
its Δ against the base) and, per number, the largest difference from `default`. `tests/test_demo_drift.py` reruns the
`--reduced` copy and compares it with this JSON's `default` rows, at tolerances set from these differences.

    python benchmarks/bench_demo_drift.py --reduced --out benchmarks/results/demo_drift_reduced_<cpu>.json
    python benchmarks/bench_demo_drift.py --variants default,all_avx2 --out benchmarks/results/demo_drift_full_<cpu>.json

`--reduced` is the test's copy (4 steps, 16 held-out solutions scored, 4 problems solved up to 48 tokens); without it, the demo as
`make demo` runs it (about 15 min per variant at 1 thread).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = {
    "default": {},
    "threads2": {},
    "aten_avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "mkl_avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "all_avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
# the reduced demo of tests/test_demo_drift.py: long enough that both modes have moved the held-out NLL
REDUCED = ["--max_steps", "4", "--test_examples", "16", "--eval_problems", "4", "--max_new_tokens", "48"]
CLI = "import sys; from tokensft.cli.main import main; sys.exit(main(sys.argv[1:]))"
NUMBERS = ("accuracy", "truncation_rate", "final_nll", "heldout_nll", "heldout_nll_diff")


def demo_rows(out: Path, modes: list[str]) -> list[dict]:
    """The demo's table rows from its output directory `out`: per row `name` and the `NUMBERS` (the held-out Δ as its
    mean difference), as `sweep.sweep_tables` computes them for the printed table."""
    from tokensft.cli import sweep

    names = [sweep.parse_variant(m)[0] for m in modes]
    rows = sweep.sweep_tables(out, names, [0], train_time=False)[2]
    keep = []
    for r in rows:
        row = {"name": r["name"]}
        for k in NUMBERS:
            v = r.get(k)
            row[k] = v["mean_diff"] if isinstance(v, dict) else v
        keep.append(row)
    return keep


def run_demo(out: Path, variant: str, extra: list[str]) -> tuple[list[dict], float]:
    """`tokensft demo` into `out` under `variant`'s kernel switches, in a fresh process: (rows, wall seconds)."""
    env = {**os.environ, **VARIANTS[variant], "HF_HUB_OFFLINE": "1"}
    threads = "2" if variant == "threads2" else "1"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", CLI, "demo", "--output_dir", str(out), "--threads", threads,
                    *extra], env=env, check=True, stdout=subprocess.DEVNULL)
    return demo_rows(out, ["sft", "sft-antiop"]), time.perf_counter() - t


def max_differences(rows: dict[str, list[dict]], base: str = "default") -> dict[str, dict[str, float]]:
    """Per variant and number, the largest |difference| from variant `base` over the table's rows."""
    diffs = {}
    for variant, vrows in rows.items():
        if variant == base:
            continue
        d = {}
        for a, b in zip(vrows, rows[base]):
            for k in NUMBERS:
                if a[k] is not None and b[k] is not None:
                    d[k] = max(d.get(k, 0.0), abs(a[k] - b[k]))
        diffs[variant] = d
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="kernel paths to run (default: all)")
    ap.add_argument("--reduced", action="store_true", help="the test's reduced demo instead of the full one")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args()

    from bench_report import emit

    from tokensft.runtime import environment

    extra = REDUCED if a.reduced else []
    load = [round(os.getloadavg()[0], 2)]
    rows, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in a.variants.split(","):
            rows[v], seconds[v] = run_demo(Path(tmp) / v, v, extra)
            print(f"{v}: {seconds[v]:.0f} s  " + "  ".join(f"{r['name']} {r['heldout_nll']:.6f}" for r in rows[v]),
                  file=sys.stderr)
    load.append(round(os.getloadavg()[0], 2))
    emit({"benchmark": "demo_drift", "demo_args": extra, "variants": {v: VARIANTS[v] for v in rows},
          "rows": rows, "max_abs_diff_vs_default": max_differences(rows), "seconds": seconds,
          "machine": environment(), "load_avg_1m": {"start": load[0], "end": load[1]},
          "date": time.strftime("%Y-%m-%d %H:%M:%S")}, a.out)


if __name__ == "__main__":
    main()
