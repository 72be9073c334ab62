"""The built-in arithmetic word problems: determinism, correct answers (re-evaluated here), disjoint splits."""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction

import pytest

from tokensft.data import detect_preset, generate_arithmetic, split_of
from tokensft.data.arithmetic import STORIES

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def exact_eval(expr: str) -> Fraction:
    """Evaluate + - * / over integer literals exactly (no eval())."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unexpected node {ast.dump(node)}")

    return ev(ast.parse(expr, mode="eval"))


@pytest.fixture(scope="module")
def train_rows():
    return generate_arithmetic(1500, seed=0)


def test_deterministic_and_seeded(train_rows):
    assert generate_arithmetic(1500, seed=0) == train_rows
    assert generate_arithmetic(40, seed=0) == train_rows[:40]  # a smaller n is a prefix
    other = generate_arithmetic(40, seed=1)
    assert [r["problem"] for r in other] != [r["problem"] for r in train_rows[:40]]


def test_answers_are_correct(train_rows):
    for row in train_rows:
        answer = int(row["answer"])
        # the expression re-evaluated exactly: an integer equal to the answer
        value = exact_eval(row["expression"])
        assert value.denominator == 1 and value == answer, row
        lines = row["solution"].split("\n")
        assert lines[-1] == f"The answer is $\\boxed{{{answer}}}$."
        assert re.findall(r"\\boxed\{(\d+)\}", row["solution"]) == [row["answer"]]
        # every equation in the worked solution is right, and each step starts from the previous result
        current = None
        for line in lines[1:-1]:
            eqs = [tuple(m) for m in EQUATION.findall(line)]
            assert eqs, line
            for a, op, b, c in eqs:
                assert exact_eval(f"{a} {op} {b}") == int(c), line
            x, _, _, y = eqs[-1]
            if current is not None:
                assert int(x) == current, row["solution"]
            current = int(y)
        assert current == answer
        assert row["level"] == len(lines) - 2  # one line per step
        # the starting value stated in the problem is the first number of the expression
        assert re.search(r"\d+", row["problem"]).group() == re.search(r"\d+", row["expression"]).group()


def test_numbers_small_all_operations_and_templates_used(train_rows):
    values = [int(v) for row in train_rows for v in re.findall(r"\d+", row["solution"])]
    assert max(values) <= 200 and min(int(r["answer"]) for r in train_rows) >= 1
    ops = {op for row in train_rows for _, op, _, _ in EQUATION.findall(row["solution"])}
    assert ops == {"+", "-", "*", "/"}
    assert len(STORIES) >= 8
    for story in STORIES:  # every story template occurs (recognised by its fixed question words)
        words = story.question.split("{")[0]
        assert any(row["problem"].split(". ")[-1].startswith(words) for row in train_rows), story.key
    assert {r["level"] for r in train_rows} == {2, 3, 4}
    assert len({r["problem"] for r in train_rows}) == len(train_rows)


def test_fields_and_ids(train_rows):
    row = train_rows[17]
    assert row["unique_id"] == "arith-train-000017"
    assert set(row) == {"problem", "solution", "answer", "unique_id", "level", "expression"}
    assert detect_preset(row) == "arithmetic"
    rows = generate_arithmetic(3, seed=0, split="test", min_steps=1, max_steps=1)
    assert [r["unique_id"] for r in rows] == ["arith-test-000000", "arith-test-000001", "arith-test-000002"]
    assert all(r["level"] == 1 for r in rows)


def test_train_and_test_are_disjoint(train_rows):
    test = generate_arithmetic(300, seed=0, split="test")
    test_other_seed = generate_arithmetic(100, seed=5, split="test")
    train_texts = {r["problem"] for r in train_rows} | {r["problem"] for r in generate_arithmetic(300, seed=5)}
    assert not train_texts & {r["problem"] for r in test + test_other_seed}
    assert all(split_of(r["problem"]) == "test" for r in test)
    assert all(split_of(r["problem"]) == "train" for r in train_rows)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        generate_arithmetic(1, split="dev")
    with pytest.raises(ValueError, match="min_steps"):
        generate_arithmetic(1, min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="n must"):
        generate_arithmetic(-1)
