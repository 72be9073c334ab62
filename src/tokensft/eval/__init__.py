"""Evaluation on MATH-500 and the math suite: benchmark registry, generation backends, grading, metrics.

Public API:

- `evaluate(model, *, benchmark="math500", ...) -> dict`: generate, grade, write `generations.jsonl` and
  `metrics.json` (resumable);
- `load_benchmark(name, data=None, limit=None) -> list[Problem]`;
- `extract_boxed(text)`, `extract_answer(text)`, `grade(pred_text, gold) -> bool`;
- `pass_at_k(n, c, k)`, `wilson_interval(successes, trials)`;
- `regrade(output_dir)`: re-grade saved generations with the current rules;
- `compare_runs(runs, baseline)` for the `Method | MATH-500 Acc | Δ vs baseline` table.

Imports are light (no torch / transformers until a model is loaded).
"""

from .backends import Sample, TransformersBackend, VLLMBackend
from .benchmarks import BENCHMARKS, BenchmarkDataError, Problem, load_benchmark
from .compare import compare_runs, format_csv, format_markdown, load_metrics
from .grading import extract_answer, extract_boxed, grade, grade_answer
from .metrics import pass_at_k, summarize, wilson_interval
from .prompts import COT_INSTRUCTION, build_prompt, stop_token_ids
from .runner import evaluate, regrade

__all__ = [
    "BENCHMARKS",
    "COT_INSTRUCTION",
    "BenchmarkDataError",
    "Problem",
    "Sample",
    "TransformersBackend",
    "VLLMBackend",
    "build_prompt",
    "compare_runs",
    "evaluate",
    "extract_answer",
    "extract_boxed",
    "format_csv",
    "format_markdown",
    "grade",
    "grade_answer",
    "load_benchmark",
    "load_metrics",
    "pass_at_k",
    "regrade",
    "stop_token_ids",
    "summarize",
    "wilson_interval",
]
