"""`analyze_run` / `compare_runs` / `tokensft trace` on synthetic traces written with the real schema writer."""

from __future__ import annotations

import argparse
import base64
import csv
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

import tokensft.analysis.analyze as analyze_mod
from tokensft.analysis import analyze_run, compare_runs, compute_summary, load_run, parse_module_name, spearman
from tokensft.analysis.figures import ANALYSES
from tokensft.analysis.metrics import gini, pearson
from tokensft.analysis.summary import to_jsonable
from tokensft.cli import trace as trace_cli

from .synth import lora_layers, make_realistic_run, write_step

NAN = np.nan
PROMPT = ["<|im_start|>", "user", "Ċ"]


def _seq(comp_tokens, **arrays):
    """A sequence: 3 prompt tokens (NaN values) + completion tokens; arrays given for the completion part only."""
    T = len(PROMPT) + len(comp_tokens)
    s = {"tokens": PROMPT + list(comp_tokens), "is_completion": np.arange(T) >= len(PROMPT)}
    for k, v in arrays.items():
        s[k] = np.concatenate([np.full(len(PROMPT), NAN), np.asarray(v, dtype=np.float64)])
    return s


def _f16(x):
    return np.asarray(x, dtype=np.float16).astype(np.float64)


def _summary(run) -> dict:
    """The numbers `analyze_run` writes to summary.json, without drawing the figures (fast)."""
    return to_jsonable(compute_summary(load_run(run, progress=False)))


