"""Reads and writes over a shard's replicas, through real node processes: a read's part
fails over at once to another replica, a slow part is hedged within the budget, a write
goes to every writable replica and is acknowledged at its quorum (docs/cluster.md,
"Reads and writes with replicas").

Most tests give the client a cluster map with two replicas per shard on two addresses
of real processes: the node itself and a TCP proxy in front of it (tests/tcp_proxy.py),
which can stop forwarding, or a node that does not hold the shard (it answers
StaleMap); the faults (kill -9, SIGSTOP, a split) run on a real cluster of three nodes
with R = 2.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
from cluster_fixtures import FEATURES, KEYS, Cluster, check_all, cluster_map, feature_rows
from etcd_server import EtcdServer, free_port
from tcp_proxy import TcpProxy

from kvstore import AsyncClient, Client, DeadlineExceeded, InvalidArgument, Unavailable
from kvstore.client import HedgePolicy
from kvstore.client.core import ClientCore, NodeCall
from kvstore.client.fast import FastConnections
from kvstore.client.health import PROBE_S, NodeHealth
from kvstore.client.routes import NoReplica, read_choice, route_from_map
from kvstore.client.sync_hedging import drive_fast
from kvstore.keys import KeyBatch
from kvstore.schema import TableSchema
from kvstore.server.process import NodeProcess, wait_until
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire.dial import open_channel

SHARDS = 4
#: An epoch above any the test nodes reach: a map refresh never replaces the test's map.
TEST_EPOCH = 1 << 40
#: Hedges after 5-20 ms; a black-holed part is answered far sooner than the deadline.
POLICY = HedgePolicy(min_delay=0.005, max_delay=0.02)
TIMEOUT_S = 10.0


def _node_info(address: str, fast: str, zone: str, state: str = "live") -> pb.NodeInfo:
    return pb.NodeInfo(node_id=address, address=address, fast_address=fast, zone=zone, state=state)


def _two_replica_map(
    table: str, nodes: list[pb.NodeInfo], replicas: Callable[[int], list[int]], shards: int
) -> pb.ClusterMap:
    """A map where shard i of ``table`` has the replicas ``replicas(i)`` (node indexes),
    all Available."""
    return pb.ClusterMap(
        epoch=TEST_EPOCH,
        nodes=nodes,
        tables=[
            pb.TableShards(
                table=table,
                owner=[replicas(i)[0] for i in range(shards)],
                replicas=[
                    pb.ShardReplicas(node=replicas(i), state=["Available"] * len(replicas(i)))
                    for i in range(shards)
                ],
            )
        ],
    )


def _wait_for_nodes(client: Client, count: int) -> None:
    """Until the map shows ``count`` live nodes (a table created then spreads over all)."""
    wait_until(
        lambda: [n["state"] for n in client.cluster_map()["nodes"]] == ["live"] * count,
        30,
        f"{count} live nodes in the map",
    )


# -- the route, read choice and quorum, from a map message ------------------------------


def test_reads_prefer_the_zone_then_the_least_busy_replica_and_writes_need_their_quorum() -> None:
    nodes = [_node_info(f"127.0.0.1:{7000 + i}", "", zone) for i, zone in enumerate("abc")]
    cmap = pb.ClusterMap(
        epoch=3,
        nodes=nodes,
        tables=[
            pb.TableShards(
                table="t",
                owner=[0, 1, 2, 0],
                replicas=[
                    pb.ShardReplicas(node=[0, 1], state=["Available", "Available"]),
                    pb.ShardReplicas(node=[1, 2], state=["Available", "Initializing"]),
                    pb.ShardReplicas(node=[2, 0], state=["Leaving", "Available"]),
                    pb.ShardReplicas(node=[0, 1, 2], state=["Available"] * 3),
                ],
            )
        ],
    )
    route = route_from_map(cmap, "127.0.0.1:7000")
    readable = route.readable["t"]
    # Available before Leaving; Initializing serves no reads but takes writes.
    assert readable.tolist() == [[0, 1, -1], [1, -1, -1], [0, 2, -1], [0, 1, 2]]
    assert sorted(route.writable["t"][1].tolist()) == [-1, 1, 2]
    assert "t" not in route.sole  # two replicas: no single-node shortcut
    health = NodeHealth(HedgePolicy())
    addresses = route.nodes

    def choice(zone: str, avoid: frozenset[str] = frozenset()) -> list[int]:
        return read_choice(route, "t", readable, avoid, health, zone, 0).tolist()

    assert choice("b") == [1, 1, 0, 1]  # zone b where a shard has one; Available first
    assert choice("c") == [0, 1, 2, 2]  # the zone first, even a Leaving replica
    health.outstanding[addresses[0]] = 5  # busy: its shards go to another replica
    assert choice("") == [1, 1, 0, 1]  # (but shard 2's other one is Leaving)
    health.outstanding[addresses[1]] = 9
    assert choice("") == [0, 1, 0, 2]
    assert choice("b") == [1, 1, 0, 1]  # the zone first, however busy
    health.outstanding.clear()
    assert choice("", frozenset({addresses[0]})) == [1, 1, 2, 1]
    with pytest.raises(NoReplica, match="shard 1"):
        choice("", frozenset({addresses[1]}))
    # A majority of each shard's readable replicas (2 of 2, 1 of 1, 2 of 3): an
    # Initializing replica takes writes but its ack does not count ...
    assert route.needed("t").tolist() == [2, 1, 2, 2]
    applied = {addresses[2]: np.array([1, 2, 3])}
    assert route.acks("t", applied).tolist() == [0, 0, 1, 1]
    # ... or fewer when the others are down; write_quorum overrides the majority.
    cmap.nodes[1].state = "down"
    cmap.tables[0].write_quorum = 1
    down = route_from_map(cmap, "127.0.0.1:7000")
    assert down.needed("t").tolist() == [1, 1, 1, 1]
    cmap.tables[0].write_quorum = 0
    assert route_from_map(cmap, "127.0.0.1:7000").needed("t").tolist() == [1, 1, 2, 2]
    # A write goes to every writable replica but the down one, each node once.
    core = ClientCore("127.0.0.1:7000", 5.0)
    core.apply_cluster_map(cmap)
    schema = TableSchema.build("t", "int64", FEATURES, SHARDS)
    keys = KeyBatch.from_values("int64", np.arange(64), "t")
    plan = core.fan_out("t", schema, keys)
    shard_of_key = keys.shard_ids(SHARDS)
    assert sorted(a for a, _, _ in plan) == [addresses[0], addresses[2]]
    for address, positions, shards in plan:
        node = addresses.index(address)
        held = [s for s in range(SHARDS) if node in route.writable["t"][s]]
        assert sorted(shards.tolist()) == held
        assert set(shard_of_key[positions].tolist()) == set(held)


def test_a_table_written_on_one_node_is_planned_as_one_call_like_the_general_fan_out() -> None:
    """Every writable replica of every shard on one live node: a write (an update
    stream's batch) is one call with every key, planned without per-node masks, the
    same plan as the general fan-out; a second writable replica (even Initializing) or
    the node marked down is the general fan-out again. What a route derives (the quorum,
    the live nodes, the sole writer) is kept per map and read-only."""
    nodes = [_node_info("a:1", "", ""), _node_info("b:1", "", "")]
    one = pb.ShardReplicas(node=[0], state=["Available"])
    table = pb.TableShards(table="t", owner=[0] * SHARDS, replicas=[one] * SHARDS)
    cmap = pb.ClusterMap(epoch=2, nodes=nodes, tables=[table])
    core = ClientCore("a:1", TIMEOUT_S)
    core.apply_cluster_map(cmap)
    schema = TableSchema.build("t", "int64", FEATURES, SHARDS)
    keys = KeyBatch.from_values("int64", np.arange(3, 40, 3), "t")
    route = core.route
    assert route.sole_writer("t") == "a:1"
    assert route.live() == {"a:1", "b:1"} and not route.gone("b:1") and route.gone("c:1")
    needed = route.needed("t")
    assert needed is route.needed("t") and not needed.flags.writeable
    plan = core.fan_out("t", schema, keys)
    general = core.fan_out("t", schema, keys, acked={})  # the per-node masks' path
    assert [(a, p, s.tolist()) for a, p, s in plan] == [
        ("a:1", None, np.unique(keys.shard_ids(SHARDS)).tolist())
    ]
    assert [(a, p, s.tolist()) for a, p, s in general] == [(a, p, s.tolist()) for a, p, s in plan]
    assert core.fan_out("t", schema, KeyBatch.from_values("int64", [], "t")) == []

    cmap.tables[0].replicas[2].CopyFrom(
        pb.ShardReplicas(node=[0, 1], state=["Available", "Initializing"])
    )
    cmap.epoch = 3
    core.apply_cluster_map(cmap)
    assert core.route.sole_writer("t") is None
    plan = core.fan_out("t", schema, keys)
    assert sorted(a for a, _, _ in plan) == ["a:1", "b:1"]
    assert dict((a, s.tolist()) for a, _, s in plan)["b:1"] == [2]

    cmap.tables[0].replicas[2].CopyFrom(one)
    cmap.nodes[0].state = "down"
    cmap.epoch = 4
    core.apply_cluster_map(cmap)
    assert core.route.sole_writer("t") is None and core.route.gone("a:1")
    assert core.fan_out("t", schema, keys) == []  # its peers catch it up, none here


def test_a_read_that_failed_on_every_replica_asks_them_again_after_the_map_refresh() -> None:
    """Client.get's own read failed on both replicas (a blip): the flow avoids them,
    finds no replica left, refreshes the map, and then reads from the new map's
    replicas instead of avoiding them for good (it raised NoReplica before)."""
    from kvstore.client.flows import Operations
    from kvstore.client.hedging import HedgedRead

    nodes = [_node_info("a:1", "", ""), _node_info("b:1", "", "")]
    shard = pb.ShardReplicas(node=[0, 1], state=["Available", "Available"])
    table = pb.TableShards(table="t", owner=[0] * SHARDS, replicas=[shard] * SHARDS)
    cmap = pb.ClusterMap(epoch=5, nodes=nodes, tables=[table])
    ops = Operations("a:1", TIMEOUT_S)
    ops.schemas["t"] = TableSchema.build("t", "int64", {"x": "int64"}, SHARDS).with_id(1)
    ops.apply_cluster_map(cmap)
    flow = ops.get_flow("t", np.arange(8), None, avoid=frozenset({"a:1", "b:1"}))
    refresh = next(flow)
    assert [c.method for c in refresh] == ["GetClusterMap"]
    assert isinstance(flow.send([cmap]), HedgedRead)


def test_a_write_refused_at_a_newer_epoch_by_an_uncounted_replica_is_judged_by_the_new_map() -> (
    None
):
    """Shard replicas on a (Available) and b (Initializing: catching up, its ack not
    counted). a applies the write; b, which already finished its catch-up and is
    Available at epoch 9, refuses the client's epoch-5 write with StaleMap. The quorum
    of the old map (a alone) is not enough: the client refreshes, and under the new map
    b counts, so the write goes to b again. (Acked on a alone, the row would be missing
    on b for good: its catch-up had ended before a took the write.)"""
    from kvstore.client.flows import Operations
    from kvstore.errors import StaleMap

    nodes = [_node_info("a:1", "", ""), _node_info("b:1", "", "")]

    def cmap(epoch: int, b_state: str) -> pb.ClusterMap:
        shard = pb.ShardReplicas(node=[0, 1], state=["Available", b_state])
        table = pb.TableShards(table="t", owner=[0] * SHARDS, replicas=[shard] * SHARDS)
        return pb.ClusterMap(epoch=epoch, nodes=nodes, tables=[table])

    ops = Operations("a:1", TIMEOUT_S)
    ops.schemas["t"] = TableSchema.build("t", "int64", {"x": "int64"}, SHARDS).with_id(1)
    ops.apply_cluster_map(cmap(5, "Initializing"))
    keys = np.arange(8, dtype=np.int64)
    flow = ops.write_flow("t", {"key": keys, "x": keys}, "key", None)
    calls = next(flow)
    assert sorted(c.address for c in calls) == ["a:1", "b:1"]
    assert all(c.request.epoch == 5 for c in calls)
    outcomes = [
        pb.WriteResponse(rows_written=8) if c.address == "a:1" else StaleMap("caught up", 9)
        for c in calls
    ]
    refresh = flow.send(outcomes)
    assert [c.method for c in refresh] == ["GetClusterMap"]
    again = flow.send([cmap(9, "Available")])
    assert [(c.address, c.request.epoch) for c in again] == [("b:1", 9)]
    with pytest.raises(StopIteration) as done:
        flow.send([pb.WriteResponse(rows_written=8)])
    assert done.value.value == 8


def test_a_node_s_hedge_delay_follows_its_latency_and_hedges_keep_to_the_budget() -> None:
    health = NodeHealth(HedgePolicy(min_delay=0.001, max_delay=0.05, budget=0.1, burst=2))
    fast, slow = "127.0.0.1:1", "127.0.0.1:2"
    assert health.hedge_delay(fast) == 0.05  # nothing known yet: the longest
    for _ in range(200):
        health.record(fast, 0.0002)
        health.record(slow, 0.010)
    assert health.hedge_delay(fast) == 0.001  # its p95 is below the floor
    assert 0.010 <= health.hedge_delay(slow) < 0.02
    health.record(slow, 0.040)  # one late answer widens its spread, within the bounds
    assert 0.010 < health.hedge_delay(slow) <= 0.05
    # The burst, then one hedge per 10 read parts.
    assert [health.spend() for _ in range(3)] == [True, True, False]
    health.earn(9)
    assert not health.spend()
    health.earn(1)
    assert health.spend() and not health.spend()
    health.earn(1000)  # capped at the burst
    assert [health.spend() for _ in range(3)] == [True, True, False]


def test_a_suspect_node_stays_suspect_until_it_answers_and_is_probed_once_at_a_time() -> None:
    health = NodeHealth(HedgePolicy())
    hung, other = "127.0.0.1:1", "127.0.0.1:2"
    health.suspect(hung)
    now = time.monotonic()
    # Suspect however long it stays silent; avoided but for a probe every PROBE_S.
    assert health.is_suspect(hung) and not health.is_suspect(other)
    assert health.suspected(hung, now)
    later = now + PROBE_S
    assert not health.suspected(hung, later) and health.is_suspect(hung)
    # One read claims the probe: the suspicion is renewed, the next read does not get it.
    assert health.probe(hung, later)
    assert not health.probe(hung, later) and health.suspected(hung, later)
    assert health.probe(hung, later + PROBE_S)
    # An answer clears it; a node never suspected needs no probe.
    health.cleared(hung)
    assert not health.is_suspect(hung) and not health.suspected(hung, later)
    assert health.probe(other, now) and not health.is_suspect(other)


def test_reads_avoid_a_suspect_replica_and_only_one_read_probes_it() -> None:
    nodes = [_node_info(f"127.0.0.1:{7000 + i}", "", "") for i in range(2)]
    cmap = _two_replica_map("t", nodes, lambda i: [0, 1], SHARDS)
    route = route_from_map(cmap, "127.0.0.1:7000")
    readable = route.readable["t"]
    health = NodeHealth(HedgePolicy())
    hung = route.nodes[0]

    def choice() -> list[int]:
        return read_choice(route, "t", readable, frozenset(), health, "", 0).tolist()

    assert choice() == [0] * SHARDS  # the client's own order first
    health.suspect(hung)
    assert choice() == [1] * SHARDS  # avoided while suspect
    # Its probe is due: one read goes to it, and renews the suspicion ...
    health.suspects[hung] -= PROBE_S
    assert choice() == [0] * SHARDS
    assert health.suspected(hung, time.monotonic())
    assert choice() == [1] * SHARDS  # ... so the next reads keep away
    # Every replica suspect: the read goes to one and renews it, the next to the other.
    health.suspect(route.nodes[1])
    first = choice()[0]
    assert choice() == [1 - first] * SHARDS
    # An answer clears it.
    health.cleared(hung)
    assert choice() == [0] * SHARDS


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"min_delay": 0.0}, "hedge delays"),
        ({"min_delay": 0.01, "max_delay": 0.005}, "hedge delays"),
        ({"max_delay": float("inf")}, "hedge delays"),
        ({"budget": -0.1}, "hedge budget"),
        ({"budget": 1.5}, "hedge budget"),
        ({"burst": -1.0}, "hedge burst"),
        ({"burst": float("inf")}, "hedge burst"),
    ],
)
def test_a_hedge_policy_refuses_delays_out_of_order_and_a_budget_outside_0_to_1(
    kwargs: dict[str, float], named: str
) -> None:
    with pytest.raises(InvalidArgument, match=named):
        HedgePolicy(**kwargs)  # type: ignore[arg-type]


class _TwoCallsToOneNode:
    """A read whose two calls go to one node at once, as a failover or a hedge sent to a
    node that has a call of the read waiting: the part of HedgedRead drive_fast uses."""

    def __init__(self, core: ClientCore, calls: list[NodeCall]) -> None:
        self.core = core
        self.calls = calls
        self.got: dict[int, object] = {}

    def start(self) -> list[int]:
        return [0, 1]

    @property
    def done(self) -> bool:
        return len(self.got) == len(self.calls)

    def next_due(self) -> float:
        return math.inf

    def answered(self, call_id: int, outcome: object) -> list[int]:
        self.got[call_id] = outcome
        return []

    def hedge(self) -> list[int]:
        return []


def test_two_calls_of_a_read_to_one_node_go_on_fast_connections_of_their_own(
    client: Client, shared_node: NodeProcess, table_name: str
) -> None:
    # A blocking connection reads one answer per receive: a second request on it had its
    # answer land in the same receive ("bytes after an answer"), failing a live node.
    client.create_table(table_name, key="int64", features={"x": "int32"}, shards=2)
    client.write(table_name, {"key": [1, 2], "x": [10, 20]})
    fast = cluster_map(shared_node.address).nodes[0].fast_address
    keys = KeyBatch.from_values("int64", [1, 2], table_name).to_proto()
    request = pb.GetRequest(table=table_name, keys=keys, features=["x"])
    calls = [NodeCall(shared_node.address, "Get", request) for _ in range(2)]
    read = _TwoCallsToOneNode(ClientCore(shared_node.address, TIMEOUT_S), calls)
    connections = FastConnections()
    used: list[object] = []
    send = connections._send

    def recording_send(conn, *args):  # type: ignore[no-untyped-def]
        used.append(conn)
        return send(conn, *args)

    connections._send = recording_send  # type: ignore[method-assign]
    try:
        drive_fast(read, connections, {shared_node.address: fast}, TIMEOUT_S)  # type: ignore[arg-type]
    finally:
        connections.close()
    assert len(used) == 2 and used[0] is not used[1]
    assert all(isinstance(r, pb.GetResponse) for r in read.got.values()), read.got


# -- failover and hedging against a node and a proxy in front of it ----------------------


@pytest.fixture
def proxied(
    start_node: Callable[..., NodeProcess],
) -> Iterator[tuple[NodeProcess, TcpProxy, TcpProxy, str]]:
    """A node with a table of 4 shards, its rows written, and TCP proxies in front of
    its gRPC and fast-path ports."""
    node = start_node()
    table = "proxied"
    with Client(node.address, timeout=TIMEOUT_S) as client:
        client.create_table(table, key="int64", features=FEATURES, shards=SHARDS)
        client.write(table, feature_rows(KEYS))
    real = cluster_map(node.address)
    fast = real.nodes[0].fast_address
    assert fast, "the node serves no fast read path"
    grpc_proxy = TcpProxy(node.address).start()
    fast_proxy = TcpProxy(fast.replace("0.0.0.0", "127.0.0.1")).start()
    try:
        yield node, grpc_proxy, fast_proxy, table
    finally:
        grpc_proxy.stop()
        fast_proxy.stop()


def _proxy_map(
    node: NodeProcess, grpc_proxy: TcpProxy, fast_proxy: TcpProxy, table: str, down: bool = False
) -> pb.ClusterMap:
    """Every shard on two replicas: the proxy (zone near, preferred) and the node."""
    real = cluster_map(node.address)
    nodes = [
        _node_info(grpc_proxy.address, fast_proxy.address, "near", "down" if down else "live"),
        _node_info(node.address, real.nodes[0].fast_address, "far"),
    ]
    return _two_replica_map(table, nodes, lambda i: [0, 1], SHARDS)


def _client(
    node: NodeProcess, transport: str, cmap: pb.ClusterMap, policy: HedgePolicy = POLICY
) -> Client:
    client = Client(
        node.address, timeout=TIMEOUT_S, transport=transport, zone="near", hedging=policy
    )
    client.describe_table(cmap.tables[0].table)
    client._ops.apply_cluster_map(cmap)
    return client


@pytest.mark.parametrize("transport", ["auto", "grpc"])
def test_a_read_fails_over_at_once_from_a_replica_that_cannot_be_reached(
    proxied: tuple[NodeProcess, TcpProxy, TcpProxy, str], transport: str
) -> None:
    node, grpc_proxy, fast_proxy, table = proxied
    cmap = _proxy_map(node, grpc_proxy, fast_proxy, table)
    with _client(node, transport, cmap) as client:
        check_all(client.get(table, KEYS), KEYS)  # through the proxy, the preferred replica
        assert client.counters()["failovers"] == 0
        dead = f"127.0.0.1:{free_port()}"  # nothing listens: refused at once
        cmap.nodes[0].address = cmap.nodes[0].fast_address = dead
        client._ops.apply_cluster_map(cmap)
        for _ in range(3):
            check_all(client.get(table, KEYS), KEYS)
        assert client.counters()["failovers"] >= 1
        # The map's other replica may not be marked down: a write cannot reach its
        # quorum (2 of 2) and says which shards and nodes.
        with pytest.raises(Unavailable, match=r"no quorum on shard\(s\) 0, 1, 2, 3.*" + dead):
            client.write(table, feature_rows(KEYS[:100]))
        # Marked down, it is not waited for: the write is acknowledged by the node alone.
        cmap.nodes[0].state = "down"
        cmap.epoch += 1
        client._ops.apply_cluster_map(cmap)
        rows = feature_rows(KEYS[:100])
        rows["clicks"] = rows["clicks"] + 1
        assert client.write(table, rows) == 100
        assert (client.get(table, KEYS[:100]).to_numpy()["clicks"] == KEYS[:100] * 3 + 1).all()


def test_a_read_fails_over_from_a_node_that_does_not_hold_the_shard(
    tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer
) -> None:
    with Cluster(tmp_path_factory.mktemp("stale"), etcd) as cluster:
        n0 = cluster.start("n0")
        cluster.start("n1")
        table = "stale"
        with Client(n0.address, timeout=TIMEOUT_S) as writer:
            _wait_for_nodes(writer, 2)
            writer.create_table(table, key="int64", features=FEATURES, shards=SHARDS)
            writer.write(table, feature_rows(KEYS))
        real = cluster_map(n0.address)
        owners = list(next(t for t in real.tables if t.table == table).owner)
        assert len(set(owners)) == 2, "the table should be spread over both nodes"
        # The shards n0 holds get n1 as a second replica, preferred (zone near):
        # n1 answers them StaleMap, and the read goes on to n0.
        zones = {n0.address: "far"}
        nodes = [
            _node_info(n.address, n.fast_address, zones.get(n.address, "near")) for n in real.nodes
        ]
        for info, holder in zip(nodes, real.nodes, strict=True):
            info.node_id = holder.node_id
        i0 = [n.address for n in real.nodes].index(n0.address)
        cmap = _two_replica_map(
            table, nodes, lambda i: [1 - i0, i0] if owners[i] == i0 else [owners[i]], SHARDS
        )
        shards = KeyBatch.from_values("int64", KEYS, table).shard_ids(SHARDS)
        mine = KEYS[np.array([owners[s] == i0 for s in shards])]
        for transport in ("auto", "grpc"):
            with Client(n0.address, timeout=TIMEOUT_S, transport=transport, zone="near") as client:
                client.describe_table(table)
                client._ops.apply_cluster_map(cmap)
                for _ in range(3):
                    check_all(client.get(table, mine), mine)
                assert client.counters()["failovers"] >= 1


@pytest.mark.parametrize("transport", ["auto", "grpc"])
def test_a_black_holed_replica_is_hedged_within_the_hedge_delay(
    proxied: tuple[NodeProcess, TcpProxy, TcpProxy, str], transport: str
) -> None:
    node, grpc_proxy, fast_proxy, table = proxied
    cmap = _proxy_map(node, grpc_proxy, fast_proxy, table)
    with _client(node, transport, cmap) as client:
        for _ in range(20):  # latency samples of both replicas
            check_all(client.get(table, KEYS[:100]), KEYS[:100])
        grpc_proxy.blackhole()
        fast_proxy.blackhole()
        took = []
        for _ in range(20):
            start = time.monotonic()
            check_all(client.get(table, KEYS[:100]), KEYS[:100])
            took.append(time.monotonic() - start)
        counters = client.counters()
        assert counters["hedges_sent"] >= 1 and counters["hedges_won"] >= 1, counters
        # Far below the 10 s deadline: a hedge answered (after at most 20 ms), and the
        # reads after it avoid the node that stopped answering.
        assert max(took) < 2.0, took
        # It stays suspect while it does not answer: a read a second probes it, and
        # that read's hedge is not charged to the budget.
        health = client._ops.health
        proxy = cmap.nodes[0].address
        assert health.is_suspect(proxy)

        def read_until(condition: Callable[[], bool]) -> bool:
            check_all(client.get(table, KEYS[:100]), KEYS[:100])
            return condition()

        wait_until(
            lambda: read_until(lambda: client.counters()["hedges_off_budget"] >= 1),
            10 * PROBE_S,
            "a probe of the black-holed replica, hedged off the budget",
        )
        assert health.is_suspect(proxy)
        # Healed, it answers its next probe and is read from again.
        grpc_proxy.heal()
        fast_proxy.heal()
        wait_until(
            lambda: read_until(lambda: not health.is_suspect(proxy)),
            10 * PROBE_S,
            "the healed replica cleared by an answer",
        )
        for _ in range(5):
            check_all(client.get(table, KEYS[:100]), KEYS[:100])
        assert not health.is_suspect(proxy)


def test_hedges_stop_at_the_budget_but_for_a_node_that_stalls(
    proxied: tuple[NodeProcess, TcpProxy, TcpProxy, str],
) -> None:
    """With a budget of 0 no hedge is sent to a node that is slow: a black-holed part
    waits, and the refusal is counted; once its call has been out for the stall time
    (10 x max_delay) the node is suspect and the hedge goes, off the budget."""
    node, grpc_proxy, fast_proxy, table = proxied
    cmap = _proxy_map(node, grpc_proxy, fast_proxy, table)
    policy = HedgePolicy(min_delay=0.005, max_delay=0.02, budget=0.0, burst=0.0)
    stall = NodeHealth(policy).stall_s()
    with _client(node, "grpc", cmap, policy) as client:
        check_all(client.get(table, KEYS[:10]), KEYS[:10])
        grpc_proxy.blackhole()
        start = time.monotonic()
        with pytest.raises(Exception, match="deadline"):
            client.get(table, KEYS[:10], timeout=stall / 2)
        assert time.monotonic() - start >= stall / 2
        counters = client.counters()
        assert counters["hedges_sent"] == 0 and counters["budget_exhausted"] >= 1, counters
        start = time.monotonic()
        check_all(client.get(table, KEYS[:10]), KEYS[:10])
        assert stall <= time.monotonic() - start < TIMEOUT_S / 2
        counters = client.counters()
        assert counters["hedges_sent"] == counters["hedges_off_budget"] == 1, counters
        # Suspect now: reads go to the other replica, none waits for the stall again.
        start = time.monotonic()
        for _ in range(5):
            check_all(client.get(table, KEYS[:10]), KEYS[:10])
        assert time.monotonic() - start < stall * 5
        grpc_proxy.heal()


@pytest.mark.parametrize("transport", ["auto", "grpc"])
def test_a_write_waits_for_a_hung_replica_within_its_deadline_and_names_it(
    proxied: tuple[NodeProcess, TcpProxy, TcpProxy, str], transport: str
) -> None:
    """R = 2, one replica black-holed and not marked down: no quorum (2 of 2). The write
    asks it again in rounds, refreshing the map between them, and fails at its
    deadline naming it, not later; marked down, the other replica's ack is enough."""
    node, grpc_proxy, fast_proxy, table = proxied
    cmap = _proxy_map(node, grpc_proxy, fast_proxy, table)
    with _client(node, transport, cmap) as client:
        rows = feature_rows(KEYS[:100])
        assert client.write(table, rows) == 100
        grpc_proxy.blackhole()
        deadline = 1.0
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="no quorum.*" + grpc_proxy.address):
            client.write(table, rows, timeout=deadline)
        took = time.monotonic() - start
        # Its rounds (half, a quarter, a quarter) fill the deadline; map refreshes from
        # the node, on its own, take milliseconds.
        assert deadline * 0.9 <= took < deadline + 2.0, took
        assert client.counters()["write_retries"] == 2
        cmap.nodes[0].state = "down"
        cmap.epoch += 1
        client._ops.apply_cluster_map(cmap)
        rows["clicks"] = rows["clicks"] + 1
        assert client.write(table, rows, timeout=deadline) == 100
        grpc_proxy.heal()
        assert (client.get(table, KEYS[:100]).to_numpy()["clicks"] == KEYS[:100] * 3 + 1).all()


