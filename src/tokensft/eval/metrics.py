"""Accuracy statistics: unbiased pass@k, Wilson score interval, and the per-run summary in `metrics.json`."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["pass_at_k", "summarize", "wilson_interval"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of pass@k from `n` samples of which `c` are correct.

    pass@k = 1 - C(n - c, k) / C(n, k), computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i) for numerical stability.

    Source: Chen et al. 2021, "Evaluating Large Language Models Trained on Code" (Codex), section 2.1, eq. 1.

    Raises:
        ValueError: unless 0 <= c <= n and 1 <= k <= n.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def wilson_interval(successes: float, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (default 95%, z = Φ⁻¹(0.975)).

    centre = (p + z²/2N) / (1 + z²/N), half-width = z / (1 + z²/N) · sqrt(p(1-p)/N + z²/4N²), p = successes / N.

    Source: Wilson 1927, "Probable inference, the law of succession, and statistical inference", JASA 22(158).

    Returns:
        `(low, high)` in [0, 1]; `(0.0, 1.0)` when `trials == 0`.
    """
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    z2 = z * z
    denom = 1.0 + z2 / trials
    centre = (p + z2 / (2 * trials)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _ks(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def summarize(records: Iterable[dict[str, Any]], n: int = 1, ks: Sequence[int] | None = None) -> dict[str, Any]:
    """Aggregate graded generation records into the accuracy part of `metrics.json`.

    Args:
        records: one dict per problem with `correct` and `finish_reason` (scalars, or lists of `n` for n > 1),
            `num_tokens`, optional `subject` / `level` / `extraction_method`.
        n: samples per problem.
        ks: pass@k values to report; default powers of two up to n, and n.

    Returns:
        `accuracy` (mean over problems of the fraction of correct samples: avg@n, plain accuracy for n = 1),
        `accuracy_ci95` (Wilson over all samples; for n > 1 it ignores the correlation between samples of one
        problem and is too narrow), `num_problems`, `num_samples`, `num_correct`, `pass_at_k`, `per_subject`,
        `per_level` (each `{key: {"accuracy", "num_problems"}}`; empty when the data has none),
        `num_truncated`, `truncation_rate` (samples that hit the token limit; scored wrong), `mean_num_tokens`,
        `extraction` (count of samples per extraction rule), `per_problem` (`{id: fraction of its samples
        correct}` for records with an `id`: the per-problem outcomes a paired test such as McNemar's reads).
    """
    records = list(records)
    ks = list(ks) if ks is not None else _ks(n)
    num_samples = num_correct = num_truncated = total_tokens = 0
    acc_sum = 0.0
    pass_sums = dict.fromkeys(ks, 0.0)
    by_subject: dict[str, list[float]] = defaultdict(list)
    by_level: dict[str, list[float]] = defaultdict(list)
    extraction: dict[str, int] = defaultdict(int)
    per_problem: dict[str, float] = {}
    for rec in records:
        correct = [bool(c) for c in _as_list(rec["correct"])]
        finish = _as_list(rec.get("finish_reason", "stop"))
        m, c = len(correct), sum(correct)
        num_samples += m
        num_correct += c
        num_truncated += sum(f == "length" for f in finish)
        total_tokens += sum(int(t) for t in _as_list(rec.get("num_tokens", 0)))
        for meth in _as_list(rec.get("extraction_method", [])):
            extraction[str(meth)] += 1
        frac = c / m if m else 0.0
        acc_sum += frac
        if rec.get("id") is not None:
            per_problem[str(rec["id"])] = frac
        for k in ks:
            pass_sums[k] += pass_at_k(m, c, k) if k <= m else float(c > 0)
        if rec.get("subject") is not None:
            by_subject[str(rec["subject"])].append(frac)
        if rec.get("level") is not None:
            by_level[str(rec["level"])].append(frac)
    num_problems = len(records)
    lo, hi = wilson_interval(num_correct, num_samples)

    def _group(d: dict[str, list[float]]) -> dict[str, dict[str, float]]:
        keys = sorted(d, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
        return {key: {"accuracy": sum(d[key]) / len(d[key]), "num_problems": len(d[key])} for key in keys}

    return {
        "accuracy": acc_sum / num_problems if num_problems else 0.0,
        "accuracy_ci95": [lo, hi],
        "num_problems": num_problems,
        "num_samples": num_samples,
        "num_correct": num_correct,
        "pass_at_k": {str(k): (pass_sums[k] / num_problems if num_problems else 0.0) for k in ks},
        f"avg_at_{n}": acc_sum / num_problems if num_problems else 0.0,
        "per_subject": _group(by_subject),
        "per_level": _group(by_level),
        "num_truncated": num_truncated,
        "truncation_rate": num_truncated / num_samples if num_samples else 0.0,
        "mean_num_tokens": total_tokens / num_samples if num_samples else 0.0,
        "extraction": dict(sorted(extraction.items())),
        "per_problem": per_problem,
    }


def paired_sign_test(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Paired test of two models' accuracy on the same problems: the exact two-sided sign test over problems of the
    per-problem difference in accuracy (McNemar's exact test when each problem has one 0/1 outcome per model).

    With several seeds pass each problem's mean outcome over the seeds: a problem counts for `result` when its mean
    is higher there, for `baseline` when lower; ties (both right, both wrong, or equal means) carry no information.

    Args:
        result, baseline: `{problem id: outcome in [0, 1]}` (`summarize`'s `per_problem`, or its mean over seeds).

    Returns:
        `{"result_better": b, "baseline_better": c, "n": problems compared, "p": two-sided exact binomial p-value
        of b against c at 1/2}` (p = 1 when b = c = 0).

    Raises:
        ValueError: the two do not cover the same problems.
    """
    if result.keys() != baseline.keys():
        missing = sorted(set(result) ^ set(baseline))
        raise ValueError(f"paired_sign_test: the outcomes cover different problems (e.g. {missing[0]!r})")
    b = sum(result[k] > baseline[k] for k in result)
    c = sum(result[k] < baseline[k] for k in result)
    if b + c == 0:
        p = 1.0
    else:
        from scipy.stats import binomtest

        p = float(binomtest(b, b + c, 0.5).pvalue)
    return {"result_better": b, "baseline_better": c, "n": len(result), "p": p}
