"""Which members a peer of a `p2p` run opens direct data channels to (stdlib only: a tab runs
it in Pyodide).

A native node opens one channel to every other member (native_node/mesh.py). A browser tab
holds only so many RTCPeerConnections before it slows (docs/browser.md, "p2p runs": measured
by bench.p2p_tabs), so a tab links directly only to the members nearest to it on the plan's
ring, at most `cap` of them; its shard traffic to and from the others goes through the server,
forwarded and counted like any relayed shard. Ring neighbours are the ones that share shards
with it (shard s is owned by members[s], members[s+1], ...; reassigned shards go to the next
members), so they are the ones worth a direct channel. The choice is symmetric (a links to b
exactly when b, with the same cap, links to a), so a tab never waits for a channel its peer
will not open.
"""

from __future__ import annotations

from collections.abc import Sequence

TAB_MAX_PEERS = 16  # a tab's cap on direct channels (docs/browser.md says how it was chosen)


def ring_distance(members: Sequence[str], a: str, b: str) -> int:
    """Steps between a and b on the ring of `members` (sorted, distinct), either way round."""
    n = len(members)
    i, j = members.index(a), members.index(b)
    d = abs(i - j)
    return min(d, n - d)


def direct_peers(members: Sequence[str], me: str, cap: int | None) -> list[str]:
    """The members `me` opens direct channels to: all others when `cap` is None or covers
    them, else those within cap // 2 ring steps (at most cap of them), nearest first."""
    if me not in members:
        raise ValueError("not a member")
    if cap is not None and cap < 0:
        raise ValueError("cap must be >= 0")
    others = [m for m in members if m != me]
    if cap is None or len(others) <= cap:
        return others
    reach = cap // 2
    near = [m for m in others if ring_distance(members, me, m) <= reach]
    return sorted(near, key=lambda m: (ring_distance(members, me, m), m))
