"""Live-server fuzzing (`python -m bench.fuzz_frames --live --seconds N [--url URL] [--seed S]`).

Starts `python -m server` on 127.0.0.1 (or targets --url) and drives real frames into it over
its WebSocket with a registered identity (Challenge, signed Hello, like a node), so that the
semantic fields are fuzzed, not only the framing: a seeded mutator takes a valid Submit,
Ready, Verdict, Signal or Shard header and replaces, drops or adds fields (huge and negative
integers, floats near the double limit, wrong JSON types, long strings, nested objects), then
signs the frame with the node's key; every few inputs it also breaks the bytes (duplicate keys,
whitespace, trailing data). A CRASH is: the server process exits or stops answering, an API
endpoint (/api/run, /api/rounds, /api/peers, /api/rejections) answers something that is not
strict JSON, or the server acknowledges a frame that the schema (shared.messages, decoded
locally) refuses, i.e. an accepted invalid value. The last stdout line is JSON with `live`
(true), `inputs`, `crashes`, `seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import emit, print_table
from bench.live import Client, api_ok, running_server
from shared.envelope import Identity, new_nonce
from shared.errors import ProtocolError
from shared.messages import (
    Ack,
    Error,
    Ready,
    RoundOpen,
    Shard,
    Signal,
    Submit,
    Verdict,
    decode_message,
)

INTERESTING: list[Any] = [
    0, -1, 1, 2**31 - 1, 2**31, 2**53 - 1, 2**53, 2**63 - 1, 2**63, 10**20, -(10**20), 10**400,
    0.0, -0.0, 1e-320, 1.7e308, -1.7e308, 1e9, 1e9 + 1, 0.5, 1e12, 1e12 + 1,
    True, False, None, "", "x" * 9000, "0" * 64, "ab" * 32, "\u00e9\u2603", [], [1, 2], {},
    {"a": {"b": {"c": 1}}}, [{"node_id": "ab" * 32, "digest": "cd" * 32, "loss": 1e300}],
]
TYPES = (Submit, Ready, Verdict, Signal, Shard)


def base_header(c: Client, cls: type, rng: random.Random) -> tuple[dict[str, Any], bytes]:
    """A valid header (and payload) of `cls` from this node."""
    assert c.welcome is not None
    assert c.open is not None
    node, run, rnd = c.ident.node_id, c.welcome.run_id, c.open.round
    if cls is Submit:
        return c.submit_header()
    if cls is Ready:
        return {"run_id": run, "round": rnd, "node_id": node, "nonce": new_nonce(),
                "length": c.welcome.n_params, "digest": "ab" * 32, "train_loss": 1.0,
                "samples": 10, "compute_s": 0.5}, b""
    if cls is Verdict:
        return {"run_id": run, "round": rnd, "node_id": node, "nonce": new_nonce(),
                "base_loss": 2.0, "scores": [{"node_id": node, "digest": "cd" * 32,
                                              "loss": 1.5}]}, b""
    if cls is Signal:
        return {"run_id": run, "node_id": node, "to": "server", "kind": "bye", "data": "",
                "nonce": new_nonce()}, b""
    return {"run_id": run, "round": rnd, "node_id": node, "to": "server", "kind": "result",
            "shard": 0, "revision": 0, "nonce": new_nonce()}, b"\x00" * 8


def mutate(header: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    out = dict(header)
    keys = [k for k in out if k not in ("nonce", "node_id", "run_id")] or list(out)
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        key = rng.choice(keys)
        if op < 0.75:
            out[key] = rng.choice(INTERESTING)
        elif op < 0.85:
            out.pop(key, None)
        elif op < 0.95:
            out[rng.choice(["extra", "Round", "x" * 50])] = rng.choice(INTERESTING)
        elif isinstance(out.get(key), int | float) and not isinstance(out.get(key), bool):
            out[key] = out[key] * rng.choice([-1, 10**6, 1e300])
    return out


def break_bytes(frame: bytes, rng: random.Random) -> bytes:
    """Byte-level damage on a signed frame (the signature then fails or the parser refuses)."""
    op = rng.randrange(4)
    if op == 0:
        return frame + b"trailing"
    if op == 1:
        return frame[: rng.randrange(len(frame))]
    b = bytearray(frame)
    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


async def reconnect(http: aiohttp.ClientSession, base: str) -> Client | None:
    """A fresh identity's connection with a round open; None if the server stopped taking
    connections (61 tries, 0.5 s apart)."""
    for _ in range(61):
        try:
            c = await Client.connect(http, base, Identity.generate())
            await c.wait_for(RoundOpen, timeout=5)
            return c
        except (aiohttp.ClientError, AssertionError, TimeoutError):
            await asyncio.sleep(0.5)
    return None


def decodes_locally(frame: bytes, crashes: list[str]) -> bool:
    """Whether our own decoder accepts `frame` (it must never raise anything else)."""
    try:
        decode_message(frame, max_payload=1 << 20)
    except ProtocolError:
        return False
    except Exception as exc:  # the local decoder itself must never crash
        crashes.append(f"local decode raised {type(exc).__name__}: {exc}")
        return False
    return True


async def send_one(c: Client, rng: random.Random, crashes: list[str],
                   outcomes: Counter[str]) -> None:
    """One mutated frame of a random type; the server's answer is counted."""
    cls = rng.choice(TYPES)
    header, payload = base_header(c, cls, rng)
    header = mutate(header, rng)
    frame = c.sign_header(cls.TYPE, header, payload)
    if rng.random() < 0.1:
        frame = break_bytes(frame, rng)
    valid = decodes_locally(frame, crashes)
    try:
        await c.send(frame)
        reply = await c.wait_for(Error, Ack, timeout=10)
    except (aiohttp.ClientError, ConnectionError):
        reply = None
    if isinstance(reply, Ack):
        outcomes["ack"] += 1
        if not valid:
            crashes.append(f"accepted invalid {cls.__name__}: "
                           f"{json.dumps(header, default=str)[:300]}")
    elif isinstance(reply, Error):
        outcomes[reply.code] += 1
    else:
        outcomes["closed/none"] += 1


