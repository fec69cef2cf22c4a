"""Browser tabs train for real: the server's page in Chromium (Pyodide + ONNX Runtime Web in a
Web Worker) next to a native node, against the real server.

Screenshots of the page go to e2e/artifacts/ (or $DAA_E2E_ARTIFACTS).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.browser import fetch
from e2e.conftest import CHROMIUM, CHROMIUM_ARGS, Tab, wait_until
from server.browser_data import parse_body

LM_RUN = {"model": "gpt-tiny", "inner_steps": 8, "batch_size": 16, "deadline_s": 120.0,
          "codec": "topk", "codec_params": {"fraction": 0.05}, "delta_downlink": True}


def api(server: Any, path: str) -> Any:
    with urllib.request.urlopen(f"{server.url}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def test_two_tabs_and_a_native_node_train_together(make_server: Any, native_node: Any,
                                                   open_tab: Any) -> None:
    """Server + 1 native node + 2 tabs (wasm): >= 3 rounds where both tabs' updates are
    accepted, the global eval loss falls, no console errors, and the model can be tried."""
    server = make_server({**LM_RUN, "quorum": 3, "rounds": 4})
    native = native_node(server)
    tabs = [open_tab(f"{server.url}/?backend=wasm", f"tab{i}") for i in range(2)]
    for tab in tabs:
        tab.wait("s.state === 'the run is finished'", timeout_s=240)
    rounds = api(server, "/api/rounds")
    assert len(rounds) == 4, rounds
    assert all(r["n_updates"] == 3 for r in rounds), rounds
    losses = [api(server, "/api/run")["eval_loss_init"]] + [r["eval_loss"] for r in rounds]
    assert losses[-1] < losses[0] * 0.9, losses
    ids = [tab.stats()["nodeId"] for tab in tabs]
    for r in range(4):
        keys = server.call(lambda r=r: server.run.store.update_keys(r))
        assert set(ids) <= set(keys), f"round {r}: committed updates from {sorted(keys)}"
    for tab in tabs:
        s = tab.stats()
        assert s["accepted"] == 4, s
        assert s["rejected"] == 0, s
        assert s["contributed"] == 4, s
        assert s["backend"] == "wasm"
        assert s["threads"] >= 1
        assert [e[1] for e in s["evalLoss"]] == [r["eval_loss"] for r in rounds]
    peers = {p["node_id"]: p for p in api(server, "/api/peers")}
    assert all(peers[i]["runtime"] == "browser" for i in ids)
    text = tabs[0].page.evaluate("() => window.daaNode.generate('ab', 24)")
    vocab = set(tabs[0].page.evaluate("() => window.daaNode.vocab"))
    assert len(text) == 24
    assert set(text) <= vocab
    tabs[0].screenshot("two-tabs-finished")
    assert native.proc.wait(timeout=30) == 0
    for tab in tabs:
        assert tab.errors == [], tab.errors


def test_a_tab_closed_mid_round_does_not_stall_it(make_server: Any, native_node: Any,
                                                  open_tab: Any) -> None:
    """Quorum 2 with three participants: one tab closes while training; the round commits
    from the other two long before its 120 s deadline."""
    server = make_server({**LM_RUN, "quorum": 2, "rounds": 3, "inner_steps": 40})
    native_node(server)
    stay = open_tab(f"{server.url}/?backend=wasm", "stays")
    leave = open_tab(f"{server.url}/?backend=wasm", "leaves")
    leave.wait("s.state.startsWith('training') && s.stepsDone > 0", timeout_s=120)
    r = leave.stats()["round"]
    leave.close()
    wait_until(lambda: api(server, "/api/run")["committed_rounds"] > r, 90,
               f"round {r} to commit without the closed tab")
    (row,) = [x for x in api(server, "/api/rounds") if x["round"] == r]
    # committed on the two others' updates, not at the deadline (the server's own measure)
    assert row["duration_s"] < LM_RUN["deadline_s"], row
    stay.wait("s.state === 'the run is finished'", timeout_s=180)
    assert api(server, "/api/run")["committed_rounds"] == 3
    stay.screenshot("tab-closed-mid-round")
    assert stay.errors == []


def test_a_reloaded_tab_keeps_its_identity_and_does_not_double_submit(
        make_server: Any, native_node: Any, open_tab: Any) -> None:
    """Quorum 2, the tab alone: it submits round 0, which stays open; after a reload it is
    the same node, resubmits the journaled update (counted once, "duplicate") instead of
    training again; a native node then completes the round with exactly 2 updates."""
    server = make_server({**LM_RUN, "quorum": 2, "rounds": 1})
    tab = open_tab(f"{server.url}/?backend=wasm", "reload")
    tab.wait("s.accepted === 1", timeout_s=120)
    before = tab.stats()
    tab.page.reload()
    # a counter, not the transient state line (the welcome's data fetch used to overwrite
    # "resubmitted round 0" before a poll on a loaded machine saw it); a reload is a whole boot
    tab.wait("s.resubmitted === 1 && s.round === 0", timeout_s=120)
    assert tab.stats()["state"] == "resubmitted round 0"  # no longer clobbered by the fetch
    wait_until(lambda: api(server, "/api/run")["duplicates"] >= 1, 60,
               "the resubmitted update")
    after = tab.stats()
    assert after["nodeId"] == before["nodeId"]
    assert after["contributed"] == 0, after
    assert after["stepsDone"] == 0, after  # no retraining
    native_node(server)
    wait_until(lambda: api(server, "/api/run")["committed_rounds"] == 1, 120, "round 0")
    assert api(server, "/api/rounds")[0]["n_updates"] == 2
    keys = server.call(lambda: server.run.store.update_keys(0))
    assert keys.get(before["nodeId"]) is not None
    assert api(server, "/api/run")["accepted"] == 2
    assert tab.errors == []


def test_own_data_trains_and_never_leaves_the_tab(make_server: Any, open_tab: Any,
                                                  tmp_path: Path) -> None:
    """A local text file becomes the tab's training data; no request and no WebSocket frame
    carries it (nor any 40-byte piece of it). Pause stops the training; Resume goes on (at once:
    no other trainer would move the run on)."""
    server = make_server({**LM_RUN, "quorum": 1, "rounds": 0})  # runs until the test ends
    sent: list[bytes] = []

    def listen(page: Any) -> None:  # every request body and every frame the tab sends
        page.on("request", lambda req: sent.append(req.post_data_buffer or b""))
        page.on("websocket", lambda ws: ws.on(
            "framesent", lambda payload: sent.append(payload if isinstance(payload, bytes)
                                                     else payload.encode())))

    tab = open_tab(f"{server.url}/?backend=wasm", "own-data", before_load=listen)
    tab.wait("s.rows > 0 && s.round !== null", timeout_s=120)
    symbols = tab.page.evaluate("() => window.daaNode.vocab")
    # text that fits the run (its own language, from validation rows): the tab checks files
    meta, xb, _ = parse_body(fetch(f"{server.url}/data/val?samples=48")[0])
    ids = np.frombuffer(xb, dtype="<i4").reshape(meta["rows"], meta["x_cols"])
    secret = "".join(symbols[int(i)] for i in ids.reshape(-1))
    path = tmp_path / "mine.txt"
    path.write_text(secret, encoding="utf-8")
    tab.page.set_input_files("#node-file", str(path))
    tab.wait("s.dataSource.startsWith('your file')", timeout_s=30)
    start = tab.stats()["contributed"]
    tab.wait(f"s.contributed > {start} + 1", timeout_s=120)  # a round wholly on the file
    tab.page.click("#node-toggle")  # Pause: no step is taken while paused
    tab.wait("s.paused", timeout_s=10)
    frozen = tab.stats()["totalSteps"], tab.stats()["contributed"]
    time.sleep(3.0)  # the behaviour under test: time passes while paused
    steps, contributed = tab.stats()["totalSteps"], tab.stats()["contributed"]
    # only the step in flight at the click may still land (and submit, if it was the last)
    assert frozen[0] <= steps <= frozen[0] + 1
    assert frozen[1] <= contributed <= frozen[1] + 1
    assert tab.page.inner_text("#node-state") == "paused"
    tab.page.click("#node-toggle")  # Resume
    tab.wait(f"s.contributed > {frozen[1]}", timeout_s=120)
    assert "your file" in tab.page.inner_text("#node-data")
    pieces = {secret[i:i + 40].encode() for i in range(0, len(secret) - 40, 97)}
    assert sent, "the tab sent nothing at all"
    for blob in sent:
        assert not any(p in blob for p in pieces)
    tab.screenshot("own-data")
    assert tab.errors == []


@pytest.fixture(scope="module")
def webgpu_browser(browser: Any) -> Iterator[Any]:
    """A second Chromium with --enable-unsafe-webgpu (from the session's Playwright)."""
    b = browser.browser_type.launch(executable_path=str(CHROMIUM),
                                    args=[*CHROMIUM_ARGS, "--enable-unsafe-webgpu"])
    try:
        yield b
    finally:
        b.close()


def test_webgpu_path_trains_a_round(make_server: Any, webgpu_browser: Any) -> None:
    """With --enable-unsafe-webgpu Chromium offers a (SwiftShader) adapter: the tab picks the
    WebGPU execution provider and its update is accepted. Correctness only: it is slow."""
    server = make_server({"model": "mlp-digits", "inner_steps": 3, "batch_size": 16,
                          "quorum": 1, "rounds": 1, "deadline_s": 120.0})
    tab = Tab(webgpu_browser, f"{server.url}/", "webgpu")
    try:
        tab.wait("s.state === 'the run is finished'", timeout_s=240)
        s = tab.stats()
        assert s["backend"] == "webgpu", s
        assert s["accepted"] == 1, s
        pixels = [0.0] * 64
        probs = tab.page.evaluate("(px) => window.daaNode.classify(px)", pixels)
        assert len(probs) == 10
        assert abs(sum(probs) - 1) < 1e-4
        tab.screenshot("webgpu-digits")
        assert tab.errors == [], tab.errors
    finally:
        tab.close()


def test_webgpu_train_step_matches_native_onnxruntime(make_server: Any,
                                                     webgpu_browser: Any) -> None:
    """gpt-tiny's train step on the WebGPU execution provider: the loss and the gradient (its
    new first moment, from zeros) agree with native onnxruntime on the same inputs. (Before
    ml/onnx_fan.py, a 30-port Split wrote zeros on this adapter.)"""
    from bench.browser import bench_page, first_rows, native_ort, rel_err

    server = make_server({"model": "gpt-tiny", "quorum": 1})
    raw, _ = fetch(f"{server.url}/model/params.bin")
    theta = np.frombuffer(raw, dtype="<f4").copy()
    x, y, _ = first_rows(server.url, 4)
    res = bench_page(webgpu_browser, f"{server.url}/static/node/bench.html?backend=webgpu"
                     "&steps=1&batch=4", 300)
    assert res["backend"] == "webgpu"
    graph = server.data_dir / "graph.onnx"
    graph.write_bytes(fetch(f"{server.url}/model/onnx/train_step.onnx")[0])
    _, loss, _, m1 = native_ort(graph, theta, x, y, steps=1)
    assert rel_err(res["loss"], loss) < 1e-4
    assert rel_err(np.asarray(res["expAvg"], dtype=np.float32), m1) < 1e-4


def test_a_validator_tab_scores_every_round(make_server: Any, native_node: Any,
                                            open_tab: Any) -> None:
    """`/?role=validator`: the tab never trains; it scores each round's candidates through
    the inference graph on the last 512 validation rows and its signed Verdicts reach the
    server. Its held-out loss of theta_0 matches native_node's ProbeScorer on the same rows."""
    from ml.scoring import ProbeScorer
    from ml.workload import initial_params

    server = make_server({**LM_RUN, "quorum": 2, "rounds": 3, "validation": True,
                          "validation_timeout_s": 60.0})
    tab = open_tab(f"{server.url}/?role=validator&backend=wasm", "validator")
    tab.wait("s.state === 'waiting for candidates' || s.state.startsWith('holding')", 120)
    for _ in range(2):
        native_node(server)
    tab.wait("s.state === 'the run is finished'", timeout_s=240)
    run = api(server, "/api/run")
    assert run["validation"] is True, run
    assert run["verdicts"] == 3, run
    assert all(r["n_updates"] == 2 for r in api(server, "/api/rounds"))
    s = tab.stats()
    assert s["role"] == "validator", s
    assert s["judged"] == 6, s
    assert s["contributed"] == 0, s
    peers = {p["node_id"]: p for p in api(server, "/api/peers")}
    assert peers[s["nodeId"]]["role"] == "validator"
    assert peers[s["nodeId"]]["updates_accepted"] == 0
    # round 0's theta is the run's seeded init: score it natively on the same rows
    work = server.run.work
    want = ProbeScorer(work, 512, side="tail").loss(initial_params(work))
    first = tab.page.evaluate("() => window.daaNode.firstVerdict")
    assert first["round"] == 0, first
    assert all(v is not None for v in first["losses"]), first
    assert want is not None, (first, want)
    assert abs(first["base"] - want) < 1e-4 * abs(want), (first, want)
    tab.screenshot("validator-tab")
    assert tab.errors == [], tab.errors


def test_a_tab_honours_the_autotune_time_budget(make_server: Any, open_tab: Any) -> None:
    """With --autotune and a pinned 1 s budget under a 200-step cap, the tab's train worker
    stops when the budget is used (shared.autotune.continue_training's rule): its updates
    ran fewer steps than the cap, within the budget, and the run commits them."""
    server = make_server({**LM_RUN, "inner_steps": 20, "quorum": 1, "rounds": 3,
                          "autotune": True,
                          "autotune_pin": {"budget_s": 1.0, "max_steps": 200,
                                           "deadline_s": 120}})
    tab = open_tab(f"{server.url}/?backend=wasm", "budget")
    tab.wait("s.state === 'the run is finished'", timeout_s=240)
    decisions = api(server, "/api/autotune")
    nodes = [n for d in decisions for n in d["inputs"]["nodes"]]
    assert len(nodes) >= 2, decisions
    for n in nodes:
        assert 1 <= n["steps"] < 200, n  # the budget, not the cap, ended the round
        assert n["compute_s"] <= 1.0 + n["compute_s"] / n["steps"] + 0.05, n
    assert all(d["settings"]["budget_s"] == 1.0 for d in decisions)
    assert api(server, "/api/run")["autotune"]["enabled"] is True
    assert tab.errors == [], tab.errors
