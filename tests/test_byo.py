"""Bring your own model (ml/byo.py): every refusal, a deterministic build, the factory's loss
used everywhere, the node's import gate and the entry-point path (a real test distribution
on sys.path, found by importlib.metadata)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from examples.byo_digits import smoothed_cross_entropy
from ml.byo import BatchSpec, ByoError, ModelSpec, byo_config, check, check_allowed
from ml.onnx_export import train_step_fn
from ml.workload import resolve
from ml.zoo import build_model, evaluate, flatten, loss_fn, loss_for, model_config

EXAMPLE = "examples.byo_digits:build"
DIGITS = {"n_inputs": 64, "n_classes": 10}
CALLS: list[int] = []  # losses computed by counting_loss


def cfg(factory: str, seed: int = 0) -> dict[str, Any]:
    return byo_config(factory, None, task="classify", seed=seed, sizes=DIGITS)


class Tiny(nn.Module):
    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32, out: int = 10) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(out, 64, generator=gen).to(dtype) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x.to(self.w.dtype) @ self.w.t()


SPEC = BatchSpec(task="classify", x_shape=(64,), y_shape=(), out_shape=(10,))


def raises(config: dict[str, Any]) -> ModelSpec:
    raise RuntimeError("no GPU here")


def wrong_type(config: dict[str, Any]) -> nn.Module:
    return Tiny()


def float64(config: dict[str, Any]) -> ModelSpec:
    return ModelSpec(module=Tiny(dtype=torch.float64), batch=SPEC)


def with_buffer(config: dict[str, Any]) -> ModelSpec:
    m = Tiny()
    m.register_buffer("running_mean", torch.zeros(64))
    return ModelSpec(module=m, batch=SPEC)


class Drifting(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(()), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        seen = self.get_buffer("seen")
        seen.add_(x.shape[0])
        return super().forward(x)


def mutating_buffer(config: dict[str, Any]) -> ModelSpec:
    return ModelSpec(module=Drifting(), batch=SPEC)


def wrong_output(config: dict[str, Any]) -> ModelSpec:
    return ModelSpec(module=Tiny(out=7), batch=SPEC, loss=lambda o, y: o.mean())


def lm_on_digits(config: dict[str, Any]) -> ModelSpec:
    spec = BatchSpec(task="lm", x_shape=(64,), y_shape=(64,), out_shape=(64, 32),
                     x_dtype="int64")
    return ModelSpec(module=Tiny(), batch=spec)


def vector_loss(config: dict[str, Any]) -> ModelSpec:
    return ModelSpec(module=Tiny(), batch=SPEC, loss=lambda o, y: o.sum(-1))


def nan_loss(config: dict[str, Any]) -> ModelSpec:
    return ModelSpec(module=Tiny(), batch=SPEC, loss=lambda o, y: o.sum() * math.nan)


def unseeded(config: dict[str, Any]) -> ModelSpec:
    m = Tiny()
    with torch.no_grad():
        m.w.copy_(torch.randn(10, 64))  # the global generator: differs call to call
    return ModelSpec(module=m, batch=SPEC)


def raising_loss(config: dict[str, Any]) -> ModelSpec:
    return ModelSpec(module=Tiny(), batch=SPEC, loss=lambda o, y: o[:, 99].mean())


class Broken(Tiny):
    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w  # [B, 64] @ [10, 64]: the shapes do not chain


def broken_forward(config: dict[str, Any]) -> ModelSpec:
    return ModelSpec(module=Broken(), batch=SPEC)


def counting_loss(logits: Tensor, y: Tensor) -> Tensor:
    CALLS.append(1)
    return loss_fn(logits, y) * 2.0


def counted(config: dict[str, Any]) -> ModelSpec:
    return ModelSpec(module=Tiny(int(config["seed"])), batch=SPEC, loss=counting_loss)


@pytest.mark.parametrize(("factory", "reason", "words"), [
    ("tests.no_such_module:build", "import", "cannot import 'tests.no_such_module'"),
    ("tests.test_byo:no_such_factory", "import", "no callable 'no_such_factory'"),
    ("not a factory:x y", "import", "is not 'package.module:callable'"),
    ("tests.test_byo:raises", "factory_raised", "RuntimeError: no GPU here"),
    ("tests.test_byo:wrong_type", "wrong_return", "returned Tiny"),
    ("tests.test_byo:float64", "dtype", "w (torch.float64)"),
    ("tests.test_byo:with_buffer", "buffers", "running_mean"),
    ("tests.test_byo:mutating_buffer", "buffers", "seen changes"),
    ("tests.test_byo:wrong_output", "output_shape", "[4, 7]"),
    ("tests.test_byo:lm_on_digits", "batch_spec", "'lm'"),
    ("tests.test_byo:vector_loss", "loss", "shape [4]"),
    ("tests.test_byo:nan_loss", "loss", "finite scalar"),
    ("tests.test_byo:unseeded", "nondeterministic", "seed 0"),
    ("tests.test_byo:raising_loss", "loss", "IndexError"),
    ("tests.test_byo:broken_forward", "forward", "RuntimeError"),
])
def test_every_refusal_names_what_is_wrong(factory: str, reason: str, words: str) -> None:
    with pytest.raises(ByoError) as info:
        check(cfg(factory))
    assert info.value.reason == reason
    assert words in str(info.value), str(info.value)


def test_the_example_builds_deterministically_in_the_seed() -> None:
    checked = check(cfg(EXAMPLE))
    assert len(checked["source_sha256"]) == 64
    a, b = flatten(build_model(checked)), flatten(build_model(checked))
    assert a.dtype == np.float32
    assert a.size == 16650
    assert np.array_equal(a, b)
    other = flatten(build_model(check(cfg(EXAMPLE, seed=1))))
    assert not np.array_equal(a, other)


def test_a_changed_factory_source_is_refused_on_rebuild() -> None:
    checked = {**check(cfg(EXAMPLE)), "source_sha256": "0" * 64}
    with pytest.raises(ByoError) as info:
        build_model(checked)
    assert info.value.reason == "source_changed"


def test_the_factorys_loss_is_used_by_trainer_export_and_evaluation() -> None:
    from native_node.trainer import Trainer

    work = resolve(model="tests.test_byo:counted", flavour=None, data="digits",
                   data_path=None, partition="iid", alpha=0.5, seed=0)
    model = work.new_model()
    assert loss_for(model) is counting_loss
    assert loss_for(build_model(model_config("mlp-digits"))) is loss_fn
    x, y = work.dataset.x_val[:50], work.dataset.y_val[:50]
    with torch.no_grad():
        want = 2.0 * float(loss_fn(model(torch.from_numpy(x)), torch.from_numpy(y)))
    assert evaluate(model, x, y) == pytest.approx(want, rel=1e-6)
    CALLS.clear()
    trainer = Trainer(work, shard=0, n_shards=2, node_id="n0")
    trainer.train_round(flatten(model), steps=3, lr=1e-2, batch_size=8)
    assert len(CALLS) == 3
    CALLS.clear()
    flat = torch.from_numpy(flatten(model))
    zeros = torch.zeros_like(flat)
    loss, *_ = train_step_fn(model)(flat, zeros, zeros, torch.tensor(1e-3), torch.tensor(1.0),
                                    torch.from_numpy(x), torch.from_numpy(y).long())
    assert CALLS
    assert float(loss) == pytest.approx(want, rel=1e-5)


def test_the_example_trains_with_its_label_smoothed_loss() -> None:
    from native_node.trainer import Trainer

    work = resolve(model=EXAMPLE, flavour=None, data=None, data_path=None, partition="iid",
                   alpha=0.5, seed=0)
    assert work.model_config["task"] == "classify"
    assert work.n_params == 16650
    model = work.new_model()
    assert loss_for(model) is smoothed_cross_entropy
    before = evaluate(model, work.dataset.x_val, work.dataset.y_val)
    theta = flatten(model)
    result = Trainer(work, shard=0, n_shards=1, node_id="n0").train_round(
        theta, steps=30, lr=1e-2, batch_size=32)
    from ml.zoo import load_flat

    load_flat(model, theta - result.delta)
    assert evaluate(model, work.dataset.x_val, work.dataset.y_val) < before - 0.5


def test_a_node_imports_only_allowed_factories() -> None:
    zoo = model_config("mlp-digits")
    check_allowed(zoo, ())  # zoo models need no permission
    byo = check(cfg(EXAMPLE))
    with pytest.raises(ByoError) as info:
        check_allowed(byo, ("other.module:build",))
    assert info.value.reason == "not_allowed"
    assert f"--allow-model {EXAMPLE}" in str(info.value)
    check_allowed(byo, (EXAMPLE,))
    with pytest.raises(ByoError):  # a config without a factory string
        check_allowed({"name": "byo", "factory": ["os:system"]}, ("os:system",))


def test_an_installed_entry_point_is_a_model_name_and_allowed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "daa_byo_test-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: daa-byo-test\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[daa_prime.models]\nbyo-digits = {EXAMPLE}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    work = resolve(model="byo-digits", flavour=None, data=None, data_path=None,
                   partition="iid", alpha=0.5, seed=0)
    assert work.model_config["factory"] == EXAMPLE
    assert work.model_config["entry_point"] == "byo-digits"
    check_allowed(work.model_config, ())  # installed: no --allow-model needed
    from server.config import RunConfig

    assert RunConfig(model="byo-digits").model == "byo-digits"
    with pytest.raises(ValueError, match="model must be a zoo model"):
        RunConfig(model="no-such-entry-point")


def test_a_bad_factory_stops_the_server_before_run_state_is_written(tmp_path: Path) -> None:
    from server.runstate import open_run
    from server.store import Store

    with pytest.raises(ByoError) as info:
        open_run(tmp_path / "run", {"model": "tests.test_byo:raises"})
    assert info.value.reason == "factory_raised"
    store = Store(tmp_path / "run")
    try:
        assert store.load_run() is None
        assert not list((tmp_path / "run" / "checkpoints").iterdir())
    finally:
        store.close()


def python_scalar_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Fine in eager torch; its ``float(...)`` is data-dependent, so the train step's trace
    (make_fx over grad_and_value) fails: the train graph does not export, inference does."""
    scale = 1.0 if float(logits.detach().abs().max()) < 1e9 else 0.0
    return loss_fn(logits, y) * scale


