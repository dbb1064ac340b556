"""Headless Chromium for the UI tests and the screenshot script: Debian's ``chromium`` driven by
Playwright's driver (``playwright install`` is never run; its browsers would be a download)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def browser_page(width: int = 1280, height: int = 900) -> Iterator:
    """A fresh page in a fresh profile; closed (and the profile removed) afterwards."""
    from playwright.sync_api import sync_playwright  # only the browser tests need it

    with tempfile.TemporaryDirectory(prefix="peftlab-chromium-") as profile, \
            sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), args=ARGS, headless=True,
            viewport={"width": width, "height": height})
        try:
            page = context.new_page()
            yield page
        finally:
            context.close()
