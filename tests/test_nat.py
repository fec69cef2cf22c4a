"""p2p rounds across real NATs (bench.nat, both phases): network namespaces with iptables NAT
routers, Debian's coturn as the TURN server, the server over TLS. Needs root, iptables and
coturn (./run.sh setup installs them as root); skipped with the reason otherwise.

Also here, without root: the TURN REST API credentials the server mints are the ones coturn
checks (HMAC-SHA1 over "expiry:node" with the shared secret)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys

import pytest

from bench.netns import nat_available
from server.turn import IceServers, credential, expiry_of, mint
from tests.conftest import ROOT


def test_minted_credential_is_the_turn_rest_api_one() -> None:
    user, password = mint(b"s3cret", "ab" * 32, ttl_s=600, now=1_000_000.0)
    assert user == f"1000600:{'ab' * 32}"
    want = base64.b64encode(hmac.new(b"s3cret", user.encode(), hashlib.sha1).digest()).decode()
    assert password == want == credential(b"s3cret", user)
    assert expiry_of(user) == 1_000_600
    assert credential(b"other", user) != password


def test_ice_servers_per_node() -> None:
    ice = IceServers.parse("stun:10.0.0.1:3478, turn:10.0.0.1:3478?transport=udp",
                           secret=b"k", ttl_s=60)
    a, b = ice.for_node("aa" * 32, now=0.0), ice.for_node("bb" * 32, now=0.0)
    assert a[0] == {"urls": "stun:10.0.0.1:3478", "username": "", "credential": ""}
    assert a[1]["username"] == f"60:{'aa' * 32}"
    assert b[1]["username"] == f"60:{'bb' * 32}"
    assert a[1]["credential"] != b[1]["credential"]
    with pytest.raises(ValueError, match="turn-secret-file"):
        IceServers.parse("turn:10.0.0.1:3478").check()


@pytest.mark.timeout(150)
def test_p2p_rounds_across_cone_and_symmetric_nats() -> None:
    why = nat_available()
    if why is not None:
        pytest.skip(f"bench.nat: {why}")
    res = subprocess.run([sys.executable, "-m", "bench.nat", "--rounds", "2", "--timeout", "60"],
                         cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    fig = json.loads(res.stdout.strip().splitlines()[-1])
    # With TURN configured, aioice nominates the first pair whose check answers (aggressive
    # nomination): a cone pair's srflx check can lose that race to its TURN pair on a loaded
    # machine, so the punch-through itself is asserted in the STUN-only phase below.
    assert fig["paths"]["both-cone"] in ("host", "srflx", "relay"), fig
    assert fig["paths"]["both-symmetric"] == "relay", fig
    assert fig["server_relayed_bytes"] == 0, fig
    assert fig["turn_relayed_bytes"] > 0, fig
    assert fig["direct_bytes"] > 0, fig
    assert fig["rounds_committed"] >= 2, fig
    assert fig["tls"] is True, fig
    stun = fig["without_turn"]
    assert stun["paths"]["both-cone"] in ("host", "srflx"), fig  # cone NATs punch through
    assert stun["paths"]["both-symmetric"] == "server", fig  # no TURN: the server relays
    assert stun["server_relayed_bytes"] > 0, fig
    assert stun["turn_relayed_bytes"] == 0, fig
    assert stun["rounds_committed"] >= 2, fig


def test_path_signals_fill_ice_pairs() -> None:
    from server.peers import Peer
    from server.rtc import RtcHub
    from shared.errors import BadUpdate
    from shared.messages import SERVER, Signal

    peer = Peer(node_id="aa" * 32, runtime="native", device="cpu", shard=0, ws=None)

    def path(data: str, to: str = SERVER) -> Signal:
        return Signal(run_id="r", node_id=peer.node_id, to=to, kind="path", data=data)

    RtcHub._on_path(peer, path(json.dumps({"peer": "bb" * 32, "pair": "relay"})))
    RtcHub._on_path(peer, path(json.dumps({"peer": "server", "pair": "srflx"})))
    assert peer.ice_pairs == {"bb" * 32: "relay", "server": "srflx"}
    for bad in ('{"peer": "' + "bb" * 32 + '", "pair": "server"}', "junk", "[]",
                '{"peer": "someone", "pair": "host"}', '{"pair": "host"}'):
        with pytest.raises(BadUpdate):
            RtcHub._on_path(peer, path(bad))
    with pytest.raises(BadUpdate, match="goes to the server"):
        RtcHub._on_path(peer, path('{"peer": "server", "pair": "host"}', to="cc" * 32))
    assert peer.ice_pairs == {"bb" * 32: "relay", "server": "srflx"}


def test_rtc_config_takes_the_welcomes_entries() -> None:
    from transport.rtc import rtc_config

    cfg = rtc_config([{"urls": "stun:10.0.0.1:3478", "username": "", "credential": ""},
                      {"urls": "turn:10.0.0.1:3478?transport=udp", "username": "9:ab",
                       "credential": "c2Vj"}, "turn:10.0.0.2:3478"])
    servers = cfg.iceServers or []
    assert [s.urls for s in servers] == ["stun:10.0.0.1:3478",
                                         "turn:10.0.0.1:3478?transport=udp"]  # one of a kind
    assert servers[0].username is None
    assert (servers[1].username, servers[1].credential) == ("9:ab", "c2Vj")
    assert rtc_config().iceServers == []


def test_a_lost_negotiation_is_retried_once_before_the_relay() -> None:
    from bench.netns import available
    from tests.conftest import in_netns

    if available() is not None:
        pytest.skip(f"no private network namespace: {available()}")
    res = in_netns("tests.ice_restart_scenario", ["6"], timeout=60)
    assert res["dropped"] == 1, res
    assert res["opened"] == [True, True], res
    assert res["restarts"] == [1, 0], res  # the offerer negotiated once more
    assert res["pairs"] == ["host", "host"], res
    assert res["paths"] == 2, res  # each side reported its pair to the server
