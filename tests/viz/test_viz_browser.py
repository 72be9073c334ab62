"""The visualizer in a real browser: Debian's chromium driven by Playwright over a small synthetic trace."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest
from tests.viz.viz_browser import browser_skip_reason, choose, free_port, open_chromium
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


@pytest.mark.skipif(_reason is not None, reason=_reason or "")
@pytest.mark.timeout(120)
def test_token_view_colours_in_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    from tokensft.viz.app import launch

    t0 = time.time()
    runs = tmp_path / "runs"
    make_known_run(runs / "known")
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
            finally:
                ctx.close()
        # gradio's own file route serves nothing from disk either, inside or outside the run directories
        for path in ("/etc/passwd", str(runs / "known" / "traces" / "manifest.jsonl")):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/file={path}", timeout=10)
            assert e.value.code in (403, 404)
    finally:
        demo.close()
    png = tmp_path / "viz_token_view.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert time.time() - t0 < 60
