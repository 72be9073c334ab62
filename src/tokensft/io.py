"""File writing, the input-error type and the run-directory markers shared by every package (depends on nothing of
tokensft)."""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RUN_CONFIG_FILE = "tokensft_config.yaml"  # written when a training run starts
RESULTS_FILE = "train_results.json"  # written last, atomically, when it has finished and saved its model
LOCK_FILE = ".tokensft.lock"  # {"pid", "host"} of the process training or evaluating into the directory
LOCK_HEARTBEAT_S = 30  # the holder touches its lock this often
LOCK_STALE_S = 600  # a lock not touched for this long is stale whatever its host (a killed job on another machine)


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


def cut_to_last_line(path: str | os.PathLike) -> int:
    """Cut an append-only text file back to its last whole line: the bytes after its last newline (a line torn by a
    killed writer) are removed, so the next append starts a line of its own instead of being glued onto the torn one.

    Returns:
        The number of bytes removed (0 when the file is missing, empty or ends with a newline).
    """
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return 0
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        keep, pos = 0, size  # scan back in blocks for the last newline
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            block = f.read(pos - start)
            i = block.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def append_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """Append `records` to a JSONL file as one line each, in one write, then flush and fsync (durable per call).

    Every append-only JSONL tokensft writes (`generations.jsonl`, `traces/manifest.jsonl`) goes through here: the file
    is first cut back to its last whole line (`cut_to_last_line`), so a line torn by a kill is dropped rather than
    glued to the next record. Parent directories are created.
    """
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not text:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cut_to_last_line(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


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


def _lock_holder(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("pid"), int) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@contextmanager
def dir_lock(output_dir: str | os.PathLike, activity: str = "training") -> Iterator[None]:
    """Hold `OUTPUT_DIR/.tokensft.lock` while training (or evaluating, `activity`) into it, so that two processes
    never interleave their checkpoints, generations and results.

    Taken by global rank 0 only (the `RANK` environment variable of torchrun / accelerate; a job's other ranks write
    into the same directory by design). The holder touches the lock every 30 s; a lock whose process is gone (same
    host and PID not running, not touched for 10 minutes on any host, or unreadable) is taken over with a warning. A
    directory this call created and that is still empty on exit is removed again.

    Raises:
        InputError: another live process holds the lock (one line naming its PID and host).
    """
    if int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return
    out = Path(output_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        for attempt in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _lock_holder(path)
                try:
                    age = time.time() - path.stat().st_mtime
                except OSError:
                    age = 0.0
                stale = (holder is None or age > LOCK_STALE_S
                         or (holder.get("host") == me["host"] and not _alive(holder["pid"])))
                if stale and attempt == 0:
                    why = ("unreadable" if holder is None else f"not touched for {age:.0f} s" if age > LOCK_STALE_S
                           else f"its process {holder['pid']} is no longer running")
                    logging.getLogger("tokensft").warning("taking over %s: %s", path, why)
                    path.unlink(missing_ok=True)
                    continue
                who = "another process" if holder is None else f"process {holder['pid']} on {holder.get('host')}"
                raise InputError(f"--output_dir {out} is in use: {who} is {activity} into it ({LOCK_FILE}); wait "
                                 "for it to finish or choose another --output_dir") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    stop = threading.Event()

    def heartbeat() -> None:  # a live holder's lock never looks stale, on any host
        while not stop.wait(LOCK_HEARTBEAT_S):
            try:
                os.utime(path)
            except OSError:
                return

    threading.Thread(target=heartbeat, name="tokensft-lock", daemon=True).start()
    try:
        yield
    finally:
        stop.set()
        if _lock_holder(path) == me:
            path.unlink(missing_ok=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
