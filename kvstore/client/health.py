"""What a client learns about the nodes while it calls them, and what it did about it:
calls outstanding per node (reads prefer the least busy replica) and the counters of
failovers, hedges and write retries (``Client.counters()``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["ReplicaCounters"]


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
