"""The tokenized-data cache: a second run on the same rows reads the same dataset without tokenizing, any change
to the rows, the arguments or the tokenizer is a new entry, and what tokenizing warned about is said again."""

from __future__ import annotations

import logging

import pytest
from tests.conftest import tiny_tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TOKENSFT_NO_DATA_CACHE", raising=False)
    import tokensft.trainer.data_cache as dc

    calls = []
    real = dc.build_sft_dataset

    def counting(*a, **k):
        calls.append(k.get("max_length"))
        return real(*a, **k)
    monkeypatch.setattr(dc, "build_sft_dataset", counting)
    return dc, calls, tmp_path / "cache" / dc.CACHE_SUBDIR


def _rows(n=6, words=8):
    return [{"prompt": " ".join(f"w{(i + j) % 50}" for j in range(4)),
             "completion": " ".join(f"w{(3 * i + j) % 50}" for j in range(words))} for i in range(n)]


def test_second_run_reads_the_cache_and_equals_a_fresh_build(cache, caplog):
    dc, calls, root = cache
    tok = tiny_tokenizer()
    kw = dict(template="plain", max_length=10, preset=None, instruction=None)
    with caplog.at_level(logging.WARNING, logger="tokensft.data"):
        first = dc.cached_sft_dataset(_rows(), tok, **kw)
    said_first = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("Truncated" in m for m in said_first)  # max_length 10 cuts these rows
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokensft.data"):
        second = dc.cached_sft_dataset(_rows(), tok, **kw)
    assert calls == [10]  # tokenized once
    assert second.to_list() == first.to_list() and len(second) == 6
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == said_first
    assert [p.name for p in root.iterdir()] == [dc.dataset_key(_rows(), tok, **kw)]  # one entry, no temp left

    changed = _rows()
    changed[2]["completion"] += " w1"
    dc.cached_sft_dataset(changed, tok, **kw)
    dc.cached_sft_dataset(_rows(), tok, **{**kw, "max_length": 12})
    other_tok = tiny_tokenizer()
    other_tok.chat_template = "{{ messages }}"
    dc.cached_sft_dataset(_rows(), other_tok, **kw)
    assert calls == [10, 10, 12, 10] and len(list(root.iterdir())) == 4


def test_bad_rows_raise_and_cache_nothing(cache):
    dc, calls, root = cache
    with pytest.raises(ValueError):
        dc.cached_sft_dataset([{"prompt": "w1", "completion": "   "}], tiny_tokenizer(), template="plain",
                              max_length=10, instruction=None)
    assert not root.exists() or list(root.iterdir()) == []
