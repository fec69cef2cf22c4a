"""The browser participant's protocol state machine (shared.participant), frame by frame:
the server's signed frames go in, the events a tab acts on come out."""

from __future__ import annotations

import base64
import dataclasses
import json
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from ml.zoo import build_model, manifest, model_config
from shared.codecs import decode_update, make_codec
from shared.downlink import encode_changes
from shared.envelope import Identity, sign_round, verify_frame
from shared.errors import BadSignature
from shared.frame import decode_frame
from shared.layout import make_manifest, manifest_json, model_id
from shared.messages import (
    Ack,
    Challenge,
    Error,
    Hello,
    Message,
    Ready,
    RoundCommitted,
    RoundOpen,
    Signal,
    Submit,
    ValidateRequest,
    Verdict,
    Welcome,
    decode_message,
    sha256_hex,
)
from shared.participant import Participant
from shared.platform import register_update_encoder

RUN = "run-participant"
N = 64
Vec = npt.NDArray[np.float32]
Event = dict[str, Any]


@cache
def key(name: str) -> Identity:
    return Identity.generate()


def participant(name: str = "node", **kw: Any) -> Participant:
    return Participant(key(name), runtime="browser", agent="test/1", device="webgpu", **kw)


def signed(msg: Message, signer: str = "server") -> bytes:
    """`msg` signed as the server (or `signer`) signs its frames."""
    sign = key(signer).signer(run_id=RUN, round_=sign_round(getattr(msg, "round", None)),
                              msg_type=msg.TYPE, nonce=msg.nonce)
    return msg.to_frame(sign=sign)


def challenge(server: str = "server") -> Challenge:
    return Challenge(run_id=RUN, challenge="cd" * 32, protocol_version=1, agent="test-server",
                     server_public_key=key(server).public_key.hex())


def welcome(*, codec: str = "raw32", codec_params: dict[str, Any] | None = None,
            error_feedback: bool = False, model: dict[str, Any] | None = None,
            mid: str | None = None, n_params: int = N, worker_momentum: float = 0.0,
            transport: str = "ws") -> Welcome:
    return Welcome(run_id=RUN, node_id=key("node").node_id, model=model or {"name": "toy"},
                   model_id=mid or sha256_hex(b"toy"), data={"kind": "toy"}, shard=1,
                   n_shards=3, codec=codec, codec_params=codec_params or {},
                   error_feedback=error_feedback, n_params=n_params,
                   worker_momentum=worker_momentum, transport=transport)


def params(seed: int) -> Vec:
    return np.random.default_rng(seed).standard_normal(N).astype(np.float32)


def digest(theta: Vec) -> str:
    return sha256_hex(theta.astype("<f4").tobytes())


def round_open(rnd: int, theta: Vec, *, attempt: int = 0) -> RoundOpen:
    return RoundOpen(run_id=RUN, round=rnd, attempt=attempt, params_digest=digest(theta),
                     deadline_s=30.0, inner_steps=5, inner_lr=1e-3, batch_size=16,
                     payload=theta.astype("<f4").tobytes())


def delta_open(rnd: int, prev: Vec, new: Vec, *, base: str | None = None) -> RoundOpen:
    payload = encode_changes(prev, new)
    assert payload is not None
    return RoundOpen(run_id=RUN, round=rnd, attempt=0, params_digest=digest(new),
                     deadline_s=30.0, inner_steps=5, inner_lr=1e-3, batch_size=16,
                     base_digest=base or digest(prev), payload=payload)


def kinds(events: list[Event]) -> list[str]:
    return [e["kind"] for e in events]


def joined(p: Participant | None = None, **welcome_kw: Any) -> Participant:
    """A participant past the Challenge and the Welcome."""
    p = p or participant()
    assert kinds(p.receive(signed(challenge()))) == ["send"]
    assert kinds(p.receive(signed(welcome(**welcome_kw)))) == ["welcome"]
    return p


def sent(event: Event, node: str = "node") -> Message:
    """The message in a `send` event, after checking that `node` signed it."""
    assert event["kind"] == "send"
    verify_frame(decode_frame(event["frame"]), public_key=key(node).public_key, run_id=RUN,
                 node_id=key(node).node_id)
    return decode_message(event["frame"])


