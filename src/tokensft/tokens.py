"""Tokens as text: the one place that turns token ids into the text a trace stores, shows it, and names its category.

Depends on nothing (a tokenizer is passed in, duck-typed). Used by the tracer (what a trace stores), the analysis and
the visualizer (how it is shown and grouped) and the held-out evaluation (NLL per token category).

What a trace stores per token is *text*: `tokenizer.decode([id])` (`" ×"`, `" the"`, `"\\frac"`), with two
exceptions: a token holding only part of a UTF-8 character keeps its raw vocabulary piece (`"âĢ"`), and traces
written before this module may hold raw byte-level BPE pieces (`"Ġthe"`). `display_piece` shows all three.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["CATEGORIES", "categorize_token", "display_piece", "readable_tokens", "refine_categories"]

CATEGORIES = ("number", "operator", "latex", "word", "subword", "punctuation", "whitespace", "special")


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-unicode map of byte-level BPE vocabularies (`Ġ` = space, `Ċ` = newline)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in bs]
    return {**{chr(b): b for b in bs}, **{chr(256 + i): b for i, b in enumerate(extra)}}


_BYTE_DECODER = _byte_decoder()


def _is_raw_bpe(piece: str) -> bool:
    """A raw byte-level BPE piece, not decoded text: every character is in the byte alphabet and at least one is a
    remapped byte (U+0100..U+0143: `Ġ` space, `Ċ` newline, `âĢ` parts of multi-byte characters). Decoded text such as
    `×`, `÷`, `±`, `°` or `é` (all below U+0100) is never taken for one."""
    return bool(piece) and all(c in _BYTE_DECODER for c in piece) and any(ord(c) >= 0x100 for c in piece)


def display_piece(piece: str) -> str:
    """Readable text of a token as a trace stores it (see the module docstring): decoded text is returned as it is;
    a raw byte-level BPE piece is decoded to UTF-8 (`Ġ` -> space, `Ċ` -> newline, `ĠâĢĶ` -> ` —`), an incomplete
    UTF-8 sequence shown as `\\xNN` escapes; SentencePiece's `▁` becomes a space.

    Examples: `display_piece(" ×") == " ×"`, `display_piece("Ġthe") == " the"`, `display_piece("âĢ") == "\\xe2\\x80"`.
    """
    if _is_raw_bpe(piece):
        piece = bytes(_BYTE_DECODER[c] for c in piece).decode("utf-8", errors="backslashreplace")
    return piece.replace("▁", " ")


def readable_tokens(tokenizer, ids: list[int]) -> tuple[list[str], list[str]]:
    """Per token id: the text a trace stores and its category.

    Args:
        tokenizer: a transformers tokenizer (or a processor with `.tokenizer`); needs `convert_ids_to_tokens` and
            `decode`.
        ids: token ids of one sequence.

    Returns:
        `(texts, categories)`, one entry per id. Text: `decode([id])` with special tokens kept, a SentencePiece
        leading space kept; the raw piece when the token is only part of a UTF-8 character (decode gives `�`).
        Category: `categorize_token` of the raw vocabulary piece (`is_special` from the tokenizer's special ids).
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    pieces = tok.convert_ids_to_tokens(ids)
    special = set(getattr(tok, "all_special_ids", []) or [])
    texts, cats = [], []
    for i, piece in zip(ids, pieces):
        piece = "" if piece is None else str(piece)
        try:
            text = tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        except Exception:  # noqa: BLE001 - fall back to the raw piece for odd tokenizers
            text = piece
        if "\ufffd" in text:
            text = piece
        if piece.startswith("▁") and not text.startswith(" "):
            text = " " + text
        texts.append(text)
        cats.append(categorize_token(piece, is_special=i in special))
    return texts, cats


_NUM = re.compile(r"^[0-9]+([.,][0-9]+)?$")
_OPS = set("+-*/=<>^×÷±∓≤≥≠≈·%|!−∗⋅") | {"<=", ">=", "!=", "==", "**", "->", "=>", "\\times", "\\cdot", "\\div",
                                            "\\pm", "\\leq", "\\geq", "\\neq", "\\le", "\\ge", "\\approx"}
_SPECIAL = re.compile(r"^(<\|[^|<>\s]+\|>|</?s>|<unk>|<pad>|<eos>|<bos>|\[(CLS|SEP|PAD|MASK|UNK)\])$")
_LATEX = re.compile(r"^\\([A-Za-z]+|[^A-Za-z0-9\s]?)$")  # \frac, a lone \ (command split by the tokenizer), \{ \, \\


def categorize_token(piece: str, *, is_special: bool = False) -> str:
    """Category of a decoded BPE/SentencePiece token, one of `CATEGORIES`.

    Byte-level BPE pieces (GPT-2/Llama-3/SmolLM2/Qwen vocabularies) are first decoded to text (`ĠâĢĶ` -> ` —`,
    `Ã©` -> `é`; a piece holding only part of a UTF-8 character keeps its complete characters, and is `subword` when
    nothing but spaces is left). Leading-space markers (`Ġ` of byte-level BPE, `▁` of SentencePiece) and real
    spaces are stripped before classifying; a token made only of them (or of newlines/tabs) is `whitespace`.

    Rules, in order: special token (`is_special`, or `<|...|>`, `<s>`, `</s>`, `<unk>`, `<pad>`); whitespace;
    number (digits, optionally one `.`/`,` inside); operator (`+ - * / = < > ^ −`, `\\times`, `\\leq`, ...);
    LaTeX (`\\frac`, `\\sqrt`: backslash + letters; also a lone backslash, which byte-level tokenizers split from
    the command name, and `\\{`, `\\,`, `\\\\`); word (alphabetic, starts a word: had a leading space marker or
    is capitalised); subword (alphabetic continuation); punctuation (everything else non-alphanumeric).

    Source: the reference study's token categories (number, operator, LaTeX, word, subword, punctuation, whitespace).
    """
    if is_special or _SPECIAL.match(piece):
        return "special"
    if piece and all(c in _BYTE_DECODER for c in piece) and any(ord(c) >= 0x80 for c in piece):
        raw = bytes(_BYTE_DECODER[c] for c in piece)
        try:
            piece = raw.decode("utf-8")
        except UnicodeDecodeError:
            if any(ord(c) >= 0x100 for c in piece):  # surely byte-level (remapped bytes): keep whole characters
                piece = raw.decode("utf-8", errors="ignore")
                if not piece.strip():
                    return "subword"
    starts_word = piece[:1] in ("Ġ", "▁", " ", "Ċ", "\n", "\t")
    s = piece.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n").replace("ĉ", "\t")
    core = s.strip()
    if not core:
        return "whitespace"
    if _NUM.match(core):
        return "number"
    if core in _OPS or (len(core) <= 2 and all(c in "+-*/=<>^" for c in core)):
        return "operator"
    if _LATEX.match(core):
        return "latex"
    if core.isalpha():
        return "word" if (starts_word or core[0].isupper()) else "subword"
    if any(unicodedata.category(c).startswith("L") or c.isdigit() for c in core):
        return "word" if starts_word else "subword"
    return "punctuation"


def refine_categories(pieces: list[str], categories: list[str]) -> list[str]:
    """Categories with LaTeX commands that the tokenizer split re-joined: byte-level BPE turns `\\frac` into `Ġ\\`
    + `frac` (and `\\boxed` into `Ġ\\` + `box` + `ed`). The backslash piece and the alphabetic pieces that follow
    it without a space get the category of the whole command (`categorize_token("\\frac")`: latex;
    `\\times`, `\\cdot`: operator). Other tokens keep their category."""
    out = list(categories)
    i = 0
    while i < len(pieces):
        text = display_piece(pieces[i]).strip()
        if text == "\\":
            j, name = i + 1, ""
            while j < len(pieces) and (nxt := display_piece(pieces[j])).isascii() and nxt.isalpha():
                name += nxt
                j += 1
            if name:
                cat = categorize_token("\\" + name)
                for k in range(i, j):
                    out[k] = cat
            else:
                out[i] = "latex"
            i = max(j, i + 1)
            continue
        i += 1
    return out
