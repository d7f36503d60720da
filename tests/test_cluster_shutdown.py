"""A clustered node stops on SIGTERM within its grace period and a few seconds, whatever
etcd does: down, just back (its watches being made again), hanging (SIGSTOPped), or a
watch that dropped the stop's cancellation, as aetcd's watch creation does on Python
3.11 when the cancel lands as etcd answers (kvstore.shutdown). The exit status keeps
its meaning (0: stopped, databases closed) and the data is intact afterwards.

Real etcd (tests/etcd_server.py, one per test: they stop it), real node processes
(kvstore.server.process); the watch itself is also checked in-process against the real
etcd and aetcd, cancelled at every moment of its making.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cluster_fixtures import FEATURES, Cluster, check_all, feature_rows
from etcd_server import EtcdServer

from kvstore import Client
from kvstore.cluster.etcd import FAULT_WATCH_DROPS_CANCEL, connect, watch_range

ROWS = np.arange(20, dtype=np.int64)
#: The node's default grace period for in-flight calls (s).
GRACE_S = 5.0
#: A correctness bound, not a timing claim: the stop's own deadlines (leaving the
#: cluster 6 s, the grace period, 3 s per other step) fit well inside it. Without them
#: the node waited forever and NodeProcess.stop killed it at this bound.
STOP_BOUND_S = GRACE_S + 10


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd for this test alone; continued (if stopped) and stopped at the end."""
    work = tmp_path / "etcd-work"
    work.mkdir()
    server = EtcdServer(work).start()
    try:
        yield server
    finally:
        if server.running():
            os.kill(server.pid, signal.SIGCONT)
        server.stop()


@pytest.fixture
def nodes(tmp_path: Path, own_etcd: EtcdServer) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path / "nodes", own_etcd)
    with cluster:
        yield cluster


def _stops_cleanly(cluster: Cluster, node_id: str) -> None:
    node = cluster.nodes[node_id]
    assert node.stop(timeout=STOP_BOUND_S) == 0, node.log_tail()
    assert "stopped; databases closed" in node.log_tail(), node.log_tail()


def test_a_node_stops_while_etcd_hangs_and_keeps_its_data(
    own_etcd: EtcdServer, nodes: Cluster
) -> None:
    n1 = nodes.start("n1")
    with Client(n1.address, timeout=10) as client:
        client.create_table("t", features=FEATURES, shards=4)
        client.write("t", feature_rows(ROWS))
    os.kill(own_etcd.pid, signal.SIGSTOP)  # a hanging etcd: connections open, no answer
    try:
        _stops_cleanly(nodes, "n1")
        assert "the registration lapses within" in n1.log_tail()  # the revoke gave up
    finally:
        os.kill(own_etcd.pid, signal.SIGCONT)
    again = nodes.start("n1")
    with Client(again.address, timeout=10) as client:
        check_all(client.get("t", ROWS), ROWS)


def test_a_node_stops_while_etcd_is_down(own_etcd: EtcdServer, nodes: Cluster) -> None:
    nodes.start("n1")
    own_etcd.stop()
    _stops_cleanly(nodes, "n1")


def test_a_node_stops_while_its_watches_reconnect_to_an_etcd_just_back(
    own_etcd: EtcdServer, nodes: Cluster
) -> None:
    # The CI failure: etcd stopped and started, a table created, then SIGTERM while a
    # watch of the live nodes was being made again.
    n1 = nodes.start("n1")
    own_etcd.stop()
    own_etcd.start()
    with Client(n1.address, timeout=10) as client:
        client.create_table("t", features=FEATURES, shards=4, timeout=30)
        client.write("t", feature_rows(ROWS))
    own_etcd.stop()
    own_etcd.start()
    _stops_cleanly(nodes, "n1")


def test_a_watch_that_dropped_the_stops_cancellation_does_not_keep_the_node_alive(
    nodes: Cluster,
) -> None:
    # Every watch drops the first cancel, deterministically (the fault hook): before the
    # stop was bounded, the node waited for its watch tasks forever.
    nodes.start("n1", env={FAULT_WATCH_DROPS_CANCEL: "1"})
    _stops_cleanly(nodes, "n1")


def test_a_watch_cancelled_at_any_moment_of_its_making_ends(own_etcd: EtcdServer) -> None:
    # The mechanism itself, against the real etcd and aetcd: a cancel landing as etcd
    # answers the watch's creation was dropped (3 to 4 % of these tries before the fix).
    tries, spread_s, bound_s = 200, 0.004, 10.0
    random.seed(7)

    async def follow(etcd, key: bytes) -> None:
        async for _ in watch_range(etcd, key, prefix=True):
            pass

    async def scenario() -> list[int]:
        etcd = await connect(own_etcd.url, "cancels")
        kept_on = []
        try:
            for attempt in range(tries):
                task = asyncio.create_task(follow(etcd, etcd.keys.nodes))
                await asyncio.sleep(random.uniform(0, spread_s))
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=bound_s)
                if not done:
                    kept_on.append(attempt)
                    task.cancel()  # again, so that the test ends
                    await asyncio.wait({task}, timeout=bound_s)
                    break
        finally:
            await etcd.close()
        return kept_on

    assert asyncio.run(scenario()) == [], "a cancelled watch went on watching"
