"""Our p2p reduction by itself, for bench.vs_hivemind: N peers averaging one float32 tensor each.

Each peer is its own process running native_node.p2p.P2PRole, the code a native node runs in
a `p2p` round: shared.p2p.ShardReducer (reduce-scatter to the shards' owners, all-gather of the
reduced shards), ML-DSA-65-signed Shard frames, aiortc data channels (native_node.mesh,
transport.rtc: chunked, back-pressured, digest-checked) on loopback. The parent stands in for
the server: it relays the peers' Signals (SDP offers and answers), hands every peer the
round's ShardPlan (shared.p2p.make_plan: one shard per member, `replicas` owners each) and
takes the owners' results as the server would (their bytes are counted, then dropped: nothing
checks them here). Round 0 opens the channels and is not timed.

Per round and peer: seconds from the plan to holding the whole aggregate, bytes sent (every
signed frame on a channel or to the server) and received, and the aggregate's SHA-256 (all
peers must agree); peer 0 also returns its aggregate of the last round, for the error.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

RUN_ID = "vs-hivemind"
REPO = Path(__file__).resolve().parents[1]


def tensor(seed: int, index: int, size: int) -> np.ndarray:
    """Peer `index`'s tensor (the hivemind side draws the very same ones)."""
    return np.random.default_rng([seed, index]).standard_normal(size).astype(np.float32)


async def _send(writer: asyncio.StreamWriter, tag: bytes, body: bytes) -> None:
    writer.write(struct.pack("!I", len(body) + 1) + tag + body)
    await writer.drain()


