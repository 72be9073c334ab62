"""On-disk cache of tokenized training sets: a second run on the same rows skips the tokenization.

Tokenizing the 12,000-row MATH train split takes about 20 s on this project's 2-core CPU, paid again by every run of a
sweep. `cached_sft_dataset` keys the result of `tokensft.data.build_sft_dataset` by a SHA-256 over everything that
decides it — the rows themselves (their JSON), the tokenizer (its serialized vocabulary and merges, special tokens and
chat template), every argument, and the source of the `tokensft.data` package (a change to the tokenization code is a
new key) — and stores it with `datasets.Dataset.save_to_disk` (Arrow files, nothing pickled) under
`$TOKENSFT_CACHE/tokenized/<key>/`, written to a temporary folder and renamed, so an entry is whole or absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from ..data import build_sft_dataset
from ..models import cache_dir

__all__ = ["cached_sft_dataset", "dataset_key"]

logger = logging.getLogger("tokensft.data")
CACHE_SUBDIR = "tokenized"
MESSAGES_FILE = "tokensft_messages.json"


class _Recorder(logging.Handler):
    """Keeps the WARNING+ messages of one tokenization, replayed when the cached result is used."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.levelno, record.getMessage()))


def _tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return json.dumps([body, getattr(tokenizer, "chat_template", None), tokenizer.special_tokens_map,
                       type(tokenizer).__name__], sort_keys=True, default=str)


def _code_identity() -> str:
    import tokensft.data as data_pkg

    root = Path(data_pkg.__file__).parent
    return "".join(p.read_text() for p in sorted(root.glob("*.py")))


def dataset_key(records: list[dict], tokenizer, **kwargs) -> str:
    """SHA-256 (hex) of the rows, the tokenizer, the `build_sft_dataset` arguments and the tokenization code."""
    h = hashlib.sha256()
    for part in (json.dumps(records, sort_keys=True, default=str), _tokenizer_identity(tokenizer),
                 json.dumps(kwargs, sort_keys=True, default=str), _code_identity()):
        h.update(hashlib.sha256(part.encode()).digest())
    return h.hexdigest()


def cached_sft_dataset(records: list[dict], tokenizer, *, use_cache: bool = True, **kwargs):
    """`build_sft_dataset(records, tokenizer, **kwargs)`, from the cache when the same rows were tokenized the same
    way before (the cache needs no invalidation: any change is a new key). Errors in the data raise as from
    `build_sft_dataset`, before anything is cached. `use_cache=False` (or `TOKENSFT_NO_DATA_CACHE=1`) tokenizes
    and writes nothing."""
    import datasets

    if not use_cache or os.environ.get("TOKENSFT_NO_DATA_CACHE"):
        return build_sft_dataset(records, tokenizer, **kwargs)
    key = dataset_key(records, tokenizer, **kwargs)
    path = cache_dir() / CACHE_SUBDIR / key
    if (path / "dataset_info.json").exists():
        try:
            ds = datasets.load_from_disk(str(path))
            messages = json.loads((path / MESSAGES_FILE).read_text())
        except (OSError, ValueError, FileNotFoundError):
            shutil.rmtree(path, ignore_errors=True)  # unreadable: tokenize again and replace it
        else:
            for level, text in messages:  # what tokenizing said the first time (rows truncated, dropped)
                logger.log(level, "%s", text)
            logger.info("Tokenized data from the cache (%d rows): %s", len(ds), path)
            return ds
    said = _Recorder()
    logger.addHandler(said)
    try:
        ds = build_sft_dataset(records, tokenizer, **kwargs)
    finally:
        logger.removeHandler(said)
    tmp = path.with_name(f".{key}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        ds.flatten_indices().save_to_disk(str(tmp))
        (tmp / MESSAGES_FILE).write_text(json.dumps(said.messages))
        os.replace(tmp, path)
    except OSError as e:  # a full or read-only disk costs the cache, not the run
        if not path.exists():  # (else another run cached the same rows first)
            logger.warning("could not cache the tokenized data in %s: %s", path, e)
        shutil.rmtree(tmp, ignore_errors=True)
    return ds
