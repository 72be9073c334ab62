"""Training-step time per loss mode, relative to `sft` in the same run (SmolLM2-135M, B=2, T=512, LoRA r=32).

Times `TokenSFTTrainer.training_step` (forward + weights + backward; the optimizer step is the same for every mode and
left out) on one fixed random batch, interleaving the modes round-robin (the order rotated every round, so no mode
always runs first) so machine noise hits them alike, and reports
the median per mode and its ratio to `sft`. `sft-lr` runs twice: with the adapter-off reference (`adapter`) and with
precomputed reference log-probs (`cache`); the one-off cache build is reported in training-step equivalents. A mode
may carry scheme parameters as in `tokensft sweep --modes`: `sft-align:align_rule=clip-cosine`, and `@bf16` for
the same mode under `--bf16 true` (bf16 autocast, fp32 master weights): `sft,sft@bf16`.

    python benchmarks/bench_train_step.py [--modes sft,dft,...] [--rounds 5] [--model smollm2-135m-instruct] \
        [--out benchmarks/results/train_step_smollm2_b2_t512.json]

The JSON goes to stdout and, with `--out`, to that file (written whole or not at all).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEFAULT_MODES = "sft,dft,sft-topk,sft-antiop,sft-lr:adapter,sft-lr:cache,asft,sft-pk,rho1:adapter,eaft,sft-align"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--modes", default=DEFAULT_MODES)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lora_r", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared 2-core box)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from tokensft.cli.sweep import parse_variant
    from tokensft.data import CompletionCollator
    from tokensft.models import load_tokenizer, resolve_model
    from tokensft.trainer.config import TokenSFTConfig
    from tokensft.trainer.ref_cache import reference_log_probs
    from tokensft.trainer.trainer import TokenSFTTrainer

    torch.set_num_threads(a.threads)
    load_start = os.getloadavg()[0]
    torch.manual_seed(0)
    tok = load_tokenizer(a.model)
    path = resolve_model(a.model)
    vocab = len(tok)
    rows = []
    for _ in range(a.batch):
        ids = torch.randint(10, vocab, (a.seq,)).tolist()
        labels = [-100] * (a.seq // 4) + ids[a.seq // 4:]
        rows.append({"input_ids": ids, "labels": labels})
    trainers, batches = {}, {}
    out = tempfile.mkdtemp()
    cache_build_s = None
    for spec in a.modes.split(","):
        base_spec, _, precision = spec.partition("@")  # `MODE@bf16`: the same mode with --bf16 true (autocast)
        if precision not in ("", "bf16"):
            raise SystemExit(f"--modes {spec!r}: the only precision suffix is @bf16")
        mode, _, source = base_spec.partition(":")
        params = {}
        if "=" in source:  # a scheme variant, as in `tokensft sweep --modes`: sft-align:align_rule=clip-cosine
            _, mode, args = parse_variant(base_spec)
            params, source = {k.removeprefix("--"): v for k, v in zip(args[::2], args[1::2])}, ""
        cfg = TokenSFTConfig(output_dir=out, mode=mode, ref_source=source or None, report_to="none", **params,
                             per_device_train_batch_size=a.batch, gradient_checkpointing=False, max_length=None,
                             dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
                             disable_tqdm=True, bf16=precision == "bf16", use_cpu=not torch.cuda.is_available())
        tr = TokenSFTTrainer(
            model=path, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
            data_collator=CompletionCollator(tok.pad_token_id),
            peft_config=LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, target_modules="all-linear",
                                   task_type="CAUSAL_LM"),
        )
        tr.create_optimizer_and_scheduler(num_training_steps=10)
        tr.current_gradient_accumulation_steps = 1
        batch_rows = rows
        if source == "cache":
            t = time.perf_counter()
            with tr.model.disable_adapter():
                batch_rows = [{**r, "ref_log_probs": reference_log_probs(tr.model, r["input_ids"], r["labels"], "cpu")
                               .tolist()} for r in rows]
            cache_build_s = time.perf_counter() - t
        batch = CompletionCollator(tok.pad_token_id)(batch_rows)
        trainers[spec], batches[spec] = tr, batch
        tr.model.train()
        tr.training_step(tr.model, dict(batch), num_items_in_batch=torch.tensor(float(a.batch * a.seq * 3 // 4)))
    times = {s: [] for s in trainers}
    step_loss = {s: [] for s in trainers}  # the same batch and weights every round (no optimizer step)
    specs = list(trainers)
    for r in range(a.rounds):
        for spec in specs[r % len(specs):] + specs[: r % len(specs)]:  # rotate: no mode always runs first
            tr = trainers[spec]
            tr.model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            loss = tr.training_step(tr.model, dict(batches[spec]),
                                    num_items_in_batch=torch.tensor(float(a.batch * a.seq)))
            times[spec].append(time.perf_counter() - t)
            step_loss[spec].append(float(loss))
            print(f"{spec}: {times[spec][-1]:.2f}s", file=sys.stderr)
    # the loss pipeline alone (weights -> reduction -> statistics) on this batch's per-token inputs: what the
    # loss-core refactor changed; the forward/backward around it is the same code for every mode
    import tokensft.losses as losses

    pipeline_ms = {}
    for spec, tr in trainers.items():
        if not hasattr(losses, "TokenInputs"):  # an older checkout (benchmarked for its step time only)
            break
        StepTokenStats, loss_from_log_probs = losses.StepTokenStats, losses.loss_from_log_probs  # noqa: N806
        b = tr._prepare_inputs(dict(batches[spec]))
        with torch.no_grad():
            tok = tr._token_inputs(tr.model, b)
        tok = tok.replace(log_probs=tok.log_probs.detach().requires_grad_(True))
        reps = []
        for _ in range(20):
            t = time.perf_counter()
            out = loss_from_log_probs(tok, tr.scheme, params=tr.scheme_params, stat_scope=tr.args.stat_scope,
                                      reduction=losses.Reduction("token", int(tok.mask.sum())))
            acc = StepTokenStats()
            acc.add(out)
            acc.compute()
            reps.append(time.perf_counter() - t)
        pipeline_ms[spec] = round(1000 * statistics.median(reps), 3)
    med = {s: statistics.median(v) for s, v in times.items()}
    base = med.get("sft")
    res = {
        "config": vars(a),
        "load_avg_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2), "cores": os.cpu_count()},
        "step_s": {s: [round(t, 3) for t in v] for s, v in times.items()},
        "median_step_s": {s: round(v, 3) for s, v in med.items()},
        "ratio_to_sft": {s: round(v / base, 3) for s, v in med.items()} if base else None,
        # spread: the lowest and highest of the per-round ratios (each mode's step over sft's step of the same round)
        "ratio_to_sft_range": {s: [round(min(x / y for x, y in zip(v, times["sft"])), 3),
                                   round(max(x / y for x, y in zip(v, times["sft"])), 3)]
                               for s, v in times.items()} if base else None,
        "loss_pipeline_ms": pipeline_ms,
        "step_loss": {s: round(v[0], 6) for s, v in step_loss.items() if v},  # the first timed step's loss
        "cache_build_s_for_batch": None if cache_build_s is None else round(cache_build_s, 3),
        "cache_build_in_step_equivalents": None if (cache_build_s is None or not base) else round(cache_build_s / base, 3),
    }
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        from tokensft.io import atomic_write

        atomic_write(a.out, text + "\n")


if __name__ == "__main__":
    main()
