"""One read of a table with replicas, as a state machine the clients drive: its parts
(one per node), a failed part sent at once to another replica, a slow part hedged to
another replica after its node's recent p95 (first answer wins), within the budget
(but for a hedge away from a node suspect of hanging: kvstore.client.health).

Sans I/O: ``Client`` (gRPC futures or fast-path sockets, on the calling thread) and
``AsyncClient`` (tasks) send the calls it gives them and hand back each outcome
(``answered``) and the passing of time (``hedge``); the logic is here once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvstore.client.core import STALE_ROUTE, GetPlan, NodeCall
from kvstore.client.routes import NoReplica
from kvstore.errors import KvstoreError
from kvstore.keys import KeyBatch
from kvstore.schema import TableSchema

if TYPE_CHECKING:
    from kvstore.client.core import ClientCore

__all__ = ["HedgedRead"]


@dataclass(slots=True)
class _Attempt:
    """One way of answering a part: calls (by id) still to answer, and the answers."""

    part: int
    hedge: bool
    pending: set[int] = field(default_factory=set)
    answers: list[tuple[NodeCall, Any]] = field(default_factory=list)
    dead: bool = False


@dataclass(slots=True)
class _Part:
    """Key positions of the batch that one node was first asked for."""

    positions: np.ndarray
    address: str
    sent_at: float
    due: float  # when to hedge it (time.monotonic); inf once hedged or not hedgeable
    attempts: list[_Attempt] = field(default_factory=list)
    winner: _Attempt | None = None


class HedgedRead:
    """A read of ``batch`` over the replicas of ``table``'s shards (see the module
    docstring). ``calls``: every call made so far, by id (the drivers send
    ``calls[i]`` for each id they are given)."""

    def __init__(
        self,
        core: ClientCore,
        table: str,
        schema: TableSchema,
        plan: GetPlan,
        batch: KeyBatch,
        version: int,
        avoid: frozenset[str] = frozenset(),
        calls: list[NodeCall] | None = None,
    ) -> None:
        self.core = core
        self.table = table
        self.schema = schema
        self.plan = plan
        self.batch = batch
        self.version = version
        #: Nodes that failed this read: not asked again by it.
        self.avoid = set(avoid)
        self.calls: list[NodeCall] = []
        self.sent_at: list[float] = []
        self._attempt_of: list[_Attempt] = []
        self._parts: list[_Part] = []
        self._open = 0
        self._first_error: KvstoreError | None = None
        first = calls if calls is not None else self._plan(batch, None, frozenset(avoid))
        self._initial = first

    # -- what the drivers call -----------------------------------------------------------

    def start(self) -> list[int]:
        """The ids of the first calls to send (one per node)."""
        now = time.monotonic()
        ids = []
        for call in self._initial:
            positions = call.positions
            if positions is None:
                positions = np.arange(self.batch.count)
            part = _Part(positions, call.address, now, self._due(call.address, now))
            self._parts.append(part)
            attempt = _Attempt(len(self._parts) - 1, hedge=False)
            part.attempts.append(attempt)
            ids.append(self._add(call, attempt, now))
        self._open = len(self._parts)
        self.core.health.earn(len(self._parts))
        return ids

    @property
    def done(self) -> bool:
        return self._open == 0

    def next_due(self) -> float:
        """When ``hedge`` should next be called (time.monotonic; inf: never)."""
        return min((p.due for p in self._parts if p.winner is None), default=np.inf)

    def answered(self, call_id: int, outcome: Any) -> list[int]:
        """Call ``call_id`` ended with ``outcome`` (its response or KvstoreError): the
        ids of the calls to send now (a failover). Raises the error when it is not a
        stale route, or when no replica is left for a part that has no other attempt."""
        attempt = self._attempt_of[call_id]
        part = self._parts[attempt.part]
        call = self.calls[call_id]
        now = time.monotonic()
        if not isinstance(outcome, KvstoreError):
            self.core.health.record(call.address, now - self.sent_at[call_id])
            self.core.health.cleared(call.address)  # it answers: no longer suspect
        if part.winner is not None or attempt.dead:
            return []  # a loser's late answer
        attempt.pending.discard(call_id)
        if not isinstance(outcome, KvstoreError):
            attempt.answers.append((call, outcome))
            if not attempt.pending:
                part.winner = attempt
                self._open -= 1
                if attempt.hedge:
                    self.core.counters.hedges_won += 1
                    self._lost(part, now)
            return []
        if not isinstance(outcome, STALE_ROUTE):
            raise outcome
        self._first_error = self._first_error or outcome
        self.avoid.add(call.address)
        self.core.health.suspect(call.address)
        self.core.route_doubted = True  # the next call refreshes the map
        positions = np.arange(self.batch.count) if call.positions is None else call.positions
        try:
            calls = self._plan(self.batch.take(positions), positions, frozenset(self.avoid))
        except NoReplica:
            attempt.dead = True
            if all(a.dead for a in part.attempts):
                raise self._first_error from None
            return []
        self.core.counters.failovers += 1
        part.due = max(part.due, now + self.core.health.policy.max_delay)
        return [self._add(c, attempt, now) for c in calls]

    def hedge(self) -> list[int]:
        """The ids of the hedges due now: each part outstanding past its delay gets its
        keys sent to other replicas (once). A hedge is charged to the budget unless it
        goes away from nodes suspect of hanging (a hedge beat them, or this part's call
        stalled past ``NodeHealth.stall_s``) to nodes that are not; one the budget holds
        back is tried again after max_delay."""
        now = time.monotonic()
        health = self.core.health
        ids: list[int] = []
        for index, part in enumerate(self._parts):
            if part.winner is not None or part.due > now:
                continue
            busy = self._busy(part, now)
            try:
                calls = self._plan(
                    self.batch.take(part.positions), part.positions, frozenset(self.avoid | busy)
                )
            except NoReplica:
                part.due = np.inf
                continue
            away = (
                bool(busy)
                and all(map(health.is_suspect, busy))
                and not any(health.is_suspect(c.address) for c in calls)
            )
            if not away and not health.spend():
                self.core.counters.budget_exhausted += 1
                part.due = now + health.policy.max_delay
                continue
            part.due = np.inf  # one hedge per part
            attempt = _Attempt(index, hedge=True)
            part.attempts.append(attempt)
            self.core.counters.hedges_sent += 1
            self.core.counters.hedges_off_budget += away
            ids += [self._add(c, attempt, now) for c in calls]
        return ids

    def _busy(self, part: _Part, now: float) -> set[str]:
        """The nodes with a call of ``part`` still out; those out past the stall time
        become suspect."""
        health = self.core.health
        stall = health.stall_s()
        busy = set()
        for attempt in part.attempts:
            for i in attempt.pending:
                address = self.calls[i].address
                busy.add(address)
                if now - self.sent_at[i] >= stall and not health.is_suspect(address):
                    health.suspect(address)
        return busy

    def answers(self) -> tuple[list[NodeCall], list[Any]]:
        """The winning calls and their responses, for ``ClientCore.finish_get``."""
        calls, responses = [], []
        for part in self._parts:
            assert part.winner is not None
            for call, response in part.winner.answers:
                calls.append(call)
                responses.append(response)
        return calls, responses

    def failed_nodes(self) -> frozenset[str]:
        return frozenset(self.avoid)

    def _lost(self, part: _Part, now: float) -> None:
        """A hedge beat the calls still out for ``part``: their nodes took at least this
        long (a node that stopped answering is then read from less; see read_choice)."""
        for attempt in part.attempts:
            if attempt is not part.winner:
                for i in attempt.pending:
                    self.core.health.record(self.calls[i].address, now - self.sent_at[i])
                    self.core.health.suspect(self.calls[i].address)

    # -- planning ------------------------------------------------------------------------

    def _due(self, address: str, now: float) -> float:
        readable = self.core.route.readable.get(self.table)
        if not self.core.health.policy.enabled or readable is None or readable.shape[1] < 2:
            return np.inf
        return now + self.core.health.hedge_delay(address)

    def _version(self) -> int:
        """The version a failover or hedge reads: the call's, else the one the parts
        answered so far come from (one version for the whole batch)."""
        if self.version:
            return self.version
        for part in self._parts:
            for attempt in part.attempts:
                for _, response in attempt.answers:
                    return response.version
        return 0

    def _plan(
        self, keys: KeyBatch, positions: np.ndarray | None, avoid: frozenset[str]
    ) -> list[NodeCall]:
        """Calls reading ``keys`` (at batch ``positions``; None: the whole batch) from
        replicas not in ``avoid``; NoReplica when a shard has none left."""
        calls = self.core.plan_get(
            self.table, self.schema, keys, self.plan.names, self._version(), avoid
        )
        if positions is not None:
            for call in calls:
                call.positions = positions if call.positions is None else positions[call.positions]
        return calls

    def _add(self, call: NodeCall, attempt: _Attempt, now: float) -> int:
        call_id = len(self.calls)
        self.calls.append(call)
        self.sent_at.append(now)
        self._attempt_of.append(attempt)
        attempt.pending.add(call_id)
        return call_id