def test_the_async_client_fails_over_and_hedges(
    proxied: tuple[NodeProcess, TcpProxy, TcpProxy, str],
) -> None:
    node, grpc_proxy, fast_proxy, table = proxied
    cmap = _proxy_map(node, grpc_proxy, fast_proxy, table)

    async def main() -> dict[str, int]:
        async with AsyncClient(
            node.address, timeout=TIMEOUT_S, zone="near", hedging=POLICY
        ) as client:
            await client.describe_table(table)
            client._ops.apply_cluster_map(cmap)
            for _ in range(10):
                check_all(await client.get(table, KEYS[:100]), KEYS[:100])
            grpc_proxy.blackhole()
            fast_proxy.blackhole()
            start = time.monotonic()
            results = await asyncio.gather(*(client.get(table, KEYS[:100]) for _ in range(8)))
            assert time.monotonic() - start < 2.0
            for result in results:
                check_all(result, KEYS[:100])
            grpc_proxy.heal()
            fast_proxy.heal()
            dead = f"127.0.0.1:{free_port()}"
            cmap.nodes[0].address = cmap.nodes[0].fast_address = dead
            client._ops.apply_cluster_map(cmap)
            check_all(await client.get(table, KEYS), KEYS)
            return client.counters()

    counters = asyncio.run(main())
    assert counters["hedges_won"] >= 1 and counters["failovers"] >= 1, counters