def unexportable_loss(config: dict[str, Any]) -> ModelSpec:
    return ModelSpec(module=Tiny(int(config["seed"])), batch=SPEC, loss=python_scalar_loss)


def test_a_train_step_that_does_not_export_leaves_inference_and_the_reason(
        tmp_path: Path) -> None:
    from ml.onnx_export import export_graphs

    checked = check(cfg("tests.test_byo:unexportable_loss"))
    graphs = export_graphs(checked, tmp_path)
    why = graphs.manifest["train_unavailable"]
    assert why["reason"] == "export_failed"
    assert why["detail"]
    assert set(graphs.manifest["graphs"]) == {"infer"}
    assert graphs.infer.exists()
    assert not graphs.train_step.exists()


def test_the_tab_says_why_it_cannot_train(tmp_path: Path) -> None:
    """browser/node/node.js's trainUnavailable under Node.js: the manifest's export failure,
    or a training state over the tab's 2 GiB budget (7 float32 copies of the parameters)."""
    import json
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed")
    root = Path(__file__).resolve().parent.parent
    script = ("import('./browser/node/node.js').then((m) => console.log(JSON.stringify("
              "[76695844, 76695845, 16650].map((n) => m.trainUnavailable({n_params: n})).concat("
              "[m.trainUnavailable({n_params: 5, train_unavailable: {reason: 'export_failed', "
              "detail: 'why'}})]))))")
    out = subprocess.run([node, "--input-type=module", "-e", script], cwd=root,
                         capture_output=True, text=True, timeout=60, check=True)
    fits, too_big, small, failed = json.loads(out.stdout)
    assert fits is None  # 7 * 4 * 76,695,844 bytes = 2 GiB - 16 bytes
    assert too_big["reason"] == "too_large"
    assert "76,695,845 parameters" in too_big["detail"]
    assert small is None
    assert failed == {"reason": "export_failed", "detail": "why"}