def trained(p: Participant, theta: Vec, delta: Vec, rnd: int = 0) -> Submit:
    """Open `rnd` with `theta`, finish it with theta - delta; the Submit that went out."""
    assert kinds(p.receive(signed(round_open(rnd, theta))))[-1] == "train"
    events = p.submit(rnd, delta.astype("<f4").tobytes(), train_loss=0.5,
                      samples=32, compute_s=1.234567)
    assert kinds(events) == ["journal", "send"]
    msg = sent(events[1])
    assert isinstance(msg, Submit)
    return msg


# -- joining -----------------------------------------------------------------------------------
@pytest.mark.parametrize("runtime", ["browser", "native"])
def test_challenge_is_answered_with_a_signed_hello(runtime: str) -> None:
    p = Participant(key("node"), runtime=runtime, agent="a/1", device="cpu")
    events = p.receive(signed(challenge()))
    assert kinds(events) == ["send"]
    hello = sent(events[0])
    assert isinstance(hello, Hello)
    assert (hello.node_id, hello.public_key) == (key("node").node_id, key("node").public_key.hex())
    assert hello.challenge == "cd" * 32
    assert (hello.runtime, hello.features, hello.role) == (runtime, "delta-params", "trainer")
    with pytest.raises(BadSignature):  # signed by the node, not by anyone else
        verify_frame(decode_frame(events[0]["frame"]), public_key=key("server").public_key,
                     run_id=RUN, node_id=key("server").node_id)


def test_frames_that_fail_verification_are_refused() -> None:
    p = participant()
    ack = Ack(round=0, digest=sha256_hex(b"u"), status="accepted")
    assert kinds(p.receive(signed(ack))) == ["refused"]  # not a Challenge first
    assert p.counts["refused_frames"] == 1
    assert kinds(p.receive(signed(challenge()))) == ["send"]
    assert kinds(p.receive(signed(ack, signer="mallory"))) == ["refused"]  # another key
    good = signed(Ack(round=0, digest=sha256_hex(b"u"), status="duplicate"))
    assert p.receive(good) == [{"kind": "ack", "round": 0, "status": "duplicate",
                                "digest": sha256_hex(b"u")}]
    assert kinds(p.receive(good)) == ["refused"]  # a replay
    assert p.counts["refused_frames"] == 3
    assert p.counts["duplicate"] == 1


def test_server_key_is_pinned_per_run() -> None:
    saved: list[dict[str, str]] = []
    p = participant(save_pins=saved.append)
    assert kinds(p.receive(signed(challenge()))) == ["send"]
    assert saved == [{RUN: key("server").node_id}]
    pinned = participant(pins=saved[0], save_pins=saved.append)
    events = pinned.receive(signed(challenge("mallory"), signer="mallory"))
    assert kinds(events) == ["fatal"]
    assert "refusing" in events[0]["message"]
    assert kinds(pinned.receive(signed(challenge()))) == ["send"]
    assert len(saved) == 1  # already pinned: nothing new to save
    required = participant(expected_server_id=key("server").node_id)
    assert kinds(required.receive(signed(challenge("mallory"), signer="mallory"))) == ["fatal"]
    assert pinned.counts["refused_frames"] == required.counts["refused_frames"] == 0


def test_welcome_reports_the_run() -> None:
    p = participant()
    p.receive(signed(challenge()))
    (event,) = p.receive(signed(welcome(codec="topk", codec_params={"fraction": 0.1},
                                        error_feedback=True)))
    assert event == {"kind": "welcome", "run_id": RUN, "node_id": key("node").node_id,
                     "server_id": key("server").node_id, "model": {"name": "toy"},
                     "model_id": sha256_hex(b"toy"), "data": {"kind": "toy"}, "shard": 1,
                     "n_shards": 3, "codec": "topk", "codec_params": {"fraction": 0.1},
                     "error_feedback": True, "n_params": N, "transport": "ws",
                     "rtc_timeout_s": 10.0}


# -- rounds ------------------------------------------------------------------------------------
def test_round_open_trains_once_and_a_newer_round_cancels() -> None:
    p = joined()
    theta0, theta1 = params(0), params(1)
    (train,) = p.receive(signed(round_open(0, theta0)))
    assert train == {"kind": "train", "round": 0, "attempt": 0,
                     "params": theta0.astype("<f4").tobytes(), "params_digest": digest(theta0),
                     "steps": 5, "lr": 1e-3, "batch_size": 16, "deadline_s": 30.0,
                     "time_budget_s": None}
    assert p.receive(signed(round_open(0, theta0, attempt=1))) == []  # a retry: keep going
    events = p.receive(signed(round_open(1, theta1)))
    assert kinds(events) == ["cancel", "train"]
    assert events[0]["round"] == 0
    assert events[1]["round"] == 1
    assert events[1]["params"] == theta1.astype("<f4").tobytes()


