"""Benchmark registry and loaders: MATH-500 and the math suite, from a local file or the Hugging Face hub.

Every benchmark is a list of `Problem`s: an id, the problem text, the gold final answer as a string, and (MATH-500)
subject and level. `load_benchmark(name, data=...)` reads a local JSONL / JSON / parquet file; without `data` it uses
the shared copy under `../shared/data/<name>/test.jsonl` when present (or `$TOKENSFT_DATA/<name>/test.jsonl`), and
the hub otherwise (`datasets.load_dataset(hub_name, hub_config, split=...)`).

Gold answers per benchmark (the reference study's math suite, Qwen2.5-Math evaluation conventions):

| name | problem field | gold answer |
| --- | --- | --- |
| math500 | problem | `answer` |
| gsm8k | question | last line `#### N` of `answer`, thousands separators dropped |
| minerva_math | problem / question | `answer` if present, else the last `\\boxed{}` of `solution` |
| olympiadbench | question | `final_answer` list, `$` stripped, joined by `, ` |
| aime24 | problem / question | `answer` |
| amc23 | problem / question | `answer` (`27.0` → `27`) |
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokensft.io import InputError

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkDataError", "Problem", "default_data_path", "load_benchmark"]


class BenchmarkDataError(InputError):
    """A benchmark file or row that cannot be read: the message names the file, line and fields."""


@dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    Attributes:
        id: stable identifier (the data set's id field, else the row index as a string); keys `generations.jsonl`.
        problem: the problem statement shown to the model.
        answer: gold final answer as a LaTeX / plain string (graded with `math_verify`).
        subject: MATH subject (`"Algebra"`, ...) when the data set has one.
        level: MATH difficulty 1-5 when the data set has one.
        index: 0-based row position in the source.
    """

    id: str
    problem: str
    answer: str
    subject: str | None = None
    level: int | None = None
    index: int = 0


