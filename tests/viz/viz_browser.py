"""Helpers for driving Debian's chromium with Playwright (no `playwright install`: the system browser is used)."""

from __future__ import annotations

import importlib.util
import os
import socket
import tempfile

CHROMIUM = os.environ.get("TOKENSFT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browser_skip_reason() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if importlib.util.find_spec("gradio") is None:
        return "gradio is not installed (pip install 'tokensft[viz]')"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install 'tokensft[dev]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} not found (bash scripts/install_browser.sh)"
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_chromium(playwright, *, width: int = 1400, height: int = 1000):
    """A persistent headless chromium context with a fresh user-data-dir (caller closes it)."""
    return playwright.chromium.launch_persistent_context(
        tempfile.mkdtemp(prefix="tsft-chromium-"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": width, "height": height})


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the Gradio dropdown labelled `label`."""
    page.get_by_label(label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()


def wait_idle(page, timeout_ms: int = 30_000) -> None:
    """Wait until no Gradio status tracker is showing (no event is pending or running)."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=status-tracker]')].every(e => e.classList.contains('hide'))",
        timeout=timeout_ms)
