"""Data-channel throughput: one 16 MB update frame over a WebRTC data channel.

    python -m bench.transport [--mb 16] [--repeats 3]

aiortc <-> aiortc in one process, inside a private network namespace the bench creates
(bench.netns; every packet stays in it). The frame goes through native_node.rtc.FrameLink:
shared.rtc chunks under the 256 KiB message limit, backpressure on bufferedAmount, and the
receiver's reassembly with its SHA-256 check; the clock stops when the receiver holds the
whole, verified frame. Prints a table and, last, JSON. The Chromium pairings and the server
bytes per round of the star / p2p topologies are not measured yet (null in the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import Any

from bench import netns
from bench.common import emit, print_table


async def aiortc_pair(size: int, repeats: int, *, check_cancel: bool = False
                      ) -> list[dict[str, Any]]:
    from native_node.rtc import FrameLink, connect_pair

    a, b, chan_a, chan_b = await connect_pair()
    done: asyncio.Queue[bytes] = asyncio.Queue()
    sender = FrameLink(chan_a)
    receiver = FrameLink(chan_b, on_frame=done.put_nowait, max_frame=max(size, 16_000_000) + 1024)
    rows = []
    try:
        for i in range(repeats):
            frame = os.urandom(size)
            t0 = time.perf_counter()
            await sender.send_frame(frame)
            got = await asyncio.wait_for(done.get(), timeout=300)
            dt = time.perf_counter() - t0
            assert got == frame
            rows.append({"pair": "aiortc-aiortc", "run": i, "MB": size / 1e6,
                         "seconds": round(dt, 3), "MBps": round(size / 1e6 / dt, 2)})
            print(f"aiortc-aiortc run {i}: {size / 1e6:.1f} MB in {dt:.2f} s", file=sys.stderr)
        if check_cancel:  # a transfer cancelled mid-way is dropped; the channel goes on
            cancel = asyncio.Event()
            asyncio.get_running_loop().call_later(0.05, cancel.set)
            assert not await sender.send_frame(os.urandom(16_000_000), cancel=cancel)
            small = os.urandom(1000)
            await sender.send_frame(small)
            assert await asyncio.wait_for(done.get(), timeout=60) == small
            assert receiver.reasm.cancelled == 1 and not receiver.reasm.open
            print("cancel mid-transfer: dropped by the receiver, channel still usable",
                  file=sys.stderr)
    finally:
        await a.close()
        await b.close()
    assert not receiver.errors, receiver.errors
    return rows


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=16.0, help="frame size in MB (10^6 bytes)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check-cancel", action="store_true",
                   help="also cancel a 16 MB transfer mid-way and check the channel recovers")
    args = p.parse_args(args_list)
    if not netns.inside():
        why = netns.available()
        if why is not None:
            print(f"error: this bench needs a private network namespace: {why}",
                  file=sys.stderr)
            return 2
        return netns.rerun_inside("bench.transport", args_list)
    rows = asyncio.run(aiortc_pair(int(args.mb * 1e6), args.repeats,
                                   check_cancel=args.check_cancel))
    print_table(rows, ["pair", "run", "MB", "seconds", "MBps"])
    emit({"MBps": {"aiortc-aiortc": round(statistics.median(r["MBps"] for r in rows), 2),
                   "aiortc-chromium": None, "chromium-chromium": None},
          "frame_mb": args.mb, "repeats": args.repeats,
          "server_bytes_per_round": None, "peer_bytes_over_update": None,
          "not_measured": "Chromium pairings and star/p2p server bytes: not built yet"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
