"""Membership: a node's registration in etcd under a lease, and the set of live nodes.

A node registers at ``/kvstore/<cluster>/nodes/<node id>`` (kvstore.cluster.etcd) with
its addresses, zone, host, data directory and start time, attached to a lease of a few
seconds that a task keeps alive. When the process dies the lease lapses and the key
goes: the node is out of the serving set within one TTL.

* Node ids are stable across restarts: ``stable_node_id`` keeps a node's id in
  ``<data>/node-id`` (the first ``--node-id`` given, else ``<hostname>-<random>``), so
  a data directory is always the same node. Addresses and the start time are written
  anew at every start.
* A second process with a node id that is registered refuses to start
  (``AlreadyExists`` naming the holder's address, host and data directory), unless the
  holder is the same node: same host and same data directory, i.e. this node restarted
  after a crash before its old lease lapsed (the data directory's RocksDB lock already
  keeps a second process off it). It then takes the key over and revokes the old lease.
* etcd lost while running: the node keeps its last view of the live nodes, retries the
  keep-alive, and registers again when etcd is back (if its lease lapsed meanwhile or
  etcd came back empty). Nothing of this raises into the node; it is logged.
* A clean stop revokes the lease: the node leaves the live set at once. The stop is
  bounded (``STOP_TASKS_S`` for the tasks, then one etcd call): with etcd away it gives
  up, and the registration lapses within the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aetcd.exceptions
import aetcd.utils

from kvstore.cluster.etcd import CALL_TIMEOUT_S, RETRY_INTERVAL_S, Etcd, watch_range
from kvstore.errors import AlreadyExists, InvalidArgument, Unavailable
from kvstore.shutdown import cancel_and_wait, cancel_requested, within

__all__ = ["DEFAULT_TTL_S", "Membership", "NodeInfo", "stable_node_id", "watch_nodes"]

log = logging.getLogger(__name__)

# The lease's time to live (s): a dead node leaves the serving set within this; the
# keep-alive runs every third of it, so two lost refreshes in a row are survived.
DEFAULT_TTL_S = 5
#: How long the keep-alive and watch tasks may take to end at a stop (s).
STOP_TASKS_S = 2.0


@dataclass(frozen=True)
class NodeInfo:
    """What a node registers: who it is, where it serves, where its data lives."""

    node_id: str
    address: str  # the gRPC address, host:port
    fast_address: str = ""  # the fast read path's host:port, "" when off
    zone: str = ""
    data_dir: str = ""
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_at_us: int = field(default_factory=lambda: time.time_ns() // 1000)

    def __post_init__(self) -> None:
        if not self.node_id or "/" in self.node_id or len(self.node_id) > 128:
            raise InvalidArgument(
                f"node id {self.node_id!r} is not valid: 1 to 128 characters, no '/'"
            )

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> NodeInfo:
        return cls(**json.loads(data))

    def same_node(self, other: NodeInfo) -> bool:
        """Whether ``other`` is this node in an earlier life (same host, same data dir)."""
        return (self.node_id, self.host, self.data_dir) == (
            other.node_id,
            other.host,
            other.data_dir,
        )

    def describe(self) -> str:
        return f"{self.address} (host {self.host}, data dir {self.data_dir or '?'}, pid {self.pid})"


def stable_node_id(data_dir: Path, requested: str | None = None) -> str:
    """This data directory's node id: the one kept in ``<data_dir>/node-id``, written
    the first time (``requested``, else ``<hostname>-<8 hex>``).

    InvalidArgument when ``requested`` differs from the kept one: the data belongs to
    that node, and serving it under another id would place it twice.
    """
    path = Path(data_dir) / "node-id"
    if path.exists():
        kept = path.read_text().strip()
        if requested and requested != kept:
            raise InvalidArgument(
                f"data directory {data_dir} belongs to node {kept!r}, not {requested!r}; "
                f"start it with --node-id {kept}, or give node {requested!r} another directory"
            )
        return kept
    node_id = requested or f"{socket.gethostname()}-{os.urandom(4).hex()}"
    NodeInfo(node_id, "")  # validates the id
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(node_id + "\n")
    os.replace(tmp, path)  # atomic: a crash leaves the old file or the new one
    return node_id


async def watch_nodes(etcd: Etcd) -> AsyncIterator[dict[str, NodeInfo]]:
    """Yield the live nodes (node id → NodeInfo) now and after every change.

    Survives etcd outages: nothing is yielded while etcd is lost (see
    ``kvstore.cluster.etcd.watch_range``).
    """
    prefix = etcd.keys.nodes
    async for state in watch_range(etcd, prefix, prefix=True):
        yield _registrations(prefix, ((key, entry.value) for key, entry in state.items()))


async def read_nodes(etcd: Etcd) -> dict[str, NodeInfo]:
    """The live nodes as etcd has them now (a node's watch may not have delivered a
    registration yet); Unavailable if etcd is lost."""
    prefix = etcd.keys.nodes
    with etcd.calls(f"reading {prefix.decode()}"):
        got = await etcd.client.get_range(prefix, aetcd.utils.prefix_range_end(prefix))
    return _registrations(prefix, ((kv.key, kv.value) for kv in got))


def _registrations(prefix: bytes, entries: Iterable[tuple[bytes, bytes]]) -> dict[str, NodeInfo]:
    nodes = {}
    for key, value in entries:
        try:
            nodes[key[len(prefix) :].decode()] = NodeInfo.from_json(value)
        except (ValueError, TypeError) as exc:
            log.warning("ignoring the unreadable registration at %s: %s", key.decode(), exc)
    return nodes


class Membership:
    """This node's registration (kept alive in a task) and its view of the live nodes.

    ``start()`` registers or raises (AlreadyExists, Unavailable); afterwards nothing
    raises: etcd trouble is logged and retried. ``stop()`` revokes the lease.
    """

    def __init__(self, etcd: Etcd, me: NodeInfo, ttl_s: int = DEFAULT_TTL_S) -> None:
        if ttl_s < 2:
            raise InvalidArgument(f"the membership lease TTL must be at least 2 s, not {ttl_s}")
        self.etcd = etcd
        self.me = me
        self.ttl_s = ttl_s
        self.lease_id: int | None = None
        self._nodes: dict[str, NodeInfo] = {}
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task] = []
        #: Called after the node registered again because its lease had lapsed (etcd
        #: away, or the process stopped longer than the TTL): it may have missed writes.
        self.on_registered_again: Callable[[], None] | None = None

    @property
    def nodes(self) -> Mapping[str, NodeInfo]:
        """The live nodes as last seen (kept while etcd is unreachable)."""
        return self._nodes

    async def start(self) -> None:
        """Register this node and start the keep-alive and watch tasks."""
        await self._register()
        self._tasks = [
            asyncio.create_task(self._keep_alive(), name=f"membership-keepalive-{self.me.node_id}"),
            asyncio.create_task(self._watch(), name=f"membership-watch-{self.me.node_id}"),
        ]

    async def stop(self) -> None:
        """Stop the tasks and revoke the lease, so the node leaves the live set now;
        at most STOP_TASKS_S + CALL_TIMEOUT_S + 1 s, whatever etcd does."""
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(
            tasks, STOP_TASKS_S, f"the membership tasks of node {self.me.node_id}"
        )
        if self.lease_id is not None:
            doing = f"revoking the lease of node {self.me.node_id}"
            # aetcd's call deadline bounds the revoke; this bounds the rest (a reconnect).
            if not await within(doing, self._revoke(doing), CALL_TIMEOUT_S + 1):
                log.warning(
                    "the registration of node %s lapses within %d s", self.me.node_id, self.ttl_s
                )
            self.lease_id = None

    async def _revoke(self, doing: str) -> None:
        assert self.lease_id is not None
        try:
            with self.etcd.calls(doing):
                await self.etcd.client.revoke_lease(self.lease_id)
        except Unavailable as exc:
            log.warning("%s; the registration lapses within %d s", exc, self.ttl_s)

    async def wait_for(
        self, condition: Callable[[Mapping[str, NodeInfo]], bool], timeout_s: float
    ) -> Mapping[str, NodeInfo]:
        """Wait until ``condition(nodes)`` holds; TimeoutError after ``timeout_s`` s."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: condition(self._nodes))
        return self._nodes

    async def _register(self) -> None:
        key = self.etcd.keys.node(self.me.node_id)
        value = self.me.to_json()
        tx = self.etcd.client.transactions
        doing = f"registering node {self.me.node_id}"
        with self.etcd.calls(doing):
            lease = await self.etcd.client.lease(self.ttl_s)
        try:
            while True:
                with self.etcd.calls(doing):
                    created, responses = await self.etcd.client.transaction(
                        compare=[tx.create(key) == 0],
                        success=[tx.put(key, value, lease.id)],
                        failure=[tx.get(key)],
                    )
                if created:
                    break
                if not responses[0]:
                    continue  # the holder's lease lapsed between compare and get: try again
                _, held = responses[0][0]
                holder = NodeInfo.from_json(held.value)
                if not self.me.same_node(holder):
                    raise AlreadyExists(
                        f"node id {self.me.node_id!r} is already registered in cluster "
                        f"{self.etcd.keys.cluster!r} by {holder.describe()}; give this node "
                        f"another --node-id, or stop that one first"
                    )
                # This node restarted (kill -9) before its old lease lapsed: take over.
                with self.etcd.calls(doing):
                    took, _ = await self.etcd.client.transaction(
                        compare=[tx.mod(key) == held.mod_revision],
                        success=[tx.put(key, value, lease.id)],
                        failure=[],
                    )
                if took:
                    log.info(
                        "node %s took over its registration from its previous run (pid %d)",
                        self.me.node_id,
                        holder.pid,
                    )
                    with contextlib.suppress(aetcd.exceptions.ClientError):
                        await self.etcd.client.revoke_lease(held.lease)
                    break
        except BaseException:
            with contextlib.suppress(aetcd.exceptions.ClientError):
                await self.etcd.client.revoke_lease(lease.id)
            raise
        self.lease_id = lease.id
        log.info(
            "node %s registered in cluster %r at etcd %s (lease %x, TTL %d s)",
            self.me.node_id,
            self.etcd.keys.cluster,
            self.etcd.url,
            lease.id,
            self.ttl_s,
        )

    async def _keep_alive(self) -> None:
        lost = refused = False
        while True:
            if cancel_requested():  # swallowed by a library: end as asked (kvstore.shutdown)
                raise asyncio.CancelledError
            await asyncio.sleep(self.ttl_s / 3 if not lost else RETRY_INTERVAL_S)
            try:
                alive = False
                if self.lease_id is not None:
                    reply = await self.etcd.client.refresh_lease(self.lease_id)
                    alive = reply is not None and reply.TTL > 0
                if not alive:
                    # The lease lapsed (etcd was away longer than the TTL) or etcd came
                    # back without it: register anew.
                    log.warning(
                        "node %s lost its registration in etcd at %s; registering again",
                        self.me.node_id,
                        self.etcd.url,
                    )
                    self.lease_id = None
                    await self._register()
                    if self.on_registered_again is not None:
                        self.on_registered_again()
                if lost:
                    log.warning(
                        "etcd at %s is reachable again; node %s is registered",
                        self.etcd.url,
                        self.me.node_id,
                    )
                lost = refused = False
            except (aetcd.exceptions.ClientError, Unavailable) as exc:
                if not lost:
                    log.warning(
                        "etcd at %s is unreachable (%s): node %s keeps serving with its last "
                        "view of the cluster and retries every %g s",
                        self.etcd.url,
                        exc,
                        self.me.node_id,
                        RETRY_INTERVAL_S,
                    )
                lost = True
            except AlreadyExists as exc:
                # Another process took the id while this node's lease had lapsed. Keep
                # serving (the placement still names this node) and keep saying so.
                if not refused:
                    log.error("node %s cannot register again: %s", self.me.node_id, exc)
                lost = refused = True

    async def _watch(self) -> None:
        async for nodes in watch_nodes(self.etcd):
            async with self._changed:
                self._nodes = nodes
                self._changed.notify_all()
