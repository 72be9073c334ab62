"""Synthetic gradient traces in the on-disk schema, for the analysis tests and the docs screenshot.

Two builders:
- `write_step`: one trace step from explicit per-token values (exact-expectation tests);
- `make_realistic_run`: SmolLM2 chat-template token pieces (tokenized once with the real tokenizer, stored in
  smollm2_pieces.json) with values shaped like real traces: loss falls over training, numbers and LaTeX are harder,
  opposition comes in autocorrelated spans and grows with loss, LoRA A/B modules of q/k/v/o per layer, and each
  scheme's weight by its rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tokensft.tracing.schema import categorize_token, write_trace_step

PIECES = json.loads((Path(__file__).with_name("smollm2_pieces.json")).read_text(encoding="utf-8"))


def write_step(run_dir, step: int, seqs: list[dict], *, mode: str = "sft", layers: list[str] | None = None,
               schemes: dict | None = None) -> Path:
    """Write one trace step. Each seq dict: `tokens` (pieces), `is_completion` (T,) and any arrays by schema key
    (`pos.norm`, `tokloss.alignment`, `loss`, `weight.topk`, `pos.layer.alignment` (L, T), ...);
    `example_index` optional. `schemes`: the metadata's `schemes` entries (none: a trace that declares no rule)."""
    meta_seqs, arrays = [], {}
    for i, s in enumerate(seqs):
        toks = s["tokens"]
        T = len(toks)
        meta_seqs.append({"index": i, "example_index": s.get("example_index", i), "tokens": toks,
                          "categories": [categorize_token(t) for t in toks], "length": T})  # fmt: skip
        arrays[f"s{i}.token_ids"] = np.arange(T, dtype=np.int32)
        arrays[f"s{i}.is_completion"] = np.asarray(s["is_completion"], dtype=bool)
        for k, v in s.items():
            if k not in ("tokens", "is_completion", "example_index"):
                arrays[f"s{i}.{k}"] = np.asarray(v, dtype=np.float32)
    qs = [n for q, n in (("pos", "per_position"), ("tokloss", "per_token_loss"))
          if any(f"{q}.alignment" in s for s in seqs)]  # fmt: skip
    meta = {"mode": mode, "layers": layers or [], "quantities": qs, "projection": {}, "scheme_params": {},
            "sequences": meta_seqs}  # fmt: skip
    if schemes is not None:
        meta["schemes"] = schemes
    return write_trace_step(run_dir, step, meta, arrays)


_CAT_HARD = {"number": 1.2, "latex": 0.8, "operator": 0.5, "word": 0.1, "subword": -0.3, "punctuation": -0.2,
             "whitespace": -0.5, "special": -1.0}  # fmt: skip
_CAT_ALIGN = {"number": -0.25, "latex": -0.05, "operator": 0.05, "word": 0.15, "subword": 0.25,
              "punctuation": 0.1, "whitespace": 0.2, "special": 0.3}  # fmt: skip


def lora_layers(n_layers: int, modules=("q_proj", "k_proj", "v_proj", "o_proj")) -> list[str]:
    """PEFT LoRA module names `base_model.model.model.layers.{i}.self_attn.{m}.lora_{A,B}.default`."""
    return [f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{p}.default"
            for i in range(n_layers) for m in modules for p in "AB"]  # fmt: skip


