"""The aggregator's side of a secure-aggregation round, sans-I/O: the server, or a p2p shard
owner that sums the slice [start, stop) of everyone's masked update (masks are coordinate-wise,
so masked shards sum and unmask the same way).

Each `on_*` method checks one participant's message; on bad input it records the participant
in `excluded` (node -> error code) and raises the typed error; the round goes on without it.
`finish()` unmasks: it subtracts every submitter's self mask (seed rebuilt from t shares) and,
for each participant that shared keys but sent no masked update, its pair masks with the
submitters (pair keys rebuilt from t shares). Every share is checked against its dealer's
commitment and every rebuilt secret against its own; too few good shares raise
TooManyDropouts. It never returns a sum it could not fully unmask.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from shared.secagg import shamir
from shared.secagg.crypto import derive
from shared.secagg.errors import (
    BadKeyMessage,
    BadMaskedUpdate,
    BadShare,
    NotNeighbour,
    SecAggError,
    TooManyDropouts,
)
from shared.secagg.graph import RoundConfig, neighbour_graph, threshold
from shared.secagg.messages import (
    KeyAdvert,
    MaskedUpdate,
    PairCiphertexts,
    ShareBundle,
    UnmaskRequest,
    UnmaskResponse,
)
from shared.secagg.participant import (
    Routed,
    holder_x,
    own_share,
    pair_commit,
    self_commit,
    share_commit,
    verified_roster,
)
from shared.secagg.prg import Ring, add_into, add_mask, ring_copy, ring_from_bytes, zeros
from shared.vec import Vector


@dataclass
class AggregateResult:
    ring_sum: Ring  # the unmasked sum in Z_2^32 over [start, stop)
    values: Vector  # ring_sum decoded (float64)
    contributors: tuple[str, ...]  # whose updates the sum holds
    excluded: dict[str, str] = field(default_factory=dict)  # node -> error code
    flagged: dict[str, str] = field(default_factory=dict)  # contributors whose shares failed


class SecAggAggregator:
    def __init__(self, cfg: RoundConfig, *, start: int = 0, stop: int | None = None,
                 use_numpy: bool = True) -> None:
        self.cfg, self.start = cfg, start
        self.stop = cfg.dimension if stop is None else stop
        if not 0 <= self.start < self.stop <= cfg.dimension:
            raise ValueError("bad shard range")
        self.use_numpy = use_numpy
        self.excluded: dict[str, str] = {}
        self.adverts: dict[str, KeyAdvert] = {}
        self.roster: list[str] = []
        self.graph: dict[str, tuple[str, ...]] = {}
        self.t = 0
        self.ciphertexts: dict[str, PairCiphertexts] = {}
        self.pair_commits: dict[tuple[str, str], str] = {}
        self.bundles: dict[str, ShareBundle] = {}
        self.sum: Ring = zeros(self.stop - self.start, use_numpy=use_numpy)
        self.submitted: list[str] = []
        self.responses: dict[str, UnmaskResponse] = {}
        self.keyed: tuple[str, ...] = ()
        self.masking: tuple[str, ...] = ()
        self._request: UnmaskRequest | None = None
        # submitters whose revealed shares failed their commitments: their shares were
        # ignored; their updates stay in the sum (removing a submitted update would need its
        # pair keys, which honest holders never reveal for a submitter)
        self.flagged: dict[str, str] = {}
        self.bad_shares: list[BadShare] = []

    def shard(self, start: int, stop: int) -> SecAggAggregator:
        """An aggregator for the slice [start, stop) that shares this one's key stages (a p2p
        shard owner: the key messages are small and broadcast; masked shards and the unmask
        responses go to each owner)."""
        other = SecAggAggregator(self.cfg, start=start, stop=stop, use_numpy=self.use_numpy)
        for name in ("adverts", "roster", "graph", "t", "ciphertexts", "pair_commits",
                     "bundles", "keyed", "masking"):
            setattr(other, name, getattr(self, name))
        other.excluded = dict(self.excluded)
        return other

    def _exclude(self, node: str, err: SecAggError) -> SecAggError:
        self.excluded[node] = err.code
        return err

    def _check_sender(self, msg: KeyAdvert | PairCiphertexts | ShareBundle | UnmaskResponse
                      ) -> None:
        adv = self.adverts.get(msg.node_id)
        if adv is None or msg.node_id in self.excluded:
            raise SecAggError("not a participant of this round", field="node_id")
        if (msg.run_id, msg.round) != (self.cfg.run_id, self.cfg.round) or not msg.verify(
                base64.b64decode(adv.signing_key)):
            raise self._exclude(msg.node_id, BadKeyMessage(
                f"{type(msg).__name__} signature does not verify", field="signature"))

    # stage 1
    def on_advert(self, msg: KeyAdvert) -> None:
        if self.roster:
            raise SecAggError("the roster is already closed")
        if not verified_roster(self.cfg, [msg]):
            raise self._exclude(msg.node_id, BadKeyMessage(
                "advert signature does not verify", field="signature"))
        self.adverts.setdefault(msg.node_id, msg)

    def close_roster(self) -> list[KeyAdvert]:
        """The adverts to relay to everyone; fixes the graph."""
        self.roster = sorted(self.adverts)
        k = self.cfg.degree_for(len(self.roster))
        self.graph = neighbour_graph(self.cfg.seed, self.roster, k)
        self.t = threshold(k)
        return [self.adverts[n] for n in self.roster]

    # stage 2
    def on_ciphertexts(self, msg: PairCiphertexts) -> None:
        self._check_sender(msg)
        me = msg.node_id
        want = {p for p in self.graph[me] if p > me}
        got = [e[0] for e in msg.entries]
        stray = [p for p in got if p not in want]
        if stray or len(set(got)) != len(got):
            raise self._exclude(me, NotNeighbour(
                f"ciphertexts to {len(stray)} peers that are not neighbours", field="entries"))
        if set(got) != want:
            raise self._exclude(me, NotNeighbour("ciphertexts missing for neighbours",
                                                 field="entries"))
        self.ciphertexts[me] = msg
        for peer, _, c in msg.entries:
            self.pair_commits[(me, peer)] = c

    def relay_ciphertexts(self) -> tuple[list[str], list[PairCiphertexts]]:
        alive = sorted(n for n in self.ciphertexts if n not in self.excluded)
        self.keyed = tuple(alive)  # whose pair keys exist: fixed from here on
        return alive, [self.ciphertexts[n] for n in alive]

    # stage 3
    def on_bundle(self, msg: ShareBundle) -> None:
        self._check_sender(msg)
        me = msg.node_id
        if me not in self.keyed:
            raise SecAggError("no ciphertexts from this participant", field="node_id")
        want = {p for p in self.graph[me] if p in self.keyed} - set(msg.complaints)
        holders = [e[0] for e in msg.entries]
        if any(h not in self.graph[me] for h in holders + list(msg.complaints)):
            raise self._exclude(me, NotNeighbour("shares sent to a peer that is not a "
                                                 "neighbour", field="entries"))
        if set(holders) != want or tuple(holders) != msg.partners or len(holders) < self.t:
            raise self._exclude(me, BadKeyMessage("shares must go to exactly the live "
                                                  "neighbours, in partner order",
                                                  field="entries"))
        self.bundles[me] = msg

    def relay_shares(self) -> tuple[list[str], dict[str, list[Routed]]]:
        """(alive, holder -> entries sealed to it). A participant accused by a neighbour of
        a ciphertext that fails its commitment is excluded here."""
        for b in list(self.bundles.values()):
            for accused in b.complaints:
                if accused not in self.excluded:
                    self._exclude(accused, BadKeyMessage(
                        f"its ciphertext failed at {b.node_id[:12]}", field="entries"))
        alive = sorted(n for n in self.bundles if n not in self.excluded)
        self.masking = tuple(alive)  # who masks with whom: fixed from here on
        routed: dict[str, list[Routed]] = {n: [] for n in alive}
        for d in alive:
            for holder, sealed, c_self, c_keys in self.bundles[d].entries:
                if holder in routed:
                    routed[holder].append((d, sealed, c_self, c_keys))
        return alive, routed

    # stage 4
    def on_masked(self, msg: MaskedUpdate) -> None:
        self.check_masked(msg)
        add_into(self.sum, ring_from_bytes(msg.payload, use_numpy=self.use_numpy))
        self.submitted.append(msg.node_id)

    def check_masked(self, msg: MaskedUpdate, *, payload_len: int | None = None) -> None:
        """on_masked's checks (bad input excludes the sender). `payload_len`: the words are
        not in `msg` but streamed in (server.secagg_stream): their length is checked, their
        SHA-256 is the streamer's to check once they are all in."""
        if (msg.node_id not in self.masking or msg.node_id in self.excluded
                or msg.node_id in self.submitted):
            raise SecAggError("not expecting a masked update from this node", field="node_id")
        size = len(msg.payload) if payload_len is None else payload_len
        bad = None
        if msg.ring_bits != 32:
            bad = ("ring_bits", f"ring Z_2^{msg.ring_bits}, this round sums in Z_2^32")
        elif (msg.offset, msg.length) != (self.start, self.stop - self.start) or \
                size != 4 * msg.length:
            bad = ("length", f"{size // 4} values at {msg.offset}; this aggregator "
                             f"sums [{self.start}, {self.stop})")
        elif (payload_len is None and not msg.digest_ok()) or not msg.verify(base64.b64decode(
                self.adverts[msg.node_id].signing_key)):
            bad = ("signature", "payload digest or signature does not verify")
        if bad is not None:
            raise self._exclude(msg.node_id, BadMaskedUpdate(bad[1], field=bad[0]))

    # stage 5
    def unmask_request(self) -> UnmaskRequest:
        surv = tuple(sorted(self.submitted))
        # everyone who received shares masks with its live neighbours: each one either
        # submitted (its self mask comes off) or not (its pair masks come off), excluded or not
        dropped = tuple(n for n in self.masking if n not in self.submitted)
        self._request = UnmaskRequest(run_id=self.cfg.run_id, round=self.cfg.round,
                                      survivors=surv, dropped=dropped)
        return self._request

    def on_unmask_response(self, msg: UnmaskResponse) -> None:
        self._check_sender(msg)
        if msg.node_id not in self.submitted:
            raise SecAggError("only submitters answer the unmask request", field="node_id")
        self.responses.setdefault(msg.node_id, msg)

    def _shares(self, dealer: str, kind: str) -> dict[int, list[int]]:
        """x -> share vector for `dealer`, from responses whose shares match commitments."""
        b = self.bundles[dealer]
        commits = {e[0]: (e[2] if kind == "self" else e[3]) for e in b.entries}
        if kind == "self" and b.own_commit and own_share(len(self.graph[dealer])):
            commits[dealer] = b.own_commit  # the dealer's share of its own seed
        out: dict[int, list[int]] = {}
        for holder, resp in sorted(self.responses.items()):
            pairs = dict(resp.self_shares if kind == "self" else resp.key_shares)
            if dealer not in pairs or holder not in commits:
                continue
            try:
                raw = bytes.fromhex(pairs[dealer])
                ok = share_commit(self.cfg, kind, dealer, holder, raw) == commits[holder]
                vals = shamir.from_bytes(raw) if ok else []
            except ValueError:
                ok = False
            if not ok:
                self.flagged.setdefault(holder, BadShare.code)
                self.bad_shares.append(BadShare(f"{holder[:12]}'s share of {dealer[:12]}'s "
                                                f"{kind} fails its commitment", field="shares"))
                continue
            out[holder_x(self.roster, holder)] = vals
        if len(out) < self.t:
            raise TooManyDropouts(f"{len(out)} valid shares of {dealer[:12]}'s {kind} "
                                  f"secrets, {self.t} needed: the sum cannot be unmasked")
        return out

    def finish(self) -> AggregateResult:
        if not self.submitted:
            raise TooManyDropouts("no masked update was submitted")
        req = self._request if self._request is not None else self.unmask_request()
        if sorted(req.survivors + req.dropped) != sorted(self.masking):
            raise SecAggError("the unmask request does not cover every masking participant")
        total = ring_copy(self.sum)
        for d in req.survivors:
            seed = shamir.reconstruct(self._shares(d, "self"), self.t)[0].to_bytes(32, "big")
            if self_commit(self.cfg, d, seed) != self.bundles[d].self_commit:
                raise BadShare(f"{d[:12]}'s self-mask seed does not match its commitment")
            add_mask(total, derive("self-mask", seed), self.start, -1)
        for d in req.dropped:
            partners = self.bundles[d].partners
            keys = shamir.reconstruct(self._shares(d, "keys"), self.t)
            for p, k in zip(partners, keys, strict=True):
                if p not in req.survivors:
                    continue
                key = k.to_bytes(32, "big")
                lo, hi = min(d, p), max(d, p)
                if pair_commit(self.cfg, lo, hi, key) != self.pair_commits.get((lo, hi)):
                    raise BadShare(f"{d[:12]}'s pair key with {p[:12]} does not match its "
                                   "commitment")
                # p masked with +PRG when p < d, -PRG when p > d: take that back out
                add_mask(total, derive("pair-mask", key), self.start, -1 if p < d else 1)
        contributors = tuple(req.survivors)
        return AggregateResult(ring_sum=total,
                               values=self.cfg.fixed_point.decode_sum(total, len(contributors)),
                               contributors=contributors, excluded=dict(self.excluded),
                               flagged=dict(self.flagged))