def test_params_delta_is_applied_or_forces_a_reconnect() -> None:
    p = joined()
    theta0 = params(0)
    theta1 = theta0.copy()
    theta1[[3, 17, 40]] = [1.5, -2.0, 0.25]
    p.receive(signed(round_open(0, theta0)))
    events = p.receive(signed(delta_open(1, theta0, theta1)))
    assert kinds(events) == ["cancel", "train"]
    assert events[1]["params"] == theta1.astype("<f4").tobytes()
    assert events[1]["params_digest"] == digest(theta1)
    theta2 = theta1.copy()
    theta2[5] = 9.0
    stray = delta_open(2, theta1, theta2, base=sha256_hex(b"not held"))
    # round 1's training stops: the round comes back with full params after the reconnect
    assert kinds(p.receive(signed(stray))) == ["cancel", "reconnect"]
    # the base is gone now: even a delta against theta1 needs the full params first
    assert kinds(p.receive(signed(delta_open(2, theta1, theta2)))) == ["reconnect"]
    assert kinds(p.receive(signed(round_open(1, theta1)))) == ["train"]  # not "a retry"


# -- submit ------------------------------------------------------------------------------------
def test_submit_sends_the_pseudo_gradient() -> None:
    p = joined()
    theta0 = params(0)
    delta = (0.01 * params(7)).astype(np.float32)
    msg = trained(p, theta0, delta)
    assert (msg.run_id, msg.round, msg.node_id, msg.codec) == (RUN, 0, key("node").node_id,
                                                                "raw32")
    assert (msg.length, msg.samples, msg.train_loss, msg.compute_s) == (N, 32, 0.5, 1.2346)
    np.testing.assert_array_equal(decode_update(msg.payload, N, expect="raw32"), delta)
    assert p.counts["submitted"] == 1
    assert json.loads(p.journal_entry() or "")["submit"]["digest"] == msg.digest
    assert p.submit(0, theta0.tobytes(), train_loss=None, samples=1, compute_s=0.0) == []


def test_worker_momentum_sends_the_momentum_of_the_deltas() -> None:
    p = joined(worker_momentum=0.75)
    d0, d1 = (0.01 * params(7)).astype(np.float32), (0.01 * params(8)).astype(np.float32)
    first = trained(p, params(0), d0, rnd=0)
    np.testing.assert_array_equal(decode_update(first.payload, N, expect="raw32"), d0)
    second = trained(p, params(1), d1, rnd=1)
    np.testing.assert_allclose(decode_update(second.payload, N, expect="raw32"),
                               0.75 * d0 + 0.25 * d1, rtol=1e-6, atol=1e-9)
    assert kinds(p.receive(signed(welcome())))[-1] == "welcome"  # beta changed: fresh start
    assert p.momentum is None


def test_submit_for_a_round_not_being_trained_sends_nothing() -> None:
    p = joined()
    assert p.submit(0, params(0).tobytes(), train_loss=None, samples=1, compute_s=0.1) == []
    p.receive(signed(round_open(3, params(0))))
    assert p.submit(2, params(0).tobytes(), train_loss=None, samples=1, compute_s=0.1) == []
    assert p.counts["submitted"] == 0
    assert p.pending is None


def test_diverged_training_is_not_submitted() -> None:
    p = joined()
    theta0 = params(0)
    p.receive(signed(round_open(0, theta0)))
    bad = theta0.copy()
    bad[9] = np.nan
    events = p.submit(0, bad.tobytes(), train_loss=None, samples=8, compute_s=0.1)
    assert kinds(events) == ["error"]
    assert events[0]["code"] == "not_finite"
    assert p.pending is None
    assert p.counts["submitted"] == 0


