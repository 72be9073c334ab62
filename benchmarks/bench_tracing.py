"""Cost of one per-token gradient trace, in training-step equivalents, and of the per-token-loss alignment vs. brute
force (one backward per token). Prints JSON.

Setup (issue 5): SmolLM2-135M-Instruct (`resolve_model("smollm2-135m-instruct")`, fp32), LoRA r=32 (alpha 64) on
all linear layers, one 512-token sequence (a MATH train problem + solution in the chat template; the prompt is not
supervised). A training step = forward + backward + AdamW step on the LoRA parameters with the model's own attention
(SDPA); the trace runs in eval mode with eager attention, as the callback does.

A training step is timed at the start and at the end (median of `--repeats` each) and the mean is the unit.
Components timed (median of `--repeats` after one warm-up; projection norms once):
- `per_position`: forward + backward with hooks on every LoRA A/B module + the per-position math;
- `G_delta`: forward + backward for G and dL/dh (shared with `per_position` in the callback);
- `alignment_jvp` / `alignment_double_backward`: all <grad l_t, G> given G;
- `norms_exact`: batched VJPs, measured on every `--norm_sample`-th target and scaled to all targets;
- `norms_projection_k`: k random JVP directions;
- `ref_forward`: the no-grad forward with the adapter disabled (weights of `sft-lr`);
- `brute_force`: forward + one backward per target, measured on `--brute_tokens` targets and scaled.
Accuracy on the sampled targets: JVP dots vs. brute force, exact norms vs. brute force, projection vs. exact norms.

Usage: nice python benchmarks/bench_tracing.py [--threads 1] [--full]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SHARED_MATH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "math" / "train.jsonl"


def build_sequence(tokenizer, seq_len: int, vocab: int):
    """(input_ids, labels) `(seq_len,)`: the first MATH train row whose chat-formatted problem + solution reaches
    `seq_len` tokens (cut there); random tokens with a short prompt when the shared data is missing."""
    if SHARED_MATH.is_file():
        with open(SHARED_MATH, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                msgs = [{"role": "user", "content": row["problem"]}]
                prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
                full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": row["solution"]}],
                                                     tokenize=True)
                prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
                full = list(full["input_ids"] if hasattr(full, "keys") else full)
                if len(full) >= seq_len and len(prompt) < seq_len // 2:
                    ids = torch.tensor(full[:seq_len])
                    labels = ids.clone()
                    labels[: len(prompt)] = -100
                    return ids, labels, row["unique_id"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (seq_len,), generator=g)
    labels = ids.clone()
    labels[: min(64, seq_len // 4)] = -100
    return ids, labels, "random"


def timed(fn, repeats: int, warmup: bool = True):
    if warmup:
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--lora_r", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--norm_sample", type=int, default=8, help="time exact norms on every n-th target, scale up")
    ap.add_argument("--brute_tokens", type=int, default=16, help="targets timed for brute force, scaled up")
    ap.add_argument("--directions", type=int, default=16, help="k of the projection norms")
    ap.add_argument("--batch_size", type=int, default=16, help="VJPs / JVPs evaluated together")
    ap.add_argument("--full", action="store_true", help="time exact norms and brute force on every target")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokensft.models import resolve_model
    from tokensft.tracing.callback import trace_guard
    from tokensft.tracing.core import (
        Projector,
        _jvp_rows,
        _to_token_frame,
        dots_double_backward,
        dots_jvp,
        exact_norms,
        forward_backward,
        model_parts,
        per_position_from_capture,
        select_trace_modules,
        token_stats,
    )

    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # a mid-training adapter: B != 0, so both A and B receive gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    ids, labels, source = build_sequence(tok, args.seq_len, base.config.vocab_size)
    ids_b, lab_b = ids[None], labels[None]
    n_targets = int((labels[1:] != -100).sum())
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)

    def train_step():
        model.train()
        out = model(input_ids=ids_b, labels=lab_b)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_step, _ = timed(train_step, args.repeats)
    modules = select_trace_modules(model)
    weights_list = [m.weight for m in modules.values()]
    parts = model_parts(model)
    from tokensft.tracing.core import decoder_param_names

    weights = dict(zip(decoder_param_names(parts, weights_list), weights_list))
    proj = Projector.identity(modules)
    res: dict = {}
    with trace_guard(model):
        t_pos, _ = timed(lambda: per_position_from_capture(forward_backward(parts, ids_b, lab_b, weights, modules),
                                                           proj), args.repeats)
        t_g, cap = timed(lambda: forward_backward(parts, ids_b, lab_b, weights), args.repeats)
        G = {n: cap.G[n] for n in weights}
        t_jvp, dot = timed(lambda: dots_jvp(parts, ids_b, weights, cap), args.repeats)
        t_dbl, dot_dbl = timed(lambda: dots_double_backward(parts, ids_b, lab_b, weights, G), args.repeats)

        mask = cap.stats["mask"].cpu()
        targets = torch.nonzero(mask)[:, 0]
        step = 1 if args.full else args.norm_sample
        sample = torch.zeros_like(mask)
        sample[targets[::step]] = True
        t0 = time.perf_counter()
        sq, dots_vjp = exact_norms(parts, ids_b, weights, cap.delta, sample, args.batch_size, G, progress=True)
        t_norms_meas = time.perf_counter() - t0
        t_norms = t_norms_meas * n_targets / int(sample.sum())

        g_sq = sum((g.double() ** 2).sum() for g in G.values())
        k = args.directions
        gen = torch.Generator().manual_seed(0)

        def projection_norms():
            rows = []
            for s0 in range(0, k, args.batch_size):
                tangents = []
                for _ in range(min(args.batch_size, k - s0)):
                    v = {n: (torch.randint(0, 2, w.shape, generator=gen, dtype=torch.int8).float() * 2 - 1)
                         for n, w in weights.items()}
                    c = sum((v[n].double() * G[n].double()).sum() for n in v) / g_sq
                    tangents.append({n: v[n] - float(c) * G[n] for n in v})
                rows.append(_to_token_frame(_jvp_rows(parts, ids_b, weights, tangents, cap.delta)))
            r = torch.cat(rows)
            return dot.square() / g_sq + r.square().mean(0)

        t_proj, sq_proj = timed(projection_norms, 1, warmup=False)

        def ref_forward():
            with torch.no_grad(), model.disable_adapter():
                return token_stats(parts.head(parts.hidden(ids_b))[0], lab_b[0])["log_probs"]

        t_ref, _ = timed(ref_forward, args.repeats)

        # brute force: forward once, one backward per target (timed on a subset, scaled to all targets)
        leaves = {n: w.detach().requires_grad_(True) for n, w in weights.items()}
        n_brute = n_targets if args.full else min(args.brute_tokens, n_targets)
        brute_t = targets[torch.linspace(0, len(targets) - 1, n_brute).round().long()].tolist()
        t0 = time.perf_counter()
        with torch.enable_grad():
            st = token_stats(parts.head(parts.hidden(ids_b, leaves))[0], lab_b[0])
            t_fwd = time.perf_counter() - t0
            bdot, bsq = {}, {}
            t1 = time.perf_counter()
            for t in brute_t:
                g = torch.autograd.grad(st["loss"][t], list(leaves.values()), retain_graph=True)
                bdot[t] = sum((gi.double() * G[n].double()).sum() for gi, n in zip(g, leaves)).item()
                bsq[t] = sum((gi.double() ** 2).sum() for gi in g).item()
            t_per_tok = (time.perf_counter() - t1) / len(brute_t)
        del st, leaves
        t_brute = t_fwd + t_per_tok * n_targets

    t_step_end, _ = timed(train_step, args.repeats, warmup=False)  # the machine may be shared: average both ends
    t_step_start = t_step
    t_step = (t_step_start + t_step_end) / 2

    def rel(a, b):
        return abs(a - b) / max(abs(b), 1e-30)

    gn = math.sqrt(float(g_sq))
    acc = {
        "jvp_dot_vs_brute_max_abs_err_over_G2": max(abs(dot[t].item() - bdot[t]) for t in brute_t) / float(g_sq),
        "jvp_alignment_vs_brute_max_abs_err": max(
            abs(dot[t].item() - bdot[t]) / (math.sqrt(bsq[t]) * gn) for t in brute_t),
        "double_backward_vs_jvp_max_abs_err_over_G2": ((dot_dbl - dot).abs().max() / g_sq).item(),
        "exact_norm_vs_brute_max_rel_err": max(rel(math.sqrt(sq[t].item()), math.sqrt(bsq[t]))
                                                for t in brute_t if sample[t]) if any(sample[t] for t in brute_t)
        else None,
        f"projection_k{k}_norm_sq_rms_rel_err": float(((sq_proj[sample] - sq[sample]) / sq[sample]).square().mean()
                                                       .sqrt()),
        f"projection_k{k}_norm_sq_rel_std_bound": math.sqrt(2 / k),
        "vjp_dot_vs_jvp_max_abs_err_over_G2": ((dots_vjp[sample] - dot[sample]).abs().max() / g_sq).item(),
    }
    steps = {
        "per_position": t_pos / t_step,
        "G_delta": t_g / t_step,
        "alignment_jvp": t_jvp / t_step,
        "alignment_double_backward": t_dbl / t_step,
        "norms_exact": t_norms / t_step,
        "norms_exact_per_target": t_norms / n_targets / t_step,
        f"norms_projection_k{k}": t_proj / t_step,
        "ref_forward": t_ref / t_step,
        "brute_force": t_brute / t_step,
    }
    # per-position and G/delta share one forward/backward in the callback: count the larger of the two once
    shared = max(t_pos, t_g)
    traces = {
        "per_position_only": t_pos / t_step,
        "per_token_loss_alignment_only (G_delta + jvp)": (t_g + t_jvp) / t_step,
        "default (per_position + jvp + exact norms + ref)": (shared + t_jvp + t_norms + t_ref) / t_step,
        f"cheap (per_position + jvp + projection k={k} + ref)": (shared + t_jvp + t_proj + t_ref) / t_step,
    }
    res = {
        "model": args.model, "lora_r": args.lora_r, "lora_targets": "all-linear",
        "n_traced_modules": len(modules), "n_traced_params": sum(w.numel() for w in weights.values()),
        "seq_len": args.seq_len, "n_targets": n_targets, "sequence": source, "threads": args.threads,
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "train_step_s": t_step, "train_step_s_start_end": [t_step_start, t_step_end],
        "seconds": {"per_position": t_pos, "G_delta": t_g, "alignment_jvp": t_jvp, "alignment_double_backward": t_dbl,
                    "norms_exact": t_norms, "norms_exact_measured": t_norms_meas,
                    "norms_exact_targets_measured": int(sample.sum()), f"norms_projection_k{k}": t_proj,
                    "ref_forward": t_ref, "brute_force": t_brute, "brute_force_per_target": t_per_tok,
                    "brute_force_targets_measured": len(brute_t)},
        "training_steps": steps,
        "trace_training_steps": traces,
        "speedup_vs_brute_force": {
            "alignment (G_delta + jvp)": t_brute / (t_g + t_jvp),
            "alignment (G_delta + double_backward)": t_brute / (t_g + t_dbl),
            "alignment + exact norms": t_brute / (t_g + t_jvp + t_norms),
            f"alignment + projection norms k={k}": t_brute / (t_g + t_jvp + t_proj),
        },
        "accuracy": acc,
    }
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
