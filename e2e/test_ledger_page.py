"""The page's ledger card (issue 19), in real Chromium against the real server: a run with a
slashed node and an open proposal (built in process with bench.ledger's signed nodes, then
resumed by the server) shows that node its balance, stake, rewards per round and each slash
with its reason, and the open proposal with its stake tally."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.ledger import BenchNode, stake, wait_version
from e2e.conftest import ROOT, LiveServer, ensure_vendored
from server.coordinator import Coordinator
from server.runstate import open_run

CONFIG: dict[str, Any] = {"model": "mlp-digits", "quorum": 2, "deadline_s": 10.0,
                          "validation": True, "ledger_faucet": 1000, "ledger_slash": 50,
                          "resume_grace_s": 0.0, "rounds": 0}
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"


async def one_round(data_dir: Path) -> tuple[str, str, int]:
    """Round 0 with two honest nodes and a node whose update validation rejects; returns
    (honest node id, slashed node id, the open proposal's seq)."""
    run = await asyncio.to_thread(open_run, data_dir, CONFIG)
    coord = Coordinator(run)
    honest, liar = [BenchNode(coord) for _ in range(2)], BenchNode(coord)
    for node in [*honest, liar]:
        stake(run, node, 100)
    prop = run.ledger.submit(honest[0].request(run, "propose", key="inner_lr", value=0.02))
    task = asyncio.create_task(coord.run_rounds())
    try:
        for node in [*honest, liar]:
            await node.join()
        while coord.state is None or coord.state.round != 0:
            await asyncio.sleep(0.01)
        rng = np.random.default_rng(0)
        await coord.handle_frame(liar.conn, liar.submit(0, -30.0 * run.params))
        for node in honest:
            await coord.handle_frame(node.conn, node.submit(0, rng.normal(0, 1e-3, run.n_params)))
        await wait_version(coord, 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        run.store.close()
    return honest[0].ident.node_id, liar.ident.node_id, int(prop["seq"])


def test_ledger_card_shows_account_slashes_and_proposals(tmp_path: Path, open_tab: Any) -> None:
    ensure_vendored()
    data = tmp_path / "run"
    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API holds this thread's loop
        good, bad, seq = pool.submit(asyncio.run, one_round(data)).result(timeout=120)
    server = LiveServer(data, {})  # resumes the run, ledger included
    server.start()
    try:
        tab = open_tab(f"{server.url}/?contribute=0&account={bad}", "ledger")
        page = tab.page
        page.wait_for_function("() => document.querySelector('#ledger-slashes li.ledger-slash')",
                               timeout=30_000)
        slash = page.inner_text("#ledger-slashes")
        assert "round 0: validation_rejected" in slash
        assert "held-out loss" in slash  # the validators' reason
        assert page.inner_text("#ledger-stake") == "50"  # 100 staked, 50 slashed
        assert "no rewards yet" in page.inner_text("#ledger-rewards")
        assert page.inner_text("#ledger-admitted") == "yes"
        props = page.inner_text("#ledger-proposals")
        assert f"#{seq}" in props
        assert "inner_lr = 0.02" in props
        assert "0 (0%) / 0" in props
        assert "expires when round 19 commits" in props  # ledger_proposal_rounds = 20
        assert "staked" in page.inner_text("#ledger-summary")
        page.locator("#ledger-card").screenshot(path=str(tab.screenshot("ledger-page")
                                                         .with_name("ledger-card.png")))
        page.fill("#ledger-node", good)  # another account: the honest node's reward
        page.dispatch_event("#ledger-node", "change")
        page.wait_for_function("() => document.querySelector('#ledger-rewards')"
                               ".textContent.includes('round 0')", timeout=30_000)
        assert "+500" in page.inner_text("#ledger-rewards")  # half of the round's 1,000
        assert page.inner_text("#ledger-slashes") == "none"
        assert page.inner_text("#ledger-balance") == "1,400"  # 1,000 - 100 staked + 500
        page.fill("#ledger-node", "not-a-node")
        page.dispatch_event("#ledger-node", "change")
        assert "64 lowercase hex" in page.inner_text("#ledger-account-status")
        page.add_script_tag(path=str(AXE))  # the card adds no serious accessibility fault
        found = page.evaluate("""async () => (await axe.run('#ledger-card',
            { resultTypes: ['violations'] })).violations.map((v) => [v.id, v.impact, v.help])""")
        assert [v for v in found if v[1] in ("serious", "critical")] == [], found
        assert not tab.errors, tab.errors
    finally:
        server.stop()
