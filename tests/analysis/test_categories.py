"""Token text and categories (`tokensft.tokens`): categorisation of vocabulary pieces, display of what traces store."""

from __future__ import annotations

import pytest

from tokensft.tokens import CATEGORIES, categorize_token, display_piece, readable_tokens, refine_categories

TABLE = [
    # numbers, with and without the byte-level BPE leading-space marker
    ("Ġ12", "number"), ("12", "number"), ("7", "number"), ("3.14", "number"), ("Ġ1,000", "number"),
    # words start a word (space marker or capital), subwords continue one
    ("▁x", "word"), ("Ġthe", "word"), ("The", "word"), ("▁answer", "word"),
    ("ing", "subword"), ("istant", "subword"), ("x", "subword"), ("'s", "subword"),
    ("Ã©", "subword"),  # byte-level 'é' continuing 'Caf'
    ("ĠâĢ", "subword"),  # only part of a UTF-8 character
    # LaTeX commands, whole or split by the tokenizer (SmolLM2: 'Ġ\\' + 'frac')
    ("\\frac", "latex"), ("Ġ\\frac", "latex"), ("\\sqrt", "latex"), ("Ġ\\", "latex"), ("\\", "latex"),
    ("\\{", "latex"),
    # operators, including LaTeX operator commands and the unicode minus
    ("=", "operator"), ("Ġ=", "operator"), ("+", "operator"), ("Ġ+", "operator"), ("Ġ-", "operator"),
    ("^", "operator"), ("\\times", "operator"), ("Ġ\\cdot", "operator"), ("≤", "operator"), ("−", "operator"),
    # punctuation, including byte-level multi-byte characters (em dash, right quote)
    (".", "punctuation"), (",", "punctuation"), ("$", "punctuation"), ("Ġ$", "punctuation"),
    ("}{", "punctuation"), ("(", "punctuation"), ("$.", "punctuation"), ("ĠâĢĶ", "punctuation"),
    ("âĢĻ", "punctuation"),
    # whitespace: newlines (byte-level 'Ċ', real '\n'), spaces, tabs, bare markers
    ("Ċ", "whitespace"), ("ĊĊ", "whitespace"), ("\n", "whitespace"), ("Ġ", "whitespace"), ("ĠĠĠ", "whitespace"),
    ("▁", "whitespace"), ("\t", "whitespace"), ("ĉ", "whitespace"), (" ", "whitespace"),
    # chat-template specials are recognised even without the tokenizer's flag
    ("<|im_end|>", "special"), ("<|im_start|>", "special"),
]  # fmt: skip


@pytest.mark.parametrize(("piece", "expected"), TABLE)
def test_categorize_token(piece, expected):
    assert categorize_token(piece) == expected


def test_table_covers_every_reference_category():
    assert len(TABLE) >= 20
    assert {c for _, c in TABLE} == set(CATEGORIES)


def test_is_special_flag_wins():
    assert categorize_token("Ġthe", is_special=True) == "special"


def test_refine_rejoins_split_latex_commands():
    pieces = ["Ġ\\", "box", "ed", "{", "4", "2", "}", "Ġ\\", "times", "Ġ", "4", "Ġ\\", "Ġthe", "\\", "frac"]
    cats = refine_categories(pieces, [categorize_token(p) for p in pieces])
    assert cats == ["latex", "latex", "latex", "punctuation", "number", "number", "punctuation",
                    "operator", "operator", "whitespace", "number", "latex", "word", "latex", "latex"]  # fmt: skip


# What a trace stores: decoded text (`readable_tokens`), a raw piece only for part of a UTF-8 character, and raw
# byte-level pieces in traces written before tokensft.tokens. Decoded non-ASCII text must survive display unchanged.
@pytest.mark.parametrize(("stored", "text"), [
    (" ×", " ×"), ("÷", "÷"), (" ±", " ±"), ("°", "°"), ("é", "é"), (" —", " —"), ("’", "’"), ("naïve", "naïve"),
    ("plain", "plain"), (" \\frac", " \\frac"), ("\n\n", "\n\n"),
    ("ĠâĢĶ", " —"), ("Ġ\\", " \\"), ("ĊĊ", "\n\n"), ("▁x", " x"),  # raw pieces of older traces
    ("âĢ", "\\xe2\\x80"),  # part of a character: its bytes, not a replacement character
])  # fmt: skip
def test_display_piece(stored, text):
    assert display_piece(stored) == text


def test_decoded_text_keeps_its_category():
    """The category of decoded text equals that of its raw piece (analysis falls back to the stored text)."""
    for raw, decoded in [("ĠÃĹ", " ×"), ("Ã·", "÷"), ("Â±", "±"), ("ĠâĢĶ", " —"), ("Ġ12", " 12"), ("Ġthe", " the")]:
        assert categorize_token(decoded) == categorize_token(raw), (raw, decoded)


def _byte_level_tokenizer():
    """A byte-level BPE tokenizer (the GPT-2 / SmolLM2 / Qwen kind) trained offline on text with non-ASCII math."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["3 × 4 = 12, 8 ÷ 2 = 4, x ± 1, 90° angle — a café, naïve \\frac{1}{2}"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         special_tokens=["<|im_end|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def test_readable_tokens_stores_decoded_text():
    """On a byte-level BPE vocabulary, what the tracer stores for `×`, `÷`, `±`, `°` is the character itself, and
    display_piece shows it unchanged; the categories are those of the raw pieces."""
    tok = _byte_level_tokenizer()
    ids = tok("3 × 4 ÷ 2 ± 1 at 90° — café")["input_ids"]
    texts, cats = readable_tokens(tok, ids)
    assert "".join(display_piece(t) for t in texts) == "3 × 4 ÷ 2 ± 1 at 90° — café"
    assert "".join(texts) == "3 × 4 ÷ 2 ± 1 at 90° — café"
    by_text = dict(zip((t.strip() for t in texts), cats))
    assert by_text["×"] == by_text["÷"] == by_text["±"] == "operator"
    assert by_text["3"] == "number"
    for i, text in zip(ids, texts):
        assert categorize_token(text) == categorize_token(tok.convert_ids_to_tokens(i)), text
