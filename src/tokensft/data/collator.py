"""Batch tokenized rows: right padding with an attention mask, or padding-free packing with `position_ids`.

Padding positions get `labels = -100` decided from the attention mask / the sample lengths, never by comparing ids
with `pad_token_id`: many tokenizers (SmolLM2, Llama 3, ...) pad with their EOS token, and the real EOS that closes
a completion must stay supervised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["IGNORE_INDEX", "CompletionCollator", "labels_from_attention"]

IGNORE_INDEX = -100
FLOAT_FIELDS = ("ref_log_probs", "weights")


def _as_long(x: Any) -> torch.Tensor:
    return x.long() if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.long)


def labels_from_attention(input_ids, attention_mask, completion_mask=None) -> torch.Tensor:
    """Labels that keep every attended (and, when given, completion) token and mask the rest with -100.

    Args:
        input_ids: `(B, T)` or `(T,)` token ids (tensor or nested lists).
        attention_mask: same shape; 1 for real tokens, 0 for padding.
        completion_mask: optional, same shape; 1 for tokens to supervise.

    Returns:
        `(B, T)` or `(T,)` long tensor: `input_ids` where `attention_mask` (and `completion_mask`) is 1, else -100.
        With pad == EOS == 2: ids `[5, 6, 7, 2, 2, 2]`, attention `[1, 1, 1, 1, 0, 0]` → `[5, 6, 7, 2, -100, -100]`.

    Raises:
        ValueError: shapes differ.
    """
    ids = _as_long(input_ids)
    keep = _as_long(attention_mask).bool()
    if keep.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(keep.shape)} != input_ids shape {tuple(ids.shape)}")
    if completion_mask is not None:
        comp = _as_long(completion_mask).bool()
        if comp.shape != ids.shape:
            raise ValueError(f"completion_mask shape {tuple(comp.shape)} != input_ids shape {tuple(ids.shape)}")
        keep = keep & comp
    return torch.where(keep, ids, torch.full_like(ids, IGNORE_INDEX))


class CompletionCollator:
    """Collate `{"input_ids", "labels"}` rows (from `build_sft_dataset`) into a training batch.

    Args:
        pad_token_id: id written at padding positions (may equal EOS; labels never look at it).
        pad_to_multiple_of: round the padded length (or the packed length) up to a multiple of this.
        padding_free: pack the batch into one row with `position_ids` restarting at 0 per sample and no
            `attention_mask` (for flash-attention / SDPA varlen kernels that read sequence boundaries from
            `position_ids`). Each sample's first label is forced to -100, so no token is trained to predict the
            next sample's first token.

    A row without `labels` is supervised on all its tokens, or on its `completion_mask` when present.
    Float per-token columns listed in `FLOAT_FIELDS` (`ref_log_probs`: cached reference log-probs; `weights`: data
    weights from `build_sft_dataset`; one per token, aligned with `input_ids`) are carried along as float32, padded
    with 0.

    Returns (from `__call__`):
        padded: `{"input_ids": (B, T) long, "attention_mask": (B, T) long, "labels": (B, T) long}`, right padding,
        labels -100 on padding. padding-free: `{"input_ids": (1, N) long, "position_ids": (1, N) long,
        "labels": (1, N) long}` with N the total length (rounded up with `pad_to_multiple_of`).

    Raises (from `__call__`):
        ValueError: an empty batch, an empty row, or `labels` whose length differs from `input_ids`.
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None, padding_free: bool = False):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the EOS token) first")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_free = padding_free

    def _round(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else -(-n // m) * m

    def _rows(self, features: Sequence[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not features:
            raise ValueError("CompletionCollator got an empty batch")
        rows = []
        for i, f in enumerate(features):
            ids = _as_long(f["input_ids"]).reshape(-1)
            if ids.numel() == 0:
                raise ValueError(f"batch row {i} has no tokens")
            if f.get("labels") is not None:
                labels = _as_long(f["labels"]).reshape(-1)
            else:
                labels = labels_from_attention(ids, torch.ones_like(ids), f.get("completion_mask"))
            if labels.shape != ids.shape:
                raise ValueError(f"batch row {i}: {labels.numel()} labels for {ids.numel()} input_ids")
            rows.append((ids, labels))
        return rows

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = self._collate(features)
        for key in FLOAT_FIELDS:
            if features and key in features[0]:
                vals = [torch.as_tensor(f[key], dtype=torch.float32).reshape(-1) for f in features]
                for i, (v, f) in enumerate(zip(vals, features)):
                    if v.numel() != len(f["input_ids"]):
                        raise ValueError(f"batch row {i}: {v.numel()} {key} for {len(f['input_ids'])} input_ids")
                shape = batch["input_ids"].shape
                out = torch.zeros(shape, dtype=torch.float32)
                if self.padding_free:
                    flat = torch.cat(vals)
                    out[0, : flat.numel()] = flat
                else:
                    for b, v in enumerate(vals):
                        out[b, : v.numel()] = v
                batch[key] = out
        return batch

    def _collate(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        rows = self._rows(features)
        if self.padding_free:
            ids = torch.cat([r[0] for r in rows])  # (N,)
            labels = torch.cat([torch.cat([r[1].new_full((1,), IGNORE_INDEX), r[1][1:]]) for r in rows])  # (N,)
            positions = torch.cat([torch.arange(r[0].numel(), dtype=torch.long) for r in rows])  # (N,)
            extra = self._round(ids.numel()) - ids.numel()
            if extra:  # tail padding forms its own pseudo-sequence
                ids = torch.cat([ids, ids.new_full((extra,), self.pad_token_id)])
                labels = torch.cat([labels, labels.new_full((extra,), IGNORE_INDEX)])
                positions = torch.cat([positions, torch.arange(extra, dtype=torch.long)])
            return {"input_ids": ids[None], "position_ids": positions[None], "labels": labels[None]}  # (1, N)
        T = self._round(max(r[0].numel() for r in rows))
        B = len(rows)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, lab) in enumerate(rows):
            n = ids.numel()
            input_ids[b, :n] = ids
            attention_mask[b, :n] = 1
            labels[b, :n] = lab
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
