"""Outputs on disk: resume after a crash (torn last line), truncation accounting, atomic metrics."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tokensft.eval import Sample, evaluate, regrade
from tokensft.eval.records import GenerationsFileError, read_generations

PROBLEMS = [
    {"problem": "What is 1+1?", "answer": "2", "subject": "Algebra", "level": 1, "unique_id": "p1"},
    {"problem": "What is 2+3?", "answer": "5", "subject": "Algebra", "level": 2, "unique_id": "p2"},
    {"problem": "What is 3*3?", "answer": "9", "subject": "Number Theory", "level": 2, "unique_id": "p3"},
]
# A tokenizer stand-in: no chat template (plain prompts), EOS id 0.
STUB_TOKENIZER = SimpleNamespace(chat_template=None, eos_token_id=0, added_tokens_decoder={})


class FakeBackend:
    """Answers each problem with a scripted (text, finish_reason); records every prompt it is asked for."""

    name = "fake"

    def __init__(self, script: dict[str, tuple[str, str]]):
        self.script = script
        self.prompts: list[str] = []

    def generate(self, prompts, *, n, max_new_tokens, temperature, top_p, seed):
        self.prompts += prompts
        out = []
        for prompt in prompts:
            key = next(k for k in self.script if k in prompt)
            text, finish = self.script[key]
            out.append([Sample(text, finish, max_new_tokens if finish == "length" else 7)] * n)
        return out


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROBLEMS))
    return path


def _run(data_file, out_dir, backend, **kw):
    return evaluate(
        "fake-model",
        tokenizer=STUB_TOKENIZER,
        backend=backend,
        data=data_file,
        output_dir=out_dir,
        batch_size=2,
        max_new_tokens=32,
        progress=False,
        **kw,
    )


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_truncated_outputs_are_counted_and_scored_wrong(data_file, tmp_path):
    backend = FakeBackend(
        {
            "1+1": ("So $\\boxed{2}$.", "stop"),
            "2+3": ("So $\\boxed{5}$ and then I keep talk", "length"),  # right answer, but cut off
            "3*3": ("Let me think about this for a very lo", "length"),
        }
    )
    m = _run(data_file, tmp_path / "out", backend)
    assert m["num_truncated"] == 2
    assert round(m["truncation_rate"], 3) == 0.667
    assert m["accuracy"] == pytest.approx(1 / 3)
    recs = _lines(tmp_path / "out" / "generations.jsonl")
    assert [r["finish_reason"] for r in recs] == ["stop", "length", "length"]
    assert [r["correct"] for r in recs] == [True, False, False]
    assert recs[1]["extracted_answer"] == "5"  # extracted, yet scored wrong because truncated
    assert m["per_subject"]["Algebra"]["accuracy"] == 0.5
    assert m["per_level"]["2"] == {"accuracy": 0.0, "num_problems": 2}


def test_resume_repairs_torn_line_without_duplicates(data_file, tmp_path):
    script = {"1+1": ("\\boxed{2}", "stop"), "2+3": ("\\boxed{5}", "stop"), "3*3": ("\\boxed{9}", "stop")}
    out = tmp_path / "out"
    _run(data_file, out, FakeBackend(script))
    gen = out / "generations.jsonl"
    lines = gen.read_text().splitlines(keepends=True)
    assert len(lines) == 3
    gen.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])  # crash in the middle of the 3rd line

    backend = FakeBackend(script)
    m = _run(data_file, out, backend)
    assert len(backend.prompts) == 1 and "3*3" in backend.prompts[0]  # only the torn problem is regenerated
    recs = _lines(gen)
    assert [r["id"] for r in recs] == ["p1", "p2", "p3"]
    assert gen.read_text().endswith("\n")
    assert m["num_problems"] == 3 and m["accuracy"] == 1.0 and m["complete"] is True

    # the token count is that of the completions kept (exact after any resume); the timed tokens behind tokens/s add
    # up over the sessions: 3 problems, then the torn one again
    assert m["generated_tokens"] == 3 * 7 and m["timed_tokens"] == 3 * 7 + 7

    again = FakeBackend(script)
    m2 = _run(data_file, out, again)  # everything done: nothing generated, nothing appended
    assert again.prompts == [] and len(_lines(gen)) == 3
    assert m2["generated_tokens"] == m["generated_tokens"] and m2["tokens_per_s"] == m["tokens_per_s"]


def test_generated_tokens_count_every_session_even_one_killed_before_its_metrics(data_file, tmp_path):
    """A session killed after appending its generations but before writing metrics.json: the resumed run's
    generated_tokens still counts every completion in generations.jsonl (3 problems × 7 tokens), not only its own."""
    script = {"1+1": ("\\boxed{2}", "stop"), "2+3": ("\\boxed{5}", "stop"), "3*3": ("\\boxed{9}", "stop")}
    out = tmp_path / "out"
    _run(data_file, out, FakeBackend(script), limit=2)
    (out / "metrics.json").unlink()  # the kill came between the generations and the metrics
    m = _run(data_file, out, FakeBackend(script))
    assert m["num_problems"] == 3 and m["generated_tokens"] == 3 * 7


def test_resume_with_other_settings_is_refused(data_file, tmp_path):
    script = {"1+1": ("\\boxed{2}", "stop"), "2+3": ("\\boxed{5}", "stop"), "3*3": ("\\boxed{9}", "stop")}
    _run(data_file, tmp_path / "out", FakeBackend(script), limit=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        evaluate(
            "fake-model",
            tokenizer=STUB_TOKENIZER,
            backend=FakeBackend(script),
            data=data_file,
            output_dir=tmp_path / "out",
            max_new_tokens=64,
            progress=False,
        )


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "generations.jsonl"
    path.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(GenerationsFileError, match=r"generations\.jsonl:2"):
        read_generations(path)


def test_valid_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "generations.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}')
    assert list(read_generations(path)) == ["a", "b"]
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'


def test_n_samples_written_as_lists(data_file, tmp_path):
    script = {"1+1": ("\\boxed{2}", "stop"), "2+3": ("\\boxed{4}", "stop"), "3*3": ("\\boxed{9}", "length")}
    m = _run(data_file, tmp_path / "out", FakeBackend(script), n=3, temperature=0.7)
    rec = _lines(tmp_path / "out" / "generations.jsonl")[0]
    assert rec["correct"] == [True] * 3 and rec["finish_reason"] == ["stop"] * 3 and len(rec["completion"]) == 3
    assert m["pass_at_k"] == {"1": pytest.approx(1 / 3), "2": pytest.approx(1 / 3), "3": pytest.approx(1 / 3)}
    assert m["n"] == 3 and m["num_samples"] == 9


def test_invalid_settings():
    with pytest.raises(ValueError, match="temperature > 0"):
        evaluate("m", tokenizer=STUB_TOKENIZER, backend=FakeBackend({}), n=4, temperature=0.0)


def test_regrade_rewrites_correctness(data_file, tmp_path):
    script = {"1+1": ("\\boxed{2}", "stop"), "2+3": ("\\boxed{5}", "stop"), "3*3": ("\\boxed{9}", "length")}
    out = tmp_path / "out"
    _run(data_file, out, FakeBackend(script))
    gen = out / "generations.jsonl"
    recs = _lines(gen)
    recs[0]["correct"] = False  # as if graded by an older, buggier grader
    gen.write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = regrade(out)
    assert [r["correct"] for r in _lines(gen)] == [True, True, False]  # truncated stays wrong
    assert m["accuracy"] == pytest.approx(2 / 3) and m["model"] == "fake-model" and "regraded_at" in m
    assert json.loads((out / "metrics.json").read_text()) == m


class KilledAfterFirst(FakeBackend):
    """A streaming backend killed mid-batch: reports the first prompt as done, then the process dies."""

    streams_done = True

    def generate(self, prompts, *, n, max_new_tokens, temperature, top_p, seed, on_done):
        out = super().generate(prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               seed=seed)
        on_done(1, out[1])  # batch_size 2: the batch is p1, p2; p2 stopped first
        raise KeyboardInterrupt  # the kill, before the rest of the batch is done


def test_a_kill_mid_batch_keeps_the_problems_already_done(data_file, tmp_path):
    script = {"1+1": ("\\boxed{2}", "stop"), "2+3": ("\\boxed{5}", "stop"), "3*3": ("\\boxed{9}", "stop")}
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(data_file, out, KilledAfterFirst(script))
    assert [r["id"] for r in _lines(out / "generations.jsonl")] == ["p2"]  # written the moment it was done
    again = FakeBackend(script)
    m = _run(data_file, out, again)
    assert len(again.prompts) == 2 and not any("2+3" in p for p in again.prompts)  # p1 and p3 only
    assert m["num_problems"] == 3 and m["accuracy"] == 1.0


def test_every_append_only_jsonl_cuts_a_torn_last_line_first(tmp_path):
    """Issue 31, item 3: a torn last line of `traces/manifest.jsonl` was never cut, so the next append was glued onto
    it and that entry stayed unreadable. Both append-only files (generations, manifest) go through `append_jsonl`."""
    import warnings

    import numpy as np

    from tokensft.io import append_jsonl, cut_to_last_line
    from tokensft.tracing.schema import MANIFEST, TRACE_DIR, read_manifest, write_trace_step

    p = tmp_path / "g.jsonl"
    assert cut_to_last_line(p) == 0  # missing: nothing to do
    append_jsonl(p, [{"id": "a"}, {"id": "b"}])
    with open(p, "a") as f:
        f.write('{"id": "c", "compl')  # a kill mid-write
    append_jsonl(p, [{"id": "d"}])
    assert [json.loads(line)["id"] for line in p.read_text().splitlines()] == ["a", "b", "d"]
    p.write_bytes(b'{"id": "only-torn"')
    assert cut_to_last_line(p) == len(b'{"id": "only-torn"') and p.read_bytes() == b""
    arrays = {"tokloss_dot": np.ones(3, dtype=np.float32)}
    write_trace_step(tmp_path, 1, {"sequences": []}, arrays)
    with open(tmp_path / TRACE_DIR / MANIFEST, "a") as f:
        f.write('{"step": 2, "file": "ste')
    write_trace_step(tmp_path, 3, {"sequences": []}, arrays)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unreadable line left to skip
        assert [e["step"] for e in read_manifest(tmp_path)] == [1, 3]


def test_a_second_eval_into_a_directory_in_use_is_refused_and_the_lock_is_released(data_file, tmp_path):
    """Issue 31, item 3: two evaluations into one --output_dir interleaved their generations.jsonl appends."""
    from tokensft.io import LOCK_FILE, InputError, dir_lock

    out = tmp_path / "ev"
    script = {p["problem"]: (f"\\boxed{{{p['answer']}}}", "stop") for p in PROBLEMS}
    with dir_lock(out, activity="evaluating"):  # another evaluation holds it
        with pytest.raises(InputError, match=r"is in use: process \d+ on .* is evaluating into it"):
            _run(data_file, out, FakeBackend(script))
        assert not (out / "generations.jsonl").exists()
    metrics = _run(data_file, out, FakeBackend(script))
    assert metrics["complete"] and metrics["accuracy"] == 1.0 and not (out / LOCK_FILE).exists()
