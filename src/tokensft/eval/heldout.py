"""Held-out NLL: teacher-forced per-token loss of reference solutions on problems the model was not trained on.

At the CPU scale (a 135M model, a few dozen LoRA steps) greedy accuracy on MATH-500 sits near 0% for every loss mode
and its 95% interval is wider than any difference between modes. The mean negative log-likelihood of the held-out
reference solutions (the same prompt/completion formatting and completion mask as training) is a far less noisy
measure of what training did, and it pairs naturally: every model is scored on the same sequences, so the difference
to the baseline has a tight confidence interval (sequences are the sampling units).

    result = heldout_nll("smollm2-135m-instruct", adapter="runs/sweep/sft-s0",
                         data="../shared/data/math500/test.jsonl", output_dir="runs/sweep/nll/sft-s0")
    diff = paired_nll_difference(result, base_result)   # Δ NLL per token (nats) and its 95% CI

Writes `OUTPUT_DIR/heldout_nll.json` atomically (settings, summary, one `[nll_sum, num_tokens]` pair and the data row
index per sequence); a re-run with the same settings and unchanged data and adapter files reads it back.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tokensft.io import atomic_write
from tokensft.runtime import set_threads

__all__ = ["HELDOUT_FILE", "heldout_nll", "heldout_rows", "paired_nll_difference", "scored_categories", "sequence_nll",
           "token_nll"]

HELDOUT_FILE = "heldout_nll.json"


def token_nll(model, rows: list[dict], *, pad_token_id: int = 0, batch_size: int = 8, progress: bool = True):
    """Per-token completion NLL of each tokenized row, in nats (teacher forcing, no grad).

    Args:
        model: causal LM; called as `model(input_ids=(B, T) int64, attention_mask=(B, T) int64)` → `logits: (B, T, V)`.
        rows: dicts with `input_ids` and `labels` (lists of ints, unshifted, -100 = not scored), e.g. from
            `tokensft.data.build_sft_dataset`.
        pad_token_id: id used to right-pad a batch (never scored).
        batch_size: sequences per forward pass.
        progress: show a tqdm bar.

    Returns:
        list of float64 arrays, one per row: −log p(labels[t] | input_ids[<t]) for every scored token t ≥ 1
        (labels[t] != -100), in order; log-softmax in float32.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from tokensft.data import CompletionCollator

    collate = CompletionCollator(pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # longest first: less padding per batch, and an out-of-memory error shows up at once
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    results: dict[int, np.ndarray] = {}
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc="held-out nll", unit="batch",
                              disable=not progress):
                idx = order[start : start + batch_size]
                batch = collate([rows[i] for i in idx])  # right-padded, labels -100 on padding
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits  # (B, T, V)
                target = batch["labels"][:, 1:].to(device)  # (B, T-1)
                tok = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(),
                                      ignore_index=-100, reduction="none").view_as(target).double()  # (B, T-1)
                scored = target != -100
                for b, i in enumerate(idx):
                    results[i] = tok[b][scored[b]].cpu().numpy()
                del logits, tok
    finally:
        if was_training:
            model.train()
    return [results[i] for i in range(len(rows))]


def sequence_nll(model, rows: list[dict], *, pad_token_id: int = 0, batch_size: int = 8, progress: bool = True):
    """Summed completion-token NLL and token count of each tokenized row: `[(nll_sum: float nats, num_tokens: int)]`,
    float64 sums of `token_nll` (same arguments)."""
    return [(float(a.sum()), int(a.size)) for a in token_nll(model, rows, pad_token_id=pad_token_id,
                                                               batch_size=batch_size, progress=progress)]