# -- a real cluster with R = 2 (runs once the nodes place replicas) ----------------------


@pytest.fixture
def replicated(
    tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer
) -> Iterator[tuple[Cluster, str]]:
    """Three nodes and a table with 2 replicas per shard, its rows written."""
    with Cluster(tmp_path_factory.mktemp("replicated"), etcd) as cluster:
        for i in range(3):
            cluster.start(f"n{i}")
        table = "replicated"
        first = next(iter(cluster.nodes.values()))
        with Client(first.address, timeout=TIMEOUT_S) as client:
            _wait_for_nodes(client, 3)
            client.create_table(table, key="int64", features=FEATURES, shards=12, replicas=2)
            assert all(len(r) == 2 for r in _replica_lists(first.address, table))
            client.write(table, feature_rows(KEYS))
        yield cluster, table


@dataclass
class _Load:
    """What _load's readers and writers did."""

    reads: int = 0
    #: Reads that failed, and writes that missed their deadline or quorum (repr).
    failures: list[str] = field(default_factory=list)
    write_failures: list[str] = field(default_factory=list)
    #: Read latencies (s), and of the acknowledged writes (s).
    latencies: list[float] = field(default_factory=list)
    write_latencies: list[float] = field(default_factory=list)
    #: key → clicks of each acked write.
    acked: dict[int, int] = field(default_factory=dict)
    #: The readers' Client.counters(), summed.
    counters: Counter[str] = field(default_factory=Counter)


