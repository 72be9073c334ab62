"""Answer extraction and grading (math_verify, gold first)."""

from __future__ import annotations

import time

import pytest

from tokensft.eval import extract_answer, extract_boxed, grade, grade_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"so $\boxed{\sqrt{\frac{a^{2}}{b_{1}}}}$ done", r"\sqrt{\frac{a^{2}}{b_{1}}}"),
        (r"first \boxed{1}, finally \boxed{2}", "2"),
        (r"\fbox{7}", "7"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed 5.", "5"),
        (r"\boxed{3} then truncated \boxed{\frac{1", None),  # unclosed last box: no final answer
        ("no box here", None),
        (r"put it within \boxed{} ... so \boxed{4} and \boxed{ }", None),  # an empty last box: none either
        (r"put it within \boxed{} ... so \boxed{4}", "4"),  # an empty box before the last one does not matter
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_unfinished_last_box_is_graded_wrong():
    """Issue 31, item 6: math-verify 0.9 grades this correct for gold 5; the last box has no answer in it."""
    text = r"So \boxed{5}. Wait, actually the answer is \boxed{"
    assert extract_answer(text) == (None, "unfinished_box")
    assert not grade(text, "5")
    assert not grade(r"So \boxed{5}. Hmm, \boxed{}", "5")
    assert grade(r"So \boxed{5}.", "5")


def test_boxed_answer_graded_correct():
    response = "We add the numbers: 1 + 1 = 2.\nThe answer is $\\boxed{2}$."
    assert extract_answer(response) == ("2", "boxed")
    assert grade(response, "2")


def test_text_wrapped_prediction_is_correct():
    assert grade_answer(r"\text{13}", "13")
    assert grade(r"\boxed{\text{13}}", "13")


@pytest.mark.parametrize(
    "response, gold",
    [
        (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{0.5}", r"\frac12"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{(3,\pi/2)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{p-q}", "p - q"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{90^\circ}", "90"),
        (r"\boxed{1,\!234}", "1234"),
    ],
)
def test_equivalent_answers(response, gold):
    assert grade(response, gold)


@pytest.mark.parametrize(
    "response, gold",
    [
        (r"\boxed{3}", "2"),
        (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}"),
        (r"\boxed{(\pi/2, 3)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{p+q}", "p - q"),
        ("I do not know.", "2"),
        ("", "2"),
    ],
)
def test_wrong_answers(response, gold):
    assert not grade(response, gold)


@pytest.mark.parametrize(
    "response, answer, method",
    [
        ("So the final answer is $\\frac{3}{4}$.", r"\frac{3}{4}", "answer_is"),
        ("The answer is: 1,234", "1,234", "answer_is"),
        ("The answer is 3.5.", "3.5", "answer_is"),
        ("It is either 12 or 15", "15", "last_number"),
        ("We get -2/3 at the end", "-2/3", "last_number"),
        ("nothing numeric", None, "none"),
        ("The answer to the problem: we get 14 apples", "14", "last_number"),
        ("Here is the answer to the problem, 7 in all", "7", "last_number"),
        # markdown emphasis, common in chat-model output, is not part of the answer
        ("Final Answer: **73**", "73", "answer_is"),
        ("**Final Answer:** 73", "73", "answer_is"),
        ("**Final Answer: 73**", "73", "answer_is"),
        ("The answer is *42*.", "42", "answer_is"),
        ("Final answer: __7__", "7", "answer_is"),
        ("The answer is: **$\\frac{1}{2}$**.", r"\frac{1}{2}", "answer_is"),
        ("The final answer is $x_1$.", "x_1", "answer_is"),  # a LaTeX subscript is not emphasis
    ],
)
def test_fallback_extraction(response, answer, method):
    assert extract_answer(response) == (answer, method)


def test_fallbacks_are_graded():
    assert grade("So the final answer is $\\frac{3}{4}$.", "0.75")
    assert grade("Final Answer: **73**", "73") and grade("**Final Answer:** 73", "73")
    assert grade("The total is 1,234", "1234")


def test_grading_timeout_counts_wrong(monkeypatch):
    import math_verify

    def slow_verify(*args, **kwargs):
        time.sleep(5)
        return True

    monkeypatch.setattr(math_verify, "verify", slow_verify)
    t0 = time.perf_counter()
    assert not grade_answer("x^2+1", "1+x^2", timeout_s=0.3)
    assert time.perf_counter() - t0 < 2.0
