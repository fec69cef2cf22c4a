"""Secure aggregation in a live round: the wire bodies of the `SecAgg` message's stages and a
participant's side of them (sans-I/O, stdlib only: it runs in the tab's Pyodide too).

The server relays (server/secagg_round.py); each stage body is canonical JSON:

| stage        | direction     | body                                                        |
|--------------|---------------|-------------------------------------------------------------|
| open         | server -> node | {seed, dimension, clip, max_parties, degree}: RoundConfig  |
| advert       | node -> server | KeyAdvert                                                  |
| roster       | server -> node | {adverts: [KeyAdvert...]}                                  |
| ciphertexts  | node -> server | PairCiphertexts                                            |
| ciphertexts  | server -> node | {alive: [node...], msgs: [PairCiphertexts...]}             |
| bundle       | node -> server | ShareBundle                                                |
| shares       | server -> node | {alive, routed: [[dealer, sealed, c_self, c_keys]...]}     |
| unmask       | server -> node | UnmaskRequest {run_id, round, survivors, dropped}          |
| unmask       | node -> server | UnmaskResponse                                             |

The masked update itself travels as a `Submit` of codec `secagg` whose payload is
`pack_masked(MaskedUpdate)`: u32 LE header length, the MaskedUpdate's signed JSON header, the
masked u32 words. A participant holds its trained update until the shares stage has run, then
masks it (`SecAggClient.hold` / the `shares` stage return the packed update).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from shared.envelope import Identity
from shared.errors import MessageError
from shared.secagg.errors import BadMaskedUpdate, SecAggError
from shared.secagg.fixedpoint import FixedPoint
from shared.secagg.graph import RoundConfig
from shared.secagg.messages import (
    KeyAdvert,
    MaskedUpdate,
    PairCiphertexts,
    ShareBundle,
    UnmaskRequest,
    UnmaskResponse,
    canonical,
)
from shared.secagg.participant import SecAggParticipant
from shared.secagg.prg import ring_bytes
from shared.vec import Vector

SECAGG_CODEC = "secagg"  # Submit.codec of a masked update
MAX_HEADER = 64 * 1024


def body(obj: Any) -> bytes:
    return canonical(obj)


def parse(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"secagg {what}: not JSON", field="payload") from exc
    if not isinstance(doc, dict):
        raise MessageError(f"secagg {what}: not a JSON object", field="payload")
    return doc


def _strs(doc: dict[str, Any], key: str, what: str) -> tuple[str, ...]:
    v = doc.get(key)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise MessageError(f"secagg {what}: {key} must be a list of strings", field=key)
    return tuple(v)


def _objs(doc: dict[str, Any], key: str, what: str) -> list[bytes]:
    v = doc.get(key)
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise MessageError(f"secagg {what}: {key} must be a list of objects", field=key)
    return [canonical(x) for x in v]


def open_body(cfg: RoundConfig) -> bytes:
    fp = cfg.fixed_point
    return body({"seed": cfg.seed.hex(), "dimension": cfg.dimension, "clip": fp.clip,
                 "max_parties": fp.max_parties, "degree": cfg.degree})


def parse_open(run_id: str, round_: int, data: bytes) -> RoundConfig:
    doc = parse(data, "open")
    try:
        return RoundConfig(run_id=run_id, round=round_, seed=bytes.fromhex(doc["seed"]),
                           dimension=int(doc["dimension"]),
                           fixed_point=FixedPoint.for_sum(float(doc["clip"]),
                                                          int(doc["max_parties"])),
                           degree=None if doc["degree"] is None else int(doc["degree"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise MessageError(f"secagg open: {exc}", field="payload") from exc


def roster_body(adverts: list[KeyAdvert]) -> bytes:
    return body({"adverts": [json.loads(a.to_json()) for a in adverts]})


def relay_ct_body(alive: list[str], msgs: list[PairCiphertexts]) -> bytes:
    return body({"alive": alive, "msgs": [json.loads(m.to_json()) for m in msgs]})


def shares_body(alive: list[str], routed: list[tuple[str, str, str, str]]) -> bytes:
    return body({"alive": alive, "routed": [list(r) for r in routed]})


def unmask_body(req: UnmaskRequest) -> bytes:
    return body({"run_id": req.run_id, "round": req.round, "survivors": list(req.survivors),
                 "dropped": list(req.dropped)})


def parse_unmask(data: bytes) -> UnmaskRequest:
    doc = parse(data, "unmask")
    if not isinstance(doc.get("run_id"), str) or not isinstance(doc.get("round"), int):
        raise MessageError("secagg unmask: run_id and round", field="payload")
    return UnmaskRequest(run_id=doc["run_id"], round=doc["round"],
                         survivors=_strs(doc, "survivors", "unmask"),
                         dropped=_strs(doc, "dropped", "unmask"))


def pack_masked(mu: MaskedUpdate) -> bytes:
    head = mu.to_json()
    return struct.pack("<I", len(head)) + head + mu.payload


def unpack_masked(data: bytes) -> MaskedUpdate:
    """A Submit payload of codec `secagg` -> its MaskedUpdate (BadMaskedUpdate if malformed)."""
    if len(data) < 4:
        raise BadMaskedUpdate("masked update shorter than its header length", field="payload")
    (n,) = struct.unpack_from("<I", data)
    if n > MAX_HEADER or 4 + n > len(data):
        raise BadMaskedUpdate("masked update header length out of range", field="payload")
    try:
        doc = parse(data[4:4 + n], "masked update")
        doc["payload"] = ""  # the words follow the header
        mu = MaskedUpdate.from_json(canonical(doc))
    except MessageError as exc:
        raise BadMaskedUpdate(f"masked update header: {exc}", field="payload") from exc
    if not all(isinstance(getattr(mu, k), int) for k in ("ring_bits", "offset", "length")):
        raise BadMaskedUpdate("masked update header fields", field="payload")
    return MaskedUpdate(run_id=mu.run_id, round=mu.round, node_id=mu.node_id,
                        signature=mu.signature, ring_bits=mu.ring_bits, offset=mu.offset,
                        length=mu.length, payload_sha256=mu.payload_sha256,
                        payload=bytes(data[4 + n:]))


@dataclass
class Held:
    round: int
    delta: Vector  # the update to mask (after DP, before fixed point)
    meta: dict[str, Any]  # train_loss, samples, compute_s for the Submit


class SecAggClient:
    """A participant's secure-aggregation state for the open round."""

    def __init__(self, identity: Identity, run_id: str) -> None:
        self.identity, self.run_id = identity, run_id
        self.sp: SecAggParticipant | None = None
        self.round: int | None = None
        self.ready = False  # shares stage done: an update can be masked
        self.held: Held | None = None  # trained, waiting for the shares stage (or re-keying)
        self.last_plain: tuple[int, bytes] | None = None  # (round, fixed-point ring bytes)
        self.problems: list[str] = []  # error codes of what neighbours sent us

    def on_message(self, stage: str, round_: int, payload: bytes, dimension: int
                   ) -> tuple[list[tuple[str, bytes]], MaskedUpdate | None]:
        """One server stage -> (stage bodies to send, the masked update when one is due)."""
        if stage == "open":
            cfg = parse_open(self.run_id, round_, payload)
            if cfg.dimension != dimension:
                raise SecAggError(f"secagg round of {cfg.dimension} values, the model has "
                                  f"{dimension}", field="dimension")
            self.sp, self.round, self.ready = SecAggParticipant(self.identity, cfg), round_, False
            if self.held is not None and self.held.round != round_:
                self.held = None
            return [("advert", self.sp.advertise().to_json())], None
        sp = self.sp
        if sp is None or round_ != self.round:
            return [], None  # a stage of a round we do not take part in: ignore it
        if stage == "roster":
            adverts = [KeyAdvert.from_json(a) for a in _objs(parse(payload, stage), "adverts",
                                                             stage)]
            return [("ciphertexts", sp.on_roster(adverts).to_json())], None
        if stage == "ciphertexts":
            doc = parse(payload, stage)
            msgs = [PairCiphertexts.from_json(m) for m in _objs(doc, "msgs", stage)]
            bundle: ShareBundle = sp.on_ciphertexts(_strs(doc, "alive", stage), msgs)
            return [("bundle", bundle.to_json())], None
        if stage == "shares":
            doc = parse(payload, stage)
            routed = doc.get("routed")
            if not isinstance(routed, list) or not all(
                    isinstance(r, list) and len(r) == 4 and all(isinstance(x, str) for x in r)
                    for r in routed):
                raise MessageError("secagg shares: routed entries", field="routed")
            problems = sp.on_shares(_strs(doc, "alive", stage),
                                    [(r[0], r[1], r[2], r[3]) for r in routed])
            self.problems += [p.code for p in problems]
            self.ready = True
            return [], self._mask_held()
        if stage == "unmask":
            resp: UnmaskResponse = sp.on_unmask(parse_unmask(payload))
            return [("unmask", resp.to_json())], None
        raise MessageError(f"secagg stage {stage!r} is not sent to nodes", field="stage")

    def hold(self, round_: int, delta: Vector, meta: dict[str, Any]) -> MaskedUpdate | None:
        """The trained update of `round_`: masked now when the shares are in, else kept."""
        self.held = Held(round=round_, delta=delta, meta=meta)
        return self._mask_held()

    def _mask_held(self) -> MaskedUpdate | None:
        h, sp = self.held, self.sp
        if h is None or sp is None or not self.ready or h.round != self.round:
            return None
        y = sp.cfg.fixed_point.encode(h.delta)
        self.last_plain = (h.round, ring_bytes(y))
        return sp.mask(y)

    def committed(self, round_: int) -> None:
        if self.held is not None and self.held.round <= round_:
            self.held = None
