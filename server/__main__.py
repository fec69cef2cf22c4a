"""`python -m server`: create or resume a run and serve it (optionally with a local demo swarm)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from server import tls
from server.app import make_app
from server.browser_data import prewarm_onnx
from server.cli_help import CHOICES, HELP
from server.cli_help import default as _default
from server.cli_help import graphs_ready as _graphs_ready
from server.config import RunConfig, load_toml
from server.demo import DemoSwarm, round_line
from server.keys import COORDINATOR
from server.runstate import open_run
from server.sqldb import describe
from server.turn import DEFAULT_TTL_S, IceServers, read_secret
from transport import evloop

DEFAULT_PORT = 8470
DEMO_ROUNDS = 30
# bench.byzantine's "default" row (bench/results/byzantine.txt): centered clipping and the
# server's held-out validation kept every attack within 5% of the clean loss at 33% attackers
DEMO_ROBUST: dict[str, Any] = {"aggregator": "centered-clipping", "validation": True}
# what a --demo's validation scores on, per model (the samples bench.byzantine used)
DEMO_VALIDATION_SAMPLES = {"gpt-tiny": 128, "mlp-digits": 512}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    p.add_argument("--config", help="TOML run config (keys as in RunConfig, or a [run] table)")
    p.add_argument("--data-dir", help="run state folder (SQLite + checkpoints); resumed if it "
                   "holds a run (default: a new temp folder with --demo, else ./run-data)")
    p.add_argument("--db", metavar="URL", default=None,
                   help="the run's database: postgresql://USER@HOST/DBNAME (any libpq URL; "
                        "one run per database) for rows, ledger included; checkpoints and "
                        "the server key stay in --data-dir (default: SQLite, run.sqlite in "
                        "--data-dir)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--demo", type=int, metavar="N", default=0,
                   help="also start N local native nodes on this run; unless given, the demo "
                        f"stops after {DEMO_ROUNDS} rounds, needs N updates per round and "
                        f"runs the robust default bench.byzantine chose: "
                        f"{DEMO_ROBUST['aggregator']} + validation")
    p.add_argument("--tls-cert", metavar="FILE", default=None,
                   help="serve https and wss with this PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", metavar="FILE", default=None,
                   help="the certificate's PEM private key (with --tls-cert)")
    p.add_argument("--turn-secret-file", metavar="FILE", default=None,
                   help="the TURN server's shared secret (coturn --static-auth-secret), first "
                        "line of FILE: each node's Welcome carries TURN credentials minted "
                        "from it for the TURN URLs of --ice-servers")
    p.add_argument("--turn-ttl-s", type=float, default=DEFAULT_TTL_S, metavar="S",
                   help=f"how long a minted TURN credential is valid (default "
                        f"{DEFAULT_TTL_S:.0f})")
    p.add_argument("--trust-proxy", metavar="ADDR[,ADDR]", default=None,
                   help="reverse proxies (IP addresses) whose X-Forwarded-For names the "
                        "client, for the per-address connection limit")
    p.add_argument("--log-level", default=None,
                   help="DEBUG, INFO, WARNING (default INFO; WARNING with --demo)")
    for name, kind in (("model", str), ("flavour", str), ("data", str), ("data-path", str),
                       ("partition", str), ("alpha", float), ("n-shards", int), ("seed", int),
                       ("tokenizer", str),
                       ("inner-steps", int), ("inner-lr", float), ("batch-size", int),
                       ("outer-lr", float), ("outer-momentum", float), ("aggregator", str),
                       ("outer", str), ("outer-params", json.loads),
                       ("worker-momentum", float), ("cc-reference", str),
                       ("codec", str), ("rounds", int), ("quorum", int), ("deadline-s", float),
                       ("keep-checkpoints", int), ("max-frame-mb", float),
                       ("stream-chunk-mb", float),
                       ("codec-params", json.loads), ("aggregator-params", json.loads),
                       ("byzantine-fraction", float), ("validation-threshold", float),
                       ("validation-samples", int), ("validation-timeout-s", float),
                       ("eval-samples", int),
                       ("heartbeat-s", float), ("stale-policy", str), ("stale-weight", float),
                       ("max-staleness", int), ("resume-grace-s", float),
                       ("transport", str), ("ice-servers", str), ("rtc-timeout-s", float),
                       ("p2p-replicas", int), ("p2p-timeout-s", float), ("p2p-groups", int),
                       ("p2p-result-codec", str), ("autotune-pin", json.loads),
                       ("autotune-max-steps", int), ("secagg-clip", float),
                       ("secagg-timeout-s", float), ("secagg-groups", int)):
        key = name.replace("-", "_")
        choices = CHOICES.get(key)
        p.add_argument(f"--{name}", type=kind, default=None, choices=choices,
                       metavar=None if choices else key.upper(),
                       help=f"{HELP.get(key, key.replace('_', ' '))} (default: "
                            f"{_default(key)})")
    p.add_argument("--error-feedback", action=argparse.BooleanOptionalAction, default=None,
                   help="nodes keep the codec's residual (default: on)")
    p.add_argument("--delta-downlink", action=argparse.BooleanOptionalAction, default=None,
                   help="send a node that holds the previous params only the coordinates that "
                        "changed (default: on)")
    p.add_argument("--autotune", action=argparse.BooleanOptionalAction, default=None,
                   help="tune each round to the participants: a time budget instead of a "
                        "fixed H, each node's codec, the deadline and the quorum, with the "
                        "reasons in /api/run (docs/autotune.md; default: off)")
    p.add_argument("--secagg", action=argparse.BooleanOptionalAction, default=None,
                   help="secure aggregation: nodes send only masked updates and the server "
                        "unmasks only their sum; aggregator mean only, robust rules over "
                        "groups with --secagg-groups (docs/privacy.md; default: off)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="nodes train round t+1 from their local params while round t is "
                        "uploaded and aggregated, then merge onto the new params (one-step "
                        "delayed; native nodes only; docs/operator.md; default: off)")
    p.add_argument("--dht", action=argparse.BooleanOptionalAction, default=None,
                   help="run a Kademlia DHT node (a bootstrap for nodes' peer discovery) and "
                        "relay nodes' DHT messages (docs/dht.md; default: off)")
    p.add_argument("--validation", action=argparse.BooleanOptionalAction, default=None,
                   help="score every update on held-out loss and reject the ones that make "
                        "it worse by more than --validation-threshold (default: off)")
    return p.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    keys = RunConfig().to_dict().keys()
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


async def serve(args: argparse.Namespace) -> int:
    base = load_toml(args.config) if args.config else None
    overrides = overrides_from(args)
    if args.demo:
        overrides.setdefault("quorum", args.demo)
        overrides.setdefault("rounds", DEMO_ROUNDS)
        for key, value in DEMO_ROBUST.items():
            overrides.setdefault(key, value)
        model = overrides.get("model") or (base or {}).get("model") or RunConfig().model
        if model in DEMO_VALIDATION_SAMPLES:
            overrides.setdefault("validation_samples", DEMO_VALIDATION_SAMPLES[model])
    data_dir = args.data_dir or (tempfile.mkdtemp(prefix="daa-demo-") if args.demo
                                 else "run-data")
    run = await asyncio.to_thread(open_run, data_dir, overrides, base, args.db)
    if run.config.transport in ("star", "p2p"):  # the server's aiortc peer carries data
        from transport import sctp_tuning

        sctp_tuning.install()
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    ssl_ctx = tls.server_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    ice = IceServers.parse(run.config.ice_servers, ttl_s=args.turn_ttl_s,
                           secret=read_secret(args.turn_secret_file)
                           if args.turn_secret_file else None)
    ice.check()
    app = make_app(run)
    app[tls.TRUSTED_PROXIES] = tls.parse_proxies(args.trust_proxy)
    app[COORDINATOR].rtc.ice = ice
    app.cleanup_ctx.append(prewarm_onnx)  # the first browser tab need not wait for it
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, ssl_context=ssl_ctx)
    await site.start()
    url = f"{'https' if ssl_ctx else 'http'}://{args.host}:{args.port}/"
    await _graphs_ready(app)
    floor = run.entropy_floor
    print(f"DAA Prime run {run.run_id}: {run.config.model} ({run.n_params:,} params), "
          f"data dir {data_dir}, rows in {describe(args.db)}", flush=True)
    print(f"open {url}  (API: {url}api/run)", flush=True)
    if ice.urls:
        print(f"ICE servers for every peer: {', '.join(ice.urls)}"
              + (f" (TURN credentials minted per node, valid {ice.ttl_s:.0f} s)"
                 if ice.has_turn else ""), flush=True)
    logging.getLogger("server").info("event loop: %s", evloop.name())
    if run.identity is not None:
        print(f"server id {run.identity.node_id} (ML-DSA-65 key in {data_dir}/server.key)",
              flush=True)
    last = run.last_round["eval_loss"] if run.last_round else run.eval_loss_init
    print(f"{run.version} rounds committed; eval loss {last:.4f}" if last is not None else
          f"{run.version} rounds committed", end="", flush=True)
    print(f", entropy floor {floor:.4f} nats" if floor is not None else "", flush=True)
    coord = app[COORDINATOR]
    coord.commit_hooks.append(lambda rec: print(round_line(rec), flush=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    swarm = (DemoSwarm(args.demo, f"{args.host}:{args.port}", Path(data_dir))
             if args.demo else None)
    try:
        if swarm is not None:
            await swarm.start()
        while not stop.is_set():
            if coord.error is not None:
                print(f"error: the round loop stopped: {coord.error!r}; the last committed "
                      f"round is safe in {data_dir}", file=sys.stderr, flush=True)
                return 1
            if swarm is not None and coord.finished:
                print(f"demo finished: {run.version} rounds committed; the server keeps "
                      f"serving {url} until Ctrl-C", flush=True)
                await swarm.stop()
                swarm = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
    finally:
        print("shutting down", flush=True)
        if swarm is not None:
            await swarm.stop()
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    level = args.log_level or ("WARNING" if args.demo else "INFO")
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        return evloop.run(serve(args))
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
