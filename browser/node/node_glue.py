"""Pyodide side of the training tab: a shared.participant.Participant driven from node.js.

node.js runs this after daa_glue.py (which registered the tab's ML-DSA-65 and zstd). Frames
and params cross as Uint8Array; events come back as plain JS objects (bytes -> Uint8Array).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import js  # type: ignore[import-not-found]
from pyodide.ffi import to_js  # type: ignore[import-not-found]

from shared.envelope import Identity
from shared.messages import Chunk, ParamsChunk, Resume, StreamSubmit, Submit, decode_message
from shared.open_kinds import OpenKinds, sparse_features
from shared.participant import Participant
from shared.stream_down import FEATURE as STREAM_FEATURE
from shared.stream_down import Fetcher
from shared.stream_up import Sender

AGENT = "daa-prime-browser/0.1"


def _js(events: list[dict[str, object]]) -> object:
    return to_js(events, dict_converter=js.Object.fromEntries)


def _hooked(p: Participant, events: list[dict[str, object]]) -> list[dict[str, object]]:
    """p2p_glue.py's P2P_HOOK (a `p2p` run's shard exchange) and dht_glue.py's DHT_HOOK (the
    server's Dht frames to the tab's DHT carrier), once the worker has run them."""
    for name in ("P2P_HOOK", "DHT_HOOK"):
        hook = globals().get(name)
        if hook is not None:
            events = hook(p, events)
    return events


def make_participant(public_key, secret_key, pins_json: str, save_pins, device: str,
                     role: str = "trainer"):
    ident = Identity(public_key=public_key.to_bytes(), secret_key=secret_key.to_bytes())
    p = Participant(ident, runtime="browser", agent=AGENT, device=device, role=role,
                    pins=json.loads(pins_json or "{}"),
                    save_pins=lambda pins: save_pins(json.dumps(pins)))
    p.extra_features = (STREAM_FEATURE,)  # large RoundOpens in chunks (shared.stream_down)
    p.extra_features += sparse_features()  # SparseLoCo's steps in JS (daa_glue.py)
    KINDS[id(p)] = OpenKinds.watch(p)  # the RoundOpen kinds taken, for the page's stats
    p.ahead.supported = role == "trainer"  # overlap: train_worker.js trains ahead (ahead.js)
    FETCHERS[id(p)] = Fetcher(p)
    SENDERS[id(p)] = Sender(p)
    return p


KINDS: dict[int, OpenKinds] = {}  # what the participant's RoundOpens carried (+ resyncs)
FETCHERS: dict[int, Fetcher] = {}  # the participant's streamed-RoundOpen downloads
SENDERS: dict[int, Sender] = {}  # its streamed updates (shared.stream_up)


PUMPS: dict[int, tuple[int, Iterator[bytes]]] = {}  # the latest Resume's chunks still to send
_PUMP_IDS = itertools.count(1)


def _streamed(p: Participant, events: list[dict[str, object]]) -> list[dict[str, object]]:
    """A Submit larger than the Welcome's stream_chunk goes as its signed StreamSubmit (the
    chunks follow the server's Resume), tagged with its round and digest: node.js
    (stream_pump.js) sends it over the star data channel when the run has one, else on the
    socket."""
    sender = SENDERS.setdefault(id(p), Sender(p))
    out = sender.stream(events)
    cur = sender.current
    for ev in out:
        if ev["kind"] == "send" and ev["msg_type"] == StreamSubmit.TYPE and cur is not None:
            ev["round"], ev["digest"] = cur.round, cur.digest
            ev["size"] = cur.size if cur.read else len(cur.payload)
    return out


def _resumed(p: Participant, frame: bytes) -> list[dict[str, object]]:
    """The server's Resume -> one "stream_chunks" event: stream_pump.js pulls the Chunk
    frames from its `next` on one at a time (stream_next), each once its path's buffer has
    drained, so neither the worker nor the page holds more than about two chunk frames.
    A newer Resume replaces the older one's chunks."""
    sender = SENDERS.setdefault(id(p), Sender(p))
    frames = sender.on_resume(frame)
    cur = sender.current
    if frames is None or cur is None:
        return []
    msg = decode_message(frame)  # verified by on_resume
    pump = next(_PUMP_IDS)
    PUMPS[id(p)] = (pump, frames)
    return [{"kind": "stream_chunks", "pump": pump, "round": cur.round, "digest": cur.digest,
             "next": getattr(msg, "next", 0), "n": cur.n, "chunk_bytes": cur.chunk_bytes}]


