"""One participant's secure-aggregation round, sans-I/O: feed it what the aggregator relays,
send what it returns.

    advertise() -> KeyAdvert
    on_roster(adverts) -> PairCiphertexts           verify adverts, derive the graph, encapsulate
    on_ciphertexts(alive, msgs) -> ShareBundle      decapsulate, Shamir-share, seal to neighbours
    on_shares(alive, routed) -> None                open and check the shares sealed to us
    masked_update(values) -> MaskedUpdate           y = x + PRG(b) + sum_j +-PRG(s_ij)  (mod 2^32)
    on_unmask(request) -> UnmaskResponse            shares of b_u (survivors) or s_u (dropped)

`routed` entries are (dealer, sealed, self-share commitment, key-shares commitment), the
dealer's ShareBundle entry for us. Pair orientation: the smaller node id encapsulates and adds
the pair mask; the larger subtracts it.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Sequence

from shared.envelope import Identity
from shared.platform import ring_masker
from shared.secagg import shamir
from shared.secagg.crypto import commit, derive, kem, open_sealed, seal
from shared.secagg.errors import BadKeyMessage, BadShare, NotNeighbour, SecAggError
from shared.secagg.graph import RoundConfig, neighbour_graph, threshold
from shared.secagg.messages import (
    KeyAdvert,
    MaskedUpdate,
    PairCiphertexts,
    ShareBundle,
    UnmaskRequest,
    UnmaskResponse,
    b64,
    unb64,
)
from shared.secagg.prg import add_mask, is_numpy_ring, ring_bytes
from shared.vec import Vector

Routed = tuple[str, str, str, str]


def pair_commit(cfg: RoundConfig, lo: str, hi: str, key: bytes) -> str:
    return commit("pair", key, cfg.run_id, str(cfg.round), lo, hi)


def self_commit(cfg: RoundConfig, dealer: str, seed: bytes) -> str:
    return commit("self", seed, cfg.run_id, str(cfg.round), dealer)


def share_commit(cfg: RoundConfig, kind: str, dealer: str, holder: str, data: bytes) -> str:
    return commit("share-" + kind, data, cfg.run_id, str(cfg.round), dealer, holder)


def seal_aad(cfg: RoundConfig, dealer: str, holder: str) -> bytes:
    return f"{cfg.run_id}\x00{cfg.round}\x00{dealer}\x00{holder}".encode()


def holder_x(roster: Sequence[str], node: str) -> int:
    return 1 + list(roster).index(node)


def own_share(degree: int) -> bool:
    """Whether a dealer also holds a share of its own self-mask seed (as in Bonawitz et al.,
    where every user is among its own share holders). Only for an even degree k: with
    t = k/2 + 1, a server that tells some holders the dealer dropped (to rebuild its pair keys
    from t of its k neighbours) can then get at most k - t = t - 2 neighbours' self-mask shares,
    plus the dealer's own: t - 1 < t. For odd k that sum would reach t, so no own share there.
    It lets a round of 3 (k = 2, t = 2) lose one submitter and still unmask."""
    return degree % 2 == 0


def verified_roster(cfg: RoundConfig, adverts: Sequence[KeyAdvert]) -> dict[str, KeyAdvert]:
    """The adverts for this run and round whose signatures verify (the same for everyone)."""
    out: dict[str, KeyAdvert] = {}
    for a in adverts:
        try:
            ok = (a.run_id == cfg.run_id and a.round == cfg.round
                  and a.verify(base64.b64decode(a.signing_key, validate=True)))
        except ValueError:
            ok = False
        if ok and a.node_id not in out:
            out[a.node_id] = a
    return out


class SecAggParticipant:
    def __init__(self, identity: Identity, cfg: RoundConfig) -> None:
        self.identity, self.cfg, self.me = identity, cfg, identity.node_id
        self._kem_sk = b""
        self._self_seed = secrets.token_bytes(32)
        self.roster: list[str] = []
        self.neighbours: tuple[str, ...] = ()
        self.t = 0
        self.pair_keys: dict[str, bytes] = {}
        self.masking_with: tuple[str, ...] = ()
        self._held: dict[str, tuple[bytes, bytes]] = {}  # dealer -> (self share, key shares)
        self._answered: tuple[UnmaskRequest, UnmaskResponse] | None = None
        self._own = b""  # our share of our own self-mask seed (own_share), or none

    def advertise(self) -> KeyAdvert:
        pk, self._kem_sk = kem().keygen()
        return KeyAdvert(run_id=self.cfg.run_id, round=self.cfg.round, node_id=self.me,
                         signing_key=b64(self.identity.public_key),
                         kem_key=b64(pk)).signed_by(self.identity)

    def on_roster(self, adverts: Sequence[KeyAdvert]) -> PairCiphertexts:
        valid = verified_roster(self.cfg, adverts)
        if self.me not in valid:
            raise SecAggError("our own advert is not in the roster")
        self.roster = sorted(valid)
        k = self.cfg.degree_for(len(self.roster))
        self.neighbours = neighbour_graph(self.cfg.seed, self.roster, k)[self.me]
        self.t = threshold(k)
        entries = []
        for peer in self.neighbours:
            if peer > self.me:
                ct, key = kem().encaps(unb64(valid[peer].kem_key, "kem_key"))
                self.pair_keys[peer] = key
                entries.append((peer, b64(ct), pair_commit(self.cfg, self.me, peer, key)))
        return PairCiphertexts(run_id=self.cfg.run_id, round=self.cfg.round, node_id=self.me,
                               entries=tuple(entries)).signed_by(self.identity)

    def on_ciphertexts(self, alive: Sequence[str],
                       msgs: Sequence[PairCiphertexts]) -> ShareBundle:
        """`alive`: senders whose ciphertexts the aggregator accepted (it checked signatures)."""
        live = set(alive)
        complaints = []
        for m in msgs:
            if m.node_id not in live or m.node_id not in self.neighbours or m.node_id > self.me:
                continue
            mine = [e for e in m.entries if e[0] == self.me]
            try:
                key = kem().decaps(self._kem_sk, unb64(mine[0][1], "ciphertext"))
                good = len(mine) == 1 and pair_commit(self.cfg, m.node_id, self.me,
                                                      key) == mine[0][2]
            except (ValueError, IndexError, SecAggError):
                good = False
            if good:
                self.pair_keys[m.node_id] = key
            else:
                complaints.append(m.node_id)
        partners = tuple(p for p in self.neighbours if p in live and p in self.pair_keys
                         and p not in complaints)
        for p in list(self.pair_keys):
            if p not in partners:
                del self.pair_keys[p]
        values = [int.from_bytes(self._self_seed, "big")]
        values += [int.from_bytes(self.pair_keys[p], "big") for p in partners]
        xs = [holder_x(self.roster, h) for h in partners]
        if len(xs) < self.t:
            raise SecAggError(f"{len(xs)} live neighbours, fewer than the threshold {self.t}: "
                              "this participant cannot take part in the round")
        own_x = holder_x(self.roster, self.me) if own_share(len(self.neighbours)) else None
        shares = shamir.split(values, xs + ([own_x] if own_x is not None else []), self.t)
        own_commit = ""
        if own_x is not None:  # we hold a share of our own self-mask seed (see own_share)
            self._own = shamir.to_bytes(shares[own_x][:1])
            own_commit = share_commit(self.cfg, "self", self.me, self.me, self._own)
        entries = []
        for h, x in zip(partners, xs, strict=True):
            s_self, s_keys = shamir.to_bytes(shares[x][:1]), shamir.to_bytes(shares[x][1:])
            sealed = seal(self.pair_keys[h], seal_aad(self.cfg, self.me, h), s_self + s_keys)
            entries.append((h, b64(sealed), share_commit(self.cfg, "self", self.me, h, s_self),
                            share_commit(self.cfg, "keys", self.me, h, s_keys)))
        return ShareBundle(run_id=self.cfg.run_id, round=self.cfg.round, node_id=self.me,
                           self_commit=self_commit(self.cfg, self.me, self._self_seed),
                           partners=partners, entries=tuple(entries),
                           complaints=tuple(sorted(complaints)),
                           own_commit=own_commit).signed_by(self.identity)

    def on_shares(self, alive: Sequence[str], routed: Sequence[Routed]) -> list[SecAggError]:
        """Keep the shares sealed to us by dealers the aggregator kept (`alive`); returns the
        problems found (a share that fails to open or its commitment), dealers excluded."""
        live = set(alive)
        self.masking_with = tuple(p for p in self.neighbours if p in live and p in self.pair_keys)
        problems: list[SecAggError] = []
        for dealer, sealed_b64, c_self, c_keys in routed:
            if dealer not in self.masking_with:
                problems.append(NotNeighbour(f"shares from {dealer[:12]}, not a live neighbour",
                                             field="dealer"))
                continue
            plain = open_sealed(self.pair_keys[dealer], seal_aad(self.cfg, dealer, self.me),
                                unb64(sealed_b64, "sealed"))
            n = shamir.SHARE_LEN
            if (plain is None or share_commit(self.cfg, "self", dealer, self.me, plain[:n])
                    != c_self or share_commit(self.cfg, "keys", dealer, self.me, plain[n:])
                    != c_keys):
                problems.append(BadShare(f"shares from {dealer[:12]} fail their commitment",
                                         field="shares"))
                continue
            self._held[dealer] = (plain[:n], plain[n:])
        return problems

    def masked_update(self, values: Vector, *, offset: int = 0) -> MaskedUpdate:
        y = self.cfg.fixed_point.encode(values)
        return self.mask(y, offset=offset)

    def mask(self, y: object, *, offset: int = 0) -> MaskedUpdate:
        """Mask an already fixed-point-encoded ring vector (consumed: masked in place, or by
        the platform's mask loop where one is registered: the tab's JS)."""
        terms = [(derive("self-mask", self._self_seed), 1)]
        terms += [(derive("pair-mask", self.pair_keys[p]), 1 if self.me < p else -1)
                  for p in self.masking_with]
        masker = ring_masker()
        if masker is not None and not is_numpy_ring(y):  # the tab: one JS pass
            data = masker.add_masks(ring_bytes(y), terms, offset)
        else:
            for seed, sign in terms:
                add_mask(y, seed, offset, sign)
            data = ring_bytes(y)
        return MaskedUpdate(run_id=self.cfg.run_id, round=self.cfg.round, node_id=self.me,
                            ring_bits=32, offset=offset, length=len(data) // 4,
                            payload_sha256=hashlib.sha256(data).hexdigest(),
                            payload=data).signed_by(self.identity)

    def on_unmask(self, req: UnmaskRequest) -> UnmaskResponse:
        """Answer ONE unmask request per round: for each neighbour, either its self-mask share
        (it submitted) or its pair-key shares (it did not), never both. The same request
        again (another shard owner) gets the same answer; a different one is refused."""
        if self._answered is not None:
            if self._answered[0] == req:
                return self._answered[1]
            raise SecAggError("this round's unmask request was already answered differently",
                              field="survivors")
        if req.run_id != self.cfg.run_id or req.round != self.cfg.round:
            raise BadKeyMessage("unmask request for another run or round", field="round")
        surv, drop = set(req.survivors), set(req.dropped)
        if surv & drop or self.me not in surv:
            raise BadKeyMessage("inconsistent unmask request", field="survivors")
        if len(surv & set(self.masking_with)) + 1 < self.t:
            raise SecAggError("fewer than the threshold of our neighbours submitted: refusing "
                              "to help unmask so small a sum", field="survivors")
        held = dict(self._held)
        if self._own:  # our own share of our self-mask seed: we submitted
            held[self.me] = (self._own, b"")
        self_shares = tuple((d, s.hex()) for d, (s, _) in sorted(held.items()) if d in surv)
        key_shares = tuple((d, k.hex()) for d, (_, k) in sorted(self._held.items())
                           if d in drop)
        resp = UnmaskResponse(run_id=self.cfg.run_id, round=self.cfg.round, node_id=self.me,
                              self_shares=self_shares,
                              key_shares=key_shares).signed_by(self.identity)
        self._answered = (req, resp)
        return resp
