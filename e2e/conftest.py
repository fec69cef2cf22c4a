"""e2e fixtures: the real server (in-process, its own event loop in a thread, on 127.0.0.1)
with the browser node's routes, and headless Chromium driven by Playwright.

Chromium: /usr/bin/chromium (Debian's; `playwright install` cannot download browsers here),
or the path in $DAA_CHROMIUM. Without it every e2e test is skipped, saying why.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("DAA_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VENDOR_MANIFEST = ROOT / "browser" / "vendor" / "manifest.json"


def ensure_vendored() -> None:
    """browser/vendor/ must hold the npm files; vendor them when node_modules is there."""
    if VENDOR_MANIFEST.exists():
        return
    if not (ROOT / "node_modules").is_dir():
        pytest.fail("browser/vendor/ and node_modules/ are missing: run ./run.sh setup "
                    "(npm ci + scripts/vendor_browser.py)")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "vendor_browser.py")], check=True)


class LiveServer:
    """make_app(run) + server.browser_assets.routes served from a thread on 127.0.0.1."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="e2e-server",
                                       daemon=True)
        self.runner: Any = None
        self.url = ""

    async def _start(self) -> None:
        from aiohttp import web

        from server import browser_assets
        from server.app import make_app
        from server.runstate import open_run

        run = open_run(self.data_dir, {"model": "mlp-digits"})
        app = make_app(run)
        paths = {getattr(r.resource, "canonical", None) for r in app.router.routes()}
        if "/pkg/shared.zip" not in paths:  # not wired into make_app (yet): add them here
            app.add_routes(browser_assets.routes)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=120)

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    ensure_vendored()
    server = LiveServer(tmp_path_factory.mktemp("e2e-run") / "run")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium, "
                    "or set DAA_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