def stream_next(p: Participant, pump: int) -> object:
    """The next Chunk frame of `pump` (one "send" event), made now; none once it is done or a
    newer Resume (or stream_again) replaced it."""
    cur = PUMPS.get(id(p))
    if cur is None or cur[0] != int(pump):
        return _js([])
    frame = next(cur[1], None)
    if frame is None:
        del PUMPS[id(p)]
        return _js([])
    return _js([{"kind": "send", "msg_type": Chunk.TYPE, "frame": frame}])


def stream_again(p: Participant) -> object:
    """The update in flight announced again (fresh nonce, same manifest): its data channel
    was lost mid-transfer, node.js sends this on the socket and the server answers Resume at
    its first missing chunk. None when the participant no longer holds that update."""
    sender = SENDERS.get(id(p))
    cur, pending = (sender.current if sender else None), p.pending
    if sender is None or cur is None or pending is None \
            or (pending.round, pending.digest) != (cur.round, cur.digest):
        return _js([])
    PUMPS.pop(id(p), None)
    ev = sender.start(p.frame(pending)) if isinstance(pending, Submit) \
        else sender.start_spooled(pending)  # (a tab encodes in one shot: always a Submit)
    ev["round"], ev["digest"] = cur.round, cur.digest
    return _js([ev])


def _received(p: Participant, frame: bytes) -> list[dict[str, object]]:
    """A server frame -> the participant's events; a streamed RoundOpen's chunks go to its
    Fetcher, which answers the manifest with a ParamsFetch ("send") and, once the params are
    whole, gives the participant's events for the RoundOpen."""
    fetcher = FETCHERS.setdefault(id(p), Fetcher(p))
    if len(frame) > 5 and frame[5] == ParamsChunk.TYPE:
        events = fetcher.on_chunk(frame)
    elif len(frame) > 5 and frame[5] == Resume.TYPE:  # our streamed update: its chunks
        return _resumed(p, frame)
    else:
        events = p.receive(frame)
    out: list[dict[str, object]] = []
    for ev in events:
        out.extend(fetcher.start(ev["message"]) if ev["kind"] == "params_stream" else [ev])
    return out


def feed(p: Participant, data) -> object:
    events = _streamed(p, _hooked(p, _received(p, data.to_bytes())))  # a resubmission too
    for ev in events:  # the Welcome's STUN/TURN servers, for the tab's RTCPeerConnection
        if ev["kind"] in ("train", "reconnect") and id(p) in KINDS:
            ev["downlink"] = dict(KINDS[id(p)].counts)  # node.js: stats.downlink
            ev["ahead_merges"] = p.ahead.merges  # overlap: rounds that took steps run ahead
        if ev["kind"] == "welcome" and p.welcome is not None:
            ev["ice_servers"] = [dict(s) for s in p.welcome.ice_servers]
    return _js(events)


def submit(p: Participant, round_: int, delta, train_loss, samples: int,
           compute_s: float) -> object:
    loss = None if train_loss is None else float(train_loss)
    return _js(_streamed(p, _hooked(p, p.submit(int(round_), delta.to_bytes(), train_loss=loss,
                                                samples=int(samples),
                                                compute_s=float(compute_s)))))


def verdict(p: Participant, round_: int, base_loss: float, losses) -> object:
    """Losses arrive as numbers, NaN for "not finite / did not decode" (JS null would cross
    as a JsNull object); Participant.verdict turns NaN into None."""
    return _js(p.verdict(int(round_), float(base_loss), [float(v) for v in losses.to_py()]))


def signal(p: Participant, kind: str, data: str, to: str = "server") -> object:
    return _js(p.signal(str(kind), str(data), str(to)))


def training_stopped(p: Participant, round_: int) -> None:
    """The worker stopped `round_` without a result (Pause, or the round moved on)."""
    p.training_stopped(int(round_))


def set_layout(p: Participant, layout_json: str) -> None:
    p.set_layout(json.loads(layout_json))


def counts(p: Participant) -> object:
    return _js([p.counts])
