"""tokenize_conversation / build_sft_dataset: exact completion-only labels on a tiny and on the SmolLM2 tokenizer."""

from __future__ import annotations

import logging

import pytest
import torch

from tokensft.data import (
    IGNORE_INDEX,
    build_sft_dataset,
    encode_prompt,
    load_records,
    prompt_messages,
    to_conversation,
    tokenize_conversation,
)


def supervised_spans(enc) -> list[list[int]]:
    """Contiguous runs of supervised token ids."""
    spans, cur = [], []
    for tok, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == tok
            cur.append(tok)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# ---- tiny word-level tokenizer: ids q=3 a=4 b=5 c=6 d=7, <eos>=pad=2 ----


def test_one_token_prompt_four_token_response_exact(tiny_tokenizer):
    enc = tokenize_conversation(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b c"}], tiny_tokenizer
    )
    assert enc["input_ids"] == [3, 4, 5, 6, 2]
    assert enc["labels"] == [-100, 4, 5, 6, 2]
    assert enc["completion_mask"] == [0, 1, 1, 1, 1]
    assert enc["truncated"] is False and enc["num_truncated"] == 0
    # after the causal shift (targets = labels[1:]) all 4 response tokens are scored, the first one included
    assert [t for t in enc["labels"][1:] if t != IGNORE_INDEX] == [4, 5, 6, 2]


