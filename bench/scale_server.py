"""The server's memory at one commit of a large model, without nodes (bench.scale's server side).

    python -m bench.scale_server                    # llama 125m
    python -m bench.scale_server --flavour tiny     # the test's

bench.scale runs the whole system; at 125M its four native nodes need more memory than a
23 GB machine has (docs/benchmarks.md). This measures the server's part alone, in this
process, with the server's own code: `server.runstate.open_run` (model, data, first eval,
checkpoint 0), then one commit as `server.coordinator` does it: the round's aggregate (a
random float32 vector of the model's size, as a mean of updates would be), the outer step
(`server.outer_step.commit_step`, SparseLoCo: top-k 5% at 2 bits with the server residual;
the aggregate handed over as `server.coordinator` hands it when autotune is off),
the eval (`RunState.evaluate`, first --eval-samples held-out windows) and `RunState.commit`
(checkpoint, delta downlink, the RoundOpen bytes). Per stage: the resident set after it and
its peak (VmHWM, reset before each stage with /proc/self/clear_refs), in MB.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import emit
from bench.scale import FRACTION


def _kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(model: str, flavour: str, eval_samples: int, data_dir: Path) -> dict[str, Any]:
    import numpy as np

    from server.outer_step import commit_step
    from server.runstate import open_run

    stages: list[dict[str, Any]] = []

    def stage(name: str, t0: float) -> None:
        stages.append({"stage": name, "rss_mb": round(_kb("VmRSS") / 1024, 1),
                       "peak_mb": round(_kb("VmHWM") / 1024, 1),
                       "s": round(time.monotonic() - t0, 1)})
        _reset()

    _reset()
    stage("imports", time.monotonic())
    cfg: dict[str, Any] = {
        "model": model, "eval_samples": eval_samples, "n_shards": 4, "outer": "sparseloco",
        "outer_lr": 1.0, "outer_params": {"fraction": FRACTION, "values": "int2", "decay": 1.0},
        "codec": "topk", "codec_params": {"fraction": FRACTION, "values": "int2"}}
    if flavour:
        cfg["flavour"] = flavour
    t0 = time.monotonic()
    run = open_run(data_dir, cfg)
    stage("open_run", t0)
    t0 = time.monotonic()
    agg = np.random.default_rng(0).standard_normal(run.n_params, dtype=np.float32)
    agg *= np.float32(1e-3)
    stage("aggregate", t0)
    t0 = time.monotonic()
    handed = [agg]  # as the coordinator hands it over (autotune off): the step lets go of it
    del agg
    theta, mom, step = commit_step(run.config, run.params, handed, run.momentum)
    stage("outer_step", t0)
    t0 = time.monotonic()
    loss = run.evaluate(theta)
    stage("evaluate", t0)
    t0 = time.monotonic()
    run.commit(round_=0, params=theta, momentum=mom, attempts=1, eval_loss=loss,
               train_loss=None, updates=[], bytes_up=0, bytes_down=0, duration_s=0.0,
               sparse_step=step)
    stage("commit", t0)
    return {"n_params": run.n_params, "stages": stages, "eval_loss": loss,
            "eval_loss_init": run.eval_loss_init}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama")
    p.add_argument("--flavour", default="125m")
    p.add_argument("--eval-samples", type=int, default=8)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-scale-server-") as tmp:
        out = measure(a.model, a.flavour, a.eval_samples, Path(tmp))
    model_mb = out["n_params"] * 4 / 1e6
    peak = max(s["peak_mb"] for s in out["stages"])
    bound = 4 * model_mb + 300
    print(f"bench.scale_server: {a.model} {a.flavour} ({out['n_params']:,} params, "
          f"{model_mb:.1f} MB float32); server code in this process, one commit, no nodes")
    print("stage | rss MB after | peak MB during | s")
    for s in out["stages"]:
        print(f"{s['stage']} | {s['rss_mb']:,.1f} | {s['peak_mb']:,.1f} | {s['s']}")
    print(f"peak {peak:,.1f} MB vs 4 x model_mb + 300 = {bound:,.1f} MB: "
          f"{'met' if peak <= bound else 'MISSED'}")
    emit({"bench": "scale_server", "model": f"{a.model}-{a.flavour}" if a.flavour else a.model,
          "params": out["n_params"], "model_mb": round(model_mb, 1),
          "server_peak_rss_mb": peak, "server_rss_bound_mb": round(bound, 1),
          "within_bound": peak <= bound, "stages": out["stages"],
          "eval_loss_init": out["eval_loss_init"], "eval_loss_after": out["eval_loss"],
          "note": "stages' peaks are read with the high-water mark reset before each"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
