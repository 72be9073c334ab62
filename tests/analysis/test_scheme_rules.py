"""The affected-token rule is declared once on the scheme (`register_scheme(affects=...)`), written into the trace
metadata by the tracer, and read from there by the analysis (headline rows, scheme agreement) and the visualizer
(Trends list, overlay); old traces without it fall back to the registry, then to `below_one`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.analysis.synth import write_step
from tokensft.analysis.load import load_run
from tokensft.analysis.summary import BASE_HEADLINE_ROWS, compute_summary, summary_headline_rows
from tokensft.losses import register_scheme

TOKENS = ["<|im_start|>", " 1", " +", " 2", " =", " 3"]
ALIGN = [math.nan, -0.5, -0.2, 0.3, 0.4, 0.1]  # tokens 1, 2 oppose; 3, 4, 5 are aligned
DROPHI = [math.nan, 0.0, 0.5, 0.0, 1.0, 0.5]  # "zero": 1 and 3 affected; "below_one" would also count 2 and 5
DROPHI_RULE = {"name": "drop-high", "affects": "zero", "label": "drop-high drops"}


def _seq(**weights):
    return {"tokens": TOKENS, "is_completion": [0, 1, 1, 1, 1, 1], "loss": [math.nan, 1, 2, 3, 4, 5],
            "pos.alignment": ALIGN, "pos.norm": [1.0] * 6, "pos.G_norm": [1.0],
            **{f"weight.{k}": v for k, v in weights.items()}}


def _drop_high(ctx):
    """0 for tokens above the median loss, 0.5 for the others: 'zero' and 'below_one' disagree on this scheme."""
    med = ctx.losses[ctx.mask].median()
    return torch.where(ctx.losses > med, torch.zeros_like(ctx.losses), torch.full_like(ctx.losses, 0.5))


def test_headline_rows_use_the_rule_in_the_metadata(tmp_path):
    schemes = {"drophi": {"mode": "drop-high", "affects": "zero", "affects_label": "drop-high drops"},
               "dft": {"mode": "dft", "affects": None, "affects_label": "dft down-weights"}}
    write_step(tmp_path, 1, [_seq(drophi=DROPHI, dft=[math.nan, 0.5, 0.5, 0.5, 0.5, 0.5])], schemes=schemes)
    data = load_run(tmp_path, progress=False)
    assert data.scheme_rules == {"drophi": DROPHI_RULE,
                                 "dft": {"name": "dft", "affects": None, "label": "dft down-weights"}}
    s = compute_summary(data)
    rows = summary_headline_rows(s)
    assert rows[: len(BASE_HEADLINE_ROWS)] == BASE_HEADLINE_ROWS
    assert rows[len(BASE_HEADLINE_ROWS):] == [("drophi_opposing_hit", "drop-high drops: share of opposing"),
                                              ("drophi_aligned_hit", "drop-high drops: share of aligned")]  # no dft
    h = s["headline"]["pos"]
    assert h["drophi_opposing_hit"] == pytest.approx(1 / 2)  # opposing 1, 2: weight 0 at 1 only
    assert h["drophi_aligned_hit"] == pytest.approx(1 / 3)  # aligned 3, 4, 5: weight 0 at 3 only
    assert "dft_opposing_hit" not in h
    assert list(s["scheme_agreement"]["pos"]) == ["drophi"]
    assert s["scheme_agreement"]["pos"]["drophi"]["n_hit"] == 2


def test_old_metadata_falls_back_to_the_registry_then_below_one(tmp_path):
    """A trace whose metadata declares no rule: a registered trace key takes its scheme's declaration (a user scheme
    registered here, and the built-in topk), an unknown one the default `below_one`."""
    register_scheme("drop-high", _drop_high, trace_key="drophi", affects="zero", affects_label="drop-high drops")
    topk = [math.nan, 0.0, 1.0, 1.0, 0.0, 1.0]
    write_step(tmp_path, 1, [_seq(drophi=DROPHI, mystery=DROPHI, topk=topk)])  # no `schemes` in the metadata
    data = load_run(tmp_path, progress=False)
    rules = data.scheme_rules
    assert rules["drophi"] == DROPHI_RULE
    assert rules["topk"] == {"name": "sft-topk", "affects": "zero", "label": "sft-topk drops"}
    assert rules["mystery"] == {"name": "mystery", "affects": "below_one", "label": "mystery down-weights"}
    h = compute_summary(data)["headline"]["pos"]
    assert (h["drophi_opposing_hit"], h["drophi_aligned_hit"]) == pytest.approx((1 / 2, 1 / 3))
    assert (h["mystery_opposing_hit"], h["mystery_aligned_hit"]) == pytest.approx((2 / 2, 2 / 3))  # w < 1: 1, 2, 3, 5
    assert (h["topk_opposing_hit"], h["topk_aligned_hit"]) == pytest.approx((1 / 2, 1 / 3))
    # metadata `schemes` entries written before the rule was recorded fall back the same way
    write_step(tmp_path / "b", 1, [_seq(drophi=DROPHI)], schemes={"drophi": {"mode": "drop-high", "params": {}}})
    assert load_run(tmp_path / "b", progress=False).scheme_rules == {"drophi": DROPHI_RULE}


def test_the_visualizer_lists_and_counts_the_declared_rule(tmp_path):
    from tokensft.viz import views
    from tokensft.viz.data import RunStore

    schemes = {"drophi": {"mode": "drop-high", "affects": "zero", "affects_label": "drop-high drops",
                          "description": "drop the tokens above the median loss"}}
    write_step(tmp_path / "run", 1, [_seq(drophi=DROPHI)], schemes=schemes)
    store = RunStore([tmp_path / "run"])
    run = next(iter(store.runs))
    rules = views.runs_scheme_rules(store, [run])
    assert rules == {"drophi": DROPHI_RULE}
    metrics = views.trend_metrics(rules)
    assert metrics["affected.drophi"] == "fraction affected: drop-high drops (weight = 0)"
    assert metrics["weight.drophi"] == "mean weight of drop-high"
    assert set(views.TREND_METRICS) < set(metrics)
    row = views.trends_data(store, [run]).query("category == 'all'").iloc[0]
    assert row["affected.drophi"] == pytest.approx(2 / 5)  # tokens 1 and 3 of the 5 completion tokens
    assert row["weight.drophi"] == pytest.approx(np.mean([0.0, 0.5, 0.0, 1.0, 0.5]))
    html = views.overlay_view(store, run, 1, 0)
    assert "drop-high drops" in html and "weight = 0" in html and "above the median loss" in html
    assert views.overlay_rows(store.load(run, 1).sequences[0], rules)[0]["affected"] == "2 / 5"


def test_tracer_writes_each_traced_schemes_rule_and_the_analysis_reads_it(tmp_path):
    from tests.conftest import tiny_rows, tiny_tokenizer
    from tests.tracing.conftest import lora_model
    from tokensft.tracing.callback import TokenGradTraceCallback
    from tokensft.tracing.config import TraceConfig
    from tokensft.tracing.schema import read_trace_step

    register_scheme("drop-high", _drop_high, trace_key="drophi", affects="zero", affects_label="drop-high drops")
    cb = TokenGradTraceCallback(TraceConfig(trace_every_n_steps=1, trace_num_sequences=4), tiny_rows(8, seed=1),
                                tiny_tokenizer(), output_dir=str(tmp_path))
    cb.maybe_trace(1, lora_model(0))
    ts = read_trace_step(tmp_path / "traces" / "step_00000001.safetensors")
    declared = ts.meta["schemes"]
    assert (declared["drophi"]["affects"], declared["drophi"]["affects_label"]) == ("zero", "drop-high drops")
    assert (declared["topk"]["affects"], declared["antiop"]["affects"], declared["dft"]["affects"]) == (
        "zero", "below_one", None)
    data = load_run(tmp_path, progress=False)
    assert data.scheme_rules["drophi"] == DROPHI_RULE
    w = data.weight["drophi"]
    assert set(np.unique(w[np.isfinite(w)]).tolist()) == {0.0, 0.5}  # every token below 1, half of them 0
    s = compute_summary(data)
    labels = dict(summary_headline_rows(s))
    assert labels["drophi_opposing_hit"] == "drop-high drops: share of opposing"
    for q in s["run"]["quantities"]:
        a = data.alignment[q]
        sel = data.completion & np.isfinite(a) & np.isfinite(w)
        opp = a[sel] < 0
        hit = w[sel] == 0  # the "zero" rule; "below_one" would hit every token (share 1)
        assert 0 < opp.sum() < sel.sum()
        assert s["headline"][q]["drophi_opposing_hit"] == pytest.approx(hit[opp].mean())
        assert s["headline"][q]["drophi_aligned_hit"] == pytest.approx(hit[~opp].mean())
        assert s["headline"][q]["drophi_aligned_hit"] < 1


def test_printed_table_report_compare_and_figure_16_read_the_rule(tmp_path, capsys):
    """`tokensft trace analyze`'s table, the report, `compare` and figure 16 label a user scheme's rows with the label
    its metadata declares; `compare` lists the union of the runs' schemes, a run without one shows "—"."""
    import matplotlib

    matplotlib.use("Agg")
    from tokensft.analysis.compare import comparison_table
    from tokensft.analysis.figures import draw_scheme_agreement
    from tokensft.analysis.report import headline_table_html
    from tokensft.cli.trace import _print_headline

    schemes = {"drophi": {"mode": "drop-high", "affects": "zero", "affects_label": "drop-high drops"}}
    write_step(tmp_path / "a", 1, [_seq(drophi=DROPHI)], schemes=schemes)
    write_step(tmp_path / "b", 1, [_seq(topk=[math.nan, 1.0, 0.0, 1.0, 1.0, 1.0])])  # old metadata: registry's rule
    da, db = load_run(tmp_path / "a", progress=False), load_run(tmp_path / "b", progress=False)
    sa, sb = compute_summary(da), compute_summary(db)
    _print_headline(sa)
    lines = {ln.split("  ")[0]: ln.split()[-1] for ln in capsys.readouterr().out.splitlines()}
    assert lines["drop-high drops: share of opposing"] == "0.500"  # hit 1 of the opposing tokens 1, 2
    assert lines["drop-high drops: share of aligned"] == "0.333"  # hit 3 of the aligned tokens 3, 4, 5
    assert "drop-high drops: share of opposing" in headline_table_html(sa)
    rows = {r["key"]: r["values"] for r in comparison_table([sa, sb], ["A", "B"])["rows"] if r.get("quantity") == "pos"}
    assert rows["drophi_opposing_hit"] == [pytest.approx(0.5), None]
    assert rows["topk_opposing_hit"] == [None, pytest.approx(1 / 2)] and rows["topk_aligned_hit"] == [None, 0.0]
    fig = draw_scheme_agreement(sa, da)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["drop-high drops"]


