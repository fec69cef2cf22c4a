"""Secure aggregation (SecAgg+ style, Bonawitz et al. 2017; Bell et al. 2020), keyed by ML-KEM-768.

A sans-I/O round object per participant (`SecAggParticipant`) and one for whoever sums the
masked updates (`SecAggAggregator`: the server, or a p2p shard owner over its slice). The
design, threat model and costs are in docs/privacy.md.
"""

from shared.secagg import shamir
from shared.secagg.aggregator import AggregateResult, SecAggAggregator
from shared.secagg.errors import (
    BadKeyMessage,
    BadMaskedUpdate,
    BadShare,
    NotNeighbour,
    SecAggError,
    TooManyDropouts,
)
from shared.secagg.fixedpoint import FixedPoint
from shared.secagg.graph import RoundConfig, choose_degree, neighbour_graph, threshold
from shared.secagg.participant import SecAggParticipant

__all__ = ["AggregateResult", "BadKeyMessage", "BadMaskedUpdate", "BadShare", "FixedPoint",
           "NotNeighbour", "RoundConfig", "SecAggAggregator", "SecAggError",
           "SecAggParticipant", "TooManyDropouts", "choose_degree", "neighbour_graph", "shamir",
           "threshold"]
