"""A node's part in the cluster: join through etcd, follow the placement, change it.

``ClusterAgent`` is what ``kvstore serve --etcd`` adds to a node (kvstore.server.app):

* ``start()``: connect to etcd (Unavailable naming the URL if it does not answer),
  register the node under a lease (AlreadyExists naming the holder of its node id),
  add it to the placement's nodes the first time it joins (new tables spread over
  it; existing shards stay where they are: moving shard data comes later), then
  apply the placement before the node serves.
* The data directory's cluster (kvstore.cluster.identity): recorded at the first
  join, checked at every start; another cluster name or uuid and the node refuses to
  start rather than apply a placement that would drop its tables.
* While running, every placement epoch of this cluster's uuid is applied to the node:
  each table of the placement exists locally with the same schema and schema id
  (created, or dropped and created again when the placement's id is newer), tables
  the placement provably dropped (schema id <= its last_schema_id) are dropped; a
  local table the placement cannot account for is kept, logged and not served; and
  the node's ClusterView (kvstore.server.cluster_view) says which shards it may serve.
  etcd lost: the node keeps serving with its last view (the watch and the membership
  retry; nothing raises into the node).
* ``create_table`` / ``drop_table``: a compare-and-swap on the placement (one winner
  of concurrent creates; AlreadyExists for another schema), placed over the live
  joined nodes; they return once this node has applied the change.
* Bulk versions (docs/cluster.md, "Bulk loads"): ``allocate_version`` takes a load's
  number from the placement; ``publish_version`` sets the placement's table version by
  one CAS; at every epoch, a table whose placement version differs from the node's
  current one is made current here (Node.publish_version: a staged version installed,
  a kept one current again). A node without that version logs it and keeps serving
  the one it has (a pinned read of the missing one answers StaleMap).
* Moves (docs/cluster.md, "Moves"): a node joining for the first time takes its share
  of the existing shards (``assignment.join`` in the join's CAS); ``drain`` moves a
  node's shards away (``assignment.drain``). This node's Initializing replicas are
  filled by ``kvstore.cluster.moves.Mover`` and finished by ``finish_move`` (a CAS
  applied here at once); as a source it serves the copy and the seal
  (``kvstore.server.transfer.ShardTransfers``), and a shard the placement moved away
  loses its data here. A restart or a lease renewal moves nothing.
* Replicas (docs/cluster.md, "Replicas"): ``kvstore.cluster.replicas.ReplicaKeeper``
  makes this node's replicas catch up when it starts or registers again, and replaces
  the replicas of nodes gone past the grace period.
* ``stop()``: revoke the lease, so the node leaves the live set at once; every step of
  it bounded (STOP_TASKS_S, then the membership's and the etcd client's own bounds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from kvstore.cluster import assignment
from kvstore.cluster.etcd import Etcd, connect
from kvstore.cluster.identity import (
    ClusterIdentity,
    check_identity,
    read_identity,
    record_identity,
)
from kvstore.cluster.membership import (
    DEFAULT_TTL_S,
    Membership,
    NodeInfo,
    read_nodes,
    watch_nodes,
)
from kvstore.cluster.moves import Mover
from kvstore.cluster.placement import Placement, PlacementStore, ShardState, watch_placement
from kvstore.cluster.replicas import ReplicaKeeper
from kvstore.cluster.sizes import REPORT_EVERY_S, read_sizes, report_sizes
from kvstore.errors import InvalidArgument, LoadConflict, NotFound, Unavailable
from kvstore.schema import TableSchema
from kvstore.server.cluster_view import ClusterView
from kvstore.server.node import Node
from kvstore.server.transfer import ShardTransfers
from kvstore.shutdown import cancel_and_wait, within
from kvstore.storage.versions import VersionMeta

__all__ = ["ClusterAgent"]

log = logging.getLogger(__name__)

#: How long start() waits for the first placement, and a table change for this node to
#: apply it (s): a watch delivers in milliseconds; this bounds a lost etcd.
APPLY_TIMEOUT_S = 15.0
#: How long a request naming a table this node does not have waits for the placement
#: to bring it (s): other nodes see a new epoch within milliseconds of each other.
CATCH_UP_S = 1.0
#: How long the moves, and then the following tasks, may take to end at a stop (s).
STOP_TASKS_S = 2.0


class ClusterAgent:
    """Keeps ``node`` in step with the cluster coordinated by the etcd at ``url``."""

    def __init__(
        self,
        node: Node,
        url: str,
        cluster: str,
        me: NodeInfo,
        ttl_s: int = DEFAULT_TTL_S,
        on_failure: Callable[[], None] | None = None,
        replica_grace_s: float = 30.0,
    ) -> None:
        self.node = node
        #: Called when following the cluster stopped unexpectedly: the node must not
        #: serve on with a view nobody updates (kvstore.server.app stops it).
        self.on_failure = on_failure
        self.url = url
        self.cluster = cluster
        self.me = me
        self.ttl_s = ttl_s
        self.view = ClusterView(me.node_id)
        self.etcd: Etcd | None = None
        self.membership: Membership | None = None
        self.store: PlacementStore | None = None
        self._tasks: list[asyncio.Task] = []
        self._applied = asyncio.Condition()
        #: The cluster this node's data belongs to; set by start().
        self.identity = ClusterIdentity(cluster, "")
        #: The source side of moves (copy, change log, seal) and the target side.
        self.transfers = ShardTransfers(node, self.give_up_handover)
        self.mover = Mover(self)
        #: Catch-ups of this node's replicas, re-replication of nodes gone too long.
        self.replicas = ReplicaKeeper(self, replica_grace_s)
        #: (table, shard) this node held at the last epoch applied (None: none yet).
        self._held: frozenset[tuple[str, int]] | None = None
        self._drops: set[asyncio.Task] = set()
        #: Set at every placement applied: the size report goes out then, not only
        #: every REPORT_EVERY_S (kvstore.cluster.sizes).
        self._sizes_changed = asyncio.Event()

    async def start(self) -> None:
        """Join the cluster and apply its placement; Unavailable or AlreadyExists if not."""
        self.etcd = await connect(self.url, self.cluster)
        try:
            data_dir = self.node.config.data_dir
            kept = read_identity(data_dir)
            self.store = PlacementStore(self.etcd)
            if kept is not None:
                current, _ = await self.store.read()
                check_identity(data_dir, kept, ClusterIdentity(self.cluster, current.cluster_uuid))
            self.membership = Membership(self.etcd, self.me, self.ttl_s)
            self.membership.on_registered_again = self.replicas.registered_again
            await self.membership.start()
            joined = await self.store.join(self.me.node_id, await self._sizes())
            self.identity = ClusterIdentity(self.cluster, joined.cluster_uuid)
            if kept is None:
                record_identity(data_dir, self.identity)
            # Before the first placement is applied (nothing is served yet): replicas
            # that may have missed writes while this node was down catch up first.
            await self.replicas.catch_up()
            self.node.view = self.view
            self._tasks = [
                asyncio.create_task(self.replicas.run(), name="cluster-replicas"),
                asyncio.create_task(self._follow_placement(), name="cluster-placement"),
                asyncio.create_task(self._follow_nodes(), name="cluster-nodes"),
                asyncio.create_task(self._report_sizes(), name="cluster-sizes"),
            ]
            for task in self._tasks:
                task.add_done_callback(self._task_ended)
            await self._wait(lambda: self.view.epoch > 0, "the cluster's placement")
        except BaseException:
            await self.stop()
            raise
        log.info(
            "node %s joined cluster %r at placement epoch %d: %d table(s)",
            self.me.node_id,
            self.cluster,
            self.view.epoch,
            len(self.view.placement.tables),
        )

    def _task_ended(self, task: asyncio.Task) -> None:
        # The follow tasks run for the node's life: one that ends (other than by
        # stop()'s cancel) leaves the node serving a view that no longer changes.
        if task.cancelled() or task not in self._tasks:
            return
        error = task.exception()
        log.critical(
            "node %s: %s ended unexpectedly (%s); stopping the node",
            self.me.node_id,
            task.get_name(),
            f"{type(error).__name__}: {error}" if error else "returned",
            exc_info=error,
        )
        if self.on_failure is not None:
            self.on_failure()

    async def stop(self) -> None:
        """Stop following the cluster and deregister (the lease is revoked)."""
        await within("stopping the shard moves", self.mover.stop(), STOP_TASKS_S)
        tasks, self._tasks = self._tasks, []
        tasks += list(self._drops)
        self._drops.clear()
        await cancel_and_wait(tasks, STOP_TASKS_S, f"the cluster tasks of node {self.me.node_id}")
        if self.membership is not None:
            await self.membership.stop()
            self.membership = None
        if self.etcd is not None:
            await self.etcd.close()
            self.etcd = None

    # -- table changes, cluster-wide -------------------------------------------------

    async def create_table(
        self, schema: TableSchema, replicas: int = 1, write_quorum: int = 0
    ) -> None:
        """Place ``schema``'s table over the live joined nodes (a CAS on the placement),
        ``replicas`` copies of each shard on distinct nodes (zones where they allow);
        return once this node has created it. AlreadyExists for another schema."""
        assert self.store is not None and self.etcd is not None
        # The registrations as etcd has them: this node's watch may not have brought a
        # node that just joined, and the table would be placed on fewer nodes for good.
        live = await read_nodes(self.etcd)
        zones = {node: info.zone for node, info in {**self.view.known, **live}.items()}
        placed = await self.store.create_table(
            schema, frozenset(live), replicas or 1, write_quorum, zones
        )
        await self._wait(
            lambda: self.view.placement.tables.get(schema.name) == placed,
            f"table {schema.name!r} to be applied",
        )

    async def drop_table(self, name: str) -> None:
        """Remove table ``name`` from the placement; return once this node dropped it."""
        assert self.store is not None
        dropped = await self.store.drop_table(name)
        await self._wait(lambda: self.view.epoch >= dropped.epoch, f"the drop of {name!r}")

    async def allocate_version(self, table: str) -> int:
        """The number of a new bulk version of ``table``, the same on every node.
        LoadConflict while a shard of the table is moving (its new node would miss it)."""
        assert self.store is not None
        self.node.table(table)  # TableNotFound before touching the placement
        placed = self.view.placement.tables.get(table)
        moving = placed is not None and any(
            r.state == ShardState.INITIALIZING for rs in placed.shards for r in rs
        )
        if moving:
            raise LoadConflict(
                f"table {table!r}: a shard of it is moving between nodes; load again once "
                "the move has finished (kvstore cluster status shows the moves)"
            )
        return await self.store.allocate_version(table)

    async def publish_version(self, table: str, version: int) -> VersionMeta:
        """Make ``version`` of ``table`` current cluster-wide (one CAS on the placement);
        return its description once this node has made it current. NotFound if this node
        has it neither staged nor kept (nothing is changed then)."""
        assert self.store is not None
        local = self.node.table(table)
        if (table, version) not in self.node.staged and version not in local.versions:
            raise NotFound(
                f"table {table!r}: version {version} is neither staged nor kept on node "
                f"{self.me.node_id} (kept: {sorted(local.versions)})"
            )
        written = await self.store.set_version(table, version)
        await self._wait(lambda: self.view.epoch >= written.epoch, f"version {version}")
        local = self.node.table(table)
        if local.current != version:
            raise Unavailable(
                f"table {table!r}: the placement names version {version}, but node "
                f"{self.me.node_id} could not make it current (its log says why)"
            )
        return local.versions[version]

    # -- moves -----------------------------------------------------------------------

    async def drain(self, node: str) -> Placement:
        """Move every replica of ``node`` to the other nodes (one CAS; the moves run on
        their targets); the placement written. Draining again a node whose moves are
        under way changes nothing. InvalidArgument: an unknown node, the last node that
        can hold a shard, a node still the target of a move."""
        assert self.store is not None

        def change(placement: Placement) -> Placement:
            if node not in placement.nodes and placement.replicas_on(node):
                return placement  # drained already, its moves under way
            if node not in placement.nodes:
                known = ", ".join(placement.nodes) or "none"
                raise InvalidArgument(
                    f"node {node!r} is not one of the cluster's nodes (nodes: {known}); "
                    "nothing to drain"
                )
            return assignment.drain(placement, node, sizes=sizes)

        sizes = await self._sizes()
        placement = await self.store.update(change)
        log.info("drain of node %s: placement epoch %d", node, placement.epoch)
        return placement

    async def finish_move(
        self, table: str, shard: int, source: str, attempt: int, versions: set[int]
    ) -> Placement:
        """Make this node's Initializing replica of (table, shard) Available and drop
        ``source``'s (one CAS), then apply that placement here at once. Refused
        (InvalidArgument / LoadConflict) if the placement no longer holds this move at
        this ``attempt`` (the source gave the hand-over up), or its table version is not
        among the ``versions`` copied."""
        assert self.store is not None
        me = self.me.node_id

        def change(placement: Placement) -> Placement:
            moving = assignment.moving_to(placement, table, shard, source, me)
            if moving is None or moving.attempt != attempt:
                raise InvalidArgument(
                    f"table {table!r} shard {shard}: the placement no longer moves it from "
                    f"{source} to {me} (attempt {attempt})"
                )
            placed = placement.table(table)
            if placed.version and placed.version not in versions:
                raise LoadConflict(
                    f"table {table!r}: version {placed.version} became current during the "
                    f"move of shard {shard}; copying again"
                )
            return assignment.finish_move(placement, table, shard, me)

        written = await self.store.update(change)
        await self._take(written)
        return written

    async def give_up_handover(self, table: str, shard: int) -> bool:
        """The source's seal of (table, shard) expired: bump the move's attempt by CAS,
        so the target's finish (if it comes) is refused, and return True (writes may
        resume here). False if the move finished meanwhile (its placement is applied
        here: the writes go to the target). Unavailable while etcd does not answer: the
        shard stays sealed (a write applied here then could be lost)."""
        assert self.store is not None
        me = self.me.node_id
        written = await self.store.update(lambda p: assignment.restart_move(p, table, shard, me))
        await self._take(written)
        return assignment.moving_to(written, table, shard, me) is not None

    def _holds(self, table: str, shard: int) -> bool:
        writable = self.view.writable.get(table)
        return writable is not None and shard < len(writable) and bool(writable[shard])

    def _after_apply(self, placement: Placement) -> None:
        """Moves: end the source's logs and seals of shards moved away, drop their data,
        start the moves that fill this node."""
        held = frozenset(k for k in placement.held_by(self.me.node_id) if self._holds(*k))
        if self._held is not None:
            for table, shard in sorted(self._held - held):
                if table in self.node.tables and table in placement.tables:
                    task = asyncio.create_task(
                        self.transfers.drop_shard(
                            table, shard, lambda t=table, s=shard: not self._holds(t, s)
                        ),
                        name=f"drop-{table}-{shard}",
                    )
                    self._drops.add(task)
                    task.add_done_callback(self._drops.discard)
        self._held = held
        self._sizes_changed.set()  # a load, a move or a new table: report sizes now
        self.transfers.placement_applied()
        self.mover.see(placement)

    async def _take(self, placement: Placement) -> None:
        """Apply ``placement`` unless an epoch as new is applied already (a move's
        finish is applied at once, before the watch delivers it)."""
        if placement.epoch <= self.view.epoch:
            return
        try:
            self._apply(placement)
            if self.view.epoch == placement.epoch:  # applied (not another cluster's)
                self._after_apply(placement)
        except Exception:  # a disk error on one table must not stop the follow
            log.exception("applying placement epoch %d", placement.epoch)
        async with self._applied:
            self._applied.notify_all()

    async def catch_up(self, table: str, timeout_s: float = CATCH_UP_S) -> None:
        """Wait (at most ``timeout_s`` s) until this node has table ``table``: a client
        that learnt of a new table from another node may ask here a moment before this
        node's watch delivered it. Returns quietly on timeout (the caller then reports
        the table as not found)."""
        with contextlib.suppress(Unavailable):
            await self._wait(lambda: table in self.node.tables, f"table {table!r}", timeout_s)

    # -- following -------------------------------------------------------------------

    async def _follow_placement(self) -> None:
        assert self.etcd is not None
        async for placement in watch_placement(self.etcd):
            await self._take(placement)

    async def _sizes(self) -> dict[tuple[str, int], int]:
        """Every node's last report of its shard sizes (bytes), for balancing moves."""
        assert self.etcd is not None and self.store is not None
        current, _ = await self.store.read()
        return await read_sizes(self.etcd, current)

    async def _report_sizes(self) -> None:
        """Report the bytes of every shard this node holds after each placement applied
        and every REPORT_EVERY_S (kvstore.cluster.sizes); etcd lost: the next report
        tries again."""
        assert self.etcd is not None
        while True:
            # Not wait_for: on 3.11 it can drop the stop's cancel (kvstore.shutdown).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REPORT_EVERY_S):
                    await self._sizes_changed.wait()
            self._sizes_changed.clear()
            sizes: dict[str, dict[int, int]] = {}
            for table, shard in sorted(self._held or ()):
                held = self.node.tables.get(table)
                if held is None:
                    continue
                try:
                    sizes.setdefault(table, {})[shard] = held.shard_bytes(shard)
                except OSError:  # a shard's files being replaced by a move: next time
                    continue
            try:
                await report_sizes(self.etcd, self.me.node_id, sizes)
            except Unavailable as exc:
                log.debug("shard sizes not reported: %s", exc)

    async def _follow_nodes(self) -> None:
        assert self.etcd is not None
        async for nodes in watch_nodes(self.etcd):
            self.view.see_nodes(nodes)

    def _apply(self, placement: Placement) -> None:
        """Make the node's tables and view those of ``placement`` (runs without awaiting,
        so no request sees a table created but not yet in the view).

        A local table is destroyed only when the placement provably dropped or replaced
        it (same cluster uuid, and its schema id at most the placement's last one); any
        other disagreement keeps the table, logs it and withholds it from serving."""
        node = self.node
        if placement.cluster_uuid != self.identity.uuid:
            log.error(
                "placement epoch %d has cluster uuid %r, this node's data belongs to %r: "
                "not applying it (a wiped or replaced etcd?)",
                placement.epoch,
                placement.cluster_uuid,
                self.identity.uuid,
            )
            return
        withheld = set()
        for name, placed in sorted(placement.tables.items()):
            schema = placed.table_schema()
            local = node.tables.get(name)
            if local is not None and local.schema.schema_id != schema.schema_id:
                if local.schema.schema_id > schema.schema_id:
                    log.error(
                        "table %r: schema id %d here is newer than %d in placement epoch %d "
                        "(an etcd restored from a backup?): keeping the local table, not "
                        "serving it",
                        name,
                        local.schema.schema_id,
                        schema.schema_id,
                        placement.epoch,
                    )
                    withheld.add(name)
                    continue
                log.warning(
                    "table %r: schema id %d here, %d in the placement: dropping the local one",
                    name,
                    local.schema.schema_id,
                    schema.schema_id,
                )
                node.drop_table(name)
                local = None
            if local is None:
                node.create_table(schema, schema.schema_id)
        held = {name for name, _ in placement.held_by(self.me.node_id)}
        for name, placed in sorted(placement.tables.items()):
            if name in held and placed.version and node.tables[name].current != placed.version:
                self._follow_version(name, placed.version)
        for name in sorted(set(node.tables) - set(placement.tables)):
            schema_id = node.tables[name].schema.schema_id
            if schema_id > placement.last_schema_id:
                log.error(
                    "table %r (schema id %d) is unknown to placement epoch %d (last schema "
                    "id %d; an etcd restored from a backup?): keeping it, not serving it",
                    name,
                    schema_id,
                    placement.epoch,
                    placement.last_schema_id,
                )
                continue
            log.info("table %r is not in placement epoch %d: dropping it", name, placement.epoch)
            node.drop_table(name)
        self.view.apply(placement, withheld)
        shards_held = len(placement.held_by(self.me.node_id))
        log.info("placement epoch %d applied: %d shard(s) held here", placement.epoch, shards_held)

    def _follow_version(self, name: str, version: int) -> None:
        """Make the placement's version of ``name`` current here, if this node has it."""
        try:
            self.node.publish_version(name, version)
        except NotFound as exc:
            # Not staged here (this node restarted since, or holds no shard of the
            # load): keep serving what it has; pinned reads of it answer StaleMap.
            log.warning("placement version %d of %r not applied: %s", version, name, exc)

    async def _wait(self, condition, what: str, timeout_s: float = APPLY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        async with self._applied:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable(
                        f"node {self.me.node_id} did not see {what} within "
                        f"{timeout_s:g} s; is etcd at {self.url} reachable?"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._applied.wait(), left)
