"""The arithmetic study (docs/results.md §0): every built-in loss mode, on the same batches, seed after seed.

    python scripts/arithmetic_study.py                       # all 11 modes x seeds 0,1,2; resumable: rerun to go on
    python scripts/arithmetic_study.py --knobs --seeds 0         # one sweep of each dropping scheme's main knob
    python scripts/arithmetic_study.py --seeds 0 --modes sft,sft-antiop --threads 2

For each seed it runs `tokensft sweep` over every mode (configs/arithmetic-study.yaml: LoRA r=16, 100 steps of 4
built-in arithmetic problems), evaluates the base model once and every run after 50 steps (its checkpoint; the
learning rate is constant after warm-up) and after 100 on the same 256 held-out problems (greedy accuracy, up to 96
new tokens) and scores the teacher-forced NLL of their reference solutions. Everything resumes where it stopped:
finished trainings and evaluations are kept, a killed training continues from its newest complete checkpoint.
`python scripts/results_tables.py snapshot OUT docs/results/data/study --kind study` then keeps the summaries.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = "sft,sft-antiop,rho1,sft-topk,sft-lr,dft,asft,sft+kl,sft-pk,eaft,sft-align"
# one sweep of each dropping scheme's main knob, around the reference study's values (antiop c = 3, topk keep 0.7) and
# the papers' (rho1 keep 0.6, sft-pk k = 10); the rows of docs/results.md §0 named MODE:key=value
KNOBS = ("sft-antiop:antiop_clip_mult=10,sft-topk:topk_keep_ratio=0.9,rho1:rho1_keep_ratio=0.9,"
         "sft-antiop:antiop_clip_mult=100,sft-pk:pk_power=2")
TEST_PROBLEMS = 256


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/study", help="study directory (default: %(default)s)")
    p.add_argument("--config", default=str(ROOT / "configs/arithmetic-study.yaml"), help="the shared recipe")
    p.add_argument("--modes", default=MODES, help="comma-separated modes, in run order (default: all built-ins)")
    p.add_argument("--knobs", action="store_true", help="run the knob sweep (MODE:key=value variants) instead")
    p.add_argument("--seeds", default="0,1,2", help="seeds, run one after the other (default: %(default)s)")
    p.add_argument("--eval_steps", default="50", help="earlier checkpoints also evaluated (default: %(default)s)")
    p.add_argument("--threads", default="1", help="CPU threads (default 1: leaves the other core free)")
    p.add_argument("--problems", type=int, default=TEST_PROBLEMS, help="held-out problems (default: %(default)s)")
    p.add_argument("--max_new_tokens", type=int, default=96, help="generation limit (default: %(default)s)")
    args = p.parse_args(argv)
    modes = KNOBS if args.knobs else args.modes

    from tokensft.cli import sweep
    from tokensft.data import load_records
    from tokensft.io import atomic_write

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test_path = out / "arithmetic_test.jsonl"
    if not test_path.is_file():
        rows = load_records("builtin:arithmetic", split="test", limit=args.problems, builtin_max_steps=2)
        atomic_write(test_path, "".join(json.dumps(r) + "\n" for r in rows))
    parser = argparse.ArgumentParser(prog="tokensft")
    sweep.add_parser(parser.add_subparsers())
    for seed in [s for s in args.seeds.split(",") if s]:
        sweep_args = parser.parse_args([
            "sweep", "--config", args.config, "--modes", modes, "--seeds", seed, "--out", str(out),
            "--benchmark", "arithmetic", "--data", str(test_path), "--limit", str(args.problems),
            "--max_new_tokens", str(args.max_new_tokens), "--batch_size", "64", "--nll_data", str(test_path),
            "--eval_steps", args.eval_steps, "--threads", args.threads, "--backend", "transformers", "--no_table"])
        if rc := sweep.main(sweep_args):
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
