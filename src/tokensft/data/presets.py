"""Column presets: turn a raw data-set row into chat messages (a prompt part and a completion part).

| preset | fields | user turn | assistant turn |
| --- | --- | --- | --- |
| `math` | problem, solution | `problem + "\\n" + instruction` | `solution` |
| `arithmetic` | problem, solution | as `math` (rows of `generate_arithmetic`) | `solution` |
| `gsm8k` | question, answer | `question + "\\n" + instruction` | `answer` without `<<calc>>` annotations, its final line `#### N` replaced by `The answer is $\\boxed{N}$.` |
| `alpaca` | instruction, input (optional), output | `instruction` (`+ "\\n\\n" + input` when non-empty) | `output` |
| `prompt_completion` | prompt, completion | `prompt` (a string, or a list of messages) | `completion` (string or messages) |
| `messages` | messages | the list of `{role, content}` up to the last assistant turn | the rest |

An assistant message may carry a loss weight, `{"role": "assistant", "content": ..., "weight": 0.0}` (the convention
of axolotl's and ms-swift's chat data): 0 leaves the turn unsupervised, 2.0 doubles its tokens' weight.

`instruction` defaults to `DEFAULT_INSTRUCTION`, the Qwen2.5-Math chain-of-thought instruction that the evaluation
(`tokensft.eval.prompts.COT_INSTRUCTION`) appends too, so training and evaluation prompts match; pass
`instruction=None` for the bare problem. An optional `system_prompt` becomes a leading system message (for
`messages` / `prompt_completion` rows only when the row has no system message of its own).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .loading import row_location

__all__ = [
    "DEFAULT_INSTRUCTION",
    "PRESETS",
    "MissingFieldError",
    "Preset",
    "detect_preset",
    "gsm8k_to_boxed",
    "prompt_messages",
    "split_conversation",
    "to_conversation",
]

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

Message = dict[str, Any]  # {"role": str, "content": str} and, on assistant turns, an optional "weight": float


class MissingFieldError(KeyError, ValueError):
    """A row lacks a field its preset needs; the message names the field, the fields present and the row.

    Subclasses both `KeyError` and `ValueError`, so either `except` catches it.
    """

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def _where(index: int | None, source: str | None) -> str:
    loc = row_location(source, index)
    return loc + ": " if loc else ""


def _require(record: dict[str, Any], name: str, preset: str, index: int | None, source: str | None) -> Any:
    if not isinstance(record, dict):
        raise TypeError(f"{_where(index, source)}expected a dict row, got {type(record).__name__}")
    if name not in record or record[name] is None:
        state = "is None" if name in record else "is missing"
        raise MissingFieldError(
            f"{_where(index, source)}field {name!r} {state}: preset {preset!r} needs {list(PRESETS[preset].fields)}; "
            f"the row has fields {sorted(record)}"
        )
    return record[name]


def data_weight(value: Any, name: str, index: int | None = None, source: str | None = None) -> float:
    """A weight from the data as a float: finite and >= 0.

    Raises:
        ValueError: one line naming the source, the row and the field, e.g.
            `train.jsonl row 3: field 'messages[1].weight' must be a finite number >= 0, got -1`.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        raise ValueError(f"{_where(index, source)}field {name!r} must be a finite number >= 0, got {value!r:.40}")
    return float(value)


def _text(value: Any, name: str, index: int | None, source: str | None) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{_where(index, source)}field {name!r} must be a string, got {type(value).__name__}")


def with_instruction(problem: str, instruction: str | None) -> str:
    """The user turn of a math problem: `problem + "\\n" + instruction` (the bare problem without one)."""
    return f"{problem}\n{instruction}" if instruction else problem


def gsm8k_to_boxed(answer: str) -> str:
    """A GSM8K `answer` as a solution that ends in `The answer is $\\boxed{N}$.`.

    `<<48/2=24>>` calculator annotations are removed and the final `#### N` line (thousands separators and a trailing
    `.` dropped: `#### 1,234` → `1234`) becomes the boxed answer sentence.

    Raises:
        ValueError: no `####` line, or an empty one.
    """
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no final '#### N' line: ...{answer[-80:]!r}")
    body, tail = answer.rsplit("####", 1)
    lines = tail.strip().splitlines()
    final = lines[0].strip() if lines else ""
    final = final.replace(",", "").rstrip(".").strip()
    if final.startswith("$"):
        final = final[1:].strip()
    if not final:
        raise ValueError(f"GSM8K answer has an empty '####' line: ...{answer[-80:]!r}")
    body = re.sub(r"<<[^<>]*>>", "", body).rstrip()
    sentence = f"The answer is $\\boxed{{{final}}}$."
    return f"{body}\n{sentence}" if body else sentence