def make_realistic_run(run_dir, *, steps=(10, 20, 30, 40), n_seq: int = 6, n_layers: int = 4, seed: int = 0,
                       mode: str = "sft", quantities=("pos", "tokloss"), prompt_values: bool = True,
                       antiop_effect: float = 0.0) -> Path:  # fmt: skip
    """Write a realistic synthetic traced run; `antiop_effect` > 0 makes high-loss tokens less opposing (a second
    run to compare against). `prompt_values`: record per-position values at prompt positions."""
    rng = np.random.default_rng(seed)
    run_dir = Path(run_dir)
    layers = lora_layers(n_layers) if "pos" in quantities else []
    L = len(layers)
    for j, st in enumerate(steps):
        prog = j / max(1, len(steps) - 1)
        seqs = []
        for i in range(n_seq):
            ex = (i + j) % len(PIECES) if n_seq < len(PIECES) else i % len(PIECES)
            prompt, resp = PIECES[ex]
            toks = list(prompt) + list(resp)
            T, P = len(toks), len(prompt)
            comp = np.arange(T) >= P
            cats = [categorize_token(t) for t in toks]
            hard = np.array([_CAT_HARD[c] for c in cats])
            loss = np.exp(rng.normal(-1.2 + hard - 1.0 * prog, 0.9, T))
            # opposition in spans: an AR(1) latent over positions
            z = np.zeros(T)
            eps = rng.normal(0, 0.35, T)
            for t in range(1, T):
                z[t] = 0.7 * z[t - 1] + eps[t]
            base = np.array([_CAT_ALIGN[c] for c in cats]) + 0.15 * prog
            lc = loss - np.median(loss[comp])
            align = np.tanh(base + z - (0.35 - antiop_effect) * np.clip(lc, -2, 4) + rng.normal(0, 0.2, T))
            norm = (0.2 + loss) ** 0.8 * rng.lognormal(0, 0.6, T) * (1.5 - prog)
            s = {"tokens": toks, "is_completion": comp, "example_index": ex,
                 "loss": np.where(comp, loss, np.nan), "p": np.where(comp, np.exp(-loss), np.nan),
                 "entropy": np.where(comp, loss * rng.uniform(0.5, 1.5, T) + 0.1, np.nan)}  # fmt: skip
            lr_ = loss[comp]
            k = max(1, int(np.floor(lr_.size * 0.7)))
            keep = (lr_ <= np.sort(lr_)[k - 1]).astype(float)
            med = np.sort(lr_)[(lr_.size - 1) // 2]
            antiop = np.where(lr_ <= 3 * med, 1.0, 3 * med / lr_)
            p_ref = np.clip(np.exp(-lr_) + rng.normal(0.05, 0.15, lr_.size), 0, 1)
            lrw = np.maximum(0.1, 1 + np.clip(p_ref - np.exp(-lr_), -1, 1))
            for name, w in (("topk", keep), ("antiop", antiop), ("lr", lrw), ("dft", np.exp(-lr_))):
                full = np.full(T, np.nan)
                full[comp] = w
                s[f"weight.{name}"] = full
            G = float(np.sqrt(np.sum(norm[comp] ** 2)) * 0.5)
            if "pos" in quantities:
                keep_pos = comp | prompt_values
                pn = np.where(comp, norm, 0.3 * norm)
                pa = np.where(comp, align, np.tanh(0.1 + rng.normal(0, 0.3, T)))
                s["pos.norm"] = np.where(keep_pos, pn, np.nan)
                s["pos.alignment"] = np.where(keep_pos, pa, np.nan)
                s["pos.dot"] = s["pos.alignment"] * s["pos.norm"] * G
                s["pos.G_norm"] = np.array([G])
                # per module: layer effect on alignment, B carries more gradient than A early on
                li = np.repeat(np.arange(n_layers), L // n_layers)
                is_b = np.tile([0, 1], L // 2)
                scale = np.where(is_b, 1.6 - 0.6 * prog, 0.5 + 0.4 * prog)[:, None]
                ln = pn[None] * scale * rng.lognormal(0, 0.2, (L, 1)) / np.sqrt(L)
                la = np.tanh(np.arctanh(np.clip(pa, -0.98, 0.98))[None] * (1 - 0.1 * li[:, None])
                             + rng.normal(0, 0.25, (L, T)) - 0.05 * li[:, None])  # fmt: skip
                s["pos.layer.norm"] = np.where(keep_pos[None], ln, np.nan)
                s["pos.layer.alignment"] = np.where(keep_pos[None], la, np.nan)
                s["pos.layer.dot"] = s["pos.layer.alignment"] * s["pos.layer.norm"]
                s["pos.layer.G_norm"] = (G / np.sqrt(L)) * scale[:, 0] * (1 + 0.3 * li)
            if "tokloss" in quantities:
                ta = np.tanh(np.arctanh(np.clip(align, -0.98, 0.98)) * 0.9 + rng.normal(0, 0.2, T))
                s["tokloss.alignment"] = np.where(comp, ta, np.nan)
                s["tokloss.norm"] = np.where(comp, norm * 1.4 * rng.lognormal(0, 0.2, T), np.nan)
                s["tokloss.dot"] = s["tokloss.alignment"] * s["tokloss.norm"] * G
                s["tokloss.G_norm"] = np.array([G * 1.3])
            seqs.append(s)
        write_step(run_dir, st, seqs, mode=mode, layers=layers)
    return run_dir


if __name__ == "__main__":  # python tests/analysis/synth.py OUT_DIR: two runs to try `tokensft trace` on
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/synthetic")
    make_realistic_run(out / "sft", steps=tuple(range(10, 210, 10)), n_seq=8, n_layers=8, mode="sft")
    make_realistic_run(out / "sft-antiop", steps=tuple(range(10, 210, 10)), n_seq=8, n_layers=8, seed=1,
                       mode="sft-antiop", antiop_effect=0.25)  # fmt: skip
    print(out)
