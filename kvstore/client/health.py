"""What a client learns about the nodes while it calls them, and what it did about it:
calls outstanding per node (reads prefer the least busy replica), each node's recent
latency (a read part slower than its node's usual hedges), the nodes suspected of
hanging (reads avoid them until they answer, but for one probe a second), the hedge
budget, and the counters of failovers, hedges and write retries (``Client.counters()``)."""

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
#: A node that a hedge beat, that failed, or that kept a call past its stall time stays
#: suspect until it answers a call; reads avoid it but for one probe per PROBE_S (s):
#: that read tries it again, and pays one hedge delay (off the budget) if it still does
#: not answer. A timer that lifted the suspicion sent every reader back to a hung node
#: at once, each with a hedge the budget might not have left.
PROBE_S = 1.0
#: A call outstanding this many times the policy's max_delay makes its node suspect:
#: its part's hedge then goes out even when the budget is spent (s, per max_delay s).
STALL_DELAYS = 10.0


@dataclass(slots=True)
class ReplicaCounters:
    """What the client did to route around failed or slow replicas, since it started."""

    #: Parts of a read sent again to another replica after theirs failed.
    failovers: int = 0
    #: Hedges sent (a slow part's keys sent to a second replica) and those that won.
    hedges_sent: int = 0
    hedges_won: int = 0
    #: Of hedges_sent, those sent away from a suspect node to one that is not: they
    #: are not charged to the budget (it caps load on slow clusters, not failover).
    hedges_off_budget: int = 0
    #: Times a hedge was held back because the budget was spent (it is tried again
    #: after max_delay, in case the node has become suspect meanwhile).
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
        if not 0 <= self.burst < math.inf:  # 0: no budgeted hedge at all (budget spent)
            raise InvalidArgument(f"hedge burst must be >= 0 and finite, not {self.burst}")


class NodeHealth:
    """Per node: calls outstanding, latency averages, suspicion of hanging; the hedge
    budget. Thread-safe enough: counts are updated under the GIL, one writer per
    sample; the budget and the claim of a probe under a lock."""

    def __init__(self, policy: HedgePolicy) -> None:
        self.policy = policy
        #: address → calls sent to it and not answered yet (the drivers count them).
        self.outstanding: dict[str, int] = {}
        #: address → (mean latency s, mean deviation s, time.monotonic of the last sample).
        self.latency: dict[str, tuple[float, float, float]] = {}
        self.counters = ReplicaCounters()
        #: address → time.monotonic of its suspicion, renewed by each probe (PROBE_S).
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
        """A hedge beat ``address``, it failed, or it stalled: reads avoid it until it
        answers (``cleared``), but for a probe every PROBE_S."""
        with self._lock:
            self.suspects[address] = time.monotonic()

    def cleared(self, address: str) -> None:
        """``address`` answered a call: it is no longer suspect."""
        if address in self.suspects:
            with self._lock:
                self.suspects.pop(address, None)

    def suspected(self, address: str, now: float) -> bool:
        """True while ``address`` is suspect and not due for a probe (``probe``)."""
        at = self.suspects.get(address)
        return at is not None and now - at < PROBE_S

    def suspicion(self, address: str, now: float) -> float:
        """0 for a node not suspect or due for a probe; else from 1 (suspected PROBE_S
        ago) to 2 (just now): of two suspect replicas, reads try the older suspicion."""
        at = self.suspects.get(address)
        if at is None or now - at >= PROBE_S:
            return 0.0
        return 2.0 - max(now - at, 0.0) / PROBE_S

    def is_suspect(self, address: str) -> bool:
        """True while ``address`` is suspect (probe due or not)."""
        return address in self.suspects

    def probe(self, address: str, now: float) -> bool:
        """Claim the probe of suspect ``address`` for one read: True when its suspicion
        was PROBE_S old or more (it is renewed, so concurrent reads keep avoiding it and
        the next probe waits PROBE_S) or it answered meanwhile, False when another read
        probes it already."""
        with self._lock:
            at = self.suspects.get(address)
            if at is None:
                return True
            if now - at < PROBE_S:
                return False
            self.suspects[address] = now
            return True

    def stall_s(self) -> float:
        """How long a call may be outstanding before its node is suspect, s."""
        return STALL_DELAYS * self.policy.max_delay

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