def test_topk_error_feedback_keeps_and_resends_the_dropped_mass() -> None:
    p = joined(codec="topk", codec_params={"fraction": 0.125, "values": "fp16"},
               error_feedback=True)
    theta0 = params(0)
    order = np.random.default_rng(3).permutation(N)
    delta = np.zeros(N, np.float32)
    delta[order] = np.linspace(1.0, 0.1, N, dtype=np.float32)  # distinct magnitudes
    sub0 = trained(p, theta0, delta)
    sent0 = np.asarray(decode_update(sub0.payload, N, expect="topk"))
    assert set(np.flatnonzero(sent0)) == set(order[:8])  # the 8 largest
    assert p.residual is not None
    np.testing.assert_allclose(p.residual + sent0, delta, atol=1e-6)
    residual0 = np.array(p.residual)
    # round 1 trains to a standstill: what goes out is the mass round 0 dropped
    sub1 = trained(p, params(1), np.zeros(N, np.float32), rnd=1)
    sent1 = np.asarray(decode_update(sub1.payload, N, expect="topk"))
    assert set(np.flatnonzero(sent1)) == set(order[8:16])
    np.testing.assert_allclose(sent1[order[8:16]], residual0[order[8:16]], rtol=1e-3)
    np.testing.assert_allclose(p.residual + sent1, residual0, atol=1e-6)


def test_codec_that_needs_a_layout_is_fatal_without_one() -> None:
    p = joined(codec="powersgd")
    p.receive(signed(round_open(0, params(0))))
    events = p.submit(0, params(1).tobytes(), train_loss=None, samples=1, compute_s=0.1)
    assert kinds(events) == ["fatal"]
    assert "layout" in events[0]["message"]


# -- reload, commit, errors --------------------------------------------------------------------
def test_journaled_update_is_resubmitted_not_retrained() -> None:
    first = joined()
    theta0 = params(0)
    original = trained(first, theta0, 0.01 * params(5))
    entry = first.journal_entry()
    assert entry is not None
    for p in (participant(), first):  # after a reload, and after a reconnect
        if p is not first:
            assert p.restore(entry)
        p.connection_made()
        joined(p)
        events = p.receive(signed(round_open(0, theta0, attempt=1)))
        assert kinds(events) == ["resubmit", "send"]
        assert events[0] == {"kind": "resubmit", "round": 0, "params_digest": digest(theta0),
                             "params": theta0.astype("<f4").tobytes(),
                             "digest": original.digest}
        again = sent(events[1])
        assert isinstance(again, Submit)
        assert again.nonce != original.nonce
        assert (again.round, again.digest, again.payload, again.samples) == (
            original.round, original.digest, original.payload, original.samples)
    other_params = participant()
    assert other_params.restore(entry)
    joined(other_params)
    assert kinds(other_params.receive(signed(round_open(0, params(9))))) == ["train"]


def test_restore_refuses_unusable_entries() -> None:
    p = joined()
    trained(p, params(0), 0.01 * params(5))
    entry = p.journal_entry()
    assert entry is not None
    doc = json.loads(entry)
    tampered = json.dumps({**doc, "payload": base64.b64encode(b"\x00junk").decode()})
    for bad in ("", "not json", "{}", "[]", "null", "1", json.dumps({**doc, "version": 99}),
                tampered):
        assert not participant().restore(bad), bad
    assert not participant("other-node").restore(entry)  # another node's update
    assert participant().journal_entry() is None


def test_commit_clears_the_pending_update() -> None:
    p = joined()
    trained(p, params(0), 0.01 * params(5))
    done = RoundCommitted(round=0, eval_loss=1.25, n_updates=3, params_digest=digest(params(1)),
                          final=False)
    events = p.receive(signed(done))
    assert events == [{"kind": "journal", "entry": None},
                      {"kind": "committed", "round": 0, "eval_loss": 1.25, "n_updates": 3,
                       "params_digest": digest(params(1)), "final": False}]
    assert p.pending is None
    assert p.journal_entry() is None
    later = RoundCommitted(round=1, eval_loss=None, n_updates=2, params_digest=digest(params(2)),
                           final=True)
    assert kinds(p.receive(signed(later))) == ["committed"]


