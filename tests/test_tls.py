"""TLS end to end (issue 17): the server serves https + wss, a node verifies the certificate
(`--ca`), takes a bare HOST:PORT as "TLS when offered", remembers TLS per address and server
key and refuses a later plain ws:// to either (a downgrade) with a clear message, retrying with
backoff. A certificate that does not verify is refused clearly, never answered by falling back
to ws://. TURN credentials: coturn (when installed) grants a minted one and refuses a forged
or expired one, which the node reports in words."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import secrets
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bench.tlscerts import make as make_certs
from native_node import pins
from native_node.client import NodeClient, NodeOptions
from server.tls import server_context
from server.turn import mint
from tests.conftest import Procs, wait_for
from transport.identity import load_or_create_identity
from transport.rtc import probe_turn

FLAGS = ["--model", "mlp-digits", "--inner-steps", "2", "--batch-size", "16", "--quorum", "1",
         "--deadline-s", "30"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api(url: str, ca: Path | None = None) -> Any:
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
        return json.loads(resp.read())


def run_client(opts: NodeOptions, seconds: float) -> tuple[int | None, NodeClient]:
    """Run a NodeClient for at most `seconds`; its exit code (None: still retrying)."""
    client = NodeClient(opts)

    async def go() -> int | None:
        task = asyncio.ensure_future(client.run())
        done, _ = await asyncio.wait([task], timeout=seconds)
        if done:
            return task.result()
        client.shutdown()
        await asyncio.wait_for(task, 10)
        return None

    return asyncio.run(go()), client


def test_tls_run_pins_tls_and_refuses_downgrades(procs: Procs, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    ca, cert, key = make_certs(tmp_path / "tls", ["127.0.0.1"])
    port, data = free_port(), tmp_path / "run"
    server = procs.server("server", data, port, "--rounds", "1", "--tls-cert", str(cert),
                          "--tls-key", str(key), *FLAGS)
    run = wait_for(lambda: api(f"https://127.0.0.1:{port}/api/run", ca), 90, "the TLS server")
    page = urllib.request.urlopen(f"https://127.0.0.1:{port}/", timeout=5,
                                  context=ssl.create_default_context(cafile=str(ca)))
    assert page.status == 200
    with pytest.raises((OSError, http.client.HTTPException)):  # no plain http there
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/run", timeout=5)
    # a bare HOST:PORT means TLS when offered; the certificate is checked against --ca
    node = procs.node("node", port, "--ca", str(ca), "--max-rounds", "1")
    assert node.wait(120) == 0, procs.log("node")
    wait_for(lambda: api(f"https://127.0.0.1:{port}/api/run", ca)["status"] == "finished", 30,
             "the round")
    state = tmp_path / "node"
    seen = pins.tls_seen(state)
    assert seen == {"addresses": [f"127.0.0.1:{port}"], "servers": [run["server_id"]]}
    assert "WITHOUT TLS" not in procs.log("node")
    server.terminate()
    server.wait(30)

    # the same address over ws:// now: refused before connecting, retried with backoff
    opts = NodeOptions(coordinator=f"ws://127.0.0.1:{port}", state_dir=state,
                       identity=load_or_create_identity(state), progress=False,
                       backoff_max_s=0.1)
    with caplog.at_level(logging.INFO):
        code, _ = run_client(opts, 1.5)
    assert code is None  # still retrying, not given up
    refusals = caplog.text.count("refusing a plain ws:// connection")
    assert refusals >= 2
    assert "tls.json" in caplog.text
    assert "journal is kept" in caplog.text

    # the same server key without TLS on another address: refused once its key is seen
    caplog.clear()
    port2 = free_port()
    procs.server("plain", data, port2, *FLAGS)
    wait_for(lambda: api(f"http://127.0.0.1:{port2}/api/run"), 90, "the plain server")
    opts = NodeOptions(coordinator=f"127.0.0.1:{port2}", state_dir=state,
                       identity=load_or_create_identity(state), progress=False,
                       backoff_max_s=0.2)
    with caplog.at_level(logging.INFO):
        code, client = run_client(opts, 4.0)
    assert code is None
    assert client.submitted == 0
    assert f"server {run['server_id'][:12]} spoke TLS to this node before" in caplog.text


async def _tls_app(cert: Path, key: Path, port: int) -> web.AppRunner:
    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        await sock.receive()
        return sock

    app = web.Application()
    app.router.add_get("/ws", ws)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port,
                      ssl_context=server_context(str(cert), str(key))).start()
    return runner


@pytest.mark.parametrize("given_ca", [False, True])
def test_a_certificate_that_does_not_verify_is_refused(tmp_path: Path, given_ca: bool,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    _, cert, key = make_certs(tmp_path / "real", ["127.0.0.1"])
    other_ca, _, _ = make_certs(tmp_path / "other", ["127.0.0.1"], ca_name="another CA")
    port = free_port()

    async def go() -> int:
        runner = await _tls_app(cert, key, port)
        try:
            client = NodeClient(NodeOptions(
                coordinator=f"127.0.0.1:{port}", state_dir=tmp_path,
                identity=load_or_create_identity(tmp_path), progress=False,
                backoff_max_s=0.05, connect_tries=2,
                ca=str(other_ca) if given_ca else None))
            return await asyncio.wait_for(client.run(), 30)
        finally:
            await runner.cleanup()

    with caplog.at_level(logging.INFO):
        assert asyncio.run(go()) == 3
    assert f"the TLS certificate of 127.0.0.1:{port} does not verify" in caplog.text
    assert "Not falling back to plain ws://" in caplog.text
    assert ("--ca" in caplog.text)
    assert "WITHOUT TLS" not in caplog.text
    assert pins.tls_seen(tmp_path)["addresses"] == []


def test_bad_tls_files_are_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="cannot be used"):
        server_context(str(tmp_path / "junk.pem"), str(tmp_path / "junk.pem"))
    with pytest.raises(ValueError, match="no such file"):
        server_context(str(tmp_path / "none.pem"), str(tmp_path / "none.pem"))


@pytest.mark.skipif(shutil.which("turnserver") is None,
                    reason="coturn is not installed (./run.sh setup installs it as root)")
def test_turn_grants_a_minted_credential_and_refuses_forged_or_expired(tmp_path: Path) -> None:
    secret, port = secrets.token_hex(16), free_port()
    relay = free_port() // 2 * 2
    coturn = subprocess.Popen(
        ["turnserver", "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1",
         f"--listening-port={port}", f"--min-port={relay}", f"--max-port={relay + 20}",
         "--use-auth-secret", f"--static-auth-secret={secret}", "--realm=daa-test",
         "--no-tls", "--no-dtls", "--no-cli", "--log-file=stdout", "--simple-log",
         f"--pidfile={tmp_path}/turn.pid", f"--userdb={tmp_path}/turn.db"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node = "cd" * 32
    url = f"turn:127.0.0.1:{port}?transport=udp"

    def entry(user: str, password: str) -> dict[str, str]:
        return {"urls": url, "username": user, "credential": password}

    try:
        good = entry(*mint(secret.encode(), node, ttl_s=600))
        deadline, problem = time.monotonic() + 15, "not tried"
        while time.monotonic() < deadline:  # coturn takes a moment to listen
            problem = asyncio.run(probe_turn(good, timeout_s=2)) or ""
            if not problem:
                break
            time.sleep(0.3)
        assert problem == ""
        forged = entry(*mint(b"not the secret", node, ttl_s=600))
        said = asyncio.run(probe_turn(forged, timeout_s=3))
        assert said is not None
        assert "refused this node's credential" in said
        assert "401" in said
        expired = entry(*mint(secret.encode(), node, ttl_s=-60))
        said = asyncio.run(probe_turn(expired, timeout_s=3))
        assert said is not None
        assert "the credential expired" in said
    finally:
        coturn.terminate()
        coturn.wait(10)


def test_forwarded_client_only_from_a_trusted_proxy() -> None:
    from aiohttp.test_utils import make_mocked_request

    from server.tls import TRUSTED_PROXIES, client_address, parse_proxies

    app = web.Application()
    app[TRUSTED_PROXIES] = parse_proxies("127.0.0.1, ::1")
    headers = {"X-Forwarded-For": "203.0.113.9, 198.51.100.7"}

    def remote_of(peer: str, hdrs: dict[str, str]) -> str:
        req = make_mocked_request("GET", "/ws", headers=hdrs, app=app)
        return client_address(req.clone(remote=peer))

    assert remote_of("127.0.0.1", headers) == "198.51.100.7"  # the entry the proxy appended
    assert remote_of("10.1.2.3", headers) == "10.1.2.3"  # anyone else: its own address
    assert remote_of("127.0.0.1", {}) == "127.0.0.1"
    with pytest.raises(ValueError, match="not an IP address"):
        parse_proxies("proxy.example")
