"""shared.autotune: the policy is pure and deterministic, keeps its guard rails (bounded
change, rollback, the run's quorum and deadline, pins), and the participant honours a
RoundOpen's time budget and codec; the schema refuses an out-of-range budget or codec."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from shared.autotune import (
    LADDER,
    Autotuner,
    Limits,
    NodeSample,
    RoundSample,
    continue_training,
)
from shared.codecs import make_codec
from shared.errors import MessageError
from shared.frame import decode_frame
from shared.messages import RoundOpen, decode_message
from tests.test_participant import joined, params, round_open, signed

N_PARAMS = 10_000


def limits(**kw: Any) -> Limits:
    return Limits(**{"inner_steps": 50, "quorum": 1, "deadline_s": 60.0, "max_steps": 500,
                     **kw})


def node(i: int, *, step_s: float, mbit: float, steps: int = 50, runtime: str = "native"
         ) -> NodeSample:
    """A node's round: `steps` at `step_s`, raw32 both ways over a `mbit` Mbit/s link."""
    down = up = 4 * N_PARAMS + 4096
    comm = (down + up) / (mbit * 1e6 / 8)
    return NodeSample(node_id=f"{i:02x}" * 32, runtime=runtime, steps=steps,
                      compute_s=steps * step_s, round_trip_s=steps * step_s + comm,
                      bytes_down=down, bytes_up=up)


def mixed(steps: int = 50) -> list[NodeSample]:
    return ([node(i, step_s=0.002, mbit=1000, steps=steps) for i in range(2)]
            + [node(i, step_s=0.016, mbit=20, steps=steps) for i in range(2, 8)]
            + [node(i, step_s=0.055, mbit=2, steps=steps, runtime="browser")
               for i in range(8, 16)])


def run(r: int, loss: float, duration: float = 3.0) -> RoundSample:
    return RoundSample(round=r, duration_s=duration, eval_loss=loss, n_active=16,
                       n_params=N_PARAMS)


def test_continue_training_fits_steps_in_the_budget() -> None:
    assert continue_training(done=0, max_steps=5, elapsed_s=99.0, budget_s=1.0)  # >= 1 step
    assert not continue_training(done=5, max_steps=5, elapsed_s=0.0, budget_s=None)
    assert continue_training(done=4, max_steps=5, elapsed_s=100.0, budget_s=None)
    # 0.1 s per step so far: a 4th step would end at 0.4 s
    assert continue_training(done=3, max_steps=50, elapsed_s=0.3, budget_s=0.4)
    assert not continue_training(done=3, max_steps=50, elapsed_s=0.3, budget_s=0.39)


def test_the_ladder_matches_the_codecs_estimates() -> None:
    for name, fraction, per_value in LADDER:
        codec = make_codec(name, fraction=fraction) if name == "topk" else make_codec(name)
        assert per_value == pytest.approx(4 * codec.estimated_ratio, rel=0.01)


def test_first_decision_replaces_h_by_a_budget_with_reasons() -> None:
    tuner = Autotuner(limits())
    d = tuner.decide(mixed(), run(0, 2.0))
    s = d.settings
    assert d.round == 1
    assert s.budget_s is not None
    assert 0.05 <= s.budget_s < 50 * 0.055
    assert s.quorum == 8  # half of 16 active, above the run's 1
    assert 1 <= s.max_steps <= 500
    assert s.deadline_s < 60.0
    settings = {c["setting"] for c in d.changes}
    assert {"budget_s", "max_steps", "deadline_s", "quorum", "codec"} <= settings
    budget = next(c for c in d.changes if c["setting"] == "budget_s")
    assert budget["reason"].startswith("H 10 -> ")  # the first round's probe: H / 5
    assert "idled 96%" in budget["reason"]
    # the tabs' 2 Mbit/s links get a lossier codec than the boxes' fast ones
    tab, box = "08" * 32, "00" * 32
    assert LADDER.index(next(x for x in LADDER if x[0] == s.codecs[tab][0])) > 0
    assert s.codecs[box] == ("raw32", 0.01)
    assert d.inputs["nodes"][0]["steps_per_s"] == pytest.approx(500.0)