async def fuzz(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    crashes: list[str] = []
    outcomes: Counter[str] = Counter()
    inputs = reconnects = 0
    with tempfile.TemporaryDirectory(prefix="fuzz-live-") as tmp, \
            running_server(Path(tmp), url=args.url) as (base, proc):
        async with aiohttp.ClientSession() as http:
            c = await Client.connect(http, base, Identity.generate())
            await c.wait_for(RoundOpen, timeout=5)
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                if proc is not None and proc.poll() is not None:
                    crashes.append(f"server exited with {proc.returncode}")
                    break
                if c.ws.closed or c.open is None:
                    again = await reconnect(http, base)
                    reconnects += 1
                    if again is None:
                        crashes.append("server stopped accepting connections")
                    if again is None or crashes:
                        break
                    c = again
                    continue
                await send_one(c, rng, crashes, outcomes)
                inputs += 1
                if inputs % 50 == 0 and await api_ok(http, base):
                    crashes.append(f"non-JSON API answer after {inputs} inputs")
            if await api_ok(http, base):
                crashes.append("non-JSON API answer at the end")
            if proc is not None and proc.poll() is not None:
                crashes.append(f"server exited with {proc.returncode}")
    print_table([{"outcome": k, "count": v} for k, v in outcomes.most_common()],
                ["outcome", "count"])
    for crash in crashes[:20]:
        print("CRASH:", crash)
    return {"live": True, "inputs": inputs, "crashes": len(crashes), "seconds": args.seconds,
            "reconnects": reconnects, "seed": args.seed, "acks": outcomes["ack"]}


def run_live(args: argparse.Namespace) -> int:
    """Entry point used by bench.fuzz_frames --live."""
    figures = asyncio.run(fuzz(args))
    emit(figures)
    return 1 if figures["crashes"] else 0
