"""Precomputed reference log-probs (`ref_source=cache`): run the reference once, train `sft-lr` without it.

`build_ref_cache` runs the reference model (the starting model, no adapter) once over the tokenized training set and
stores, per example, `log p_ref(input_ids[t] | input_ids[:t])` for every token `t` (float32; 0 where `labels[t]` is
-100 and at t = 0), aligned with the tokenized labels. Files in the cache directory:

    fingerprint.json            what the cache was built for (see `fingerprint`)
    shard_00000.safetensors     `log_probs` (flat float32) + `offsets` (int64, n_examples + 1) per 256 examples
    (written atomically; a rerun skips finished shards, so an interrupted build resumes)

`attach_ref_cache` checks that the fingerprint matches the run (model, tokenizer, template, max length, data) and
adds the `ref_log_probs` column; a stale or mismatched cache is refused, naming every field that differs.

KL modes (`sft+kl`, `asft`) need the reference's whole distribution at every position, which this cache does not
hold: they need `ref_source=adapter` or `model`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write

FINGERPRINT_FILE = "fingerprint.json"
SHARD_SIZE = 256
CACHE_VERSION = 1


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_hash(dataset) -> str:
    """Hash of every row's `input_ids` and `labels` (order-sensitive)."""
    h = hashlib.sha256()
    for ids, labels in zip(dataset["input_ids"], dataset["labels"]):
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(np.asarray(labels, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def model_hash(model_path: str) -> str:
    """Hash of a checkpoint directory's config and weight files (names, sizes, mtimes); the id for hub models."""
    p = Path(model_path)
    if not p.is_dir():
        return _sha(model_path)
    files = sorted(f for f in p.iterdir() if f.suffix in (".json", ".safetensors", ".bin"))
    return _sha([(f.name, f.stat().st_size, (f.read_text() if f.name == "config.json" else int(f.stat().st_mtime)))
                 for f in files])


def tokenizer_hash(tokenizer) -> str:
    """Hash of the vocabulary, special tokens and chat template."""
    return _sha([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens, tokenizer.chat_template])


def fingerprint(*, model: str, tokenizer, template: str, max_length, dataset) -> dict:
    """What a cache is valid for: `{version, model, tokenizer, template, max_length, data, num_examples}`."""
    from ..models import resolve_model

    return {
        "version": CACHE_VERSION,
        "model": model_hash(resolve_model(model)),
        "model_name": model,
        "tokenizer": tokenizer_hash(tokenizer),
        "template": template,
        "max_length": max_length,
        "data": dataset_hash(dataset),
        "num_examples": len(dataset),
    }


def _check(expected: dict, found: dict, cache_dir: Path) -> None:
    keys = ("version", "model", "tokenizer", "template", "max_length", "data", "num_examples")
    diff = [k for k in keys if expected.get(k) != found.get(k)]
    if diff:
        detail = "; ".join(f"{k}: cache has {found.get(k)!r}, this run needs {expected.get(k)!r}" for k in diff)
        raise ValueError(
            f"reference cache {cache_dir} does not match this run ({detail}). Rebuild it with `tokensft ref-cache` "
            "using the same --config, or use ref_source=adapter/model."
        )


def _shard_path(cache_dir: Path, i: int) -> Path:
    return cache_dir / f"shard_{i:05d}.safetensors"


@torch.no_grad()
def reference_log_probs(model, input_ids: list[int], labels: list[int], device) -> np.ndarray:
    """`(T,)` float32: log p_ref(input_ids[t] | input_ids[:t]) where labels[t] != -100, else 0 (t = 0 always 0)."""
    ids = torch.tensor([input_ids], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # (T-1, V)
    lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
    lab = torch.tensor(labels[1:], device=device)
    out = torch.zeros(len(input_ids), dtype=torch.float32)
    out[1:] = torch.where(lab != -100, lp, torch.zeros_like(lp)).cpu()
    return out.numpy()


def build_ref_cache(dataset, cache_dir: str | os.PathLike, *, model: str, tokenizer, template: str, max_length,
                    dtype=None, progress: bool = True) -> Path:
    """Compute and store the reference log-probs of every target token of `dataset` (resumable).

    Args:
        dataset: tokenized rows (`input_ids`, `labels`), exactly as training builds them.
        cache_dir: output directory.
        model: the reference (the starting model of the run), any form `tokensft.models.resolve_model` accepts.
        tokenizer, template, max_length: recorded in the fingerprint.

    Returns:
        The cache directory.

    Raises:
        ValueError: the directory holds a cache for another configuration.
    """
    from tqdm.auto import tqdm

    from ..models import load_model

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(model=model, tokenizer=tokenizer, template=template, max_length=max_length, dataset=dataset)
    fp_path = cache_dir / FINGERPRINT_FILE
    if fp_path.exists():
        _check(fp, json.loads(fp_path.read_text()), cache_dir)
    else:
        atomic_write(fp_path, json.dumps(fp, indent=2))
    ref = load_model(model, dtype=dtype)
    device = next(ref.parameters()).device
    n_shards = -(-len(dataset) // SHARD_SIZE)
    todo = [i for i in range(n_shards) if not _shard_path(cache_dir, i).exists()]
    bar = tqdm(total=len(dataset), desc="reference log-probs", unit="ex", disable=not progress,
               initial=len(dataset) - sum(min(SHARD_SIZE, len(dataset) - i * SHARD_SIZE) for i in todo))
    from safetensors.numpy import save

    for i in todo:
        rows = dataset.select(range(i * SHARD_SIZE, min((i + 1) * SHARD_SIZE, len(dataset))))
        chunks, offsets = [], [0]
        for r in rows:
            chunks.append(reference_log_probs(ref, r["input_ids"], r["labels"], device))
            offsets.append(offsets[-1] + len(chunks[-1]))
            bar.update(1)
        data = save({"log_probs": np.concatenate(chunks).astype(np.float32),
                     "offsets": np.asarray(offsets, dtype=np.int64)})
        atomic_write(_shard_path(cache_dir, i), data)
    bar.close()
    return cache_dir


def load_ref_cache(cache_dir: str | os.PathLike, num_examples: int) -> list[np.ndarray]:
    """Per-example reference log-probs from a complete cache. Raises ValueError when shards are missing."""
    from safetensors.numpy import load_file

    cache_dir = Path(cache_dir)
    out: list[np.ndarray] = []
    for i in range(-(-num_examples // SHARD_SIZE)):
        p = _shard_path(cache_dir, i)
        if not p.exists():
            raise ValueError(f"reference cache {cache_dir} is incomplete ({p.name} missing): rerun `tokensft ref-cache`")
        d = load_file(str(p))
        off = d["offsets"]
        out.extend(d["log_probs"][off[j]: off[j + 1]] for j in range(len(off) - 1))
    return out


def attach_ref_cache(dataset, cache_dir, *, model: str, tokenizer, template: str, max_length):
    """Add a `ref_log_probs` column (float32 per token) to `dataset` from a matching cache.

    Raises:
        FileNotFoundError: no cache at `cache_dir`.
        ValueError: the cache was built for another model / tokenizer / template / max length / data set.
    """
    if not cache_dir:
        raise ValueError("ref_source=cache needs --ref_cache_dir (built with `tokensft ref-cache`)")
    cache_dir = Path(cache_dir)
    fp_path = cache_dir / FINGERPRINT_FILE
    if not fp_path.exists():
        raise FileNotFoundError(f"no reference cache at {cache_dir} ({FINGERPRINT_FILE} missing): run `tokensft ref-cache`")
    expected = fingerprint(model=model, tokenizer=tokenizer, template=template, max_length=max_length, dataset=dataset)
    _check(expected, json.loads(fp_path.read_text()), cache_dir)
    values = load_ref_cache(cache_dir, len(dataset))
    for i, (v, ids) in enumerate(zip(values, dataset["input_ids"])):
        if len(v) != len(ids):
            raise ValueError(f"reference cache {cache_dir}: example {i} has {len(v)} values for {len(ids)} tokens")
    return dataset.add_column("ref_log_probs", [v.tolist() for v in values])
