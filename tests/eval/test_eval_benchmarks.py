"""Benchmark registry and loaders: field mapping per benchmark, local files, clear errors."""

from __future__ import annotations

import json

import pytest

from tokensft.eval import BENCHMARKS, BenchmarkDataError, load_benchmark
from tokensft.eval.benchmarks import gsm8k_answer


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_registry_names_and_hub_names():
    assert {"math500", "gsm8k", "minerva_math", "olympiadbench", "aime24", "amc23"} <= set(BENCHMARKS)
    assert BENCHMARKS["math500"].hub_name == "HuggingFaceH4/MATH-500"
    assert (BENCHMARKS["gsm8k"].hub_name, BENCHMARKS["gsm8k"].hub_config, BENCHMARKS["gsm8k"].hub_split) == (
        "openai/gsm8k",
        "main",
        "test",
    )


def test_gsm8k_final_line(tmp_path):
    assert gsm8k_answer("She pays 1000 + 234 = <<1000+234=1234>>1234 dollars.\n#### 1,234") == "1234"
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "How many?", "answer": "work <<2*3=6>>6\n#### 1,234"}])
    (p,) = load_benchmark("gsm8k", data=path)
    assert (p.id, p.problem, p.answer) == ("0", "How many?", "1234")


def test_olympiadbench_final_answer_list(tmp_path):
    rows = [
        {"id": 7, "question": "Find x.", "final_answer": ["$\\frac{1}{2 n+2}$"]},
        {"id": 8, "question": "Find both.", "final_answer": ["$3$", "$5$"]},
    ]
    p1, p2 = load_benchmark("olympiadbench", data=_write_jsonl(tmp_path / "o.jsonl", rows))
    assert (p1.id, p1.answer) == ("7", "\\frac{1}{2 n+2}")
    assert p2.answer == "3, 5"


def test_minerva_boxed_solution_and_amc_float(tmp_path):
    m = _write_jsonl(tmp_path / "m.jsonl", [{"problem": "Q", "solution": "so $\\boxed{\\frac{1}{2}}$ cm", "idx": 4}])
    (p,) = load_benchmark("minerva_math", data=m)
    assert (p.id, p.answer) == ("4", "\\frac{1}{2}")
    a = _write_jsonl(tmp_path / "a.jsonl", [{"question": "Q", "answer": 27.0, "id": 0}])
    (p,) = load_benchmark("amc23", data=a)
    assert (p.problem, p.answer) == ("Q", "27")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": \n')
    with pytest.raises(BenchmarkDataError, match=r"bad\.jsonl:2"):
        load_benchmark("math500", data=path)


def test_missing_field_names_field_and_fields_present(tmp_path):
    path = _write_jsonl(tmp_path / "nf.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b", "solution": "x"}])
    with pytest.raises(BenchmarkDataError, match=r"nf\.jsonl:2.*'answer'.*\['problem', 'solution'\]"):
        load_benchmark("math500", data=path)
    path = _write_jsonl(tmp_path / "np.jsonl", [{"text": "a", "answer": "1"}])
    with pytest.raises(BenchmarkDataError, match=r"'problem'.*\['answer', 'text'\]"):
        load_benchmark("math500", data=path)


def test_json_and_parquet_files(tmp_path):
    rows = [{"problem": "p", "answer": "2", "subject": "Algebra", "level": 3, "unique_id": "u1"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (p,) = load_benchmark("math500", data=tmp_path / "d.json")
    assert (p.id, p.subject, p.level) == ("u1", "Algebra", 3)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_benchmark("math500", data=tmp_path / "d.parquet") == [p]


def test_unknown_benchmark_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="known: math500"):
        load_benchmark("mmlu")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_benchmark("math500", data=tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    "name, rows",
    [("math500", 500), ("gsm8k", 1319), ("minerva_math", 272), ("olympiadbench", 675), ("aime24", 30), ("amc23", 40)],
)
def test_shared_local_copies(name, rows, data_dir):
    path = data_dir / BENCHMARKS[name].local_path
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    problems = load_benchmark(name, data=path)
    assert len(problems) == rows
    assert all(p.problem and p.answer for p in problems)
    assert len({p.id for p in problems}) == rows
    assert len(load_benchmark(name, data=path, limit=3)) == 3
    if name == "math500":
        assert problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
        assert problems[0].subject == "Precalculus" and problems[0].level == 2


def test_hub_name_goes_through_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"question": "Q?", "answer": "so\n#### 12"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (p,) = load_benchmark("gsm8k", data="openai/gsm8k")
    assert calls == [("openai/gsm8k", "main", "test")] and p.answer == "12"


def test_hub_failure_says_how_to_use_a_local_file(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"HuggingFaceH4/MATH-500.*--data PATH"):
        load_benchmark("math500", data="HuggingFaceH4/MATH-500")
