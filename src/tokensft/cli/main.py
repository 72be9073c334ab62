"""`tokensft` command line: dispatches to one module per verb (`tokensft <verb> --help` explains each)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys

# verb -> (module, one-line help); modules are imported lazily so `tokensft --help` is fast
VERBS = {
    "demo": ("tokensft.cli.demo", "the main job on built-in data: LoRA sft vs sft-antiop on SmolLM2-135M, 50 steps, side by side"),
    "train": ("tokensft.cli.train", "fine-tune with a token-weighted loss (TRL SFTTrainer; YAML --config + overrides)"),
    "eval": ("tokensft.cli.eval", "evaluate on MATH-500 / GSM8K / ...; `eval compare` builds the results table"),
    "ref-cache": ("tokensft.cli.ref_cache", "precompute reference log-probs for sft-lr (ref_source=cache)"),
    "trace": ("tokensft.cli.trace", "`trace analyze RUN` / `trace compare RUN...`: per-token gradient analyses"),
    "viz": ("tokensft.cli.viz", "Gradio visualizer of per-token gradient traces"),
    "sweep": ("tokensft.cli.sweep", "train + evaluate several modes and seeds, resumable, with a results table"),
}
# verbs that parse their own argv (TrlParser over dataclasses)
RAW_VERBS = {"train", "ref-cache"}


def _available() -> dict[str, tuple[str, str]]:
    return {k: v for k, v in VERBS.items() if importlib.util.find_spec(v[0]) is not None}


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as one line, `PROG: error: MESSAGE` (exit 2), instead of the usage block and then
    the message: the usage of `tokensft eval` alone is a dozen lines (`--help` still prints it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="tokensft",
        description="Token-weighted supervised fine-tuning: train with per-token loss weights, trace which tokens "
        "push the model along or against the aggregate gradient, and evaluate on MATH-500.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<verb>")
    for name, (module, helptext) in _available().items():
        if name in RAW_VERBS:
            sub.add_parser(name, help=helptext, add_help=False)
        else:
            importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("TOKENSFT_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in RAW_VERBS and argv[0] in _available():
        return importlib.import_module(VERBS[argv[0]][0]).main(argv[1:]) or 0
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