def scored_categories(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    """Token category (`tokensft.tokens.CATEGORIES`: number, operator, latex, word, ...) of each scored token of a
    row, in the order of `token_nll`: the categories the trace analysis uses (`readable_tokens`, split LaTeX
    commands re-joined by `refine_categories`)."""
    from tokensft.tokens import readable_tokens, refine_categories

    texts, cats = readable_tokens(tokenizer, list(input_ids))
    cats = refine_categories(texts, cats)
    return [cats[t] for t in range(1, len(labels)) if labels[t] != -100]


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _fingerprint(path: str | os.PathLike | None, names: tuple[str, ...] = ()) -> list | None:
    """`[size, mtime_ns]` of a local file (or of the first of `names` inside a directory); None if not local."""
    if not path:
        return None
    p = Path(path)
    for candidate in ([p / n for n in names] if p.is_dir() else [p]):
        if candidate.is_file():
            st = candidate.stat()
            return [st.st_size, st.st_mtime_ns]
    return None


def _summary(per_seq: list[tuple[float, int]]) -> dict[str, Any]:
    total = sum(s for s, _ in per_seq)
    tokens = sum(n for _, n in per_seq)
    means = [s / n for s, n in per_seq if n > 0]
    return {
        "num_sequences": len(per_seq),
        "num_tokens": tokens,
        "nll_per_token": total / tokens if tokens else float("nan"),
        "mean_sequence_nll": sum(means) / len(means) if means else float("nan"),
        "perplexity": math.exp(total / tokens) if tokens else float("nan"),
    }


def heldout_nll(
    model: str,
    *,
    adapter: str | None = None,
    data: str | os.PathLike,
    split: str = "test",
    preset: str | None = None,
    template: str = "auto",
    system_prompt: str | None = None,
    max_length: int = 1024,
    limit: int | None = None,
    batch_size: int = 8,
    output_dir: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    threads: int | None = None,
    token_rows: int = 0,
) -> dict[str, Any]:
    """Teacher-forced NLL of `data`'s reference completions under `model` (+ optional LoRA `adapter`).

    The rows are formatted and tokenized as `tokensft train` does (`build_sft_dataset`: chat or plain template,
    system prompt, the CoT instruction, completion-only labels, right truncation at `max_length`), so the number is
    the training objective's `nll` on unseen problems; pass the recipe's `template` and `system_prompt`. Rows that
    training would drop (empty completion, or a completion entirely beyond `max_length`) are dropped here too, and
    each kept sequence carries its row index. Scoring runs in the model's dtype (float32 on CPU) with float32 log-probs
    and float64 sums.

    Args:
        model: model alias, local directory or hub id (`tokensft.models.resolve_model`).
        adapter: PEFT adapter directory, applied unmerged.
        data: rows with reference solutions (`../shared/data/math500/test.jsonl` has `problem` + `solution`), a
            hub data set, or `builtin:arithmetic`.
        split: split of a hub data set, a directory or `builtin:arithmetic` (default `test`: held out).
        preset: data preset (None: detected from the first row).
        template, system_prompt: as for training (`DataArguments.template` / `.system_prompt`).
        max_length: tokens kept per sequence.
        limit: use only the first N rows.
        batch_size: sequences per forward pass.
        output_dir: where `heldout_nll.json` goes; if it already holds a result with the same settings (including
            the size and modification time of the data file and of the adapter weights), that is returned without
            recomputing.
        device: "cpu" or "cuda" (default: CUDA when available).
        progress: show a progress bar.
        threads: CPU threads (None / 0: chosen by measurement, `tokensft.runtime.pick_threads`).
        token_rows: also keep, for the first N sequences, every scored token's NLL and display text (`per_token`;
            what the demo's tokens table reads). 0: none (the file stays small on large data).

    Returns:
        dict with `settings`, `nll_per_token` (nats, token-weighted), `mean_sequence_nll`, `perplexity`,
        `num_sequences`, `num_tokens`, `per_sequence` (list of `[nll_sum, num_tokens]`), `rows` (the row index
        of each sequence in `data`), and per token category (`scored_categories`: number, operator, latex, word,
        subword, punctuation, whitespace, special) `by_category` (the same summary over that category's tokens) and
        `per_category` (category → one `[nll_sum, num_tokens]` per sequence, for paired differences), and with
        `token_rows` `per_token`: `{"nll": [[nats per scored token]], "text": [[its display text]]}` for the first
        `token_rows` sequences (`token_nll` order, `tokensft.tokens.readable_tokens` texts).

    Raises:
        FileNotFoundError / ValueError: from loading or formatting `data` (the messages name the file and row).
    """
    from tokensft.models import load_model, load_tokenizer

    settings = {"model": str(model), "adapter": str(adapter) if adapter else None, "data": str(data),
                "split": split, "preset": preset, "template": template, "system_prompt": system_prompt,
                "max_length": max_length, "limit": limit, **({"token_rows": token_rows} if token_rows else {}),
                "fingerprints": {"data": _fingerprint(data), "adapter": _fingerprint(adapter, ADAPTER_WEIGHTS)}}
    path = Path(output_dir) / HELDOUT_FILE if output_dir else None
    if path is not None and path.exists():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None  # unreadable: recompute and overwrite
        if isinstance(previous, dict) and previous.get("settings") == settings and "per_category" in previous:
            return previous
    tokenizer = load_tokenizer(model)
    ds = heldout_rows(tokenizer, data, split=split, preset=preset, template=template, system_prompt=system_prompt,
                      max_length=max_length, limit=limit)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in ds]
    lm = load_model(model, device=device, adapter=adapter)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    import numpy as np

    from tokensft.tokens import CATEGORIES

    set_threads("train", threads, device=device)
    per_token = token_nll(lm, rows, pad_token_id=int(pad), batch_size=batch_size, progress=progress)
    per_seq = [(float(a.sum()), int(a.size)) for a in per_token]
    per_category: dict[str, list[list]] = {c: [] for c in CATEGORIES}
    for row, nll in zip(rows, per_token):
        cats = np.asarray(scored_categories(tokenizer, row["input_ids"], row["labels"]))
        for c in CATEGORIES:
            sel = nll[cats == c]
            per_category[c].append([float(sel.sum()), int(sel.size)])
    result = {"settings": settings, **_summary(per_seq),
              "by_category": {c: _summary(v) for c, v in per_category.items()},
              "per_sequence": [[s, n] for s, n in per_seq], "per_category": per_category, "rows": list(ds["row"])}
    if token_rows:
        from tokensft.tokens import readable_tokens

        texts = []
        for row in rows[:token_rows]:
            shown, _ = readable_tokens(tokenizer, row["input_ids"])
            texts.append([shown[t] for t in range(1, len(row["labels"])) if row["labels"][t] != -100])
        result["per_token"] = {"nll": [[float(x) for x in a] for a in per_token[:token_rows]], "text": texts}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(result, indent=1))
    return result


