"""docs/operator.md's "Deployment" section, followed literally: its commands and its nginx
configuration are read out of the page, the capitalised placeholders filled in (a throwaway
CA and certificate, free loopback ports, a fresh TURN secret), and run.

* TLS + TURN: coturn as documented and the server as documented; a participant joins over wss
  and the TURN credential its Welcome carries is granted by that coturn.
* Reverse proxy: the server as documented behind nginx with the documented server block; the
  page comes through https with its COOP/COEP headers, the API answers, and the control socket
  upgrades to wss through the proxy.

Only what must differ on a test machine is added: ports (free ones instead of 443/3478/8470),
temp paths (coturn's pid file and database, nginx's prefix), a quick model."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.tlscerts import make as make_certs
from shared.participant import Participant
from tests.conftest import ROOT, Procs, wait_for
from transport.identity import load_or_create_identity
from transport.rtc import probe_turn

DOC = (ROOT / "docs" / "operator.md").read_text()
SECTION = DOC[DOC.index("## Deployment"):DOC.index("## Native node")]
QUICK = ["--model", "mlp-digits", "--inner-steps", "2", "--quorum", "1"]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", SECTION, flags=re.S)


def command(prefix: str) -> list[str]:
    """The documented command line that starts with `prefix` (and has it whole)."""
    found = [line for b in blocks("bash") for line in b.splitlines() if line.startswith(prefix)]
    assert found, f"docs/operator.md, Deployment: no `{prefix} ...` command"
    return shlex.split(found[0])


def fill(argv: list[str], subs: dict[str, str]) -> list[str]:
    out = []
    for arg in argv:
        for key, value in subs.items():
            arg = arg.replace(key, value)
        out.append(arg)
    assert not re.search(r"\b[A-Z][A-Z_]{3,}\b", " ".join(out)), out  # every placeholder set
    return out


def set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with `flag` (as `--flag V` or `--flag=V`) set to `value`, appended if absent."""
    for i, arg in enumerate(argv):
        if arg == flag:
            return [*argv[:i + 1], value, *argv[i + 2:]]
        if arg.startswith(flag + "="):
            return [*argv[:i], f"{flag}={value}", *argv[i + 1:]]
    return [*argv, flag, value]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_argv(doc_argv: list[str], port: int, data: Path) -> list[str]:
    assert doc_argv[:3] == ["python", "-m", "server"]
    argv = set_flag(set_flag(doc_argv[3:], "--port", str(port)), "--data-dir", str(data))
    return ["-m", "server", *set_flag(argv, "--host", "127.0.0.1"), *QUICK]


async def join(url: str, ctx: ssl.SSLContext | None, tmp: Path) -> Participant:
    """Say Hello over the control socket at `url` until the Welcome; the participant."""
    part = Participant(load_or_create_identity(tmp / "id"), runtime="native", agent="doc-test",
                       device="cpu")
    async with aiohttp.ClientSession() as http, http.ws_connect(url, ssl=ctx or False) as ws:
        part.connection_made()
        async for raw in ws:
            for ev in part.receive(raw.data):
                if ev["kind"] == "send":
                    await ws.send_bytes(ev["frame"])
                elif ev["kind"] == "welcome":
                    return part
                elif ev["kind"] == "fatal":
                    raise AssertionError(ev)
    raise AssertionError("no Welcome")


def get(url: str, ctx: ssl.SSLContext) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=10, context=ctx) as resp:
        return resp.status, dict(resp.headers), resp.read()


@pytest.mark.skipif(shutil.which("turnserver") is None,
                    reason="coturn is not installed (./run.sh setup installs it as root)")
