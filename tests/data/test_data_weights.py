"""Weights from the data: per-message `weight` in chat data, a per-token weight column, and the prompt-loss weight;
exact per-token values and one-line errors naming the source, row and field."""

from __future__ import annotations

import math

import pytest
from tests.data.conftest import make_tiny_tokenizer

from tokensft.data import build_sft_dataset
from tokensft.data.tokenize import tokenize_conversation

MULTI = [
    {"role": "assistant", "content": "hello", "weight": 0.0},  # [11, 2]: unsupervised
    {"role": "user", "content": "q d"},  # [3, 7]
    {"role": "assistant", "content": "a b", "weight": 2.0},  # [4, 5, 2]: doubled
]


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_message_weights_zero_unsupervises_and_two_doubles(template):
    tok = make_tiny_tokenizer()
    enc = tokenize_conversation(MULTI, tok, template=template)
    plain = tokenize_conversation([{k: v for k, v in m.items() if k != "weight"} for m in MULTI], tok,
                                  template=template)
    assert enc["input_ids"] == plain["input_ids"]
    n = len(enc["input_ids"])
    last = [t for t, lab in enumerate(plain["labels"]) if lab != -100][-3:]  # the second assistant turn
    assert enc["labels"] == [plain["input_ids"][t] if t in last else -100 for t in range(n)]
    assert enc["weights"] == [2.0 if t in last else 0.0 for t in range(n)]
    assert "weights" not in plain  # no weight anywhere: no column, the loss is exactly as before


def test_token_weight_column_is_aligned_with_the_supervised_tokens():
    tok = make_tiny_tokenizer()
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b c"}]  # [3, 4, 5, 6, 2]
    enc = tokenize_conversation(msgs, tok, token_weights=[1.0, 0.5, 0.0, 3.0])
    assert enc["weights"] == [0.0, 1.0, 0.5, 0.0, 3.0]
    assert enc["labels"] == [-100, 4, 5, -100, 2]  # weight 0: not supervised, not counted
    with pytest.raises(ValueError, match="'token_weights' has 3 weights but the completion has 4 supervised tokens"):
        tokenize_conversation(msgs, tok, token_weights=[1.0, 1.0, 1.0])


def test_prompt_loss_weight_supervises_the_prompt_with_lambda():
    tok = make_tiny_tokenizer()
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q d"},
            {"role": "assistant", "content": "a b"}]  # [10, 3, 7, 4, 5, 2]
    enc = tokenize_conversation(msgs, tok, prompt_loss_weight=0.25)
    assert enc["input_ids"] == [10, 3, 7, 4, 5, 2]
    assert enc["labels"] == [-100, 3, 7, 4, 5, 2]  # every token after the first; the first is never a target
    assert enc["weights"] == [0.0, 0.25, 0.25, 1.0, 1.0, 1.0]
    assert enc["completion_mask"] == [0, 0, 0, 1, 1, 1]


def test_build_dataset_carries_weights_and_names_bad_values():
    tok = make_tiny_tokenizer()
    rows = [{"messages": MULTI}, {"messages": [{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "a"}]}]
    ds = build_sft_dataset(rows, tok, preset="messages", template="chat", instruction=None)
    assert ds["weights"][1] == [0.0, 1.0, 1.0]  # [3, 4, 2]: a row without weights gets 1 on its supervised tokens
    bad = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": -1}]}]
    with pytest.raises(ValueError, match=r"train.jsonl row 1: field 'messages\[1\].weight' must be a finite number "
                                         r">= 0, got -1"):
        build_sft_dataset(bad, tok, preset="messages", source="train.jsonl")
    bad[0]["messages"][1]["weight"] = math.nan
    with pytest.raises(ValueError, match="finite number"):
        build_sft_dataset(bad, tok, preset="messages", source="train.jsonl")
    user_w = [{"messages": [{"role": "user", "content": "q", "weight": 2}, {"role": "assistant", "content": "a"}]}]
    with pytest.raises(ValueError, match=r"row 1: field 'messages\[0\].weight': only assistant turns"):
        build_sft_dataset(user_w, tok, preset="messages")
    cols = [{"prompt": "q", "completion": "a b", "tw": [1, 2, 3]}, {"prompt": "q", "completion": "a", "tw": [1]}]
    with pytest.raises(ValueError, match=r"d.jsonl row 2: field 'token_weights' has 1 weights but the completion "
                                         r"has 2"):
        build_sft_dataset(cols, tok, preset="prompt_completion", token_weights_field="tw", source="d.jsonl")
    with pytest.raises(ValueError, match=r"row 1: field 'tw\[1\]' must be a finite number >= 0"):
        build_sft_dataset([{"prompt": "q", "completion": "a b", "tw": [1, "x", 3]}], tok, preset="prompt_completion",
                          token_weights_field="tw")
    with pytest.raises(ValueError, match=r"row 1: field 'tw' must be a list of per-token weights, got missing"):
        build_sft_dataset([{"prompt": "q", "completion": "a"}], tok, preset="prompt_completion",
                          token_weights_field="tw")
    ok = build_sft_dataset([{**cols[0], "tw": [1, 2, 3]}, {**cols[1], "tw": [1, 0.5]}], tok,
                           preset="prompt_completion", token_weights_field="tw")
    assert ok["weights"] == [[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 0.5]]


def test_rows_weighted_zero_everywhere_are_dropped_with_a_count(caplog):
    tok = make_tiny_tokenizer()
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}]
    with caplog.at_level("WARNING", logger="tokensft.data"):
        ds = build_sft_dataset(rows, tok, preset="messages")
    assert len(ds) == 1 and "Dropped 1 of 2 rows whose every supervised token has weight 0" in caplog.text


def test_message_and_token_weights_survive_padding_free_packing():
    """Both data-weight forms (an assistant turn's `weight`, a `--token_weights_field` column) reach the packed
    `--padding_free true` batch at the same tokens as in the padded one: sample i's slice of the packed row holds
    exactly its own weights (0 at its first token, the packed boundary, which is never a target)."""
    import torch

    from tokensft.data import CompletionCollator

    tok = make_tiny_tokenizer()
    chat = build_sft_dataset([{"messages": MULTI}, {"messages": MULTI[1:]}], tok, preset="messages", template="chat",
                             instruction=None)
    cols = build_sft_dataset([{"prompt": "q", "completion": "a b", "tw": [1, 2, 3]},
                              {"prompt": "q d", "completion": "a", "tw": [0.5, 4]}], tok,
                             preset="prompt_completion", token_weights_field="tw")
    for ds in (chat, cols):
        feats = [ds[i] for i in range(len(ds))]
        padded = CompletionCollator(0)(feats)
        packed = CompletionCollator(0, padding_free=True, pad_to_multiple_of=8)(feats)
        start = 0
        for b, f in enumerate(feats):
            n = len(f["input_ids"])
            assert packed["weights"][0, start:start + n].tolist() == padded["weights"][b, :n].tolist() == f["weights"]
            # weights sit on the supervised labels only, in both layouts
            assert ((packed["weights"][0, start:start + n] > 0) == (packed["labels"][0, start:start + n] != -100)).all()
            start += n
        assert torch.all(packed["weights"][0, start:] == 0)  # the tail padding carries no weight
    assert chat[0]["weights"] == [0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0]  # turn 1 weight 0, turn 2 weight 2
    assert cols[0]["weights"] == [0.0, 1.0, 2.0, 3.0]
