"""Tab contents computed from a known trace: token view colours, scheme overlay, table, trends, clustering, compare."""

from __future__ import annotations

import numpy as np
import pytest
from tests.viz.test_viz_render import _bg, _parse
from tests.viz.viz_synthetic import KNOWN, KNOWN_PROMPT, KNOWN_TOKENS, make_known_run

from tokensft.viz import views
from tokensft.viz.colors import NAN_RGB, diverging_rgb
from tokensft.viz.data import RunStore, step_scheme_rules


@pytest.fixture
def store(tmp_path):
    make_known_run(tmp_path / "runs" / "a", mode="sft-topk")
    make_known_run(tmp_path / "runs" / "b", mode="sft", steps=(10, 20, 30), examples=(8, 9), with_tokloss=False,
                   with_proj=False)
    return RunStore([tmp_path / "runs"])


def _key(store, label):
    return next(k for k, r in store.runs.items() if r.label == label)


def test_token_view_colours(store):
    a = _key(store, "a")
    html = views.token_view(store, a, 20, 0, "p")
    spans = _parse(html)
    assert [s["text"] for s in spans] == KNOWN_TOKENS
    assert [_bg(s) for s in spans] == [NAN_RGB] * KNOWN_PROMPT + [diverging_rgb(v, 1.0) for v in KNOWN[20]["p"]]
    assert 'data-vmax="1"' in html and "step 20" in html and "mode sft-topk" in html
    # a fixed scale, a layer, and the weight of a scheme
    spans = _parse(views.token_view(store, a, 20, 1, "alignment", "pos", "1", vmax=4.0))
    want = np.asarray(KNOWN[20]["alignment"])  # sequence 1 negates, layer 1 negates again
    assert [_bg(s) for s in spans[KNOWN_PROMPT:]] == [diverging_rgb(v, 4.0) for v in want]
    spans = _parse(views.token_view(store, a, 10, 0, "weight", scheme="lr"))
    assert [s["data-value"] for s in spans[KNOWN_PROMPT:]] == ["1", "0.5", "1.25", "0.125", "2"]
    assert _bg(spans[-1]) == "rgb(202, 0, 32)"  # 2 = the auto vmax


def test_token_view_reports_missing_data(store):
    b = _key(store, "b")
    html = views.token_view(store, b, 20, 0, "alignment", "tokloss")
    assert 'class="tsft-msg"' in html and "tokloss.alignment" in html and "span class=\"tok" not in html
    assert "no trace for step 40" in views.token_view(store, b, 40, 0, "p")
    assert "no sequence 5" in views.token_view(store, b, 20, 5, "p")


