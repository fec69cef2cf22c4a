"""bench.simulate's report: accuracy, peak memory and the per-round table rows (both
engines: bench.simulate and bench.sim_ray)."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import numpy as np
import torch

from ml.zoo import load_flat
from server.runstate import RunState


def accuracy(run: RunState, params: np.ndarray, model: torch.nn.Module | None = None) -> float:
    """Top-1 accuracy of `params` on the run's validation split (classification models)."""
    net = model if model is not None else run.work.new_model()
    load_flat(net, params)
    ds = run.work.dataset
    net.eval()
    with torch.no_grad():
        logits = net(torch.from_numpy(np.ascontiguousarray(ds.x_val)).to(torch.float32))
    return float((logits.argmax(-1).numpy() == np.asarray(ds.y_val)).mean())


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024.0 if sys.platform != "darwin" else kb / (1024.0 * 1024.0)


def round_row(r: int, rec: dict[str, Any], run: Any, coord: Any, eval_model: Any,
              acc_before: int, rej_before: int, train_s: float, sign_s: float,
              t_round: float) -> dict[str, Any]:
    """One round's table row (both engines): the committed record, accuracy when
    `eval_model` is given (classification), and this round's counters and times."""
    acc = accuracy(run, run.params, eval_model) if eval_model is not None else None
    return {"round": r, "eval_loss": rec.get("eval_loss"), "accuracy": acc,
            "train_loss": rec.get("train_loss"), "n_updates": rec.get("n_updates"),
            "accepted": coord.counters["accepted"] - acc_before,
            "rejected": sum(coord.rejected.values()) - rej_before,
            "train_s": round(train_s, 2), "submit_s": round(sign_s, 2),
            "round_s": round(time.perf_counter() - t_round, 2)}


def _round_text(row: dict[str, Any], train_s: float, sign_s: float) -> str:
    loss_txt = f"{row['eval_loss']:.4f}" if row["eval_loss"] is not None else "n/a"
    acc_txt = f", accuracy {row['accuracy']:.3f}" if row["accuracy"] is not None else ""
    return (f"round {row['round']}: eval loss {loss_txt}{acc_txt}, {row['accepted']} "
            f"accepted, {row['rejected']} rejected, {row['round_s']:.1f} s "
            f"(train {train_s:.1f} s, sign+handle {sign_s:.1f} s)" + " " * 10)
