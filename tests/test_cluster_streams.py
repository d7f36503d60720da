"""An update stream follows the cluster map: a node that restarts on other ports
mid-stream gets the stream's batches again, and nothing is lost or applied wrong.

On a table with two replicas per shard, a batch is acknowledged at the write quorum:
a kill -9 of one replica ends nothing, and every acknowledged row is on the replica left
and, once the killed node is back and caught up, on it too.

Real etcd and two node processes on 127.0.0.1 (tests/cluster_fixtures.py). The batches
a node had not acknowledged are made certain by stopping it (SIGSTOP) while they are
sent, then killing it: they reached no disk, and only a resend can land them.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from cluster_fixtures import FEATURES, SHARDS, Cluster, cluster_map, placed_replicas

from kvstore import AsyncClient, Client
from kvstore.client.flows import Operations
from kvstore.client.stream_acks import Rerouting
from kvstore.errors import StaleMap, Unavailable
from kvstore.keys import KeyBatch
from kvstore.schema import TableSchema
from kvstore.server.process import NodeProcess, wait_until
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire.dial import open_channel

KEYS = np.arange(2_000, dtype=np.int64)
BATCHES = 20


@pytest.fixture
def two(cluster: Cluster) -> Cluster:
    cluster.start("n0")
    cluster.start("n1")
    return cluster


def clicks_of(round_: int, keys: np.ndarray) -> np.ndarray:
    return keys * 10 + round_


def send_round(stream, round_: int) -> None:
    """Every key once, in BATCHES batches, with clicks that name the round."""
    for part in np.array_split(KEYS, BATCHES):
        stream.send({"key": part, "clicks": clicks_of(round_, part)})


def restart_on_new_ports(cluster: Cluster, node_id: str, probe: Client) -> NodeProcess:
    old = cluster.nodes[node_id]
    old.kill()
    new = cluster.start(node_id)  # same id and data directory, new ports
    assert new.address != old.address

    def seed_knows_new_address() -> bool:
        nodes = probe.cluster_map()["nodes"]
        return any(n["node_id"] == node_id and n["address"] == new.address for n in nodes)

    wait_until(seed_knows_new_address, 30, f"{node_id}'s new address in the seed's map")
    return new


def test_batches_a_node_never_acknowledged_are_sent_again_once_it_is_back(two: Cluster) -> None:
    n0, n1 = two.nodes["n0"], two.nodes["n1"]
    with Client(n0.address, timeout=10) as client, Client(n0.address, timeout=10) as probe:
        client.create_table("followed", key="int64", features=FEATURES, shards=SHARDS)
        owners = {n["address"] for n in client.cluster_map()["nodes"]}
        assert owners == {n0.address, n1.address}
        with client.update_stream("followed", max_in_flight=4 * BATCHES) as stream:
            send_round(stream, 1)
            stream.flush()
            assert stream.rows_acked == len(KEYS)
            # n1 takes round 2 into its socket but applies none of it, then dies.
            n1.proc.send_signal(signal.SIGSTOP)
            send_round(stream, 2)
            restart_on_new_ports(two, "n1", probe)
            send_round(stream, 3)
            stream.flush()
            # Round 3 follows round 2 everywhere: a resent batch keeps its older event
            # time, so it never overwrites the newer round.
        got = client.get("followed", KEYS)
        assert got.found.all()
        np.testing.assert_array_equal(got.to_numpy()["clicks"], clicks_of(3, KEYS))


def test_a_round_sent_only_while_the_node_was_away_lands_once_it_is_back(two: Cluster) -> None:
    n0, n1 = two.nodes["n0"], two.nodes["n1"]
    with Client(n0.address, timeout=10) as client, Client(n0.address, timeout=10) as probe:
        client.create_table("resent", key="int64", features=FEATURES, shards=SHARDS)
        stream = client.update_stream("resent", max_in_flight=4 * BATCHES)
        send_round(stream, 1)
        stream.flush()
        n1.proc.send_signal(signal.SIGSTOP)
        send_round(stream, 2)
        restart_on_new_ports(two, "n1", probe)
        stream.close()  # the flush in close() reroutes and sends round 2 again
        got = client.get("resent", KEYS)
        assert got.found.all()
        np.testing.assert_array_equal(got.to_numpy()["clicks"], clicks_of(2, KEYS))


def test_a_node_that_stays_away_ends_the_stream_with_unavailable(two: Cluster) -> None:
    n0, n1 = two.nodes["n0"], two.nodes["n1"]
    with Client(n0.address, timeout=10) as client:
        client.create_table("lost", key="int64", features=FEATURES, shards=SHARDS)
        stream = client.update_stream("lost", max_in_flight=4 * BATCHES)
        send_round(stream, 1)
        stream.flush()
        n1.kill()
        # One refresh and one resend to what the map says, then the error: never a hang.
        with pytest.raises(Unavailable, match=re.escape(n1.address)):
            send_round(stream, 2)
            stream.flush(timeout=30)


def test_the_async_stream_follows_the_map_too(two: Cluster) -> None:
    n0, n1 = two.nodes["n0"], two.nodes["n1"]

    async def scenario() -> None:
        async with AsyncClient(n0.address, timeout=10) as client:
            await client.create_table(
                "async_followed", key="int64", features=FEATURES, shards=SHARDS
            )
            stream = await client.update_stream("async_followed", max_in_flight=4 * BATCHES)
            async with stream:
                for part in np.array_split(KEYS, BATCHES):
                    await stream.send({"key": part, "clicks": clicks_of(1, part)})
                await stream.flush()
                n1.proc.send_signal(signal.SIGSTOP)
                for part in np.array_split(KEYS, BATCHES):
                    await stream.send({"key": part, "clicks": clicks_of(2, part)})
                with Client(n0.address, timeout=10) as probe:
                    await asyncio.to_thread(restart_on_new_ports, two, "n1", probe)
                for part in np.array_split(KEYS, BATCHES):
                    await stream.send({"key": part, "clicks": clicks_of(3, part)})
                await stream.flush()
            got = await client.get("async_followed", KEYS)
            assert got.found.all()
            np.testing.assert_array_equal(got.to_numpy()["clicks"], clicks_of(3, KEYS))

    asyncio.run(scenario())


def test_a_stream_open_across_a_drain_sends_to_the_new_owner(two: Cluster) -> None:
    """The node drained refuses the stream's next parts with StaleMap (it holds the
    shards no more): the stream refreshes its map and sends them to n0."""
    n0, n1 = two.nodes["n0"], two.nodes["n1"]
    with Client(n0.address, timeout=10) as client:
        client.create_table("drained", key="int64", features=FEATURES, shards=SHARDS)
        with client.update_stream("drained", max_in_flight=4 * BATCHES) as stream:
            send_round(stream, 1)
            stream.flush()
            drain = [sys.executable, "-m", "kvstore.cli", "drain", "n1", "-a", n0.address]
            out = subprocess.run(drain, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stdout + out.stderr
            send_round(stream, 2)
            stream.flush()
        cmap = client.cluster_map()
        assert {cmap["nodes"][i]["node_id"] for i in cmap["tables"]["drained"]} == {"n0"}
        got = client.get("drained", KEYS)
        assert got.found.all()
        np.testing.assert_array_equal(got.to_numpy()["clicks"], clicks_of(2, KEYS))
    assert n1.running()


# -- two replicas per shard: acknowledged at the quorum ---------------------------------


def two_replicas(client: Client, table: str) -> None:
    """Create ``table`` with two replicas per shard once the map shows both nodes live;
    check that every shard has them."""
    wait_until(
        lambda: [n["state"] for n in client.cluster_map()["nodes"]] == ["live"] * 2,
        30,
        "2 live nodes in the map",
    )
    client.create_table(table, key="int64", features=FEATURES, shards=SHARDS, replicas=2)
    replicas = placed_replicas(cluster_map(client._ops.seed), table)
    assert all(sorted(r.node for r in shard) == ["n0", "n1"] for shard in replicas)


def live_in_map(seed: str, node_id: str) -> bool:
    return any(n.node_id == node_id and n.state == "live" for n in cluster_map(seed).nodes)


def clicks_on(client: Client, address: str, table: str) -> np.ndarray:
    """The clicks of every key of KEYS as the node at ``address`` alone holds them (it
    holds a replica of every shard); fails on a key it does not hold."""
    batch = KeyBatch.from_values("int64", KEYS, table)
    plan = client._ops.get_plan(client._ops.schemas[table], ["clicks"])
    request = pb.GetRequest(table=table, keys=batch.to_proto(), features=["clicks"])
    with open_channel(address) as channel:
        response = pb_grpc.FeatureStoreStub(channel).Get(request, timeout=10)
    result = client._ops.finish_one(table, plan, batch, address, response)
    assert result.found.all(), f"{address} misses {int((~result.found).sum())} keys"
    return result.to_numpy()["clicks"]


def caught_up(seed: str, table: str, node_id: str, address: str) -> bool:
    """True once ``node_id`` is live at ``address`` and every shard of ``table`` has both
    replicas Available (the returned node caught up from its peer)."""
    cmap = cluster_map(seed)
    if not any(n.node_id == node_id and n.address == address for n in cmap.nodes):
        return False
    replicas = placed_replicas(cmap, table)
    return all(len(r) == 2 and all(p.state == "Available" for p in r) for r in replicas)


def back_and_caught_up(cluster: Cluster, table: str, node_id: str) -> NodeProcess:
    """Start ``node_id`` again and wait until its replicas of ``table`` caught up."""
    node = cluster.start(node_id)
    seed = cluster.nodes["n0"].address
    wait_until(lambda: caught_up(seed, table, node_id, node.address), 60, f"{node_id} caught up")
    return node


def test_a_stream_on_two_replicas_goes_on_through_a_kill_9_of_one(two: Cluster) -> None:
    """The sends after the kill do not raise, though the map lists the dead node live
    for its lease (5 s); flush returns once the map marks it down and the replica left
    is the quorum. Every acknowledged row is on both replicas in the end."""
    n0, n1 = two.nodes["n0"], two.nodes["n1"]
    with Client(n0.address, timeout=10) as client:
        two_replicas(client, "quorum")
        with client.update_stream("quorum", max_in_flight=4 * BATCHES) as stream:
            send_round(stream, 1)
            stream.flush()
            n1.kill()
            send_round(stream, 2)
            assert live_in_map(n0.address, "n1")  # sent before the dead node's lease lapsed
            stream.flush()
            assert stream.rows_acked == 2 * len(KEYS)
            assert not live_in_map(n0.address, "n1")  # the quorum is n0's ack alone
        np.testing.assert_array_equal(clicks_on(client, n0.address, "quorum"), clicks_of(2, KEYS))
        back = back_and_caught_up(two, "quorum", "n1")
        np.testing.assert_array_equal(clicks_on(client, back.address, "quorum"), clicks_of(2, KEYS))


def test_the_async_stream_on_two_replicas_goes_on_through_a_kill_9_of_one(two: Cluster) -> None:
    n0, n1 = two.nodes["n0"], two.nodes["n1"]

    async def scenario() -> None:
        async with AsyncClient(n0.address, timeout=10) as client:
            stream = await client.update_stream("async_quorum", max_in_flight=4 * BATCHES)
            async with stream:
                for part in np.array_split(KEYS, BATCHES):
                    await stream.send({"key": part, "clicks": clicks_of(1, part)})
                await stream.flush()
                n1.kill()
                for part in np.array_split(KEYS, BATCHES):
                    await stream.send({"key": part, "clicks": clicks_of(2, part)})
                assert live_in_map(n0.address, "n1")
                await stream.flush()
                assert stream.rows_acked == 2 * len(KEYS)
                assert not live_in_map(n0.address, "n1")

    with Client(n0.address, timeout=10) as client:
        two_replicas(client, "async_quorum")
        asyncio.run(scenario())
        rows = clicks_on(client, n0.address, "async_quorum")
        np.testing.assert_array_equal(rows, clicks_of(2, KEYS))
        back = back_and_caught_up(two, "async_quorum", "n1")
        rows = clicks_on(client, back.address, "async_quorum")
        np.testing.assert_array_equal(rows, clicks_of(2, KEYS))


# -- the bookkeeping, sans I/O --------------------------------------------------------


def test_a_batch_refused_at_a_newer_epoch_by_an_uncounted_replica_waits_for_the_new_map() -> None:
    """The stream's twin of the unary flow test in tests/test_client_replicas.py. Shard
    replicas on a (Available) and b (Initializing: its ack not counted). a applies the
    batch; b, Available at epoch 9 already, refuses the epoch-5 part with StaleMap. a
    alone is the old map's quorum, but the batch does not count until the map is at
    epoch 9, and then it needs b: it is sent to b again, at epoch 9."""
    nodes = [pb.NodeInfo(node_id=a, address=a, state="live") for a in ("a:1", "b:1")]

    def cmap(epoch: int, b_state: str) -> pb.ClusterMap:
        shard = pb.ShardReplicas(node=[0, 1], state=["Available", b_state])
        table = pb.TableShards(table="t", owner=[0] * SHARDS, replicas=[shard] * SHARDS)
        return pb.ClusterMap(epoch=epoch, nodes=nodes, tables=[table])

    ops = Operations("a:1", 10)
    schema = TableSchema.build("t", "int64", FEATURES, SHARDS).with_id(1)
    ops.schemas["t"] = schema
    ops.apply_cluster_map(cmap(5, "Initializing"))
    acks = Rerouting(SimpleNamespace(_ops=ops), "t", schema, max_in_flight=4)
    keys = np.arange(8, dtype=np.int64)
    number = acks._new_batch({"key": keys, "clicks": keys}, "key", None)
    parts = acks._plan(number)
    assert sorted(call.address for _, call in parts) == ["a:1", "b:1"]
    assert all(call.request.epoch == 5 for _, call in parts)
    for _, call in parts:
        acks._batches[number].sent(call.address, call.shards)
    (a_shards,) = [call.shards for _, call in parts if call.address == "a:1"]
    acks._take_applied("a:1", [(number, a_shards)])
    acks._settle()
    assert acks.rows_acked == 0  # b has not answered

    acks._drop("b:1", StaleMap("caught up", 9))
    acks._settle()
    assert acks.rows_acked == 0  # the old map's quorum (a alone) is met, but stale

    ops.apply_cluster_map(cmap(9, "Available"))  # the refresh
    acks._shelve({"b:1": 5})  # its part was planned at epoch 5
    acks._settle()
    assert acks.rows_acked == 0  # b counts now, and lacks the batch
    again = acks._plan(number)
    assert [(call.address, call.request.epoch) for _, call in again] == [("b:1", 9)]
    for _, call in again:
        acks._batches[number].sent(call.address, call.shards)
        acks._take_applied(call.address, [(number, call.shards)])
    acks._settle()
    assert acks.rows_acked == len(keys) and not acks._batches
