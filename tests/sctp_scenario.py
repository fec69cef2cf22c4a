"""Run inside a private network namespace by tests/test_sctp_tuning.py: two aiortc peers in
this process (transport.rtc, so with transport.sctp_tuning installed) send frames over one
data channel, first clean, then with the receiver losing a share of the DTLS records after the
handshake (a seeded drop at its ICE transport: this machine has no netem or packet filter to
lose them in the kernel). Counts the receiver's DATA packets and the SACK packets it sends.
`python -m tests.sctp_scenario FRAME_BYTES LOSS [stock]` (stock: aiortc's own SCTP code);
prints JSON last."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from typing import Any

from aiortc import rtcsctptransport as sctp

from transport import sctp_tuning
from transport.rtc import FrameLink, connect_pair


async def main(size: int, loss: float) -> dict[str, Any]:
    a, b, chan_a, chan_b = await connect_pair()
    got: asyncio.Queue[bytes] = asyncio.Queue()
    sender, receiver = FrameLink(chan_a), FrameLink(chan_b, on_frame=got.put_nowait)
    rx_sctp, tx_sctp = b.sctp, a.sctp
    assert rx_sctp is not None
    assert tx_sctp is not None
    rx = rx_sctp.transport  # the receiver's RTCDtlsTransport
    counts = {"data_packets": 0, "sacks": 0, "dropped": 0, "retransmits": 0}
    rng = random.Random(7)
    drop = {"p": 0.0}

    recv = rx.transport._recv

    async def lossy_recv() -> bytes:
        while True:
            data: bytes = await recv()
            if 19 < data[0] < 64 and rng.random() < drop["p"]:
                counts["dropped"] += 1
                continue
            return data

    rx.transport._recv = lossy_recv
    handle, send_chunk = rx_sctp._handle_data, rx_sctp._send_chunk

    async def counting_handle(data: bytes) -> None:
        if any(isinstance(c, sctp.DataChunk) for c in sctp.parse_packet(data)[3]):
            counts["data_packets"] += 1
        await handle(data)

    async def counting_send(chunk: sctp.Chunk) -> None:
        counts["sacks"] += isinstance(chunk, sctp.SackChunk)
        await send_chunk(chunk)

    # counting wrappers patched onto the live objects
    rx_sctp._handle_data = counting_handle  # type: ignore[method-assign]
    rx_sctp._send_chunk = counting_send  # type: ignore[method-assign]
    tx_send = tx_sctp._send_chunk

    async def counting_tx(chunk: sctp.Chunk) -> None:
        counts["retransmits"] += isinstance(chunk, sctp.DataChunk) and chunk._sent_count > 1
        await tx_send(chunk)

    tx_sctp._send_chunk = counting_tx  # type: ignore[method-assign]
    result: dict[str, Any] = {}
    try:
        for phase, p in (("clean", 0.0), ("lossy", loss)):
            for k in counts:
                counts[k] = 0
            drop["p"] = p
            frames = [os.urandom(size), os.urandom(1000), os.urandom(size // 3)]
            for frame in frames:
                await sender.send_frame(frame)
            arrived = [await asyncio.wait_for(got.get(), 120) for _ in frames]
            result[phase] = {**counts, "intact": arrived == frames}
    finally:
        await a.close()
        await b.close()
    result["receiver_errors"] = sorted(receiver.errors)
    return result


if __name__ == "__main__":
    if sys.argv[3:] != ["stock"]:
        sctp_tuning.install()
    print(json.dumps(asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))))