def _load(
    cluster: Cluster,
    table: str,
    seconds: float,
    fault: Callable[[], None],
    policy: HedgePolicy = POLICY,
) -> _Load:
    """8 reader and 2 writer threads for ``seconds``, ``fault()`` a third of the way in;
    the readers hedge by ``policy``."""
    address = next(iter(cluster.nodes.values())).address
    stop = threading.Event()
    done = _Load()
    failures, latencies, acked = done.failures, done.latencies, done.acked
    lock = threading.Lock()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with Client(address, timeout=TIMEOUT_S, hedging=policy) as client:
            while not stop.is_set():
                keys = rng.choice(KEYS, 100, replace=False)
                start = time.monotonic()
                try:
                    result = client.get(table, keys)
                    assert result.found.all()
                except Exception as exc:
                    with lock:
                        failures.append(repr(exc))
                    continue
                with lock:
                    latencies.append(time.monotonic() - start)
                    done.reads += 1
            with lock:
                done.counters.update(client.counters())

    def writer(part: int) -> None:
        keys = KEYS[part::2]
        version = 0
        with Client(address, timeout=TIMEOUT_S) as client:
            while not stop.is_set():
                version += 1
                batch = keys[(version * 16) % len(keys) :][:16]
                start = time.monotonic()
                try:
                    client.write(table, {"key": batch, "clicks": batch * 3 + version})
                except (Unavailable, DeadlineExceeded) as exc:
                    with lock:  # not acknowledged: nothing promised
                        done.write_failures.append(repr(exc))
                    continue
                with lock:
                    done.write_latencies.append(time.monotonic() - start)
                    acked.update((int(k), int(k) * 3 + version) for k in batch)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(seconds / 3)  # the load runs before the fault (a duration, not a sync)
    fault()
    time.sleep(2 * seconds / 3)
    stop.set()
    for t in threads:
        t.join(TIMEOUT_S * 2)
    return done


