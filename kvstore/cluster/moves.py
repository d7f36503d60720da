"""Moving shards onto this node: the target's side of a move (docs/cluster.md, "Moves").

At every placement epoch the cluster agent hands the placement to ``Mover.see``: each
``Initializing`` replica of this node (a move's target, naming its ``source``) gets a
task, at most ``MAX_MOVES`` at a time (a join does not flood the node or its sources).
A move, against the source node's CopyShard and ShardChanges RPCs
(kvstore.server.transfer):

1. **Copy**: empty this node's copy of the shard, then take the source's stream: the
   base files of every version it keeps, its delta rows (raw), and the change log's id.
2. **Catch up**: ask the changes since the last one taken and write them raw, in order,
   until an answer brings fewer than ``CATCH_UP_CHANGES``.
3. **Hand over**: ask the source to seal the shard (its writes wait) and take the last
   changes; then one compare-and-swap (``ClusterAgent.finish_move``: only if the
   placement still holds this move, and its table version is one copied) makes this
   replica Available and drops the source's, and this node applies that placement at
   once, before any client can learn it. The source, at that epoch, refuses the shard
   (StaleMap: its waiting writes come here) and drops its copy.

**Catch-up** (docs/cluster.md, "Replicas"): an Initializing replica whose source is
*Available* (a replica that may have missed writes, or a new copy replacing a dead
node's) runs the same copy and catch-up without emptying its own rows first (clients
write to it meanwhile; everything is merged by event time) and without a seal (the
source stays Available and clients write to both): its finish makes it Available and
leaves the source as it is, then the source's log is released.

Anything failing (the source restarted and lost its log, the log overflowed, a version
appeared, the CAS refused) gives the seal back and starts the move over after
``RETRY_S``; a target that restarts sees its Initializing replica again and starts over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING

import grpc

from kvstore.cluster.placement import Placement, ShardState
from kvstore.errors import KvstoreError, Unavailable, from_rpc_error
from kvstore.server.transfer import HANDOVER_GAP_S, ShardReceiver
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire.dial import dial_address, open_aio_channel

if TYPE_CHECKING:
    from kvstore.cluster.agent import ClusterAgent

__all__ = ["MAX_MOVES", "Mover"]

log = logging.getLogger(__name__)

#: Moves a node runs at once as a target.
MAX_MOVES = 2
#: Catch-up ends (and the hand-over begins) once an answer brings fewer changes.
CATCH_UP_CHANGES = 64
#: Seconds before a failed move is tried again.
RETRY_S = 1.0
#: How long a move waits for its source to be seen live before it tries again later (s).
SOURCE_WAIT_S = 5.0
#: Deadline of each unary call to the source (s); the copy stream has none.
CALL_S = 10.0
#: A fault hook for tests (docs/operations.md, "Fault hooks"): with this variable set
#: to N, the node exits at once (status 70, as a crash would) on the Nth copy message it
#: receives as a move's target.
FAULT_EXIT_AFTER_COPY_CHUNKS = "KVSTORE_FAULT_EXIT_AFTER_COPY_CHUNKS"
#: ... and with this one set (to anything), it exits on the answer to its first seal,
#: before the final CAS: its source's writes wait, then the source gives it up.
FAULT_EXIT_AT_HANDOVER = "KVSTORE_FAULT_EXIT_AT_HANDOVER"
#: ... and with this one set to a path, a catch-up waits before its copy while that file
#: exists: a test sees the replica Initializing (writes taken, reads refused) meanwhile.
FAULT_HOLD_CATCH_UP = "KVSTORE_FAULT_HOLD_CATCH_UP"


class Mover:
    """The moves whose target is this node, one task each."""

    def __init__(self, agent: ClusterAgent) -> None:
        self.agent = agent
        #: (table, shard) → its task and the (source, attempt) it runs.
        self.running: dict[tuple[str, int], tuple[asyncio.Task, tuple[str, int]]] = {}
        #: One hand-over at a time on this node (see transfer.HANDOVER_GAP_S).
        self._handover = asyncio.Lock()
        #: Moves past their final CAS: the placement that drops them is their own doing.
        self._finishing: set[tuple[str, int]] = set()
        #: Moves finished by this node since it started (for logs and tests).
        self.finished = 0
        self._exit_at_chunk = int(os.environ.get(FAULT_EXIT_AFTER_COPY_CHUNKS) or 0)
        self._exit_at_handover = bool(os.environ.get(FAULT_EXIT_AT_HANDOVER))
        self._chunks = 0
        self._hold_catch_up = os.environ.get(FAULT_HOLD_CATCH_UP) or ""

    def see(self, placement: Placement) -> None:
        """Start the moves ``placement`` gives this node (up to MAX_MOVES at once); cancel
        those it no longer holds."""
        me = self.agent.me.node_id
        wanted = {
            (name, shard): (replica.source, replica.attempt)
            for name, shard, replica in placement.replicas_on(me)
            if replica.state == ShardState.INITIALIZING
        }
        # A move no longer placed, or placed again (its source gave a hand-over up:
        # another attempt), is cancelled; not one past its final CAS (its own doing).
        for key, (task, move) in list(self.running.items()):
            if wanted.get(key) != move and key not in self._finishing:
                del self.running[key]
                task.cancel()
        for key, move in sorted(wanted.items()):
            if len(self.running) >= MAX_MOVES:
                break
            if key not in self.running:
                name = f"move-{key[0]}-{key[1]}"
                task = asyncio.create_task(self._run(*key, *move), name=name)
                self.running[key] = (task, move)

    async def stop(self) -> None:
        tasks = [task for task, _ in self.running.values()]
        self.running.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, table: str, shard: int, source: str, attempt: int) -> None:
        tries = 0
        try:
            while True:
                tries += 1
                try:
                    await self._move(table, shard, source, attempt)
                    self.finished += 1
                    return
                except asyncio.CancelledError:
                    raise
                except (KvstoreError, grpc.RpcError, OSError) as exc:
                    if isinstance(exc, grpc.RpcError):
                        exc = from_rpc_error(exc, source, CALL_S)
                    log.warning(
                        "move of table %r shard %d from %s, try %d: %s; trying again in %g s",
                        table,
                        shard,
                        source,
                        tries,
                        exc,
                        RETRY_S,
                    )
                except Exception:
                    log.exception("move of table %r shard %d from %s", table, shard, source)
                await asyncio.sleep(RETRY_S)
        finally:
            self._finishing.discard((table, shard))
            entry = self.running.get((table, shard))
            if entry is not None and entry[0] is asyncio.current_task():
                del self.running[(table, shard)]
                self.see(self.agent.view.placement)  # the next move waiting, if any

    async def _finish(self, receiver: ShardReceiver, source: str, attempt: int) -> None:
        """The final CAS (``ClusterAgent.finish_move``), the move marked as finishing
        meanwhile: the placement it writes drops the move, and must not cancel it."""
        key = (receiver.table.schema.name, receiver.shard)
        self._finishing.add(key)
        try:
            await self.agent.finish_move(*key, source, attempt, set(receiver.versions))
        except BaseException:
            self._finishing.discard(key)
            raise

    async def _finish_catch_up(
        self,
        stub: pb_grpc.FeatureStoreStub,
        receiver: ShardReceiver,
        ask: pb.ShardChangesRequest,
        source: str,
        attempt: int,
    ) -> int:
        """A catch-up's end: the changes left, then the CAS making this replica
        Available (the source stays); the source's log is released either way."""
        table, shard = receiver.table.schema.name, receiver.shard
        started = time.monotonic()
        try:
            answer = await stub.ShardChanges(ask, timeout=CALL_S)
            last = receiver.apply(answer.changes)
            await self._finish(receiver, source, attempt)
        finally:
            await _release(stub, table, shard, ask.log_id)
        log.info(
            "table %r shard %d caught up from %s: %d delta rows, %d version(s), %d "
            "change(s) at the end, %.2f s for the end",
            table,
            shard,
            source,
            receiver.rows,
            len(receiver.versions),
            last,
            time.monotonic() - started,
        )
        return last

    def _fault_exit_check(self) -> None:
        self._chunks += 1
        if self._chunks >= self._exit_at_chunk:
            _fault_exit(f"{FAULT_EXIT_AFTER_COPY_CHUNKS}={self._exit_at_chunk}: copy message")

    async def _move(self, table: str, shard: int, source: str, attempt: int) -> None:
        agent = self.agent
        # A node that just started may not have seen the live nodes yet: wait a moment.
        deadline = time.monotonic() + SOURCE_WAIT_S
        while source not in agent.view.live or not agent.view.known[source].address:
            if time.monotonic() > deadline:
                raise Unavailable(f"the source node {source!r} is not live")
            await asyncio.sleep(0.1)
        info = agent.view.known[source]
        started = time.monotonic()
        receiver = ShardReceiver(agent.node, table, shard)
        catch_up = _catches_up(agent.view.placement, table, shard, source)
        while catch_up and self._hold_catch_up and os.path.exists(self._hold_catch_up):
            await asyncio.sleep(0.1)  # a test's fault hook: polls a file, test only
        async with open_aio_channel(dial_address(info.address, agent.me.address)) as channel:
            stub = pb_grpc.FeatureStoreStub(channel)
            try:
                if not catch_up:
                    await receiver.empty()
                log_id, seq = "", 0
                request = pb.CopyShardRequest(table=table, shard=shard, target=agent.me.node_id)
                async for chunk in stub.CopyShard(request):
                    if self._exit_at_chunk:
                        self._fault_exit_check()
                    receiver.take(chunk)
                    if chunk.done:
                        # The log from its start: the rows streamed may predate any change
                        # logged while they were read (replaying all of it in order is right).
                        log_id = chunk.log_id
                if not log_id:
                    raise Unavailable(f"the copy from {source} ended early")
                receiver.install_bases()
                copied = time.monotonic()
                ask = pb.ShardChangesRequest(table=table, shard=shard, log_id=log_id)
                while True:
                    ask.since = seq
                    answer = await stub.ShardChanges(ask, timeout=CALL_S)
                    receiver.apply(answer.changes)
                    seq = max(seq, answer.changes[-1].seq) if answer.changes else seq
                    if len(answer.changes) < CATCH_UP_CHANGES:
                        break
                if catch_up:
                    ask.since = seq
                    await self._finish_catch_up(stub, receiver, ask, source, attempt)
                    return
                async with self._handover:
                    ask.since, ask.seal = seq, True
                    answer = await stub.ShardChanges(ask, timeout=CALL_S)
                    if self._exit_at_handover:
                        _fault_exit(f"{FAULT_EXIT_AT_HANDOVER}: the seal's answer")
                    last = receiver.apply(answer.changes)
                    try:
                        await self._finish(receiver, source, attempt)
                    except BaseException:
                        await _release(stub, table, shard, log_id)
                        raise
                    await asyncio.sleep(HANDOVER_GAP_S)  # see HANDOVER_GAP_S
            finally:
                receiver.discard()
        log.info(
            "table %r shard %d moved here from %s: %d delta rows, %d version(s), copied in "
            "%.2f s, %d change(s) at the hand-over, %.2f s in all",
            table,
            shard,
            source,
            receiver.rows,
            len(receiver.versions),
            copied - started,
            last,
            time.monotonic() - started,
        )


async def _release(stub: pb_grpc.FeatureStoreStub, table: str, shard: int, log_id: str) -> None:
    """Best effort: tell the source to drop the shard's change log (and its seal)."""
    with contextlib.suppress(grpc.RpcError):
        release = pb.ShardChangesRequest(table=table, shard=shard, log_id=log_id, release=True)
        await stub.ShardChanges(release, timeout=CALL_S)


def _catches_up(placement: Placement, table: str, shard: int, source: str) -> bool:
    """Whether this node's Initializing replica copies from an Available source (a
    catch-up or a re-replication: no seal) rather than a Leaving one (a move)."""
    placed = placement.tables.get(table)
    if placed is None or not 0 <= shard < len(placed.shards):
        return False
    return any(r.node == source and r.state == ShardState.AVAILABLE for r in placed.shards[shard])


def _fault_exit(where: str) -> None:
    """A fault hook's crash: exit at once, status 70, nothing closed or flushed."""
    log.error("%s: exiting, as a crash would", where)
    logging.shutdown()
    os._exit(70)
