"""Speed-ups for aiortc's pure-Python SCTP, installed by `install()`: a process that wants them
calls it explicitly (`python -m server`, `python -m native_node` and the transport benchmarks
do; importing this module or transport.rtc patches nothing). They replace private aiortc
internals, so `install()` applies them only to the aiortc versions they were tested on
(TESTED_AIORTC); on any other version it logs why and leaves aiortc as it is.

The data plane's throughput is bounded by CPU in aiortc's SCTP, not by the network: profiled
on a 16 MB frame (bench.transport), the largest single cost was reassembly.

Reassembly without the quadratic rescan. `InboundStream.pop_messages` walks the stream's
whole reassembly list after every DATA chunk. A data-channel message of 256 KiB arrives as
~220 chunks, so each message costs ~220^2/2 steps (1.7 million `tsn_plus_one` calls and a
sixth of both peers' CPU for one 16 MB frame). A message can only complete when its LAST
fragment is held, and the walk changes nothing unless it reaches one, so the stream here
counts the LAST fragments it holds and skips the walk while there are none: exactly the
same messages, in the same order, from the same state.

In-order arrival without the bookkeeping walk. `_mark_received` puts every TSN into the
out-of-order set, sorts it and filters two lists, even for the next TSN in sequence with
nothing out of order (nearly every packet); that case now just advances the cumulative TSN.

Delayed acknowledgement (RFC 4960 section 6.2). aiortc answers every packet that carries
DATA with its own SACK packet: a third of all packets, each one built, DTLS-encrypted, sent,
received, decrypted, parsed and processed by the sender. The RFC's rule is a SACK for at
least every second DATA packet, and within 200 ms of the first unacknowledged one. Here a
SACK is sent for every second packet, at once whenever something is out of order (gaps or
duplicates, so fast retransmit is unchanged) or the association is not established, and
otherwise after at most SACK_DELAY_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from importlib import metadata
from typing import Any

from aiortc import rtcsctptransport as sctp
from aiortc.utils import uint32_gt

log = logging.getLogger("transport.sctp_tuning")
TESTED_AIORTC = ("1.16",)  # major.minor versions whose SCTP internals this file was checked on

_Base = sctp.InboundStream
_STOCK = (sctp.InboundStream, sctp.RTCSctpTransport._send_sack,
          sctp.RTCSctpTransport._mark_received)
LAST = sctp.SCTP_DATA_LAST_FRAG


class FastInboundStream(_Base):
    """aiortc's InboundStream, with the reassembly walk skipped while no message can be
    complete (no LAST fragment held)."""

    def __init__(self) -> None:
        super().__init__()
        self.lasts = 0  # LAST fragments in self.reassembly

    def _recount(self) -> None:
        self.lasts = sum(1 for c in self.reassembly if c.flags & LAST)

    def add_chunk(self, chunk: sctp.DataChunk) -> None:
        before = len(self.reassembly)
        super().add_chunk(chunk)
        if len(self.reassembly) != before and chunk.flags & LAST:
            self.lasts += 1

    def pop_messages(self) -> Iterator[tuple[int, int, bytes]]:
        if not self.lasts:
            return
        try:
            yield from super().pop_messages()
        finally:
            self._recount()

    def prune_chunks(self, tsn: int) -> int:
        try:
            return int(super().prune_chunks(tsn))
        finally:
            self._recount()


SACK_DELAY_S = 0.005  # an odd packet's SACK waits at most this long (RFC 4960: < 0.2 s)
_send_sack_now = sctp.RTCSctpTransport._send_sack


async def _send_sack_delayed(self: Any) -> None:  # Any: it keeps its own attributes
    """Replaces RTCSctpTransport._send_sack: acknowledge every second DATA packet."""
    held = getattr(self, "_daa_held", 0)
    if (held or self._sack_misordered or self._sack_duplicates
            or self._association_state != sctp.RTCSctpTransport.State.ESTABLISHED):
        timer = getattr(self, "_daa_timer", None)
        if timer is not None:
            timer.cancel()
            self._daa_timer = None
        self._daa_held = 0
        await _send_sack_now(self)
        return
    self._daa_held = 1
    loop = asyncio.get_running_loop()
    self._daa_timer = loop.call_later(SACK_DELAY_S, _flush, self)


def _flush(self: Any) -> None:
    self._daa_timer = None
    if not self._daa_held:
        return
    self._daa_held = 0
    if self._sack_needed and self._association_state == sctp.RTCSctpTransport.State.ESTABLISHED:
        self._daa_flush = asyncio.ensure_future(_send_held(self))


async def _send_held(self: Any) -> None:
    with contextlib.suppress(ConnectionError):  # the association closed meanwhile
        await _send_sack_now(self)


_mark_received_walk = sctp.RTCSctpTransport._mark_received


def _mark_received(self: Any, tsn: int) -> bool:
    """Replaces RTCSctpTransport._mark_received: same result, O(1) for the in-order case."""
    if self._sack_misordered or tsn != sctp.tsn_plus_one(self._last_received_tsn):
        return bool(_mark_received_walk(self, tsn))
    self._last_received_tsn = tsn
    if self._sack_duplicates:
        self._sack_duplicates = [x for x in self._sack_duplicates if uint32_gt(x, tsn)]
    return False


def aiortc_version() -> str:
    try:
        return metadata.version("aiortc")
    except metadata.PackageNotFoundError:
        return "unknown"


def supported(version: str) -> bool:
    """True when `version` is one of the aiortc releases the patches were tested on."""
    return ".".join(version.split(".")[:2]) in TESTED_AIORTC


def install(*, version: str | None = None) -> bool:
    """Patch aiortc: FastInboundStream for every inbound stream, the in-order fast path,
    delayed SACKs. Idempotent. Returns False (and patches nothing) on an untested aiortc."""
    version = aiortc_version() if version is None else version
    if not supported(version):
        log.warning("aiortc %s is not one of the tested versions %s: SCTP tuning not applied "
                    "(the data plane still works, at stock aiortc speed)", version,
                    ", ".join(TESTED_AIORTC))
        return False
    _patch(FastInboundStream, _send_sack_delayed, _mark_received)
    return True


def installed() -> bool:
    return sctp.InboundStream is FastInboundStream


def _patch(stream: type, send_sack: Any, mark_received: Any) -> None:
    setattr(sctp, "InboundStream", stream)  # noqa: B010
    setattr(sctp.RTCSctpTransport, "_send_sack", send_sack)  # noqa: B010
    setattr(sctp.RTCSctpTransport, "_mark_received", mark_received)  # noqa: B010


def uninstall() -> None:
    """Back to aiortc's own code (bench.transport --stock-sctp measures it)."""
    _patch(*_STOCK)
