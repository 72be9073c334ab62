"""GPU training-step benchmark: every loss mode against plain TRL `SFTTrainer` (and TRL + Liger when installed).

Randomly initialised Qwen2.5-7B- and 1.5B-shaped models (the configs of the real ones: no download), bf16, LoRA r=32
on all linear layers, one fixed random batch of B sequences × T tokens (the first quarter of each is prompt, not
supervised). For every variant: one warm-up `training_step` (forward + weights + backward), then the median of
`--steps` timed ones (CUDA-synchronised) and the peak allocated memory over them. All variants share one PEFT model
(a `training_step` does not change the weights; gradients are cleared between steps), so the numbers differ only by
the loss path. TRL + Liger runs last (it patches the model's modules).

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu_h200.json      # on a CUDA machine, < 8 min
    python benchmarks/bench_gpu.py --dry-run                                    # CPU, tiny shapes, seconds (CI)

The dry run also checks that tokensft's `sft` loss equals TRL's on the same batch (both are the mean CE over the
supervised tokens). JSON to stdout and, with `--out`, to that file (written whole or not at all).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = "sft,dft,sft-topk,sft-antiop,sft-lr,asft,sft-pk,rho1,eaft,sft-align"
SHAPES = {  # the configs of Qwen/Qwen2.5-7B and Qwen/Qwen2.5-1.5B
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}


def tiny_tokenizer(vocab_size: int):
    """A word-level tokenizer (the trainers want one; the batch is random ids, never text)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<eos>")


def build_model(shape: str, dtype, device: str, lora_r: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, attn_implementation="sdpa")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


def time_variant(trainer, batch, steps: int, device: str) -> dict:
    import torch

    def step():
        trainer.model.zero_grad(set_to_none=True)
        return trainer.training_step(trainer.model, dict(batch), num_items_in_batch=n_items)

    n_items = torch.tensor(float((batch["labels"][:, 1:] != -100).sum()))
    cuda = device.startswith("cuda")
    trainer.model.train()
    loss = float(step())  # warm-up: kernels, allocator, the reference's first pass
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    trainer.model.zero_grad(set_to_none=True)
    return {"median_step_s": round(statistics.median(times), 4), "loss": loss,
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}


def run_shape(shape: str, a, device: str, dtype) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tokensft.data import CompletionCollator
    from tokensft.trainer.config import TokenSFTConfig
    from tokensft.trainer.trainer import TokenSFTTrainer

    t0 = time.perf_counter()
    model = build_model(shape, dtype, device, a.lora_r)
    tok = tiny_tokenizer(SHAPES[shape]["vocab_size"])
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(a.batch):
        ids = torch.randint(2, SHAPES[shape]["vocab_size"], (a.seq,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (a.seq // 4) + ids[a.seq // 4:]})
    collate = CompletionCollator(tok.pad_token_id)
    batch = {k: v.to(device) for k, v in collate(rows).items()}
    out_dir = tempfile.mkdtemp()
    common = dict(output_dir=out_dir, report_to="none", per_device_train_batch_size=a.batch, max_length=None,
                  gradient_checkpointing=a.gradient_checkpointing, bf16=dtype == torch.bfloat16,
                  use_cpu=device == "cpu", dataset_kwargs={"skip_prepare_dataset": True},
                  remove_unused_columns=False, disable_tqdm=True)
    res = {"model": shape, "build_s": round(time.perf_counter() - t0, 1),
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad), "variants": {}}
    variants = [(m, "tokensft") for m in a.modes.split(",") if m] + [("sft", "trl")]
    if a.liger:
        variants.append(("sft", "trl+liger"))
    for mode, impl in variants:
        name = mode if impl == "tokensft" else impl
        try:
            if impl == "tokensft":
                cfg = TokenSFTConfig(mode=mode, **common)
                tr = TokenSFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows),
                                     processing_class=tok, data_collator=collate)
            else:
                cfg = SFTConfig(use_liger_kernel=impl == "trl+liger", **common)
                tr = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                                data_collator=collate)
            tr.create_optimizer_and_scheduler(num_training_steps=10)
            tr.current_gradient_accumulation_steps = 1
            res["variants"][name] = time_variant(tr, batch, a.steps, device)
        except Exception as e:  # noqa: BLE001 - one variant failing (e.g. out of memory) must not cost the others
            res["variants"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        print(f"[{shape}] {name}: {res['variants'][name]}", file=sys.stderr, flush=True)
        tr = None
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    ok = {k: v for k, v in res["variants"].items() if "median_step_s" in v}
    for ref in ("sft", "trl"):
        if ref in ok:
            res[f"ratio_to_{ref}"] = {k: round(v["median_step_s"] / ok[ref]["median_step_s"], 3) for k, v in ok.items()}
            if ok[ref]["peak_mem_gb"]:
                res[f"mem_ratio_to_{ref}"] = {k: round(v["peak_mem_gb"] / ok[ref]["peak_mem_gb"], 3)
                                              for k, v in ok.items()}
    del model
    gc.collect()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, T=64, 1 timed step: checks the script")
    ap.add_argument("--models", default="qwen2.5-7b,qwen2.5-1.5b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--modes", default=MODES, help="tokensft loss modes (plain TRL and TRL + Liger are added)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default: 2048)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default: 1)")
    ap.add_argument("--lora_r", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant after one warm-up (default: 3)")
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args()

    import importlib.util

    import torch

    if a.dry_run:
        a.models, a.seq, a.steps, device, dtype = "tiny", 64, 1, "cpu", torch.float32
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("bench_gpu.py: error: no CUDA device (use --dry-run to check the script on CPU)", file=sys.stderr)
        return 2
    else:
        device, dtype = "cuda", torch.bfloat16
    a.liger = importlib.util.find_spec("liger_kernel") is not None
    t0 = time.perf_counter()
    results = {"config": {k: v for k, v in vars(a).items()}, "device": torch.cuda.get_device_name() if device ==
               "cuda" else "cpu", "torch": torch.__version__, "models": []}
    for shape in a.models.split(","):
        results["models"].append(run_shape(shape, a, device, dtype))
    results["total_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(results, indent=2)
    print(text)
    if a.out:
        from tokensft.io import atomic_write

        atomic_write(a.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
