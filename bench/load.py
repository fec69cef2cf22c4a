"""bench.load: how many real participants one `python -m server` process holds.

Real WebSocket connections to a real server on loopback, real ML-DSA-65 identities and
signatures, real encoded updates through the one participant implementation
(shared.participant.Participant: Challenge, signed Hello, RoundOpen, codec + error feedback,
signed Submit), from a few worker processes. No training: with 2 cores for everything, each
participant's pseudo-gradient is a cheap deterministic vector (seeded by node and round), and
it submits at a random moment within `--spread-s` of the RoundOpen, standing in for training
time. Participants connect from several loopback addresses (127.0.1.x), as a crowd comes from
many addresses: the server's per-address connect limit (server.ws) is not what is measured.

Round 0 is the join (every participant connects, then submits); rounds 1..R are measured.
Per measured round, on the server's clock (server/outbox.py, /api/run `commit_ms`): close =
the moment the round took its last update, commit = RoundCommitted handed to every socket;
`p99_commit_ms` is the 99th percentile over the measured rounds. The participants' view,
`p99_submit_to_commit_ms` (the round's last Submit sent -> RoundCommitted received, over every
participant), adds the server's backlog and the fan-out to starved clients.

Dropped messages: Submits never acknowledged, RoundCommitted never received, connections
the server closed, frames the server dropped or refused by rate (its /api/run `limits`).
Errors: Error frames, frames a participant refused, worker exceptions, the server's refusals.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.common import ROOT, emit, get_json, poll, print_table
from bench.live import running_server
from shared.envelope import Identity
from shared.participant import Participant

# the server pings every HEARTBEAT_S and drops a socket whose pong is HEARTBEAT_S / 2 late; at
# the default 20 s, the load generator's own starved processes answered late on this shared
# machine (docs/benchmarks.md): 60 s measures the server, not the generator's scheduling
HEARTBEAT_S = 60
PER_ADDRESS = 50  # participants per loopback source address (server.ws CONNECT_BURST is 60)


def _flags(participants: int, rounds: int, deadline_s: float) -> list[str]:
    return ["--rounds", str(rounds + 1), "--quorum", str(participants),
            "--deadline-s", str(deadline_s), "--heartbeat-s", str(HEARTBEAT_S),
            "--max-frame-mb", "4", "--log-level", "WARNING"]


class Member:
    """One participant over one real WebSocket."""

    def __init__(self, index: int, spread_s: float, seed: int) -> None:
        self.index, self.spread_s, self.seed = index, spread_s, seed
        self.part = Participant(Identity.generate(), runtime="native", agent="bench-load",
                                device="cpu")
        self.submitted: dict[int, float] = {}  # round -> time the Submit left
        self.acked: dict[int, float] = {}
        self.committed: dict[int, float] = {}
        self.errors: list[str] = []
        self.closed_by_server = 0
        self.connect_failures: list[str] = []
        self.closes: list[str] = []  # why the server closed our socket (before the end)
        self.n_params = 0
        self.final = False

    def delta(self, round_: int, n: int) -> bytes:
        rng = np.random.default_rng([self.seed, self.index, round_])
        return (rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)).astype("<f4") \
            .tobytes()

    async def connect(self, http: aiohttp.ClientSession, base: str, deadline: float
                      ) -> aiohttp.ClientWebSocketResponse:
        """The WebSocket, retried with backoff as a node does (each failure is counted)."""
        delay = 0.5
        while True:
            try:
                return await http.ws_connect(base + "/ws", max_msg_size=1 << 26,
                                             heartbeat=None, timeout=aiohttp.ClientWSTimeout(
                                                 ws_receive=None, ws_close=10))
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.connect_failures.append(repr(exc)[:160])
                if time.time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(8.0, delay * 2)

    async def run(self, http: aiohttp.ClientSession, base: str, deadline: float) -> None:
        """Until the final commit: connected, and connected again after a close (each
        close counted), as a node does; the participant resubmits a pending update."""
        while not self.final and time.time() < deadline:
            try:
                await self._session(await self.connect(http, base, deadline), deadline)
            except (ConnectionError, aiohttp.ClientError) as exc:  # a send on a closed socket
                self.closed_by_server += 1
                self.closes.append(repr(exc)[:120])

    async def _session(self, ws: aiohttp.ClientWebSocketResponse, deadline: float) -> None:
        self.part.connection_made()
        jobs: dict[asyncio.Task[None], int] = {}  # "training" -> its round
        n_params = self.n_params
        try:
            while not self.final and time.time() < deadline:
                try:
                    raw = await ws.receive(timeout=max(0.1, deadline - time.time()))
                except TimeoutError:
                    break
                if raw.type != aiohttp.WSMsgType.BINARY:
                    if not self.final:
                        self.closed_by_server += 1
                        self.closes.append(f"{raw.type.name} {ws.close_code} "
                                           f"{raw.extra or ''}"[:120])
                    break
                for ev in self.part.receive(raw.data):
                    kind = ev["kind"]
                    if kind == "send":
                        await ws.send_bytes(ev["frame"])
                    elif kind == "welcome":
                        n_params = self.n_params = int(ev["n_params"])
                    elif kind == "train":
                        task = asyncio.ensure_future(self._submit(ws, int(ev["round"]),
                                                                  n_params))
                        jobs[task] = int(ev["round"])
                        task.add_done_callback(lambda t: jobs.pop(t, None))
                    elif kind == "ack" and ev["status"] == "accepted":  # not a resubmission's
                        self.acked.setdefault(int(ev["round"]), time.time())
                    elif kind == "committed":
                        self.committed.setdefault(int(ev["round"]), time.time())
                        self.final = self.final or bool(ev["final"])
                    elif kind in ("error", "refused", "fatal", "reconnect"):
                        self.errors.append(f"{kind}: {ev.get('code', '')} {ev['message']}"[:200])
        finally:
            for task, round_ in list(jobs.items()):
                task.cancel()
                self.part.training_stopped(round_)  # trained again when offered again
            if self.part.training is not None:  # a round whose "training" was cut off
                self.part.training_stopped(self.part.training.round)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ws.close(), 5)

    async def _submit(self, ws: aiohttp.ClientWebSocketResponse, round_: int, n: int) -> None:
        rng = np.random.default_rng([self.seed, self.index, round_, 1])
        await asyncio.sleep(float(rng.uniform(0, self.spread_s)))  # "training"
        events = self.part.submit(round_, self.delta(round_, n), train_loss=1.0, samples=32,
                                  compute_s=0.1)
        for ev in events:
            if ev["kind"] == "send":
                self.submitted[round_] = time.time()
                await ws.send_bytes(ev["frame"])


async def _worker(base: str, first: int, count: int, spread_s: float, seed: int,
                  timeout_s: float) -> dict[str, Any]:
    deadline = time.time() + timeout_s
    members = [Member(i, spread_s, seed) for i in range(first, first + count)]
    sessions: dict[str, aiohttp.ClientSession] = {}
    tasks = []
    for m in members:
        addr = f"127.0.1.{1 + m.index // PER_ADDRESS}"
        if addr not in sessions:
            sessions[addr] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                local_addr=(addr, 0), limit=0))
        tasks.append(asyncio.ensure_future(m.run(sessions[addr], base, deadline)))
        await asyncio.sleep(0.01)  # a ramp, not a burst of handshakes
    # bounded: whatever has not finished by the deadline is cut off and reported as it stands
    done, late = await asyncio.wait(tasks, timeout=max(1.0, deadline + 30 - time.time()))
    for task in late:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    results = [r for t, r in zip(tasks, results, strict=True) if t in done]
    for s in sessions.values():
        await s.close()
    return {"members": [{"submitted": m.submitted, "acked": m.acked, "committed": m.committed,
                         "errors": m.errors, "closed": m.closed_by_server,
                         "connect_failures": m.connect_failures, "closes": m.closes}
                        for m in members],
            "exceptions": [repr(r)[:200] for r in results if isinstance(r, BaseException)]}


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def summarize(results: list[dict[str, Any]], rounds: int) -> tuple[dict[str, Any],
                                                                    list[dict[str, Any]]]:
    """Worker results -> (figures, table rows) over the measured rounds 1..rounds."""
    members = [m for r in results for m in r["members"]]
    errors = sum(len(m["errors"]) for m in members) + sum(len(r["exceptions"]) for r in results)
    failures = [f for m in members for f in m["connect_failures"]]
    dropped = sum(m["closed"] for m in members) + len(failures)
    s2c: list[float] = []
    rows = []
    done = 0
    why: list[str] = []
    for rnd in range(rounds + 1):
        key = str(rnd)
        acks = [m["acked"][key] for m in members if key in m["acked"]]
        subs = [m["submitted"][key] for m in members if key in m["submitted"]]
        commits = [m["committed"][key] for m in members if key in m["committed"]]
        unacked = sum(1 for m in members if key in m["submitted"] and key not in m["acked"])
        dropped += unacked + len(members) - len(commits)
        if unacked:
            why.append(f"round {rnd}: {unacked} Submit(s) without an accepted Ack")
        if len(commits) < len(members):
            why.append(f"round {rnd}: {len(members) - len(commits)} never got RoundCommitted")
        if not subs or not commits:
            continue
        last_sub = max(subs)
        seen = [1000 * (c - last_sub) for c in commits]
        if rnd >= 1:
            done += 1
            s2c += seen
        rows.append({"round": rnd, "updates": len(acks), "commits": len(commits),
                     "submit_span_s": round(last_sub - min(subs), 2),
                     "submit_to_commit_p50_ms": round(_pct(seen, 50)),
                     "submit_to_commit_max_ms": round(max(seen))})
    figs = {"rounds": done, "p99_submit_to_commit_ms": round(_pct(s2c, 99), 1),
            "dropped_messages": dropped, "errors": errors, "connect_failures": len(failures),
            "connect_failure_samples": sorted(set(failures))[:3],
            "closed_by_server": sum(m["closed"] for m in members), "drop_samples": why[:5],
            "close_samples": sorted({c for m in members for c in m["closes"]})[:3],
            "error_samples": sorted({e for m in members for e in m["errors"]})[:5] +
            [e for r in results for e in r["exceptions"]][:5]}
    return figs, rows


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(*, participants: int, rounds: int, workers: int, spread_s: float, seed: int,
        timeout_s: float, deadline_s: float, work: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    with running_server(work, *_flags(participants, rounds, deadline_s)) as (base, proc):
        assert proc is not None
        per = -(-participants // workers)
        procs = []
        for w in range(workers):
            first, count = w * per, min(per, participants - w * per)
            if count <= 0:
                break
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.load", "--worker", base, "--first", str(first),
                 "--count", str(count), "--spread-s", str(spread_s), "--seed", str(seed),
                 "--timeout-s", str(timeout_s)],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        results = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=timeout_s + 120)
            except subprocess.TimeoutExpired:  # counted: its participants are missing
                p.kill()
                out, err = p.communicate()
            if p.returncode != 0:
                results.append({"members": [], "exceptions": [
                    f"worker exited {p.returncode}: {err[-300:]}"]})
                continue
            results.append(json.loads(out.strip().splitlines()[-1]))
        try:
            status = poll(lambda: (r := get_json(base + "/api/run"))["status"] == "finished"
                          and r, 60, "the run to finish")
        except TimeoutError:  # reported as it stands: fewer committed rounds
            status = get_json(base + "/api/run")
        server_rounds = get_json(base + "/api/rounds")
        rss = _peak_rss_mb(proc.pid)
    figs, rows = summarize(results, rounds)
    commit_ms = status.get("commit_ms", [])  # per commit, in round order (server's clock)
    for row in rows:
        if row["round"] < len(commit_ms):
            row["close_to_commit_ms"] = commit_ms[row["round"]]
    measured = commit_ms[1:]  # round 0 is the join
    missing = participants - sum(len(r["members"]) for r in results)  # a worker that failed
    limits = status["limits"]
    server_dropped = (limits["connections_refused"] + limits["frames_over_rate"]
                      + limits["closed_for_rate"] + limits["dropped_after_close"])
    return {"participants": participants, "workers": len(procs),
            "spread_s": spread_s, **figs,
            "dropped_messages": figs["dropped_messages"] + server_dropped,
            "errors": figs["errors"] + int(status["rejected_total"]) + missing,
            "missing_participants": missing,
            "server_peak_rss_mb": round(rss, 1), "server_rejected": status["rejected"],
            # round close -> commit on the server's clock: the round's last update taken ->
            # RoundCommitted handed to every socket (server/outbox.py), measured rounds only
            "p99_commit_ms": round(_pct(measured, 99), 1) if measured else None,
            "server_commit_ms": commit_ms,
            "server_limits": limits, "committed_rounds": status["committed_rounds"],
            "finished": status["status"] == "finished",
            "round_s": [round(float(r.get("duration_s", 0)), 2) for r in
                        (server_rounds if isinstance(server_rounds, list)
                         else server_rounds.get("rounds", []))],
            "wall_s": round(time.monotonic() - t0, 1),
            "update": "no training: a deterministic N(0, 1e-3) vector per node and round, "
                      "raw32 over mlp-digits, signed ML-DSA-65",
            "_rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    p.add_argument("--participants", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (after the join)")
    p.add_argument("--workers", type=int, default=4, help="participant processes")
    p.add_argument("--spread-s", type=float, default=30.0,
                   help="each update leaves at a random moment within this after RoundOpen")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.add_argument("--deadline-s", type=float, default=600.0, help="the server's round deadline")
    p.add_argument("--worker", metavar="BASE", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        res = asyncio.run(_worker(a.worker, a.first, a.count, a.spread_s, a.seed, a.timeout_s))
        print(json.dumps(res))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        figs = run(participants=a.participants, rounds=a.rounds, workers=a.workers,
                   spread_s=a.spread_s, seed=a.seed, timeout_s=a.timeout_s,
                   deadline_s=a.deadline_s, work=Path(tmp))
    rows = figs.pop("_rows")
    print(f"bench.load: {figs['participants']} participants over real WebSockets, "
          f"{figs['workers']} worker processes, 1 server process; {figs['update']}")
    print_table(rows, ["round", "updates", "commits", "submit_span_s", "close_to_commit_ms",
                       "submit_to_commit_p50_ms", "submit_to_commit_max_ms"])
    print(f"server peak RSS {figs['server_peak_rss_mb']} MB; round 0 is the join, not "
          "measured")
    emit(figs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
