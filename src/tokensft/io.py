"""File writing, the input-error type and the run-directory markers shared by every package (depends on nothing of
tokensft)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

RUN_CONFIG_FILE = "tokensft_config.yaml"  # written when a training run starts
RESULTS_FILE = "train_results.json"  # written last, atomically, when it has finished and saved its model


class InputError(ValueError):
    """Bad user input (an option, a data file, a row, a field): the CLI prints its message as one line and exits
    with code 2, without a traceback (set TOKENSFT_DEBUG=1 for one)."""


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (str is UTF-8 encoded) to `path` so that readers never see a half-written file.

    Writes a temporary file in the same directory, fsyncs it, makes it world-readable (mkstemp creates 0600) and
    `os.replace`s it over `path`; parent directories are created. On any error the temporary file is removed and
    the old `path`, if any, is left untouched.

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def require_complete_run(path: str | os.PathLike, what: str = "model") -> None:
    """Refuse a tokensft run directory whose training did not finish its final save.

    A directory written by `tokensft train` holds `tokensft_config.yaml` from its start and `train_results.json`
    only once the final model or adapter is complete; anything else (a hub id, a plain model directory) passes.

    Raises:
        InputError: `path` is a run directory without `train_results.json` (one line, with how to finish it).
    """
    p = Path(path)
    if p.is_dir() and (p / RUN_CONFIG_FILE).is_file() and not (p / RESULTS_FILE).is_file():
        raise InputError(f"incomplete run: {p} has no {RESULTS_FILE} (its training stopped before the final save); "
                         f"finish it with `tokensft train --config {p / RUN_CONFIG_FILE} --resume_from_checkpoint true` "
                         f"or pass another {what}")
