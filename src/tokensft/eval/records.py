"""On-disk outputs of an evaluation run: `generations.jsonl` (append-only, resumable) and `metrics.json` (atomic).

`generations.jsonl` holds one JSON object per finished problem. Each batch is appended in one write, flushed and
fsync'ed, so a crash leaves at most a torn last line; `read_generations` drops (truncates) it and the problem is
generated again. `metrics.json` is written to a temporary file in the same directory and `os.replace`d, so readers
never see half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..io import append_jsonl, atomic_write

__all__ = ["GENERATIONS_FILE", "METRICS_FILE", "append_records", "read_generations", "write_json_atomic"]

GENERATIONS_FILE = "generations.jsonl"
METRICS_FILE = "metrics.json"


class GenerationsFileError(ValueError):
    """A corrupt line that is not the (repairable) last line of `generations.jsonl`."""


def read_generations(path: str | os.PathLike, repair: bool = True) -> dict[str, dict[str, Any]]:
    """Finished records by problem id; a torn last line is cut off the file (when `repair`).

    A line counts when it is a JSON object with an `id`. The last line may be torn (no newline, or not valid JSON):
    it is removed from the file. A valid last line without its newline gets the newline. Duplicate ids keep the
    first record.

    Returns:
        `{id: record}` in file order; empty when the file does not exist.

    Raises:
        GenerationsFileError: an invalid line before the last one (message: `file:line`).
    """
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    records: dict[str, dict[str, Any]] = {}
    good_end = 0  # byte offset just past the last valid, newline-terminated line
    needs_newline = False
    lines = data.split(b"\n")
    offset = 0
    for lineno, raw in enumerate(lines, start=1):
        is_last = lineno == len(lines)
        end = offset + len(raw) + (0 if is_last else 1)
        if not raw.strip():
            if not is_last:
                good_end = end
            offset = end
            continue
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict) or "id" not in rec:
                raise ValueError("not an object with an 'id'")
        except ValueError as e:
            tail_is_empty = all(not ln.strip() for ln in lines[lineno:])
            if tail_is_empty:  # the torn last line of an interrupted run
                break
            raise GenerationsFileError(f"{path}:{lineno}: corrupt record ({e}); fix or delete the line") from None
        records.setdefault(str(rec["id"]), rec)
        good_end = end
        needs_newline = is_last
        offset = end
    if repair and (good_end < len(data) or needs_newline):
        with open(path, "r+b") as f:
            f.truncate(good_end)
            if needs_newline:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
    return records


def append_records(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Append records as JSON lines in one write, then flush and fsync (durable per batch); a torn last line is cut
    first (`tokensft.io.append_jsonl`)."""
    append_jsonl(path, records)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON via a temporary file in the same directory and `os.replace`."""
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
