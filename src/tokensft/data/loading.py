"""Read training records from a local JSONL / JSON / parquet file or a Hugging Face hub data set.

`load_records(source)` returns plain `list[dict]` rows (`builtin:arithmetic` gives the built-in generator's); turning rows into chat messages is `presets`' job and
tokenizing them is `tokenize`'s. A source is taken as a local path when it exists on disk, or when it looks like one
(a known file suffix, or a leading `./`, `../`, `/`, `~`); anything else is a hub data set name passed to
`datasets.load_dataset(source, hub_config, split=split)`. A local directory is read as `<dir>/<split>.jsonl`
(`.json`, `.parquet`), so `../shared/data/gsm8k` with `split="test"` reads `../shared/data/gsm8k/test.jsonl`.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

from ..io import InputError

__all__ = ["DataFileError", "load_records", "read_json", "read_jsonl"]

BUILTIN_PREFIX = "builtin:"
BUILTIN_DEFAULT_ROWS = 2000
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


class DataFileError(InputError):
    """A data file that cannot be read: the message names the file (and the line for JSONL)."""


def row_location(source: str | os.PathLike | None, index: int | None) -> str:
    """Where row `index` (0-based, as `load_records` returns them) of `source` is, for error messages:
    `FILE:LINE` for a local JSON-lines file (blank lines counted, as an editor shows them), else `SOURCE row N`
    (1-based); "" when neither is known."""
    if index is None:
        return str(source or "")
    if source:
        path = Path(os.fspath(source)).expanduser()
        if path.is_file() and path.name.lower().endswith(".jsonl"):
            seen = -1
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, start=1):
                    if raw.strip():
                        seen += 1
                        if seen == index:
                            return f"{path}:{lineno}"
        return f"{source} row {index + 1}"
    return f"row {index + 1}"


def read_jsonl(path: str | os.PathLike, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (one object a line; blank lines skipped; `.gz` read transparently).

    Args:
        path: the file.
        limit: stop after this many rows (the rest of the file is not read).

    Raises:
        FileNotFoundError: no such file.
        DataFileError: a line that is not valid JSON, or not a JSON object; the message is `path:line: ...`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: {path}")
    rows: list[dict[str, Any]] = []
    with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFileError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                    f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(
                    f"{path}:{lineno}: invalid JSON on line {lineno} ({e.msg}: column {e.colno})"
                ) from None
            if not isinstance(row, dict):
                raise DataFileError(
                    f"{path}:{lineno}: expected a JSON object on line {lineno}, got {type(row).__name__}"
                )
            rows.append(row)
    return rows


def read_json(path: str | os.PathLike, *, split: str = "train", limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a `.json` file: a list of objects, an object holding one (`data`, `rows`, `<split>`), or JSON lines.

    Raises:
        FileNotFoundError: no such file.
        DataFileError: invalid JSON (names file and line), or JSON that holds no list of objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: {path}")
    with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataFileError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON lines saved as .json
            return read_jsonl(path, limit=limit)
        raise DataFileError(
            f"{path}:{e.lineno}: invalid JSON on line {e.lineno} ({e.msg}: column {e.colno})"
        ) from None
    if isinstance(obj, dict):
        for key in ("data", "rows", split, "train", "test"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
    if not isinstance(obj, list):
        raise DataFileError(
            f"{path}: expected a JSON list of objects, an object with a 'data' list, or JSON lines; "
            f"got {type(obj).__name__}" + (f" with keys {sorted(obj)[:20]}" if isinstance(obj, dict) else "")
        )
    for i, row in enumerate(obj):
        if not isinstance(row, dict):
            raise DataFileError(f"{path}: item {i} of the list is a {type(row).__name__}, expected a JSON object")
    return obj[:limit] if limit is not None else obj


def _read_parquet(path: Path, limit: int | None) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: {path}")
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataFileError(f"{path}: cannot read parquet file ({e})") from e
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def _looks_local(source: str) -> bool:
    return source.lower().endswith(LOCAL_SUFFIXES) or source.startswith(("./", "../", "/", "~", ".\\", "..\\"))


def _resolve_local(path: Path, split: str) -> Path:
    if path.is_dir():
        for suffix in LOCAL_SUFFIXES:
            candidate = path / f"{split}{suffix}"
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"Data directory {path} holds no {split}.jsonl / {split}.json / {split}.parquet "
            f"(files: {sorted(p.name for p in path.iterdir())[:20]})"
        )
    return path


def _load_hub(source: str, hub_config: str | None, split: str, limit: int | None) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(source, hub_config, split=split)
    except Exception as e:  # offline, unknown name, unknown split, ...
        raise RuntimeError(
            f"Could not load {source!r} as a local file (no such path) or from the Hugging Face hub "
            f"(config {hub_config!r}, split {split!r}): {type(e).__name__}: {e}. "
            "Pass a local .jsonl/.json/.parquet path (e.g. ../shared/data/gsm8k/train.jsonl), or check the hub name "
            "and that you are online (HF_HUB_OFFLINE unset)."
        ) from e
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(row) for row in ds]


def load_records(
    source: str | os.PathLike,
    *,
    split: str = "train",
    limit: int | None = None,
    hub_config: str | None = None,
    seed: int = 0,
    builtin_max_steps: int | None = None,
) -> list[dict[str, Any]]:
    """Load raw training rows from a local file, a hub data set, or the built-in generator.

    Args:
        source: a `.jsonl` (`.jsonl.gz`), `.json` (a list of objects, `{"data": [...]}`, or JSON lines) or `.parquet`
            file; a directory holding `<split>.jsonl` (or `.json`, `.parquet`); `builtin:arithmetic`
            (`generate_arithmetic(limit or 2000, seed=seed, split=split)`); or a hub data set name
            (`openai/gsm8k`), loaded with `datasets.load_dataset(source, hub_config, split=split)`.
        split: hub split, the file stem looked up in a directory, or the built-in generator's split.
        limit: keep only the first `limit` rows (file order). None keeps all.
        hub_config: hub configuration name (`"main"` for `openai/gsm8k`).
        seed: seed of `builtin:arithmetic` (ignored otherwise).
        builtin_max_steps: most operations per `builtin:arithmetic` problem (default `DEFAULT_MAX_STEPS`, 4; at
            least min(2, this)). The one place the built-in data set's rows and defaults are defined.

    Returns:
        The rows as dicts, in file order.

    Raises:
        ValueError: `limit < 0`, an unknown `builtin:` name, or a split the generator does not have.
        FileNotFoundError: a local-looking path that does not exist (the message names it).
        DataFileError (a ValueError): malformed JSONL / JSON (names the file and the line number), or a JSON file
            without a list of objects.
        RuntimeError: the hub load failed (offline, unknown name), with a hint to pass a local file.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    text = os.fspath(source)
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX) :]
        if name != "arithmetic":
            raise ValueError(f"Unknown built-in data set {text!r}; known: {BUILTIN_PREFIX}arithmetic")
        from .arithmetic import DEFAULT_MAX_STEPS, generate_arithmetic

        steps = builtin_max_steps or DEFAULT_MAX_STEPS
        return generate_arithmetic(limit if limit is not None else BUILTIN_DEFAULT_ROWS, seed=seed, split=split,
                                   min_steps=min(2, steps), max_steps=steps)
    path = Path(text).expanduser()
    if path.exists() or _looks_local(text):
        if not path.exists():
            raise FileNotFoundError(f"Data file not found: {path} (resolved from {text!r}, cwd {Path.cwd()})")
        path = _resolve_local(path, split)
        name = path.name.lower()
        if name.endswith(".parquet"):
            return _read_parquet(path, limit)
        if name.endswith((".json", ".json.gz")):
            return read_json(path, split=split, limit=limit)
        return read_jsonl(path, limit=limit)
    return _load_hub(text, hub_config, split, limit)