class RecordingEncoder:
    """A platform encoder (what the tab registers) over shared.codecs, recording its calls."""

    codecs = frozenset({"topk"})

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, bool]] = []

    def encode(self, codec: str, params: dict[str, Any], delta: bytes, residual: bytes | None,
               error_feedback: bool) -> tuple[bytes, bytes | None]:
        self.calls.append((codec, residual is not None, error_feedback))
        c = make_codec(codec, **params)
        x = np.frombuffer(delta, "<f4") + (np.frombuffer(residual, "<f4") if residual else 0)
        payload = c.encode(x.astype(np.float32))
        back = np.asarray(c.decode(payload, x.size), dtype=np.float32)
        return payload, (x - back).astype("<f4").tobytes() if error_feedback else None


def test_the_platform_encoder_is_used_for_its_codecs() -> None:
    enc = RecordingEncoder()
    register_update_encoder(enc)
    try:
        p = joined(codec="topk", codec_params={"fraction": 0.05}, error_feedback=True)
        delta = (0.01 * params(7)).astype(np.float32)
        first = trained(p, params(0), delta, rnd=0)
        second = trained(p, params(1), delta, rnd=1)
        assert enc.calls == [("topk", False, True), ("topk", True, True)]
        assert first.digest != second.digest  # the residual went into round 1
        raw = joined(codec="raw32")  # not in enc.codecs: shared.codecs
        trained(raw, params(0), delta)
        assert len(enc.calls) == 2
    finally:
        register_update_encoder(None)


def test_a_round_committed_without_us_stops_our_training() -> None:
    p = joined()
    p.receive(signed(round_open(0, params(0))))
    done = RoundCommitted(round=0, eval_loss=None, n_updates=2, params_digest=digest(params(1)),
                          final=False)
    events = p.receive(signed(done))
    assert kinds(events) == ["cancel", "committed"]
    assert events[0]["round"] == 0
    assert p.submit(0, params(3).astype("<f4").tobytes(), train_loss=None, samples=1,
                    compute_s=0.1) == []


def test_server_errors_are_reported_and_version_errors_are_fatal() -> None:
    p = joined()
    err = Error(code="wrong_round", message="round 3 is closed", field="round", round=3)
    assert p.receive(signed(err)) == [{"kind": "error", "code": "wrong_round",
                                       "message": "round 3 is closed", "round": 3}]
    fatal = Error(code="unsupported_version", message="v9?", field=None, round=None)
    assert p.receive(signed(fatal)) == [{"kind": "fatal", "code": "unsupported_version",
                                         "message": "v9?", "round": None}]
    assert p.counts["errors"] == 2


# -- layout ------------------------------------------------------------------------------------
def test_layout_must_hash_to_the_runs_model_id() -> None:
    cfg = model_config("mlp-digits")
    slots = make_manifest(manifest(build_model(cfg)))
    entries = manifest_json(slots)
    with pytest.raises(ValueError, match="Welcome"):
        participant().set_layout(entries)
    p = joined(model=cfg, mid=model_id(cfg, slots), n_params=sum(s.length for s in slots))
    p.set_layout(entries)
    assert p.layout == slots
    swapped = [{**entries[0], "shape": entries[0]["shape"][::-1]}, *entries[1:]]
    with pytest.raises(ValueError, match="model id"):
        p.set_layout(swapped)  # same size, another shape: not this run's model
    resized = [{**entries[0], "shape": [1, 2]}, *entries[1:]]
    with pytest.raises(ValueError, match="not contiguous or mis-sized"):
        p.set_layout(resized)


# -- validator role ----------------------------------------------------------------------------
def validate_request(rnd: int, theta: Vec, deltas: list[Vec]) -> ValidateRequest:
    payloads = [d.astype("<f4").tobytes() for d in deltas]
    cands, offset = [], 0
    for i, data in enumerate(payloads):
        cands.append({"node_id": key(f"n{i}").node_id, "digest": sha256_hex(data),
                      "offset": offset, "size": len(data)})
        offset += len(data)
    return ValidateRequest(run_id=RUN, round=rnd, params_digest=digest(theta), codec="raw32",
                           length=N, candidates=cands, payload=b"".join(payloads))


