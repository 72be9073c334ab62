"""CompletionCollator and labels_from_attention: padding never masks a real EOS; padding-free packing."""

from __future__ import annotations

import pytest
import torch

from tokensft.data import IGNORE_INDEX, CompletionCollator, labels_from_attention


def test_labels_from_attention_pad_equals_eos():
    # eos = pad = 2: the first 2 is the real EOS (attended) and stays supervised; the padding 2s do not
    labels = labels_from_attention([5, 6, 7, 2, 2, 2], [1, 1, 1, 1, 0, 0])
    assert labels.tolist() == [5, 6, 7, 2, -100, -100]
    assert labels.dtype == torch.long


def test_labels_from_attention_batched_with_completion_mask():
    ids = torch.tensor([[5, 6, 7, 2, 2, 2], [8, 9, 2, 2, 2, 2]])
    attn = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    comp = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    assert labels_from_attention(ids, attn, comp).tolist() == [
        [-100, -100, 7, 2, -100, -100],
        [-100, 9, 2, -100, -100, -100],
    ]
    with pytest.raises(ValueError, match="shape"):
        labels_from_attention(ids, attn[:, :3])


def test_padded_batch_keeps_real_eos_and_masks_padding():
    pad = eos = 2
    feats = [
        {"input_ids": [5, 6, 7, eos], "labels": [-100, 6, 7, eos]},
        {"input_ids": [8, eos], "labels": [-100, eos]},
    ]
    out = CompletionCollator(pad)(feats)
    assert out["input_ids"].tolist() == [[5, 6, 7, 2], [8, 2, 2, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7, 2], [-100, 2, -100, -100]]
    assert all(v.dtype == torch.long for v in out.values())
    assert "position_ids" not in out


def test_padded_batch_pad_to_multiple_and_rows_without_labels():
    pad = 2
    feats = [
        {"input_ids": [5, 6, 7, 2]},  # no labels: every attended token supervised, incl. the EOS
        {"input_ids": [8, 9, 2], "completion_mask": [0, 1, 1]},
    ]
    out = CompletionCollator(pad, pad_to_multiple_of=8)(feats)
    assert out["input_ids"].shape == (2, 8)
    assert out["labels"].tolist() == [
        [5, 6, 7, 2] + [-100] * 4,
        [-100, 9, 2] + [-100] * 5,
    ]
    assert out["attention_mask"].sum(1).tolist() == [4, 3]


def test_padding_free_positions_and_labels():
    feats = [
        {"input_ids": [0, 1, 2], "labels": [-100, 1, 2]},
        {"input_ids": [7, 8, 9], "labels": [-100, 8, 9]},
    ]
    out = CompletionCollator(0, padding_free=True)(feats)
    assert set(out) == {"input_ids", "position_ids", "labels"}
    assert out["input_ids"].tolist() == [[0, 1, 2, 7, 8, 9]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2]]
    assert out["labels"].tolist() == [[-100, 1, 2, -100, 8, 9]]


def test_padding_free_forces_boundary_label_and_pads_tail():
    # a sample whose first label is supervised would train across the boundary: the collator masks it
    feats = [{"input_ids": [0, 1, 2], "labels": [0, 1, 2]}, {"input_ids": [7, 8, 9], "labels": [7, 8, 9]}]
    out = CompletionCollator(3, padding_free=True, pad_to_multiple_of=4)(feats)
    assert out["input_ids"].tolist() == [[0, 1, 2, 7, 8, 9, 3, 3]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1]]
    assert out["labels"].tolist() == [[-100, 1, 2, -100, 8, 9, -100, -100]]


def test_errors():
    with pytest.raises(ValueError, match="empty batch"):
        CompletionCollator(0)([])
    with pytest.raises(ValueError, match="labels"):
        CompletionCollator(0)([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="pad_token_id"):
        CompletionCollator(None)


def test_padding_free_loss_equals_padded_loss():
    """Invariance: a tiny Llama gives the same mean loss on the padded and the packed (padding-free) batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    feats = [
        {"input_ids": [3, 4, 5, 6, 7, 8, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7, 8, 9]},
        {"input_ids": [9, 10, 11], "labels": [IGNORE_INDEX, 10, 11]},
        {"input_ids": [12, 13, 14, 15], "labels": [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 15]},
    ]
    with torch.no_grad():
        padded = model(**CompletionCollator(0)(feats)).loss
        packed = model(**CompletionCollator(0, padding_free=True, pad_to_multiple_of=8)(feats)).loss
        # reference: each sample alone, sum of token losses / number of supervised tokens
        total, count = 0.0, 0
        for f in feats:
            logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0, :-1]  # (T-1, V)
            target = torch.tensor(f["labels"][1:])
            keep = target != IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    assert padded.item() == pytest.approx(total / count, rel=1e-5)
    assert packed.item() == pytest.approx(total / count, rel=1e-5)
