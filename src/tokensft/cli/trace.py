"""`tokensft trace analyze RUN_DIR` / `tokensft trace compare RUN_A RUN_B ...`: per-token gradient trace analyses.

    tokensft trace analyze runs/sft-antiop                      # -> runs/sft-antiop/analysis/report.html
    tokensft trace analyze runs/sft --out reports/sft
    tokensft trace compare runs/sft runs/sft-antiop --names SFT antiop --out reports/sft_vs_antiop
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = (
    "Analyse the per-token gradient traces a run wrote with --trace_every_n_steps (RUN_DIR/traces/). Reads the "
    "trace files only (decoded tokens are in the trace; no model is loaded). Metric definitions and how to read "
    "every figure: docs/analysis.md."
)
ANALYZE_DESCRIPTION = (
    "Write summary.json (headline table for the per-position and per-token-loss quantities: Gini, tokens for 80% "
    "of gradient weight, opposing fraction, alignment by token category, magnitude-alignment Pearson r, "
    "loss-alignment Spearman rho, scheme agreement; plus every figure's data), one PNG and PDF per analysis (the "
    "reference study's 14 plus loss vs. alignment and scheme agreement) and a self-contained report.html with "
    "every figure and a reading guide. Torn or unreadable trace files are skipped with a warning."
)
COMPARE_DESCRIPTION = (
    "Compare two or more runs' traces (e.g. sft vs. sft-antiop): metric x run table (comparison.md, "
    "comparison.csv, printed), overlaid figures (Lorenz curves, alignment by token category, alignment vs. "
    "position) and compare.html."
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `trace` verb with its `analyze` and `compare` sub-verbs on a top-level `add_subparsers()`."""
    p = subparsers.add_parser("trace", help="`trace analyze RUN` / `trace compare RUN...`: per-token gradient analyses",
                              description=DESCRIPTION)  # fmt: skip
    sub = p.add_subparsers(dest="trace_command", metavar="{analyze,compare}", required=True)
    a = sub.add_parser("analyze", help="one run's traces -> summary.json, figures, report.html",
                       description=ANALYZE_DESCRIPTION)  # fmt: skip
    a.add_argument("run_dir", metavar="RUN_DIR", help="training output directory holding traces/")
    a.add_argument("--out", default=None, metavar="DIR", help="output directory (default: RUN_DIR/analysis)")
    a.add_argument("--name", default=None, help="run name shown in the report (default: the directory name)")
    a.add_argument("--no_pdf", action="store_true", help="write PNG figures only (no PDF copies)")
    a.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    c = sub.add_parser("compare", help="metric x run table and overlaid figures of several runs",
                       description=COMPARE_DESCRIPTION)  # fmt: skip
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="two or more training output directories with traces/")
    c.add_argument("--names", nargs="+", default=None, help="display names, one per RUN_DIR (default: directory names)")
    c.add_argument("--out", default="trace_compare", metavar="DIR", help="output directory (default: ./trace_compare)")
    c.add_argument("--no_pdf", action="store_true", help="write PNG figures only (no PDF copies)")
    c.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=main)
    return p


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser (`python -m tokensft.cli.trace ...`)."""
    root = argparse.ArgumentParser(prog="tokensft")
    add_parser(root.add_subparsers(dest="command"))
    return root


def _print_headline(summary: dict) -> None:
    from tokensft.analysis.report import fmt_value
    from tokensft.analysis.summary import summary_headline_rows

    qs = summary["run"]["quantities"]
    labels = summary["run"]["quantity_labels"]
    rows = summary_headline_rows(summary)
    width = max(len(label) for _, label in rows)
    print(f"{'metric'.ljust(width)}  " + "  ".join(f"{labels[q]:>14}" for q in qs))
    for key, label in rows:
        cells = "  ".join(f"{fmt_value(key, summary['headline'][q].get(key)):>14}" for q in qs)
        print(f"{label.ljust(width)}  {cells}")


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """Run `tokensft trace analyze|compare` from parsed arguments or an argv list (without the `trace` verb)."""
    if not isinstance(args, argparse.Namespace):
        argv = list(sys.argv[1:] if args is None else args)
        if argv[:1] != ["trace"]:
            argv = ["trace", *argv]
        args = build_parser().parse_args(argv)
    formats = ("png",) if args.no_pdf else ("png", "pdf")
    try:
        if args.trace_command == "analyze":
            from tokensft.analysis import analyze_run

            out = Path(args.out) if args.out else Path(args.run_dir) / "analysis"
            summary = analyze_run(args.run_dir, out, progress=not args.no_progress, formats=formats, name=args.name)
            _print_headline(summary)
            if summary.get("premise"):
                print(f"\npremise metrics over {summary['premise']['steps']} logged steps (mean / first / last):")
                for k, v in summary["premise"]["metrics"].items():  # NaN (no flagged token) is null in the JSON
                    cells = " ".join("     nan" if v[c] is None else f"{v[c]:8.3f}" for c in ("mean", "first", "last"))
                    print(f"  {k:<28} {cells}")
            skipped = [f for f in summary["figures"] if f["skipped"]]
            for f in skipped:
                print(f"skipped ({f['number']}) {f['title']}: {f['skipped']}", file=sys.stderr)
            print(f"wrote {out / 'report.html'}, {out / 'summary.json'} and "
                  f"{len(summary['figures']) - len(skipped)} figures", file=sys.stderr)  # fmt: skip
            return 0
        from tokensft.analysis.compare import compare_runs, table_markdown

        table = compare_runs(args.runs, names=args.names, out_dir=args.out, progress=not args.no_progress,
                             formats=formats)  # fmt: skip
        print(table_markdown(table), end="")
        print(f"wrote {Path(args.out) / 'comparison.md'}, comparison.csv, compare.html and figures", file=sys.stderr)
        return 0
    except (FileNotFoundError, ValueError) as e:
        print(f"tokensft trace {args.trace_command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
