"""Tokenize chat conversations into `input_ids` + completion-only `labels`.

Labels follow the Hugging Face convention (unshifted: the model shifts them, so `logits[:, t]` is scored against
`labels[:, t + 1]`): `labels[t] = input_ids[t]` on the tokens of assistant turns, *including* the end-of-turn token
that closes each assistant turn (`<|im_end|>`, `<|eot_id|>`, EOS, ...; without it the model never learns to stop),
and `-100` elsewhere. `labels[0]` is always -100, so sequences packed back to back never train one sequence's
last position to predict the next one's first token.

Templates:
- `chat`: the tokenizer's chat template. Assistant spans are found without `{% generation %}` markers: each
  assistant turn is rendered once with its content replaced by a sentinel string; the text before the sentinel is
  the prefix the turn starts after and the text after it the suffix it ends before (robust to templates that
  insert a default system prompt, strip content, or treat history turns differently, and to conversations whose
  first turn is the assistant's). When that fails the content is searched in the rendered text. The rendered text
  is tokenized once (`add_special_tokens=False`, as `apply_chat_template(tokenize=True)` does) and character spans
  are mapped to tokens with the offsets mapping (slow tokenizers: segments are encoded one by one).
- `plain` (base models without a chat template): `Question: {user}\\nAnswer: ` as the prompt and
  `{assistant}` + EOS as the completion (system turns as `{system}\\n\\n`); BOS first when the tokenizer adds one.
  With the math presets this equals the evaluation's plain prompt `Question: {problem}\\n{instruction}\\nAnswer: `.
- `auto`: `chat` when `tokenizer.chat_template` is set, else `plain`.

Weights from the data (a `weights` column, one float per token, 0 off the supervised tokens, multiplied by the trainer
into the scheme's weights): an assistant message's `"weight"` (0 leaves the turn unsupervised), a per-token column
aligned with the supervised tokens (`token_weights`), and `prompt_loss_weight` λ > 0, which supervises every other
token after the first (system, user and template tokens) with weight λ (WIT, arXiv:2507.07817).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from .loading import row_location
from .presets import DEFAULT_INSTRUCTION, conversations_of, data_weight, detect_preset

__all__ = [
    "TEMPLATES",
    "build_sft_dataset",
    "encode_prompt",
    "end_of_turn_strings",
    "resolve_template",
    "tokenize_conversation",
    "tokenize_conversations",
]

logger = logging.getLogger("tokensft.data")

TEMPLATES = ("auto", "chat", "plain")
IGNORE_INDEX = -100
PLAIN_USER = "Question: {content}\nAnswer: "
PLAIN_SYSTEM = "{content}\n\n"
_SENTINEL = "@@TOKENSFT_ASSISTANT_CONTENT_SENTINEL@@"
# End-of-turn markers of common chat templates (used when they are special tokens of the tokenizer).
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")


def resolve_template(tokenizer, template: str = "auto") -> str:
    """`"chat"` or `"plain"`; `auto` is `chat` iff the tokenizer has a chat template.

    Raises:
        ValueError: unknown template, or `chat` for a tokenizer without a chat template.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "plain"
    if template == "chat" and not has_chat:
        raise ValueError("template='chat' but the tokenizer has no chat_template; use template='plain' or 'auto'")
    return template


def end_of_turn_strings(tokenizer) -> list[str]:
    """Text of the tokens that may close an assistant turn: EOS plus known end-of-turn special tokens in the vocab."""
    out: list[str] = []
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        out.append(str(eos))
    specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", []) or []}
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials |= {t.content for t in decoder.values() if getattr(t, "special", False)}
    out += [t for t in KNOWN_END_OF_TURN if t in specials and t not in out]
    return out


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):  # some versions return a list for batched input
        text = text[0]
    return text


