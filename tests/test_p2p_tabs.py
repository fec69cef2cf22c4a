"""A browser tab as a p2p member: its JS kernels give the native members' bytes, and its
bounded mesh (shared.p2p_mesh) is symmetric.

browser/node/p2p_kernels.js runs under Node.js (tests/js/p2p_kernels_node.mjs; skipped where
node is not installed): every coordinate-wise rule x result codec on random slices, with
awkward values (ties, negative zeros, huge and tiny magnitudes), must equal
shared.p2p.encode_result(reduce_shard(...)) byte for byte, and its outer step
shared.outer.outer_step's numpy path (what the server and native nodes run), so a tab's
digest check passes. A ShardReducer with a kernel gives the same results as without.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.outer import OuterConfig, outer_step
from shared.p2p import (
    COORDINATE_RULES,
    ShardReducer,
    encode_result,
    make_plan,
    reduce_shard,
    shard_f,
)
from shared.p2p_mesh import TAB_MAX_PEERS, direct_peers, ring_distance

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "js" / "p2p_kernels_node.mjs"


def run_js(doc: dict[str, Any]) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    proc = subprocess.run([node, str(RUNNER)], input=json.dumps(doc), capture_output=True,
                          text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def awkward(rng: np.random.Generator, n: int, d: int) -> list[np.ndarray]:
    rows = [rng.standard_normal(d).astype(np.float32) * np.float32(10.0 ** rng.integers(-6, 4))
            for _ in range(n)]
    for r in rows:  # shared values (ties), signed zeros, a big one, a subnormal-ish one
        r[0] = 0.5
        r[1] = -0.0 if rng.random() < 0.5 else 0.0
        r[2] = np.float32(6.0e4) * np.float32(rng.choice([-1, 1]))
        r[3] = np.float32(1e-30)
    rows[0][4] = np.float32(3.0e38)  # saturates in fp16, overflows nothing in float64 sums
    return rows


def test_js_reduction_is_byte_identical_with_the_native_one() -> None:
    rng = np.random.default_rng(7)
    cases: list[dict[str, Any]] = []
    want: list[str] = []
    for n in (1, 2, 3, 4, 5, 8):
        for rule in COORDINATE_RULES:
            for codec in ("raw32", "fp16", "bf16"):
                for frac in (0.0, 0.25):
                    rows = awkward(rng, n, 257)
                    try:
                        f = shard_f(rule, n, frac)
                    except ValueError:
                        continue
                    want.append(encode_result(reduce_shard(rule, rows, byzantine_fraction=frac),
                                              codec).hex())
                    cases.append({"rule": rule, "f": f, "codec": codec,
                                  "slices": [r.astype("<f4").tobytes().hex() for r in rows]})
    big = [np.full(9, 3.0e38, dtype=np.float32) for _ in range(3)]  # a float32 sum overflows:
    big[1][4] = np.float32(1.5)  # the mean is taken in float64 instead, by every path
    for codec in ("raw32", "fp16"):
        want.append(encode_result(reduce_shard("mean", big, byzantine_fraction=0.0), codec).hex())
        cases.append({"rule": "mean", "f": 0, "codec": codec,
                      "slices": [r.astype("<f4").tobytes().hex() for r in big]})
    got = run_js({"reduce": cases})["reduce"]
    assert len(got) == len(want) > 100
    for case, g, w in zip(cases, got, want, strict=True):
        assert g == w, (case["rule"], case["codec"], case["f"], len(case["slices"]))


def test_js_reduction_refuses_what_the_native_one_refuses() -> None:
    rows = [np.ones(4, dtype=np.float32).tobytes().hex()] * 3
    got = run_js({"reduce": [{"rule": "krum", "f": 0, "codec": "raw32", "slices": rows},
                             {"rule": "trimmed-mean", "f": 2, "codec": "raw32", "slices": rows}]})
    assert all("error" in g for g in got["reduce"]), got


def test_js_ring_sum_is_byte_identical_with_the_native_secagg_sum() -> None:
    """Secure p2p rounds (rule `secagg-sum`): the tab's JS ring sum of masked u32 words gives
    shared.secagg.p2p.ring_sum's bytes (numpy and pure Python), wrap-arounds included; a
    slice of another length or a float codec is refused."""
    from shared.secagg.p2p import SECAGG_RULE, ring_sum

    rng = np.random.default_rng(11)
    cases, want = [], []
    for n, d in ((1, 1), (2, 7), (3, 257), (5, 1000), (16, 33)):
        rows = [rng.integers(0, 2 ** 32, d, dtype=np.uint64).astype("<u4") for _ in range(n)]
        rows[0][0] = 0xFFFFFFFF  # the sum wraps
        parts = [r.tobytes() for r in rows]
        got_py = ring_sum(parts, use_numpy=False)
        assert ring_sum(parts) == got_py
        want.append(got_py.hex())
        cases.append({"rule": SECAGG_RULE, "f": 0, "codec": "raw32",
                      "slices": [p.hex() for p in parts]})
    bad = [{"rule": SECAGG_RULE, "f": 0, "codec": "raw32", "slices": ["00" * 8, "00" * 12]},
           {"rule": SECAGG_RULE, "f": 0, "codec": "fp16", "slices": ["00" * 8]},
           {"rule": SECAGG_RULE, "f": 0, "codec": "raw32", "slices": ["00" * 6]}]
    got = run_js({"reduce": cases + bad})["reduce"]
    assert got[:len(want)] == want
    assert all("error" in g for g in got[len(want):]), got


def test_js_outer_step_matches_numpy_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    cases, want = [], []
    for lr, mu, nesterov in ((0.7, 0.9, True), (1.0, 0.0, True), (0.3, 0.5, False),
                             (0.1, 0.95, True)):
        theta = rng.standard_normal(1000).astype(np.float32)
        agg = (rng.standard_normal(1000) * 1e-3).astype(np.float32)
        m = (rng.standard_normal(1000) * 1e-2).astype(np.float32)
        t2, m2 = outer_step(theta, agg, m, OuterConfig(lr=lr, momentum=mu, nesterov=nesterov))
        want.append((np.asarray(t2).tobytes().hex(), np.asarray(m2).tobytes().hex()))
        cases.append({"theta": theta.tobytes().hex(), "agg": agg.tobytes().hex(),
                      "m": m.tobytes().hex(), "lr": lr, "mu": mu, "nesterov": nesterov})
    got = run_js({"outer": cases})["outer"]
    for g, (t, m_) in zip(got, want, strict=True):
        assert g["theta"] == t
        assert g["m"] == m_


def test_reducer_with_a_kernel_gives_the_same_results() -> None:
    """The hook a tab uses: a kernel (here the native functions) replaces the reduction; the
    results, their digests and the aggregate are those of a reducer without one."""
    rng = np.random.default_rng(1)
    members = [f"{i:064x}" for i in range(4)]
    ups = {m: rng.standard_normal(103).astype(np.float32) for m in members}
    plan = make_plan(0, members, 103, replicas=2)
    calls: list[tuple[str, int, str]] = []

    def kernel(rule: str, f: int, codec: str, slices: list[bytes]) -> bytes:
        calls.append((rule, f, codec))
        vecs = [np.frombuffer(s, dtype="<f4") for s in slices]
        return encode_result(reduce_shard(rule, vecs, byzantine_fraction=0.25), codec)

    def run(with_kernel: bool) -> dict[str, bytes]:
        peers = {m: ShardReducer(m, plan, ups[m], rule="trimmed-mean", byzantine_fraction=0.25,
                                 result_codec="fp16", kernel=kernel if with_kernel else None)
                 for m in members}
        queue = [(m, e) for m in members for e in peers[m].start()]
        while queue:
            sender, e = queue.pop(0)
            if e["to"] == "server":
                continue
            dest = peers[e["to"]]
            out = (dest.on_part(sender, e["shard"], e["payload"]) if e["kind"] == "part"
                   else dest.on_result(e["shard"], e["payload"]))
            queue += [(e["to"], x) for x in out]
        assert all(p.done for p in peers.values())
        return {m: np.asarray(p.aggregate()).tobytes() for m, p in peers.items()}

    assert run(True) == run(False)
    assert calls
    assert all(c == ("trimmed-mean", 1, "fp16") for c in calls)


def test_direct_peers_is_bounded_and_symmetric() -> None:
    members = sorted(f"{i:064x}" for i in range(40))
    for cap in (0, 1, 2, 5, 8, TAB_MAX_PEERS):
        links = {m: set(direct_peers(members, m, cap)) for m in members}
        for a in members:
            assert len(links[a]) <= cap
            assert a not in links[a]
            for b in links[a]:
                assert a in links[b]  # symmetric: nobody waits for a channel never opened
                assert ring_distance(members, a, b) <= cap // 2
    small = members[:5]
    assert direct_peers(small, small[0], 8) == small[1:]  # under the cap: everyone
    assert direct_peers(small, small[0], None) == small[1:]
    assert direct_peers(members, members[0], 4)[:2] == [members[1], members[-1]]
    with pytest.raises(ValueError, match="not a member"):
        direct_peers(small, "f" * 64, 4)


async def test_tabs_join_flat_and_grouped_p2p_runs(tmp_path: Path) -> None:
    """A tab's Hello is welcomed by a flat p2p run and by a grouped one (p2p_groups), where it
    is a plain member (never elected aggregator: e2e/test_browser_groups.py)."""
    from shared.messages import Welcome
    from tests.test_ws_protocol import serve

    async with serve(tmp_path / "flat", quorum=2, aggregator="median", transport="p2p") as srv:
        tab = await srv.client("tab", hello=False)
        await tab.send(tab.hello(runtime="browser"))
        assert (await tab.expect(Welcome)).transport == "p2p"
    async with serve(tmp_path / "grouped", quorum=2, aggregator="median", transport="p2p",
                     p2p_groups=1) as srv:
        tab = await srv.client("tab", hello=False)
        await tab.send(tab.hello(runtime="browser"))
        assert (await tab.expect(Welcome)).transport == "p2p"
        native = await srv.client("native")
        assert native.welcome is not None


def test_the_tabs_reassembler_takes_shared_rtc_chunks_and_refuses_broken_ones() -> None:
    """mesh.js's Reassembler (what a tab receives on a p2p channel) against the chunks
    shared.rtc makes: whole frames come out verified; a flipped byte, a missing chunk, an
    oversized frame and a cancelled transfer deliver nothing, and later frames still do."""
    from shared.rtc import cancel_chunk, chunks

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    rng = np.random.default_rng(5)
    a, b, c = (rng.bytes(n) for n in (10, 600_000, 300_000))
    good_a = list(chunks(a, 1))
    good_b = list(chunks(b, 2))
    flipped = list(chunks(c, 3))
    flipped[1] = flipped[1][:-1] + bytes([flipped[1][-1] ^ 1])
    missing = list(chunks(c, 4))
    del missing[1]
    cancelled = [*list(chunks(c, 5))[:1], cancel_chunk(5)]
    huge = list(chunks(rng.bytes(800_000), 6))  # over max_frame
    messages = [*good_a, *flipped, *missing, *cancelled, *good_b, *huge, *good_a]
    proc = subprocess.run([node, str(ROOT / "tests" / "js" / "mesh_node.mjs")],
                          input=json.dumps({"messages": [m.hex() for m in messages],
                                            "max_frame": 700_000}),
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["frames"] == [a.hex(), b.hex(), a.hex()]
    assert out["bad"] >= 3  # the digest, the gap and the oversized frame
