"""Every participant of a secure-aggregation round in one process: the relay the server does,
done by direct calls. For tests, the benchmark and the simulator; real runs carry the same
messages over the network. Bytes each participant sends are counted per node.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from shared.envelope import Identity
from shared.secagg.aggregator import AggregateResult, SecAggAggregator
from shared.secagg.errors import SecAggError
from shared.secagg.graph import RoundConfig
from shared.secagg.messages import MaskedUpdate, UnmaskResponse
from shared.secagg.participant import SecAggParticipant

Tamper = Callable[[str, object], object]  # (stage, message) -> message (tests inject faults)


@dataclass
class LocalRound:
    cfg: RoundConfig
    identities: Sequence[Identity]
    use_numpy: bool = True
    tamper: Tamper | None = None
    participants: dict[str, SecAggParticipant] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)  # node -> bytes sent
    errors: list[SecAggError] = field(default_factory=list)  # what the aggregator refused
    aggregator: SecAggAggregator | None = None
    cpu: dict[str, float] = field(default_factory=dict)  # node -> protocol CPU seconds

    @contextmanager
    def timed(self, node: str) -> Iterator[None]:
        t0 = time.process_time()
        try:
            yield
        finally:
            self.cpu[node] = self.cpu.get(node, 0.0) + time.process_time() - t0

    def _send(self, stage: str, node: str, msg: object, accept: Callable[[object], None],
              size: int) -> None:
        if self.tamper is not None:
            msg = self.tamper(stage, msg)
        self.sent[node] = self.sent.get(node, 0) + size
        try:
            accept(msg)
        except SecAggError as exc:
            self.errors.append(exc)

    def setup(self, drop_before_submit: Sequence[str] = ()) -> SecAggAggregator:
        """Stages 1-3: adverts, ciphertexts, shares. Returns the aggregator."""
        agg = self.aggregator = SecAggAggregator(self.cfg, use_numpy=self.use_numpy)
        self.participants = {i.node_id: SecAggParticipant(i, self.cfg) for i in self.identities}
        for n, p in self.participants.items():
            with self.timed(n):
                a = p.advertise()
            self._send("advert", n, a, agg.on_advert, a.wire_size())  # type: ignore[arg-type]
        roster = agg.close_roster()
        live = {a.node_id for a in roster}
        for n in list(self.participants):
            if n not in live:
                del self.participants[n]
        for n, p in self.participants.items():
            with self.timed(n):
                m = p.on_roster(roster)
            self._send("ciphertexts", n, m, agg.on_ciphertexts,  # type: ignore[arg-type]
                       m.wire_size())
        alive, cts = agg.relay_ciphertexts()
        for n in alive:
            with self.timed(n):
                b = self.participants[n].on_ciphertexts(alive, cts)
            self._send("bundle", n, b, agg.on_bundle, b.wire_size())  # type: ignore[arg-type]
        alive, routed = agg.relay_shares()
        for n in alive:
            with self.timed(n):
                problems = self.participants[n].on_shares(alive, routed[n])
            self.errors.extend(problems)
        self.live = [n for n in alive if n not in drop_before_submit]
        return agg

    def submit(self, node: str, masked: MaskedUpdate) -> None:
        assert self.aggregator is not None
        self._send("masked", node, masked, self.aggregator.on_masked,  # type: ignore[arg-type]
                   masked.wire_size())

    def unmask(self, responders: Sequence[str]) -> AggregateResult:
        """Stage 5 with only `responders` answering (the rest dropped after submitting)."""
        agg = self.aggregator
        assert agg is not None
        req = agg.unmask_request()
        for n in responders:
            try:
                with self.timed(n):
                    r: UnmaskResponse = self.participants[n].on_unmask(req)
            except SecAggError as exc:
                self.errors.append(exc)
                continue
            self._send("unmask", n, r, agg.on_unmask_response,  # type: ignore[arg-type]
                       r.wire_size())
        return agg.finish()
