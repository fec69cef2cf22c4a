"""docs/protocol.md agrees with the code: its field table lists exactly the schema's fields,
types and ranges (shared.messages field metadata), its error table exactly the error codes,
and its limits table the server's limits."""

from __future__ import annotations

import re
from pathlib import Path

from server import peers, ws
from server.store import MAX_REJECTION_ROWS_PER_NODE, MAX_REJECTION_ROWS_PER_NODE_ROUND
from shared.errors import ERROR_CODES
from shared.messages import schema_rows

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


def table_after(heading: str) -> list[list[str]]:
    """The cells of the first markdown table after `heading` (header row and rule dropped)."""
    lines = DOC[DOC.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_field_table_matches_the_schema() -> None:
    doc = [(m, f.strip("`"), t, r) for m, f, t, r in table_after("### Field types and ranges")]
    assert doc == schema_rows()


def test_error_table_lists_every_code_once() -> None:
    codes = [row[0].strip("`") for row in table_after("## Error codes")]
    assert sorted(codes) == sorted(ERROR_CODES)
    assert len(codes) == len(set(codes))
    assert all(row[1] for row in table_after("## Error codes"))  # a condition for each


def test_limits_table_states_the_servers_limits() -> None:
    text = " ".join(" ".join(r) for r in table_after("## Limits"))
    assert f"{ws.CONNECT_RATE:g}/s, burst {ws.CONNECT_BURST}" in text
    assert f"{ws.FRAME_RATE:g}/s, burst {ws.FRAME_BURST}" in text
    assert re.search(rf"\| {peers.PRE_HELLO_REFUSALS} \| the {peers.PRE_HELLO_REFUSALS}th", DOC)
    assert re.search(rf"\| {peers.MAX_REFUSALS} \| the {peers.MAX_REFUSALS}th", DOC)
    assert (f"at most {MAX_REJECTION_ROWS_PER_NODE_ROUND} rows per node and round and "
            f"{MAX_REJECTION_ROWS_PER_NODE} per node") in " ".join(DOC.split())
