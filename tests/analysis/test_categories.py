"""Token categorisation of decoded BPE / SentencePiece pieces (`tokensft.tracing.schema.categorize_token`)."""

from __future__ import annotations

import pytest

from tokensft.analysis.load import display_piece, refine_categories
from tokensft.tracing.schema import CATEGORIES, categorize_token

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


@pytest.mark.parametrize(("piece", "text"), [("ĠâĢĶ", " —"), ("Ġ\\", " \\"), ("ĊĊ", "\n\n"), ("▁x", " x"),
                                             ("Ã¯ve", "ïve"), ("plain", "plain")])  # fmt: skip
def test_display_piece(piece, text):
    assert display_piece(piece) == text
