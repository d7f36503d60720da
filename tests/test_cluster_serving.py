"""A cluster of 3 node processes on a real etcd: tables spread over the nodes, each node
serves only the shards the placement gives it, and clients follow the map.

Every node is ``kvstore serve --etcd URL`` (kvstore.server.process.NodeProcess).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cluster_fixtures import (
    FEATURES,
    KEYS,
    SHARDS,
    Cluster,
    check_all,
    feature_rows,
)
from etcd_server import EtcdServer, free_port

from kvstore import AlreadyExists, AsyncClient, Client
from kvstore.client.fast import FastConnections
from kvstore.cluster.membership import DEFAULT_TTL_S
from kvstore.columns import encode_rows
from kvstore.errors import StaleMap, from_rpc_error
from kvstore.keys import KeyBatch
from kvstore.server.process import NodeProcess, wait_until
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire.dial import open_channel


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer) -> Iterator[Cluster]:
    """Three nodes of one cluster, for the tests that do not stop any of them."""
    with Cluster(tmp_path_factory.mktemp("three"), etcd) as cluster:
        for i in range(3):
            cluster.start(f"n{i}")
        yield cluster


def _create(client: Client, name: str) -> None:
    client.create_table(name, key="int64", features=FEATURES, shards=SHARDS)


def _owner_addresses(cmap: dict, table: str) -> list[str]:
    return [cmap["nodes"][i]["address"] for i in cmap["tables"][table]]


@pytest.mark.parametrize("transport", ["auto", "grpc"])
def test_a_table_created_on_one_node_is_spread_over_three_and_answers_every_key(
    three: Cluster, transport: str
) -> None:
    name = f"spread_{transport}"
    n0, n1, n2 = three.nodes.values()
    with Client(n0.address, timeout=10, transport=transport) as client:
        _create(client, name)
        cmap = client.cluster_map()
        owners = _owner_addresses(cmap, name)
        # Spread evenly: each node serves a third of the shards.
        assert sorted(owners.count(n.address) for n in (n0, n1, n2)) == [4, 4, 4]
        assert all(node["state"] == "live" for node in cmap["nodes"])
        assert client.write(name, feature_rows(KEYS)) == len(KEYS)
        check_all(client.get(name, KEYS), KEYS)
        # An update stream opens one call per node and sends each its keys only.
        with client.update_stream(name) as stream:
            for part in np.array_split(KEYS, 4):
                stream.send({"key": part, "clicks": part * 3 + 1})
            stream.flush()
        np.testing.assert_array_equal(client.get(name, KEYS).to_numpy()["clicks"], KEYS * 3 + 1)
        client.write(name, feature_rows(KEYS))
    # Any node is a seed, and every node has the table (with the same schema id).
    ids = set()
    for node in (n1, n2):
        with Client(node.address, timeout=10, transport=transport) as other:
            check_all(other.get(name, KEYS[::-1]), KEYS[::-1])
            ids.add(other.describe_table(name).schema.schema_id)
    assert len(ids) == 1

    async def read_async() -> None:
        async with AsyncClient(n2.address, timeout=10) as aclient:
            check_all(await aclient.get(name, KEYS), KEYS)
            assert await aclient.delete(name, KEYS[:10]) == 10
            assert not (await aclient.get(name, KEYS[:10])).found.any()

    asyncio.run(read_async())


def test_a_write_to_a_node_that_does_not_hold_the_shard_is_refused_and_not_applied(
    three: Cluster,
) -> None:
    name = "refused"
    with Client(three.nodes["n0"].address, timeout=10) as client:
        _create(client, name)
        cmap = client.cluster_map()
        schema = client.describe_table(name).schema
        owners = _owner_addresses(cmap, name)
        shard_ids = KeyBatch.from_values("int64", KEYS, name).shard_ids(SHARDS)
        key = int(KEYS[0])
        holder = owners[shard_ids[0]]
        stranger = next(n.address for n in three.nodes.values() if n.address != holder)

        rows = encode_rows(schema, feature_rows(np.array([key])), "key", 1_000)
        request = pb.WriteRequest(
            table=name,
            schema_id=schema.schema_id,
            keys=rows.keys.to_proto(),
            rows=rows.rows,
            row_offsets=rows.offsets.astype("<i8").tobytes(),
            features=rows.features,
        )
        with open_channel(stranger) as channel:
            stub = pb_grpc.FeatureStoreStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Write(request, timeout=10)
            error = from_rpc_error(caught.value, stranger, 10)
            assert isinstance(error, StaleMap), error
            assert error.epoch == cmap["epoch"] and f"shard {shard_ids[0]}" in str(error)
            # The same over gRPC Get, and over the fast read path, with the epoch.
            get = pb.GetRequest(table=name, keys=rows.keys.to_proto())
            with pytest.raises(grpc.RpcError) as caught:
                stub.Get(get, timeout=10)
            assert isinstance(from_rpc_error(caught.value, stranger, 10), StaleMap)
        fast_address = next(n["fast_address"] for n in cmap["nodes"] if n["address"] == stranger)
        fast = FastConnections()
        try:
            with pytest.raises(StaleMap) as stale:
                fast.get(fast_address, get.SerializeToString(), 10)
            assert stale.value.epoch == cmap["epoch"]
        finally:
            fast.close()
        # Nothing was applied anywhere: the holder has no row for the key.
        assert not client.get(name, [key]).found.any()
        # Through the client, the same write lands on the holder.
        assert client.write(name, feature_rows(np.array([key]))) == 1
        assert client.get(name, [key]).found.all()


def test_concurrent_creates_of_one_table_with_two_schemas_have_one_winner(
    three: Cluster,
) -> None:
    name = "contested"
    a, b = three.nodes["n1"].address, three.nodes["n2"].address

    def create(address: str, dtype: str) -> object:
        with Client(address, timeout=20) as client:
            try:
                return client.create_table(name, features={"f": dtype}, shards=4)
            except AlreadyExists as exc:
                return exc

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(create, [a, b], ["float32", "int64"]))
    errors = [r for r in results if isinstance(r, AlreadyExists)]
    assert len(errors) == 1, results
    winner = next(r for r in results if not isinstance(r, Exception))
    for address in (a, b):
        with Client(address, timeout=10) as client:
            assert client.describe_table(name).schema == winner.schema


def test_kvstore_cluster_status_lists_nodes_tables_and_epoch(three: Cluster) -> None:
    with Client(three.nodes["n0"].address, timeout=10) as client:
        _create(client, "status_t")
    out = subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "cluster", "status", "-a", three.nodes["n1"].address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "placement epoch" in out.stdout
    for node_id, node in three.nodes.items():
        line = next(line for line in out.stdout.splitlines() if line.startswith(node_id + " "))
        assert node.address in line and "live" in line
    assert any(line.startswith("status_t ") for line in out.stdout.splitlines())


def test_a_killed_node_restarted_on_new_ports_is_followed_by_existing_clients(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    cluster = Cluster(tmp_path, etcd)

    def kill_and_restart_n2(probe: Client) -> NodeProcess:
        old = cluster.nodes["n2"]
        old.kill()
        restarted = cluster.start("n2")  # same data dir and id; new ports
        assert restarted.address != old.address

        def seed_sees_new_address() -> bool:
            nodes = probe.cluster_map()["nodes"]  # the probe's map, not the clients'
            return any(n["node_id"] == "n2" and n["address"] == restarted.address for n in nodes)

        wait_until(seed_sees_new_address, 30, "n2's new address in the seed's map")
        return restarted

    with cluster:
        for i in range(3):
            cluster.start(f"n{i}")
        seed = cluster.nodes["n0"].address

        async def scenario() -> None:
            with (
                Client(seed, timeout=10) as fast_client,
                Client(seed, timeout=10, transport="grpc") as grpc_client,
                Client(seed, timeout=10) as probe,
            ):
                async with AsyncClient(seed, timeout=10) as aclient:
                    _create(fast_client, "followed")
                    fast_client.write("followed", feature_rows(KEYS))
                    for c in (fast_client, grpc_client):
                        check_all(c.get("followed", KEYS), KEYS)
                    check_all(await aclient.get("followed", KEYS), KEYS)
                    old_fast = set(fast_client._ops.fast.values())

                    restarted = await asyncio.to_thread(kill_and_restart_n2, probe)
                    # The clients' maps still name n2's old ports: the next call of each
                    # refreshes the map once and succeeds; every call after it too.
                    for _ in range(10):
                        check_all(fast_client.get("followed", KEYS), KEYS)
                        check_all(grpc_client.get("followed", KEYS), KEYS)
                        check_all(await aclient.get("followed", KEYS), KEYS)
                    assert set(fast_client._ops.fast.values()) != old_fast
                    assert restarted.address in fast_client._ops.nodes
                    assert fast_client.write("followed", feature_rows(KEYS[:100])) == 100
                    assert await aclient.write("followed", feature_rows(KEYS[:100])) == 100

        asyncio.run(scenario())


def test_the_same_node_id_twice_is_refused_naming_the_holder(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    with Cluster(tmp_path, etcd) as cluster:
        first = cluster.start("twin")
        second = NodeProcess(
            tmp_path / "other",
            "--etcd",
            etcd.url,
            "--cluster",
            cluster.name,
            "--node-id",
            "twin",
            log_path=tmp_path / "other.log",
        )
        with pytest.raises(Exception, match="exited with 1") as caught:
            second.start()
        message = str(caught.value)
        assert "'twin' is already registered" in message and first.address in message
        assert "Traceback" not in second.output()


def test_etcd_unreachable_at_start_is_a_clear_error_naming_the_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvstore.cli",
            "serve",
            "--port",
            "0",
            "--data",
            str(tmp_path),
            "--etcd",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert f"cannot reach etcd at {url}" in out.stderr
    assert "Traceback" not in out.stderr


def test_nodes_keep_serving_while_etcd_is_lost_and_change_tables_once_it_is_back(
    tmp_path: Path,
) -> None:
    etcd = EtcdServer(tmp_path / "etcd-work")
    etcd.workdir.mkdir()
    etcd.start()
    try:
        with Cluster(tmp_path, etcd) as cluster:
            for i in range(3):
                cluster.start(f"n{i}")
            with Client(cluster.nodes["n1"].address, timeout=10) as client:
                _create(client, "before")
                client.write("before", feature_rows(KEYS))
                etcd.kill()
                killed = time.monotonic()
                # Serve through the loss itself: once a node has noticed etcd is gone, and
                # for longer than a lease lives, so every registration would have lapsed.
                wait_until(
                    lambda: any(
                        f"etcd at {etcd.url} is unreachable" in n.log_tail(100_000)
                        for n in cluster.nodes.values()
                    ),
                    30,
                    "a node to log that etcd is unreachable",
                )
                wait_until(
                    lambda: time.monotonic() - killed > DEFAULT_TTL_S + 0.5,
                    DEFAULT_TTL_S + 5,
                    "one lease TTL to pass",
                )
                assert all(n.running() for n in cluster.nodes.values())
                for _ in range(5):
                    check_all(client.get("before", KEYS), KEYS)
                    assert client.write("before", feature_rows(KEYS[:50])) == 50
                with Client(cluster.nodes["n2"].address, timeout=10) as other:
                    check_all(other.get("before", KEYS), KEYS)
                etcd.start()
                # Every node follows etcd again within seconds (not after gRPC's reconnect
                # backoff, which grows to minutes), and all are live in the map.
                back = f"is reachable again; watching /kvstore/{cluster.name}/placement"
                wait_until(
                    lambda: all(back in n.log_tail(100_000) for n in cluster.nodes.values()),
                    15,
                    "every node to watch the placement again",
                )
                wait_until(
                    lambda: [n["state"] for n in client.cluster_map()["nodes"]] == ["live"] * 3,
                    15,
                    "every node to be live again",
                )
                client.create_table("after", features=FEATURES, shards=6, timeout=30)
                client.write("after", feature_rows(KEYS))
                check_all(client.get("after", KEYS), KEYS)
                assert len(set(client.cluster_map()["tables"]["after"])) == 3
    finally:
        etcd.stop()


def test_a_single_node_restarted_on_a_new_fast_port_is_followed(start_node, tmp_path) -> None:
    node = start_node(data_dir=tmp_path / "alone")
    with Client(node.address, timeout=10) as client:
        client.create_table("alone", features=FEATURES, shards=4)
        client.write("alone", feature_rows(KEYS))
        check_all(client.get("alone", KEYS), KEYS)
        old_fast = set(client._ops.fast.values())
        node.stop()
        again = start_node("--port", str(node.port), data_dir=tmp_path / "alone")
        assert again.address == node.address
        assert set(client._ops.fast.values()) == old_fast  # the client still has the old one
        for _ in range(5):
            check_all(client.get("alone", KEYS), KEYS)
        assert set(client._ops.fast.values()) != old_fast


def test_a_node_that_ran_alone_with_tables_does_not_join_a_cluster(
    start_node, tmp_path: Path, etcd: EtcdServer
) -> None:
    data = tmp_path / "was_alone"
    alone = start_node(data_dir=data)
    with Client(alone.address, timeout=10) as client:
        client.create_table("kept", features=FEATURES, shards=2)
    alone.stop()
    joining = NodeProcess(
        data, "--etcd", etcd.url, "--cluster", "t-alone", log_path=tmp_path / "j.log"
    )
    with pytest.raises(Exception, match="exited with 1") as caught:
        joining.start()
    assert "holds 1 table(s) of a node that ran alone (kept)" in str(caught.value)
    again = start_node(data_dir=data)  # the table is still there
    with Client(again.address, timeout=10) as client:
        assert [t.schema.name for t in client.list_tables()] == ["kept"]
