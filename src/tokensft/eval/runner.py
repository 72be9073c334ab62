"""`evaluate`: generate, grade, write `generations.jsonl` + `metrics.json`, resume where a previous run stopped."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tokensft.runtime import environment, set_threads

from ..io import dir_lock
from .backends import GenerationBackend, Sample, make_backend
from .benchmarks import BenchmarkDataError, Problem, get_benchmark, load_benchmark
from .grading import DEFAULT_TIMEOUT_S, extract_answer, grade_answer
from .metrics import summarize
from .prompts import build_prompt, resolve_prompt_template, stop_token_ids
from .records import GENERATIONS_FILE, METRICS_FILE, append_records, read_generations, write_json_atomic

__all__ = ["default_output_dir", "evaluate", "regrade"]

logger = logging.getLogger(__name__)

# Settings that change what is generated: a resumed run must match the finished part on these.
_RESUME_KEYS = ("model", "adapter", "benchmark", "max_new_tokens", "temperature", "top_p", "n", "prompt_template")


def _slug(ref: str | None) -> str:
    if not ref:
        return "none"
    return Path(str(ref).rstrip("/")).name.replace(" ", "_") or "model"


def default_output_dir(model: str, benchmark: str, adapter: str | None = None) -> Path:
    """`outputs/eval/<model or adapter name>/<benchmark>` under the working directory."""
    return Path("outputs") / "eval" / (_slug(adapter) if adapter else _slug(model)) / benchmark


def _model_name(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", None) or type(model).__name__)


def _generation_config_holder(model_ref: str) -> Any:
    """An object with the checkpoint's `generation_config` (for its EOS ids) without loading weights; None if absent."""
    try:
        from transformers import GenerationConfig

        from tokensft.models import resolve_model

        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(resolve_model(model_ref)))
    except Exception:  # no generation_config.json, offline hub id, ...
        return None


def _check_resume(out_dir: Path, settings: dict[str, Any], num_done: int) -> dict[str, Any]:
    """The previous run's metrics (for its cumulative timings), after checking its settings match; {} if none."""
    metrics_path = out_dir / METRICS_FILE
    if not num_done or not metrics_path.exists():
        return {}
    import json

    try:
        old = json.loads(metrics_path.read_text())
    except (OSError, ValueError):
        return {}
    keys = list(_RESUME_KEYS) + (["seed"] if settings["temperature"] > 0 else [])
    diff = {k: (old.get(k), settings[k]) for k in keys if k in old and old.get(k) != settings[k]}
    if diff:
        lines = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{out_dir} holds {num_done} generations made with other settings ({lines}); "
            "use another --output_dir or delete that one."
        )
    return old


def _record(problem: Problem, prompt: str, samples: list[Sample], n: int, timeout_s: float | None) -> dict[str, Any]:
    completions, extracted, methods, correct, finish, tokens = [], [], [], [], [], []
    for s in samples:
        ans, method = extract_answer(s.text)
        ok = s.finish_reason != "length" and grade_answer(ans, problem.answer, timeout_s=timeout_s)
        completions.append(s.text)
        extracted.append(ans)
        methods.append(method)
        correct.append(bool(ok))
        finish.append(s.finish_reason)
        tokens.append(s.num_tokens)

    def one(xs):
        return xs[0] if n == 1 else xs

    rec = {
        "id": problem.id,
        "index": problem.index,
        "prompt": prompt,
        "completion": one(completions),
        "extracted_answer": one(extracted),
        "extraction_method": one(methods),
        "gold": problem.answer,
        "correct": one(correct),
        "finish_reason": one(finish),
        "num_tokens": one(tokens),
    }
    if problem.subject is not None:
        rec["subject"] = problem.subject
    if problem.level is not None:
        rec["level"] = problem.level
    return rec


def default_backend(model_obj=None) -> str:
    """`"vllm"` where vLLM is installed and the model is to be loaded from a path (vLLM loads it itself), else
    `"transformers"`: the faster of the two where both can run (docs/performance.md, vLLM on CPU)."""
    import importlib.util

    return "vllm" if model_obj is None and importlib.util.find_spec("vllm") is not None else "transformers"