def test_a_validator_holds_params_and_answers_with_a_signed_verdict() -> None:
    p = participant(role="validator")
    hello = sent(p.receive(signed(challenge()))[0])
    assert isinstance(hello, Hello)
    assert (hello.role, hello.features) == ("validator", "")
    p.receive(signed(welcome()))
    theta = params(0)
    assert p.receive(signed(round_open(0, theta))) == [
        {"kind": "round", "round": 0, "params_digest": digest(theta)}]  # never "train"
    deltas = [0.01 * params(1), 0.01 * params(2)]
    (ev,) = p.receive(signed(validate_request(0, theta, deltas)))
    assert ev["kind"] == "validate"
    assert ev["params"] == theta.astype("<f4").tobytes()
    assert [c["payload"] for c in ev["candidates"]] == [d.astype("<f4").tobytes() for d in deltas]
    assert p.verdict(1, 2.0, [2.1, 2.2]) == []  # not the round asked for
    (out,) = p.verdict(0, 2.0, [2.1, float("nan")])
    v = sent(out)
    assert isinstance(v, Verdict)
    assert (v.round, v.node_id, v.base_loss) == (0, p.node_id, 2.0)
    assert [s["loss"] for s in v.scores] == [2.1, None]  # NaN: "not finite"
    assert [s["node_id"] for s in v.scores] == [key("n0").node_id, key("n1").node_id]
    assert p.counts["judged"] == 2
    assert p.verdict(0, 2.0, [2.1, 2.2]) == []  # answered once


def test_validation_requests_for_other_params_or_to_a_trainer_are_refused() -> None:
    v = participant(role="validator")
    joined(v)
    v.receive(signed(round_open(0, params(0))))
    stray = validate_request(0, params(9), [0.01 * params(1)])
    assert kinds(v.receive(signed(stray))) == ["refused"]
    trainer = joined()
    trainer.receive(signed(round_open(0, params(0))))
    assert kinds(trainer.receive(signed(validate_request(0, params(0), [params(1)])))) == [
        "refused"]
    with pytest.raises(ValueError, match="role"):
        participant(role="aggregator")


def test_signals_go_out_signed_and_answers_come_back_as_events() -> None:
    p = joined()
    (ev,) = p.signal("offer", "v=0 sdp")
    assert ev["msg_type"] == Signal.TYPE
    msg = sent(ev)
    assert isinstance(msg, Signal)
    assert (msg.to, msg.kind, msg.data) == ("server", "offer",
                                                                          "v=0 sdp")
    answer = Signal(run_id=RUN, node_id="server", to=p.node_id, kind="answer", data="v=0 ans")
    assert p.receive(signed(answer)) == [
        {"kind": "signal", "from": "server", "signal": "answer", "data": "v=0 ans"}]
    assert participant().signal("offer", "x") == []  # not joined: nothing to sign for


def test_p2p_run_keeps_the_update_and_sends_ready_again_after_a_reconnect() -> None:
    """transport p2p: no codec, no Submit; the raw update goes to the driver's p2p role and a
    signed Ready to the server, sent again (not retrained) when the round reopens."""
    p = joined(transport="p2p")
    theta, delta = params(0), params(1)
    p.receive(signed(round_open(0, theta)))
    events = p.submit(0, delta.astype("<f4").tobytes(), train_loss=0.5, samples=8,
                      compute_s=0.1)
    assert kinds(events) == ["ready", "send"]
    assert events[0]["delta"] == delta.astype("<f4").tobytes()
    ready = sent(events[1])
    assert isinstance(ready, Ready)
    assert ready.length == N
    assert ready.digest == sha256_hex(delta.astype("<f4").tobytes())
    p.connection_made()
    p.receive(signed(challenge()))
    p.receive(signed(welcome(transport="p2p")))
    again = p.receive(signed(round_open(0, theta)))
    assert kinds(again) == ["send"]
    resent = sent(again[0])
    assert isinstance(resent, Ready)
    assert resent.digest == ready.digest
    p.receive(signed(RoundCommitted(round=0, eval_loss=1.0, n_updates=1,
                                    params_digest=digest(theta), final=False)))
    assert p.pending_ready is None


def test_p2p_resolver_supplies_the_params() -> None:
    """A p2p node applies the outer step itself: the driver's resolver gives theta."""
    p = joined(transport="p2p")
    theta = params(4)
    seen: list[int] = []

    def resolver(msg: RoundOpen, held: Any, held_digest: str | None) -> Any:
        seen.append(msg.round)
        return np.asarray(theta)

    p.resolver = resolver
    events = p.receive(signed(round_open(0, theta)))
    assert seen == [0]
    assert kinds(events) == ["train"]


