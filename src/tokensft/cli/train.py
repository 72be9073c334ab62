"""`tokensft train --config configs/<name>.yaml [--key value ...]`: fine-tune with a token-weighted loss.

Arguments are the fields of three dataclasses parsed by TRL's `TrlParser` (YAML config, then command-line
overrides): `TokenSFTConfig` (TRL's `SFTConfig` + mode, topk_keep_ratio, antiop_clip_mult, lr_weight_alpha,
kl_weight, stat_scope, normalization, ref_source, trace_* ...), `ModelArguments` (model, use_peft, lora_*) and
`DataArguments` (dataset, dataset_preset, template, ...). `tokensft train --help` lists them all.

    tokensft train --model smollm2-135m-instruct --dataset ../shared/data/math/train.jsonl \\
        --mode sft-antiop --use_peft --lora_r 32 --max_steps 30 --output_dir runs/antiop
"""

from __future__ import annotations

import argparse
import os
import sys


def parse(argv: list[str]):
    """Parse argv into `(TokenSFTConfig, ModelArguments, DataArguments)` with TrlParser (`--config` YAML aware)."""
    from trl import TrlParser

    from tokensft.trainer.config import DataArguments, ModelArguments, TokenSFTConfig

    parser = TrlParser((TokenSFTConfig, ModelArguments, DataArguments), prog="tokensft train",
                       description=__doc__.split("\n\n")[0], epilog=modes_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg, model_args, data_args = parser.parse_args_and_config(args=argv)
    if "--output_dir" not in " ".join(argv) and cfg.output_dir in (None, "trainer_output"):
        name = model_args.model.rstrip("/").split("/")[-1]
        cfg.output_dir = f"runs/{name}-{cfg.mode}"
    if cfg.report_to in (None, "all", ["all"]):
        cfg.report_to = "none"
    return cfg, model_args, data_args


def modes_epilog() -> str:
    """The `--help` section listing every registered loss mode with its parameters (from the declarations)."""
    from tokensft.losses import available_modes, get_scheme

    lines = ["loss modes (--mode) and their parameters:"]
    for m in available_modes():
        s = get_scheme(m)
        lines.append(f"  {m:<12} {s.description}" + (f"  [{s.source}]" if s.source else ""))
        for p in s.params:
            lines.append(f"  {'':<14}--{p.name} {p.default!s:<8} {p.help} Range {p.range_text()}.")
    lines += ["", "A scheme of your own: a Python file that calls tokensft.losses.register_scheme, passed with",
              "--scheme_files FILE; its parameters go in --scheme_args key=value (README, 'Add your own scheme')."]
    return "\n".join(lines)


def input_error(prog: str, error: Exception) -> int:
    """Report bad input as one line `PROG: error: MESSAGE` on stderr and return exit code 2 (re-raise, for the
    traceback, when TOKENSFT_DEBUG is set)."""
    if os.environ.get("TOKENSFT_DEBUG"):
        raise error
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, model_args, data_args = parse(argv)
    except ValueError as e:  # bad options: one line, before any model loads or anything is written
        return input_error("tokensft train", e)
    from tokensft.io import InputError
    from tokensft.trainer.run import train

    try:
        res = train(cfg, model_args, data_args)
    except InputError as e:  # bad data: one line naming the file, row and field; nothing was written
        return input_error("tokensft train", e)
    res.pop("trainer", None)
    print(f"saved {'adapter' if model_args.use_peft else 'model'} + config to {res['output_dir']}")
    for k in ("mode", "global_step", "final_nll", "train_runtime_s"):
        print(f"  {k}: {res[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
