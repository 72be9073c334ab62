"""`tokensft ref-cache --config configs/<run>.yaml --ref_cache_dir DIR`: precompute reference log-probs once.

Takes the same configuration as `tokensft train` (so the cached values align with the tokenized training data),
runs the reference model (`--ref_model_name_or_path`, default the starting model) once over the training set and
stores the log-prob of every target token under `--ref_cache_dir`. Then train with
`--mode sft-lr --ref_source cache --ref_cache_dir DIR`: no reference model in memory, no reference forward per step.
Resumable: an interrupted build continues where it stopped.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from tokensft.cli.train import input_error, parse, precheck

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("All `tokensft train` options are accepted; see `tokensft train --help`.")
        return 0
    try:
        precheck(argv)  # the options `tokensft train` checks, within about a second, before the heavy imports
        cfg, model_args, data_args = parse(argv)
    except ValueError as e:
        return input_error("tokensft ref-cache", e)
    if not cfg.ref_cache_dir:
        print("tokensft ref-cache: error: --ref_cache_dir is required", file=sys.stderr)
        return 2
    from tokensft.io import InputError
    from tokensft.models import load_tokenizer
    from tokensft.trainer.ref_cache import build_ref_cache
    from tokensft.trainer.run import build_datasets

    tokenizer = load_tokenizer(model_args.model)
    source = cfg.ref_source
    cfg.ref_source = None  # build the plain tokenized data set, without attaching a cache
    try:
        train_ds, _ = build_datasets(cfg, model_args, data_args, tokenizer)
    except InputError as e:
        return input_error("tokensft ref-cache", e)
    cfg.ref_source = source
    out = build_ref_cache(
        train_ds, cfg.ref_cache_dir, model=cfg.ref_model_name_or_path or model_args.model, tokenizer=tokenizer,
        template=data_args.template, max_length=cfg.max_length, dtype=model_args.dtype,
    )
    print(f"reference cache for {len(train_ds)} examples in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