def evaluate(
    model: str | Any,
    *,
    adapter: str | None = None,
    benchmark: str = "math500",
    data: str | os.PathLike | None = None,
    limit: int | None = None,
    output_dir: str | os.PathLike | None = None,
    backend: str | GenerationBackend = "auto",
    batch_size: int = 64,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    n: int = 1,
    seed: int = 0,
    prompt_template: str = "auto",
    dtype: str | None = None,
    model_obj: Any = None,
    tokenizer: Any = None,
    device: str | None = None,
    grading_timeout_s: float | None = DEFAULT_TIMEOUT_S,
    progress: bool = True,
    sort_by_length: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Evaluate a model on a math benchmark; resumable.

    Generates `n` completions per problem (CoT prompt, `\\boxed{}` answer), grades them with `math_verify`, appends
    one line per problem to `output_dir/generations.jsonl` after each batch (a re-run skips problems already there
    and regenerates a torn last line), and writes `output_dir/metrics.json` atomically after each batch
    (`"complete": false` until the end).

    Args:
        model: model reference (alias such as `smollm2-135m-instruct`, local dir, GGUF, hub id), or a loaded model
            object (then treated as `model_obj`; its `config._name_or_path` is recorded).
        adapter: PEFT LoRA adapter directory (applied unmerged).
        benchmark: `math500`, `gsm8k`, `minerva_math`, `olympiadbench`, `aime24` or `amc23`.
        data: local data file (JSONL/JSON/parquet); default: the shared copy, else the hub.
        limit: evaluate the first `limit` problems.
        output_dir: where the two files go; default `outputs/eval/<model>/<benchmark>`.
        backend: `"auto"` (default: `"vllm"` where vLLM is installed and no `model_obj` is given, else
            `"transformers"`; on this 2-core CPU vLLM's CPU build decodes 64 MATH-500 problems several times faster,
            `benchmarks/results/generation_cpu_vllm.json`), `"transformers"`, `"vllm"`, or a `GenerationBackend`.
        batch_size: prompts decoded together (64 with the default greedy loop: 1.73x the tokens/s of the old default,
            `generate` at 16, both at 1 thread on the 2-core CPU; docs/performance.md).
        max_new_tokens: completion token limit; completions that hit it are truncated and scored wrong.
        temperature: 0 = greedy; > 0 samples (required for n > 1).
        top_p: nucleus mass when sampling.
        n: samples per problem; reports avg@n as `accuracy` and unbiased pass@k.
        seed: sampling seed; a batch uses `seed + index of its first problem`; global RNGs are left alone.
        prompt_template: `auto`, `chat` or `plain` (see `prompts`).
        dtype: model dtype (`float32`, `bfloat16`, ...); default float32 on CPU, bfloat16 on CUDA.
        model_obj, tokenizer: an already-loaded model / tokenizer (in-process use, no reload). Without `tokenizer`,
            the adapter directory's tokenizer is used when it has one, else the model's.
        device: `cpu` / `cuda`; default CUDA when available (ignored with `model_obj`).
        grading_timeout_s: wall-clock limit per graded sample (seconds); a timeout is scored wrong.
        progress: show a tqdm bar over problems.
        sort_by_length: batch prompts of similar length together (longest first) so left padding wastes little
            prefill compute; `generations.jsonl` then follows batch order (records are keyed by `id`).
        threads: CPU threads for generation (None / 0: chosen by measurement, `tokensft.runtime.pick_threads`).

    Returns:
        The metrics dict also written to `metrics.json`: `accuracy`, `accuracy_ci95`, `pass_at_k`, `per_subject`,
        `per_level`, `truncation_rate`, `tokens_per_s` (generated tokens / generation seconds), `wall_time_s`
        (timings summed over resumed sessions), ... and the settings (model, adapter, backend, prompt template,
        sampling parameters).

    Raises:
        ValueError: invalid settings, or an output_dir whose finished generations used other settings.
        ImportError: `backend="vllm"` without vLLM installed.
        BenchmarkDataError / FileNotFoundError: bad benchmark data (see `load_benchmark`).
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    if not isinstance(model, (str, os.PathLike)) and model_obj is None:
        model_obj, model = model, _model_name(model)
    model_name = _model_name(model)
    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"n, batch_size and max_new_tokens must be >= 1 (got {n}, {batch_size}, {max_new_tokens})")
    if temperature < 0 or not (0 < top_p <= 1):
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    if n > 1 and temperature == 0:
        raise ValueError("n > 1 samples need temperature > 0 (greedy decoding gives n identical completions)")
    bench = get_benchmark(benchmark)
    problems = load_benchmark(bench.name, data=data, limit=limit)
    if not problems:
        raise BenchmarkDataError(f"{data or bench.name}: no problems to evaluate"
                                 + (" (--limit 0)" if limit == 0 else " (the data is empty)"))
    if backend == "auto":
        backend = default_backend(model_obj)
    backend_name = backend if isinstance(backend, str) else getattr(backend, "name", type(backend).__name__)
    if dtype is None and backend_name in ("transformers", "vllm") and model_obj is None:
        import torch

        use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        dtype = "bfloat16" if use_cuda else "float32"

    if dtype is None and model_obj is not None and hasattr(model_obj, "parameters"):
        dtype = next(model_obj.parameters()).dtype
    if tokenizer is None:
        from tokensft.models import load_tokenizer

        # A training run saves its tokenizer (maybe with a chat template added to a base model) beside the adapter.
        has_own = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(str(adapter) if has_own else model_name)
    template = resolve_prompt_template(tokenizer, prompt_template)
    stop_ids = stop_token_ids(tokenizer, model_obj if model_obj is not None else _generation_config_holder(model_name))

    out_dir = Path(output_dir) if output_dir is not None else default_output_dir(model_name, bench.name, adapter)
    with dir_lock(out_dir, activity="evaluating"):  # a second eval into it is refused, not interleaved
        gen_path = out_dir / GENERATIONS_FILE
        settings: dict[str, Any] = {
            "benchmark": bench.name,
            "model": model_name,
            "adapter": str(adapter) if adapter else None,
            "backend": backend_name,
            "prompt_template": prompt_template,
            "prompt_template_resolved": template,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "n": n,
            "seed": seed,
            "batch_size": batch_size,
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
            "data": str(data) if data is not None else None,
            "limit": limit,
            "stop_token_ids": stop_ids,
            "grading_timeout_s": grading_timeout_s,
            "output_dir": str(out_dir),
        }
        done = read_generations(gen_path)
        done_ids = {p.id for p in problems} & set(done)
        previous = _check_resume(out_dir, settings, len(done_ids))
        pending = [(p, build_prompt(p.problem, tokenizer, template)) for p in problems if p.id not in done]
        if sort_by_length:
            pending.sort(key=lambda item: -len(item[1]))  # stable: file order among equal lengths
        if done_ids:
            logger.info("Resuming in %s: %d of %d problems already done", out_dir, len(done_ids), len(problems))

        # Timings accumulate over resumed sessions; the token count comes from the records themselves (exact after any
        # number of resumes), tokens/s from the tokens of the timed batches only.
        gen_time = float(previous.get("generation_time_s") or 0.0)
        timed_tokens = int(previous.get("timed_tokens", previous.get("generated_tokens")) or 0)
        wall_before = float(previous.get("wall_time_s") or 0.0)

        def write_metrics(complete: bool) -> dict[str, Any]:
            recs = [done[p.id] for p in problems if p.id in done]
            metrics = summarize(recs, n=n)
            metrics.update(settings)
            metrics.update(
                complete=complete,
                num_problems_total=len(problems),
                generated_tokens=sum(sum(r["num_tokens"]) if isinstance(r["num_tokens"], list) else r["num_tokens"]
                                     for r in recs),
                timed_tokens=timed_tokens,
                generation_time_s=gen_time,
                tokens_per_s=(timed_tokens / gen_time) if gen_time > 0 else None,
                wall_time_s=wall_before + time.perf_counter() - t_start,
                updated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                environment=environment(),
            )
            write_json_atomic(out_dir / METRICS_FILE, metrics)
            return metrics

        if pending:
            cpu_threads = None
            if backend_name in ("transformers", "vllm"):
                cpu_threads = set_threads("decode", threads, device=device)
            if isinstance(backend, str):
                engine = make_backend(
                    backend,
                    model_name,
                    tokenizer,
                    stop_ids,
                    adapter=adapter,
                    dtype=dtype,
                    model_obj=model_obj,
                    add_special_tokens=(template == "plain"),
                    seed=seed,
                    device=device,
                    cpu_threads=cpu_threads,
                )
            else:
                engine = backend
            bar = tqdm(
                total=len(problems),
                initial=len(done_ids),
                desc=f"eval {bench.name}",
                unit="problem",
                disable=not progress,
                dynamic_ncols=True,
            )
            # continuous batching keeps `batch_size` sequences decoding and refills as they finish: queue everything
            continuous = bool(getattr(engine, "continuous_batching", False)) and temperature == 0 and n == 1
            settings["continuous_batching"] = continuous
            step = len(pending) if continuous else batch_size
            if continuous:
                engine.max_in_flight = batch_size
            try:
                for start in range(0, len(pending), step):
                    batch = [p for p, _ in pending[start : start + step]]
                    prompts = [prompt for _, prompt in pending[start : start + step]]
                    written: set[int] = set()

                    def finish(i: int, row: list[Sample], batch=batch, prompts=prompts, written=written) -> None:
                        # one problem's completions, written the moment they are all done (a kill loses only the rest
                        # of the batch) and counted on the bar: progress per sequence, not per batch
                        if i in written:
                            return
                        if len(row) != n:
                            raise RuntimeError(f"backend {backend_name!r} returned a wrong number of samples")
                        rec = _record(batch[i], prompts[i], row, n, grading_timeout_s)
                        append_records(gen_path, [rec])
                        done[rec["id"]] = rec
                        written.add(i)
                        bar.update(1)
                        if len(written) % batch_size == 0 and len(written) < len(batch):
                            write_metrics(complete=False)  # as often as batched generation does

                    t0 = time.perf_counter()
                    kwargs = {"on_done": finish} if getattr(engine, "streams_done", False) else {}
                    samples = engine.generate(
                        prompts,
                        n=n,
                        max_new_tokens=max_new_tokens,
                        temperature=temperature,
                        top_p=top_p,
                        seed=seed + batch[0].index,
                        **kwargs,
                    )
                    gen_time += time.perf_counter() - t0
                    if len(samples) != len(batch) or any(len(s) != n for s in samples):
                        raise RuntimeError(f"backend {backend_name!r} returned a wrong number of samples")
                    timed_tokens += sum(s.num_tokens for row in samples for s in row)
                    for i, row in enumerate(samples):
                        finish(i, row)
                    partial = write_metrics(complete=False)
                    bar.set_postfix(acc=f"{partial['accuracy']:.3f}", trunc=f"{partial['truncation_rate']:.2f}")
            finally:
                bar.close()
                if isinstance(backend, str) and hasattr(engine, "close"):
                    engine.close()  # a vLLM engine we started: its process and KV cache go now
        return write_metrics(complete=True)


