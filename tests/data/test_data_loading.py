"""load_records: JSONL / JSON / parquet / directories / hub, and clear errors naming file and line."""

from __future__ import annotations

import json

import pytest

from tokensft.data import DataFileError, load_records

ROWS = [{"problem": f"p{i}", "solution": f"s{i}"} for i in range(50)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_jsonl_roundtrip_limit_and_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in ROWS[1:]), encoding="utf-8")
    assert load_records(str(path)) == ROWS
    assert load_records(str(path), limit=3) == ROWS[:3]
    assert load_records(str(path), limit=0) == []


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in ROWS[:40]]
    lines[36] = '{"problem": "p36", "solution": '  # line 37 is cut short
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_records(str(path))
    assert isinstance(err.value, DataFileError)
    assert f"{path}:37:" in str(err.value) and "line 37" in str(err.value)
    # a line that is valid JSON but not an object
    lines[36] = "[1, 2]"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"bad\.jsonl:37: expected a JSON object"):
        load_records(str(path))


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(FileNotFoundError, match="nope/train.jsonl"):
        load_records(str(missing))
    with pytest.raises(FileNotFoundError, match=r"\./definitely_missing_dir/x"):
        load_records("./definitely_missing_dir/x")


def test_json_list_data_key_and_json_lines(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS, "version": 1}), encoding="utf-8")
    _write_jsonl(tmp_path / "c.json", ROWS)
    for name in ("a.json", "b.json", "c.json"):
        assert load_records(str(tmp_path / name)) == ROWS, name
    assert load_records(str(tmp_path / "b.json"), limit=2) == ROWS[:2]
    (tmp_path / "d.json").write_text(json.dumps({"x": 1}), encoding="utf-8")
    with pytest.raises(DataFileError, match=r"d\.json: expected a JSON list"):
        load_records(str(tmp_path / "d.json"))
    (tmp_path / "e.json").write_text('[\n{"a": 1},\n{"a": \n', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"e\.json:\d+: invalid JSON"):
        load_records(str(tmp_path / "e.json"))


def test_parquet_and_directory_with_split(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "test.parquet")
    assert load_records(str(tmp_path / "test.parquet"), limit=5) == ROWS[:5]
    _write_jsonl(tmp_path / "train.jsonl", ROWS[:4])
    assert load_records(str(tmp_path)) == ROWS[:4]  # split="train" → train.jsonl
    assert load_records(str(tmp_path), split="test") == ROWS  # → test.parquet
    with pytest.raises(FileNotFoundError, match="validation"):
        load_records(str(tmp_path), split="validation")


def test_hub_name_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_records("openai/gsm8k", hub_config="main", split="test", limit=3) == ROWS[:3]
    assert calls == [("openai/gsm8k", "main", "test")]

    def failing(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(RuntimeError, match="openai/gsm8k.*local"):
        load_records("openai/gsm8k")


def test_shared_files(shared_data):
    path = shared_data / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    rows = load_records(str(path), limit=5)
    assert len(rows) == 5 and set(rows[0]) == {"question", "answer"}
    assert load_records(str(shared_data / "gsm8k"), split="test", limit=2)[0]["question"].startswith("Janet")


def test_builtin_arithmetic():
    from tokensft.data import generate_arithmetic

    assert load_records("builtin:arithmetic", limit=7, seed=3) == generate_arithmetic(7, seed=3)
    assert load_records("builtin:arithmetic", split="test", limit=2) == generate_arithmetic(2, split="test")
    with pytest.raises(ValueError, match="builtin:arithmetic"):
        load_records("builtin:nope")
