"""Secure aggregation in a `p2p` run: shard owners sum MASKED slices (sans-I/O, stdlib only).

Each member masks its fixed-point update exactly as in a star run (shared.secagg.round's key
stages through the server, SecAggParticipant.mask), keeps the masked u32 words and sends a
`Ready` whose digest is theirs (`masked_ready`). On the round's ShardPlan (rule `SECAGG_RULE`)
it runs `SecAggShardReducer`: its slice of the masked vector goes to each owner of the shard,
and an owner adds the members' slices in Z_2^32 (masks are coordinate-wise, so the shard sums
of masked words are the slices of the masked sum) and uploads that to the server, which
compares the owners' digests (`SecAggShardCheck`) as for any p2p result, joins the shards and
unmasks the sum with the recovered seeds (server/secagg_p2p.py). Owners only see masked slices;
no owner serves its shard to the members (they get the next params from the server).
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.envelope import verify_frame
from shared.errors import MessageError
from shared.frame import decode_frame
from shared.messages import Ready, Shard, message_from_frame, sha256_hex
from shared.p2p import Event, MalformedResult, Plan, ShardCheck, ShardReducer
from shared.secagg.errors import BadMaskedUpdate
from shared.secagg.messages import MaskedUpdate
from shared.secagg.prg import add_into, ring_bytes, ring_from_bytes, zeros
from shared.vec import Vector, from_bytes

SECAGG_RULE = "secagg-sum"  # ShardPlan.rule of a secure p2p reduction
RING_BITS = 32


class BadMaskedSlice(BadMaskedUpdate):
    """A masked slice that is not the shard's length of u32 words (wrong ring or length)."""


def masked_ready(run_id: str, round_: int, node_id: str, masked: MaskedUpdate,
                 meta: dict[str, object]) -> Ready:
    """The Ready a member sends for its masked update (its digest: the masked words)."""
    if masked.ring_bits != RING_BITS or masked.offset != 0 \
            or len(masked.payload) != 4 * masked.length:
        raise BadMaskedUpdate("a p2p member masks its whole update in Z_2^32", field="length")
    tl = meta.get("train_loss")
    return Ready(run_id=run_id, round=round_, node_id=node_id, length=masked.length,
                 digest=sha256_hex(masked.payload),
                 train_loss=float(tl) if isinstance(tl, (int, float)) else None,
                 samples=int(meta.get("samples", 0)),  # type: ignore[call-overload]
                 compute_s=float(meta.get("compute_s", 0.0)))  # type: ignore[arg-type]