def test_deterministic_given_its_inputs() -> None:
    def trace() -> list[Any]:
        tuner = Autotuner(limits())
        out = []
        for r, loss in enumerate([2.0, 1.5, 1.2, 1.1, 1.05, 1.0]):
            d = tuner.decide(mixed(), run(r, loss))
            out.append((d.settings.to_dict(), d.changes))
        return out

    assert trace() == trace()


def test_changes_after_the_first_are_bounded_per_round() -> None:
    tuner = Autotuner(limits(max_change=0.25))
    first = tuner.decide(mixed(), run(0, 2.0)).settings
    slow = [dataclasses.replace(s, round_trip_s=s.round_trip_s * 20) for s in mixed()]
    second = tuner.decide(slow, run(1, 1.8)).settings  # links 20x slower: wants far more
    assert first.budget_s is not None
    assert second.budget_s is not None
    assert second.budget_s == pytest.approx(first.budget_s * 1.25)
    assert second.max_steps <= round(first.max_steps * 1.25)
    assert second.deadline_s > first.deadline_s * 1.25  # it may grow at once ...
    tuner.decide(mixed(), run(2, 1.7))  # ... and shrinks bounded
    assert tuner.settings.deadline_s == pytest.approx(second.deadline_s / 1.25)
    for n, (codec, frac) in second.codecs.items():  # at most two rungs of the ladder
        old = first.codecs[n]
        i0 = next(i for i, x in enumerate(LADDER) if x[0] == old[0]
                  and (x[0] != "topk" or x[1] == old[1]))
        i1 = next(i for i, x in enumerate(LADDER) if x[0] == codec
                  and (x[0] != "topk" or x[1] == frac))
        assert abs(i1 - i0) <= 2


def test_a_budget_change_whose_rounds_do_worse_is_rolled_back() -> None:
    tuner = Autotuner(limits())
    before = tuner.decide(mixed(), run(0, 2.0)).settings.budget_s
    d = tuner.decide(mixed(), run(1, 1.0, duration=1.0))  # lossier tab codecs: less comm
    (change,) = [c for c in d.changes if c["setting"] == "budget_s"]
    changed = d.settings.budget_s
    assert before is not None
    assert changed is not None
    assert changed != before
    # the two rounds after it make much less progress per second: rolled back
    d = tuner.decide(mixed(), run(2, 0.99, duration=2.0))
    assert d.settings.budget_s == changed  # still on probation
    d = tuner.decide(mixed(), run(3, 0.98, duration=2.0))
    back = [c for c in d.changes if c["setting"] == "budget_s"]
    assert back
    assert "rolled back" in back[0]["reason"]
    assert d.settings.budget_s == pytest.approx(before)
    # and that direction is not tried again for a while
    up = change["new"] > change["old"]
    for r in (4, 5, 6):
        d = tuner.decide(mixed(), run(r, 0.98 - r / 100, duration=1.0))
        assert not [c for c in d.changes if c["setting"] == "budget_s"
                    and (c["new"] > c["old"]) == up]


def test_a_change_that_does_not_do_worse_is_kept() -> None:
    tuner = Autotuner(limits())
    tuner.decide(mixed(), run(0, 2.0))
    changed = tuner.decide(mixed(), run(1, 1.0, duration=1.0)).settings.budget_s
    for r, loss in ((2, 0.5), (3, 0.25)):  # the same progress per second
        d = tuner.decide(mixed(), run(r, loss, duration=1.0))
        assert not any("rolled back" in c["reason"] for c in d.changes)
        if r == 2:
            assert d.settings.budget_s == changed  # on probation, unchanged
    assert tuner.trial is None or tuner.trial.old == changed  # judged, kept (a next trial)


def test_never_below_the_runs_quorum_nor_above_its_deadline() -> None:
    tuner = Autotuner(limits(quorum=12, deadline_s=1.5))
    for r in range(4):
        s = tuner.decide(mixed(), run(r, 2.0 - r / 10)).settings
        assert s.quorum >= 12
        assert s.deadline_s <= 1.5


