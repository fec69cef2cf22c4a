"""REST routes of the ledger (server.ledger): the page's view of it, a participant's account,
the export `python -m native_node ledger verify` checks, and signed requests."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from server.api import json_response
from server.keys import RUN
from shared.ledger import LedgerError

routes = web.RouteTableDef()
MAX_REQUEST_BYTES = 64 * 1024


@routes.get("/api/ledger")
async def ledger_view(request: web.Request) -> web.Response:
    """Entries, supply, rules, total stake and the open proposals with their tallies."""
    return json_response(request.app[RUN].ledger.view())


@routes.get("/api/ledger/account/{node_id}")
async def ledger_account(request: web.Request) -> web.Response:
    """A participant's balance, stake, next request nonce, rewards and slashes (reasons)."""
    node_id = request.match_info["node_id"]
    if len(node_id) != 64 or any(c not in "0123456789abcdef" for c in node_id):
        return web.Response(status=400, text='{"error": "node_id must be 64 lowercase hex"}',
                            content_type="application/json")
    return json_response(await asyncio.to_thread(request.app[RUN].ledger.account, node_id))


@routes.get("/api/ledger/export")
async def ledger_export(request: web.Request) -> web.Response:
    """The whole chain with evidence and a signed head (shared.ledger_audit's format)."""
    body = await asyncio.to_thread(request.app[RUN].ledger.export)
    return web.Response(body=body, content_type="application/x-ndjson")


@routes.post("/api/ledger/request")
async def ledger_request(request: web.Request) -> web.Response:
    """A participant's signed request (faucet, stake, transfer, propose, vote). Refused with
    HTTP 400 and {error: code, field, message}; nothing is written then."""
    raw = await request.content.read(MAX_REQUEST_BYTES + 1)
    try:
        if len(raw) > MAX_REQUEST_BYTES:
            raise LedgerError("request too large", field="request")
        try:
            req = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise LedgerError("request is not JSON", field="request") from None
        rec = await asyncio.to_thread(request.app[RUN].ledger.submit, req)
    except LedgerError as err:
        body = json.dumps({"error": err.code, "field": err.field, "message": err.message})
        return web.Response(status=400, text=body, content_type="application/json")
    return json_response(rec)
