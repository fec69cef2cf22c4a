"""`python -m native_node`: contribute a machine's CPU or GPU to a DAA Prime run.

    python -m native_node join --coordinator HOST:PORT   (or the page's URL, http://HOST:PORT/)
    python -m native_node up --role trainer --coordinator HOST:PORT
    python -m native_node up --role validator --coordinator HOST:PORT

A validator never trains: it scores the round's candidate updates on its own held-out data
and answers the server with a signed verdict (runs with --validation).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import torch

from native_node.address import AddressError, coordinator_url
from native_node.client import NodeClient, NodeOptions
from native_node.trainer import pick_device
from transport import evloop
from transport.identity import default_state_dir, load_or_create_identity

ROLES = ("trainer", "validator")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m native_node", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    join = sub.add_parser("join", help="join a run as a trainer")
    up = sub.add_parser("up", help="start a node with a role (Prime-style spelling)")
    up.add_argument("--role", choices=ROLES, default="trainer")
    for q in (join, up):
        q.add_argument("--coordinator", required=True,
                       help="the server: HOST:PORT (port 8470 when left out; TLS when the "
                            "server offers it), or the URL its page is at (http(s)://HOST:PORT/)"
                            ", as `python -m server` prints it")
        q.add_argument("--ca", metavar="FILE", default=None,
                       help="verify the server's TLS certificate with this CA bundle (PEM) "
                            "instead of the system's trust store")
        q.add_argument("--name", default="default",
                       help="node name: separate identities on one machine (default 'default')")
        q.add_argument("--state-dir", type=Path,
                       help="identity folder (default ~/.daa-prime/node-NAME)")
        q.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        q.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
        q.add_argument("--region", default="", help="region label (letters, digits, - _ .) "
                       "the server groups nodes by in hierarchical runs (p2p_groups)")
        q.add_argument("--dht", action="store_true", help="run a Kademlia DHT node for peer "
                       "discovery over the p2p data channels and the server's relay (the "
                       "server needs --dht; docs/dht.md; default: off)")
        several = q.add_mutually_exclusive_group()
        several.add_argument("--nproc", type=int, default=1,
                             help="run each round's inner steps over N local processes "
                                  "(torch.distributed DDP, gloo); still one update per round")
        several.add_argument("--gpus", type=int, default=0,
                             help="one process per CUDA device for N devices (DDP over NCCL; "
                                  "fails without CUDA); still one update per round")
        q.add_argument("--shard", choices=("auto", "none", "full"), default="auto",
                       help="with --nproc/--gpus N: 'full' shards parameters, gradients and "
                            "the inner AdamW state over the N processes (FSDP2 fully_shard); "
                            "'none' keeps a replica each (DDP); 'auto' (default) picks full on "
                            "CUDA when they would not fit one device's free memory, else none "
                            "(never full on CPU)")
        q.add_argument("--data", dest="data_path",
                       help="local copy of the run's text file (text runs)")
        q.add_argument("--allow-model", action="append", default=[], metavar="MOD:FACTORY",
                       help="let the server make this node import this bring-your-own model "
                            "factory (repeatable; installed daa_prime.models entry points "
                            "are allowed without it; docs/byo_model.md)")
        q.add_argument("--max-rounds", type=int, default=0,
                       help="leave after submitting this many rounds (0: until the run ends)")
        q.add_argument("--quiet", action="store_true", help="no progress bar, log lines only")
        q.add_argument("--chunk-encode", action=argparse.BooleanOptionalAction, default=True,
                       help="in streamed runs, compute and encode the update a chunk at a "
                            "time into a spool file under the state dir (default on; "
                            "shared.chunk_encode)")
        q.add_argument("--server-id", help="require this server key id (64 hex); default: "
                       "trust the first key seen for a run and refuse a different one later")
        q.add_argument("--supervise", action="store_true",
                       help="restart the node at once when it crashes (a supervisor forks "
                            "pre-imported workers: native_node/supervise.py)")
        q.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def _run(client: NodeClient) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, client.shutdown)
    return await client.run()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ledger"]:  # python -m native_node ledger ... (native_node/ledger_cli.py)
        from native_node.ledger_cli import main as ledger_main

        code: int = ledger_main(argv[1:])
        return code
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s node[{args.name}]: %(message)s")
    if args.supervise:
        from native_node.supervise import supervise

        return supervise(lambda: node(args))
    return node(args)


def node(args: argparse.Namespace) -> int:
    """One node process's life: device, identity, connect, train until done or stopped."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    nproc = max(1, args.nproc)
    try:
        if args.nproc < 1 or args.gpus < 0:
            raise ValueError("--nproc and --gpus take a positive count")
        if args.shard == "full" and max(args.nproc, args.gpus) < 2:
            raise ValueError("--shard full needs --nproc N or --gpus N with N >= 2")
        if args.gpus > 0:
            from native_node.distributed_trainer import check_gpus

            check_gpus(args.gpus)
            device, nproc = "cuda", args.gpus
        else:
            device = pick_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        coordinator_url(args.coordinator)
    except AddressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state_dir = args.state_dir or default_state_dir(args.name)
    try:
        identity = load_or_create_identity(state_dir)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    several = f" x {nproc} processes" if nproc > 1 else ""
    print(f"node id {identity.node_id} (ML-DSA-65 key in {state_dir}), device {device}{several}, "
          f"event loop {evloop.name()}", file=sys.stderr, flush=True)
    client = NodeClient(NodeOptions(
        coordinator=args.coordinator, identity=identity, state_dir=state_dir, device=device,
        data_path=args.data_path, max_rounds=args.max_rounds, progress=not args.quiet,
        server_id=args.server_id, role=getattr(args, "role", "trainer"), nproc=nproc,
        threads=args.threads, ca=args.ca, shard=args.shard,
        region=getattr(args, "region", ""), dht=getattr(args, "dht", False),
        allow_model=tuple(args.allow_model), chunk_encode=args.chunk_encode))
    code = evloop.run(_run(client))
    print("node stopped", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
