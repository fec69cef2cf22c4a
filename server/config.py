"""Run configuration: a TOML file plus command-line flags, checked once.

Keys in FIXED_KEYS define the run (model, data, layout) and cannot change once the run
exists; the others may be changed when a run is resumed.
"""

from __future__ import annotations

import dataclasses
import tomllib
from array import array
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ml.byo import ENTRY_POINT_GROUP, resolve_factory
from ml.tokenizer import parse_tokenizer
from ml.zoo import MODELS
from shared.aggregation import RULES, estimate_f, get_rule
from shared.autotune import SETTINGS as AUTOTUNE_SETTINGS
from shared.codecs import CODECS, make_codec
from shared.messages import RESULT_CODECS, ROUND_CODECS
from shared.p2p import COORDINATE_RULES
from shared.sparseloco import SparseOuter

FIXED_KEYS = frozenset({"model", "flavour", "data", "data_path", "partition", "alpha",
                        "tokenizer",
                        "n_shards", "seed", "ledger_reward_per_round", "ledger_faucet",
                        "ledger_min_stake", "ledger_pow_bits", "ledger_slash",
                        "ledger_proposal_rounds", "aggregation_weights"})
AGGREGATION_WEIGHTS = ("equal", "stake")
WEIGHTED_RULES = ("mean",)  # the rules aggregation_weights = "stake" may weight
LEDGER_INTS = ("ledger_reward_per_round", "ledger_faucet", "ledger_min_stake",
               "ledger_pow_bits", "ledger_slash", "ledger_proposal_rounds")


