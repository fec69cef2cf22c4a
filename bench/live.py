"""A real `python -m server` on 127.0.0.1 and clients that speak the protocol to it (Challenge,
signed Hello, signed frames), for the abuse benchmark and the live fuzzer. Loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.common import ROOT, free_port, get_json, poll
from shared.codecs import get_codec
from shared.envelope import Identity, new_nonce
from shared.frame import encode_frame
from shared.messages import (
    Challenge,
    Error,
    Hello,
    Message,
    RoundCommitted,
    RoundOpen,
    Submit,
    Welcome,
    sha256_hex,
)
from shared.trust import ServerTrust

API_PATHS = ("/api/run", "/api/rounds", "/api/peers", "/api/rejections")
SERVER_FLAGS = ("--model", "mlp-digits", "--quorum", "2", "--deadline-s", "3",
                "--inner-steps", "1", "--max-frame-mb", "1", "--log-level", "ERROR")


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-JSON number {name}")


def strict_json(text: str) -> Any:
    """JSON.parse's view: NaN / Infinity are not JSON."""
    return json.loads(text, parse_constant=_no_constant)


@contextlib.contextmanager
def running_server(work: Path, *flags: str, url: str | None = None
                   ) -> Iterator[tuple[str, subprocess.Popen[bytes] | None]]:
    """(base url, process) of a fresh server on 127.0.0.1 (or `url`, an already running one,
    with process None). The process is killed on exit."""
    if url is not None:
        yield url.rstrip("/"), None
        return
    port = free_port()
    log = open(work / "server.log", "ab")  # noqa: SIM115 - closed below
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port",
                             str(port), "--data-dir", str(work / "run"), *SERVER_FLAGS, *flags],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        poll(lambda: proc.poll() is None and get_json(base + "/api/run"), 180, "the server")
        yield base, proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait(10)
        log.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process `pid` so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rows_per_node(data_dir: Path) -> dict[str, int]:
    """Rejection rows + count rows each node holds in the server's SQLite store."""
    db = sqlite3.connect(f"file:{data_dir / 'run.sqlite'}?mode=ro", uri=True)
    try:
        out: dict[str, int] = {}
        for table in ("rejections", "rejection_counts"):
            for node, n in db.execute(f"SELECT node_id, COUNT(*) FROM {table} GROUP BY node_id"):
                out[node] = out.get(node, 0) + int(n)
        return out
    finally:
        db.close()


async def api_ok(http: aiohttp.ClientSession, base: str) -> int:
    """How many of the API endpoints answered something that is not strict JSON."""
    bad = 0
    for path in API_PATHS:
        try:
            async with http.get(base + path) as resp:
                strict_json(await resp.text())
                bad += resp.status != 200
        except (TimeoutError, ValueError, aiohttp.ClientError):
            bad += 1
    return bad


class Client:
    """One connection: verifies every server frame as a node does."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, ident: Identity) -> None:
        self.ws, self.ident = ws, ident
        self.trust = ServerTrust(max_payload=1 << 26)
        self.challenge: Challenge | None = None
        self.welcome: Welcome | None = None
        self.open: RoundOpen | None = None
        self.committed = 0

    @classmethod
    async def connect(cls, http: aiohttp.ClientSession, base: str, ident: Identity, *,
                      hello: bool = True) -> Client:
        ws = await http.ws_connect(base + "/ws", max_msg_size=1 << 27)
        c = cls(ws, ident)
        first = await c.recv(10)
        assert isinstance(first, Challenge), first
        c.challenge = first
        if hello:
            await c.send(c.sign(Hello(node_id=ident.node_id, public_key=ident.public_key.hex(),
                                      challenge=first.challenge, runtime="native",
                                      agent="bench", device="cpu")))
            c.welcome = await c.wait_for(Welcome)
        return c

    def sign(self, msg: Message) -> bytes:
        return msg.to_frame(sign=self.signer(msg.TYPE, getattr(msg, "round", -1),
                                             msg.nonce))

    def signer(self, msg_type: int, round_: Any, nonce: str) -> Callable[[bytes], bytes]:
        assert self.challenge is not None
        r = round_ if isinstance(round_, int) and not isinstance(round_, bool) else -1
        return self.ident.signer(run_id=self.challenge.run_id, round_=r, msg_type=msg_type,
                                 nonce=nonce)

    def sign_header(self, msg_type: int, header: dict[str, Any], payload: bytes = b"",
                    flags: int = 0) -> bytes:
        """A frame with an arbitrary header, signed as this node: what a hostile client
        can send with its registered key."""
        r = header.get("round")
        r = r if isinstance(r, int) and not isinstance(r, bool) and -1 <= r < 2**62 else -1
        nonce = header.get("nonce")
        try:
            sign = self.signer(msg_type, r, nonce if isinstance(nonce, str) else new_nonce())
            return encode_frame(msg_type, header, payload, flags=flags, sign=sign)
        except (ValueError, OverflowError):
            return encode_frame(msg_type, header, payload, flags=flags)

    async def send(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def recv(self, timeout: float) -> Message | None:
        """The next server frame (None: the socket closed)."""
        raw = await self.ws.receive(timeout=timeout)
        if raw.type != aiohttp.WSMsgType.BINARY:
            return None
        msg = self.trust.open(raw.data)
        if isinstance(msg, RoundOpen):
            self.open = msg
        elif isinstance(msg, RoundCommitted):
            self.committed += 1
        return msg

    async def wait_for(self, *classes: type[Message], timeout: float = 10) -> Any:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            try:
                msg = await self.recv(max(0.01, end - loop.time()))
            except TimeoutError:
                return None
            if msg is None or isinstance(msg, classes):
                return msg

    def submit(self, **over: Any) -> Submit:
        assert self.welcome is not None
        assert self.open is not None
        vec = np.full(self.welcome.n_params, 1e-3, np.float32)
        payload = get_codec("raw32").encode(vec)
        fields: dict[str, Any] = dict(run_id=self.welcome.run_id, round=self.open.round,
                      node_id=self.ident.node_id, nonce=new_nonce(), codec=self.welcome.codec,
                      length=self.welcome.n_params, digest=sha256_hex(payload), train_loss=1.0,
                      samples=32, compute_s=0.1, payload=payload)
        fields.update(over)
        return Submit(**fields)

    def submit_header(self, **over: Any) -> tuple[dict[str, Any], bytes]:
        msg = self.submit()
        header = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)
                  if f.name != "payload"}
        header.update(over)
        return header, msg.payload


async def honest_node(http: aiohttp.ClientSession, base: str, stop: asyncio.Event,
                      counts: dict[str, int]) -> None:
    """Submits a small update for every round it is sent, until `stop`."""
    ident = Identity.generate()
    while not stop.is_set():
        try:
            c = await Client.connect(http, base, ident)
            submitted = -1
            while not stop.is_set():
                if c.open is not None and c.open.round != submitted:
                    submitted = c.open.round
                    await c.send(c.sign(c.submit()))
                try:
                    msg = await c.recv(1.0)
                except TimeoutError:
                    continue
                if msg is None:
                    break
                if isinstance(msg, RoundCommitted):
                    counts["committed"] = counts.get("committed", 0) + 1
                if isinstance(msg, Error):
                    counts["errors"] = counts.get("errors", 0) + 1
            await c.ws.close()
        except (TimeoutError, aiohttp.ClientError, AssertionError):
            await asyncio.sleep(0.5)
