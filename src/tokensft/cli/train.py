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
from pathlib import Path


def parse(argv: list[str]):
    """Parse argv into `(TokenSFTConfig, ModelArguments, DataArguments)` with TrlParser (`--config` YAML aware)."""
    from trl import TrlParser

    from tokensft.trainer.config import DataArguments, ModelArguments, TokenSFTConfig

    parser = TrlParser((TokenSFTConfig, ModelArguments, DataArguments), prog="tokensft train",
                       description=__doc__.split("\n\n")[0], epilog=modes_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    check_config_keys(argv, save_option_names(parser))

    def one_line(message: str):  # argparse would print the 188-line usage block first: the message alone is the news
        raise ValueError(message)

    parser.error = one_line
    cfg, model_args, data_args = parser.parse_args_and_config(args=argv)
    if "--output_dir" not in " ".join(argv) and cfg.output_dir in (None, "trainer_output"):
        name = model_args.model.rstrip("/").split("/")[-1]
        cfg.output_dir = f"runs/{name}-{cfg.mode}"
    if cfg.report_to in (None, "all", ["all"]):
        cfg.report_to = "none"
    return cfg, model_args, data_args


def _config_path(argv: list[str]) -> str | None:
    i = next((i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")), None)
    if i is None:
        return None
    return argv[i].split("=", 1)[1] if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else None)


def _option_names_file() -> Path:
    """Where the full parser's option names are kept for the precheck: one file per TRL and transformers version
    (read from the installed packages' metadata, without importing them)."""
    from importlib.metadata import version

    from tokensft.models import cache_dir

    return Path(cache_dir()) / f"option-names-trl{version('trl')}-transformers{version('transformers')}.json"


def unknown_keys_problem(keys, known: set[str], where: str) -> str | None:
    """One line naming the keys of `keys` that are no option, each with the closest option, or None."""
    import difflib

    unknown = [k for k in keys if k not in known and k != "env"]  # TrlParser reads a YAML's `env:` itself
    if not unknown:
        return None
    hints = [f"{k!r}" + (f" (did you mean {m[0]}?)" if (m := difflib.get_close_matches(str(k), known, n=1)) else "")
             for k in unknown]
    return (f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; `tokensft train --help` "
            "lists the options")


def check_config_keys(argv: list[str], known: set[str] | None = None) -> None:
    """Refuse a `--config` YAML key that is no option, naming the file, the key and the closest option (TRL's own
    message names neither the file nor a fix). `known`: the full parser's option names; None (the precheck, before
    TRL is imported) reads those an earlier full parse saved (`_option_names_file`), and skips the check until one has
    run with this TRL and transformers.

    Raises:
        ValueError: one line `--config FILE: unknown key 'lerning_rate' (did you mean learning_rate?)`.
    """
    import json

    path = _config_path(argv)
    if path is None:
        return
    if known is None:
        try:
            known = set(json.loads(_option_names_file().read_text()))
        except (OSError, ValueError):
            return
    import yaml

    keys = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if problem := unknown_keys_problem(keys, known, f"--config {path}"):
        raise ValueError(problem)


def save_option_names(parser) -> set[str]:
    """The full parser's option names, saved once per TRL and transformers version for the next precheck (a read-only
    cache only costs that precheck the unknown-key check)."""
    import json

    known = {a.dest for a in parser._actions}
    try:
        names = _option_names_file()
        if not names.is_file():
            from tokensft.io import atomic_write

            atomic_write(names, json.dumps(sorted(known)))
    except OSError:
        pass
    return known


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


def threads_count(value: str) -> int:
    """argparse type of `--threads`: an integer >= 0 (0 = choose by measurement); else a one-line usage error."""
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 (0 = choose by measurement), got {value!r}")
    return n


def int_at_least(low: int):
    """argparse type: an integer >= `low` (counts, limits, batch sizes); else a one-line usage error."""
    def parse_count(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = low - 1
        if n < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value!r}")
        return n

    parse_count.__name__ = f"integer >= {low}"
    return parse_count


def input_error(prog: str, error: Exception) -> int:
    """Report bad input as one line `PROG: error: MESSAGE` on stderr and return exit code 2 (re-raise, for the
    traceback, when TOKENSFT_DEBUG is set)."""
    if os.environ.get("TOKENSFT_DEBUG"):
        raise error
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def _options(argv: list[str]) -> dict:
    """The options of a `tokensft train` command line as plain strings: the `--config` YAML's keys, overridden by
    `--key value` / `--key=value` pairs of argv (a flag without a value is "true"). For the quick checks only; the
    full parse is TrlParser's."""
    opts: dict = {}
    if "--config" in argv or any(a.startswith("--config=") for a in argv):
        import yaml

        i = next(i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config="))
        path = argv[i].split("=", 1)[1] if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else "")
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"--config {path}: cannot read it ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else path
            raise ValueError(f"--config {where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a mapping of option: value, got {type(loaded).__name__}")
        opts.update(loaded)
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            key, eq, value = a[2:].partition("=")
            if not eq:
                if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    value, i = argv[i + 1], i + 1
                else:
                    value = "true"
            opts[key] = value
        i += 1
    return opts


def precheck(argv: list[str], *, output_dir: bool = True) -> None:
    """Check a `tokensft train` command line in about a second, before transformers, TRL and PEFT are imported (that
    alone takes several seconds): `--config` readable, `--mode` known, every declared option's type, range or choices
    (`tokensft.trainer.arguments.declared_options`: tokensft's own, the tracer's, the schemes' parameters and the
    checks on TRL's), model paths that exist, an `--output_dir` that does not overlap the model, the data or the cache
    (`check_output_dir`) and is not an existing run or a user's folder (`plan_output_dir`), local `--dataset` /
    `--eval_dataset` files present, readable and with usable rows (`conversations_of`).

    `output_dir=False` skips the output-directory checks (a sweep names each run's directory itself).

    Raises:
        ValueError: one line naming the option (or the file and line) and what is wrong.
    """
    opts = _options(argv)
    from tokensft.losses.schemes import all_params, available_modes, load_scheme_file
    from tokensft.options import validate_options

    files = opts.get("scheme_files") or []
    for f in [files] if isinstance(files, str) else files:
        load_scheme_file(f)
    mode = str(opts.get("mode", "sft"))
    if mode not in available_modes():
        raise ValueError(f"--mode {mode!r} is unknown; choose one of {', '.join(available_modes())}")
    from tokensft.trainer.arguments import declared_options

    validate_options(opts, declared_options())  # every declared option's type, range or choices, in one place
    from tokensft.trainer.arguments import typed_value, unhonoured_problem

    if problem := unhonoured_problem(opts):  # a TRL option tokensft would ignore
        raise ValueError(problem)
    check_config_keys(argv)
    params = all_params()
    raw = opts.get("scheme_args") or []
    for item in raw.items() if isinstance(raw, dict) else [raw] if isinstance(raw, str) else raw:
        key, _, value = item if isinstance(item, tuple) else str(item).partition("=")
        if key in params:  # unknown keys are named by the full parse, with the list of declared ones
            params[key].validate(value)
    from tokensft.models import cache_dir, check_model_ref
    from tokensft.trainer.outputs import check_output_dir

    try:
        check_model_ref(opts.get("model") and str(opts["model"]), "--model")
        check_model_ref(opts.get("ref_model_name_or_path") and str(opts["ref_model_name_or_path"]),
                        "--ref_model_name_or_path")
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if output_dir and opts.get("output_dir"):  # never over the model's, the data's or the cache's files (trainer.outputs)
        check_output_dir(str(opts["output_dir"]), inputs={
            "--model": opts.get("model"), "--ref_model_name_or_path": opts.get("ref_model_name_or_path"),
            "--dataset": opts.get("dataset")}, caches={"the model cache": cache_dir()})
        from tokensft.trainer.outputs import plan_output_dir

        resume = typed_value(opts.get("resume_from_checkpoint")) or None  # None/false: start; true or a path
        # an existing run or a user's own folder: refused here in a second rather than after the model loads
        plan_output_dir(str(opts["output_dir"]), resume=resume if resume in (None, True) else str(resume),
                        overwrite=bool(typed_value(opts.get("overwrite_output_dir"))),
                        max_steps=int(opts.get("max_steps", -1)), apply=False)  # validated above
    from tokensft.data.loading import load_records
    from tokensft.data.presets import conversations_of

    for key in ("dataset", "eval_dataset"):
        source = opts.get(key)
        if isinstance(source, str) and source and not source.startswith("builtin:") and Path(source).exists():
            try:
                records = load_records(source, split=str(opts.get("dataset_split", "train")))
            except FileNotFoundError as e:
                raise ValueError(f"--{key}: {e}") from None
            preset = opts.get("dataset_preset")
            # every row as chat messages, as training reads it: an empty file, a missing field, a field of the wrong
            # type (a role that is not a string), no completion at all, named by file and row in a second
            conversations_of(records, None if preset in (None, "None", "none", "") else str(preset), source=source)
        elif isinstance(source, str) and source.startswith(("./", "../", "/", "~")) or str(source).endswith(
                (".jsonl", ".json", ".parquet", ".jsonl.gz")):
            raise ValueError(f"--{key} {source}: no such file (cwd {Path.cwd()})")


COMMON_TRAINER_OPTIONS = (
    "output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "max_length", "logging_steps", "save_strategy",
    "save_steps", "save_total_limit", "resume_from_checkpoint", "gradient_checkpointing", "bf16", "seed",
)


def short_help() -> str:
    """`tokensft train --help`: tokensft's own options (loss mode, scheme parameters, reference, tracing, model and
    data), then the most used TRL / transformers options; `--help-all` lists every one of TRL's."""
    import dataclasses

    from trl import SFTConfig

    from tokensft.trainer.config import DataArguments, ModelArguments, TokenSFTConfig

    def describe(f: dataclasses.Field) -> str:
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        text = " ".join(str(f.metadata.get("help", "")).split())
        return f"  --{f.name} (default: {default})\n      {text}" if text else f"  --{f.name} (default: {default})"

    trl_names = {f.name for f in dataclasses.fields(SFTConfig)}
    fields = {f.name: f for f in dataclasses.fields(TokenSFTConfig)}
    own = [f for name, f in fields.items() if name not in trl_names]
    own = [f for f in own if not f.name.startswith("trace_")] + [f for f in own if f.name.startswith("trace_")]
    parts = [
        "usage: tokensft train [--config RECIPE.yaml] [--key value ...]",
        "",
        __doc__.split("\n\n")[0],
        "Options come from a YAML recipe (--config; configs/ has several) and/or the command line, which wins.",
        "",
        "tokensft options (loss, reference model, tracing):",
        *(describe(f) for f in own),
        "",
        "model options:",
        *(describe(f) for f in dataclasses.fields(ModelArguments)),
        "",
        "data options:",
        *(describe(f) for f in dataclasses.fields(DataArguments)),
        "",
        "most used TRL / transformers training options:",
        *(describe(fields[n]) for n in COMMON_TRAINER_OPTIONS if n in fields),
        "",
        modes_epilog(),
        "",
        f"tokensft train --help-all lists all {len(fields) + len(dataclasses.fields(ModelArguments))} options "
        "(TRL's SFTConfig and transformers' TrainingArguments included).",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help-all" in argv:
        argv = [a if a != "--help-all" else "--help" for a in argv]
    elif {"-h", "--help"} & set(argv):
        print(short_help())
        return 0
    if not ({"-h", "--help"} & set(argv)):
        try:
            precheck(argv)
        except ValueError as e:  # within about a second, before the heavy imports
            return input_error("tokensft train", e)
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
        print(f"  {k}: {res[k]:.4f}" if isinstance(res[k], float) else f"  {k}: {res[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