def _known_model(name: str) -> bool:
    """A zoo name or a bring-your-own factory (checked in full by ml.byo.check at creation)."""
    return name in MODELS or resolve_factory(name) is not None


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    # zoo model name, or bring your own: "package.module:factory" or the name of an
    # installed "daa_prime.models" entry point (ml/byo.py, docs/byo_model.md)
    model: str = "gpt-tiny"
    flavour: str | None = None  # zoo flavour (None: the model's default)
    data: str | None = None  # "markov" | "text" | "digits" (None: the model's natural data)
    data_path: str | None = None  # UTF-8 text file for data = "text"
    partition: str = "iid"  # "iid" | "noniid" shards
    alpha: float = 0.5  # Dirichlet concentration of non-iid shards
    n_shards: int = 8  # training set shards handed out to nodes round-robin
    seed: int = 0  # model init and data seed
    # language data's tokens (ml/tokenizer.py): "" the data's symbols, "byte" (UTF-8), or
    # "bpe:N", a byte-level BPE of N tokens trained at run creation on the run's text
    tokenizer: str = ""
    inner_steps: int = 50  # H: inner AdamW steps per round
    inner_lr: float = 1e-2  # inner AdamW learning rate
    batch_size: int = 32  # inner batch size
    outer_lr: float = 0.7  # outer Nesterov SGD learning rate
    outer_momentum: float = 0.9  # outer momentum
    # "nesterov" (DiLoCo) or "sparseloco": a sparse 2-bit outer step, broadcast as such
    # (shared.sparseloco; outer_params: momentum, fraction, values, block)
    outer: str = "nesterov"
    outer_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    aggregator: str = "mean"  # aggregation rule (shared.aggregation.RULES)
    aggregator_params: dict[str, Any] = dataclasses.field(default_factory=dict)  # its params
    byzantine_fraction: float = 0.0  # share of updates assumed arbitrary: f = floor(n * it)
    codec: str = "raw32"  # update codec (shared.codecs.CODECS)
    codec_params: dict[str, Any] = dataclasses.field(default_factory=dict)  # its parameters
    error_feedback: bool = True  # nodes add what the codec lost to their next update
    worker_momentum: float = 0.0  # beta: nodes send m = beta m + (1-beta) delta (0: delta)
    cc_reference: str = "zero"  # centered clipping's start: "zero" or "history" (below)
    validation: bool = False  # validators score each update on held-out loss before use
    validation_threshold: float = 0.1  # reject above max(base, median candidate) * (1 + it)
    validation_samples: int = 512  # held-out examples each validator scores on
    validation_timeout_s: float = 10.0  # how long to wait for validator nodes' verdicts
    eval_samples: int = 0  # held-out examples the server's eval loss is over (0: all)
    rounds: int = 0  # stop after this many committed rounds (0: run forever)
    quorum: int = 1  # fewest updates a round is committed with
    deadline_s: float = 60.0  # collection window of one round attempt
    resume_grace_s: float = 2.0  # after a restart: wait this long for last round's nodes
    transport: str = "ws"  # "ws", "star" (updates over WebRTC to the server) or "p2p"
    p2p_replicas: int = 2  # p2p: owners that reduce each shard (their results must agree)
    p2p_timeout_s: float = 30.0  # p2p: owners silent this long are dropped, shards reassigned
    p2p_result_codec: str = "fp16"  # p2p: how reduced shards travel (shared.messages.RESULT_CODECS)
    # p2p: 0 shards the update over all members; G > 0 reduces in up to G groups, two elected
    # aggregators each, the server combining group results (server/hierarchy.py)
    p2p_groups: int = 0
    ice_servers: str = ""  # comma-separated STUN/TURN URLs for WebRTC (none by default)
    rtc_timeout_s: float = 10.0  # a channel not open by then: the node relays over its socket
    delta_downlink: bool = True  # send nodes that hold theta_r-1 only what changed
    heartbeat_s: float = 20.0  # ping interval; a node silent for 1.5x this is dropped
    stale_policy: str = "drop"  # late update for a past round: "drop" or "weight"
    stale_weight: float = 0.5  # "weight": a late update counts stale_weight ** age
    max_staleness: int = 1  # "weight": oldest round (current - this) still applied
    keep_checkpoints: int = 10  # newest checkpoints kept on disk
    max_frame_mb: float = 64.0  # largest frame accepted on the control channel
    # streamed updates (server.streams): an update larger than this goes in chunks of this
    # size, spooled to disk and aggregated in column blocks; 0: always one frame (default)
    stream_chunk_mb: float = 0.0
    # the ledger (docs/ledger.md); fixed for the run by its genesis entry
    ledger_reward_per_round: int = 1000  # units minted per committed round, split by samples
    ledger_faucet: int = 0  # units a new identity may claim once (demos; 0: no faucet)
    ledger_min_stake: int = 0  # stake an identity needs to be admitted (0: open admission)
    ledger_pow_bits: int = 0  # leading zero bits of the proof of work a faucet claim needs
    ledger_slash: int = 100  # units a slash takes (stake first, then balance; at most held)
    ledger_proposal_rounds: int = 20  # committed rounds a proposal stays open (0: forever)
    # "stake": the server's mean weighs each accepted update by its node's ledger stake
    aggregation_weights: str = "equal"
    # the autonomy loop (shared.autotune, docs/autotune.md): per round, a time budget instead
    # of a fixed H, each node's codec, the deadline and the quorum, from what was measured
    autotune: bool = False
    autotune_pin: dict[str, Any] = dataclasses.field(default_factory=dict)  # setting -> value
    autotune_max_steps: int = 0  # most inner steps a node runs per round (0: 10 x inner_steps)
    autotune_weights: str = "steps"  # the mean under autotune: by each update's steps, or "equal"
    # client-level differential privacy (shared.dp, server.dp_accountant, docs/privacy.md)
    dp_clip: float = 0.0  # C: each node clips its update to this L2 norm (0: no DP)
    dp_noise_multiplier: float = 0.0  # sigma: the round's sum carries N(0, (sigma C)^2)
    dp_sample_rate: float = 1.0  # q: each connected trainer trains a round with this chance
    dp_delta: float = 1e-5  # the delta epsilon is reported at
    dp_epsilon_budget: float = 0.0  # stop before a round would spend more (0: no budget)
    dp_accountant: str = "rdp"  # which accountant the budget follows: "rdp" or "pld"
    # secure aggregation (server.secagg_round, docs/privacy.md): the server sums masked updates
    secagg: bool = False
    secagg_clip: float = 1.0  # each coordinate is clipped to [-it, it] before fixed point
    secagg_timeout_s: float = 20.0  # each key stage / the unmask waits at most this long
    # secure and robust (server.secagg_groups_round): secagg inside this many groups, the
    # run's robust rule over the group means (0: off; -1: 2f+1 from byzantine_fraction)
    secagg_groups: int = 0
    # Kademlia peer discovery (server.dht, docs/dht.md): the server runs a DHT node (a
    # bootstrap) and relays nodes' Dht frames; each relayed message costs a server signature
    dht: bool = False
    # overlapped rounds (shared.overlap, docs/operator.md): nodes train round t+1 from their
    # local params while round t is aggregated, then merge onto theta_{t+1}; off by default
    overlap: bool = False

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str, str]] = [
            (_known_model(self.model), "model", "must be a zoo model "
             f"({', '.join(sorted(MODELS))}), 'package.module:factory' or an installed "
             f"{ENTRY_POINT_GROUP!r} entry point"),
            (self.partition in ("iid", "noniid"), "partition", "must be 'iid' or 'noniid'"),
            (self.data in (None, "markov", "text", "digits"), "data",
             "must be markov, text or digits"),
            (self.data != "text" or bool(self.data_path), "data_path",
             "is required for data = 'text'"),
            (self.alpha > 0, "alpha", "must be > 0"),
            (self.n_shards >= 1, "n_shards", "must be >= 1"),
            (self.inner_steps >= 1, "inner_steps", "must be >= 1"),
            (self.inner_lr > 0, "inner_lr", "must be > 0"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.outer_lr > 0, "outer_lr", "must be > 0"),
            (0 <= self.outer_momentum < 1, "outer_momentum", "must be in [0, 1)"),
            (0 <= self.worker_momentum < 1, "worker_momentum", "must be in [0, 1)"),
            (self.outer in ("nesterov", "sparseloco"), "outer",
             "must be 'nesterov' or 'sparseloco'"),
            (self.outer != "sparseloco" or self.transport != "p2p", "outer",
             "= 'sparseloco' needs the aggregate at the server: not with transport p2p"),
            (self.outer != "sparseloco" or self.cc_reference == "zero", "outer",
             "= 'sparseloco' keeps its residual in the momentum slot: cc_reference 'zero' only"),
            (self.cc_reference in ("zero", "history"), "cc_reference",
             "must be 'zero' or 'history'"),
            (self.aggregator in RULES, "aggregator", f"must be one of {sorted(RULES)}"),
            (self.codec in CODECS, "codec", f"must be one of {sorted(CODECS)}"),
            (self.rounds >= 0, "rounds", "must be >= 0"),
            (self.quorum >= 1, "quorum", "must be >= 1"),
            (self.deadline_s > 0, "deadline_s", "must be > 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1"),
            (self.max_frame_mb > 0, "max_frame_mb", "must be > 0"),
            (self.stream_chunk_mb == 0 or 1024 <= self.stream_chunk_mb * 2**20 <= min(
                self.max_frame, 2**31 - 1) - 4096, "stream_chunk_mb",
             "must be 0 (off) or from 1 KiB to max_frame_mb less 4 KiB"),
            (self.stream_chunk_mb == 0 or (self.p2p_groups == 0 and (
                self.transport != "p2p" or not (self.secagg or self.validation))),
             "stream_chunk_mb", "streamed updates are built for transport ws, star or p2p "
             "without p2p_groups, and with secagg or validation for ws or star (p2p secagg's "
             "masked shards and p2p validation are not streamed; grouped p2p hands combined "
             "shards on in one frame)"),
            (self.resume_grace_s >= 0, "resume_grace_s", "must be >= 0"),
            (self.transport in ("ws", "star", "p2p"), "transport", "must be ws, star or p2p"),
            (self.p2p_replicas >= 1, "p2p_replicas", "must be >= 1"),
            (self.p2p_timeout_s > 0, "p2p_timeout_s", "must be > 0"),
            (self.p2p_groups >= 0, "p2p_groups", "must be >= 0"),
            (self.p2p_groups == 0 or self.transport == "p2p", "p2p_groups",
             "needs transport p2p"),
            (self.p2p_result_codec in RESULT_CODECS, "p2p_result_codec",
             f"must be one of {RESULT_CODECS}"),
            (self.transport != "p2p" or self.aggregator in COORDINATE_RULES, "aggregator",
             f"must be coordinate-wise {COORDINATE_RULES} with transport p2p (shards are "
             "reduced separately)"),
            (self.transport != "p2p" or not self.validation, "validation",
             "needs the updates at the server: not with transport p2p"),
            (self.transport != "p2p" or self.codec == "raw32", "codec",
             "must be raw32 with transport p2p (members send each other float32 slices; "
             "p2p_result_codec sets how reduced shards travel)"),
            (self.rtc_timeout_s > 0, "rtc_timeout_s", "must be > 0"),
            (self.heartbeat_s > 0, "heartbeat_s", "must be > 0"),
            (self.stale_policy in ("drop", "weight"), "stale_policy", "must be drop or weight"),
            (0 < self.stale_weight <= 1, "stale_weight", "must be in (0, 1]"),
            (self.max_staleness >= 1, "max_staleness", "must be >= 1"),
            (self.validation_threshold >= 0, "validation_threshold", "must be >= 0"),
            (self.validation_samples >= 1, "validation_samples", "must be >= 1"),
            (self.validation_timeout_s > 0, "validation_timeout_s", "must be > 0"),
            (self.eval_samples >= 0, "eval_samples", "must be >= 0"),
            *[(getattr(self, k) >= 0, k, "must be >= 0") for k in LEDGER_INTS],
            (self.ledger_pow_bits <= 32, "ledger_pow_bits", "must be <= 32"),
            (self.aggregation_weights in AGGREGATION_WEIGHTS, "aggregation_weights",
             f"must be one of {AGGREGATION_WEIGHTS}"),
            (self.aggregation_weights == "equal" or self.aggregator in WEIGHTED_RULES,
             "aggregation_weights", f"= 'stake' needs a rule that takes weights "
             f"{WEIGHTED_RULES}, not aggregator {self.aggregator!r}"),
            (self.aggregation_weights == "equal" or self.transport != "p2p",
             "aggregation_weights", "= 'stake' needs the updates at the server: not with "
             "transport p2p"),
            (set(self.autotune_pin) <= set(AUTOTUNE_SETTINGS), "autotune_pin",
             f"keys must be among {AUTOTUNE_SETTINGS}"),
            (self.autotune_pin.get("codec", "raw32") in ROUND_CODECS[1:], "autotune_pin",
             f"codec must be one of {ROUND_CODECS[1:]}"),
            (all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0
                 for k, v in self.autotune_pin.items() if k != "codec"), "autotune_pin",
             "values must be positive numbers (codec: a codec name)"),
            (self.autotune_max_steps >= 0, "autotune_max_steps", "must be >= 0"),
            (self.autotune_weights in ("steps", "equal"), "autotune_weights",
             "must be 'steps' or 'equal'"),
            (self.dp_clip >= 0, "dp_clip", "must be >= 0"),
            (self.dp_noise_multiplier >= 0, "dp_noise_multiplier", "must be >= 0"),
            (0 < self.dp_sample_rate <= 1, "dp_sample_rate", "must be in (0, 1]"),
            (0 < self.dp_delta < 1, "dp_delta", "must be in (0, 1)"),
            (self.dp_epsilon_budget >= 0, "dp_epsilon_budget", "must be >= 0"),
            (self.dp_accountant in ("rdp", "pld"), "dp_accountant", "must be 'rdp' or 'pld'"),
            (self.dp_epsilon_budget == 0 or (self.dp_clip > 0 and self.dp_noise_multiplier > 0),
             "dp_epsilon_budget", "needs dp_clip > 0 and dp_noise_multiplier > 0"),
            (self.dp_sample_rate == 1 or self.dp_clip > 0, "dp_sample_rate",
             "< 1 needs dp_clip > 0 (sampling is part of DP)"),
            (self.aggregation_weights == "equal" or self.ledger_min_stake > 0,
             "aggregation_weights", "= 'stake' needs staked admission (ledger_min_stake > 0)"),
        ]
        checks += secagg_checks(self) + overlap_checks(self)
        try:
            parse_tokenizer(self.tokenizer)
        except ValueError as exc:
            checks.append((False, "tokenizer",
                           str(exc).removeprefix("tokenizer: ").split(", got ")[0]))
        for ok, key, what in checks:
            if not ok:
                raise ValueError(f"config {key} {what} (got {getattr(self, key)!r})")
        if self.outer == "sparseloco":
            try:
                SparseOuter.from_params(self.outer_lr, self.outer_params)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"config outer_params: {exc}") from None
        try:
            make_codec(self.codec, **self.codec_params)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config codec_params for {self.codec!r}: {exc}") from None
        if not 0 <= self.byzantine_fraction < 1:
            raise ValueError(f"config byzantine_fraction must be in [0, 1) "
                             f"(got {self.byzantine_fraction!r})")
        try:  # the smallest round that may commit must be one the rule can aggregate
            f = estimate_f(self.quorum, self.byzantine_fraction, rule=self.aggregator)
            get_rule(self.aggregator)([array("f", [float(i)]) for i in range(self.quorum)],
                                      f=f, **self.aggregator_params)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config aggregator {self.aggregator!r} with quorum "
                             f"{self.quorum}: {exc}") from None

    @property
    def autotune_steps_cap(self) -> int:
        return self.autotune_max_steps or 10 * self.inner_steps

    @property
    def max_frame(self) -> int:
        return int(self.max_frame_mb * 1024 * 1024)

    @property
    def stream_chunk(self) -> int:
        """Bytes per chunk of a streamed update (0: updates go in one frame)."""
        return int(self.stream_chunk_mb * 1024 * 1024)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def merged(self, overrides: dict[str, Any], *, resuming: bool) -> RunConfig:
        """Apply overrides (None values ignored); a resumed run refuses to change FIXED_KEYS."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if resuming:
            bad = sorted(k for k, v in changes.items()
                         if k in FIXED_KEYS and getattr(self, k) != v)
            if bad:
                raise ValueError(
                    f"the run in this data dir was created with "
                    f"{ {k: getattr(self, k) for k in bad} }; cannot change {bad} on resume "
                    "(use a new --data-dir)")
        return RunConfig.from_dict({**self.to_dict(), **changes})


GROUP_RULES = ("mean", "median", "trimmed-mean", "centered-clipping")  # over group means


def overlap_checks(c: RunConfig) -> list[tuple[bool, str, str]]:
    """What overlapped rounds (shared.overlap) are built for: updates at the server from
    nodes that train a fixed H (not p2p, secagg or autotune's time budget)."""
    return [(not c.overlap or (c.transport != "p2p" and not c.secagg and not c.autotune),
             "overlap", "is built for transport ws or star without secagg or autotune")]


def secagg_checks(c: RunConfig) -> list[tuple[bool, str, str]]:
    """What secure aggregation cannot run with: the server sees only the masked sum, so
    nothing that needs (or reweighs) individual updates."""
    hidden = "needs individual updates, which secure aggregation hides from the server"
    return [
        (c.secagg_clip > 0, "secagg_clip", "must be > 0"),
        (c.secagg_timeout_s > 0, "secagg_timeout_s", "must be > 0"),
        (not c.secagg or c.transport != "p2p" or c.p2p_groups == 0, "p2p_groups",
         "grouped p2p with secagg is not built: use p2p_groups 0, ws or star"),
        (c.secagg_groups >= -1, "secagg_groups", "must be >= 0, or -1 (auto)"),
        (c.secagg_groups == 0 or (c.secagg and c.transport != "p2p"), "secagg_groups",
         "needs secagg in a ws or star run"),
        (not c.secagg or c.aggregator == "mean" or (
            c.secagg_groups != 0 and c.aggregator in GROUP_RULES), "aggregator",
         f"must be mean with secagg (a robust rule {hidden}); with secagg_groups one of "
         f"{list(GROUP_RULES)} over the group means"),
        (not c.secagg or not c.validation or c.secagg_groups != 0, "validation",
         f"{hidden}: not with secagg (with secagg_groups the group means are validated)"),
        (not c.secagg or c.aggregation_weights == "equal", "aggregation_weights",
         "must be equal with secagg (the masked sum has one weight per update)"),
        (not c.secagg or not c.autotune, "autotune",
         "is not with secagg (per-node codecs and step weights)"),
        (not c.secagg or c.worker_momentum == 0, "worker_momentum",
         "must be 0 with secagg (nodes send their masked delta)"),
        (not c.secagg or c.stale_policy == "drop", "stale_policy",
         "must be drop with secagg (a late masked update cannot be unmasked)"),
    ]


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a run config file: top-level keys, or a [run] table."""
    with open(path, "rb") as fh:
        raw = tomllib.load(fh)
    table = raw.get("run", raw)
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [run] must be a table")
    RunConfig.from_dict(table)  # validate keys and values early, naming the file's mistakes
    return dict(table)