def regrade(output_dir: str | os.PathLike, *, grading_timeout_s: float | None = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Re-grade a finished run with the current extraction and grading rules, without generating anything.

    Rewrites `generations.jsonl` (atomically: tmp + `os.replace`) with fresh `extracted_answer`,
    `extraction_method` and `correct` (truncated samples stay wrong), and `metrics.json` with the recomputed
    accuracy; settings and timing fields of the old `metrics.json` are kept.

    Returns:
        The new metrics dict.

    Raises:
        FileNotFoundError: no `generations.jsonl` in `output_dir`.
    """
    import json

    out_dir = Path(output_dir)
    gen_path = out_dir / GENERATIONS_FILE
    if not gen_path.is_file():
        raise FileNotFoundError(f"No {GENERATIONS_FILE} in {out_dir}")
    records = list(read_generations(gen_path).values())
    old = json.loads((out_dir / METRICS_FILE).read_text()) if (out_dir / METRICS_FILE).is_file() else {}
    n = int(old.get("n", 1))
    for rec in records:
        texts, finish = rec["completion"], rec["finish_reason"]
        many = isinstance(texts, list)
        samples = [Sample(t, f, 0) for t, f in zip(texts if many else [texts], finish if many else [finish])]
        extracted = [extract_answer(s.text) for s in samples]
        correct = [
            s.finish_reason != "length" and grade_answer(a, rec["gold"], timeout_s=grading_timeout_s)
            for s, (a, _) in zip(samples, extracted)
        ]
        rec["extracted_answer"] = [a for a, _ in extracted] if many else extracted[0][0]
        rec["extraction_method"] = [m for _, m in extracted] if many else extracted[0][1]
        rec["correct"] = correct if many else correct[0]
    tmp = gen_path.with_name(gen_path.name + ".regrade.tmp")
    tmp.unlink(missing_ok=True)
    append_records(tmp, records)
    os.replace(tmp, gen_path)
    metrics = dict(old)
    metrics.update(summarize(records, n=n))
    metrics["regraded_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    return metrics