def _normalize_messages(value: Any, name: str, index: int | None, source: str | None) -> list[Message]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(
            f"{_where(index, source)}field {name!r} must be a list of messages, got {type(value).__name__}"
        )
    out = []
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            got = sorted(msg) if isinstance(msg, dict) else type(msg).__name__
            raise ValueError(f"{_where(index, source)}{name}[{j}] must be a dict with 'role' and 'content', got {got}")
        content = msg["content"]
        if isinstance(content, list):  # multimodal-style parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if content is None:
            content = ""
        if not isinstance(msg["role"], str) or not msg["role"]:
            raise ValueError(f"{_where(index, source)}field '{name}[{j}].role' must be a non-empty string (system, "
                             f"user, assistant, ...), got {type(msg['role']).__name__} {msg['role']!r}")
        turn = {"role": msg["role"], "content": _text(content, f"{name}[{j}].content", index, source)}
        if msg.get("weight") is not None:  # per-message loss weight (axolotl / ms-swift chat data)
            if turn["role"] != "assistant":
                raise ValueError(f"{_where(index, source)}field '{name}[{j}].weight': only assistant turns carry a "
                                 f"loss weight (this turn's role is {turn['role']!r})")
            turn["weight"] = data_weight(msg["weight"], f"{name}[{j}].weight", index, source)
        out.append(turn)
    return out


def _as_turns(value: Any, name: str, role: str, index: int | None, source: str | None) -> list[Message]:
    if isinstance(value, (list, tuple)):
        return _normalize_messages(value, name, index, source)
    return [{"role": role, "content": _text(value, name, index, source)}]


# Each builder returns (prompt messages, completion messages), without the optional system prompt.
Builder = Callable[[dict[str, Any], "str | None", "int | None", "str | None"], tuple[list[Message], list[Message]]]


def _build_math(record, instruction, index, source, preset="math"):
    problem = _text(_require(record, "problem", preset, index, source), "problem", index, source)
    solution = _text(_require(record, "solution", preset, index, source), "solution", index, source)
    return [{"role": "user", "content": with_instruction(problem, instruction)}], [
        {"role": "assistant", "content": solution}
    ]


def _build_arithmetic(record, instruction, index, source):
    return _build_math(record, instruction, index, source, preset="arithmetic")


def _build_gsm8k(record, instruction, index, source):
    question = _text(_require(record, "question", "gsm8k", index, source), "question", index, source)
    answer = _text(_require(record, "answer", "gsm8k", index, source), "answer", index, source)
    try:
        solution = gsm8k_to_boxed(answer)
    except ValueError as e:
        raise ValueError(f"{_where(index, source)}{e}") from None
    return [{"role": "user", "content": with_instruction(question, instruction)}], [
        {"role": "assistant", "content": solution}
    ]


def _build_alpaca(record, instruction, index, source):
    instr = _text(_require(record, "instruction", "alpaca", index, source), "instruction", index, source)
    output = _text(_require(record, "output", "alpaca", index, source), "output", index, source)
    extra = record.get("input")
    extra = _text(extra, "input", index, source) if extra is not None else ""
    user = f"{instr}\n\n{extra}" if extra.strip() else instr
    return [{"role": "user", "content": user}], [{"role": "assistant", "content": output}]


def _build_prompt_completion(record, instruction, index, source):
    prompt = _require(record, "prompt", "prompt_completion", index, source)
    completion = _require(record, "completion", "prompt_completion", index, source)
    return (
        _as_turns(prompt, "prompt", "user", index, source),
        _as_turns(completion, "completion", "assistant", index, source),
    )


def _build_messages(record, instruction, index, source):
    messages = _normalize_messages(_require(record, "messages", "messages", index, source), "messages", index, source)
    last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return messages, []
    # the prompt ends before the final assistant turn (a trailing run of assistant turns all count as completion)
    first = last
    while first > 0 and messages[first - 1]["role"] == "assistant":
        first -= 1
    return messages[:first], messages[first:]


@dataclass(frozen=True)
class Preset:
    """How one row format becomes chat messages.

    Attributes:
        name: the key in `PRESETS`.
        fields: fields a row must have.
        description: one line for `--help` and error messages.
        uses_instruction: whether the CoT `instruction` is appended to the user turn.
        build: `(record, instruction, index, source) -> (prompt messages, completion messages)`.
    """

    name: str
    fields: tuple[str, ...]
    description: str
    uses_instruction: bool
    build: Builder


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("math", ("problem", "solution"), "MATH-style problem/solution", True, _build_math),
        Preset(
            "gsm8k",
            ("question", "answer"),
            "GSM8K question/answer; '#### N' becomes '\\boxed{N}', '<<calc>>' annotations removed",
            True,
            _build_gsm8k,
        ),
        Preset("alpaca", ("instruction", "output"), "Alpaca instruction/input/output", False, _build_alpaca),
        Preset(
            "prompt_completion",
            ("prompt", "completion"),
            "prompt/completion, strings or lists of messages",
            False,
            _build_prompt_completion,
        ),
        Preset("messages", ("messages",), "chat 'messages' list of {role, content}", False, _build_messages),
        Preset(
            "arithmetic",
            ("problem", "solution"),
            "rows of the built-in arithmetic generator (same fields as math)",
            True,
            _build_arithmetic,
        ),
    ]
}


def _check_preset(preset: str) -> Preset:
    if preset not in PRESETS:
        raise ValueError(f"Unknown data preset {preset!r}; known: {', '.join(PRESETS)}")
    return PRESETS[preset]


