"""What secure aggregation costs in a live round: the real coordinator (server.secagg_round)
and the one participant implementation (shared.participant), all in this process, over memory.

    python -m bench.secagg_run [--models mlp-digits gpt-tiny] [--nodes 4 16] [--seed 0]

Per node count, three rounds on the same precomputed updates (no training, so the round time
is the protocol's): `plain` (secagg off, codec raw32), `secagg`, and `secagg` with a third of
the nodes dropping right after their masked update was accepted. Measured:

- up_kb / down_kb: what each node sent / received in the round, every frame (the coordinator's
  per-peer byte counters; includes Hello / Welcome / RoundOpen), mean over nodes;
- up_ratio: a node's bytes sent with secagg / without (the live round's expansion);
- round_s: wall time from the updates being ready to the commit (every node's and the
  server's CPU share this process's 2 cores: signing, ML-KEM, masks, unmasking);
- exact: the sum the server unmasked equals the plain fixed-point sum of the updates (and the
  committed params are the outer step of that exact mean).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np

from server.coordinator import Coordinator
from server.peers import Connection
from server.runstate import open_run
from shared.envelope import Identity
from shared.frame import decode_frame
from shared.messages import Message, message_from_frame
from shared.outer import OuterConfig, outer_step
from shared.participant import Participant

Tamper = Callable[["Live", Message], Message]


class Live:
    """One participant over an in-memory connection: every frame it answers goes back (a
    `tamper` may rewrite what it sends, re-signed as itself: tests' bad input)."""

    def __init__(self, coord: Coordinator, tamper: Tamper | None = None) -> None:
        self.coord, self.tamper = coord, tamper
        self.part = Participant(Identity.generate(), runtime="native", agent="bench",
                                device="cpu")
        self.inbox: list[bytes] = []
        self.conn = Connection(ws=self, remote="mem")
        self.trains: list[dict[str, Any]] = []
        self.plain: dict[int, bytes] = {}
        self.errors: list[tuple[str, str]] = []
        self.acks = 0
        self.gone = False

    async def send_bytes(self, data: bytes) -> None:
        self.inbox.append(data)

    async def close(self) -> None:
        return None

    async def pump(self) -> None:
        while self.inbox and not self.gone:
            for ev in self.part.receive(self.inbox.pop(0)):
                await self.on_event(ev)

    async def on_event(self, ev: dict[str, Any]) -> None:
        kind = ev["kind"]
        if kind == "send":
            data = bytes(ev["frame"])
            if self.tamper is not None:
                msg = message_from_frame(decode_frame(data), max_payload=1 << 28)
                changed = self.tamper(self, msg)
                if changed is not msg:
                    data = self.part.frame(changed)
            await self.coord.handle_frame(self.conn, data)
        elif kind == "train":
            self.trains.append(ev)
        elif kind == "ack":
            self.acks += 1
        elif kind == "secagg" and ev["stage"] == "masked":
            self.plain[ev["round"]] = bytes(ev["plain"])
        elif kind in ("error", "refused", "fatal"):
            self.errors.append((ev.get("code", kind), ev["message"]))

    async def train(self, delta: np.ndarray) -> None:
        r = self.trains[-1]["round"]
        for ev in self.part.submit(r, delta.astype("<f4").tobytes(), train_loss=1.0,
                                   samples=8, compute_s=0.1):
            await self.on_event(ev)

    def leave(self) -> None:
        self.gone = True
        self.coord.disconnect(self.conn)


async def until(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def live_run(data_dir: Path, nodes: int, tampers: dict[int, Tamper] | None = None,
                   **config: Any) -> AsyncIterator[tuple[Coordinator, list[Live]]]:
    """A coordinator with `nodes` joined participants, its round loop and their pumps."""
    run = open_run(data_dir, {"model": "mlp-digits", "quorum": 2, "deadline_s": 60.0,
                              "rounds": 1, **config})
    coord = Coordinator(run)
    lives = [Live(coord, (tampers or {}).get(i)) for i in range(nodes)]
    for live in lives:
        await coord.greet(live.conn)
        await live.pump()
    task = asyncio.create_task(coord.run_rounds())

    async def pumping() -> None:
        while True:
            for live in lives:
                await live.pump()
            await asyncio.sleep(0.002)

    pump = asyncio.create_task(pumping())
    try:
        yield coord, lives
    finally:
        for t in (pump, task):
            t.cancel()
            await asyncio.wait([t], timeout=1)


def committed_as(coord: Coordinator, start: tuple[np.ndarray, np.ndarray],
                 plains: list[bytes]) -> bool:
    """Whether the round committed theta0 - step(exact fixed-point sum / n) and the server's
    unmasked sum is that sum."""
    theta0, mom0 = start
    ring = np.zeros(len(theta0), dtype=np.uint32)
    for p in plains:
        ring += np.frombuffer(p, dtype="<u4")
    last = coord.status()["secagg"]["last"]
    if last.get("sum_sha256") != hashlib.sha256(ring.astype("<u4").tobytes()).hexdigest():
        return False
    mean = (ring.view(np.int32).astype(np.float64) / 2 ** last["frac_bits"]
            / len(plains)).astype(np.float32)
    cfg = coord.config
    want, _ = outer_step(theta0, mean, mom0, OuterConfig(lr=cfg.outer_lr,
                                                         momentum=cfg.outer_momentum))
    return bool(np.array_equal(np.asarray(coord.run.params), np.asarray(want)))


async def one(data_dir: Path, model: str, n: int, mode: str, seed: int) -> dict[str, Any]:
    secagg = mode != "plain"
    drop = n // 3 if mode == "dropout" else 0
    async with live_run(data_dir, n, model=model, quorum=n - drop, secagg=secagg,
                        secagg_timeout_s=30.0, deadline_s=300.0) as (coord, lives):
        await until(lambda: all(lv.trains for lv in lives), "the round")
        start = (np.asarray(coord.run.params).copy(), np.asarray(coord.run.momentum).copy())
        rng = np.random.default_rng(seed)
        ds = [rng.uniform(-0.05, 0.05, coord.run.n_params).astype(np.float32) for _ in lives]
        if secagg:
            await until(lambda: coord.status()["secagg"]["stage"] == "masking", "the keys")
        t0 = time.perf_counter()
        for lv, d in zip(lives[:drop], ds, strict=False):  # these drop after submitting
            await lv.train(d)
        await until(lambda: all(lv.acks for lv in lives[:drop]), "the droppers' updates")
        for lv in lives[:drop]:
            lv.leave()
        for lv, d in zip(lives[drop:], ds[drop:], strict=True):
            await lv.train(d)
        await until(lambda: coord.run.version == 1, "the commit", timeout=600)
        round_s = time.perf_counter() - t0
        peers = [coord.peers[lv.part.node_id] for lv in lives]
        exact = committed_as(coord, start, [lv.plain[0] for lv in lives]) if secagg else None
        errors = sum(len(lv.errors) for lv in lives)
    return {"model": model, "nodes": n, "mode": mode, "dropped": drop, "n_params": len(start[0]),
            "up_kb": round(float(np.mean([p.bytes_up for p in peers])) / 1024, 1),
            "down_kb": round(float(np.mean([p.bytes_down for p in peers])) / 1024, 1),
            "round_s": round(round_s, 3), "exact": exact, "node_errors": errors}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mlp-digits", "gpt-tiny"])
    p.add_argument("--nodes", type=int, nargs="+", default=[4, 16])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for n in args.nodes:
                for mode in ("plain", "secagg", "dropout"):
                    rows.append(asyncio.run(one(Path(tmp) / f"{model}-{n}-{mode}", model, n,
                                                mode, args.seed)))
    print(f"{'model':>10} {'params':>7} {'nodes':>5} {'mode':>8} {'dropped':>7} {'up KB':>9} "
          f"{'down KB':>9} {'round s':>8} {'exact':>6}")
    for r in rows:
        print(f"{r['model']:>10} {r['n_params']:>7} {r['nodes']:>5} {r['mode']:>8} "
              f"{r['dropped']:>7} {r['up_kb']:>9} {r['down_kb']:>9} {r['round_s']:>8} "
              f"{r['exact']!s:>6}")
    plain = {(r["model"], r["nodes"]): r for r in rows if r["mode"] == "plain"}
    ratio = {f"{r['model']}/{r['nodes']}": round(
        r["up_kb"] / plain[r["model"], r["nodes"]]["up_kb"], 3)
        for r in rows if r["mode"] == "secagg"}
    secure = [r for r in rows if r["mode"] != "plain"]
    print(json.dumps({"models": args.models, "nodes": args.nodes, "rows": rows,
                      "up_ratio": ratio,
                      "exact": all(r["exact"] for r in secure),
                      "node_errors": sum(r["node_errors"] for r in rows)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
