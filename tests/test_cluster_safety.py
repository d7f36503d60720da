"""A clustered node never loses its data to a placement that does not know it, and
serves nothing before it has joined.

* A data directory remembers its cluster (name and uuid, kvstore.cluster.identity):
  started with another ``--cluster``, or against a wiped etcd, the node refuses to
  start, naming both, and its tables stay.
* A placement from an etcd restored from an older backup does not know a table made
  since: the node keeps that table (logged, not served) instead of destroying it.
* Between binding its fast read port and joining, a node refuses reads with StaleMap
  at epoch 0.
* A stream consumer's position is stored on every node of the table with each batch,
  and read back as the minimum over them: a write one node missed is not skipped.
* A malformed placement document in etcd is logged and skipped; the node follows
  the next good one.
* A drop retried on another node after a lost answer succeeds.
* A client never replaces its cluster map by an older one (by epoch), and swaps it
  whole.

Real etcd (tests/etcd_server.py) and node processes (kvstore.server.process).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from cluster_fixtures import FEATURES, SHARDS, Cluster, check_all, feature_rows
from etcd_server import EtcdServer, free_port
from helpers import wait_for

from kvstore import Client
from kvstore.client.fast import FastConnections
from kvstore.client.flows import Operations
from kvstore.cluster.etcd import connect
from kvstore.columns import encode_rows
from kvstore.errors import StaleMap, TableNotFound, Unavailable, from_rpc_error
from kvstore.keys import KeyBatch
from kvstore.server.process import NodeProcess
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire.dial import open_channel

ROWS = np.arange(10, dtype=np.int64)


def _alone(data: Path, log: Path) -> NodeProcess:
    """The node of ``data`` started without etcd: what its tables hold, untouched."""
    return NodeProcess(data, log_path=log).start()


def _refused(data: Path, url: str, cluster: str, log: Path) -> str:
    node = NodeProcess(data, "--etcd", url, "--cluster", cluster, log_path=log)
    with pytest.raises(Exception, match="exited with 1") as caught:
        node.start()
    return str(caught.value)


def test_a_node_started_with_another_cluster_name_refuses_and_keeps_its_tables(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    cluster = Cluster(tmp_path, etcd)
    try:
        n1 = cluster.start("n1")
        with Client(n1.address, timeout=10) as client:
            client.create_table("t", features=FEATURES, shards=4)
            assert client.write("t", feature_rows(ROWS)) == len(ROWS)
        n1.stop()
        typo = f"{cluster.name}x"
        message = _refused(n1.data_dir, etcd.url, typo, tmp_path / "typo.log")
        assert f"belongs to cluster {cluster.name!r}" in message
        assert f"--cluster {typo!r}" in message
        # Back with the right name: the table and its rows are there.
        again = cluster.start("n1")
        with Client(again.address, timeout=10) as client:
            check_all(client.get("t", ROWS), ROWS)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()


def test_a_wiped_etcd_or_one_restored_from_an_old_backup_destroys_no_table(
    tmp_path: Path,
) -> None:
    work = tmp_path / "etcd-work"
    work.mkdir()
    etcd = EtcdServer(work).start()
    backup = tmp_path / "etcd-backup"
    cluster = Cluster(tmp_path, etcd)
    try:
        n1 = cluster.start("n1")
        with Client(n1.address, timeout=10) as client:
            client.create_table("old", features=FEATURES, shards=4)
            client.write("old", feature_rows(ROWS))
        etcd.stop()
        shutil.copytree(etcd.data_dir, backup)
        etcd.start()
        with Client(n1.address, timeout=10) as client:
            wait_for(lambda: n1.running(), 5, "n1")
            client.create_table("new", features=FEATURES, shards=4, timeout=30)
            client.write("new", feature_rows(ROWS))
        n1.stop()

        # Restored from the backup: same cluster uuid, but "new" is unknown to it.
        etcd.stop()
        shutil.rmtree(etcd.data_dir)
        shutil.copytree(backup, etcd.data_dir)
        etcd.start()
        n1 = cluster.start("n1")
        wait_for(
            lambda: "'new' (schema id 2) is unknown to placement" in n1.log_tail(100_000),
            10,
            "n1 to log that it keeps table 'new'",
        )
        with Client(n1.address, timeout=10) as client:
            check_all(client.get("old", ROWS), ROWS)
        # Kept, but not served: the placement does not know it.
        get = pb.GetRequest(table="new", keys=KeyBatch.from_values("int64", ROWS, "new").to_proto())
        with open_channel(n1.address) as channel, pytest.raises(grpc.RpcError) as caught:
            pb_grpc.FeatureStoreStub(channel).Get(get, timeout=10)
        assert isinstance(from_rpc_error(caught.value, n1.address, 10), StaleMap)
        n1.stop()

        # Wiped: the node refuses to start, naming its cluster.
        etcd.stop()
        etcd.wipe()
        etcd.start()
        message = _refused(n1.data_dir, etcd.url, cluster.name, tmp_path / "wiped.log")
        assert "finds no placement for it in etcd" in message

        # Both tables are intact on disk.
        alone = _alone(n1.data_dir, tmp_path / "alone.log")
        try:
            with Client(alone.address, timeout=10) as client:
                check_all(client.get("old", ROWS), ROWS)
                check_all(client.get("new", ROWS), ROWS)
        finally:
            alone.stop()
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
        etcd.stop()


def test_the_fast_read_path_refuses_reads_until_the_node_has_joined(
    tmp_path: Path,
) -> None:
    work = tmp_path / "etcd-work"
    work.mkdir()
    etcd = EtcdServer(work).start()
    cluster = Cluster(tmp_path, etcd)
    try:
        n1 = cluster.start("n1")
        with Client(n1.address, timeout=10) as client:
            client.create_table("t", features=FEATURES, shards=4)
            client.write("t", feature_rows(ROWS))
        n1.stop()
        etcd.kill()
        # etcd is gone: the node binds its ports, then spends seconds failing to join.
        fast_port = free_port()
        node = NodeProcess(
            n1.data_dir,
            "--etcd",
            etcd.url,
            "--cluster",
            cluster.name,
            "--fast-port",
            str(fast_port),
            log_path=tmp_path / "joining.log",
        )
        get = pb.GetRequest(table="t", keys=KeyBatch.from_values("int64", ROWS, "t").to_proto())
        fast = FastConnections()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            starting = pool.submit(node.start)
            try:

                def answered() -> StaleMap | bool:
                    try:
                        fast.get(f"127.0.0.1:{fast_port}", get.SerializeToString(), 2)
                    except StaleMap as stale:
                        return stale
                    except Exception:  # not listening yet
                        if starting.done():
                            raise AssertionError("the node exited before its fast port answered")  # noqa: B904
                        return False
                    raise AssertionError("the fast read path served rows before the join")

                stale = wait_for(answered, 30, "the fast port to answer")
                assert stale.epoch == 0
            finally:
                fast.close()
            with pytest.raises(Exception, match="exited with 1"):
                starting.result(timeout=60)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
        etcd.stop()


def test_consumer_positions_are_the_minimum_over_every_node_of_the_table(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    cluster = Cluster(tmp_path, etcd)
    try:
        for i in range(3):
            cluster.start(f"n{i}")
        seed = cluster.nodes["n0"]
        with Client(seed.address, timeout=10) as client:
            client.create_table("events", features=FEATURES, shards=SHARDS)
            cmap = client.cluster_map()
            owners = [cmap["nodes"][i]["address"] for i in cmap["tables"]["events"]]
            keys = np.arange(1_000, dtype=np.int64)
            shard_ids = KeyBatch.from_values("int64", keys, "events").shard_ids(SHARDS)
            owner_of_key = np.array([owners[s] for s in shard_ids])
            # A batch whose keys all live on n1 still moves every node's position.
            on_n1 = keys[owner_of_key == cluster.nodes["n1"].address][:5]
            client.write("events", feature_rows(on_n1), position=("c", "topic", 0, 7))
            assert client.consumer_positions("events", "c", "topic") == {0: 7}
            # A later batch lands on n0 only (n1 and n2 missed it, say a failure cut
            # the call short): the consumer must resume before it, not after.
            on_n0 = keys[owner_of_key == seed.address][:5]
            position = pb.ConsumerPosition(consumer="c", source="topic", partition=0, offset=9)
            with open_channel(seed.address) as channel:
                stub = pb_grpc.FeatureStoreStub(channel)
                rows = encode_rows(
                    client.describe_table("events").schema, feature_rows(on_n0), "key", 1
                )
                stub.Write(
                    pb.WriteRequest(
                        table="events",
                        schema_id=client.describe_table("events").schema.schema_id,
                        keys=rows.keys.to_proto(),
                        rows=rows.rows,
                        row_offsets=rows.offsets.astype("<i8").tobytes(),
                        features=rows.features,
                        position=position,
                    ),
                    timeout=10,
                )
            assert client.consumer_positions("events", "c", "topic") == {0: 7}
            # A partition one node has never seen counts as -1 (nothing applied).
            with open_channel(seed.address) as channel:
                pb_grpc.FeatureStoreStub(channel).Delete(
                    pb.DeleteRequest(
                        table="events",
                        keys=KeyBatch.from_values("int64", [], "events").to_proto(),
                        position=pb.ConsumerPosition(
                            consumer="c", source="topic", partition=1, offset=3
                        ),
                    ),
                    timeout=10,
                )
            assert client.consumer_positions("events", "c", "topic") == {0: 7, 1: -1}
            # Once every node has it, the position is the common one.
            client.delete("events", [], position=("c", "topic", 1, 4))
            assert client.consumer_positions("events", "c", "topic") == {0: 7, 1: 4}
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()


def _map(epoch: int, addresses: list[str], owner: list[int]) -> pb.ClusterMap:
    return pb.ClusterMap(
        epoch=epoch,
        nodes=[pb.NodeInfo(node_id=f"n{i}", address=a) for i, a in enumerate(addresses)],
        tables=[pb.TableShards(table="t", owner=owner)],
    )


def _drive(flow, answers: dict) -> list[str]:
    """Run a client flow (kvstore.client.core's sans-I/O generators), answering each
    call from ``answers`` by address (an exception there is raised into the flow, as
    the clients do); the addresses asked, in order."""
    asked = []
    try:
        calls = next(flow)
        while True:
            asked += [c.address for c in calls]
            answer = [answers[c.address] for c in calls]
            failed = next((a for a in answer if isinstance(a, Exception)), None)
            calls = flow.throw(failed) if failed is not None else flow.send(answer)
    except StopIteration:
        return asked


def test_the_client_never_swaps_its_map_for_an_older_one() -> None:
    ops = Operations("127.0.0.1:7001", 5)
    newer = _map(5, ["127.0.0.1:7001", "127.0.0.1:7002"], [0, 1])
    ops.apply_cluster_map(newer)
    # The seed lags (its watch is behind): the client asks the other node too, and
    # keeps the newer map it had.
    lagging = _map(3, ["127.0.0.1:7001"], [0, 0])
    asked = _drive(ops.refresh_map_flow(), {"127.0.0.1:7001": lagging, "127.0.0.1:7002": newer})
    assert asked == ["127.0.0.1:7001", "127.0.0.1:7002"]
    assert ops.epoch == 5 and list(ops.nodes) == ["127.0.0.1:7001", "127.0.0.1:7002"]
    np.testing.assert_array_equal(ops.owners["t"], [0, 1])
    before = ops.route
    ops.apply_cluster_map(lagging)
    assert ops.route is before
    # One snapshot: nodes, owners and the one-node shortcut come from the same map.
    ops.apply_cluster_map(_map(6, ["127.0.0.1:7003"], [0, 0]))
    route = ops.route
    assert route.epoch == 6 and route.nodes == ("127.0.0.1:7003",)
    assert route.sole == {"t": "127.0.0.1:7003"}


def _edit_placement(url: str, cluster: str, edit) -> None:
    """Replace the placement document in etcd by ``edit(the document's bytes)``."""

    async def run() -> None:
        store = await connect(url, cluster)
        try:
            entry = await store.get(store.keys.placement)
            await store.client.put(store.keys.placement, edit(entry.value))
        finally:
            await store.close()

    asyncio.run(run())


def test_a_malformed_placement_in_etcd_is_skipped_and_the_node_follows_the_next(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    cluster = Cluster(tmp_path, etcd)
    try:
        n1 = cluster.start("n1")
        with Client(n1.address, timeout=10) as client:
            client.create_table("before", features=FEATURES, shards=2)
            kept = {}

            def garble(doc: bytes) -> bytes:
                kept["doc"] = json.loads(doc)
                return b'{"epoch": 99, "tables": '

            _edit_placement(etcd.url, cluster.name, garble)
            wait_for(
                lambda: "is malformed" in n1.log_tail(100_000), 10, "n1 to log the bad document"
            )
            assert n1.running()
            check_all(client.get("before", ROWS[:0]), ROWS[:0])
            # An operator puts a good document back: the node follows on.
            doc = {**kept["doc"], "epoch": kept["doc"]["epoch"] + 1}
            _edit_placement(etcd.url, cluster.name, lambda _: json.dumps(doc).encode())
            client.create_table("after", features=FEATURES, shards=2, timeout=30)
            assert client.write("after", feature_rows(ROWS)) == len(ROWS)
            check_all(client.get("after", ROWS), ROWS)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()


def test_a_drop_retried_on_another_node_after_a_lost_answer_succeeds() -> None:
    ops = Operations("127.0.0.1:7001", 5)
    ops.apply_cluster_map(_map(5, ["127.0.0.1:7001", "127.0.0.1:7002"], [0, 1]))
    # The seed dropped the table but its answer was lost; the other node has it gone.
    lost = Unavailable("node 127.0.0.1:7001 is unreachable")
    gone = TableNotFound("table 't' not found")
    answers = {"127.0.0.1:7001": lost, "127.0.0.1:7002": gone}
    assert _drive(ops.drop_flow("t"), answers) == ["127.0.0.1:7001", "127.0.0.1:7002"]
    # A table that is not there at the first node asked is still an error.
    with pytest.raises(TableNotFound):
        _drive(ops.drop_flow("t"), {"127.0.0.1:7001": gone})