def detect_preset(record: dict[str, Any]) -> str:
    """The preset whose fields a row has.

    Order: `problem`+`solution` (`arithmetic` when `unique_id` starts with `arith-`, else `math`; this wins over a
    `messages` field, as in NuminaMath-CoT rows that carry both), `messages`, `prompt`+`completion`,
    `instruction`+`output` (alpaca), `question`+`answer` (gsm8k).

    Raises:
        ValueError: no preset fits; the message lists the fields present and what each preset needs.
    """
    if not isinstance(record, dict):
        raise ValueError(f"Cannot detect a data preset: expected a dict row, got {type(record).__name__}")
    keys = {k for k, v in record.items() if v is not None}
    if {"problem", "solution"} <= keys:
        return "arithmetic" if str(record.get("unique_id", "")).startswith("arith-") else "math"
    if "messages" in keys and isinstance(record["messages"], (list, tuple)):
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    needs = "; ".join(f"{p.name}: {', '.join(p.fields)}" for p in PRESETS.values())
    raise ValueError(f"Cannot detect a data preset from the fields present {sorted(record)}. Presets need: {needs}")


def split_conversation(
    record: dict[str, Any],
    preset: str,
    *,
    system_prompt: str | None = None,
    instruction: str | None = DEFAULT_INSTRUCTION,
    index: int | None = None,
    source: str | None = None,
) -> tuple[list[Message], list[Message]]:
    """`(prompt messages, completion messages)` of one row; `to_conversation` is their concatenation.

    Args:
        record: one raw row.
        preset: a key of `PRESETS`.
        system_prompt: prepended as a system message unless the prompt already starts with one.
        instruction: appended (after a newline) to the user turn for math / gsm8k / arithmetic; None or "" for none.
        index, source: row index and file name, quoted in error messages.

    Raises:
        ValueError: unknown preset, a field of the wrong type, a GSM8K answer without `####`.
        MissingFieldError (KeyError and ValueError): a missing field; names it and lists the row's fields.
    """
    spec = _check_preset(preset)
    prompt, completion = spec.build(record, instruction if spec.uses_instruction else None, index, source)
    if system_prompt and not (prompt and prompt[0]["role"] == "system"):
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return prompt, completion


def to_conversation(
    record: dict[str, Any],
    preset: str,
    *,
    system_prompt: str | None = None,
    instruction: str | None = DEFAULT_INSTRUCTION,
    index: int | None = None,
    source: str | None = None,
) -> list[Message]:
    """Chat messages of one row: `[{"role": "system"}?, {"role": "user", ...}, {"role": "assistant", ...}, ...]`.

    See `split_conversation` for the arguments and errors; the module docstring for what each preset builds.
    """
    prompt, completion = split_conversation(
        record, preset, system_prompt=system_prompt, instruction=instruction, index=index, source=source
    )
    return prompt + completion


def prompt_messages(
    record: dict[str, Any],
    preset: str,
    *,
    system_prompt: str | None = None,
    instruction: str | None = DEFAULT_INSTRUCTION,
    index: int | None = None,
    source: str | None = None,
) -> list[Message]:
    """The prompt part of `to_conversation` (everything before the final assistant turn), for generation.

    `to_conversation(r, p)[:len(prompt_messages(r, p))] == prompt_messages(r, p)` for every row.
    """
    return split_conversation(
        record, preset, system_prompt=system_prompt, instruction=instruction, index=index, source=source
    )[0]


def conversations_of(
    records: list[dict[str, Any]],
    preset: str | None = None,
    *,
    system_prompt: str | None = None,
    instruction: str | None = DEFAULT_INSTRUCTION,
    source: str | None = None,
) -> tuple[list[list[Message]], list[int], list[int]]:
    """Every row as chat messages, checked, without a tokenizer: what training reads, and what the CLI's precheck
    runs on the data file in a second, before transformers is imported.

    Args:
        records: the raw rows (`load_records`).
        preset: a key of `PRESETS`; None detects it from the first row.
        system_prompt, instruction, source: as in `split_conversation`.

    Returns:
        `(conversations, rows, empty)`: the conversations of the rows with a non-empty assistant completion, their
        row indices, and the indices of the rows dropped for an empty completion.

    Raises:
        ValueError: no rows (an empty file); an undetectable or unknown preset; a missing field or a field of the
            wrong type (names the file, row and field); every row has an empty completion.
    """
    if not records:
        raise ValueError(f"{source or 'the data'}: no rows to build a training set from (the file is empty)")
    if preset is None:
        preset = detect_preset(records[0])
    conversations, rows, empty = [], [], []
    for i, record in enumerate(records):
        conv = to_conversation(record, preset, system_prompt=system_prompt, instruction=instruction, index=i,
                               source=source)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in conv):
            empty.append(i)
            continue
        conversations.append(conv)
        rows.append(i)
    if not conversations:
        raise ValueError(f"{source or 'the data'}: all {len(records)} rows have an empty completion (no assistant "
                         "turn with text); nothing to train on")
    return conversations, rows, empty
