"""Synthetic gradient traces in the on-disk schema (`tokensft.tracing.schema`), for the visualizer's tests and the
docs screenshot. Values are random but shaped like real ones: loss falls over steps, numbers and LaTeX tokens are
harder, `dot = alignment * norm * ||G||`, weights follow each scheme's rule, projections cluster by category."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from tokensft.tracing.schema import categorize_token, write_trace_step

PROBLEMS = [
    ("What is the sum of the roots of $x^2 - 5x + 6 = 0$?",
     "For a quadratic $ax^2 + bx + c = 0$, Vieta's formulas give the sum of the roots as $-\\frac{b}{a}$. "
     "Here $a = 1$ and $b = -5$, so the sum is $-\\frac{-5}{1} = 5$.\n"
     "Check: $x^2 - 5x + 6 = (x - 2)(x - 3)$, so the roots are $2$ and $3$, and $2 + 3 = 5$.\n"
     "The answer is $\\boxed{5}$."),
    ("Compute $\\sqrt{144} + 3 \\times 4$.",
     "First, $\\sqrt{144} = 12$. Then $3 \\times 4 = 12$, so the total is $12 + 12 = 24$.\n"
     "The answer is $\\boxed{24}$."),
    ("A rectangle has a perimeter of 30 and a width of 6. What is its area?",
     "The perimeter is $2(l + w) = 30$, so $l + w = 15$ and $l = 15 - 6 = 9$. "
     "The area is $l \\cdot w = 9 \\cdot 6 = 54$.\nThe answer is $\\boxed{54}$."),
    ("How many positive divisors does 36 have?",
     "Since $36 = 2^2 \\cdot 3^2$, the number of divisors is $(2 + 1)(2 + 1) = 9$.\n"
     "The answer is $\\boxed{9}$."),
]

_TOK = re.compile(r" ?\\[A-Za-z]+| ?[A-Za-z]+| ?\d| ?[^\sA-Za-z\d]|\n| ")


def tokenize(text: str) -> list[str]:
    """A toy tokenizer: words and LaTeX commands with their leading space, single digits, single symbols."""
    return _TOK.findall(text)


_CAT_DIFFICULTY = {"number": 1.4, "latex": 1.0, "operator": 0.5, "word": 0.2, "subword": 0.1, "punctuation": 0.0,
                   "whitespace": -0.2, "special": 0.0}


def make_sequence(idx: int, example: int, step: int, rng: np.random.Generator, *, n_layers: int = 2, k: int = 8,
                  progress: float = 0.0, with_tokloss: bool = True, with_proj: bool = True,
                  centres: np.ndarray | None = None) -> tuple[dict, dict]:
    """(meta, arrays) of one synthetic sequence; `progress` in [0, 1] lowers the losses."""
    prompt, answer = PROBLEMS[example % len(PROBLEMS)]
    p_toks = ["<|im_start|>", "user", "\n"] + tokenize(prompt) + ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
    c_toks = tokenize(answer) + ["<|im_end|>"]
    toks = p_toks + c_toks
    T = len(toks)
    cats = [categorize_token(t, is_special=t.startswith("<|")) for t in toks]
    comp = np.zeros(T, bool)
    comp[len(p_toks):] = True
    diff = np.array([_CAT_DIFFICULTY[c] for c in cats])
    loss = np.exp(rng.normal(-0.6 + diff - 1.6 * progress, 0.9, T)).astype(np.float64)
    p = np.exp(-loss)
    ent = np.clip(loss * rng.uniform(0.6, 1.4, T) + 0.1, 0, None)
    norm = loss ** 0.7 * rng.uniform(0.5, 1.5, T)
    align = np.tanh(0.5 * (loss - np.median(loss[comp])) + rng.normal(0, 0.25, T))
    G = float(np.sqrt((norm[comp] ** 2).sum()) * 0.6)
    dot = align * norm * G
    L = n_layers
    lay_norm = norm[None] * rng.uniform(0.3, 1.0, (L, 1)) / np.sqrt(L)
    lay_align = np.tanh(np.arctanh(np.clip(align, -0.99, 0.99))[None] + rng.normal(0, 0.3, (L, T)))
    lay_G = rng.uniform(0.5, 1.0, L) * G / np.sqrt(L)
    lay_dot = lay_align * lay_norm * lay_G[:, None]
    # weights, by each scheme's rule over the completion tokens
    lc = loss[comp]
    keep = np.zeros(lc.size)
    keep[np.argsort(lc, kind="stable")[: int(round(0.7 * lc.size))]] = 1.0
    med = np.median(lc)
    antiop = np.where(lc <= 3 * med, 1.0, 3 * med / lc)
    p_ref = np.clip(np.exp(-lc) + rng.normal(0, 0.15, lc.size), 0, 1)
    lr = np.maximum(0.1, 1 + np.clip(p_ref - np.exp(-lc), -1, 1))

    def full(v):
        a = np.full(T, np.nan)
        a[comp] = v
        return a

    nan_pos = ~comp
    arrays = {"token_ids": np.arange(T, dtype=np.int32) + 100 * idx, "is_completion": comp}
    for name, v in (("loss", loss), ("p", p), ("entropy", ent)):
        arrays[name] = np.where(nan_pos, np.nan, v)
    arrays |= {"weight.dft": full(np.exp(-lc)), "weight.topk": full(keep), "weight.antiop": full(antiop),
               "weight.lr": full(lr)}
    for name, v in (("dot", dot), ("norm", norm), ("alignment", align)):
        arrays[f"pos.{name}"] = np.where(nan_pos, np.nan, v)
    for name, v in (("dot", lay_dot), ("norm", lay_norm), ("alignment", lay_align)):
        arrays[f"pos.layer.{name}"] = np.where(nan_pos[None], np.nan, v)
    arrays["pos.layer.G_norm"] = lay_G
    arrays["pos.G_norm"] = np.array([G])
    if with_tokloss:
        ta = np.tanh(np.arctanh(np.clip(align, -0.99, 0.99)) * 0.8 + rng.normal(0, 0.2, T))
        arrays |= {"tokloss.alignment": np.where(nan_pos, np.nan, ta),
                   "tokloss.norm": np.where(nan_pos, np.nan, norm * 1.3),
                   "tokloss.dot": np.where(nan_pos, np.nan, ta * norm * 1.3 * G * 1.2),
                   "tokloss.G_norm": np.array([G * 1.2])}
    if with_proj:
        if centres is None:
            centres = np.random.default_rng(123).normal(0, 1, (8, k))
        cat_idx = np.array([["number", "operator", "latex", "word", "subword", "punctuation", "whitespace",
                             "special"].index(c) for c in cats])
        P = centres[cat_idx] + rng.normal(0, 0.45, (T, k))
        if with_tokloss:
            arrays["tokloss.grad_proj"] = P
        for l_ in range(L):
            arrays[f"pos.{l_}.dy_proj"] = P + rng.normal(0, 0.3, (T, k))
            arrays[f"pos.{l_}.x_proj"] = rng.normal(0, 1, (T, k))
    meta = {"index": idx, "example_index": example, "tokens": toks, "categories": cats, "length": T}
    return meta, {f"s{idx}.{k_}": v for k_, v in arrays.items()}


def make_synthetic_run(run_dir: str | Path, *, steps=(10, 20, 30), n_seq: int = 3, seed: int = 0, mode: str = "sft",
                       n_layers: int = 2, k: int = 8, with_tokloss: bool = True, with_proj: bool = True,
                       examples=None) -> Path:
    """Write a synthetic traced run to `run_dir` (one trace step per entry of `steps`) and return `run_dir`."""
    rng = np.random.default_rng(seed)
    run_dir = Path(run_dir)
    examples = list(examples) if examples is not None else list(range(n_seq))
    layers = [f"model.layers.{i}.mlp.down_proj" for i in range(n_layers)]
    quantities = ["per_position"] + (["per_token_loss"] if with_tokloss else [])
    for j, st in enumerate(steps):
        seq_meta, arrays = [], {}
        for i, ex in enumerate(examples[:n_seq]):
            m, a = make_sequence(i, ex, st, rng, n_layers=n_layers, k=k, progress=j / max(1, len(steps) - 1),
                                 with_tokloss=with_tokloss, with_proj=with_proj)
            seq_meta.append(m)
            arrays |= a
        meta = {"mode": mode, "layers": layers, "quantities": quantities,
                "projection": {"kind": "gaussian", "dims": k, "seed": 0}, "scheme_params": {}, "sequences": seq_meta}
        write_trace_step(run_dir, st, meta, arrays)
    return run_dir


# ---------------------------------------------------------------------------------------------------------------
# A tiny trace with known values (all exactly representable in float16), for tests that predict colours.

KNOWN_TOKENS = ["<s>", "Q", ":", " 2+2", " =", " 4", "<b>", "</s>"]
KNOWN_CATEGORIES = ["special", "word", "punctuation", "number", "operator", "number", "punctuation", "special"]
KNOWN_PROMPT = 3  # tokens 0..2 are the prompt, 3..7 the completion
NAN = float("nan")
KNOWN = {
    # step -> sequence 0's completion values (tokens 3..7)
    10: {"p": [0.125, 0.5, 0.25, 1.0, 0.75], "alignment": [-0.5, 0.25, 1.0, 0.0, -0.125]},
    20: {"p": [0.5, 0.25, 1.0, 0.125, 0.75], "alignment": [0.5, -0.25, 0.0, -1.0, 0.125]},
}


def known_arrays(step: int, idx: int = 0, *, with_tokloss: bool = True, with_proj: bool = True) -> dict:
    """Arrays of sequence `idx` of the known trace at `step` (see `KNOWN`; other steps reuse step 10's values below
    15, else step 20's); sequence 1 has negated alignments."""
    T, P = len(KNOWN_TOKENS), KNOWN_PROMPT
    comp = np.arange(T) >= P

    def full(v):
        a = np.full(T, np.nan)
        a[P:] = v
        return a

    vals = KNOWN[step] if step in KNOWN else KNOWN[10 if step < 15 else 20]
    p = np.asarray(vals["p"])
    align = np.asarray(vals["alignment"]) * (1 if idx == 0 else -1)
    loss = -np.log(p)
    norm = np.array([1.0, 2.0, 0.5, 0.25, 4.0])
    G = 2.0
    a = {
        "token_ids": np.arange(T, dtype=np.int32),
        "is_completion": comp,
        "loss": full(loss), "p": full(p), "entropy": full(np.array([0.5, 1.0, 0.25, 2.0, 0.125])),
        "weight.dft": full(p), "weight.topk": full([1.0, 1.0, 1.0, 0.0, 1.0]),
        "weight.antiop": full([1.0, 0.5, 1.0, 0.25, 1.0]), "weight.lr": full([1.0, 0.5, 1.25, 0.125, 2.0]),
        "pos.alignment": full(align), "pos.norm": full(norm), "pos.dot": full(align * norm * G),
        "pos.layer.alignment": np.stack([full(align / 2), full(-align)]),
        "pos.layer.norm": np.stack([full(norm / 2), full(norm)]),
        "pos.layer.dot": np.stack([full(align * norm / 2), full(-align * norm)]),
        "pos.layer.G_norm": np.array([1.0, 3.0]), "pos.G_norm": np.array([G]),
    }
    if with_tokloss:
        a |= {"tokloss.alignment": full(align / 4), "tokloss.norm": full(norm * 2),
              "tokloss.dot": full(align / 4 * norm * 2 * 4.0), "tokloss.G_norm": np.array([4.0])}
    if with_proj:
        proj = np.zeros((T, 3))
        proj[:, 0] = np.arange(T) + 1.0
        proj[:, 1] = np.where(np.arange(T) % 2 == 0, 1.0, -1.0)
        if with_tokloss:
            a["tokloss.grad_proj"] = proj
        a["pos.1.dy_proj"] = proj[:, ::-1].copy()
    return a


def make_known_run(run_dir: str | Path, *, steps=(10, 20), mode: str = "sft-topk", with_tokloss: bool = True,
                   with_proj: bool = True, examples=(7, 8), user_schemes: dict | None = None) -> Path:
    """A run whose steps each trace two sequences (example indices `examples`) of `KNOWN_TOKENS`.

    `user_schemes`: trace key -> (the metadata's `schemes` entry, the 5 completion weights), as the tracer writes a
    scheme registered from a user's file (the reader's process does not know it)."""
    run_dir = Path(run_dir)
    T, P = len(KNOWN_TOKENS), KNOWN_PROMPT
    for st in steps:
        seqs, arrays = [], {}
        for i, ex in enumerate(examples):
            seqs.append({"index": i, "example_index": ex, "tokens": KNOWN_TOKENS, "categories": KNOWN_CATEGORIES,
                         "length": len(KNOWN_TOKENS)})
            arrays |= {f"s{i}.{k}": v for k, v in known_arrays(st, i, with_tokloss=with_tokloss,
                                                              with_proj=with_proj).items()}
            for key, (_, w) in (user_schemes or {}).items():
                arrays[f"s{i}.weight.{key}"] = np.concatenate([np.full(P, np.nan), np.asarray(w, dtype=float)])
        meta = {"mode": mode, "layers": ["layers.0.mlp", "layers.1.mlp"],
                "quantities": ["per_position"] + (["per_token_loss"] if with_tokloss else []),
                "projection": {"kind": "gaussian", "dims": 3, "seed": 0}, "scheme_params": {}, "sequences": seqs}
        if user_schemes:
            meta["schemes"] = {key: entry for key, (entry, _) in user_schemes.items()}
        assert all(len(w) == T - P for _, w in (user_schemes or {}).values())
        write_trace_step(run_dir, st, meta, arrays)
    return run_dir
