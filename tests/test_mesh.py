"""native <-> native data channels through the server's signaling (native_node.mesh), with
real processes inside a private network namespace the test creates; with only loopback there
ICE cannot connect, the mesh says so in time, and `send` refuses (the caller relays)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.netns import available
from tests.conftest import in_netns

pytestmark = pytest.mark.skipif(available() is not None,
                                reason=f"no private network namespace: {available()}")


def scenario(tmp: Path, *, veth: bool, timeout_s: str) -> dict[str, Any]:
    return in_netns("tests.mesh_scenario", [str(tmp), timeout_s], veth=veth, timeout=180)


def test_two_nodes_open_a_direct_channel_through_server_signaling(tmp_path: Path) -> None:
    res = scenario(tmp_path, veth=True, timeout_s="20")
    assert res["opened"] == [True, True]
    assert res["a_to_b"]["from_a"]
    assert res["a_to_b"]["same"]  # 3 MB, digest-checked chunks
    assert res["b_to_a"] == {"from_b": True, "digest_ok": True}


def test_without_a_usable_interface_the_mesh_gives_up_and_send_refuses(tmp_path: Path) -> None:
    res = scenario(tmp_path, veth=False, timeout_s="2")
    assert res["opened"] == [False, False]
    assert res["send_without_channel"] is False
    assert res["failed"] == [True, True]