@dataclass(frozen=True)
class Benchmark:
    """How to find and read one benchmark.

    Attributes:
        name: registry key (`"math500"`).
        display_name: column header in comparison tables (`"MATH-500"`).
        hub_name, hub_config, hub_split: arguments of `datasets.load_dataset`.
        local_path: path under the shared data root (`math500/test.jsonl`).
        problem_fields: candidate fields holding the problem text, first present wins.
        answer: function `row -> gold answer string`; raises `KeyError(field)` when its field is missing.
        answer_fields: the fields `answer` reads (for error messages).
        id_field: field holding a stable id, or None to use the row index.
        subject_field, level_field: MATH metadata fields, or None.
    """

    name: str
    display_name: str
    hub_name: str
    hub_config: str | None
    hub_split: str
    local_path: str
    problem_fields: tuple[str, ...]
    answer: Callable[[dict[str, Any]], str]
    answer_fields: tuple[str, ...]
    id_field: str | None = None
    subject_field: str | None = None
    level_field: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _as_answer_string(value: Any) -> str:
    """Gold answers stored as numbers (`27.0`) become `"27"`; strings are stripped."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    return str(value).strip()


def _field(row: dict[str, Any], name: str) -> Any:
    if name not in row or row[name] is None:
        raise KeyError(name)
    return row[name]


def _plain_answer(row: dict[str, Any]) -> str:
    return _as_answer_string(_field(row, "answer"))


def gsm8k_answer(text: str) -> str:
    """Final answer of a GSM8K solution: the text after the last `####`, commas and a trailing `.` dropped.

    `"... \\n#### 1,234"` → `"1234"`. Raises ValueError when there is no `####` line.
    """
    if "####" not in text:
        raise ValueError(f"GSM8K answer has no '#### N' final line: {text[-80:]!r}")
    tail = text.rsplit("####", 1)[1].strip()
    ans = tail.splitlines()[0] if tail else ""
    ans = ans.replace(",", "").rstrip(".").strip()
    if not ans:
        raise ValueError(f"GSM8K answer has an empty '####' line: {text[-80:]!r}")
    return ans


def _gsm8k_row_answer(row: dict[str, Any]) -> str:
    return gsm8k_answer(str(_field(row, "answer")))


def _minerva_answer(row: dict[str, Any]) -> str:
    from .grading import extract_boxed

    if row.get("answer") not in (None, ""):
        return _as_answer_string(row["answer"])
    solution = str(_field(row, "solution"))
    boxed = extract_boxed(solution)
    if boxed is None:
        raise ValueError("solution has no \\boxed{} answer")
    return boxed


def _olympiad_answer(row: dict[str, Any]) -> str:
    value = _field(row, "final_answer")
    items = value if isinstance(value, (list, tuple)) else [value]
    parts = [_as_answer_string(v).strip().strip("$").strip() for v in items]
    return ", ".join(p for p in parts if p)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark(
            name="math500",
            display_name="MATH-500",
            hub_name="HuggingFaceH4/MATH-500",
            hub_config=None,
            hub_split="test",
            local_path="math500/test.jsonl",
            problem_fields=("problem",),
            answer=_plain_answer,
            answer_fields=("answer",),
            id_field="unique_id",
            subject_field="subject",
            level_field="level",
        ),
        Benchmark(
            name="arithmetic",
            display_name="Arithmetic (built-in)",
            hub_name="",  # ours: generated by tokensft.data.generate_arithmetic(split="test"), no hub copy
            hub_config=None,
            hub_split="test",
            local_path="arithmetic/test.jsonl",
            problem_fields=("problem",),
            answer=_plain_answer,
            answer_fields=("answer",),
            id_field="unique_id",
            level_field="level",
        ),
        Benchmark(
            name="gsm8k",
            display_name="GSM8K",
            hub_name="openai/gsm8k",
            hub_config="main",
            hub_split="test",
            local_path="gsm8k/test.jsonl",
            problem_fields=("question",),
            answer=_gsm8k_row_answer,
            answer_fields=("answer",),
        ),
        Benchmark(
            name="minerva_math",
            display_name="Minerva-Math",
            hub_name="math-ai/minervamath",
            hub_config=None,
            hub_split="test",
            local_path="minerva_math/test.jsonl",
            problem_fields=("problem", "question"),
            answer=_minerva_answer,
            answer_fields=("answer", "solution"),
            id_field="idx",
        ),
        Benchmark(
            name="olympiadbench",
            display_name="OlympiadBench",
            hub_name="Hothan/OlympiadBench",
            hub_config="OE_TO_maths_en_COMP",
            hub_split="train",
            local_path="olympiadbench/test.jsonl",
            problem_fields=("question",),
            answer=_olympiad_answer,
            answer_fields=("final_answer",),
            id_field="id",
        ),
        Benchmark(
            name="aime24",
            display_name="AIME24",
            hub_name="HuggingFaceH4/aime_2024",
            hub_config=None,
            hub_split="train",
            local_path="aime24/test.jsonl",
            problem_fields=("problem", "question"),
            answer=_plain_answer,
            answer_fields=("answer",),
            id_field="id",
        ),
        Benchmark(
            name="amc23",
            display_name="AMC23",
            hub_name="zwhe99/amc23",
            hub_config=None,
            hub_split="test",
            local_path="amc23/test.jsonl",
            problem_fields=("problem", "question"),
            answer=_plain_answer,
            answer_fields=("answer",),
            id_field="id",
        ),
    ]
}


def _data_roots() -> list[Path]:
    roots = []
    if os.environ.get("TOKENSFT_DATA"):
        roots.append(Path(os.environ["TOKENSFT_DATA"]))
    roots.append(Path.cwd() / ".." / "shared" / "data")
    # src/tokensft/eval/benchmarks.py → repository root → ../shared/data
    roots.append(Path(__file__).resolve().parents[3] / ".." / "shared" / "data")
    return roots


def default_data_path(name: str) -> Path | None:
    """The local copy of a benchmark, or None.

    Looks in `$TOKENSFT_DATA`, then `../shared/data` relative to the working directory and to the repository root.
    """
    bench = get_benchmark(name)
    for root in _data_roots():
        path = root / bench.local_path
        if path.is_file():
            return path.resolve()
    return None


def get_benchmark(name: str) -> Benchmark:
    """Registry entry for `name`; raises ValueError listing the known names."""
    key = name.lower().replace("-", "").replace("_", "")
    for bench in BENCHMARKS.values():
        if bench.name.replace("_", "") == key:
            return bench
    raise ValueError(f"Unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL, JSON (a list, or `{"data": [...]}` / `{"test": [...]}`) or parquet file.

    Raises:
        FileNotFoundError: no such file.
        BenchmarkDataError: a line that is not a JSON object (message: `file:line: ...`), or an unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Benchmark data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as e:
                raise BenchmarkDataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
        if isinstance(obj, dict):
            for key in ("data", "test", "train", "rows"):
                if isinstance(obj.get(key), list):
                    obj = obj[key]
                    break
        if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
            raise BenchmarkDataError(f"{path}: expected a JSON list of objects (or JSONL, one object per line)")
        return obj
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkDataError(f"{path}:{lineno}: invalid JSON ({e.msg}: column {e.colno})") from e
            if not isinstance(row, dict):
                raise BenchmarkDataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_hub_id(data: str | os.PathLike) -> bool:
    s = str(data)
    return not Path(s).exists() and bool(_HUB_ID.match(s)) and Path(s).suffix.lower() not in _FILE_SUFFIXES


_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def _load_hub(bench: Benchmark, hub_name: str | None = None) -> list[dict[str, Any]]:
    import datasets

    hub_name = hub_name or bench.hub_name
    if not hub_name:
        if bench.name == "arithmetic":
            from ..data import generate_arithmetic

            return generate_arithmetic(200, seed=0, split="test")
        raise ValueError(f"benchmark {bench.name!r} has no hub copy: pass a local file with data=... / --data PATH")
    config = bench.hub_config if hub_name == bench.hub_name else None
    try:
        ds = datasets.load_dataset(hub_name, config, split=bench.hub_split)
    except Exception as e:  # offline, missing dataset, ...
        raise RuntimeError(
            f"Could not load benchmark {bench.name!r} from the hub ({hub_name}"
            f"{', ' + config if config else ''}, split {bench.hub_split}): {e}. "
            f"Pass a local file with data=... / --data PATH (e.g. ../shared/data/{bench.local_path})."
        ) from e
    return [dict(r) for r in ds]


def _to_problem(bench: Benchmark, row: dict[str, Any], index: int, where: str) -> Problem:
    present = sorted(row)
    text = next((row[f] for f in bench.problem_fields if row.get(f) not in (None, "")), None)
    if text is None:
        raise BenchmarkDataError(
            f"{where}: no problem text for {bench.name}: expected field {' or '.join(map(repr, bench.problem_fields))}; "
            f"fields present: {present}"
        )
    try:
        answer = bench.answer(row)
    except KeyError as e:
        raise BenchmarkDataError(
            f"{where}: missing gold-answer field {e.args[0]!r} for {bench.name} "
            f"(reads {', '.join(map(repr, bench.answer_fields))}); fields present: {present}"
        ) from None
    except ValueError as e:
        raise BenchmarkDataError(f"{where}: cannot read the gold answer for {bench.name}: {e}") from None
    pid = row.get(bench.id_field) if bench.id_field else None
    level = row.get(bench.level_field) if bench.level_field else None
    if level is not None:
        m = re.search(r"\d+", str(level))
        level = int(m.group()) if m else None
    subject = row.get(bench.subject_field) if bench.subject_field else None
    return Problem(
        id=str(pid) if pid not in (None, "") else str(index),
        problem=str(text),
        answer=answer,
        subject=str(subject) if subject not in (None, "") else None,
        level=level,
        index=index,
    )


def load_benchmark(name: str, data: str | os.PathLike | None = None, limit: int | None = None) -> list[Problem]:
    """Load a benchmark as a list of `Problem`s.

    Args:
        name: one of `BENCHMARKS` (`math500`, `gsm8k`, `minerva_math`, `olympiadbench`, `aime24`, `amc23`).
        data: a local `.jsonl` / `.json` / `.parquet` file, or a hub data set name (`owner/name`, loaded with the
            registry's split; its config too when it is the registry's data set); default: the shared local copy
            when present (`default_data_path`), else the registry's hub data set.
        limit: keep the first `limit` problems (file order).

    Returns:
        Problems in file order; ids are unique (duplicates get a `#k` suffix).

    Raises:
        ValueError: unknown benchmark name, or `limit < 0`.
        FileNotFoundError: `data` does not exist.
        BenchmarkDataError: malformed line (names file and line) or a missing field (names it and the fields present).
        RuntimeError: hub loading failed (e.g. offline), with a hint to pass `data`.
    """
    bench = get_benchmark(name)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if data is not None and _looks_like_hub_id(data):
        path, hub_name = None, str(data)
    else:
        path = Path(data) if data is not None else default_data_path(bench.name)
        hub_name = bench.hub_name
    if path is not None:
        rows = read_rows(path)
        source = str(path)
        line_of = _jsonl_line_numbers(path) if path.suffix.lower() not in (".json", ".parquet") else None
    else:
        rows = _load_hub(bench, hub_name)
        source = hub_name
        line_of = None
    if limit is not None:
        rows = rows[:limit]
    problems, seen = [], {}
    for i, row in enumerate(rows):
        where = f"{source}:{line_of[i]}" if line_of else f"{source} row {i}"
        p = _to_problem(bench, row, i, where)
        if p.id in seen:
            seen[p.id] += 1
            p = Problem(p.id + f"#{seen[p.id]}", p.problem, p.answer, p.subject, p.level, p.index)
        else:
            seen[p.id] = 0
        problems.append(p)
    return problems


def _jsonl_line_numbers(path: Path) -> list[int]:
    """1-based line number of each non-blank line (to name the line of a row with a missing field)."""
    with open(path, encoding="utf-8") as f:
        return [n for n, line in enumerate(f, start=1) if line.strip()]
