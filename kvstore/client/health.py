"""What a client learns about the nodes while it calls them, and what it did about it:
calls outstanding per node (reads prefer the least busy replica), each node's recent
latency (a read part slower than its node's usual hedges), the hedge budget, and the
counters of failovers, hedges and write retries (``Client.counters()``)."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass

from kvstore.errors import InvalidArgument

__all__ = ["HedgePolicy", "NodeHealth", "ReplicaCounters"]

#: Weight of the newest sample in a node's latency averages (about the last 16 calls).
EWMA_WEIGHT = 1 / 16
#: A part is hedged after mean + DEVIATIONS x mean deviation of its node's latency:
#: about its p95 for the latencies of a busy node (Jacobson's estimate, as TCP's RTO).
DEVIATIONS = 3.0
#: Latency samples are capped at this (s): one late answer does not ban a node.
MAX_SAMPLE_S = 1.0
#: How fast a node's slowness is forgotten when no call measures it (s).
SLOW_HALF_LIFE_S = 1.0
#: How long reads avoid a node that a hedge beat or that failed (s): then one read
#: tries it again (and pays one hedge delay if it still does not answer).
SUSPECT_S = 1.0


@dataclass(slots=True)
class ReplicaCounters:
    """What the client did to route around failed or slow replicas, since it started."""

    #: Parts of a read sent again to another replica after theirs failed.
    failovers: int = 0
    #: Hedges sent (a slow part's keys sent to a second replica) and those that won.
    hedges_sent: int = 0
    hedges_won: int = 0
    #: Hedges not sent because the budget was spent.
    budget_exhausted: int = 0
    #: Write rounds sent again after a map refresh (a shard lacked its quorum).
    write_retries: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class HedgePolicy:
    """When a read part is hedged: past its node's recent p95, bounded by ``min_delay``
    and ``max_delay`` (s); at most ``budget`` hedges per read call on average (a token
    bucket: each read part earns ``budget`` tokens, up to ``burst``; a hedge spends 1)."""

    enabled: bool = True
    min_delay: float = 0.001
    max_delay: float = 0.05
    budget: float = 0.1
    burst: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.min_delay <= self.max_delay < math.inf:
            raise InvalidArgument(
                f"hedge delays must be 0 < min <= max (s), not {self.min_delay}, {self.max_delay}"
            )
        if not 0 <= self.budget <= 1:
            raise InvalidArgument(f"hedge budget must be in [0, 1], not {self.budget}")


class NodeHealth:
    """Per node: calls outstanding, latency averages; the hedge budget. Thread-safe
    enough: counts are updated under the GIL, one writer per sample."""

    def __init__(self, policy: HedgePolicy) -> None:
        self.policy = policy
        #: address → calls sent to it and not answered yet (the drivers count them).
        self.outstanding: dict[str, int] = {}
        #: address → (mean latency s, mean deviation s, time.monotonic of the last sample).
        self.latency: dict[str, tuple[float, float, float]] = {}
        self.counters = ReplicaCounters()
        #: address → time.monotonic until which reads avoid it (see suspect).
        self.suspects: dict[str, float] = {}
        self._tokens = policy.burst
        self._lock = threading.Lock()

    def record(self, address: str, seconds: float) -> None:
        """A call to ``address`` answered after ``seconds`` (or a hedge beat it then)."""
        seconds = min(seconds, MAX_SAMPLE_S)
        mean, dev, _ = self.latency.get(address, (seconds, seconds / 2, 0.0))
        error = seconds - mean
        mean += EWMA_WEIGHT * error
        dev += EWMA_WEIGHT * (abs(error) - dev)
        self.latency[address] = (mean, dev, time.monotonic())

    def hedge_delay(self, address: str) -> float:
        """How long a part sent to ``address`` may take before it is hedged, s."""
        policy = self.policy
        mean, dev, _ = self.latency.get(address, (policy.max_delay, 0.0, 0.0))
        return min(max(mean + DEVIATIONS * dev, policy.min_delay), policy.max_delay)

    def slowness(self, address: str, now: float) -> float:
        """The node's mean latency (s), halved for each SLOW_HALF_LIFE_S since its last
        sample: a node that stopped answering (hedges beat it) is read from less, and
        tried again a few seconds later."""
        entry = self.latency.get(address)
        if entry is None:
            return 0.0
        mean, _, at = entry
        return mean * 0.5 ** ((now - at) / SLOW_HALF_LIFE_S)

    def suspect(self, address: str) -> None:
        """A hedge beat ``address``, or it failed: reads avoid it for SUSPECT_S."""
        self.suspects[address] = time.monotonic() + SUSPECT_S

    def suspected(self, address: str, now: float) -> bool:
        return self.suspects.get(address, 0.0) > now

    def earn(self, parts: int) -> None:
        """``parts`` read parts were sent: the budget grows by their share."""
        policy = self.policy
        with self._lock:
            self._tokens = min(policy.burst, self._tokens + parts * policy.budget)

    def spend(self) -> bool:
        """Take one hedge from the budget; False when it is spent."""
        with self._lock:
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True
