"""`python -m server --help`: each run-config flag with its allowed values (taken from the
registries the config checks against, so help and validation cannot drift) and its unit."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from ml.zoo import MODELS
from server.browser_data import ONNX_READY
from server.config import RunConfig
from shared.aggregation import RULES
from shared.codecs import CODECS
from shared.messages import RESULT_CODECS, TRANSPORTS

# flags whose value is one of a fixed set (argparse checks them and lists them in --help)
CHOICES: dict[str, list[str]] = {
    "flavour": sorted({f for m in MODELS.values() for f in m.flavours}),
    "data": ["markov", "text", "digits"],
    "partition": ["iid", "noniid"],
    "aggregator": sorted(RULES),
    "cc_reference": ["zero", "history"],
    "outer": ["nesterov", "sparseloco"],
    "codec": sorted(CODECS),
    "stale_policy": ["drop", "weight"],
    "transport": list(TRANSPORTS),
    "p2p_result_codec": list(RESULT_CODECS),
}

HELP: dict[str, str] = {
    "autotune_pin": "autotune settings the operator fixes, as JSON, e.g. '{\"codec\": "
                    "\"raw32\", \"budget_s\": 2}' (keys: budget_s, max_steps, deadline_s, "
                    "quorum, codec)",
    "autotune_max_steps": "most inner steps a node runs in one autotuned round (0: 10 x H)",
    "model": "zoo model (" + ", ".join(sorted(MODELS)) + "), or bring your own: "
             "package.module:factory or an installed daa_prime.models entry point "
             "(docs/byo_model.md)",
    "flavour": "model size, per model: " + "; ".join(
        f"{name}: {', '.join(m.flavours)}" for name, m in sorted(MODELS.items())),
    "data": "training data (none: the model's own: markov for gpt-tiny, digits for mlp-digits)",
    "data_path": "UTF-8 text file, with --data text",
    "partition": "how the training set is split into shards",
    "alpha": "Dirichlet concentration of non-iid shards (> 0; smaller is more skewed)",
    "n_shards": "training-set shards handed out to nodes round-robin (count)",
    "seed": "model init and data seed (integer)",
    "tokenizer": "language data's tokens: '' the data's own symbols, byte (UTF-8), or bpe:N, a "
                 "byte-level BPE of N tokens (257..8192) trained at run creation on the "
                 "run's text (the [bpe] extra; docs/operator.md \"Tokens\")",
    "inner_steps": "H: inner AdamW steps each node runs per round (count)",
    "inner_lr": "inner AdamW learning rate",
    "batch_size": "inner batch size (examples)",
    "outer_lr": "outer Nesterov SGD learning rate",
    "outer_momentum": "outer momentum, in [0, 1)",
    "outer": "outer step: nesterov (DiLoCo) or sparseloco (sparse 2-bit step, broadcast as "
             "such; docs/sparseloco.md)",
    "outer_params": "sparseloco step as JSON: momentum (0), fraction (0.04), values (int2), "
                    "block (256), decay (0.8: the server residual's per-round decay)",
    "aggregator": "robust aggregation rule",
    "worker_momentum": "nodes send m = beta m + (1 - beta) delta; beta in [0, 1) (0: delta)",
    "cc_reference": "centered clipping's starting point",
    "codec": "how updates are compressed on the wire",
    "rounds": "stop after this many committed rounds (count; 0: run forever)",
    "quorum": "fewest updates a round is committed with (count)",
    "deadline_s": "collection window of one round attempt (seconds)",
    "keep_checkpoints": "newest checkpoints kept on disk (count)",
    "max_frame_mb": "largest frame accepted on the control channel (MB)",
    "stream_chunk_mb": "updates larger than this go in chunks of this size, spooled to disk "
                       "(MB; 0: off)",
    "codec_params": "the codec's parameters (JSON object, e.g. '{\"k\": 0.01}')",
    "aggregator_params": "the rule's parameters (JSON object)",
    "byzantine_fraction": "share of updates assumed arbitrary, in [0, 0.5): f = floor(n * it)",
    "validation_threshold": "reject an update whose held-out loss exceeds "
                            "max(base, median candidate) * (1 + this) (fraction)",
    "validation_samples": "held-out examples each update is scored on (count)",
    "validation_timeout_s": "wait this long for validator nodes' verdicts (seconds)",
    "eval_samples": "held-out examples the eval loss of each commit is over (count; 0: "
                    "the whole validation split)",
    "heartbeat_s": "ping interval; a node silent for 1.5x this is dropped (seconds)",
    "stale_policy": "a late update for a past round: dropped, or applied with a weight",
    "stale_weight": "with stale policy 'weight': a late update counts this ** age (fraction)",
    "max_staleness": "with stale policy 'weight': oldest round still applied (rounds back)",
    "resume_grace_s": "after a restart, wait this long for the last round's nodes (seconds)",
    "transport": "ws: updates over the WebSocket; star: over WebRTC to the server; p2p: nodes "
                 "reduce shards among themselves",
    "ice_servers": "comma-separated STUN/TURN URLs for WebRTC (none by default)",
    "rtc_timeout_s": "a WebRTC channel not open by then: the node relays (seconds)",
    "p2p_replicas": "p2p: owners that reduce each shard (count)",
    "p2p_timeout_s": "p2p: owners silent this long are dropped (seconds)",
    "p2p_result_codec": "p2p: how reduced shards travel",
    "p2p_groups": "p2p: reduce in up to this many groups, two aggregators each (0: shards)",
    "secagg_groups": "secagg: secure aggregation in this many groups, the aggregator over "
                     "their means (0: off, -1: 2f+1 from byzantine-fraction)",
}


def default(key: str) -> Any:
    value = getattr(RunConfig(), key)
    if value is None:
        return "the model's" if key in ("flavour", "data") else "none"
    return value


async def graphs_ready(app: web.Application) -> None:
    """Wait for the start-up ONNX export (server.browser_data.prewarm_onnx) before the URL is
    printed, saying why when it is not already cached: a tab opened then trains at once."""
    ready = app.get(ONNX_READY)
    if ready is None or ready.is_set():
        return
    t0 = time.perf_counter()
    print("exporting the model's browser graphs (once per model and code version; later "
          "starts read them from the cache) ...", flush=True)
    await ready.wait()
    print(f"graphs ready in {time.perf_counter() - t0:.0f} s", flush=True)
