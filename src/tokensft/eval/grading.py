"""Answer extraction and grading.

A completion is graded in two steps:

1. `extract_answer` pulls the final answer out of the text, trying in order
   - the last balanced `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`), nested braces allowed (`extract_boxed`);
   - "the (final) answer is X" / "Final Answer: X" / "the answer = X" (last occurrence; `$...$` stripped);
   - the last number in the text (`-1,234.5`, `3/4`).
2. `grade_answer` compares it with the gold answer: a cheap normalised string match first, then `math_verify`
   (`verify(parse(gold), parse(prediction))`, gold first: the check is not symmetric), under a per-problem
   wall-clock timeout (SIGALRM; only in the main thread, elsewhere it runs without one).

Source: math-verify (Hugging Face, 0.9) for the symbolic comparison; the `\\boxed{}` convention and CoT instruction
of Qwen2.5-Math's evaluation (Yang et al. 2024), as used by the reference study.
"""

from __future__ import annotations

import functools
import logging
import re
import signal
import threading
import time
from contextlib import contextmanager

__all__ = ["GradingTimeout", "extract_answer", "extract_boxed", "grade", "grade_answer", "normalize_answer"]

DEFAULT_TIMEOUT_S = 5.0

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")


def _balanced_group(text: str, start: int) -> str | None:
    """Content of the `{...}` group opening at `text[start] == "{"`, or None when it never closes.

    Escaped braces `\\{`, `\\}` are content, not structure.
    """
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in `text`, when that box is complete.

    Nested braces are kept (`\\boxed{\\frac{1}{2}}` → `\\frac{1}{2}`); the brace-less form `\\boxed 5` gives `5`.
    Only the last box counts: one that never closes or is empty (`So \\boxed{5}. Wait, actually the answer is
    \\boxed{`) is no final answer, even when an earlier box holds one (issue 31; math-verify 0.9 grades that example
    correct for gold 5).

    Returns:
        The stripped content, or None when there is no box or the last one is unterminated or empty.
    """
    boxes = list(_BOX_RE.finditer(text))
    if not boxes:
        return None
    m = boxes[-1]
    j = m.end()
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        content = _balanced_group(text, j)
        return content.strip() if content is not None and content.strip() else None
    if j > m.end():  # `\boxed 5`: one token up to whitespace or `$`
        token = re.match(r"[^\s$]+", text[j:])
        if token:
            return token.group().rstrip(".,")
    return None


def has_box(text: str) -> bool:
    """Whether `text` contains a `\\boxed` / `\\fbox` command at all (complete or not)."""
    return _BOX_RE.search(text) is not None


# markdown emphasis (`**Final Answer:** 73`, `Final Answer: **73**`, common in chat-model output) may wrap either part
_ANSWER_IS_RE = re.compile(
    r"(?:final\s+answer|the\s+answer)[*_]*\s*(?:is\b|:|=)[*_]*\s*:?\s*(.+)",
    re.IGNORECASE,
)
_EMPHASIS_RE = re.compile(r"^(?:\*{1,3}|_{2,3})\s*|\s*(?:\*{1,3}|_{2,3})$")
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?")


def _strip_emphasis(ans: str) -> str:
    """`**73**` → `73`, `*42*` → `42`, `__x__` → `x` (markdown bold/italic around an answer; a LaTeX `x_1` is kept)."""
    prev = None
    while prev != ans:
        prev, ans = ans, _EMPHASIS_RE.sub("", ans.strip())
    return ans


def _clean_inline(ans: str) -> str:
    ans = _strip_emphasis(ans)
    m = re.match(r"^\$+(.+?)\$+", ans)  # "$x+1$ because ..." → "x+1"
    if m:
        return m.group(1).strip()
    m = re.match(r"^\\\((.+?)\\\)", ans) or re.match(r"^\\\[(.+?)\\\]", ans)
    if m:
        return m.group(1).strip()
    ans = ans.split("\n")[0]
    ans = re.split(r"(?<!\d)\.(?:\s|$)|\.$", ans)[0]  # stop at the sentence's full stop, not a decimal point
    ans = _strip_emphasis(ans.strip().rstrip(".,;:!"))
    m = re.match(r"^\$+(.+?)\$+$", ans)
    return (m.group(1) if m else ans).strip().strip("$").strip().rstrip(".,;:!").strip()


def extract_answer(text: str) -> tuple[str | None, str]:
    """Final answer of a completion with the rule that found it.

    Returns:
        `(answer, method)` with method one of `"boxed"`, `"answer_is"`, `"last_number"`, `"unfinished_box"` (the
        last box is unterminated or empty: answer None, graded wrong) or `"none"` (answer None).
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    if has_box(text):  # the last box is unterminated or empty: the completion gave no final answer
        return None, "unfinished_box"
    matches = list(_ANSWER_IS_RE.finditer(text))
    for m in reversed(matches):
        ans = _clean_inline(m.group(1))
        if ans:
            return ans, "answer_is"
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return numbers[-1].replace(",", "").replace(" ", ""), "last_number"
    return None, "none"


