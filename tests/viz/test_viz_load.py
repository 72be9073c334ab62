"""The visualizer under load (127.0.0.1 only, bounded): 200 `/trends` requests from 20 clients, no errors and less
than 50 MB of server memory growth. Latency is reported by benchmarks/bench_viz_load.py, not asserted here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from tests.viz.viz_synthetic import make_known_run

ROOT = Path(__file__).resolve().parents[2]
HAS_GRADIO = importlib.util.find_spec("gradio") is not None and importlib.util.find_spec("gradio_client") is not None


@pytest.mark.skipif(not HAS_GRADIO, reason="needs the [viz] extra (gradio)")
@pytest.mark.timeout(600)
def test_two_hundred_requests_from_twenty_clients(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_viz_load import run_load
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    make_known_run(tmp_path / "runs" / "known")
    res = run_load([str(tmp_path / "runs")], requests=200, clients=20)
    assert res["errors"] == 0, res["first_errors"]
    assert res["ok"] == 200
    assert res["server_rss_mb"]["growth"] < 50, res["server_rss_mb"]


def test_trends_html_is_cached_until_a_trace_file_changes(tmp_path):
    import os

    from tokensft.viz import views
    from tokensft.viz.data import RunStore

    make_known_run(tmp_path / "runs" / "known")
    store = RunStore([tmp_path / "runs"])
    (run,) = [v for _, v in store.choices()]
    a = views.trends_html(store, [run], "p")
    assert a.startswith("<img") and "base64," in a
    assert views.trends_html(store, [run], "p") is a  # the same render, not a new one
    assert views.trends_html(store, [run], "loss") is not a
    path = store.step_path(run, store.steps(run)[0])
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the trace changed on disk
    assert views.trends_html(store, [run], "p") is not a