def test_pins_fix_settings() -> None:
    tuner = Autotuner(limits(pins={"budget_s": 2.5, "max_steps": 7, "deadline_s": 9.0,
                                   "quorum": 3, "codec": "raw32"}))
    for r in range(3):
        d = tuner.decide(mixed(), run(r, 2.0 - r / 10))
        assert d.settings.budget_s == 2.5
        assert d.settings.max_steps == 7
        assert d.settings.deadline_s == 9.0
        assert d.settings.quorum == 3
        assert d.settings.codecs == {}
        assert not d.changes


def test_a_degraded_link_gets_a_lossier_codec_then_is_not_waited_for() -> None:
    tuner = Autotuner(limits())
    tuner.decide(mixed(), run(0, 2.0))
    tab = "08" * 32
    before = tuner.settings.codecs[tab]
    bad = [dataclasses.replace(s, round_trip_s=s.compute_s + (s.round_trip_s - s.compute_s)
                               * 100) if s.node_id == tab else s for s in mixed()]
    d = tuner.decide(bad, run(1, 1.9))
    after = d.settings.codecs[tab]
    assert after != before
    assert any(c["setting"] == "codec" and c.get("node_id") == tab for c in d.changes)
    assert tab not in (tuner.included or set())  # a straggler now: not waited for


def test_participant_honours_the_budget_and_codec() -> None:
    p = joined()
    theta = params(0)
    msg = dataclasses.replace(round_open(0, theta), time_budget_s=0.45, inner_steps=6,
                              codec="topk", topk_fraction=0.25)
    (train,) = p.receive(signed(msg))
    assert train["kind"] == "train"
    assert train["time_budget_s"] == 0.45
    assert train["steps"] == 6
    done = 0
    while p.keep_training(0, done, elapsed_s=0.1 * done):  # 0.1 s per step
        done += 1
    assert done == 4  # a 5th step would end at 0.5 s > 0.45 s
    assert not p.keep_training(1, 0, 0.0)  # not the round being trained
    delta = (theta * 0.01).astype("<f4").tobytes()
    events = p.submit(0, delta, train_loss=1.0, samples=4 * 16, compute_s=0.4)
    send = next(e for e in events if e["kind"] == "send")
    sub = decode_message(send["frame"])
    assert sub.codec == "topk"  # type: ignore[attr-defined]


def test_participant_without_a_budget_trains_exactly_inner_steps() -> None:
    p = joined()
    p.receive(signed(round_open(0, params(0))))
    done = 0
    while p.keep_training(0, done, elapsed_s=1000.0 * done):
        done += 1
    assert done == 5


@pytest.mark.parametrize(("field", "value"), [("time_budget_s", 0.0), ("time_budget_s", -1.0),
                                         ("time_budget_s", 1e8), ("topk_fraction", 0.0),
                                         ("topk_fraction", 1.5), ("codec", "powersgd"),
                                         ("codec", "nope")])
def test_the_schema_refuses_an_out_of_range_budget_or_codec(field: str, value: Any) -> None:
    good = round_open(0, params(0)).to_frame()
    frame = decode_frame(good)
    header = {**frame.header, field: value}
    from shared.frame import encode_frame
    with pytest.raises(MessageError) as err:
        decode_message(encode_frame(RoundOpen.TYPE, header, frame.payload))
    assert err.value.field == field


def test_a_late_update_still_measures_its_link() -> None:
    """An update that came after its round closed (refused as late) is not aggregated, but
    its timing tells the policy the node is now slow: a lossier codec, not waited for."""
    tuner = Autotuner(limits())
    tuner.decide(mixed(), run(0, 2.0))
    tab = "08" * 32
    before = tuner.settings.codecs[tab]
    others = [s for s in mixed() if s.node_id != tab]
    (slow,) = [dataclasses.replace(s, round_trip_s=s.compute_s + 60.0, late=True)
               for s in mixed() if s.node_id == tab]
    d = tuner.decide([*others, slow], run(1, 1.9))
    assert d.settings.codecs[tab] != before
    assert tab not in (tuner.included or set())
    assert any(n["late"] for n in d.inputs["nodes"])
    # the round's own overhead comes from the updates that made it
    assert tuner.overhead_s < 60.0