def _replica_lists(address: str, table: str) -> list[list[tuple[int, str]]]:
    """Per shard of ``table``, its replicas as (node index, state), from the map."""
    entry = next(t for t in cluster_map(address).tables if t.table == table)
    return [list(zip(r.node, r.state, strict=True)) for r in entry.replicas]


def _check_on_every_replica(cluster: Cluster, table: str, acked: dict[int, int]) -> None:
    """Each acked row, read from every live Available replica of its shard directly:
    found, with the acked value or a later one."""
    live = {n.address for n in cluster.nodes.values() if n.running()}
    seed = next(iter(live))
    cmap = cluster_map(seed)
    keys = np.array(sorted(acked), dtype=np.int64)
    expected = np.array([acked[int(k)] for k in keys])
    shards = KeyBatch.from_values("int64", keys, table).shard_ids(12)
    checked = 0
    with Client(seed, timeout=TIMEOUT_S) as client:
        client.describe_table(table)
        plan = client._ops.get_plan(client._ops.schemas[table], ["clicks"])
        for shard, replicas in enumerate(_replica_lists(seed, table)):
            mask = shards == shard
            if not mask.any():
                continue
            batch = KeyBatch.from_values("int64", keys[mask], table)
            for index, state in replicas:
                address = cmap.nodes[index].address
                if state != "Available" or address not in live:
                    continue
                request = pb.GetRequest(table=table, keys=batch.to_proto(), features=["clicks"])
                channel = open_channel(address)
                try:
                    response = pb_grpc.FeatureStoreStub(channel).Get(request, timeout=TIMEOUT_S)
                finally:
                    channel.close()
                result = client._ops.finish_one(table, plan, batch, address, response)
                assert result.found.all(), (address, shard)
                assert (result.to_numpy()["clicks"] >= expected[mask]).all(), (address, shard)
                checked += 1
    assert checked >= 12  # every shard on at least one live replica


