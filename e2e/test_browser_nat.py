"""A browser tab joins across a NAT over https (issue 17): bench.netns.NatLab's topology with
one home behind a symmetric NAT router; the server (TLS, transport star) and a real TURN
server (coturn, credentials minted per node) in the public namespace; Chromium in the home.
The page must be a secure, cross-origin-isolated context, the tab's RTCPeerConnection must
get a relay candidate from coturn with the credential its Welcome carried (so the server's
minted credential works from a browser too), and its updates must reach the server's peer
over the data channel, whose selected candidate pair /api/peers reports."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bench.nat import turnserver_argv
from bench.netns import PUBLIC_IP, NatLab, nat_available
from bench.tlscerts import make as make_certs
from e2e.conftest import CHROMIUM, ROOT, ensure_vendored
from tests.conftest import wait_for

ROUNDS = 3
PORT = 8470


def spki_hash(cert: Path) -> str:
    """Chromium's --ignore-certificate-errors-spki-list value for `cert`."""
    pub = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    der = pub.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def test_tab_joins_over_https_behind_a_symmetric_nat(tmp_path: Path, onnx_cache: Path) -> None:
    why = nat_available()
    if why is not None:
        pytest.skip(f"NAT topology: {why}")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    ensure_vendored()
    ca, cert, key = make_certs(tmp_path / "tls", [PUBLIC_IP])
    secret = secrets.token_hex(16)
    (tmp_path / "turn.secret").write_text(secret + "\n")
    data = tmp_path / "run"
    data.mkdir()
    onnx_cache.mkdir(parents=True, exist_ok=True)
    (data / "onnx").symlink_to(onnx_cache, target_is_directory=True)  # one export per session
    lab = NatLab(f"{os.getpid() % 100000:05d}", ["symmetric"])
    procs: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    try:
        lab.build()

        def start(name: str, ns: str, argv: list[str]) -> None:
            log = (tmp_path / f"{name}.log").open("ab")
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, *argv], cwd=ROOT,
                                          env=env, stdout=log, stderr=subprocess.STDOUT))

        start("coturn", lab.pub, turnserver_argv(secret, tmp_path))
        start("server", lab.pub, [
            sys.executable, "-m", "server", "--data-dir", str(data), "--host", PUBLIC_IP,
            "--port", str(PORT), "--tls-cert", str(cert), "--tls-key", str(key),
            "--ice-servers", f"stun:{PUBLIC_IP}:3478,turn:{PUBLIC_IP}:3478?transport=udp",
            "--turn-secret-file", str(tmp_path / "turn.secret"), "--transport", "star",
            "--model", "mlp-digits", "--inner-steps", "8", "--batch-size", "16", "--quorum", "1",
            "--rounds", str(ROUNDS), "--deadline-s", "60", "--rtc-timeout-s", "20"])
        probe = [sys.executable, "-c", "import ssl, sys, urllib.request; urllib.request."
                 f"urlopen('https://{PUBLIC_IP}:{PORT}/api/run', timeout=3, context=ssl."
                 f"create_default_context(cafile='{ca}'))"]
        wait_for(lambda: subprocess.run(["ip", "netns", "exec", lab.home(0), *probe],
                                        capture_output=True).returncode == 0, 120,
                 "the server, from the home behind the NAT")
        res = subprocess.run(["ip", "netns", "exec", lab.home(0), sys.executable, "-m",
                              "e2e.netns_nat_tab", f"https://{PUBLIC_IP}:{PORT}/", "--ca",
                              str(ca), "--spki", spki_hash(cert), "--rounds", str(ROUNDS)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        logs = "".join((tmp_path / f"{n}.log").read_text(errors="replace")[-1500:]
                       for n in ("server", "coturn"))
        assert lines, res.stdout[-2000:] + res.stderr[-3000:] + logs
        out = json.loads(lines[-1])
        print(json.dumps(out))  # what the tab saw (pytest -s)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        lab.destroy()
    assert out["secure_context"] is True, out
    assert out["cross_origin_isolated"] is True, out
    assert "relay" in out["local_candidates"], out  # coturn granted the minted credential
    assert "srflx" in out["local_candidates"], out  # STUN through the NAT
    # counted per update as it left (the transport line turns 'relay' when the run's end
    # closes the channel, which can come before it is read once rounds are fast)
    assert out["tab_updates_via"].get("webrtc", 0) >= 1, out
    assert out["server_view_tab"] == "webrtc", out
    assert out["ice_pairs"].get("server") in ("host", "srflx", "relay"), out
    assert out["tab_accepted"] >= ROUNDS, out
    assert out["console_errors"] == [], out
