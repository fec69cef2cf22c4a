"""A hostile participant against a real server, while honest nodes keep training.

    python -m bench.abuse [--junk-connections N]

Starts `python -m server` on 127.0.0.1 (mlp-digits, quorum 2, 3 s deadline) and two honest
in-process nodes that submit every round, then runs each attack class of issue 24 with a
registered identity (Challenge / signed Hello like a node): hostile numbers (samples 1e20,
train_loss 1.7e308, compute_s -1, length 0), parser differentials (duplicate keys, whitespace,
data after the zstd frame), bad signature, replay, wrong run and round, oversized messages,
junk before Hello (server CPU per refused frame from /proc/<pid>/stat), and junk after the
close (a peer that ignores it). Each case must be refused with its typed error (else
`accepted_invalid`), the API must stay strict JSON and the server must stay up. Prints a table
and, as the LAST line, JSON: cases, server_exits, accepted_invalid, api_invalid_json,
frames_processed_after_close, cpu_ms_per_junk_frame, stored_rows_per_node_max (bound:
stored_rows_bound), honest_rounds_committed.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import emit, print_table
from bench.live import Client, api_ok, cpu_seconds, honest_node, rows_per_node, running_server
from server.peers import MAX_REFUSALS, PRE_HELLO_REFUSALS
from server.store import MAX_REJECTION_ROWS_PER_NODE
from shared.envelope import Identity, new_nonce
from shared.errors import ERROR_CODES
from shared.frame import FIXED_HEADER, FLAG_SIGNED, FLAG_ZSTD, MAGIC, SIG_LEN
from shared.messages import Ack, Error, RoundOpen, Submit
from shared.platform import zstd

STORED_ROWS_BOUND = MAX_REJECTION_ROWS_PER_NODE + len(ERROR_CODES)


def raw_signed(c: Client, head: bytes, payload: bytes, msg_type: int = Submit.TYPE,
               nonce: str | None = None, round_: int = 0) -> bytes:
    """A frame whose header bytes are exactly `head` (not canonical), validly signed."""
    import hashlib

    body = FIXED_HEADER.pack(MAGIC, 1, msg_type, FLAG_SIGNED, len(head), len(payload)) + head \
        + payload
    sig = c.signer(msg_type, round_, nonce or new_nonce())(hashlib.sha256(body).digest())
    return body + SIG_LEN.pack(len(sig)) + sig


def cases(c: Client) -> list[tuple[str, bytes, str]]:
    """(name, frame, expected error code) for one registered attacker connection."""
    import json

    out: list[tuple[str, bytes, str]] = []
    assert c.open is not None
    for name, field, value in (("huge samples", "samples", 10**20),
                               ("overflow train_loss", "train_loss", 1.7e308),
                               ("negative compute_s", "compute_s", -1),
                               ("length 0", "length", 0), ("length -1", "length", -1),
                               ("round 2^63", "round", 2**63)):
        header, payload = c.submit_header(**{field: value})
        out.append((name, c.sign_header(Submit.TYPE, header, payload), "bad_message"))
    header, payload = c.submit_header()
    text = json.dumps(header, sort_keys=True, separators=(",", ":"))
    dup = text[:-1] + f',"round":{c.open.round + 1}}}'
    out.append(("duplicate keys", raw_signed(c, dup.encode(), payload, nonce=header["nonce"],
                                             round_=header["round"]), "bad_frame"))
    spaced = json.dumps(header, sort_keys=True)
    out.append(("whitespace header", raw_signed(c, spaced.encode(), payload,
                                                nonce=header["nonce"], round_=header["round"]),
                "bad_frame"))
    z = zstd()
    assert z is not None
    header, payload = c.submit_header()
    packed = z.compress(payload)
    out.append(("data after zstd frame", c.sign_header(Submit.TYPE, header, packed + b"junk",
                                                       flags=FLAG_ZSTD), "bad_frame"))
    other = Identity.generate()
    header, payload = c.submit_header()
    forged = Client(c.ws, other)
    forged.challenge = c.challenge
    out.append(("bad signature", forged.sign_header(Submit.TYPE, header, payload),
                "bad_signature"))
    header, payload = c.submit_header(round=c.open.round + 5)
    out.append(("wrong round (future)", c.sign_header(Submit.TYPE, header, payload),
                "wrong_round"))
    header, payload = c.submit_header(run_id="another-run")
    out.append(("wrong run", c.sign_header(Submit.TYPE, header, payload), "wrong_run"))
    header, payload = c.submit_header(codec="fp16")
    out.append(("wrong codec", c.sign_header(Submit.TYPE, header, payload), "bad_update"))
    header, payload = c.submit_header(length=c.submit().length + 1)
    out.append(("wrong shape", c.sign_header(Submit.TYPE, header, payload), "bad_update"))
    header, payload = c.submit_header(node_id=other.node_id)
    out.append(("another node's id", c.sign_header(Submit.TYPE, header, payload),
                "unknown_node"))
    return out


async def expect(c: Client, code: str) -> tuple[str, bool]:
    """(what came back, whether the frame was accepted)."""
    msg = await c.wait_for(Error, Ack, timeout=10)
    if isinstance(msg, Error):
        return msg.code, False
    if isinstance(msg, Ack):
        return f"ACK {msg.status}", True
    return "closed" if msg is None else type(msg).__name__, False


async def junk_before_hello(http: aiohttp.ClientSession, base: str, pid: int | None,
                            connections: int) -> tuple[int, float, int]:
    """(frames refused, server CPU ms per frame, frames processed after the close)."""
    await (await Client.connect(http, base, Identity.generate(), hello=False)).ws.close()
    before = cpu_seconds(pid) if pid else 0.0
    t0 = time.monotonic()
    sent = closes = 0
    junk = [b"\x00" * 10, b"DAAP\x09" + b"\x00" * 11, b"DAAP\x01\x04\x00\x00" + b"\xff" * 8]
    for i in range(connections):
        try:
            c = await Client.connect(http, base, Identity.generate(), hello=False)
        except aiohttp.WSServerHandshakeError:  # 429: the per-address limit, by design
            await asyncio.sleep(0.2)
            continue
        for j in range(PRE_HELLO_REFUSALS * 4):  # 4x what is answered: the rest is dropped
            await c.send(junk[(i + j) % len(junk)])
            sent += 1
        while await c.recv(10) is not None:
            pass
        closes += c.ws.close_code == 1008
    cpu = (cpu_seconds(pid) - before) if pid else 0.0
    refused = closes * PRE_HELLO_REFUSALS
    print(f"junk before hello: {sent} frames on {connections} connections in "
          f"{time.monotonic() - t0:.1f} s, {closes} closed after {PRE_HELLO_REFUSALS} refusals, "
          f"server CPU {cpu * 1000:.0f} ms")
    return refused, cpu * 1000 / max(1, refused), 0


async def junk_after_close(http: aiohttp.ClientSession, base: str, n: int) -> tuple[int, int]:
    """A registered peer that ignores the close: (frames sent, refusals the server counted)."""
    before = (await (await http.get(base + "/api/run")).json())["rejected_total"]
    c = await Client.connect(http, base, Identity.generate())
    for _ in range(n):
        await c.send(b"\x00" * 10)
    with_errors = 0
    while (await c.recv(20)) is not None:
        with_errors += 1
    await asyncio.sleep(0.5)
    after = (await (await http.get(base + "/api/run")).json())["rejected_total"]
    return n, after - before


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="abuse-") as tmp:
        work = Path(tmp)
        with running_server(work, url=args.url) as (base, proc):
            async with aiohttp.ClientSession() as http:
                stop, counts = asyncio.Event(), {"committed": 0}
                honest = [asyncio.create_task(honest_node(http, base, stop, counts))
                          for _ in range(2)]
                start = (await (await http.get(base + "/api/run")).json())["committed_rounds"]
                rows: list[dict[str, Any]] = []
                accepted_invalid = api_bad = 0
                attacker = await Client.connect(http, base, Identity.generate())
                await attacker.wait_for(RoundOpen)
                for name, frame, code in cases(attacker):
                    await attacker.send(frame)
                    got, accepted = await expect(attacker, code)
                    accepted_invalid += accepted
                    bad = await api_ok(http, base)
                    api_bad += bad
                    rows.append({"case": name, "expected": code, "got": got,
                                 "ok": got == code and not bad})
                # replay: a valid update, then the same bytes again
                good = attacker.sign(attacker.submit())
                await attacker.send(good)
                await expect(attacker, "ACK")
                await attacker.send(good)
                got, accepted = await expect(attacker, "replay")
                accepted_invalid += accepted
                rows.append({"case": "replay", "expected": "replay", "got": got,
                             "ok": got == "replay"})
                # oversized: above the WebSocket limit (1 MiB here) -> close 1009
                big = await Client.connect(http, base, Identity.generate())
                try:
                    await big.send(b"\x00" * (2 * 1024 * 1024))
                    while await big.recv(10) is not None:
                        pass
                except (aiohttp.ClientError, ConnectionError):
                    pass
                rows.append({"case": "oversized", "expected": "close 1009",
                             "got": f"close {big.ws.close_code}",
                             "ok": big.ws.close_code == 1009})
                refused, cpu_ms, _ = await junk_before_hello(
                    http, base, proc.pid if proc else None, args.junk_connections)
                rows.append({"case": "junk before hello", "expected": "close 1008",
                             "got": f"{refused} refused", "ok": refused > 0})
                sent, counted = await junk_after_close(http, base, args.junk_after_close)
                after_close = max(0, counted - MAX_REFUSALS)
                rows.append({"case": "junk after close / ignoring it",
                             "expected": f"<= {MAX_REFUSALS} counted",
                             "got": f"{counted} of {sent}", "ok": after_close == 0})
                api_bad += await api_ok(http, base)
                # let honest rounds commit after the attacks too
                await attacker.ws.close()
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    now = (await (await http.get(base + "/api/run")).json())["committed_rounds"]
                    if now - start >= 3:
                        break
                    await asyncio.sleep(0.5)
                stop.set()
                await asyncio.gather(*honest, return_exceptions=True)
                run_state = await (await http.get(base + "/api/run")).json()
                committed = run_state["committed_rounds"] - start
            exits = int(proc is not None and proc.poll() is not None)
            per_node = rows_per_node(work / "run") if args.url is None else {}
    print_table(rows, ["case", "expected", "got", "ok"])
    return {"cases": len(rows), "cases_ok": sum(r["ok"] for r in rows), "server_exits": exits,
            "accepted_invalid": accepted_invalid, "api_invalid_json": api_bad,
            "frames_processed_after_close": after_close,
            "cpu_ms_per_junk_frame": round(cpu_ms, 3),
            "stored_rows_per_node_max": max(per_node.values(), default=0),
            "stored_rows_bound": STORED_ROWS_BOUND,
            "honest_rounds_committed": committed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--junk-connections", type=int, default=50,
                   help="connections sending junk before Hello (CPU per refused frame)")
    p.add_argument("--junk-after-close", type=int, default=2000,
                   help="junk frames a registered peer sends without reading")
    p.add_argument("--url", help="attack this running server instead (its CPU and store "
                   "are then not measured)")
    args = p.parse_args(argv)
    figures = asyncio.run(run(args))
    emit(figures)
    return 0 if (figures["server_exits"] == 0 and figures["accepted_invalid"] == 0
                 and figures["api_invalid_json"] == 0) else 1


if __name__ == "__main__":
    raise SystemExit(main())