def test_scheme_overlay(store):
    a = _key(store, "a")
    ts = store.load(a, 20)
    seq = views.find_sequence(ts, 0)
    rules = step_scheme_rules(ts)  # the synthetic metadata declares no rules: the registry's, by trace key
    assert {k: r["affects"] for k, r in rules.items()} == {"dft": None, "topk": "zero", "antiop": "below_one",
                                                           "lr": "below_one"}
    np.testing.assert_array_equal(views.scheme_flags(seq, "topk", rules)[KNOWN_PROMPT:], [0, 0, 0, 1, 0])
    np.testing.assert_array_equal(views.scheme_flags(seq, "antiop", rules)[KNOWN_PROMPT:], [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(views.scheme_flags(seq, "lr", rules)[KNOWN_PROMPT:], [0, 1, 0, 1, 0])
    assert not views.scheme_flags(seq, "topk", rules)[:KNOWN_PROMPT].any()
    rows = {r["scheme"]: r for r in views.overlay_rows(seq, rules)}
    assert set(rows) == {"sft-topk", "sft-antiop", "sft-lr"}  # dft declares no rule
    al = np.asarray(KNOWN[20]["alignment"])
    assert rows["sft-topk"]["affected"] == "1 / 5"
    assert rows["sft-topk"]["align_affected"] == pytest.approx(al[3])
    assert rows["sft-topk"]["align_rest"] == pytest.approx(np.delete(al, 3).mean())
    assert rows["sft-antiop"]["align_affected"] == pytest.approx(al[[1, 3]].mean())
    html = views.overlay_view(store, a, 20, 0)
    for s, marked in (("topk", [3]), ("antiop", [1, 3]), ("lr", [1, 3])):
        part = html.split(f'data-scheme="{s}"')[1].split("</div></div>")[0]
        spans = _parse(part)  # completion tokens only
        assert [int(sp["data-index"]) for sp in spans] == list(range(KNOWN_PROMPT, len(KNOWN_TOKENS)))
        assert [int(sp["data-index"]) - KNOWN_PROMPT for sp in spans if "mark" in sp["class"].split()] == marked
        assert [_bg(sp) for sp in spans] == [diverging_rgb(v, 1.0) for v in al]


def test_token_table(store):
    a = _key(store, "a")
    df = views.token_table(store, a, 20, 0, "pos", "0", completion_only=True)
    assert list(df["t"]) == list(range(KNOWN_PROMPT, len(KNOWN_TOKENS)))
    np.testing.assert_allclose(df["p"], KNOWN[20]["p"])
    np.testing.assert_allclose(df["pos[0].alignment"], np.asarray(KNOWN[20]["alignment"]) / 2)
    assert {"loss", "entropy", "pos.dot", "tokloss.norm", "weight.antiop"} <= set(df.columns)
    full = views.token_table(store, a, 20, 0)
    assert len(full) == len(KNOWN_TOKENS) and full["role"].iloc[0] == "prompt"
    # sortable: sorting by p orders the tokens by their known p
    order = full.sort_values("p", na_position="last")["t"].tolist()[:5]
    assert order == [KNOWN_PROMPT + i for i in np.argsort(KNOWN[20]["p"])]


def test_trends(store):
    a, b = _key(store, "a"), _key(store, "b")
    df = views.trends_data(store, [a, b])
    alld = df[df["category"] == "all"]
    assert alld.groupby("run")["step"].apply(list).to_dict() == {"a": [10, 20], "b": [10, 20, 30]}
    row = alld[(alld["run"] == "a") & (alld["step"] == 10)].iloc[0]
    assert row["p"] == pytest.approx(np.mean(KNOWN[10]["p"]))
    assert row["affected.topk"] == pytest.approx(0.2)
    fig = views.trends_figure(store, [a, b], "p")
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["a", "b"]
    np.testing.assert_allclose(lines[0].get_ydata(), [np.mean(KNOWN[10]["p"]), np.mean(KNOWN[20]["p"])])
    fig = views.trends_figure(store, [a], "p", by_category=True)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["a · number", "a · operator", "a · punctuation", "a · special"]


def test_clustering(store):
    a, b = _key(store, "a"), _key(store, "b")
    fig, note = views.cluster_figure(store, a, 20, None, "tokloss", color_by="category")
    assert fig is not None and "10 completion tokens" in note and "tokloss.grad_proj" in note
    n_points = sum(len(c.get_offsets()) for c in fig.axes[0].collections)
    assert n_points == 10
    fig, note = views.cluster_figure(store, a, 20, 0, "pos", "1", color_by="alignment")
    assert fig is not None and "pos.1.dy_proj" in note
    fig, note = views.cluster_figure(store, b, 20, None)
    assert fig is None and "no gradient projections" in note


def test_compare(store):
    a, b = _key(store, "a"), _key(store, "b")
    assert views.common_examples(store, a, 20, b, 30) == [8]
    html = views.compare_view(store, a, 20, b, 30, 8, "p")
    left, right = html.split('data-side="a"')[1].split('data-side="b"')
    sl, sr = _parse(left), _parse(right)
    # example 8 is sequence 1 of run a and sequence 0 of run b; p is the same known values, one shared scale
    assert [_bg(s) for s in sl[KNOWN_PROMPT:]] == [diverging_rgb(v, 1.0) for v in KNOWN[20]["p"]]
    assert [_bg(s) for s in sr[KNOWN_PROMPT:]] == [diverging_rgb(v, 1.0) for v in KNOWN[20]["p"]]
    assert "did not trace example 7" in views.compare_view(store, a, 20, b, 30, 7, "p")


def test_a_registered_scheme_recorded_in_the_trace_is_listed_and_overlaid(store):
    """The tracer overlays every registered scheme as `weight.<key>`; the visualizer lists whatever the trace has."""
    from tokensft.viz.data import sequence_schemes, summarize_step

    a = _key(store, "a")
    ts = store.load(a, 20)
    seq = views.find_sequence(ts, 0)
    T = len(seq.tokens)
    w = np.ones(T, np.float32)
    w[KNOWN_PROMPT + 2] = 0.5  # the third completion token is down-weighted by the user's scheme
    seq.arrays["weight.median-floor"] = w
    seq.arrays['weight.bad"key'] = w  # never rendered: not a valid scheme key
    assert sequence_schemes(seq)[-1] == "median-floor" and 'bad"key' not in sequence_schemes(seq)
    rules = step_scheme_rules(ts)  # not registered: the default rule, below_one
    assert rules["median-floor"] == {"name": "median-floor", "affects": "below_one", "label": "median-floor down-weights"}
    np.testing.assert_array_equal(views.scheme_flags(seq, "median-floor", rules)[KNOWN_PROMPT:], [0, 0, 1, 0, 0])
    rows = {r["scheme"]: r for r in views.overlay_rows(seq, rules)}
    assert rows["median-floor"]["affected"] == "1 / 5"
    assert rows["median-floor"]["align_affected"] == pytest.approx(KNOWN[20]["alignment"][2])
    html = views.overlay_view(store, a, 20, 0)
    assert 'data-scheme="median-floor"' in html and "bad&quot;key" not in html and 'bad"key' not in html
    # only sequence 0 records it: the mean over its 5 completion tokens, (4 + 0.5) / 5
    assert summarize_step(ts)["all"]["weight.median-floor"] == pytest.approx(0.9)
