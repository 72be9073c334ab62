"""Trace access of the visualizer: the path guard, run discovery, per-token values and step summaries."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from tests.viz.viz_synthetic import KNOWN, KNOWN_PROMPT, known_arrays, make_known_run

from tokensft.viz.data import (
    PathRefusedError,
    RunStore,
    auto_vmax,
    discover_runs,
    metric_key,
    metric_values,
    resolve_inside,
    summarize_step,
    token_records,
)

# ---------------------------------------------------------------------------------------------------------------
# path guard


def test_resolve_inside_accepts_paths_in_a_root(tmp_path):
    root = tmp_path / "run"
    (root / "traces").mkdir(parents=True)
    assert resolve_inside(root, [root]) == root.resolve()
    assert resolve_inside(root / "traces" / "x.json", [root]) == (root / "traces" / "x.json").resolve()
    assert resolve_inside("traces", [root], base=root) == (root / "traces").resolve()
    assert resolve_inside(str(root / "traces" / ".." / "traces"), [root]) == (root / "traces").resolve()


def test_resolve_inside_refuses_escapes(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (tmp_path / "run2").mkdir()
    (tmp_path / "secret.txt").write_text("x")
    for bad in (tmp_path / "secret.txt", root / ".." / "secret.txt", tmp_path / "run2", "/etc/passwd", tmp_path):
        with pytest.raises(PathRefusedError, match="outside the run directories"):
            resolve_inside(bad, [root])
    os.symlink(tmp_path / "secret.txt", root / "link.txt")  # a symlink inside pointing out
    with pytest.raises(PathRefusedError):
        resolve_inside(root / "link.txt", [root])
    with pytest.raises(PathRefusedError):
        resolve_inside("../secret.txt", [root], base=root)
    with pytest.raises(ValueError, match="empty"):
        resolve_inside("  ", [root])
    with pytest.raises(ValueError, match="NUL"):
        resolve_inside("a\x00b", [root])
    # refusal is a PermissionError, so generic handlers treat it as such
    assert issubclass(PathRefusedError, PermissionError)


def test_resolve_inside_several_roots(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert resolve_inside(b / "f", [a, b]) == (b / "f").resolve()


# ---------------------------------------------------------------------------------------------------------------
# store


def test_store_discovers_runs_and_refuses_outside(tmp_path):
    make_known_run(tmp_path / "runs" / "a", steps=(10, 20))
    make_known_run(tmp_path / "runs" / "nested" / "b", steps=(5,))
    (tmp_path / "runs" / "empty").mkdir()
    assert [p.name for p in discover_runs(tmp_path / "runs")] == ["a", "b"]
    store = RunStore([tmp_path / "runs"])
    labels = sorted(r.label for r in store.runs.values())
    assert labels == ["a", "b"]
    key_a = next(k for k, r in store.runs.items() if r.label == "a")
    assert store.steps(key_a) == [10, 20]
    ts = store.load(key_a, 20)
    assert ts.step == 20 and store.load(key_a, 20) is ts  # cached
    with pytest.raises(FileNotFoundError):
        store.load(key_a, 30)
    with pytest.raises(KeyError, match="unknown run"):
        store.run(str(tmp_path))
    with pytest.raises(PathRefusedError):
        store.open_path(str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        store.open_path(str(tmp_path / "runs" / "empty"))


def test_store_open_path_step_file(tmp_path):
    make_known_run(tmp_path / "a", steps=(10, 20))
    store = RunStore([tmp_path / "a"])
    run, step = store.open_path(str(tmp_path / "a" / "traces" / "step_00000020.safetensors"))
    assert step == 20 and run.path == (tmp_path / "a").resolve()
    run, step = store.open_path(str(tmp_path / "a" / "traces"))
    assert step is None and run.path == (tmp_path / "a").resolve()


def test_store_needs_traces(tmp_path):
    with pytest.raises(FileNotFoundError, match="traces"):
        RunStore([tmp_path])
    with pytest.raises(FileNotFoundError, match="not a directory"):
        RunStore([tmp_path / "missing"])


def test_store_sees_new_steps(tmp_path):
    make_known_run(tmp_path / "a", steps=(10,))
    store = RunStore([tmp_path / "a"])
    key = next(iter(store.runs))
    assert store.steps(key) == [10]
    make_known_run(tmp_path / "a", steps=(20,))
    assert store.steps(key) == [10, 20]


# ---------------------------------------------------------------------------------------------------------------
# values


def test_metric_key():
    assert metric_key("alignment", "pos", "all") == ("pos.alignment", None)
    assert metric_key("dot", "pos", "1") == ("pos.layer.dot", 1)
    assert metric_key("norm", "tokloss", "1") == ("tokloss.norm", None)  # no per-layer tokloss
    assert metric_key("p", "tokloss", "1") == ("p", None)
    assert metric_key("weight", scheme="antiop") == ("weight.antiop", None)
    for bad in (("bogus", "pos"), ("alignment", "bogus")):
        with pytest.raises(ValueError):
            metric_key(*bad)
    assert metric_key("weight", scheme="median-floor") == ("weight.median-floor", None)  # any registered scheme
    with pytest.raises(ValueError, match="scheme"):
        metric_key("weight", scheme='bo"gus')


def test_metric_values_known(tmp_path):
    make_known_run(tmp_path / "a", with_tokloss=False)
    store = RunStore([tmp_path / "a"])
    seq = store.load(next(iter(store.runs)), 20).sequences[0]
    p = metric_values(seq, "p")
    assert np.isnan(p[:KNOWN_PROMPT]).all()
    np.testing.assert_array_equal(p[KNOWN_PROMPT:], KNOWN[20]["p"])
    np.testing.assert_array_equal(metric_values(seq, "alignment", "pos", "1")[KNOWN_PROMPT:],
                                  -np.asarray(KNOWN[20]["alignment"]))
    np.testing.assert_array_equal(metric_values(seq, "weight", scheme="lr")[KNOWN_PROMPT:], [1, 0.5, 1.25, 0.125, 2])
    from tokensft.viz.data import MissingDataError

    with pytest.raises(MissingDataError, match="tokloss.alignment"):
        metric_values(seq, "alignment", "tokloss")
    with pytest.raises(MissingDataError, match="no layer 5"):
        metric_values(seq, "alignment", "pos", "5")


def test_token_records_hold_every_value(tmp_path):
    make_known_run(tmp_path / "a")
    store = RunStore([tmp_path / "a"])
    seq = store.load(next(iter(store.runs)), 10).sequences[1]
    recs = token_records(seq, "pos", "0")
    r = recs[KNOWN_PROMPT + 2]
    assert r["role"] == "completion" and r["token"] == " 4" and r["category"] == "number"
    assert r["p"] == 0.25 and r["pos.alignment"] == -1.0 and r["pos[0].alignment"] == -0.5
    assert r["tokloss.alignment"] == -0.25 and r["weight.lr"] == 1.25
    assert recs[0]["role"] == "prompt" and math.isnan(recs[0]["loss"])


def test_auto_vmax():
    assert auto_vmax(np.array([np.nan, -3.0, 2.0])) == 3.0
    assert auto_vmax(np.array([np.nan]), np.zeros(3)) == 1.0
    assert auto_vmax(np.array([0.5]), np.array([-0.75, np.inf])) == 0.75


def test_summarize_step_against_naive_means(tmp_path):
    make_known_run(tmp_path / "a")
    store = RunStore([tmp_path / "a"])
    ts = store.load(next(iter(store.runs)), 20)
    s = summarize_step(ts, "pos", "all")
    # naive: sequence 0 has the KNOWN values, sequence 1 the same with negated alignment
    a0 = np.asarray(KNOWN[20]["alignment"])
    p0 = np.asarray(KNOWN[20]["p"])
    assert s["n_tokens"] == 10
    assert s["all"]["alignment"] == pytest.approx(0.0, abs=1e-7)
    assert s["all"]["p"] == pytest.approx(p0.mean())
    assert s["all"]["loss"] == pytest.approx(np.mean(np.float32(-np.log(p0)).astype(np.float16).astype(float)), rel=1e-3)
    assert s["all"]["affected.topk"] == pytest.approx(0.2)
    assert s["all"]["affected.antiop"] == pytest.approx(0.4)
    assert s["all"]["affected.lr"] == pytest.approx(0.4)
    assert "affected.dft" not in s["all"]  # dft declares no affected-token rule
    assert s["all"]["G_norm"] == pytest.approx(2.0)
    # numbers are tokens 3 and 5 (" 2+2", " 4"): mean p over both sequences = mean(p0[0], p0[2])
    assert s["by_category"]["number"]["p"] == pytest.approx((p0[0] + p0[2]) / 2)
    assert set(s["by_category"]) == {"number", "operator", "punctuation", "special"}
    s1 = summarize_step(ts, "pos", "1")
    assert s1["all"]["G_norm"] == pytest.approx(3.0)
    assert s1["all"]["alignment"] == pytest.approx(0.0, abs=1e-7)
    st = summarize_step(ts, "tokloss", "all")
    assert st["all"]["G_norm"] == pytest.approx(4.0)
    assert st["all"]["norm"] == pytest.approx(2 * np.mean([1.0, 2.0, 0.5, 0.25, 4.0]))
    # arrays of the synthetic trace really are what the test thinks they are
    assert known_arrays(20)["pos.alignment"][KNOWN_PROMPT] == a0[0]