def _assistant_char_spans(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """`(start, end)` character span of each assistant message's content in the rendered conversation `full`."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        span = None
        probe = list(messages)
        probe[i] = {**msg, "content": _SENTINEL}
        try:
            rendered = _render(tokenizer, probe)
        except Exception:  # a template that rejects the probe: fall back to searching the content
            rendered = None
        if rendered is not None and _SENTINEL not in rendered and rendered == _render(
                tokenizer, [*probe[:i], {**msg, "content": _SENTINEL.lower()[::-1]}, *probe[i + 1:]]):
            # the probe is gone and another content renders the same text: the template drops this turn's content
            # (a template that only alters it is searched for below). Searching for the content would find it, if
            # anywhere, inside another turn, and supervise that turn's tokens instead
            raise ValueError(
                f"The chat template does not render assistant turn {i}: its output is the same whatever that turn's "
                "content, so no completion-only mask exists (it would be empty, or fall on text of other turns). "
                "Use template='plain' or a chat template that renders every assistant turn."
            )
        if rendered is not None and rendered.count(_SENTINEL) == 1:
            k = rendered.index(_SENTINEL)
            pre, post = rendered[:k], rendered[k + len(_SENTINEL) :]
            if (
                len(pre) + len(post) <= len(full)
                and len(pre) >= cursor
                and full.startswith(pre)
                and full.endswith(post)
            ):
                span = (len(pre), len(full) - len(post))
        if span is None:
            content = msg["content"]
            for needle in (content, content.strip()):
                k = full.find(needle, cursor) if needle else -1
                if k >= 0:
                    span = (k, k + len(needle))
                    break
        if span is None:
            raise ValueError(
                f"Cannot locate assistant turn {i} in the text rendered by the chat template "
                f"(content starts {msg['content'][:60]!r}); the template changes assistant content. "
                "Use template='plain' or a tokenizer whose chat template renders content verbatim."
            )
        spans.append(span)
        cursor = span[1]
    return spans


def _extend_to_end_of_turn(full: str, end: int, eot: list[str]) -> int:
    """Move `end` past the end-of-turn token that follows (after optional whitespace), when there is one."""
    rest = full[end:]
    ws = len(rest) - len(rest.lstrip())
    for tok in eot:
        if rest.startswith(tok, ws):
            return end + ws + len(tok)
    return end


def _span_mask(offsets, spans: list[tuple[int, int]]) -> list[int]:
    """Per token: j + 1 when its first character lies inside `spans[j]` (sorted, disjoint; the j-th assistant
    turn), else 0."""
    mask = [0] * len(offsets)
    j = 0
    for t, (s, _e) in enumerate(offsets):
        while j < len(spans) and s >= spans[j][1]:
            j += 1
        if j < len(spans) and spans[j][0] <= s < spans[j][1]:
            mask[t] = j + 1
    return mask


def _encode_spans_batch(
    tokenizer, texts: list[str], spans_list: list[list[tuple[int, int]]]
) -> list[tuple[list[int], list[int]]]:
    """Token ids of each text and, per token, the 1-based index of the span it starts in (0: none); one batched call."""
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        offsets_list = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        offsets_list = None
    if offsets_list is not None:
        return [
            (list(ids), _span_mask(offsets, spans))
            for ids, offsets, spans in zip(enc["input_ids"], offsets_list, spans_list)
        ]
    out = []
    for text, spans in zip(texts, spans_list):  # slow tokenizer: encode the segments one by one
        ids, mask, pos = [], [], 0
        for j, (start, end) in enumerate([*spans, (len(text), len(text))]):
            for seg, flag in ((text[pos:start], 0), (text[start:end], j + 1)):
                if seg:
                    seg_ids = tokenizer(seg, add_special_tokens=False)["input_ids"]
                    ids += seg_ids
                    mask += [flag] * len(seg_ids)
            pos = end
        out.append((ids, mask))
    return out


def _plain_bos(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if with_special and with_special[0] == bos else []


def _plain_encode(tokenizer, messages: list[dict], *, generation_prompt: bool) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_token_id
    if eos is None and any(m["role"] == "assistant" for m in messages):
        raise ValueError("template='plain' needs a tokenizer with an eos_token (it closes each completion)")

    def enc(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"] if s else []

    ids = _plain_bos(tokenizer)
    mask = [0] * len(ids)  # per token: 1-based index of its assistant turn, 0 elsewhere
    turn = 0
    for msg in messages:
        if msg["role"] == "assistant":
            turn += 1
            piece = enc(msg["content"]) + [eos]
            ids += piece
            mask += [turn] * len(piece)
        else:
            fmt = PLAIN_USER if msg["role"] == "user" else PLAIN_SYSTEM
            piece = enc(fmt.format(content=msg["content"]))
            ids += piece
            mask += [0] * len(piece)
    if generation_prompt and messages[-1]["role"] not in ("user", "assistant"):  # e.g. a lone system turn
        piece = enc("Answer: ")
        ids += piece
        mask += [0] * len(piece)
    return ids, mask


def _check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{role, content}} dicts, got {messages!r:.100}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{j}] must be a dict with string 'role' and 'content', got {m!r:.100}")


def prompt_text(messages: list[dict], tokenizer, *, template: str = "auto") -> str:
    """The text of a prompt for generation, formatted exactly as training formats the prompt part of a conversation:
    `chat`: the chat template with the assistant generation prompt (holds its own special tokens: tokenize with
    `add_special_tokens=False`); `plain`: `PLAIN_SYSTEM` / `PLAIN_USER` per turn, `Question: ...\nAnswer: `
    (tokenize with `add_special_tokens=True` for the BOS that `_plain_bos` adds in training). The one prompt
    formatter of training and evaluation."""
    _check_messages(messages)
    if resolve_template(tokenizer, template) == "plain":
        return "".join((PLAIN_SYSTEM if m["role"] == "system" else PLAIN_USER).format(content=m["content"])
                       for m in messages if m["role"] != "assistant")
    return _render(tokenizer, messages, add_generation_prompt=True)


def encode_prompt(messages: list[dict], tokenizer, *, template: str = "auto") -> list[int]:
    """Token ids of a prompt for generation, consistent with `tokenize_conversation`.

    `chat`: the chat template with the assistant generation prompt; `plain`: `Question: ...\\nAnswer: `.
    For a conversation `prompt + [assistant]`, these ids are a prefix of `tokenize_conversation(...)["input_ids"]`
    for templates whose generation prompt ends at a token boundary (ChatML, Llama 3, the plain template).
    """
    _check_messages(messages)
    if resolve_template(tokenizer, template) == "plain":
        return _plain_encode(tokenizer, messages, generation_prompt=True)[0]
    return list(tokenizer(prompt_text(messages, tokenizer, template="chat"), add_special_tokens=False)["input_ids"])


def _finish(ids: list[int], turns: list[int], messages: list[dict], max_length: int | None, *,
            prompt_loss_weight: float = 0.0, token_weights: list[float] | None = None,
            weighted: bool = False) -> dict[str, Any]:
    """Labels (and, when `weighted`, per-token data weights) from the token ids and each token's assistant turn."""
    no_prompt = bool(ids) and all(turns)  # every token, the first included, inside an assistant turn
    if ids:
        turns = [0] + list(turns[1:])
    mask = [1 if t else 0 for t in turns]
    if no_prompt and any(m["role"] != "assistant" and m.get("content") for m in messages):
        roles = [m["role"] for m in messages]
        raise ValueError(
            f"The chat template rendered no prompt tokens: every token is in an assistant turn, "
            f"although the conversation has roles {roles}. The template drops the other turns, so training would "
            "supervise everything and never see a prompt; use template 'plain' or a template that renders every turn."
        )
    if sum(mask) == 0:
        roles = [m["role"] for m in messages]
        raise ValueError(
            f"Conversation has no supervised (completion) tokens before truncation: roles {roles}. "
            "It needs at least one assistant turn after the first token."
        )
    weights = None
    if weighted:
        turn_w = [1.0 if m.get("weight") is None else m["weight"] for m in messages if m["role"] == "assistant"]
        weights = [turn_w[t - 1] if t else 0.0 for t in turns]
        if token_weights is not None:
            n = sum(mask)
            if len(token_weights) != n:
                raise ValueError(f"field 'token_weights' has {len(token_weights)} weights but the completion has {n} "
                                 "supervised tokens (assistant content + end-of-turn token, before truncation)")
            k = 0
            for t, m in enumerate(mask):
                if m:
                    weights[t] *= token_weights[k]
                    k += 1
        if prompt_loss_weight > 0:
            for t in range(1, len(ids)):
                if not turns[t]:
                    weights[t] = prompt_loss_weight
        mask = [1 if w > 0 else 0 for w in weights]  # weight 0: unsupervised (not counted either)
        if ids:
            mask[0] = weights[0] = 0
    zero_weight = sum(mask) == 0  # every supervised token weighted 0 by the data: the row is dropped
    num_truncated = 0
    if max_length is not None and len(ids) > max_length:
        num_truncated = len(ids) - max_length
        ids, mask = ids[:max_length], mask[:max_length]
        weights = None if weights is None else weights[:max_length]
    labels = [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
    out = {
        "input_ids": ids,
        "labels": labels,
        "completion_mask": [1 if t else 0 for t in turns[: len(ids)]],
        "truncated": sum(mask) == 0,
        "num_truncated": num_truncated,
        "zero_weight": zero_weight,
    }
    if weights is not None:
        out["weights"] = [w if m else 0.0 for w, m in zip(weights, mask)]
    return out


_LONGEST: dict[int, int] = {}


def _longest_token_chars(tokenizer) -> int:
    """The most characters one token of `tokenizer` can decode to (an upper bound: the longest vocabulary piece;
    a byte-level piece has one character per byte). Text beyond `(max_length + 2)` times this in any message can only
    fall into tokens past `max_length`, so cutting it there changes none of the kept tokens."""
    key = id(tokenizer)
    if key not in _LONGEST:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        _LONGEST[key] = max((len(t) for t in vocab), default=64) or 64
    return _LONGEST[key]


def tokenize_conversations(
    conversations: list[list[dict]],
    tokenizer,
    *,
    max_length: int | None = None,
    template: str = "auto",
    first_index: int | None = None,
    prompt_loss_weight: float = 0.0,
    token_weights: list[list[float] | None] | None = None,
) -> list[dict[str, Any]]:
    """`tokenize_conversation` over many conversations, with one batched tokenizer call (the fast path).

    `first_index`: index of the first conversation, quoted (with its offset) in error messages.
    `prompt_loss_weight`, `token_weights` (one list, or None, per conversation): see `tokenize_conversation`.
    """
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2 or None, got {max_length}")
    template = resolve_template(tokenizer, template)

    def where(j: int) -> str:
        return f"{row_location(None, first_index + j)}: " if first_index is not None else ""

    def has_weight(m) -> bool:  # rows that went through Arrow carry "weight": None on unweighted turns
        return isinstance(m, dict) and m.get("weight") is not None

    weighted = prompt_loss_weight > 0 or token_weights is not None or any(
        has_weight(m) for conv in conversations if isinstance(conv, (list, tuple)) for m in conv)
    # the template sees plain {role, content} turns; the weights stay with `conversations` (read by `_finish`)
    plain_turns = [[{"role": m["role"], "content": m["content"]} if isinstance(m, dict) and "weight" in m else m
                    for m in conv] if isinstance(conv, (list, tuple)) else conv for conv in conversations]
    if max_length is not None:  # a 50 MB row must not be tokenized whole to keep its first max_length tokens
        cap = (max_length + 2) * _longest_token_chars(tokenizer)
        plain_turns = [conv if (token_weights is not None and token_weights[j] is not None)
                       or not isinstance(conv, (list, tuple)) else
                       [{**m, "content": m["content"][:cap]} if isinstance(m, dict) and isinstance(m.get("content"), str)
                        and len(m["content"]) > cap else m for m in conv]
                       for j, conv in enumerate(plain_turns)]
    encoded: list[tuple[list[int], list[int]]] = []
    if template == "plain":
        for j, messages in enumerate(plain_turns):
            try:
                _check_messages(messages)
                encoded.append(_plain_encode(tokenizer, messages, generation_prompt=False))
            except ValueError as e:
                raise ValueError(f"{where(j)}{e}") from None
    else:
        eot = end_of_turn_strings(tokenizer)
        texts, spans_list = [], []
        for j, messages in enumerate(plain_turns):
            try:
                _check_messages(messages)
                full = _render(tokenizer, messages)
                spans = _assistant_char_spans(tokenizer, messages, full)
            except ValueError as e:
                raise ValueError(f"{where(j)}{e}") from None
            texts.append(full)
            spans_list.append([(s, _extend_to_end_of_turn(full, e, eot)) for s, e in spans])
        encoded = _encode_spans_batch(tokenizer, texts, spans_list)
    out = []
    for j, ((ids, mask), messages) in enumerate(zip(encoded, conversations)):
        try:
            out.append(_finish(ids, mask, messages, max_length, prompt_loss_weight=prompt_loss_weight,
                               token_weights=None if token_weights is None else token_weights[j], weighted=weighted))
        except ValueError as e:
            raise ValueError(f"{where(j)}{e}") from None
    return out


def tokenize_conversation(
    messages: list[dict], tokenizer, *, max_length: int | None = None, template: str = "auto",
    prompt_loss_weight: float = 0.0, token_weights: list[float] | None = None,
) -> dict[str, Any]:
    """Tokenize one conversation with completion-only labels (and, when the data carries weights, a `weights` list).

    Args:
        messages: `[{"role": ..., "content": str}, ...]`; the assistant turns are supervised; an assistant turn may
            carry `"weight": float >= 0` (0: unsupervised).
        tokenizer: a Hugging Face tokenizer (fast tokenizers use the offsets mapping; slow ones work too).
        max_length: keep the first `max_length` tokens (None: no limit).
        template: `"auto"`, `"chat"` or `"plain"` (see the module docstring).
        prompt_loss_weight: λ > 0 supervises every non-assistant token after the first with weight λ.
        token_weights: one weight per supervised token (assistant content + end-of-turn tokens, before truncation),
            multiplied into the turn weights.

    Returns:
        `{"input_ids": list[int] (T,), "labels": list[int] (T,), "completion_mask": list[int] (T,),
        "truncated": bool, "num_truncated": int}` (+ `"weights": list[float] (T,)` when any weight is given):
        `labels[t] = input_ids[t]` where `completion_mask[t] == 1` (assistant content + the end-of-turn token closing
        each assistant turn) and the weight is > 0, -100 elsewhere; `labels[0] == -100` always. `truncated` is True when `max_length` cut off every supervised token (the
        caller drops the row); `num_truncated` counts the tokens cut off (0 when none).

    Raises:
        ValueError: malformed messages, an unknown template, an assistant turn the chat template does not render
            verbatim, or a conversation with no supervised token before truncation (no assistant turn, or an
            assistant turn that renders to no tokens).
    """
    return tokenize_conversations([messages], tokenizer, max_length=max_length, template=template,
                                  prompt_loss_weight=prompt_loss_weight,
                                  token_weights=None if token_weights is None else [token_weights])[0]


def _tokenize_batch(batch, *, tokenizer, max_length, template, source, prompt_loss_weight, weighted):
    token_weights = batch.get("token_weights_in")
    kw = {"max_length": max_length, "template": template, "prompt_loss_weight": prompt_loss_weight}
    try:
        encs = tokenize_conversations(batch["messages"], tokenizer, token_weights=token_weights, **kw)
    except ValueError:
        for j, (messages, row) in enumerate(zip(batch["messages"], batch["row"])):  # find the row at fault, name it
            try:
                tokenize_conversation(messages, tokenizer, token_weights=None if token_weights is None else
                                      token_weights[j], **kw)
            except ValueError as e:
                raise ValueError(f"{row_location(source, row)}: {e}") from e
        raise
    keys = ("input_ids", "labels", "truncated", "num_truncated", "zero_weight") + (("weights",) if weighted else ())
    out = {k: [enc.get(k) for enc in encs] for k in keys}
    if weighted:  # a batch without any weight still gets the column (all rows share one schema)
        out["weights"] = [w if w is not None else [1.0 if lab != IGNORE_INDEX else 0.0 for lab in enc["labels"]]
                          for w, enc in zip(out["weights"], encs)]
    return out


def _row_token_weights(record: dict, field: str, index: int, source: str | None) -> list[float]:
    where = f"{row_location(source, index)}: "
    value = record.get(field) if isinstance(record, dict) else None
    if not isinstance(value, (list, tuple)):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise ValueError(f"{where}field {field!r} must be a list of per-token weights, got {got}")
    return [data_weight(w, f"{field}[{k}]", index, source) for k, w in enumerate(value)]


def build_sft_dataset(
    records: list[dict],
    tokenizer,
    *,
    preset: str | None = None,
    max_length: int = 1024,
    template: str = "auto",
    system_prompt: str | None = None,
    num_proc: int | None = None,
    instruction: str | None = DEFAULT_INSTRUCTION,
    source: str | None = None,
    keep_row_index: bool = False,
    prompt_loss_weight: float = 0.0,
    token_weights_field: str | None = None,
):
    """Turn raw rows into a tokenized `datasets.Dataset` with columns `input_ids` and `labels` (lists of ints), and
    `weights` (lists of floats, the per-token data weights) when the data or the options carry weights.

    Rows whose assistant turns are all empty (blank completion) are dropped, and so are rows whose supervised tokens
    all lie beyond `max_length`; both counts are logged (`logging.getLogger("tokensft.data")`, WARNING), as is the
    number of rows truncated but kept.

    Args:
        records: raw rows (`load_records`).
        tokenizer: Hugging Face tokenizer.
        preset: key of `PRESETS`; None detects it from the first row (`detect_preset`).
        max_length: tokens kept per row (right truncation).
        template: `"auto"`, `"chat"` or `"plain"`.
        system_prompt: optional system message for every row.
        num_proc: processes for `datasets.map` (None: one).
        instruction: CoT instruction for math / gsm8k / arithmetic user turns (None for none).
        source: file or data set name, quoted in error messages.
        keep_row_index: also keep a `row` column: each kept row's index in `records`.
        prompt_loss_weight: λ >= 0; λ > 0 supervises the prompt tokens with weight λ (see `tokenize_conversation`).
        token_weights_field: name of a per-token weight column: a list of floats >= 0 per row, one per supervised
            token (assistant content + end-of-turn tokens, before truncation).

    Returns:
        `datasets.Dataset` with `input_ids` and `labels` (and `weights` when a message carries a `weight`,
        `token_weights_field` is given or `prompt_loss_weight` > 0; and `row`), in row order (dropped rows removed).

    Raises:
        ValueError: no records, every row dropped, an undetectable preset, a malformed row (names the row index,
            the missing field and the fields present; `MissingFieldError` is also a KeyError), a negative,
            non-finite or misaligned weight (names the source, row and field).
    """
    import datasets

    if not (prompt_loss_weight >= 0 and math.isfinite(prompt_loss_weight)):
        raise ValueError(f"--prompt_loss_weight must be a finite number >= 0, got {prompt_loss_weight}")
    if preset is None and records:
        preset = detect_preset(records[0])
        logger.info("Detected data preset %r from the fields of the first row", preset)
    conversations, rows, empty = conversations_of(records, preset, system_prompt=system_prompt,
                                                  instruction=instruction, source=source)
    template = resolve_template(tokenizer, template)
    token_weights = [_row_token_weights(records[i], token_weights_field, i, source) for i in rows] \
        if token_weights_field is not None else []
    if empty:
        logger.warning("Dropped %d of %d rows with an empty completion: %s%s", len(empty), len(records),
                       ", ".join(row_location(source, i) for i in empty[:3]), ", ..." if len(empty) > 3 else "")
    weighted = prompt_loss_weight > 0 or token_weights_field is not None or any(
        "weight" in m for conv in conversations for m in conv)
    columns = {"messages": conversations, "row": rows}
    if token_weights_field is not None:
        columns["token_weights_in"] = token_weights
    ds = datasets.Dataset.from_dict(columns)
    ds = ds.map(
        _tokenize_batch,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        remove_columns=list(columns)[:1] + (["token_weights_in"] if token_weights_field is not None else []),
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "template": template, "source": source,
                   "prompt_loss_weight": prompt_loss_weight, "weighted": weighted},
        desc=f"Tokenizing ({template} template)",
        load_from_cache_file=False,
    )
    truncated, zero = ds["truncated"], ds["zero_weight"]
    n_zero = sum(zero)
    n_dropped = sum(truncated) - n_zero
    n_cut = sum(1 for n, t in zip(ds["num_truncated"], truncated) if n and not t)
    if n_cut:
        logger.warning("Truncated %d of %d rows to max_length=%d (kept)", n_cut, len(ds), max_length)
    if n_zero:
        logger.warning("Dropped %d of %d rows whose every supervised token has weight 0 in the data", n_zero, len(ds))
    if n_dropped:
        logger.warning(
            "Dropped %d of %d rows whose completion lies entirely beyond max_length=%d", n_dropped, len(ds), max_length
        )
    if n_zero or n_dropped:
        keep = [i for i, t in enumerate(truncated) if not t]
        if not keep:
            why = f"lies beyond max_length={max_length}; raise max_length" if n_dropped else "has weight 0 in the data"
            raise ValueError(f"{source or 'the data'}: every row's completion {why}")
        ds = ds.select(keep)
    return ds.remove_columns(["truncated", "num_truncated", "zero_weight"] + ([] if keep_row_index else ["row"]))