def test_tls_and_turn_as_documented(procs: Procs, tmp_path: Path) -> None:
    ca, cert, key = make_certs(tmp_path / "tls", ["127.0.0.1"])
    secret = secrets.token_hex(16)
    secret_file = tmp_path / "turn.secret"
    secret_file.write_text(secret + "\n")
    turn_port, port = free_port(socket.SOCK_DGRAM), free_port()
    subs = {"TURN_IP": "127.0.0.1", "TURN_SECRET_FILE": str(secret_file),
            "TURN_SECRET": secret, "CERT_PEM": str(cert), "KEY_PEM": str(key)}
    coturn = fill(command("turnserver "), subs)
    coturn = [a.replace(":3478", f":{turn_port}") for a in set_flag(
        coturn, "--listening-port", str(turn_port))]
    coturn += [f"--pidfile={tmp_path}/turn.pid", f"--userdb={tmp_path}/turn.db",
               "--log-file=stdout", "--simple-log"]
    log = (tmp_path / "coturn.log").open("ab")
    turn = subprocess.Popen(coturn, stdout=log, stderr=subprocess.STDOUT)
    try:
        doc_server = command("python -m server --tls-cert")
        assert "--turn-secret-file" in doc_server
        argv = [a.replace(":3478", f":{turn_port}") for a in fill(doc_server, subs)]
        procs.start("server", server_argv(argv, port, tmp_path / "run"))
        ctx = ssl.create_default_context(cafile=str(ca))
        wait_for(lambda: get(f"https://127.0.0.1:{port}/api/run", ctx)[0] == 200, 90,
                 "the documented TLS server")
        part = asyncio.run(join(f"wss://127.0.0.1:{port}/ws", ctx, tmp_path))
        assert part.welcome is not None
        ice = part.welcome.ice_servers
        assert [s["urls"] for s in ice] == [f"stun:127.0.0.1:{turn_port}",
                                          f"turn:127.0.0.1:{turn_port}?transport=udp"]
        user = ice[1]["username"]
        assert user.endswith(":" + part.node_id)
        problem = wait_for(lambda: asyncio.run(probe_turn(ice[1], timeout_s=2)) is None or None,
                           20, "coturn to grant the minted credential")
        assert problem is True
        forged = {**ice[1], "credential": "AAAA" + ice[1]["credential"][4:]}
        said = asyncio.run(probe_turn(forged, timeout_s=3))
        assert said is not None
        assert "refused this node's credential" in said
    finally:
        turn.terminate()
        turn.wait(10)


def nginx_conf(tmp: Path, server_block: str) -> Path:
    """The documented server block inside a minimal nginx.conf with temp paths."""
    paths = "\n".join(f"    {name}_temp_path {tmp}/{name};" for name in
                      ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = (f"{user}daemon off;\nworker_processes 1;\npid {tmp}/nginx.pid;\n"
            f"error_log {tmp}/error.log;\nevents {{ worker_connections 64; }}\n"
            f"http {{\n    access_log {tmp}/access.log;\n{paths}\n{server_block}\n}}\n")
    path = tmp / "nginx.conf"
    path.write_text(conf)
    return path


@pytest.mark.skipif(shutil.which("nginx") is None,
                    reason="nginx is not installed (./run.sh setup installs nginx-light as root)")
def test_reverse_proxy_as_documented(procs: Procs, tmp_path: Path) -> None:
    ca, cert, key = make_certs(tmp_path / "tls", ["localhost", "127.0.0.1"])
    port, proxy_port = free_port(), free_port()
    (nginx_block,) = blocks("nginx")
    doc_server = command("python -m server --host 127.0.0.1")
    assert "--trust-proxy" in doc_server
    procs.start("server", server_argv(doc_server, port, tmp_path / "run"))
    block = (nginx_block.replace("SERVER_NAME", "localhost").replace("CERT_PEM", str(cert))
             .replace("KEY_PEM", str(key)).replace("127.0.0.1:8470", f"127.0.0.1:{port}")
             .replace("listen 443 ssl;", f"listen 127.0.0.1:{proxy_port} ssl;"))
    assert f"127.0.0.1:{port}" in block
    assert f"{proxy_port} ssl" in block
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / name).mkdir()
    conf = nginx_conf(tmp_path, block)
    check = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(conf)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    log = (tmp_path / "nginx.log").open("ab")
    nginx = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(conf)], stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
        base = f"https://localhost:{proxy_port}"
        wait_for(lambda: get(f"http://127.0.0.1:{port}/api/run", ssl.create_default_context()
                             )[0] == 200, 90, "the server behind the proxy")
        status, headers, _ = wait_for(lambda: get(base + "/", ctx), 20, "the proxied page")
        assert status == 200
        assert headers.get("Cross-Origin-Opener-Policy") == "same-origin"
        assert headers.get("Cross-Origin-Embedder-Policy") == "require-corp"
        run: dict[str, Any] = json.loads(get(base + "/api/run", ctx)[2])
        assert run["run_id"]
        part = asyncio.run(join(f"wss://localhost:{proxy_port}/ws", ctx, tmp_path))
        assert part.welcome is not None
        assert part.welcome.run_id == run["run_id"]
    finally:
        nginx.terminate()
        nginx.wait(10)