def ring_sum(parts: Sequence[bytes], *, use_numpy: bool = True) -> bytes:
    """The sum in Z_2^32 of u32 LE word vectors of one length."""
    acc = zeros(len(parts[0]) // 4, use_numpy=use_numpy)
    for p in parts:
        add_into(acc, ring_from_bytes(p, use_numpy=use_numpy))
    return ring_bytes(acc)


def check_slice(plan: Plan, shard: int, payload: bytes, sender: str) -> None:
    lo, hi = plan.bounds(shard)
    if len(payload) != 4 * (hi - lo):
        raise BadMaskedSlice(f"masked slice of shard {shard} from {sender[:12]} has "
                             f"{len(payload)} bytes, not {hi - lo} u32 words of Z_2^32",
                             field="payload")


class SecAggShardReducer(ShardReducer):
    """A member's side: slices of its masked words out, ring sums of the shards it owns up to
    the server. Wrong-length slices raise BadMaskedSlice and are not counted."""

    def __init__(self, me: str, plan: Plan, masked: bytes) -> None:
        if len(masked) != 4 * plan.n_params:
            raise BadMaskedSlice(f"masked update of {len(masked)} bytes for "
                                 f"{plan.n_params} words", field="length")
        super().__init__(me, plan, from_bytes(masked), rule="mean", result_codec="raw32")
        self.rule, self.raw = SECAGG_RULE, bytes(masked)  # the words, bit for bit

    def on_part(self, sender: str, shard: int, payload: bytes) -> list[Event]:
        if sender not in self.plan.members:
            raise ValueError(f"part from {sender[:12]}, not a member of the plan")
        if not 0 <= shard < self.plan.n_shards or self.me not in self.plan.owners[shard]:
            raise ValueError(f"part for shard {shard}, which this peer does not own")
        check_slice(self.plan, shard, bytes(payload), sender)
        self.bytes_in += len(payload)
        return self._store(sender, shard, bytes(payload))

    def _reduce_ready(self) -> list[Event]:
        out: list[Event] = []
        for s in self.plan.owned_by(self.me):
            got = self.parts.get(s, {})
            if s in self.reduced or not all(m in got for m in self.plan.members):
                continue
            res = ring_sum([got[m] for m in self.plan.members])
            self.reduced[s] = self.shards[s] = res
            out.append({"kind": "result", "to": "server", "shard": s, "payload": res,
                        "digest": sha256_hex(res)})
        return out

    def on_result(self, shard: int, payload: bytes) -> list[Event]:
        raise ValueError("secure p2p rounds serve no reduced shards to members")

    @property
    def done(self) -> bool:
        return False  # members never assemble the (masked) aggregate


class SecAggShardCheck(ShardCheck):
    """The server's side: owners' ring sums compared by digest; `ring()` joins them."""

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan, result_codec="raw32")

    def on_result(self, owner: str, shard: int, payload: bytes) -> list[Event]:
        plan = self.plan
        self.bad_events = []
        if not 0 <= shard < plan.n_shards or owner not in plan.owners[shard]:
            raise ValueError(f"{owner[:12]} does not own shard {shard}")
        try:
            check_slice(plan, shard, bytes(payload), owner)
        except BadMaskedSlice as exc:
            self.results.setdefault(shard, {})[owner] = "malformed"
            self.bad_events = self._decide(shard)
            raise MalformedResult(exc.message) from None
        digest = sha256_hex(payload)
        self.payloads.setdefault(digest, bytes(payload))
        self.results.setdefault(shard, {})[owner] = digest
        return self._decide(shard)

    def ring(self) -> bytes:
        """The masked sum's u32 LE words, every shard as its owners agreed."""
        if not self.done:
            raise ValueError("not every shard is agreed")
        return b"".join(self.payloads[self.agreed[s]] for s in range(self.plan.n_shards))

    def aggregate(self) -> Vector:
        return from_bytes(self.ring())  # bit-preserving view; the server reads ring()


ACCUSE_STAGE = "accuse"  # SecAgg stage: an owner hands the server a member's bad signed slice


def check_accusation(frame: bytes, *, run_id: str, round_: int, accuser: str, plan: Plan,
                     signing_key: bytes) -> str:
    """The accused node of an owner's accusation, once proven: `frame` is a Shard part
    signed by that member (checked with its advert's ML-DSA key), of this round, to the
    accuser, for a shard it owns, and not the shard's length of u32 words. MessageError (a
    ProtocolError) when the accusation proves nothing."""
    try:
        fr = decode_frame(frame, max_payload=len(frame) + 1024)
        msg = message_from_frame(fr, max_payload=len(frame) + 1024)
        if not isinstance(msg, Shard) or msg.kind != "part":
            raise MessageError("not a masked slice", field="payload")
        verify_frame(fr, public_key=signing_key, run_id=run_id, node_id=msg.node_id)
    except MessageError:
        raise
    except Exception as exc:  # a frame error or bad signature: nothing is proven
        raise MessageError(f"accusation frame: {exc}", field="payload") from None
    if (msg.run_id, msg.round, msg.to) != (run_id, round_, accuser) \
            or not 0 <= msg.shard < plan.n_shards or accuser not in plan.owners[msg.shard] \
            or msg.node_id not in plan.members:
        raise MessageError("the slice is not one this owner took in this round",
                           field="payload")
    try:
        check_slice(plan, msg.shard, bytes(msg.payload), msg.node_id)
    except BadMaskedSlice:
        return msg.node_id
    raise MessageError("the accused slice is well formed", field="payload")
