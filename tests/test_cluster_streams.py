"""An update stream follows the cluster map: a node that restarts on other ports
mid-stream gets the stream's batches again, and nothing is lost or applied wrong.

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

import numpy as np
import pytest
from cluster_fixtures import FEATURES, SHARDS, Cluster

from kvstore import AsyncClient, Client
from kvstore.errors import Unavailable
from kvstore.server.process import NodeProcess, wait_until

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
