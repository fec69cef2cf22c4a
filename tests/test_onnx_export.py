"""ONNX export of the zoo models (ml.onnx_export): parity of ONNX Runtime vs torch.

Parity metric: norm-wise relative error ``||onnx - torch|| / ||torch||`` (L2 over the whole
vector; ``|a - b| / |b|`` for the scalar loss), required < 1e-5 on EVERY output. The torch
reference is what the native trainer runs: the zoo model, ``loss_fn``, ``loss.backward()``,
``clip_grad_norm_(1.0)`` and ``torch.optim.AdamW(betas=(0.9, 0.95), weight_decay=0.01)``.
Each graph is exported once per model (module-scoped fixture, tmp cache dir).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ml import inner_opt, onnx_export  # noqa: E402
from ml.onnx_export import (  # noqa: E402
    INFER_INPUTS,
    INFER_OUTPUTS,
    INNER_ADAMW,
    OPSET,
    TRAIN_INPUTS,
    TRAIN_OUTPUTS,
    ExportedGraphs,
    cache_key,
    export_graphs,
    main,
)
from ml.onnx_fan import MAX_FAN  # noqa: E402
from ml.zoo import build_model, flatten, load_flat, loss_fn, manifest, model_config  # noqa: E402
from native_node.trainer import Trainer  # noqa: E402
from server.config import RunConfig  # noqa: E402
from shared.layout import make_manifest, model_id  # noqa: E402

TOL = 1e-5
# Chained trajectories drift apart by float32 noise that grows with lr (at 1e-2, torch f32 vs
# torch f64 differs by 3.7e-5 after 3 steps): chain at 3e-3, per-step at the server's 1e-2.
LR_CHAINED = 3e-3
LR_PER_STEP = RunConfig().inner_lr  # the server's default inner lr (1e-2)
BATCHES = (3, 16)  # neither is the export's example batch (4): proves the dynamic dimension
STEPS = 3
CONFIGS: dict[str, dict[str, Any]] = {
    "gpt-tiny": model_config("gpt-tiny", "nano", vocab_size=32),
    "mlp-digits": model_config("mlp-digits"),
    # the Llama blocks (RMSNorm, rotary tables built in the graph, SwiGLU, tied output) at
    # gpt-tiny nano's size: at 2m, Adam's first step moves the few entries whose gradient is
    # near eps (1e-8) by float noise and new_params differs by 1.2e-5 (docs/onnx.md)
    "llama": model_config("llama", "tiny", vocab_size=32),
}
FIGURES: dict[str, float] = {}  # worst errors seen, printed at the end (-s) for docs/onnx.md


def rel(a: Any, b: Any) -> float:
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a64 - b64) / np.linalg.norm(b64))


def note(key: str, value: float) -> None:
    FIGURES[key] = max(FIGURES.get(key, 0.0), value)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request: pytest.FixtureRequest,
             cache_dir: Path) -> Iterator[tuple[dict[str, Any], ExportedGraphs]]:
    cfg = CONFIGS[request.param]
    graphs = export_graphs(cfg, cache_dir)
    assert not graphs.cached
    assert graphs.export_s > 0
    yield cfg, graphs
    if FIGURES:
        print(f"\nparity figures: {json.dumps(FIGURES, indent=1, sort_keys=True)}")


def session(path: Path) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def batch(cfg: dict[str, Any], size: int, rng: np.random.Generator, seq: int | None = None,
          scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    if cfg["task"] == "lm":
        t = seq or cfg["context"]
        x = rng.integers(0, cfg["vocab_size"], (size, t), dtype=np.int64)
        return x, rng.integers(0, cfg["vocab_size"], (size, t), dtype=np.int64)
    x = (rng.standard_normal((size, cfg["n_inputs"])) * scale).astype(np.float32)
    return x, rng.integers(0, cfg["n_classes"], (size,), dtype=np.int64)


def torch_steps(cfg: dict[str, Any], theta: np.ndarray,
                batches: list[tuple[np.ndarray, np.ndarray]], lr: float,
                dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    """The native trainer's inner step, verbatim, from the same params (float64: the
    same trajectory computed nearly exactly, to measure float32's own drift)."""
    model = build_model(cfg)
    load_flat(model, theta)
    model = model.to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    out = []
    for x, y in batches:
        xt = torch.from_numpy(x)
        xt = xt.to(dtype) if xt.is_floating_point() else xt
        loss = loss_fn(model(xt), torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state = [opt.state[p] for p in model.parameters()]
        out.append({
            "loss": np.float32(loss.detach()),
            "new_params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy(),
            "new_exp_avg": torch.cat([s["exp_avg"].reshape(-1) for s in state]).numpy(),
            "new_exp_avg_sq": torch.cat([s["exp_avg_sq"].reshape(-1) for s in state]).numpy(),
            "grad_norm": float(norm),
        })
    return out


@pytest.mark.parametrize(("mode", "lr"), [("chained", LR_CHAINED), ("per-step", LR_PER_STEP)])
@pytest.mark.parametrize("size", BATCHES)
def test_train_step_parity_with_torch_adamw(exported: tuple[dict[str, Any], ExportedGraphs],
                                            size: int, mode: str, lr: float) -> None:
    """3 steps; "chained": ORT's outputs are its next inputs (two independent float32
    trajectories); "per-step": each ORT step starts from torch's previous state.

    Chained, ORT must stay within TOL of torch, or no farther from it than torch float32
    itself is from the float64 trajectory (llama: torch f32 vs f64 drifts 3.4e-5 on exp_avg
    by step 2 at B=3, ORT vs torch 1.8e-5): the graph adds no error of its own."""
    cfg, graphs = exported
    sess = session(graphs.train_step)
    assert [i.name for i in sess.get_inputs()] == list(TRAIN_INPUTS)
    assert [o.name for o in sess.get_outputs()] == list(TRAIN_OUTPUTS)
    rng = np.random.default_rng(size)
    theta = flatten(build_model(cfg))
    # mlp-digits: input scales 4, 0.1, 1 put the gradient norm above, below, above the clip
    # (1.0) in both chains; gpt-tiny clips in steps 1-2 at B=3 (1.48, 1.28), never at B=16
    batches = [batch(cfg, size, rng, scale=s) for s in (4.0, 0.1, 1.0)]
    ref = torch_steps(cfg, theta, batches, lr)
    exact = torch_steps(cfg, theta, batches, lr, torch.float64) if mode == "chained" else ref
    zeros = np.zeros_like(theta)
    params, m, v = theta, zeros, zeros
    for k, ((x, y), want) in enumerate(zip(batches, ref, strict=True)):
        if mode == "per-step" and k > 0:
            prev = ref[k - 1]
            params, m, v = prev["new_params"], prev["new_exp_avg"], prev["new_exp_avg_sq"]
        feeds = {"params": params, "exp_avg": m, "exp_avg_sq": v, "lr": np.array(lr, np.float32),
                 "step": np.array(k + 1, np.float32), "x": x, "y": y}
        loss, new_params, m, v = sess.run(None, feeds)
        got = {"loss": loss, "new_params": new_params, "new_exp_avg": m, "new_exp_avg_sq": v}
        assert new_params.dtype == np.float32
        assert new_params.shape == theta.shape
        for name in TRAIN_OUTPUTS:
            err = rel(got[name], want[name])
            note(f"{cfg['name']} {mode} lr={lr:g} {name}", err)
            drift = rel(want[name], exact[k][name]) if mode == "chained" else 0.0
            assert err < max(TOL, drift), (
                f"{cfg['name']} {mode} lr={lr:g} B={size} step {k + 1} {name}: "
                f"rel err {err:.2e} (torch f32 vs f64: {drift:.2e})")
        # informational: the update (params' - params) is ill-conditioned under Adam (entries
        # whose gradient is float noise, e.g. the key bias, move by ~lr * sign(noise))
        before = theta if k == 0 else ref[k - 1]["new_params"]
        note(f"{cfg['name']} {mode} lr={lr:g} update (info)",
             rel(new_params - params, want["new_params"] - before))
        note(f"{cfg['name']} grad_norm max (info)", want["grad_norm"])
        params = new_params
    if cfg["task"] == "classify":  # both sides of the clip are covered by these batches
        norms = [r["grad_norm"] for r in ref]
        assert min(norms) < 1.0 < max(norms), norms


@pytest.mark.parametrize("size", [1, *BATCHES])
def test_infer_parity(exported: tuple[dict[str, Any], ExportedGraphs], size: int) -> None:
    cfg, graphs = exported
    sess = session(graphs.infer)
    assert [i.name for i in sess.get_inputs()] == list(INFER_INPUTS)
    assert [o.name for o in sess.get_outputs()] == list(INFER_OUTPUTS)
    rng = np.random.default_rng(100 + size)
    model = build_model(cfg).eval()
    theta = flatten(model) + rng.normal(0, 0.01, flatten(model).shape).astype(np.float32)
    load_flat(model, theta)
    seqs = (cfg["context"], 17, 1) if cfg["task"] == "lm" else (None,)
    for seq in seqs:
        x, _ = batch(cfg, size, rng, seq)
        (logits,) = sess.run(None, {"params": theta, "x": x})
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert logits.shape == want.shape
        err = rel(logits, want)
        note(f"{cfg['name']} infer logits", err)
        assert err < TOL, f"{cfg['name']} B={size} seq={seq}: rel err {err:.2e}"


def dims(value: Any) -> list[Any]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_batch_dimension_is_symbolic_and_weights_are_inputs(
        exported: tuple[dict[str, Any], ExportedGraphs]) -> None:
    cfg, graphs = exported
    n = sum(p.numel() for p in build_model(cfg).parameters())
    for path, names in ((graphs.train_step, ("x", "y")), (graphs.infer, ("x",))):
        proto = onnx.load(str(path), load_external_data=False)
        inputs = {i.name: dims(i) for i in proto.graph.input}
        for name in names:  # docs/pitfalls.md: the batch can silently come out fixed
            assert isinstance(inputs[name][0], str), (path.name, inputs)
            assert inputs[name][0], (path.name, inputs)
        assert inputs["params"] == [n]
        outputs = {o.name: dims(o) for o in proto.graph.output}
        if path == graphs.infer:
            assert isinstance(outputs["logits"][0], str)
            assert outputs["logits"][0]
            if cfg["task"] == "lm":
                assert isinstance(inputs["x"][1], str)  # seq is dynamic too (1..context)
        else:
            assert inputs["lr"] == []
            assert inputs["step"] == []
            assert outputs["loss"] == []
        # inline: nothing external, and no weights baked in as constants
        for init in proto.graph.initializer:
            assert init.data_location != onnx.TensorProto.EXTERNAL
            if init.data_type == onnx.TensorProto.FLOAT:
                assert int(np.prod(init.dims)) <= 1024, init.name
        assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {OPSET}
        # WebGPU binds a storage buffer per port and guarantees only 8 (ml/onnx_fan.py)
        for node in proto.graph.node:
            if node.op_type in ("Split", "Concat"):
                assert max(len(node.input), len(node.output)) <= MAX_FAN + 1, node.name
    assert sorted(p.name for p in graphs.dir.iterdir()) == [
        "infer.onnx", "manifest.json", "train_step.onnx"]


def test_manifest_describes_the_graphs(exported: tuple[dict[str, Any], ExportedGraphs],
                                       cache_dir: Path) -> None:
    cfg, graphs = exported
    doc = json.loads(graphs.manifest_path.read_text())
    assert doc == graphs.manifest
    assert doc["key"] == cache_key(cfg) == graphs.dir.name
    assert graphs.dir.parent == cache_dir
    net = build_model(cfg)
    assert doc["model_id"] == model_id(cfg, make_manifest(manifest(net)))
    assert doc["model_config"] == cfg
    assert doc["opset"] == OPSET
    assert doc["n_params"] == sum(p.numel() for p in net.parameters())
    assert doc["inner_optimizer"]["betas"] == [0.9, 0.95]
    train, infer = doc["graphs"]["train_step"], doc["graphs"]["infer"]
    assert [i["name"] for i in train["inputs"]] == list(TRAIN_INPUTS)
    assert [o["name"] for o in train["outputs"]] == list(TRAIN_OUTPUTS)
    assert [i["name"] for i in infer["inputs"]] == list(INFER_INPUTS)
    xdtype = "int64" if cfg["task"] == "lm" else "float32"
    by_name = {i["name"]: i for i in train["inputs"]}
    assert by_name["x"]["dtype"] == xdtype
    assert by_name["y"]["dtype"] == "int64"
    assert by_name["lr"] == {"name": "lr", "dtype": "float32", "shape": []}
    assert by_name["x"]["shape"][0] == "batch"
    for entry, path in ((train, graphs.train_step), (infer, graphs.infer)):
        assert entry["bytes"] == path.stat().st_size
        assert entry["nodes"] > 0


def test_cache_hit_reuses_the_directory(exported: tuple[dict[str, Any], ExportedGraphs],
                                        cache_dir: Path) -> None:
    cfg, graphs = exported
    mtime = graphs.train_step.stat().st_mtime_ns
    again = export_graphs(dict(cfg), cache_dir)
    assert again.cached
    assert again.export_s == 0.0
    assert again.dir == graphs.dir
    assert again.manifest == graphs.manifest
    assert graphs.train_step.stat().st_mtime_ns == mtime
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".tmp-")]
    assert cache_key({**cfg, "seed": 1}) != cache_key(cfg)


