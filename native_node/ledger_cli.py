"""`python -m native_node ledger ...`: check a run's ledger offline, read an account, and
send signed requests (faucet, stake, transfer, propose, vote) with the node's identity.

    ledger verify --coordinator URL | --file EXPORT [--server-key HEX]
    ledger account --coordinator URL [--name NAME]
    ledger faucet | stake N | transfer TO N | propose KEY VALUE | vote SEQ yes|no
        --coordinator URL [--name NAME] [--state-dir DIR]

`verify` fetches GET /api/ledger/export (or reads a file), then checks everything offline
(shared.ledger_audit.verify_export): hashes, links, the server's signatures, every request's
signature and nonce, the recomputed balances and stakes, the minting rule, the slash
evidence and the signed head. Exit status 0 when it verifies, 1 when it does not.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from shared.ledger import TamperedLedger, sign_request, solve_pow
from shared.ledger_audit import summary, verify_export
from transport.identity import default_state_dir, load_or_create_identity

TIMEOUT_S = 30.0


def base_url(coordinator: str) -> str:
    """http://HOST:PORT from HOST:PORT, HOST (port 8470) or a URL."""
    url = coordinator if "://" in coordinator else f"http://{coordinator}"
    scheme, rest = url.split("://", 1)
    host = rest.split("/", 1)[0]
    if ":" not in host.rsplit("]", 1)[-1]:
        host += ":8470"
    return f"{'https' if scheme in ('https', 'wss') else 'http'}://{host}"


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
        data: bytes = resp.read()
    return data


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m native_node ledger", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    ver = sub.add_parser("verify", help="check the whole chain offline")
    src = ver.add_mutually_exclusive_group(required=True)
    src.add_argument("--coordinator", help="the server (HOST:PORT or its URL)")
    src.add_argument("--file", type=Path, help="a saved export (GET /api/ledger/export)")
    ver.add_argument("--server-key", help="pin the server's public key (hex)")
    ver.add_argument("--save", type=Path, help="also save the fetched export here")
    for name, extra in (("account", ()), ("faucet", ()), ("stake", ("amount",)),
                        ("transfer", ("to", "amount")), ("propose", ("key", "value")),
                        ("vote", ("proposal", "support"))):
        q = sub.add_parser(name)
        for arg in extra:
            q.add_argument(arg)
        q.add_argument("--coordinator", required=True)
        q.add_argument("--name", default="default", help="node name (identity)")
        q.add_argument("--state-dir", type=Path, help="identity folder")
    return p.parse_args(argv)


def verify(args: argparse.Namespace) -> int:
    data = (args.file.read_bytes() if args.file is not None
            else _get(base_url(args.coordinator) + "/api/ledger/export"))
    if args.save is not None:
        args.save.write_bytes(data)
    try:
        state = verify_export(data, server_key=bytes.fromhex(args.server_key)
                              if args.server_key else None)
    except TamperedLedger as err:
        print(json.dumps({"verified": False, "error": err.message, "field": err.field}))
        return 1
    print(json.dumps({"verified": True, **summary(state)}))
    return 0


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def request(args: argparse.Namespace) -> int:
    base = base_url(args.coordinator)
    ident = load_or_create_identity(args.state_dir or default_state_dir(args.name))
    account = json.loads(_get(f"{base}/api/ledger/account/{ident.node_id}"))
    if args.action == "account":
        print(json.dumps(account))
        return 0
    view = json.loads(_get(f"{base}/api/ledger"))
    req: dict[str, Any] = {"op": args.action, "run_id": view["run_id"], "node": ident.node_id,
                           "pk": ident.public_key.hex(), "nonce": account["nonce"]}
    if args.action == "faucet":
        req["pow"] = solve_pow(view["run_id"], ident.node_id,
                               int(view["rules"].get("pow_bits", 0)))
    elif args.action in ("stake", "transfer"):
        req["amount"] = int(args.amount)
        if args.action == "transfer":
            req["to"] = args.to
    elif args.action == "propose":
        req["key"], req["value"] = args.key, _value(args.value)
    elif args.action == "vote":
        req["proposal"], req["support"] = int(args.proposal), args.support in ("yes", "true")
    status, body = _post(f"{base}/api/ledger/request",
                         sign_request(req, secret_key=ident.secret_key))
    print(json.dumps(body))
    return 0 if status == 200 else 1


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return verify(args) if args.action == "verify" else request(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
