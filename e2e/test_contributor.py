"""Contributor experience (issue 23), in real Chromium against the real server, one run shared
by the checks to keep the suite lean:

- a native node joins with the page's URL as `--coordinator` (what the demo prints);
- a tab whose graphs cannot load yet is not ready: it does not connect, so rounds commit at
  the native node's pace instead of waiting for it; the header says who a round waits for;
- an own-data file that does not fit what the run learns is refused before training, with
  the reason, and the page says what the run learns (a synthetic language, with a sample);
- Pause mid-round sends nothing for that round (the round commits without the tab) and Resume
  rejoins at a later round;
- axe-core finds no serious or critical accessibility violation on the page.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from e2e.conftest import ROOT, wait_until

RUN: dict[str, Any] = {"model": "gpt-tiny", "inner_steps": 60, "batch_size": 8, "deadline_s": 120.0,
       "quorum": 1, "rounds": 0}
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"
ENGLISH = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
           "it was the age of foolishness, it was the epoch of belief. ") * 40


def api(server: Any, path: str) -> Any:
    with urllib.request.urlopen(f"{server.url}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def committed(server: Any) -> list[dict[str, Any]]:
    return list(api(server, "/api/rounds"))


def test_contributor_experience(make_server: Any, open_tab: Any, tmp_path: Path) -> None:
    server = make_server(RUN)
    log = tmp_path / "native.log"
    native = subprocess.Popen(  # the page's URL, as people paste it
        [sys.executable, "-m", "native_node", "join", "--coordinator",
         f"{server.url}/?contribute=0", "--state-dir", str(tmp_path / "native"), "--quiet",
         "--threads", "1"], cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        _run_checks(server, open_tab, native, log)
    finally:
        native.terminate()
        try:
            native.wait(timeout=10)
        except subprocess.TimeoutExpired:
            native.kill()


def _run_checks(server: Any, open_tab: Any, native: subprocess.Popen[bytes], log: Path) -> None:
    wait_until(lambda: len(committed(server)) >= 1, 180, f"a round from the native node "
               f"that joined with the page URL ({log})")
    assert native.poll() is None, log.read_text()

    # -- an unready tab (its graphs do not load) neither counts nor holds a round ---------
    blocked = {"on": True}

    def graphs(route: Any) -> None:
        if blocked["on"]:
            route.fulfill(status=503, body="not exported yet")
        else:
            route.continue_()

    window = {"paused": False}
    sent_while_paused: list[Any] = []

    def block(page: Any) -> None:
        page.route("**/model/onnx/**", graphs)
        page.on("websocket", lambda ws: ws.on(
            "framesent", lambda f: sent_while_paused.append(f) if window["paused"] else None))

    tab = open_tab(f"{server.url}/?backend=wasm", "contributor", before_load=block)
    tab.wait("s.state === 'waiting for the server to export the model'", timeout_s=60)
    before = len(committed(server))
    wait_until(lambda: len(committed(server)) >= before + 2, 120, "rounds while a tab is unready")
    peers = api(server, "/api/peers")
    assert all(p["runtime"] != "browser" for p in peers), peers
    rounds = committed(server)[before:]
    assert all(r["duration_s"] < RUN["deadline_s"] / 4 for r in rounds), rounds
    assert all(r["n_updates"] == 1 for r in rounds), rounds
    blocked["on"] = False
    tab.wait("s.rows > 0 && s.learns !== null", timeout_s=120)

    # -- what the run learns; an off-distribution own-data file is refused ------------------
    learns = tab.page.inner_text("#node-learns")
    assert "synthetic" in learns, learns
    sample = tab.page.inner_text("#node-learns-sample")
    vocab = set(tab.page.evaluate("() => window.daaNode.vocab"))
    assert len(sample) >= 32, sample
    assert set(sample) <= vocab, sample
    path = log.parent / "english.txt"
    path.write_text(ENGLISH, encoding="utf-8")
    tab.page.set_input_files("#node-file", str(path))
    tab.page.wait_for_function(
        "() => document.getElementById('node-file-status').textContent.includes('not used')",
        timeout=30_000)
    status = tab.page.inner_text("#node-file-status")
    assert "alphabet" in status or "statistics" in status, status
    s = tab.stats()
    assert s["dataSource"] == "server", s
    assert s["ownDataCheck"]["ok"] is False

    # -- the header says who the round waits for; Pause mid-round sends nothing ------------
    tab.wait("s.state.startsWith('training') && s.stepsDone >= 3 "
             "&& s.stepsDone < s.stepsTotal - 20", timeout_s=180)
    tab.page.wait_for_function(
        "() => document.getElementById('waiting').textContent.includes('waiting for')",
        timeout=10_000)
    node_id = tab.stats()["nodeId"]
    window["paused"] = True
    tab.page.click("#node-toggle")
    paused_round = tab.stats()["round"]
    tab.wait("s.paused && s.stoppedAt !== null", timeout_s=20)
    assert tab.stats()["stoppedAt"]["round"] == paused_round
    wait_until(lambda: any(r["round"] == paused_round for r in committed(server)), 60,
               f"round {paused_round} committing without the paused tab")
    keys = server.call(lambda: server.run.store.update_keys(paused_round))
    assert node_id not in set(keys), keys
    assert tab.page.inner_text("#node-state") == "paused"
    contributed = tab.stats()["contributed"]
    window["paused"] = False
    assert sent_while_paused == [], "the paused tab sent frames"
    tab.page.click("#node-toggle")  # Resume: rejoins at a later round
    tab.wait(f"s.contributed > {contributed} && s.accepted >= 1", timeout_s=180)

    def later_round_has_the_tab() -> bool:  # acked first, committed a moment later
        done = [r["round"] for r in committed(server) if r["round"] > paused_round]
        return any(node_id in set(server.call(lambda r=r: server.run.store.update_keys(r)))
                   for r in done)

    wait_until(later_round_has_the_tab, 60, "a later round with the resumed tab's update")

    # -- accessibility: axe-core, no serious or critical violation ------------------------
    tab.page.add_script_tag(path=str(AXE))
    result = tab.page.evaluate("""async () => {
        const r = await axe.run(document, { resultTypes: ['violations'] });
        return r.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help,
                                          nodes: v.nodes.map((n) => n.target.join(' ')) }));
    }""")
    bad = [v for v in result if v["impact"] in ("serious", "critical")]
    assert bad == [], json.dumps(bad, indent=1)
    tab.screenshot("contributor")
    # the only console error: Chromium's line for the 503 the test itself answered
    assert [e for e in tab.errors if "503" not in e] == [], tab.errors
