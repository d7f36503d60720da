"""A node's part in keeping a table's replicas (docs/cluster.md, "Replicas").

``ReplicaKeeper`` belongs to a node's cluster agent (kvstore.cluster.agent):

* ``catch_up()``: when the node starts (before it applies its first placement, so
  before it serves anything) and when it registers again after its lease lapsed
  (``registered_again``), one CAS makes each of its Available replicas of a table with
  several replicas Initializing, copying from an Available peer that is live
  (``assignment.catch_up``): it may have missed writes the others acknowledged. The
  agent's Mover (kvstore.cluster.moves) fills them from the peer and makes them
  Available again.
* ``run()``: every ``REPLICA_CHECK_S``, re-point this node's catch-ups whose source
  went, and, on the live node with the lowest id only (so one node acts), replace the
  replicas of nodes gone longer than the grace period (``assignment.re_replicate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvstore.cluster.assignment import catch_up, re_replicate
from kvstore.cluster.placement import Placement
from kvstore.errors import Unavailable

if TYPE_CHECKING:
    from kvstore.cluster.agent import ClusterAgent

__all__ = ["REPLICA_CHECK_S", "ReplicaKeeper"]

log = logging.getLogger(__name__)

#: How often a node checks the replicas: catch-ups whose source went, nodes gone past
#: the grace period (s).
REPLICA_CHECK_S = 1.0
#: How long catch_up() waits for the membership to list this node (s).
LIVE_WAIT_S = 5.0


class ReplicaKeeper:
    """Catch-ups of this node's replicas; re-replication of nodes gone too long."""

    def __init__(self, agent: ClusterAgent, grace_s: float) -> None:
        self.agent = agent
        #: How long a node's lease may be gone before its replicas are copied elsewhere (s).
        self.grace_s = grace_s
        #: node id → when this node first saw it gone (time.monotonic()).
        self._gone_since: dict[str, float] = {}

    async def catch_up(self) -> None:
        """Make this node's replicas of tables with several replicas catch up from a live
        Available peer (one CAS, ``assignment.catch_up``). Until they finish they take
        writes and serve no reads."""
        agent = self.agent
        assert agent.membership is not None and agent.store is not None
        me = agent.me.node_id
        with contextlib.suppress(TimeoutError):
            await agent.membership.wait_for(lambda nodes: me in nodes, LIVE_WAIT_S)
        live = frozenset(agent.membership.nodes) | {me}
        written = await agent.store.update(lambda p: catch_up(p, me, live))
        if agent.view.epoch:
            await agent._take(written)

    def registered_again(self) -> None:
        """The membership registered again after this node's lease lapsed (etcd away, or
        the process stopped): writes may have been missed meanwhile."""
        task = asyncio.create_task(self._catch_up_again(), name="cluster-catch-up")
        self.agent._drops.add(task)  # cancelled by the agent's stop()
        task.add_done_callback(self.agent._drops.discard)

    async def _catch_up_again(self) -> None:
        try:
            await self.catch_up()
        except Unavailable as exc:
            log.warning(
                "node %s: cannot mark its replicas to catch up: %s", self.agent.me.node_id, exc
            )

    async def run(self) -> None:
        """Every REPLICA_CHECK_S, ``check()``; errors are logged, the next round tries again."""
        me = self.agent.me.node_id
        while True:
            await asyncio.sleep(REPLICA_CHECK_S)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Unavailable as exc:
                log.warning("node %s: replicas not checked: %s", me, exc)
            except Exception:  # the next round tries again; the node must serve on
                log.exception("node %s: checking replicas", me)

    async def check(self) -> None:
        """Re-point this node's catch-ups whose source went; on the lowest live node,
        re-replicate the nodes gone longer than the grace period."""
        agent = self.agent
        assert agent.store is not None
        me = agent.me.node_id
        placement, live = agent.view.placement, agent.view.live
        if me not in live:
            return  # etcd lost, or this node not registered: its view of who is gone is old
        now = time.monotonic()
        holders = set(placement.nodes) | {
            r.node for t in placement.tables.values() for rs in t.shards for r in rs
        }
        for node in holders - live:
            self._gone_since.setdefault(node, now)
        for node in list(self._gone_since):
            if node in live or node not in holders:
                del self._gone_since[node]
        if catch_up(placement, me, live, returning=False) != placement:
            await agent._take(await agent.store.update(lambda p: catch_up(p, me, live, False)))
        if me != min(live):
            return
        zones = {node: info.zone for node, info in agent.view.known.items()}
        for dead, since in sorted(self._gone_since.items()):
            if now - since < self.grace_s:
                continue
            if re_replicate(placement, dead, live, zones) == placement:
                continue  # nothing it can replace (no live peer or target): no etcd read
            written = await agent.store.update(_re_replicating(dead, live, zones))
            if written.epoch > placement.epoch:
                log.warning(
                    "node %s has been gone %.0f s (grace %g s): its replicas are copied to "
                    "other nodes (placement epoch %d)",
                    dead,
                    now - since,
                    self.grace_s,
                    written.epoch,
                )
            await agent._take(written)


def _re_replicating(
    dead: str, live: frozenset[str], zones: dict[str, str]
) -> Callable[[Placement], Placement]:
    """The placement change replacing ``dead``'s replicas (a closure per dead node)."""
    return lambda placement: re_replicate(placement, dead, live, zones)
