"""The visualizer in a real browser: Debian's chromium driven by Playwright over a small synthetic trace."""

from __future__ import annotations

import contextlib
import time
import urllib.error
import urllib.request

import pytest
from tests.viz.viz_browser import browser_skip_reason, choose, free_port, open_chromium, wait_idle
from tests.viz.viz_synthetic import KNOWN, KNOWN_PROMPT, KNOWN_TOKENS, make_known_run

from tokensft.viz.colors import NAN_RGB, diverging_rgb

pytestmark = pytest.mark.browser

_reason = browser_skip_reason()


def _spans(page, selector: str = ".tsft-main span.tok"):
    return page.eval_on_selector_all(
        selector,
        "els => els.map(e => ({i: +e.dataset.index, v: e.dataset.value, role: e.dataset.role, text: e.textContent,"
        " bg: getComputedStyle(e).backgroundColor, cls: e.className}))",
    )


@contextlib.contextmanager
def _app_page(runs):
    """The app over the run directory `runs`, served on a free port, and a chromium page opened on it and loaded:
    yields `(demo, page)`."""
    from playwright.sync_api import sync_playwright

    from tokensft.viz.app import launch

    port = free_port()
    demo = launch([runs], "127.0.0.1", port, block=False, quiet=True)
    try:
        with sync_playwright() as p:
            ctx = open_chromium(p)
            try:
                page = ctx.new_page()
                page.set_default_timeout(30_000)
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_selector(".tsft-main span.tok")
                yield demo, page
            finally:
                ctx.close()
    finally:
        demo.close()


@pytest.mark.skipif(_reason is not None, reason=_reason or "")
@pytest.mark.timeout(120)
def test_token_view_colours_in_chromium(tmp_path):
    t0 = time.time()
    runs = tmp_path / "runs"
    make_known_run(runs / "known")
    with _app_page(runs) as (_, page):
        # starts on the first step (10) with the alignment metric
        first = _spans(page)
        assert [s["v"] for s in first[KNOWN_PROMPT:]] == [f"{v:g}" for v in KNOWN[10]["alignment"]]

        # select step 20 and the p_t metric: colours are those of step 20's p on the auto scale (vmax = 1)
        choose(page, "Step", "20")
        page.wait_for_function(
            "() => document.querySelector('.tsft-main span.tok[data-index=\"3\"]')?.dataset.value === '0.5'")
        page.get_by_label("p_t", exact=True).check()
        page.wait_for_selector('.tsft-main[data-metric="p"]')
        spans = _spans(page)
        assert len(spans) == len(KNOWN_TOKENS)
        assert [s["text"] for s in spans] == KNOWN_TOKENS  # `<b>` shown as text, not markup
        for s in spans[:KNOWN_PROMPT]:
            assert s["role"] == "prompt" and "prompt" in s["cls"] and s["bg"] == NAN_RGB
        want = KNOWN[20]["p"]
        assert [s["bg"] for s in spans[KNOWN_PROMPT:]] == [diverging_rgb(v, 1.0) for v in want]
        assert spans[KNOWN_PROMPT + 2]["bg"] == "rgb(202, 0, 32)"  # p = 1 = vmax: the red end
        assert spans[KNOWN_PROMPT]["bg"] == "rgb(244, 165, 130)"  # p = 0.5: the half-way anchor

        # alignment at step 20 has values of both signs: blue end at -1, centre colour at 0
        page.get_by_label("alignment cos(g_t, G)", exact=True).check()
        page.wait_for_selector('.tsft-main[data-metric="alignment"]')
        spans = _spans(page)
        want = KNOWN[20]["alignment"]
        assert [s["bg"] for s in spans[KNOWN_PROMPT:]] == [diverging_rgb(v, 1.0) for v in want]
        assert spans[KNOWN_PROMPT + 3]["bg"] == "rgb(5, 113, 176)"
        assert spans[KNOWN_PROMPT + 2]["bg"] == "rgb(247, 247, 247)"
        page.screenshot(path=str(tmp_path / "viz_token_view.png"), full_page=True)

        # a path typed into the UI outside the given run directories is refused
        page.get_by_text("Open a run or trace file by path").click()
        page.locator("#tsft-path textarea, #tsft-path input").first.fill(str(tmp_path))
        page.locator("#tsft-open").click()
        page.wait_for_selector("#tsft-path-msg :text('Refused')")
        # gradio's own file route serves nothing from disk either, inside or outside the run directories
        for path in ("/etc/passwd", str(runs / "known" / "traces" / "manifest.jsonl")):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"{page.url.rstrip('/')}/gradio_api/file={path}", timeout=10)
            assert e.value.code in (403, 404)
    png = tmp_path / "viz_token_view.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert time.time() - t0 < 60


FLOOR = {"mode": "median-floor", "description": "a user's scheme", "source": "examples/schemes/median_floor.py",
         "params": {"floor_weight": 0.5}, "affects": "below_one", "affects_label": "median-floor floors"}


@pytest.mark.skipif(_reason is not None, reason=_reason or "")
@pytest.mark.timeout(120)
def test_a_user_scheme_is_in_trends_with_its_declared_rule(tmp_path):
    """A scheme registered from a user's file, traced: the app (a process that never loaded the file) offers its mean
    weight and its affected share in Trends, named by the rule the trace declares, and plots it; Trends' metrics
    follow the runs selected."""
    from tokensft.viz.views import trends_data

    runs = tmp_path / "runs"
    make_known_run(runs / "a-plain", mode="sft")
    make_known_run(runs / "b-user", mode="median-floor",
                   user_schemes={"median-floor": (FLOOR, [1.0, 0.5, 1.0, 0.5, 0.25])})
    affected_label = "fraction affected: median-floor floors (weight < 1)"
    metric = "Metric (mean over completion tokens)"
    with _app_page(runs) as (demo, page):
        # what the plot shows: 3 of the 5 completion tokens of each sequence weighted below 1, at every step
        df = trends_data(demo.tsft_store, [str(runs / "b-user")])
        assert df[df.category == "all"]["affected.median-floor"].tolist() == pytest.approx([0.6, 0.6])
        page.get_by_role("tab", name="Trends").click()
        choose(page, metric, affected_label)
        page.wait_for_selector(f'#tsft-trends img[alt="{affected_label} over training steps"]')
        src = page.get_attribute("#tsft-trends img", "src")
        assert src.startswith("data:image/png;base64,") and len(src) > 5_000
        # only the plain run selected: its traces know no median-floor, so neither does the metric list
        page.get_by_label("Runs", exact=True).click()
        page.get_by_role("option", name="b-user").click()  # deselect
        page.keyboard.press("Escape")
        wait_idle(page)
        page.get_by_label(metric, exact=True).click()
        names = page.get_by_role("option").all_inner_texts()
        assert "mean weight of sft-topk" in names and not any("median-floor" in n for n in names)
        page.keyboard.press("Escape")
        page.screenshot(path=str(tmp_path / "viz_trends_user_scheme.png"), full_page=True)