def test_kill_9_of_one_of_three_nodes_fails_no_read_and_loses_no_acked_write(
    replicated: tuple[Cluster, str],
) -> None:
    cluster, table = replicated
    victim = list(cluster.nodes.values())[2]
    load = _load(cluster, table, 6.0, victim.kill)
    assert load.reads > 0 and not load.failures, load.failures[:5]
    _check_on_every_replica(cluster, table, load.acked)


#: No hedge budget at all, as when a loaded cluster's slow calls have spent it.
SPENT = HedgePolicy(min_delay=0.005, max_delay=0.02, budget=0.0, burst=0.0)


@pytest.mark.parametrize("policy", [POLICY, SPENT], ids=["budget", "budget-spent"])
def test_a_sigstopped_node_is_hedged_around(
    replicated: tuple[Cluster, str], policy: HedgePolicy
) -> None:
    """Reads go on within the hedge delay plus a call, even with the budget spent: a
    hedge away from a node suspect of hanging (a hedge beat it, or it held a call for
    the stall time) costs no budget; writes are acknowledged by the replica left once
    the map marks the node down."""
    cluster, table = replicated
    victim = list(cluster.nodes.values())[2]
    try:
        load = _load(cluster, table, 6.0, lambda: os.kill(victim.pid, signal.SIGSTOP), policy)
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    print(
        f"reads {load.reads} failed {len(load.failures)} "
        f"p99 {np.percentile(load.latencies, 99):.3f} max {max(load.latencies):.3f} "
        f"writes {len(load.write_latencies)} failed {len(load.write_failures)} "
        f"{load.write_failures[:1]} {dict(load.counters)}"
    )
    assert load.reads > 0 and not load.failures, load.failures[:5]
    # Reads keep their p99 within the hedge delay plus a call (a generous bound on a
    # shared 2-core machine; the benchmark measures it).
    assert float(np.percentile(load.latencies, 99)) < 1.0
    # The hung node stayed suspect, probed a read at a time: a probe's part was hedged
    # off the budget, or failed over (its fast-path connection timed out).
    probed = load.counters["hedges_off_budget"] + load.counters["failovers"]
    assert probed >= 1, load.counters
    # R = 2 acks a write on both replicas, or on one once the other is marked down (its
    # lease lapsed, 5 s here): the writes stalled on the hung node are acknowledged
    # then, within their deadline, not failed at its end.
    assert load.write_latencies and not load.write_failures, load.write_failures[:5]
    assert max(load.write_latencies) < TIMEOUT_S


