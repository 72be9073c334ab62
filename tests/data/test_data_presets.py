"""Presets: exact chat messages for each row format, detection, and error messages."""

from __future__ import annotations

import pytest

from tokensft.data import (
    DEFAULT_INSTRUCTION,
    PRESETS,
    MissingFieldError,
    detect_preset,
    gsm8k_to_boxed,
    prompt_messages,
    to_conversation,
)


def test_default_instruction_matches_evaluation():
    assert DEFAULT_INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."
    prompts = pytest.importorskip("tokensft.eval.prompts")
    assert prompts.COT_INSTRUCTION == DEFAULT_INSTRUCTION


def test_math_preset():
    row = {"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$.", "answer": "2"}
    assert to_conversation(row, "math") == [
        {"role": "user", "content": "What is $1+1$?\n" + DEFAULT_INSTRUCTION},
        {"role": "assistant", "content": "It is $\\boxed{2}$."},
    ]
    assert to_conversation(row, "math", instruction=None)[0]["content"] == "What is $1+1$?"
    conv = to_conversation(row, "math", system_prompt="Be brief.")
    assert conv[0] == {"role": "system", "content": "Be brief."}
    assert prompt_messages(row, "math", system_prompt="Be brief.") == conv[:2]


def test_gsm8k_thousands_separator_and_calculator_annotations():
    answer = "She sells 2 * 617 = <<2*617=1234>>1234 cups.\nSo she makes <<1234*1=1234>>1234 dollars.\n#### 1,234"
    assert gsm8k_to_boxed(answer) == (
        "She sells 2 * 617 = 1234 cups.\nSo she makes 1234 dollars.\nThe answer is $\\boxed{1234}$."
    )
    conv = to_conversation({"question": "How much?", "answer": answer}, "gsm8k")
    assert conv[0]["content"] == "How much?\n" + DEFAULT_INSTRUCTION
    assert conv[1]["content"].endswith("\\boxed{1234}$.")
    assert "<<" not in conv[1]["content"] and "####" not in conv[1]["content"]
    assert gsm8k_to_boxed("x\n#### -5.") == "x\nThe answer is $\\boxed{-5}$."
    with pytest.raises(ValueError, match="####"):
        gsm8k_to_boxed("no final line")
    with pytest.raises(ValueError, match="row 4"):
        to_conversation({"question": "q", "answer": "no final line"}, "gsm8k", index=3)


def test_alpaca_with_and_without_input():
    with_input = {"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour"}
    without = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    assert to_conversation(with_input, "alpaca") == [
        {"role": "user", "content": "Translate to French.\n\nHello"},
        {"role": "assistant", "content": "Bonjour"},
    ]
    assert to_conversation(without, "alpaca") == [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!"},
    ]
    # the CoT instruction is only for math-style presets
    assert DEFAULT_INSTRUCTION not in to_conversation({"instruction": "x", "output": "y"}, "alpaca")[0]["content"]


def test_prompt_completion_strings_and_message_lists():
    assert to_conversation({"prompt": "2+2=", "completion": "4"}, "prompt_completion") == [
        {"role": "user", "content": "2+2="},
        {"role": "assistant", "content": "4"},
    ]
    row = {
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        "completion": [{"role": "assistant", "content": "A"}],
    }
    conv = to_conversation(row, "prompt_completion", system_prompt="ignored: the row has a system message")
    assert conv == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    assert prompt_messages(row, "prompt_completion") == conv[:2]


def test_messages_preset_prompt_is_everything_before_the_last_assistant_turn():
    msgs = [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert to_conversation({"messages": msgs}, "messages") == msgs
    assert prompt_messages({"messages": msgs}, "messages") == msgs[:3]
    with_sys = to_conversation({"messages": msgs}, "messages", system_prompt="S")
    assert with_sys == [{"role": "system", "content": "S"}, *msgs]


def test_detect_preset():
    assert detect_preset({"problem": "p", "solution": "s"}) == "math"
    assert detect_preset({"problem": "p", "solution": "s", "unique_id": "arith-train-000001"}) == "arithmetic"
    assert detect_preset({"problem": "p", "solution": "s", "messages": []}) == "math"  # NuminaMath-CoT rows
    assert detect_preset({"question": "q", "answer": "a"}) == "gsm8k"
    assert detect_preset({"instruction": "i", "input": "", "output": "o"}) == "alpaca"
    assert detect_preset({"prompt": "p", "completion": "c"}) == "prompt_completion"
    assert detect_preset({"messages": [{"role": "user", "content": "x"}]}) == "messages"
    with pytest.raises(ValueError) as err:
        detect_preset({"text": "t", "label": 1})
    assert "['label', 'text']" in str(err.value)
    assert set(PRESETS) == {"math", "gsm8k", "alpaca", "prompt_completion", "messages", "arithmetic"}


def test_missing_field_names_field_and_fields_present():
    row = {"problem": "p", "answer": "2", "level": 3}
    with pytest.raises(MissingFieldError) as err:
        to_conversation(row, "math", index=7, source="train.jsonl")
    msg = str(err.value)
    assert "'solution'" in msg and "['answer', 'level', 'problem']" in msg and "row 8" in msg and "train.jsonl" in msg
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match="Unknown data preset 'nope'"):
        to_conversation(row, "nope")
