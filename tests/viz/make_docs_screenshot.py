"""Regenerate the screenshots of docs/viz.md and the README: `python -m tests.viz.make_docs_screenshot [OUT_DIR]`.

Writes two synthetic traced runs to a temporary directory, serves the visualizer on a free localhost port and
photographs its tabs with Debian's chromium (see scripts/install_browser.sh). OUT_DIR defaults to docs/img.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from tests.viz.viz_browser import browser_skip_reason, choose, free_port, open_chromium, wait_idle
from tests.viz.viz_synthetic import make_synthetic_run


def main(out_dir: str = "docs/img") -> int:
    reason = browser_skip_reason()
    if reason:
        print(f"cannot take screenshots: {reason}", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    from tokensft.viz.app import launch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix="tsft-viz-docs-")) / "runs"
    make_synthetic_run(runs / "sft-topk", mode="sft-topk", steps=(50, 100, 150, 200, 250), n_seq=4, seed=3)
    make_synthetic_run(runs / "sft", mode="sft", steps=(50, 100, 150, 200, 250), n_seq=4, seed=4)
    port = free_port()
    demo = launch([runs], "127.0.0.1", port, block=False, quiet=True)
    try:
        with sync_playwright() as p:
            ctx = open_chromium(p, width=1360, height=860)
            page = ctx.new_page()
            page.set_default_timeout(30_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector(".tsft-main span.tok")
            choose(page, "Run", "sft-topk")
            time.sleep(1.0)
            choose(page, "Step", "150")
            page.wait_for_function("() => document.querySelector('.tsft-main')?.parentElement.innerText.includes('step 150')")
            page.get_by_label("Sequence", exact=True).click()
            page.get_by_role("option").nth(0).click()
            page.wait_for_function("() => document.querySelector('.tsft-main')?.parentElement.innerText.includes('sequence 0')")
            page.mouse.move(0, 0)
            wait_idle(page)
            time.sleep(0.3)
            page.screenshot(path=str(out / "viz.png"))
            page.get_by_role("tab", name="Scheme overlay").click()
            wait_idle(page)
            time.sleep(0.5)
            page.screenshot(path=str(out / "viz_overlay.png"), full_page=True)
            page.get_by_role("tab", name="Clustering").click()
            wait_idle(page)
            time.sleep(1.0)
            page.screenshot(path=str(out / "viz_clustering.png"), full_page=True)
            ctx.close()
    finally:
        demo.close()
    for name in ("viz.png", "viz_overlay.png", "viz_clustering.png"):
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
