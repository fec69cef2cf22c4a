"""transport.sctp_tuning: the faster reassembly and in-order bookkeeping give exactly what
aiortc's own code gives, on random arrival orders; and over a real data channel (private
network namespace) SACKs go down to about one per two DATA packets while frames still arrive
whole, also when the receiver loses records."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import TypeVar, cast

import pytest
from aiortc import rtcsctptransport as sctp

from bench.netns import available
from tests.conftest import in_netns
from transport import sctp_tuning

STOCK_STREAM, STOCK_MARK = sctp_tuning._STOCK[0], sctp_tuning._STOCK[2]
T = TypeVar("T")


def message_chunks(rng: random.Random, tsn0: int, n_messages: int) -> list[sctp.DataChunk]:
    """Chunks of n messages on one stream (ordered and unordered mixed), consecutive TSNs
    from tsn0 (wrapping at 2^32), with the flags and stream sequence numbers aiortc sends."""
    out, tsn, seq = [], tsn0, 0
    for m in range(n_messages):
        unordered = rng.random() < 0.3
        frags = rng.choice([1, 1, 2, 3, 7, 40])
        for i in range(frags):
            flags = (sctp.SCTP_DATA_FIRST_FRAG if i == 0 else 0) | (
                sctp.SCTP_DATA_LAST_FRAG if i == frags - 1 else 0) | (
                sctp.SCTP_DATA_UNORDERED if unordered else 0)
            c = sctp.DataChunk(flags=flags)
            c.tsn, c.stream_id, c.stream_seq, c.protocol = tsn, 1, seq % 65536, 51
            c.user_data = f"m{m}f{i}".encode()
            out.append(c)
            tsn = (tsn + 1) % 2**32
        if not unordered:
            seq += 1
    return out


def jitter(rng: random.Random, items: list[T], window: int) -> list[T]:
    """items with each moved at most `window` places (network reordering)."""
    keyed = sorted(((i + rng.uniform(0, window), x) for i, x in enumerate(items)),
                   key=lambda kx: kx[0])
    return [x for _, x in keyed]


@pytest.mark.parametrize("seed", range(40))
def test_fast_inbound_stream_yields_what_aiortc_yields(seed: int) -> None:
    rng = random.Random(seed)
    tsn0 = rng.choice([0, 2**32 - 5, rng.randrange(2**32)])
    chunks = jitter(rng, message_chunks(rng, tsn0, rng.randint(1, 30)), rng.choice([0, 3, 50]))
    stock, fast = STOCK_STREAM(), sctp_tuning.FastInboundStream()
    for i, chunk in enumerate(chunks):
        stock.add_chunk(chunk)
        fast.add_chunk(chunk)
        assert list(fast.pop_messages()) == list(stock.pop_messages())
        assert [c.tsn for c in fast.reassembly] == [c.tsn for c in stock.reassembly]
        assert fast.sequence_number == stock.sequence_number
        assert fast.lasts == sum(1 for c in fast.reassembly if c.flags & sctp.SCTP_DATA_LAST_FRAG)
        if i % 17 == 16:  # a FORWARD TSN prunes up to some TSN
            upto = chunk.tsn
            assert fast.prune_chunks(upto) == stock.prune_chunks(upto)
            assert [c.tsn for c in fast.reassembly] == [c.tsn for c in stock.reassembly]


@pytest.mark.parametrize("seed", range(40))
def test_in_order_fast_path_matches_the_walk(seed: int) -> None:
    rng = random.Random(seed)
    start = rng.choice([0, 2**32 - 3, rng.randrange(2**32)])
    tsns = [(start + i) % 2**32 for i in range(1, 300)]
    arrivals = jitter(rng, tsns, rng.choice([0, 2, 20]))
    arrivals += rng.sample(tsns, 20)  # duplicates, late and early
    arrivals = jitter(rng, arrivals, 5)

    def state(last: int) -> sctp.RTCSctpTransport:
        # a stand-in holding just the fields that _mark_received reads and writes
        return cast(sctp.RTCSctpTransport, SimpleNamespace(
            _last_received_tsn=last, _sack_misordered=set(), _sack_duplicates=[]))

    stock, fast = state(start), state(start)
    for tsn in arrivals:
        assert sctp_tuning._mark_received(fast, tsn) == STOCK_MARK(stock, tsn)
        assert (fast._last_received_tsn, fast._sack_misordered, fast._sack_duplicates) == (
            stock._last_received_tsn, stock._sack_misordered, stock._sack_duplicates)


@pytest.mark.skipif(available() is not None, reason=f"no private network namespace: "
                                                    f"{available()}")
def test_delayed_sacks_over_a_real_channel_with_loss() -> None:
    out = in_netns("tests.sctp_scenario", ["3000000", "0.03"], timeout=120)
    assert out["receiver_errors"] == []
    for phase in ("clean", "lossy"):
        r = out[phase]
        assert r["intact"], r
        assert r["data_packets"] > 2000
        # RFC 4960 6.2: at least one SACK per two DATA packets; aiortc alone sends one each
        assert r["data_packets"] / 2 <= r["sacks"] <= 0.75 * r["data_packets"], r
    assert out["lossy"]["dropped"] > 30
    assert out["lossy"]["retransmits"] > 0


def test_importing_patches_nothing_and_install_is_version_guarded() -> None:
    """Importing transport.rtc leaves aiortc as it is; install() patches only a tested aiortc."""
    import subprocess
    import sys

    code = ("import transport.rtc\nfrom transport import sctp_tuning as t\n"
            "assert not t.installed()\nassert not t.install(version='9.9.0')\n"
            "assert not t.installed()\nassert t.install(version='1.16.3')\nassert t.installed()\n"
            "t.uninstall()\nassert not t.installed()\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert sctp_tuning.supported(sctp_tuning.aiortc_version())  # the pinned range is tested