def test_cli_prints_the_manifest(exported: tuple[dict[str, Any], ExportedGraphs],
                                 cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, graphs = exported
    argv = ["--model", cfg["name"], "--flavour", cfg["flavour"], "--out", str(cache_dir)]
    if cfg["task"] == "lm":
        argv += ["--vocab-size", str(cfg["vocab_size"])]
    assert main(argv) == 0  # a cache hit: the fixture exported this config already
    doc = json.loads(capsys.readouterr().out)
    assert doc["cached"] is True
    assert doc["key"] == graphs.key
    assert doc["dir"] == str(graphs.dir)


def test_graph_optimizer_matches_the_trainer() -> None:
    """The graph bakes the trainer's AdamW settings in: fail loudly if they drift apart."""
    src = inspect.getsource(Trainer.train_round)
    opt = INNER_ADAMW
    assert f"betas=({opt.beta1}, {opt.beta2})" in src
    assert f"weight_decay={opt.weight_decay}" in src
    assert f"clip_grad_norm_(self.model.parameters(), {opt.clip_norm})" in src
    assert not re.search(r"\beps\s*=", src)
    assert opt.eps == 1e-8  # torch's default eps
    assert opt.eps == inner_opt.EPS
    assert (opt.beta1, opt.beta2) == inner_opt.BETAS
    assert opt.weight_decay == inner_opt.WEIGHT_DECAY


def test_zero_gradients_give_weight_decay_only(
        exported: tuple[dict[str, Any], ExportedGraphs]) -> None:
    """Entries whose gradient is exactly 0 (state 0 on step 1) must move by weight decay only.

    This is what AdamW's eps (1e-8) protects: 0 / (0 + eps) = 0. onnxscript's optimizer once
    deleted ``+ 1e-8`` as a no-op, turning these entries into NaN.
    """
    cfg, graphs = exported
    if cfg["task"] != "lm":
        pytest.skip("the embedding rows of absent tokens are the clean zero-gradient case")
    if cfg["name"] == "llama":
        pytest.skip("tied embeddings: every wte row gets the output softmax's gradient")
    sess = session(graphs.train_step)
    model = build_model(cfg)
    theta = flatten(model)
    x = np.zeros((1, cfg["context"]), np.int64)  # batch of 1; only tokens 0 and 1 occur
    x[:, 1::2] = 1
    zeros = np.zeros_like(theta)
    feeds = {"params": theta, "exp_avg": zeros, "exp_avg_sq": zeros,
             "lr": np.array(LR_PER_STEP, np.float32), "step": np.array(1, np.float32),
             "x": x, "y": x}
    _, new_params, m, v = sess.run(None, feeds)
    assert np.isfinite(new_params).all()
    assert np.isfinite(m).all()
    assert np.isfinite(v).all()
    d = cfg["d_model"]
    rows = slice(2 * d, cfg["vocab_size"] * d)  # wte rows of the absent tokens
    assert not m[rows].any()
    assert not v[rows].any()
    want = theta[rows] * np.float32(1 - LR_PER_STEP * 0.01)
    np.testing.assert_allclose(new_params[rows], want, rtol=1e-6, atol=0)


def _fake_export(calls: list[Path]) -> Callable[[dict[str, Any], str, Path, Any], dict[str, Any]]:
    """Stands in for the (slow) real export: writes a consistent entry into ``tmp``."""

    def fake(cfg: dict[str, Any], key: str, tmp: Path, opt: Any) -> dict[str, Any]:
        calls.append(tmp)
        graphs = {}
        for name, file in (("train_step", "train_step.onnx"), ("infer", "infer.onnx")):
            data = f"{name} {len(calls)}".encode()
            (tmp / file).write_bytes(data)
            graphs[name] = {"file": file, "bytes": len(data), "nodes": 1,
                            "sha256": hashlib.sha256(data).hexdigest()}
        doc = {"key": key, "graphs": graphs}
        (tmp / "manifest.json").write_text(json.dumps(doc))
        return doc

    return fake


def test_cache_entry_is_atomic_checked_and_replaced_when_broken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = CONFIGS["mlp-digits"]
    calls: list[Path] = []
    monkeypatch.setattr(onnx_export, "_export_into", _fake_export(calls))
    assert cache_key(dict(reversed(list(cfg.items())))) == cache_key(cfg)  # canonical JSON
    first = export_graphs(cfg, tmp_path)
    assert not first.cached
    assert len(calls) == 1
    assert calls[0].parent == tmp_path
    assert calls[0].name.startswith(".tmp-")  # then renamed
    assert first.dir == tmp_path / cache_key(cfg)
    assert (first.dir / "infer.onnx").is_file()
    assert export_graphs(cfg, tmp_path).cached
    assert len(calls) == 1
    (first.dir / "infer.onnx").write_bytes(b"truncated")  # no longer matches its sha256
    again = export_graphs(cfg, tmp_path)
    assert not again.cached
    assert len(calls) == 2
    assert (again.dir / "infer.onnx").read_bytes() == b"infer 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.dir.name]  # no temp/stale
    # a failed export leaves nothing behind
    monkeypatch.setattr(onnx_export, "_export_into", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        export_graphs({**cfg, "seed": 7}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.dir.name]


def test_cache_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process renames its complete entry into place while we export."""
    cfg = CONFIGS["mlp-digits"]
    calls: list[Path] = []
    fake = _fake_export(calls)

    def racing(cfg: dict[str, Any], key: str, tmp: Path, opt: Any) -> dict[str, Any]:
        winner = tmp_path / ".winner"
        winner.mkdir()
        fake(cfg, key, winner, opt)
        winner.rename(tmp_path / key)
        return fake(cfg, key, tmp, opt)

    monkeypatch.setattr(onnx_export, "_export_into", racing)
    got = export_graphs(cfg, tmp_path)
    assert got.cached
    assert (got.dir / "infer.onnx").read_bytes() == b"infer 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [got.dir.name]


async def test_server_serves_the_run_graphs(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /model/onnx/{train_step.onnx, infer.onnx, manifest.json}: exported once, cached
    in the per-user cache that every run shares ($DAA_ONNX_CACHE here)."""
    from tests.test_ws_protocol import serve

    monkeypatch.setenv("DAA_ONNX_CACHE", str(tmp_path / "cache"))
    async with serve(tmp_path) as srv:
        async with srv.http.get(srv.url + "/model/onnx/manifest.json") as resp:
            assert resp.status == 200
            manifest = await resp.json(content_type=None)
            key = resp.headers["X-Graph-Key"]
        async with srv.http.get(srv.url + "/model/onnx/infer.onnx") as resp:
            assert resp.status == 200
            assert resp.headers["X-Graph-Key"] == key
            assert len(await resp.read()) > 1000
        async with srv.http.get(srv.url + "/model/onnx/nope.onnx") as resp:
            assert resp.status == 404
    assert manifest
    assert (tmp_path / "cache" / key / "train_step.onnx").is_file()
    assert not (tmp_path / "run" / "onnx").exists()


def test_cache_key_follows_the_code_that_builds_the_graphs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The key holds a digest of the exporter's, the zoo's, the fan-out's and the layout's
    source: an edit there never serves an old entry, with no version to bump by hand."""
    cfg = model_config("mlp-digits")
    before = cache_key(cfg)
    assert len(onnx_export.code_digest()) == 32
    monkeypatch.setattr(onnx_export, "code_digest", lambda: "0" * 32)
    assert cache_key(cfg) != before
