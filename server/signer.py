"""The server's ML-DSA-65 signatures, off the event loop.

Every frame the server sends is signed (shared.envelope), and one ML-DSA-65 signature costs
~9 ms of CPU here (pqcrypto holds the GIL while it signs, so a thread does not help). Signed
on the event loop, the per-node frames of a busy round (an Ack per update, a Welcome and a
Challenge per join) queue every other frame behind them: bench.load measured it (docs/
benchmarks.md). `SigningPool` signs them in worker processes instead: the event loop builds
the frame with a placeholder trailer of the signature's fixed length, a worker signs the
same bytes `Identity.signer` would sign, and the trailer is replaced. The frame is
byte-for-byte what the in-process signer gives, up to ML-DSA's own randomness (a test checks
that receivers verify it).

Workers are spawned (not forked: the server holds threads and torch) with only the secret
key; `close` shuts them down. A pool that cannot start or breaks falls back to signing in
process, and says so in the log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
from typing import Any

from shared.envelope import Identity, sign_round, signing_bytes
from shared.messages import Message
from shared.platform import signatures
from transport.lifetime import die_with_parent

log = logging.getLogger("server.signer")
SIGNATURE_LEN = 3309  # ML-DSA-65 (FIPS 204): every signature has this length
_SECRET: bytes = b""  # the worker process's copy of the server key
BIG_PAYLOAD = 1 << 20  # frames with a larger payload are built in a thread


def default_workers() -> int:
    """DAA_SIGN_WORKERS when set (0: sign on the event loop, as before this module), else one
    per core beyond the event loop's, at least one, at most four."""
    env = os.environ.get("DAA_SIGN_WORKERS", "")
    if env.strip().isdigit():
        return int(env)
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def _init(secret_key: bytes, parent_pid: int) -> None:
    """A worker's start: keep the key, and die with the server, whatever kills it (a worker
    whose server was SIGKILLed would otherwise wait on its queue forever, an orphan)."""
    global _SECRET
    _SECRET = secret_key
    die_with_parent(parent_pid)


def _sign(message: bytes, context: bytes) -> bytes:
    return signatures().sign(_SECRET, message, context)


class SigningPool:
    """Signs the server's frames in `workers` processes (0: in process, on the loop)."""

    def __init__(self, identity: Identity, run_id: str, *, workers: int | None = None) -> None:
        self.identity, self.run_id = identity, run_id
        self.workers = default_workers() if workers is None else workers
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.signed_in_pool = 0
        self.signed_in_process = 0

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor | None:
        if self._pool is None and self.workers > 0:
            try:
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init, initargs=(self.identity.secret_key, os.getpid()))
            except (OSError, ValueError) as exc:
                log.warning("no signing processes (%s): signing on the event loop", exc)
                self.workers = 0
        return self._pool

    def frame_now(self, msg: Message) -> bytes:
        """`msg` signed in this process (what the pool's result must equal, but for
        ML-DSA's randomness)."""
        self.signed_in_process += 1
        return msg.to_frame(sign=self.identity.signer(
            run_id=self.run_id, round_=sign_round(getattr(msg, "round", None)),
            msg_type=msg.TYPE, nonce=msg.nonce))

    async def frame(self, msg: Message) -> bytes:
        """`msg` signed by a worker process (in process when there is no pool)."""
        pool = self._executor()
        if pool is None:
            return self.frame_now(msg)
        seen: list[bytes] = []

        def placeholder(digest: bytes) -> bytes:
            seen.append(digest)
            return bytes(SIGNATURE_LEN)

        big = len(getattr(msg, "payload", b"")) > BIG_PAYLOAD
        # a large frame (a RoundOpen of full params) is built off the loop: its copies and
        # hash take seconds at 100M+ params and would hold up every other frame (Welcomes)
        draft = (await asyncio.to_thread(msg.to_frame, sign=placeholder) if big
                 else msg.to_frame(sign=placeholder))
        signed = signing_bytes(run_id=self.run_id,
                               round_=sign_round(getattr(msg, "round", None)),
                               node_id=self.identity.node_id, msg_type=msg.TYPE,
                               digest=seen[0], nonce=msg.nonce)
        try:
            sig = await asyncio.get_running_loop().run_in_executor(
                pool, _sign, signed, self.run_id.encode("utf-8"))
        except concurrent.futures.BrokenExecutor as exc:
            log.warning("the signing processes broke (%s): signing on the event loop", exc)
            self.close()
            self.workers = 0
            return self.frame_now(msg)
        if len(sig) != SIGNATURE_LEN:  # a scheme with another length: do it the plain way
            return self.frame_now(msg)
        self.signed_in_pool += 1
        if big:  # one copy of the frame, not two (slice, then concatenation)
            return await asyncio.to_thread(b"".join, (memoryview(draft)[:-SIGNATURE_LEN], sig))
        return draft[:-SIGNATURE_LEN] + sig

    def view(self) -> dict[str, Any]:
        return {"workers": self.workers, "signed_in_pool": self.signed_in_pool,
                "signed_in_process": self.signed_in_process}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