async def _recv(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    (n,) = struct.unpack("!I", await reader.readexactly(4))
    data = await reader.readexactly(n)
    return data[:1], data[1:]


# -- a peer (its own process) -----------------------------------------------------------------
class RssPeak:
    """This process's peak RSS while running, sampled every 2 ms by a thread (VmHWM misses
    buffers unmapped before it is read)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self.now()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.now())

    def growth(self) -> int:
        self.stop.set()
        self.thread.join()
        return max(self.peak, self.now()) - self.start


async def peer_main(index: int, port: int, size: int, seed: int, stream_chunk: int = 0
                    ) -> None:
    from native_node.p2p import P2PRole
    from shared.envelope import Identity
    from shared.messages import Message, ShardPlan, decode_message, new_nonce

    ident = Identity.generate()
    me = ident.node_id
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    meter = {"sent": 0, "recv": 0}

    def frame(msg: Message) -> bytes:
        msg = dataclasses.replace(msg, nonce=new_nonce())  # type: ignore[type-var]
        sign = ident.signer(run_id=RUN_ID, round_=getattr(msg, "round", -1),
                            msg_type=msg.TYPE, nonce=msg.nonce)
        return msg.to_frame(sign=sign)

    async def send_ws(data: bytes) -> None:
        meter["sent"] += len(data)
        await _send(writer, b"S", data)

    role = P2PRole(me, RUN_ID, frame, send_ws, timeout_s=120.0, stream_chunk=stream_chunk)
    mesh_send, on_frame = role.mesh.send, role.mesh.on_frame

    async def counted_send(peer: str, data: bytes, **kw: Any) -> bool:
        ok = await mesh_send(peer, data, **kw)
        meter["sent"] += len(data) if ok else 0
        return ok

    def counted_frame(peer: str, data: bytes) -> Any:
        meter["recv"] += len(data)
        return on_frame(peer, data)

    role.mesh.send = counted_send  # type: ignore[method-assign,assignment]
    role.mesh.on_frame = counted_frame
    mine = tensor(seed, index, size)
    await _send(writer, b"H", me.encode())
    waiters: set[asyncio.Task[None]] = set()

    async def reduce(r: int, plan: dict[str, Any], codec: str, last: bool) -> None:
        sent0, recv0 = meter["sent"], meter["recv"]
        rss = RssPeak()
        role.trained(r, mine)
        t0 = time.perf_counter()
        role.put(ShardPlan(run_id=RUN_ID, round=r, plan=plan, rule="mean",
                           byzantine_fraction=0.0, result_codec=codec))
        while role.aggregate_round != r:
            await asyncio.sleep(0.002)
        took = time.perf_counter() - t0
        growth = rss.growth()  # before the figures below copy the aggregate
        agg = role.aggregate
        assert agg is not None
        await _send(writer, b"D", json.dumps({
            "round": r, "seconds": took, "sent": meter["sent"] - sent0,
            "recv": meter["recv"] - recv0, "sha": hashlib.sha256(agg.data).hexdigest(),
            "rss_growth": growth,
            "max_frame": role.pieces.max_frame, "resent": role.pieces.pieces_resent,
        }).encode())
        if last and index == 0:
            await _send(writer, b"A", agg.astype("<f4").tobytes())

    try:
        while True:
            tag, body = await _recv(reader)
            if tag == b"F":
                msg = decode_message(body, max_payload=len(body) + 1024)
                await role.on_signal(msg.node_id, msg.kind, msg.data)  # type: ignore[attr-defined]
            elif tag == b"P":
                job = json.loads(body)
                task = asyncio.ensure_future(reduce(job["round"], job["plan"], job["codec"],
                                                    job["last"]))
                waiters.add(task)
                task.add_done_callback(waiters.discard)
            elif tag == b"Q":
                break
    finally:
        await role.close()
        writer.close()


# -- the parent: relay, plans, figures ----------------------------------------------------------
async def run_ours(*, peers: int, size: int, codec: str, rounds: int, seed: int = 0,
                   replicas: int = 2, timeout: float = 600, stream_chunk: int = 0,
                   env: dict[str, str] | None = None) -> dict[str, Any]:
    """N peer processes reduce their tensors `rounds` times after one untimed round
    (`stream_chunk` > 0: a streamed reduction, shards no larger than it: shared.p2p_stream)."""
    from shared.messages import decode_message
    from shared.p2p import make_plan

    ids: dict[int, str] = {}
    writers: dict[str, asyncio.StreamWriter] = {}
    stats: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    agg: list[bytes] = []
    joined, got_agg = asyncio.Event(), asyncio.Event()
    to_server = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tag, body = await _recv(reader)
        index, me = len(ids), body.decode()  # registration order; the plan uses the ids
        ids[index], writers[me] = me, writer
        if len(ids) == peers:
            joined.set()
        with_exc = (asyncio.IncompleteReadError, ConnectionError)
        try:
            while True:
                tag, body = await _recv(reader)
                if tag == b"S":
                    msg = decode_message(body, max_payload=len(body) + 1024)
                    to = getattr(msg, "to", "")
                    if type(msg).__name__ == "Signal" and to in writers:
                        await _send(writers[to], b"F", body)
                    else:
                        to_server[0] += len(body)
                elif tag == b"D":
                    await stats.put(json.loads(body))
                elif tag == b"A":
                    agg.append(body)
                    got_agg.set()
        except with_exc:
            return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.p2p_peers", "--peer", str(i), "--port", str(port),
        "--size", str(size), "--seed", str(seed), "--stream-chunk", str(stream_chunk),
        cwd=REPO, env={**os.environ, **(env or {})}) for i in range(peers)]
    rows: list[list[dict[str, Any]]] = []
    try:
        await asyncio.wait_for(joined.wait(), timeout)
        members = [ids[i] for i in range(peers)]
        for r in range(rounds + 1):
            plan = make_plan(r, members, size, replicas=replicas,
                             max_shard=stream_chunk // 4).to_dict()
            job = json.dumps({"round": r, "plan": plan, "codec": codec,
                              "last": r == rounds}).encode()
            for m in members:
                await _send(writers[m], b"P", job)
            rows.append([await asyncio.wait_for(stats.get(), timeout) for _ in members])
        await asyncio.wait_for(got_agg.wait(), timeout)  # peer 0's, sent after its figures
        for m in members:
            await _send(writers[m], b"Q", b"")
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 60)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        server.close()
    timed = rows[1:]
    if any(len({s["sha"] for s in row}) != 1 for row in rows):
        raise RuntimeError("peers ended a round holding different aggregates")
    per_round = [max(s["seconds"] for s in row) for row in timed]
    return {"peers": peers, "codec": codec, "replicas": replicas,
            "round_s": round(float(np.median(per_round)), 4),
            "rounds_s": [round(x, 4) for x in per_round],
            "MB_per_peer": round(float(np.mean([s["sent"] for row in timed for s in row]))
                                 / 1e6, 3),
            "MB_recv_per_peer": round(float(np.mean([s["recv"] for row in timed
                                                     for s in row])) / 1e6, 3),
            # round 0, each peer's first reduction: later rounds start holding the last one's
            # reducer and aggregate, whose memory the new round reuses
            "owner_rss_growth_mb": round(max(s["rss_growth"] for s in rows[0]) / 2**20, 1),
            "max_shard_frame": max(s["max_frame"] for row in timed for s in row),
            "aggregate": np.frombuffer(agg[0], dtype="<f4") if agg else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.p2p_peers", description=__doc__)
    p.add_argument("--peer", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream-chunk", type=int, default=0)
    args = p.parse_args(argv)
    from transport import evloop

    prof_dir = os.environ.get("DAA_P2P_PROFILE")  # a folder: cProfile of each peer there
    if prof_dir is None:
        evloop.run(peer_main(args.peer, args.port, args.size, args.seed, args.stream_chunk))
        return 0
    import cProfile

    cProfile.runctx("evloop.run(peer_main(args.peer, args.port, args.size, args.seed))",
                    globals(), locals(), f"{prof_dir}/peer{args.peer}.prof")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
