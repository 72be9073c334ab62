"""How long a user waits for the one-line refusal of each bad command line (issue 31, item 8; goal: < 3 s on a quiet
2-core box for every case).

Runs every case of `tests/bad_input.CASES` (the table `tests/test_bad_input.py` asserts) in a fresh Python process,
in a folder of the same fixture files, `--rounds` times, and records the wall time from process start to exit (the
error line is the last thing printed), its median over the rounds, and whether transformers had been imported.

    python benchmarks/bench_first_error.py [--rounds 3] [--out benchmarks/results/first_error_<cpu>.json]

The JSON (with the CPU model, flags, thread count, load and versions) goes to stdout and, with `--out`, to that file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the case table lives with the test that asserts it

GOAL_S = 3.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each case (the median is reported)")
    ap.add_argument("--cases", default=None, help="comma-separated case ids (default: all)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args()

    from bench_report import emit
    from tests.bad_input import CASES, make_fixtures, run_case

    from tokensft.runtime import environment

    cases = [c for c in CASES if a.cases is None or c.id in a.cases.split(",")]
    load = [round(os.getloadavg()[0], 2)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_fixtures(tmp)
        times: dict[str, list[float]] = {c.id: [] for c in cases}
        results = {}
        for r in range(a.rounds):  # rounds interleave the cases, so a burst of load hits them alike
            for case in cases:
                res = run_case(case, folder)
                times[case.id].append(res["seconds"])
                results[case.id] = res
                print(f"round {r + 1} {case.id}: {res['seconds']:.2f} s", file=sys.stderr)
        for case in cases:
            res, med = results[case.id], statistics.median(times[case.id])
            rows.append({"id": case.id, "argv": list(case.argv), "exit_code": res["rc"],
                         "first_error": res["stderr_lines"][0] if res["stderr_lines"] else None,
                         "one_line": len(res["stderr_lines"]) == 1, "early": case.early,
                         "transformers_imported": res["transformers_imported"],
                         "seconds": [round(t, 3) for t in times[case.id]], "median_s": round(med, 3),
                         "under_goal": med < GOAL_S})
    load.append(round(os.getloadavg()[0], 2))
    meds = [r["median_s"] for r in rows]
    result = {"benchmark": "first_error", "goal_s": GOAL_S, "config": vars(a), "machine": environment(),
              "load_avg_1m": {"start": load[0], "end": load[1]},
              "summary": {"cases": len(rows), "under_goal": sum(r["under_goal"] for r in rows),
                          "max_median_s": max(meds), "median_of_medians_s": round(statistics.median(meds), 3),
                          "slowest": max(rows, key=lambda r: r["median_s"])["id"]},
              "cases": rows, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    emit(result, a.out)


if __name__ == "__main__":
    main()
