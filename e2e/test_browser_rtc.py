"""WebRTC from the tab (transport "star"): its updates go to the server's aiortc peer over a
data channel; when ICE cannot connect they are relayed over the WebSocket. Both run inside
private network namespaces (bench.netns), never on the host's interfaces."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bench import netns
from e2e.conftest import ROOT, ensure_vendored


@pytest.mark.parametrize(("veth", "expect"), [(True, "webrtc"), (False, "relay")])
def test_tab_updates_over_webrtc_or_relayed(tmp_path: Path, onnx_cache: Path, veth: bool,
                                             expect: str) -> None:
    """In a private namespace with a veth: tab <-> server (aiortc) and native <-> server over
    data channels. With loopback only, ICE fails: after rtc_timeout_s both relay over the
    WebSocket, and every update is still accepted. (Never on the host's own interfaces.)"""
    why = netns.available()
    if why is not None:
        pytest.skip(f"no private network namespace here: {why}")
    ensure_vendored()
    env = {**os.environ, netns.ENV_FLAG: "1"}
    argv = [str(tmp_path / "d"), "--onnx-cache", str(onnx_cache), "--expect", expect]
    res = subprocess.run(netns.command("e2e.netns_star", argv, veth=veth), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert lines, res.stdout[-2000:] + res.stderr[-3000:]
    out = json.loads(lines[-1])
    # how the tab's updates left, counted as they were sent: the transport line read after
    # the 2nd accept could already be 'relay' when the 3rd round had ended the run (its
    # channel closes), once rounds got fast
    assert out["tab_updates_via"].get(expect, 0) >= 2, out
    assert out["server_view_tab"] == expect, out
    assert out["server_view_native"] == expect, out
    assert out["n_updates"] == [2, 2, 2], out
    assert out["tab_accepted"] == 3, out
    assert out["console_errors"] == [], out
    assert res.returncode == 0, out
