"""The `star` transport with real processes inside a private network namespace the test
creates: updates go node -> server over WebRTC data channels (aiortc on both ends); with only
loopback in the namespace ICE cannot connect and the nodes relay over their WebSocket."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.netns import available
from tests.conftest import in_netns

pytestmark = pytest.mark.skipif(available() is not None,
                                reason=f"no private network namespace: {available()}")


def scenario(tmp: Path, *, veth: bool, rtc_timeout: str, steps: str) -> dict[str, Any]:
    return in_netns("tests.star_scenario", [str(tmp), rtc_timeout, steps], veth=veth)


def test_updates_flow_over_data_channels(tmp_path: Path) -> None:
    res = scenario(tmp_path, veth=True, rtc_timeout="20", steps="10")
    assert [r["n_updates"] for r in res["rounds"]] == [2, 2, 2]
    assert sorted(p["transport"] for p in res["peers"]) == ["webrtc", "webrtc"]
    assert all("over WebRTC" in log for log in res["node_logs"])
    assert res["run"]["rejected_total"] == 0


def test_ice_failure_falls_back_to_the_websocket(tmp_path: Path) -> None:
    res = scenario(tmp_path, veth=False, rtc_timeout="1", steps="10")
    assert [r["n_updates"] for r in res["rounds"]] == [2, 2, 2]
    assert sorted(p["transport"] for p in res["peers"]) == ["relay", "relay"]
    assert all("relaying updates over the WebSocket" in log for log in res["node_logs"])
