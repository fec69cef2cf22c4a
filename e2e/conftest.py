"""e2e fixtures: the real server (in-process, its own event loop in a thread, on 127.0.0.1)
with the browser node's routes, and headless Chromium driven by Playwright.

Chromium: /usr/bin/chromium (Debian's; `playwright install` cannot download browsers here),
or the path in $DAA_CHROMIUM. Without it every e2e test is skipped, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # for `tests.leftovers` when pytest is started on e2e/ alone
    sys.path.insert(0, str(ROOT))

from tests import leftovers  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """The session fails when a process a test started outlives it (tests/leftovers.py)."""
    leftovers.register(config)
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


def netns_env() -> dict[str, str]:
    """Skip unless a private network namespace and Chromium are available; vendor the browser
    assets; the environment a netns scenario (bench.netns) runs in."""
    from bench import netns

    why = netns.available()
    if why is not None:
        pytest.skip(f"no private network namespace here: {why}")
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM}")
    ensure_vendored()
    return {**os.environ, netns.ENV_FLAG: "1"}


def p2p_tabs(argv: list[str], *, veth: bool = True) -> tuple[int, dict[str, Any]]:
    """bench.p2p_tabs in a private netns (skips like netns_env) -> (its exit code, its last
    JSON line); a missing line fails with the scenario's output."""
    from bench import netns

    env = netns_env()
    res = subprocess.run(netns.command("bench.p2p_tabs", argv, veth=veth), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert lines, res.stdout[-2000:] + res.stderr[-3000:]
    return res.returncode, json.loads(lines[-1])


def wait_until(fn: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class LiveServer:
    """make_app(run) + server.browser_assets.routes served from a thread on 127.0.0.1."""

    def __init__(self, data_dir: Path, config: dict[str, Any] | None = None,
                 onnx_cache: Path | None = None) -> None:
        self.data_dir = data_dir
        self.config = config or {"model": "mlp-digits"}
        self.onnx_cache = onnx_cache  # shared by the session's servers: export once per model
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

        if self.onnx_cache is not None:  # ml/onnx_export.py caches under <data dir>/onnx
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.onnx_cache.mkdir(parents=True, exist_ok=True)
            (self.data_dir / "onnx").symlink_to(self.onnx_cache, target_is_directory=True)
        run = open_run(self.data_dir, self.config)
        self.run = run
        app = make_app(run)
        paths = {getattr(r.resource, "canonical", None) for r in app.router.routes()}
        if "/pkg/shared.zip" not in paths:  # not wired into make_app (yet): add them here
            app.add_routes(browser_assets.routes)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"

    def call(self, fn: Any, timeout: float = 30) -> Any:
        """Run `fn()` (sync) on the server's loop thread and return its result."""
        async def _run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(_run(), self.loop).result(timeout=timeout)

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


ARTIFACTS = Path(os.environ.get("DAA_E2E_ARTIFACTS", ROOT / "e2e" / "artifacts"))


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture
def make_server(tmp_path: Path, onnx_cache: Path) -> Iterator[Any]:
    """make_server(config) -> a started LiveServer on a fresh data dir (stopped afterwards)."""
    ensure_vendored()
    servers: list[LiveServer] = []

    def make(config: dict[str, Any]) -> LiveServer:
        srv = LiveServer(tmp_path / f"run{len(servers)}", config, onnx_cache=onnx_cache)
        srv.start()
        servers.append(srv)
        return srv

    try:
        yield make
    finally:
        for srv in servers:
            srv.stop()


class NativeNode:
    """`python -m native_node join` as a real subprocess (own identity dir)."""

    def __init__(self, server: LiveServer, state_dir: Path, *args: str) -> None:
        self.log = state_dir / "node.log"
        state_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "native_node", "join", "--coordinator",
             f"127.0.0.1:{server.port}", "--state-dir", str(state_dir), "--quiet",
             "--threads", "1", *args],
            cwd=ROOT, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def native_node(tmp_path: Path) -> Iterator[Any]:
    nodes: list[NativeNode] = []

    def start(server: LiveServer, *args: str) -> NativeNode:
        node = NativeNode(server, tmp_path / f"native{len(nodes)}", *args)
        nodes.append(node)
        return node

    try:
        yield start
    finally:
        for node in nodes:
            node.stop()


class Tab:
    """A page of the server's `/` in its own browser context (its own IndexedDB identity),
    with every console error and page error collected."""

    def __init__(self, browser: Any, url: str, name: str,
                 before_load: Any = None) -> None:
        self.name = name
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}")
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        if before_load is not None:  # e.g. listeners that must see the page's first socket
            before_load(self.page)
        self.page.goto(url)

    def stats(self) -> dict[str, Any]:
        return dict(self.page.evaluate("() => window.daaNode ? window.daaNode.stats : null")
                    or {})

    def wait(self, condition_js: str, timeout_s: float = 120) -> None:
        """Wait until `condition_js` (an expression over `s`, the node's stats) holds."""
        self.page.wait_for_function(
            f"() => {{ const s = window.daaNode && window.daaNode.stats; "
            f"if (s && s.state === 'stopped') "
            f"throw new Error('node stopped: ' + s.errors.join('; ')); "
            f"return !!s && ({condition_js}); }}", timeout=timeout_s * 1000, polling=250)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def open_tab(browser: Any) -> Iterator[Any]:
    tabs: list[Tab] = []

    def open_(url: str, name: str = "tab", before_load: Any = None) -> Tab:
        tab = Tab(browser, url, name, before_load)
        tabs.append(tab)
        return tab

    try:
        yield open_
    finally:
        for tab in tabs:
            with contextlib.suppress(Exception):  # already closed by the test
                tab.close()