def test_labels_follow_the_models_causal_shift(tiny_tokenizer):
    """HF's loss on our labels == mean CE of positions 0..3 predicting the 4 response tokens (the first not lost)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    enc = tokenize_conversation(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b c"}], tiny_tokenizer
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=torch.tensor([enc["labels"]]))
    expected = torch.nn.functional.cross_entropy(out.logits[0, :4], torch.tensor([4, 5, 6, 2]))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_tiny_multi_turn_assistant_first_and_trimmed_content(tiny_tokenizer):
    # the tiny template trims assistant content: spans come from the rendered text, not from the raw content
    msgs = [
        {"role": "assistant", "content": "  hello  "},
        {"role": "user", "content": "q d"},
        {"role": "assistant", "content": "a b"},
    ]
    enc = tokenize_conversation(msgs, tiny_tokenizer)
    assert enc["input_ids"] == [11, 2, 3, 7, 4, 5, 2]
    # labels[0] is always -100, even when the conversation opens with the assistant
    assert enc["labels"] == [-100, 2, -100, -100, 4, 5, 2]


def test_slow_tokenizer_fallback_matches_offsets_path(tiny_tokenizer):
    class NoOffsets:  # a tokenizer without offsets mapping (like a slow tokenizer)
        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def __call__(self, text, **kwargs):
            if kwargs.get("return_offsets_mapping"):
                raise NotImplementedError("no offsets")
            return self._tok(text, **kwargs)

    msgs = [
        {"role": "user", "content": "q d"},
        {"role": "assistant", "content": "a b c"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "d"},
    ]
    fast = tokenize_conversation(msgs, tiny_tokenizer)
    slow = tokenize_conversation(msgs, NoOffsets(tiny_tokenizer))
    assert slow == fast
    assert fast["labels"] == [-100, -100, 4, 5, 6, 2, -100, 7, 2]


def test_plain_template_for_tokenizers_without_chat_template(make_tiny):
    tok = make_tiny(chat_template=None)
    msgs = [{"role": "user", "content": "q d"}, {"role": "assistant", "content": "a b"}]
    enc = tokenize_conversation(msgs, tok)  # auto → plain
    # "Question: q d\nAnswer: " = [8, 3, 7, 9]; completion "a b" + EOS
    assert enc["input_ids"] == [8, 3, 7, 9, 4, 5, 2]
    assert enc["labels"] == [-100, -100, -100, -100, 4, 5, 2]
    assert encode_prompt(msgs[:1], tok) == [8, 3, 7, 9]
    with pytest.raises(ValueError, match="no chat_template"):
        tokenize_conversation(msgs, tok, template="chat")


def test_no_supervised_tokens_raises_and_truncation_flags(tiny_tokenizer):
    with pytest.raises(ValueError, match="no supervised"):
        tokenize_conversation([{"role": "user", "content": "q a b"}], tiny_tokenizer)
    msgs = [{"role": "user", "content": "q d c b"}, {"role": "assistant", "content": "a b"}]
    cut_all = tokenize_conversation(msgs, tiny_tokenizer, max_length=3)
    assert cut_all["truncated"] is True and cut_all["input_ids"] == [3, 7, 6] and set(cut_all["labels"]) == {-100}
    cut_some = tokenize_conversation(msgs, tiny_tokenizer, max_length=5)
    assert cut_some["truncated"] is False and cut_some["num_truncated"] == 2
    assert cut_some["labels"] == [-100, -100, -100, -100, 4]


# ---- real SmolLM2 tokenizer (ChatML template without generation markers; pad = eos = <|im_end|>) ----


def test_smollm_assistant_first_conversation(smol_tokenizer):
    tok = smol_tokenizer
    msgs = [
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    enc = tokenize_conversation(msgs, tok)
    assert enc["input_ids"] == list(tok.apply_chat_template(msgs, tokenize=True)["input_ids"])
    assert [decode(tok, s) for s in supervised_spans(enc)] == ["Hi, how can I help?<|im_end|>", "4<|im_end|>"]
    assert enc["labels"][0] == IGNORE_INDEX
    # the default system prompt the template inserts before the first turn is not supervised
    first = enc["labels"].index(next(lab for lab in enc["labels"] if lab != IGNORE_INDEX))
    assert decode(tok, enc["input_ids"][:first]).endswith("Hugging Face<|im_end|>\n<|im_start|>assistant\n")


def test_smollm_system_multi_turn_and_prompt_prefix(smol_tokenizer):
    tok = smol_tokenizer
    row = {"problem": "What is $3 \\cdot 4$?", "solution": "$3 \\cdot 4 = \\boxed{12}$."}
    conv = to_conversation(row, "math", system_prompt="You are a math tutor.")
    enc = tokenize_conversation(conv, tok)
    assert [decode(tok, s) for s in supervised_spans(enc)] == ["$3 \\cdot 4 = \\boxed{12}$.<|im_end|>"]
    prompt = encode_prompt(prompt_messages(row, "math", system_prompt="You are a math tutor."), tok)
    assert enc["input_ids"][: len(prompt)] == prompt
    assert set(enc["labels"][: len(prompt)]) == {IGNORE_INDEX} and enc["labels"][len(prompt)] != IGNORE_INDEX
    assert "You are a math tutor." in decode(tok, prompt) and "SmolLM" not in decode(tok, prompt)


def test_smollm_no_assistant_turn_raises(smol_tokenizer):
    with pytest.raises(ValueError, match="no supervised"):
        tokenize_conversation([{"role": "user", "content": "Hello"}], smol_tokenizer)


def test_smollm_plain_template_matches_eval_prompt(smol_tokenizer):
    tok = smol_tokenizer
    row = {"problem": "What is 2+3?", "solution": "2+3=5, so the answer is $\\boxed{5}$."}
    enc = tokenize_conversation(to_conversation(row, "math"), tok, template="plain")
    spans = supervised_spans(enc)
    assert [decode(tok, s) for s in spans] == [row["solution"] + tok.eos_token]
    n_prompt = enc["labels"].index(spans[0][0])
    expected_prompt = (
        f"Question: {row['problem']}\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.\nAnswer: "
    )
    assert decode(tok, enc["input_ids"][:n_prompt]) == expected_prompt
    assert enc["input_ids"][:n_prompt] == encode_prompt(prompt_messages(row, "math"), tok, template="plain")


@pytest.mark.parametrize("name,preset", [("math/train.jsonl", "math"), ("gsm8k/train.jsonl", "gsm8k")])
def test_real_files_supervise_exactly_the_solution(smol_tokenizer, shared_data, name, preset):
    path = shared_data / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    rows = load_records(str(path), limit=5)
    for i, row in enumerate(rows):
        conv = to_conversation(row, preset, index=i)
        enc = tokenize_conversation(conv, smol_tokenizer)
        spans = supervised_spans(enc)
        assert len(spans) == 1, i
        assert decode(smol_tokenizer, spans[0]) == conv[-1]["content"] + "<|im_end|>", i
    ds = build_sft_dataset(rows, smol_tokenizer, max_length=4096)
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == 5
    assert ds[0]["input_ids"] == tokenize_conversation(to_conversation(rows[0], preset), smol_tokenizer)["input_ids"]


# ---- build_sft_dataset ----


def test_build_drops_empty_completions_with_count(tiny_tokenizer, caplog):
    rows = [
        {"prompt": "q", "completion": "a b"},
        {"prompt": "q", "completion": ""},
        {"prompt": "q d", "completion": "   "},
        {"prompt": "q", "completion": "c"},
    ]
    with caplog.at_level(logging.WARNING, logger="tokensft.data"):
        ds = build_sft_dataset(rows, tiny_tokenizer)
    assert "Dropped 2 of 4 rows with an empty completion" in caplog.text
    assert ds["input_ids"] == [[3, 4, 5, 2], [3, 6, 2]]
    assert ds["labels"] == [[-100, 4, 5, 2], [-100, 6, 2]]


def test_build_drops_fully_truncated_rows_with_count(tiny_tokenizer, caplog):
    rows = [
        {"prompt": "q", "completion": "a b c"},  # 5 tokens: kept whole
        {"prompt": "q d c b a", "completion": "a"},  # completion beyond max_length: dropped
        {"prompt": "q d", "completion": "a b c d"},  # cut but kept
    ]
    with caplog.at_level(logging.WARNING, logger="tokensft.data"):
        ds = build_sft_dataset(rows, tiny_tokenizer, max_length=5, preset="prompt_completion")
    assert "Dropped 1 of 3 rows whose completion lies entirely beyond max_length=5" in caplog.text
    assert "Truncated 1 of 3 rows" in caplog.text
    assert ds["labels"] == [[-100, 4, 5, 6, 2], [-100, -100, 4, 5, 6]]


def test_build_missing_field_names_row_and_fields(tiny_tokenizer):
    rows = [{"problem": "q", "solution": "a"}, {"problem": "q", "answer": "a", "subject": "x"}]
    with pytest.raises(KeyError) as err:
        build_sft_dataset(rows, tiny_tokenizer, source="train.jsonl")
    msg = str(err.value)
    assert "train.jsonl row 2" in msg and "'solution'" in msg and "['answer', 'problem', 'subject']" in msg


def test_template_that_alters_content_falls_back_or_fails_clearly(make_tiny):
    # strips '@' (so the sentinel probe fails): the span is found by searching the content instead
    tok = make_tiny(
        "{% for m in messages %}{{ m['content'] | replace('@', '') }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% else %} {% endif %}{% endfor %}"
    )
    msgs = [{"role": "user", "content": "q d"}, {"role": "assistant", "content": "a b"}]
    assert tokenize_conversation(msgs, tok)["labels"] == [-100, -100, 4, 5, 2]
    # a template that rewrites the content cannot be aligned: clear error, not silent wrong labels
    tok = make_tiny("{% for m in messages %}{{ m['content'] | replace('@', '') | upper }} {% endfor %}")
    with pytest.raises(ValueError, match="Cannot locate assistant turn 1"):
        tokenize_conversation(msgs, tok)


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_a_huge_row_is_cut_before_tokenizing_and_keeps_the_same_tokens(smol_tokenizer, template, monkeypatch):
    """A 2 MB completion at max_length 64: the kept tokens and labels equal those of tokenizing the whole text, and
    the tokenizer never sees more than a few kB of it."""
    from tokensft.data import tokenize_conversation

    rng = __import__("random").Random(0)
    words = ["the", "answer", "is", "$x^2$", "+", "12", "\\frac{1}{2}", "é", "×", "so", "\n"]
    huge = " ".join(rng.choice(words) for _ in range(400_000))  # about 2 MB
    conv = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": huge}]
    whole = tokenize_conversation(conv, smol_tokenizer, template=template, max_length=None)
    seen = []
    real = type(smol_tokenizer).__call__

    def spy(self, text, *a, **k):
        seen.append(sum(map(len, text)) if isinstance(text, list) else len(text))
        return real(self, text, *a, **k)

    monkeypatch.setattr(type(smol_tokenizer), "__call__", spy)
    cut = tokenize_conversation(conv, smol_tokenizer, template=template, max_length=64)
    assert cut["input_ids"] == whole["input_ids"][:64] and cut["labels"] == whole["labels"][:64]
    assert max(seen) < 100_000


def test_template_without_generation_markers_gives_the_exact_mask_or_is_refused(make_tiny, tmp_path):
    """No `{% generation %}` markers needed: the tiny ChatML-like template (none) still gives exactly the assistant
    tokens + EOS, neither all-zero nor all-one. A template that drops the user turns would make the mask all-one
    (every token after the first supervised, no prompt ever seen): refused in one line naming the row."""
    msgs = [{"role": "user", "content": "q d"}, {"role": "assistant", "content": "a b"}]
    enc = tokenize_conversation(msgs, make_tiny())
    assert enc["completion_mask"] == [0, 0, 1, 1, 1] and enc["labels"] == [-100, -100, 4, 5, 2]
    drops_user = make_tiny("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
                           "{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match="rendered no prompt tokens") as err:
        tokenize_conversation(msgs, drops_user)
    assert "\n" not in str(err.value) and "['user', 'assistant']" in str(err.value)
    with pytest.raises(ValueError, match=r"train.jsonl row 1: The chat template rendered no prompt tokens"):
        build_sft_dataset([{"messages": msgs}], drops_user, source="train.jsonl")
    # an assistant-only conversation has no prompt to lose: accepted
    assert tokenize_conversation([{"role": "assistant", "content": "a b"}], drops_user)["labels"] == [-100, 5, 2]


def test_template_that_drops_assistant_turns_is_refused_not_matched_elsewhere(make_tiny):
    """A template (no generation markers) that renders only the user turns: the assistant-only mask would be all-zero,
    or, when the assistant's text also occurs in a user turn, would silently supervise the user's tokens (the content
    search finds it there). Both refused in one line naming the turn; a template that only alters the content is
    still aligned (`test_template_that_alters_content_falls_back_or_fails_clearly`)."""
    drops = make_tiny("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} {% endif %}{% endfor %}"
                      "{{ eos_token }}")
    for user in ("q d", "q a b"):  # the second holds the assistant's text "a b"
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": "a b"}]
        with pytest.raises(ValueError, match="The chat template does not render assistant turn 1") as err:
            tokenize_conversation(msgs, drops)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"train.jsonl row 1: The chat template does not render assistant turn 1"):
        build_sft_dataset([{"messages": msgs}], drops, source="train.jsonl")
