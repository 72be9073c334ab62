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


def test_non_utf8_data_names_file_and_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(DataFileError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_records(p)
    q = tmp_path / "latin1.json"
    q.write_bytes(b'[\n{"prompt": "a"},\n{"prompt": "caf\xe9"}\n]')
    with pytest.raises(DataFileError, match=r"latin1.json:3: not UTF-8 text"):
        load_records(q)


def test_row_location_is_the_line_an_editor_shows(tmp_path):
    from tokensft.data.loading import row_location

    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3}\n')  # a blank line: row 1 is on line 3
    assert [r["a"] for r in load_records(p)] == [1, 2, 3]
    assert row_location(str(p), 0) == f"{p}:1" and row_location(str(p), 2) == f"{p}:4"
    assert row_location("openai/gsm8k", 3) == "openai/gsm8k row 4" and row_location(None, 0) == "row 1"


def test_empty_file_and_empty_completions_are_named(tmp_path, caplog):
    from tests.conftest import tiny_tokenizer

    from tokensft.data import build_sft_dataset

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty.jsonl: no rows .*the file is empty"):
        build_sft_dataset(load_records(empty), tiny_tokenizer(), preset="prompt_completion", template="plain",
                          source=str(empty))
    p = tmp_path / "d.jsonl"
    rows = [{"prompt": "w1", "completion": " " if i in (1, 4, 5, 6) else "w2 w3"} for i in range(8)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING", logger="tokensft.data"):
        ds = build_sft_dataset(load_records(p), tiny_tokenizer(), preset="prompt_completion", template="plain",
                               source=str(p))
    assert len(ds) == 4
    assert f"Dropped 4 of 8 rows with an empty completion: {p}:2, {p}:5, {p}:6, ..." in caplog.text