def heldout_rows(tokenizer, data: str | os.PathLike, *, split: str = "test", preset: str | None = None,
                 template: str = "auto", system_prompt: str | None = None, max_length: int = 1024,
                 limit: int | None = None):
    """The tokenized sequences `heldout_nll` scores (a `datasets.Dataset` with `input_ids`, `labels`, `row`): `data`
    formatted as training formats it, rows training would drop left out, `row` = the index in `data`. Arguments as for
    `heldout_nll`. Raises FileNotFoundError / ValueError naming the file and row."""
    from tokensft.data import build_sft_dataset, load_records

    records = load_records(str(data), split=split, limit=limit)
    return build_sft_dataset(records, tokenizer, preset=preset, template=template, system_prompt=system_prompt,
                             max_length=max_length, source=str(data), keep_row_index=True)


def t975(df: int) -> float:
    """Two-sided 95% Student t quantile t_{0.975, df} for `df` degrees of freedom (exact, `scipy.stats.t.ppf`; no
    normal approximation at large df: t_{0.975, 31} = 2.0395, not 1.96); NaN for df < 1."""
    if df < 1:
        return math.nan
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def paired_nll_difference(result: dict[str, Any], baseline: dict[str, Any], *,
                          category: str | None = None) -> dict[str, Any]:
    """Token-weighted NLL difference `result − baseline` on the same held-out sequences, with a 95% interval.

    Δ = Σ_i (s_i − s'_i) / Σ_i n_i over sequences i (s = summed completion NLL in nats, n = completion tokens, equal
    for both models), i.e. exactly the difference of the two `nll_per_token` values. Its standard error treats the
    sequences as the sampling units (ratio estimator): se² = Σ_i (s_i − s'_i − Δ n_i)² / (Σ_i n_i)² · m / (m − 1) for
    m sequences; the interval is Δ ± t_{0.975, m−1} · se. Negative = `result` fits the held-out solutions better.

    Args:
        result, baseline: `heldout_nll` outputs on the same data, tokenizer and `max_length`.
        category: compare only the tokens of this category (`per_category`); sequences without one are left out.

    Returns:
        dict with `mean_diff` (nats/token), `ci95` (lo, hi), `n` (sequences), `frac_improved` (share of sequences
        whose summed NLL went down).

    Raises:
        ValueError: the two results are not on the same sequences (names the first differing setting or row).
    """
    sa, sb = result.get("settings", {}), baseline.get("settings", {})
    for key in ("data", "split", "preset", "template", "system_prompt", "max_length", "limit"):
        if key in sa and key in sb and sa[key] != sb[key]:
            raise ValueError(f"paired_nll_difference: the results differ in {key!r} ({sa[key]!r} vs {sb[key]!r}); "
                             "they must be computed on the same sequences")
    if category is None:
        a, b = result["per_sequence"], baseline["per_sequence"]
    else:
        if category not in result.get("per_category", {}) or category not in baseline.get("per_category", {}):
            raise ValueError(f"paired_nll_difference: no per-category NLL for {category!r} (recompute heldout_nll)")
        a, b = result["per_category"][category], baseline["per_category"][category]
    rows_a, rows_b = result.get("rows", list(range(len(a)))), baseline.get("rows", list(range(len(b))))
    if rows_a != rows_b or len(a) != len(b):
        raise ValueError(f"paired_nll_difference: different sequences ({len(a)} vs {len(b)} kept rows)")
    for r, (_, na), (_, nb) in zip(rows_a, a, b):
        if na != nb:
            raise ValueError(f"paired_nll_difference: data row {r} has {na} scored tokens in one result and {nb} in "
                             "the other (different tokenizer?)")
    pairs = [(x - y, n) for (x, n), (y, _) in zip(a, b) if n > 0]
    m = len(pairs)
    if m == 0:
        raise ValueError("paired_nll_difference: no scored sequences")
    tokens = sum(n for _, n in pairs)
    delta = sum(d for d, _ in pairs) / tokens
    if m > 1:
        se = math.sqrt(sum((d - delta * n) ** 2 for d, n in pairs) / tokens**2 * m / (m - 1))
        half = t975(m - 1) * se
    else:
        half = math.nan
    return {"mean_diff": delta, "ci95": (delta - half, delta + half), "n": m,
            "frac_improved": sum(d < 0 for d, _ in pairs) / m}