def test_a_split_between_client_and_node_is_hedged_around(replicated: tuple[Cluster, str]) -> None:
    cluster, table = replicated
    first = next(iter(cluster.nodes.values()))
    real = cluster_map(first.address)
    victim = real.nodes[2]
    grpc_proxy = TcpProxy(victim.address).start()
    fast_proxy = TcpProxy(victim.fast_address).start()
    try:
        real.nodes[2].address, real.nodes[2].fast_address = grpc_proxy.address, fast_proxy.address
        real.epoch = TEST_EPOCH
        with Client(first.address, timeout=TIMEOUT_S, hedging=POLICY) as client:
            client.describe_table(table)
            client._ops.apply_cluster_map(real)
            check_all(client.get(table, KEYS), KEYS)
            grpc_proxy.blackhole()
            fast_proxy.blackhole()
            start = time.monotonic()
            for _ in range(10):
                check_all(client.get(table, KEYS), KEYS)
            assert time.monotonic() - start < 5.0
    finally:
        grpc_proxy.stop()
        fast_proxy.stop()


def test_the_map_refresh_follows_a_node_that_dies_under_r1(
    tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer
) -> None:
    """R = 1: a write to a dead node's shards reaches no quorum and names them; reads
    of the other shards go on; a table call fails over from a dead seed to another node."""
    with Cluster(tmp_path_factory.mktemp("r1"), etcd) as cluster:
        n0, n1 = cluster.start("n0"), cluster.start("n1")
        table = "r1"
        with Client(n0.address, timeout=TIMEOUT_S) as client:
            _wait_for_nodes(client, 2)
            client.create_table(table, key="int64", features=FEATURES, shards=SHARDS)
            client.write(table, feature_rows(KEYS))
            owners = client.cluster_map()["tables"][table]
            n1_index = [n["address"] for n in client.cluster_map()["nodes"]].index(n1.address)
            n1.kill()
            with pytest.raises(Unavailable, match="no quorum on shard"):
                client.write(table, feature_rows(KEYS))
            shards = KeyBatch.from_values("int64", KEYS, table).shard_ids(SHARDS)
            alive = KEYS[np.array([owners[s] != n1_index for s in shards])]
            check_all(client.get(table, alive), alive)
        with Client(n1.address, timeout=TIMEOUT_S) as client:  # the seed is dead
            client._ops.apply_cluster_map(cluster_map(n0.address))
            assert client.describe_table(table).schema.name == table