def normalize_answer(ans: str) -> str:
    """Light LaTeX normalisation for the exact-match shortcut (`\\text{13}` → `13`, `\\dfrac` → `\\frac`, spaces)."""
    s = ans.strip().strip("$")
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "").replace("%", "").replace("\\$", "")
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".").lower()


class GradingTimeout(Exception):
    """Grading one answer took longer than its time limit."""


@contextmanager
def _time_limit(seconds: float | None):
    """Raise `GradingTimeout` after `seconds` of wall time (SIGALRM; a no-op outside the main thread).

    An interval timer already running (e.g. pytest-timeout's) is restored with its remaining time afterwards.
    """
    usable = (
        seconds is not None
        and seconds > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def _handler(signum, frame):
        raise GradingTimeout(f"grading took longer than {seconds} s")

    old_handler = signal.signal(signal.SIGALRM, _handler)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    t0 = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - t0), 1e-3), old_interval)


class _DropTimeoutDisabledWarning(logging.Filter):
    # We pass timeout=None to math_verify (it would reset our SIGALRM) and time-limit the whole grade ourselves.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


@functools.cache
def _math_verify():
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader", "math_verify"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
    return math_verify


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    mv = _math_verify()
    parsed = mv.parse(f"${gold}$", parsing_timeout=None)
    if not parsed:
        parsed = mv.parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    return parsed


def grade_answer(answer: str | None, gold: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """Whether an extracted answer equals the gold answer.

    Args:
        answer: the extracted prediction (e.g. from `extract_answer`); None is wrong.
        gold: the gold answer string.
        timeout_s: wall-clock limit in seconds for this comparison (None: no limit); a timeout counts as wrong.

    Returns:
        True when the normalised strings match or `math_verify.verify(gold, prediction)` holds.
    """
    if answer is None or not str(answer).strip():
        return False
    if normalize_answer(answer) == normalize_answer(gold):
        return True
    mv = _math_verify()
    try:
        with _time_limit(timeout_s):
            gold_parsed = _parse_gold(gold)
            pred_parsed = mv.parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
            if not gold_parsed or not pred_parsed:
                return False
            return bool(mv.verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except GradingTimeout:
        logging.getLogger(__name__).warning("grading timed out (> %s s): gold %r, answer %r", timeout_s, gold, answer)
        return False
    except Exception:  # math_verify / sympy internals; a crash must not end the evaluation
        logging.getLogger(__name__).debug("grading failed: gold %r, answer %r", gold, answer, exc_info=True)
        return False


def grade(pred_text: str, gold: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """Grade a whole completion against a gold answer: `grade_answer(extract_answer(pred_text)[0], gold)`.

    Example: `grade("... The answer is $\\boxed{2}$.", "2")` is True; `grade("\\boxed{\\text{13}}", "13")` too.
    """
    return grade_answer(extract_answer(pred_text)[0], gold, timeout_s=timeout_s)
