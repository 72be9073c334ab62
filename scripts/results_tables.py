"""Rebuild every results table in README.md and docs/results.md from the run summaries committed in docs/results/data/.

    python scripts/results_tables.py            # rewrite the tables in place
    python scripts/results_tables.py --check    # exit 1, with a diff, if a doc's table differs from its data (CI)
    python scripts/results_tables.py snapshot runs/demo docs/results/data/demo --kind demo --modes sft,rho1

A generated table sits between two markers in the Markdown, which name the data folder and the part of it:

    <!-- results-table: demo main -->
    | Method | ... |
    <!-- /results-table -->

Each folder under docs/results/data/ holds only the small per-run summaries a run leaves behind (no adapters, no
traces): `eval/<key>/metrics.json`, `nll/<key>/heldout_nll.json` (per-sequence and per-category NLL sums),
`<run>/train_results.json` and `source.json` (what produced them: kind, modes, seeds,
command, date, machine). The tables are computed by the same functions the commands use (`tokensft.cli.sweep.
sweep_tables`, `tokensft.cli.demo.demo_tables`), so a table here is exactly what the command printed.

Parts: `all` (everything the command prints), `main` (its first table only), `final` (a study's rows at its last
training length, with the base model).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/results.md")
DATA = Path("docs/results/data")
SOURCE_FILE = "source.json"
MARKER = re.compile(r"(<!-- results-table: (\S+) (\S+) -->\n)(.*?)(<!-- /results-table -->)", re.S)
# the files a snapshot keeps: every table is computed from these and nothing else
KEPT = ("metrics.json", "heldout_nll.json", "train_results.json")


def render(data_dir: Path, part: str) -> str:
    """The table(s) `part` of the run summaries in `data_dir` (see the module docstring). Raises ValueError on an
    unknown kind or part, FileNotFoundError on a missing summary."""
    from tokensft.cli.demo import demo_tables
    from tokensft.cli.sweep import parse_variant, study_tables, sweep_tables

    src = json.loads((data_dir / SOURCE_FILE).read_text())
    names = [parse_variant(spec)[0] for spec in src["modes"]]  # each run's name from its --modes spec
    if src["kind"] == "demo":
        md = demo_tables(data_dir, src["modes"], src["seeds"][0])
    elif src["kind"] == "sweep":
        md = sweep_tables(data_dir, names, src["seeds"], baseline=src.get("baseline", "base"),
                          train_time=src.get("train_time", True))[0]
    elif src["kind"] == "study":
        steps = src["steps"][-1:] if part == "final" else src["steps"]
        md = study_tables(data_dir, names, src["seeds"], steps, baseline=src.get("baseline", "sft"),
                          labels=dict(zip(names, src["modes"])))[0]
        if part == "final":
            return md
    else:
        raise ValueError(f"{data_dir / SOURCE_FILE}: unknown kind {src['kind']!r} (demo, sweep or study)")
    if part == "all":
        return md
    if part == "main":
        return md.split("\n\n")[0].strip("\n") + "\n"
    raise ValueError(f"unknown part {part!r} (all, main or final)")


def rebuild(text: str, root: Path, where: str) -> str:
    """`text` with every marked table replaced by its rendering from `root / DATA / <name>`."""
    def sub(m: re.Match) -> str:
        name, part = m.group(2), m.group(3)
        folder = root / DATA / name
        if not folder.is_dir():
            raise FileNotFoundError(f"{where}: results-table {name!r}: no data folder {folder}")
        return m.group(1) + render(folder, part) + m.group(5)

    return MARKER.sub(sub, text)


def check_or_write(root: Path, *, check: bool) -> int:
    """Rebuild the marked tables of every doc under `root`; with `check`, print a diff and return 1 where a doc
    differs instead of writing it."""
    bad = 0
    for rel in DOCS:
        path = root / rel
        old = path.read_text()
        new = rebuild(old, root, rel)
        if new == old:
            continue
        if check:
            bad = 1
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{rel} (committed)",
                                                       f"{rel} (from {DATA})"))
        else:
            path.write_text(new)
            print(f"rewrote the tables of {rel}")
    n = sum(len(MARKER.findall((root / rel).read_text())) for rel in DOCS)
    print(f"{n} tables {'differ from their data' if bad else 'match their data'}" if check else f"{n} tables rebuilt")
    return bad


def snapshot(run: Path, dest: Path, source: dict) -> None:
    """Copy the small summaries of a demo or sweep directory `run` (the `KEPT` files, keeping their relative paths)
    to `dest`, with `source.json`; nothing else (no adapters, generations or traces). For a study, only the runs its
    tables read: each mode's seeds among `source["seeds"]` whose training and every evaluation have finished
    (`finished_seeds`), recorded per mode in `source.json`."""
    from tokensft.cli.sweep import eval_key, parse_variant

    keep = None
    if source["kind"] == "study":
        names = [parse_variant(spec)[0] for spec in source["modes"]]
        source = {**source, "seeds": finished_seeds(run, names, source["seeds"], source["steps"])}
        keep = {"base"} | {eval_key(m, s, t) for m, ss in source["seeds"].items() for s in ss for t in source["steps"]}
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(run.rglob("*")):
        rel = f.relative_to(run)
        if f.name not in KEPT or not f.is_file():
            continue
        if keep is None or (rel.parts[1] if rel.parts[0] in ("eval", "nll") else rel.parts[0]) in keep:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
    (dest / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def finished_seeds(run: Path, modes: list[str], seeds: list[int], steps: list[int | None]) -> dict[str, list[int]]:
    """Per mode, the seeds among `seeds` whose `train_results.json` and every length's `metrics.json` and
    `heldout_nll.json` exist under the study directory `run` (a run still training or evaluating is left out)."""
    from tokensft.cli.sweep import eval_key

    def done(mode: str, seed: int) -> bool:
        return (run / f"{mode}-s{seed}" / "train_results.json").is_file() and all(
            (run / sub / eval_key(mode, seed, t) / name).is_file()
            for t in steps for sub, name in (("eval", "metrics.json"), ("nll", "heldout_nll.json")))

    return {m: [s for s in seeds if done(m, s)] for m in modes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    p.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this script's)")
    sub = p.add_subparsers(dest="verb")
    s = sub.add_parser("snapshot", help="copy a run's small summaries into a data folder")
    s.add_argument("run", type=Path)
    s.add_argument("dest", type=Path)
    s.add_argument("--kind", choices=("demo", "sweep", "study"), required=True)
    s.add_argument("--modes", required=True, help="comma-separated variants as the sweep's --modes gives them "
                                                   "(MODE or MODE:key=value), in table order")
    s.add_argument("--seeds", default="0")
    s.add_argument("--steps", default="", help="study: the training lengths in table order (an --eval_steps value, "
                                                 "or 'final' for the finished run), e.g. 50,final")
    s.add_argument("--command", default="", help="the command that produced the run, recorded in source.json")
    s.add_argument("--note", default="", help="when, where and under what load it ran")
    args = p.parse_args(argv)
    if args.verb == "snapshot":
        source = {"kind": args.kind, "modes": args.modes.split(","), "seeds": [int(x) for x in args.seeds.split(",")],
                  "command": args.command, "note": args.note}
        if args.kind == "study":
            source["steps"] = [None if x == "final" else int(x) for x in args.steps.split(",") if x]
        snapshot(args.run, args.dest, source)
        return 0
    return check_or_write(args.root, check=args.check)


if __name__ == "__main__":
    sys.exit(main())
