"""bf16 against fp32 training on the CPU, end to end: step time and the held-out NLL the trained adapters reach.

Trains SmolLM2-135M-Instruct with LoRA (the README's real-data recipe, `configs/smollm2_math_antiop.yaml`, mode
sft, `--max_steps` steps, 1 thread) once with `--bf16 false` and once with `--bf16 true`, then scores the first
`--limit` MATH-500 reference solutions with `tokensft eval nll` (float32 scoring for every model, so only training
differs): each adapter against the base model, and the bf16 adapter against the fp32 one (paired per-sequence Δ with
its 95% CI). The two trainings run one after the other, so their step times are read with the load average beside
them; `benchmarks/bench_train_step.py --modes sft,sft@bf16` gives the interleaved step-time ratio.

    python benchmarks/bench_bf16_train_nll_cpu.py --work_dir /tmp/bf16run --out benchmarks/results/bf16_train_nll_cpu.json
    python benchmarks/bench_bf16_train_nll_cpu.py --work_dir /tmp/bf16run --collect_only --out ...   # from a finished run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_report import emit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "math500" / "test.jsonl"


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", required=True, help="adapters, NLL runs and logs go here")
    p.add_argument("--max_steps", type=int, default=12)
    p.add_argument("--limit", type=int, default=64, help="MATH-500 reference solutions scored")
    p.add_argument("--collect_only", action="store_true", help="only read a finished --work_dir")
    p.add_argument("--out", default=None, help="also write the JSON here (whole or not at all)")
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tok = [sys.executable, "-m", "tokensft.cli.main"]
    nll = [*tok, "eval", "nll", "--model", "smollm2-135m-instruct", "--data", str(DATA), "--limit", str(args.limit),
           "--threads", "1", "--no_progress"]
    load = {}
    if not args.collect_only:
        load["start"] = os.getloadavg()[0]
        for dt in ("false", "true"):
            _run([*tok, "train", "--config", "configs/smollm2_math_antiop.yaml", "--mode", "sft", "--max_steps",
                  str(args.max_steps), "--bf16", dt, "--threads", "1", "--output_dir", str(work / f"sft-bf16-{dt}")],
                 work / f"train_{dt}.log")
        _run([*nll, "--output_dir", str(work / "nll-base")], work / "nll_base.log")
        for dt in ("false", "true"):
            _run([*nll, "--adapter", str(work / f"sft-bf16-{dt}"), "--output_dir", str(work / f"nll-{dt}"),
                  "--baseline", str(work / "nll-base")], work / f"nll_{dt}.log")
        _run([*nll, "--adapter", str(work / "sft-bf16-true"), "--output_dir", str(work / "nll-true-vs-false"),
              "--baseline", str(work / "nll-false")], work / "nll_tvf.log")
        load["end"] = os.getloadavg()[0]

    from tokensft.eval.heldout import paired_nll_difference

    def read(name: str) -> dict:
        return json.loads((work / name / "heldout_nll.json").read_text())

    base, runs = read("nll-base"), {dt: read(f"nll-{dt}") for dt in ("false", "true")}
    trained = {dt: json.loads((work / f"sft-bf16-{dt}" / "train_results.json").read_text()) for dt in runs}
    res = {
        "benchmark": "bf16_train_nll_cpu",
        "recipe": "configs/smollm2_math_antiop.yaml, mode sft, LoRA r=32, batch 4, 512 tokens, 1 thread",
        "max_steps": args.max_steps, "heldout": f"first {args.limit} MATH-500 reference solutions, fp32 scoring",
        "load_avg_1m": load or "not measured by this call (--collect_only)",
        "train_runtime_s": {("bf16" if dt == "true" else "fp32"): trained[dt]["train_runtime_s"] for dt in runs},
        "train_nll_last10": {("bf16" if dt == "true" else "fp32"): round(trained[dt]["nll_last10"], 5) for dt in runs},
        "heldout_nll_per_token": {"base": round(base["nll_per_token"], 5),
                                  **{("bf16" if dt == "true" else "fp32"): round(r["nll_per_token"], 5)
                                     for dt, r in runs.items()}},
        "delta_vs_base": {("bf16" if dt == "true" else "fp32"): _rounded(paired_nll_difference(r, base))
                          for dt, r in runs.items()},
        "delta_bf16_minus_fp32": _rounded(paired_nll_difference(runs["true"], runs["false"])),
    }
    emit(res, args.out)


def _rounded(d: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) else [round(x, 5) for x in v] if isinstance(v, (list, tuple))
                else v) for k, v in d.items() if not isinstance(v, dict)}


if __name__ == "__main__":
    main()
