"""p2p rounds across real NATs: which path each pair of peers ends up on, and the bytes per path.

    python -m bench.nat [--rounds 3] [--quick]      (as root; coturn and iptables installed)

The topology (bench.netns.NatLab): a "public" namespace holding the server (TLS, a throwaway
CA) and a real TURN server (Debian's coturn, `--use-auth-secret`), and four homes, each behind
its own router namespace doing NAT with iptables MASQUERADE: two endpoint-independent ("cone":
Linux keeps the source port) and two symmetric (`--random-fully`: a random port per
destination). The nodes join with `--coordinator https://... --ca`, in a `p2p` run: they swap
shards over direct data channels, set up with the STUN/TURN servers and the TURN credentials
the server mints per node (Welcome.ice_servers).

Phase 1, STUN + TURN configured: cone <-> cone should punch through (srflx), anything with a
symmetric NAT needs the TURN relay; the server relays nothing. Phase 2 (left out by --quick),
STUN only: the pairs that needed TURN fall back to the server's relay.

Bytes per path are counted by iptables rules in the public namespace, independently of the
code under test: `direct` = UDP forwarded router-to-router, `turn` = UDP sent from coturn's
relay ports, `server` = the server's own p2p relay counter (/api/run). Paths come from
/api/peers (`ice_pairs`: what each node's connection selected). Last line JSON: paths
{both-cone, both-symmetric, cone-symmetric}, turn_relayed_bytes, server_relayed_bytes,
direct_bytes, rounds_committed, tls, and the STUN-only phase's figures under `without_turn`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import ROOT, emit
from bench.netns import PUBLIC_IP, NatLab, nat_available
from bench.scratch import scratch
from bench.tlscerts import make as make_certs
from transport.lifetime import orphan_safe

HOMES = ["cone", "cone", "symmetric", "symmetric"]  # one node behind each router
PORT = 8470
TURN_PORT = 3478
RELAY_PORTS = (49152, 49999)
SERVER_FLAGS = ["--model", "gpt-tiny", "--inner-steps", "4", "--batch-size", "8",
                "--transport", "p2p", "--deadline-s", "90", "--rtc-timeout-s", "8",
                "--p2p-timeout-s", "40", "--heartbeat-s", "30"]
RANK = {"host": 0, "srflx": 1, "relay": 2, "server": 3}
COUNTERS = {  # iptables (chain, rule) in the public namespace: bytes per path
    "direct": ("FORWARD", ["-p", "udp", "-i", "p+", "-o", "p+"]),
    "turn": ("OUTPUT", ["-p", "udp", "-s", PUBLIC_IP, "--sport",
                        f"{RELAY_PORTS[0]}:{RELAY_PORTS[1]}"]),
}
MARK = "daa-nat-"  # the counting rules' comment prefix


def _iptables(*args: str) -> str:
    return subprocess.run(["iptables", *args], capture_output=True, text=True,
                          check=True).stdout


def count_paths() -> None:
    """Counting rules (no target: they only count) in the public namespace."""
    for name, (chain, rule) in COUNTERS.items():
        _iptables("-I", chain, *rule, "-m", "comment", "--comment", MARK + name)


def read_counters() -> dict[str, int]:
    """Bytes per path since the last call (the counters are zeroed)."""
    out: dict[str, int] = {}
    for name, (chain, _) in COUNTERS.items():
        text = _iptables("-L", chain, "-v", "-x", "-n")
        rows = [line.split() for line in text.splitlines() if MARK + name in line]
        out[name] = sum(int(r[1]) for r in rows)
        _iptables("-Z", chain)
    return out


class Api:
    def __init__(self, ca: Path) -> None:
        self.base = f"https://{PUBLIC_IP}:{PORT}"
        self.ctx = ssl.create_default_context(cafile=str(ca))

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=5, context=self.ctx) as resp:
            return json.loads(resp.read())


def spawn(log: Path, ns: str | None, *argv: str) -> subprocess.Popen[bytes]:
    cmd = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(orphan_safe(cmd), cwd=ROOT, env=env, start_new_session=True,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def pair_paths(peers: list[dict[str, Any]], ids: dict[str, str]) -> dict[str, str]:
    """Per kind of pair, the most indirect path any node reported for such a pair."""
    kind = {ids[name]: HOMES[int(name[4:])] for name in ids}
    paths: dict[str, str] = {}
    for p in peers:
        if p["node_id"] not in kind:
            continue
        for other, pair in p.get("ice_pairs", {}).items():
            if other not in kind:
                continue
            a, b = sorted((kind[p["node_id"]], kind[other]))
            label = f"both-{a}" if a == b else f"{a}-{b}"
            if RANK.get(pair, 0) >= RANK.get(paths.get(label, "host"), 0):
                paths[label] = pair
    return paths


def run_phase(lab: NatLab, tmp: Path, *, rounds: int, turn: bool, timeout_s: float
              ) -> dict[str, Any]:
    """One run: coturn (+ its secret when `turn`), the TLS server, a node per home."""
    tmp.mkdir(parents=True, exist_ok=True)
    ca, cert, key = make_certs(tmp / "tls", [PUBLIC_IP])
    secret = tmp / "turn.secret"
    secret.write_text(secrets.token_hex(24) + "\n")
    secret.chmod(0o600)
    ice = f"stun:{PUBLIC_IP}:{TURN_PORT}" + (
        f",turn:{PUBLIC_IP}:{TURN_PORT}?transport=udp" if turn else "")
    procs: list[subprocess.Popen[bytes]] = []
    api = Api(ca)
    t0 = time.monotonic()
    try:
        procs.append(spawn(tmp / "coturn.log", None, *turnserver_argv(
            secret.read_text().strip(), tmp)))
        procs.append(spawn(tmp / "server.log", None, sys.executable, "-m", "server",
                           "--data-dir", str(tmp / "run"), "--host", PUBLIC_IP, "--port",
                           str(PORT), "--rounds", str(rounds), "--quorum", str(len(HOMES)),
                           "--tls-cert", str(cert), "--tls-key", str(key), "--ice-servers",
                           ice, *(["--turn-secret-file", str(secret)] if turn else []),
                           *SERVER_FLAGS))
        _wait(lambda: api.get("/api/run"), 120, "the server", procs[1], tmp / "server.log")
        read_counters()  # zero them: count the run's traffic only
        ids: dict[str, str] = {}
        for i, _kind in enumerate(HOMES):
            state = tmp / f"node{i}"
            procs.append(spawn(tmp / f"node{i}.log", lab.home(i), sys.executable, "-m",
                               "native_node", "join", "--coordinator",
                               f"https://{PUBLIC_IP}:{PORT}", "--ca", str(ca), "--state-dir",
                               str(state), "--threads", "1", "--quiet", "--log-level", "INFO"))
        run = _wait(lambda: (r := api.get("/api/run"))["status"] == "finished" and r,
                    timeout_s, f"{rounds} p2p rounds", procs[1], tmp / "server.log")
        peers = api.get("/api/peers")
        for i in range(len(HOMES)):
            text = (tmp / f"node{i}.log").read_text(errors="replace")
            ids[f"node{i}"] = next(line.split("node id ")[1].split()[0] for line in
                                   text.splitlines() if line.startswith("node id "))
        counters = read_counters()
        tls = all("WITHOUT TLS" not in (tmp / f"node{i}.log").read_text(errors="replace")
                  for i in range(len(HOMES)))
    finally:
        stop(procs)
    return {"paths": pair_paths(peers, ids), "rounds_committed": run["committed_rounds"],
            "server_relayed_bytes": int(run.get("p2p", {}).get("relayed_bytes", 0)),
            "turn_relayed_bytes": counters["turn"], "direct_bytes": counters["direct"],
            "tls": tls and run.get("status") == "finished", "wall_s": time.monotonic() - t0,
            "turn_refusals": _turn_refusals(tmp)}


def turnserver_argv(secret: str, tmp: Path) -> list[str]:
    """coturn as docs/operator.md runs it (TURN REST API credentials), on the public side."""
    return ["turnserver", "-n", f"--listening-ip={PUBLIC_IP}", f"--relay-ip={PUBLIC_IP}",
            f"--listening-port={TURN_PORT}", f"--min-port={RELAY_PORTS[0]}",
            f"--max-port={RELAY_PORTS[1]}", "--use-auth-secret",
            f"--static-auth-secret={secret}", "--realm=daa-prime", "--no-tls", "--no-dtls",
            "--no-cli", "--log-file=stdout", "--simple-log", f"--pidfile={tmp}/turn.pid",
            f"--userdb={tmp}/turn.db"]


def _turn_refusals(tmp: Path) -> int:
    text = "".join((tmp / f"node{i}.log").read_text(errors="replace")
                   for i in range(len(HOMES)))
    return text.count("refused this node's credential")


def _wait(cond: Any, timeout: float, what: str, server: subprocess.Popen[bytes],
          log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}):\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError, ValueError, KeyError):
            value = cond()
            if value:
                return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (logs: "
                       f"{log.parent})")


def inside(args: argparse.Namespace) -> int:
    """In the public namespace: run the phases, print the table and the JSON line."""
    lab = NatLab(args.tag, HOMES)
    lab.made = []  # the parent owns the namespaces
    tmp = Path(args.tmp)
    count_paths()
    res = run_phase(lab, tmp / "turn", rounds=args.rounds, turn=True, timeout_s=args.timeout)
    rows = [("STUN+TURN", res)]
    without: dict[str, Any] | None = None
    if not args.quick:
        without = run_phase(lab, tmp / "stun", rounds=2, turn=False, timeout_s=args.timeout)
        rows.append(("STUN only", without))
    print(f"{'phase':10} | {'both-cone':9} | {'both-symmetric':14} | {'cone-symmetric':14} | "
          f"{'direct B':>10} | {'TURN B':>10} | {'server B':>10} | rounds")
    for name, r in rows:
        p = r["paths"]
        print(f"{name:10} | {p.get('both-cone', '-'):9} | {p.get('both-symmetric', '-'):14} | "
              f"{p.get('cone-symmetric', '-'):14} | {r['direct_bytes']:>10,} | "
              f"{r['turn_relayed_bytes']:>10,} | {r['server_relayed_bytes']:>10,} | "
              f"{r['rounds_committed']}")
    figures = {k: res[k] for k in ("paths", "turn_relayed_bytes", "server_relayed_bytes",
                                   "direct_bytes", "rounds_committed", "tls")}
    figures["nats"] = {"cone": "iptables MASQUERADE", "symmetric":
                       "iptables MASQUERADE --random-fully"}
    figures["turn"] = f"coturn {_coturn_version()} (use-auth-secret)"
    if without is not None:
        figures["without_turn"] = {k: without[k] for k in (
            "paths", "server_relayed_bytes", "turn_relayed_bytes", "rounds_committed")}
    emit(figures)
    return 0


def _coturn_version() -> str:
    res = subprocess.run(["turnserver", "--version"], capture_output=True, text=True)
    return (res.stdout or res.stderr).strip().splitlines()[-1] if res.returncode == 0 else "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.nat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="p2p rounds to commit (phase 1)")
    ap.add_argument("--quick", action="store_true", help="phase 1 only (the test's run)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per phase")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temp folder")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tag", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inside:
        return inside(args)
    why = nat_available()
    if why is not None:
        print(f"bench.nat: {why}", file=sys.stderr)
        return 2
    tag = f"{os.getpid() % 100000:05d}"
    tmp = scratch("daa-nat-")
    lab = NatLab(tag, HOMES)
    try:
        lab.build()
        cmd = ["ip", "netns", "exec", lab.pub, sys.executable, "-m", "bench.nat", "--inside",
               "--tag", tag, "--tmp", str(tmp), "--rounds", str(args.rounds), "--timeout",
               str(args.timeout), *(["--quick"] if args.quick else [])]
        code = subprocess.run(orphan_safe(cmd), cwd=ROOT).returncode
        if code != 0:
            print(f"bench.nat: the run failed; logs in {tmp}", file=sys.stderr)
            args.keep_logs = True
        return code
    finally:
        lab.destroy()
        if not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