def _strict_json(path: Path):
    def bad(c):
        raise AssertionError(f"{path} holds {c}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=bad)


def test_exact_headline_values(tmp_path):
    n = 10
    words = ["Ġword"] * n
    one = np.zeros(n)
    one[3] = 2.0
    align = [0.5, -0.2, 0.1, -0.4, 0.3, -0.1, 0.2, -0.3, 0.6, -0.5]  # opposing fraction 0.5
    loss = np.linspace(0.1, 2.0, n)
    seq = _seq(words, **{"pos.norm": np.ones(n), "pos.alignment": align, "tokloss.norm": one,
                         "tokloss.alignment": align, "loss": loss})  # fmt: skip
    write_step(tmp_path / "run", 5, [seq])
    s = _summary(tmp_path / "run")
    pos, tok = s["headline"]["pos"], s["headline"]["tokloss"]
    assert pos["n_tokens"] == n  # prompt tokens excluded
    assert pos["gini"] == pytest.approx(0.0, abs=1e-12)  # equal magnitudes
    assert pos["share80"] == 0.8
    assert tok["gini"] == pytest.approx(1 - 1 / n, abs=1e-12)  # one token carries everything
    assert tok["share80"] == pytest.approx(1 / n)
    assert pos["opposing_fraction"] == 0.5
    assert pos["spearman_loss_align"] == pytest.approx(spearman(_f16(loss), _f16(align)), abs=1e-12)
    assert math.isnan(pearson(np.ones(n), align)) and pos["pearson_mag_align"] is None  # undefined -> null
    assert tok["pearson_mag_align"] == pytest.approx(pearson(_f16(one), _f16(align)), abs=1e-12)


def test_opposing_fraction_four_tokens(tmp_path):
    seq = _seq(["Ġa", "Ġb", "Ġc", "Ġd"], **{"pos.norm": [1, 2, 3, 4], "pos.alignment": [0.5, -0.2, 0.1, -0.4]})
    write_step(tmp_path / "run", 1, [seq])
    s = _summary(tmp_path / "run")
    assert s["headline"]["pos"]["opposing_fraction"] == 0.5
    assert "tokloss" not in s["headline"]


def test_per_step_statistics_are_averaged_not_pooled(tmp_path):
    """Gini is taken within each step (scales differ across training) and averaged over steps."""
    a = [1.0, 1.0, 2.0, 4.0]
    b = [0.25, 0.5, 0.5, 8.0]
    al = [0.1, -0.1, 0.2, -0.2]
    write_step(tmp_path / "run", 10, [_seq(["Ġx"] * 4, **{"pos.norm": a, "pos.alignment": al})])
    write_step(tmp_path / "run", 20, [_seq(["Ġx"] * 4, **{"pos.norm": b, "pos.alignment": al})])
    s = _summary(tmp_path / "run")
    assert s["headline"]["pos"]["gini"] == pytest.approx((gini(a) + gini(b)) / 2, abs=1e-12)
    assert s["headline"]["pos"]["gini"] != pytest.approx(gini(a + b))
    assert s["per_step"]["pos"]["step"] == [10, 20]
    assert s["per_step"]["pos"]["gini"] == pytest.approx([gini(a), gini(b)], abs=1e-12)


def test_alignment_by_category_and_scheme_agreement(tmp_path):
    toks = ["Ġ12", "7", "Ġ+", "Ġ=", "Ġthe", "ing", "Ċ", "."]
    align = [-0.5, -0.25, 0.25, 0.75, 0.5, -0.125, 0.125, 0.375]  # exact in float16
    topk = [0, 0, 1, 1, 1, 0, 1, 1]  # drops both numbers and the subword
    antiop = [0.5, 1, 1, 1, 1, 1, 1, 1]
    seq = _seq(toks, **{"pos.norm": np.ones(8), "pos.alignment": align, "weight.topk": topk,
                        "weight.antiop": antiop, "weight.lr": [NAN] * 8})  # fmt: skip
    write_step(tmp_path / "run", 3, [seq])
    s = _summary(tmp_path / "run")
    h = s["headline"]["pos"]
    assert h["align_number"] == pytest.approx(-0.375)
    assert h["align_operator"] == pytest.approx(0.5)
    assert h["align_word"] == 0.5 and h["align_subword"] == -0.125
    assert h["align_whitespace"] == 0.125 and h["align_punctuation"] == 0.375
    assert h["align_latex"] is None  # no LaTeX token
    assert h["topk_opposing_hit"] == 1.0 and h["topk_aligned_hit"] == 0.0
    assert h["antiop_opposing_hit"] == pytest.approx(1 / 3) and h["antiop_aligned_hit"] == 0.0
    assert h["lr_opposing_hit"] is None  # lr not recorded (no reference model)
    assert set(s["scheme_agreement"]["pos"]) == {"topk", "antiop"}


def test_top_opposing_lists_each_example_once(tmp_path):
    run = tmp_path / "run"
    for step, al in ((1, [-0.5, 0.5, -0.25]), (2, [-0.75, 0.5, 0.25])):
        seq = _seq(["Ġthe", "Ġ3", "Ġ\\"], **{"pos.norm": [1, 1, 1], "pos.alignment": al})
        seq["example_index"] = 7
        write_step(run, step, [seq])
    s = _summary(run)
    top = s["top_opposing"]["pos"]
    assert [(r["token"], r["step"], r["alignment"]) for r in top] == [(" the", 2, -0.75), (" \\", 1, -0.25)]
    assert (top[0]["steps_opposing"], top[0]["steps_traced"]) == (2, 2)
    assert (top[1]["steps_opposing"], top[1]["steps_traced"]) == (1, 2)
    assert top[0]["context_before"] == "<|im_start|>user\n" and top[0]["category"] == "word"
    assert top[0]["weights"] == {}  # no scheme weight recorded


def test_layer_statistics(tmp_path):
    names = lora_layers(2, ("q_proj", "down_proj"))  # layer 0: q A, q B, down A, down B; layer 1: the same
    assert parse_module_name(names[1]) == (0, "q", "lora_B")
    L = len(names)
    rng = np.random.default_rng(0)
    la = _f16(rng.uniform(-1, 1, (L, 5)))
    ln = _f16(rng.uniform(0.5, 2, (L, 5)))
    g = np.array([1.0, 1, 1, 1, 2, 2, 2, 2])  # ||G_l||: layer 1 holds 16 / 20 of ||G||^2
    seq = _seq(["Ġa"] * 5, **{"pos.norm": np.ones(5), "pos.alignment": np.zeros(5)})
    seq["pos.layer.alignment"] = np.concatenate([np.full((L, 3), NAN), la], axis=1)
    seq["pos.layer.norm"] = np.concatenate([np.full((L, 3), NAN), ln], axis=1)
    seq["pos.layer.G_norm"] = g
    write_step(tmp_path / "run", 1, [seq], layers=names)
    lay = _summary(tmp_path / "run")["layers"]
    assert lay["per_layer"]["layer"] == [0, 1]
    assert lay["per_layer"]["g_share"] == pytest.approx([0.2, 0.8])
    assert lay["per_layer"]["mean_alignment"] == pytest.approx([la[:4].mean(), la[4:].mean()])
    assert lay["modules"]["down"]["lora_B"]["mean_alignment"] == pytest.approx(la[[3, 7]].mean())
    assert lay["modules"]["q"]["lora_A"]["mean_norm"] == pytest.approx(ln[[0, 4]].mean())
    assert lay["lora"]["lora_B"]["mean_norm"] == pytest.approx([ln[[1, 3]].mean(), ln[[5, 7]].mean()])
    assert lay["lora"]["lora_A"]["mean_G_norm"] == pytest.approx([1.0, 2.0])
    # response positions 0, 1, 2, 3, 4 -> log2 bins 0, 1, 2, 2, 3
    grid = np.array(lay["layer_position"]["mean"])
    assert lay["layer_position"]["labels"] == ["0", "1", "2-3", "4-7"]
    np.testing.assert_allclose(grid[1], [la[4:, 0].mean(), la[4:, 1].mean(), la[4:, 2:4].mean(), la[4:, 4].mean()])


def test_torn_and_unreadable_trace_files_are_skipped(tmp_path):
    run = make_realistic_run(tmp_path / "run", steps=(10, 20, 30, 40), n_seq=2, n_layers=1)
    full = load_run(run, progress=False)
    per_step = {s: int((full.completion & (full.step == s)).sum()) for s in full.steps}
    tdir = run / "traces"
    (tdir / "step_00000020.safetensors").write_bytes(b"this is not a safetensors file")  # unreadable
    last = tdir / "step_00000040.safetensors"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # torn last file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = _summary(run)
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert any("skipping" in m and "step_00000020" in m for m in msgs)
    assert any("skipping" in m and "step_00000040" in m for m in msgs)
    assert s["run"]["steps"] == [10, 30]
    assert s["headline"]["pos"]["n_tokens"] == per_step[10] + per_step[30]


def test_manifest_lines_that_are_json_but_not_entries_are_skipped(tmp_path):
    """`7`, `[]`, `{"step": "x"}` parse as JSON but are no manifest entries: skipped with a warning naming the line."""
    import os
    import time

    from tokensft.tracing.schema import read_manifest, remove_orphan_temporaries

    run = make_realistic_run(tmp_path / "run", steps=(10, 20), n_seq=1, n_layers=1)
    manifest = run / "traces" / "manifest.jsonl"
    manifest.write_text(manifest.read_text() + '7\n[]\n{"step": "x", "file": 3}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [e["step"] for e in read_manifest(run)] == [10, 20]
        s = _summary(run)
    assert s["run"]["steps"] == [10, 20]
    msgs = [str(w.message) for w in caught]
    assert any("manifest.jsonl:3" in m and "not an entry" in m for m in msgs)
    # a killed write's temporary file is cleaned up; a fresh one (a write in progress) is left alone
    old, fresh = run / "traces" / "step_00000030.safetensors.abc.tmp", run / "traces" / "x.json.def.tmp"
    old.write_bytes(b"half"), fresh.write_bytes(b"half")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert remove_orphan_temporaries(run / "traces") == [old]
    assert not old.exists() and fresh.exists()


def test_no_readable_step_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no traces/"):
        analyze_run(tmp_path, progress=False)
    (tmp_path / "traces").mkdir()
    with pytest.raises(ValueError, match="no readable trace step"):
        analyze_run(tmp_path, progress=False)


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    root = tmp_path_factory.mktemp("realistic")
    run = make_realistic_run(root / "sft", steps=(10, 20, 30), n_seq=3, n_layers=2)
    summary = analyze_run(run, progress=False)  # default out: RUN_DIR/analysis, PNG + PDF
    return run, summary


def test_full_report(realistic):
    run, s = realistic
    out = run / "analysis"
    assert [f["number"] for f in s["figures"]] == list(range(1, 17))
    assert [f for f in s["figures"] if f["skipped"]] == []
    for a in ANALYSES:
        png, pdf = out / f"{a.stem}.png", out / f"{a.stem}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
    assert not list(out.glob("*.tmp"))
    assert _strict_json(out / "summary.json")["headline"] == s["headline"]
    html = (out / "report.html").read_text()
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(imgs) == 16
    assert base64.b64decode(imgs[0])[:4] == b"\x89PNG"
    assert "Gini coefficient of ‖g_t‖" in html and "per-token-loss" in html
    assert f"{s['headline']['pos']['gini']:.3f}" in html
    assert html.count("How to read it.") == 17  # the headline table + 16 figures
    # per-layer shares of ||G||^2 sum to 1 (the total traced gradient is the concatenation of the layers')
    assert sum(s["layers"]["per_layer"]["g_share"]) == pytest.approx(1.0, rel=1e-3)
    assert set(s["layers"]["modules"]) == {"q", "k", "v", "o"}
    assert set(s["layers"]["modules"]["q"]) == {"lora_A", "lora_B"}


def test_missing_arrays_skip_analyses_with_reasons(tmp_path, monkeypatch):
    """Only the per-token-loss quantity, no per-layer arrays, no weights, NaN on prompt tokens."""
    monkeypatch.setattr(analyze_mod, "render", lambda fig, fmt: b"\x89PNG stub")  # figures are built, not rasterised
    seqs = [_seq(["Ġ1", "Ġ+", "Ġ2", "Ġis", "Ġ3", "."], **{"tokloss.norm": [1, 2, 3, 1, 2, 3],
                 "tokloss.alignment": [0.5, -0.5, 0.25, 0.1, -0.2, 0.3], "loss": [1, 2, 3, 1, 2, 3]})]  # fmt: skip
    write_step(tmp_path / "run", 1, seqs)
    s = analyze_run(tmp_path / "run", tmp_path / "out", progress=False, formats=("png",))
    skipped = {f["number"]: f["skipped"] for f in s["figures"] if f["skipped"]}
    assert set(skipped) == {2, 3, 8, 11, 14, 16}
    assert "pos.layer" in skipped[3] and "NaN" in skipped[2] and "weight" in skipped[16]
    assert s["run"]["quantities"] == ["tokloss"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Not traced in this run: per-position" in html and html.count("Skipped:") == 6


def test_compare_runs(tmp_path):
    a = make_realistic_run(tmp_path / "sft", steps=(10, 20), n_seq=2, n_layers=1, mode="sft")
    b = make_realistic_run(tmp_path / "sft-antiop", steps=(10, 20), n_seq=2, n_layers=1, seed=1,
                           mode="sft-antiop", antiop_effect=0.3)  # fmt: skip
    out = tmp_path / "cmp"
    table = compare_runs([a, b], names=["SFT", "antiop"], out_dir=out, progress=False, formats=("png",))
    assert table["names"] == ["SFT", "antiop"]
    sa = _summary(a)
    row = next(r for r in table["rows"] if r["key"] == "gini" and r["quantity"] == "pos")
    assert row["values"][0] == pytest.approx(sa["headline"]["pos"]["gini"], abs=1e-12)
    md = (out / "comparison.md").read_text()
    assert md.startswith("| metric | SFT | antiop |")
    assert "| loss mode | sft | sft-antiop |" in md
    assert f"| Gini coefficient of ‖g_t‖ [per-position (pos)] | {sa['headline']['pos']['gini']:.3f} |" in md
    assert all(line.count(" | ") == 2 for line in md.splitlines())  # no stray pipe breaks a row
    rows = list(csv.reader((out / "comparison.csv").open()))
    assert rows[0] == ["metric", "quantity", "SFT", "antiop"]
    gini_row = next(r for r in rows if r[:2] == ["gini", "pos"])
    assert float(gini_row[2]) == pytest.approx(sa["headline"]["pos"]["gini"], abs=1e-12)
    for stem in ("compare_lorenz", "compare_alignment_by_category", "compare_alignment_vs_position"):
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "compare.html").read_text().count("data:image/png;base64,") == 3
    assert _strict_json(out / "comparison.json")["table"]["names"] == ["SFT", "antiop"]
    with pytest.raises(ValueError, match="2 runs"):
        compare_runs([a, b], names=["only-one"], out_dir=out, progress=False)
    with pytest.raises(ValueError, match="at least two"):
        compare_runs([a], out_dir=out, progress=False)


def test_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(analyze_mod, "ANALYSES", ANALYSES[:2])  # the wiring is under test, not the figures
    run = make_realistic_run(tmp_path / "sft", steps=(10,), n_seq=2, n_layers=1)
    run2 = make_realistic_run(tmp_path / "dft", steps=(10,), n_seq=2, n_layers=1, seed=3, mode="dft")
    root = argparse.ArgumentParser(prog="tokensft")
    trace_cli.add_parser(root.add_subparsers(dest="command"))
    args = root.parse_args(["trace", "analyze", str(run), "--out", str(tmp_path / "rep"), "--no_pdf", "--no_progress"])
    assert args.func is trace_cli.main
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert "Gini coefficient" in out.out and "report.html" in out.err
    assert (tmp_path / "rep" / "report.html").is_file() and not list((tmp_path / "rep").glob("*.pdf"))
    argv = ["compare", str(run), str(run2), "--out", str(tmp_path / "cmp"), "--no_progress", "--no_pdf"]
    assert trace_cli.main(argv) == 0
    out = capsys.readouterr()
    assert out.out.startswith("| metric | sft | dft |")
    assert (tmp_path / "cmp" / "compare_lorenz.png").is_file() and not list((tmp_path / "cmp").glob("*.pdf"))
    assert trace_cli.main(["analyze", str(tmp_path / "nowhere"), "--no_progress"]) == 2
    assert "no traces/ directory" in capsys.readouterr().err


def test_figure_details_match_the_data():
    """Figure 9 labels each category with the tokens that have a value and draws no bar where there are none; figure
    6's axis spans its (small) cosines; step axes carry whole steps; figure 8 thins 30 layer labels."""
    import numpy as np

    from tokensft.analysis import figures

    cat = {"n": 0, "mean": 0.0, "ci": 0.0}
    run = {"quantities": ["pos", "tokloss"], "name": "r", "n_steps": 1, "n_completion_tokens": 10}
    s = {"run": run, "by_category": {
        "pos": {c: dict(cat) for c in figures.CATEGORIES}, "tokloss": {c: dict(cat) for c in figures.CATEGORIES}}}
    s["by_category"]["tokloss"]["special"] = {"n": 7, "mean": -0.2, "ci": 0.05}
    s["by_category"]["pos"]["number"] = s["by_category"]["tokloss"]["number"] = {"n": 3, "mean": 0.1, "ci": 0.01}
    fig = figures.draw_by_category(s, None)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["number\n(n=3)", "special\n(n=7)"]
    heights = [p.get_height() for p in ax.patches]  # pos: number, special; tokloss: number, special
    assert heights[0] == 0.1 and np.isnan(heights[1]) and heights[3] == -0.2

    rows = [{"alignment": -0.03, "category": "word", "token": "x", "context_before": "a", "context_after": "b",
             "loss": 1.0, "step": 3, "steps_opposing": 1, "steps_traced": 2}]
    ax6 = figures.draw_top_opposing({"run": {**run, "quantities": ["pos"]}, "top_opposing": {"pos": rows}},
                                    None).axes[0]
    assert ax6.get_xlim() == (-0.03 * 1.15, 0)

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 10, 20, 30], [1, 2, 3, 4])
    figures._integer_ticks(ax)
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())
    figures._sparse_ticks(ax, np.arange(30))
    assert len(ax.get_xticks()) <= 16
    plt.close("all")


def test_log_axis_only_with_positive_values():
    """LoRA A's gradient is exactly 0 at B's zero init: figure 8 must draw it (linear) instead of failing on a log
    axis; with any positive value the axis is logarithmic."""
    from matplotlib.figure import Figure

    from tokensft.analysis.figures import _log

    ax = Figure().subplots()
    ax.plot([0, 1, 2], [0.0, 0.0, float("nan")])
    _log(ax)
    assert ax.get_yscale() == "linear"
    ax.plot([0, 1], [0.0, 2.0])
    _log(ax)
    assert ax.get_yscale() == "log"
    ax = Figure().subplots()
    ax.scatter([0.0, -1.0], [1.0, 2.0])
    _log(ax, "x")
    assert ax.get_xscale() == "linear"
    ax.scatter([3.0], [1.0])
    _log(ax, "x")
    assert ax.get_xscale() == "log"