def test_powersgd_is_warm_started_from_the_last_round() -> None:
    """PowerSGD's Q carries over between rounds (the native encoder's state, now the
    participant's), and a new codec setting starts it afresh."""
    layout = make_manifest([("w", (8, 4), 0, 32)])
    p = joined(codec="powersgd", codec_params={"rank": 2}, error_feedback=True, n_params=32)
    p.layout = tuple(layout)
    theta = np.zeros(32, np.float32)
    for rnd in range(2):
        p.receive(signed(round_open(rnd, theta)))
        events = p.submit(rnd, params(rnd)[:32].astype("<f4").tobytes(), train_loss=None,
                          samples=1, compute_s=0.0)
        assert kinds(events) == ["journal", "send"], events
        assert p.codec_state is not None
    p.receive(signed(welcome(codec="powersgd", codec_params={"rank": 1}, n_params=32)))
    assert p.codec_state is None
    assert p.residual is None


def test_a_stopped_trainer_lets_the_round_be_trained_again() -> None:
    p = joined()
    theta = params(0)
    assert kinds(p.receive(signed(round_open(0, theta)))) == ["train"]
    assert p.receive(signed(round_open(0, theta, attempt=1))) == []  # still training
    p.training_stopped(0)
    assert kinds(p.receive(signed(round_open(0, theta, attempt=1)))) == ["train"]


def test_a_journaled_update_of_another_run_is_dropped_at_the_welcome() -> None:
    first = joined()
    trained(first, params(0), params(1))
    entry = first.journal_entry()
    assert entry is not None
    other = participant()
    assert other.restore(entry)
    other.receive(signed(challenge()))
    events = other.receive(signed(dataclasses.replace(welcome(), run_id="run-other")))
    assert events[0] == {"kind": "journal", "entry": None}
    assert other.pending is None


def test_display_fields_are_kept_within_the_schema() -> None:
    """A diverged loss or a negative clock reading must not get an honest update refused."""
    p = joined()
    theta = params(0)
    p.receive(signed(round_open(0, theta)))
    events = p.submit(0, params(1).astype("<f4").tobytes(), train_loss=1.7e308, samples=8,
                      compute_s=-1.0)
    msg = sent(events[-1])
    assert isinstance(msg, Submit)
    assert msg.train_loss is None
    assert msg.compute_s == 0.0


def test_a_rejected_update_is_neither_resubmitted_nor_retrained_in_its_round() -> None:
    """Validators excluded our update: the server refuses any other for that round, so its
    retries (same round, next attempt) get nothing from us; the next round trains again."""
    p = joined()
    theta = params(0)
    trained(p, theta, params(1))
    events = p.receive(signed(Error(code="update_rejected", message="held-out loss worse",
                                    field="payload", round=0)))
    assert kinds(events) == ["error", "journal"]
    assert p.pending is None
    assert p.receive(signed(round_open(0, theta, attempt=1))) == []
    assert kinds(p.receive(signed(round_open(1, params(2))))) == ["train"]


def test_encode_update_is_pure_and_carries_residual_and_state() -> None:
    """shared.update_encoding.encode_update: nothing mutated; a lossless codec leaves no
    residual; top-k carries what it dropped; PowerSGD returns its warm-start state."""
    from shared.update_encoding import encode_update

    delta = np.arange(1, 11, dtype=np.float32)
    before = delta.copy()
    payload, res, state = encode_update(make_codec("raw32"), delta, residual=None, state=None,
                                        error_feedback=True, layout=None)
    assert res is None
    assert state is None
    assert np.array_equal(np.asarray(make_codec("raw32").decode(payload, 10)), delta)
    topk = make_codec("topk", fraction=0.1, values="fp16")
    layout = tuple(make_manifest([("w", (10,), 0, 10)]))
    _, res, _ = encode_update(topk, delta, residual=None, state=None, error_feedback=True,
                              layout=layout)
    assert res is not None
    assert res[9] == 0
    assert res[8] == 9
    payload, _, _ = encode_update(topk, delta, residual=res, state=None, error_feedback=True,
                                  layout=layout)
    assert np.asarray(topk.decode(payload, 10, layout=layout))[8] == 18  # 9 now + 9 carried
    assert np.array_equal(delta, before)
    psgd_layout = tuple(make_manifest([("w", (8, 4), 0, 32)]))
    _, _, q = encode_update(make_codec("powersgd", rank=2), params(3)[:32], residual=None,
                            state=None, error_feedback=False, layout=psgd_layout)
    assert q is not None
