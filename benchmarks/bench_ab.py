"""Training-step time of this checkout against an older commit, per loss mode: did a refactor change step time?

Runs `benchmarks/bench_train_step.py` (this tree's copy, the same script for both) once with this checkout's
`src/` and once with the older commit's (a temporary `git worktree`), as whole processes interleaved
old, new, old, new, ... (`--repeats` pairs), so load on a shared box hits both alike. Reports, per mode, the median
step time of each side over every timed step of its processes, the ratio new / old, the spread of the per-process
ratios, whether the first timed step's loss is the same on both sides (the same batch and weights: a refactor that
changes no arithmetic gives the same loss), and the 1-minute load average around every process.

    python benchmarks/bench_ab.py --base ec0f186 [--repeats 2] [--out benchmarks/results/x.json] \
        -- --modes sft,dft --rounds 3 --seq 256

Everything after `--` goes to `bench_train_step.py`. The JSON goes to stdout and, with `--out`, to that file
(written whole or not at all).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_side(src: Path, bench_args: list[str]) -> dict:
    """One `bench_train_step.py` process importing tokensft from `src`; its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    where = subprocess.run([sys.executable, "-c", "import tokensft; print(tokensft.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(src.resolve()):  # an installed copy shadowing PYTHONPATH
        raise SystemExit(f"PYTHONPATH={src} imports tokensft from {where}")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train_step.py"), *bench_args],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"bench_train_step.py with {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def main() -> None:
    argv = sys.argv[1:]
    bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the older commit (any git revision of this repository)")
    ap.add_argument("--repeats", type=int, default=2, help="old/new process pairs")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_report import emit

    base_sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", a.base], capture_output=True, text=True,
                              check=True).stdout.strip()
    new_sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"], capture_output=True,
                                text=True, check=True).stdout.strip())
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), base_sha],
                       capture_output=True, check=True)
        try:
            runs = []
            for i in range(a.repeats):
                for side, src in (("old", old_tree / "src"), ("new", ROOT / "src")):
                    load = os.getloadavg()[0]
                    res = run_side(src, bench_args)
                    runs.append({"side": side, "repeat": i, "load_avg_1m_before": round(load, 2), "json": res})
                    print(f"{side} {i}: {res['median_step_s']}", file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)],
                           capture_output=True, check=False)
    modes = list(runs[0]["json"]["step_s"])
    pooled = {side: {m: statistics.median([t for r in runs if r["side"] == side for t in r["json"]["step_s"][m]])
                     for m in modes} for side in ("old", "new")}
    pairs = [(runs[k]["json"], runs[k + 1]["json"]) for k in range(0, len(runs), 2)]
    result = {
        "what": "TokenSFTTrainer.training_step per loss mode, this checkout (new) against an older commit (old): "
                "the same benchmarks/bench_train_step.py as whole processes interleaved old, new, old, new",
        "old": base_sha, "new": new_sha + (" + uncommitted changes" if dirty else ""),
        "bench_train_step_args": bench_args,
        "pooled_median_step_s": {side: {m: round(v, 3) for m, v in d.items()} for side, d in pooled.items()},
        "new_over_old": {m: round(pooled["new"][m] / pooled["old"][m], 3) for m in modes},
        "new_over_old_per_pair": {m: [round(n["median_step_s"][m] / o["median_step_s"][m], 3) for o, n in pairs]
                                  for m in modes},
        "same_step_loss": {m: all(r["json"]["step_loss"][m] == runs[0]["json"]["step_loss"][m] for r in runs)
                           for m in modes},
        "load_avg_1m": [(r["side"], r["load_avg_1m_before"], r["json"]["load_avg_1m"]["end"]) for r in runs],
        "cores": os.cpu_count(),
        "runs": runs,
    }
    emit(result, a.out)


if __name__ == "__main__":
    main()