def test_the_app_lists_the_declared_schemes(tmp_path):
    """The app's scheme selector and Trends metric list come from the trace metadata: a user scheme with its mode
    name and its `affected.<key>` fraction labelled with its declared rule; dft (no rule) has a weight but no fraction."""
    gr = pytest.importorskip("gradio")
    from tokensft.viz.app import build_app

    schemes = {"drophi": {"mode": "drop-high", "affects": "zero", "affects_label": "drop-high drops"},
               "dft": {"mode": "dft", "affects": None, "affects_label": "dft down-weights"}}
    write_step(tmp_path / "run", 1, [_seq(drophi=DROPHI, dft=[math.nan, 0.5, 0.5, 0.5, 0.5, 0.5])], schemes=schemes)
    demo = build_app([tmp_path / "run"])
    blocks = {getattr(b, "label", None): b for b in demo.blocks.values()}
    scheme = blocks["Scheme"]
    assert isinstance(scheme, gr.Radio)
    assert [tuple(c) for c in scheme.choices] == [("drop-high", "drophi"), ("dft", "dft")]
    trends = {v: k for k, v in blocks["Metric (mean over completion tokens)"].choices}
    assert trends["affected.drophi"] == "fraction affected: drop-high drops (weight = 0)"
    assert trends["weight.dft"] == "mean weight of dft" and "affected.dft" not in trends
