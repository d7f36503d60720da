"""Tables with several replicas, server side (docs/cluster.md, "Replicas"), through real
node processes on a real etcd: R replicas of each shard on distinct nodes; a write sent
to every replica lands on each; a node killed and restarted catches up from a peer
before it serves reads (refusing them with StaleMap meanwhile, taking writes); a node
whose data directory was wiped copies its shards back; a node gone past the grace
period has its replicas copied to the other nodes.

Writes go to each replica node directly here (the client's fan-out is the client
side's part of issue 16); answers are compared replica against replica, byte for byte.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cluster_fixtures import (
    FEATURES,
    SHARDS,
    Cluster,
    check_all,
    cluster_map,
    feature_rows,
    placed_replicas,
)

from kvstore import Client
from kvstore.cluster.assignment import catch_up, drain, finish_move, place_table, re_replicate
from kvstore.cluster.moves import FAULT_HOLD_CATCH_UP
from kvstore.cluster.placement import Placement, ShardState
from kvstore.columns import encode_rows
from kvstore.errors import InvalidArgument, StaleMap, from_rpc_error
from kvstore.ingest.bulk import load
from kvstore.keys import KeyBatch
from kvstore.schema import TableSchema
from kvstore.server.process import wait_until
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire.dial import open_channel
from kvstore.wire.messages import schema_to_proto

TABLE = "replicated"
CATCH_UP_TIMEOUT_S = 90.0
AVAILABLE, INITIALIZING = ShardState.AVAILABLE, ShardState.INITIALIZING


# --------------------------------------------------------------------------------------
# The placement's pure functions (kvstore.cluster.assignment)


def _placed(nodes=("n0", "n1", "n2"), replicas=2, shards=6, zones=None) -> Placement:
    schema = TableSchema.build(TABLE, "int64", FEATURES, shards).with_id(1)
    return place_table(Placement(nodes=tuple(nodes)), schema, replicas, 0, zones)


def _holders(placement: Placement) -> list[list[tuple[str, ShardState, str]]]:
    return [[(r.node, r.state, r.source) for r in rs] for rs in placement.table(TABLE).shards]


def test_place_table_puts_replicas_on_distinct_nodes_and_zones() -> None:
    placed = _placed()
    assert placed.table(TABLE).replicas == 2 and placed.table(TABLE).quorum == 2
    assert all(len({n for n, _, _ in rs}) == 2 for rs in _holders(placed))
    zoned = _placed(nodes=("n0", "n1", "n2"), zones={"n0": "a", "n1": "a", "n2": "b"})
    # Two zones: every shard has a replica in each, so n2 (zone b alone) holds them all.
    assert all("n2" in {n for n, _, _ in rs} for rs in _holders(zoned))
    with pytest.raises(InvalidArgument, match="3 replicas on 2 nodes"):
        _placed(nodes=("n0", "n1"), replicas=3)
    schema = TableSchema.build("t", "int64", FEATURES, 2).with_id(1)
    with pytest.raises(InvalidArgument, match="write quorum"):
        place_table(Placement(nodes=("n0", "n1")), schema, 2, 3)


def test_catch_up_marks_a_returning_nodes_replicas_and_finishing_keeps_the_peer() -> None:
    placed = _placed()
    live = {"n0", "n1", "n2"}
    back = catch_up(placed, "n1", live)
    for before, after in zip(_holders(placed), _holders(back), strict=True):
        for (node, _, _), (node_after, state, source) in zip(before, after, strict=True):
            assert node == node_after
            if node == "n1":
                assert state == INITIALIZING and source in live - {"n1"}
            else:
                assert state == AVAILABLE
    # Only a start (or a lapsed lease) marks them: the periodic check leaves them.
    assert catch_up(placed, "n1", live, returning=False) == placed
    # Its peer gone: another live peer if any, else Available again.
    shard = next(s for s, rs in enumerate(_holders(back)) if "n1" in {n for n, _, _ in rs})
    peer = next(source for n, _, source in _holders(back)[shard] if n == "n1")
    alone = catch_up(back, "n1", {"n1"}, returning=False)
    assert ("n1", AVAILABLE, "") in _holders(alone)[shard]
    # (with 2 replicas the peer is the only other one)
    without_peer = catch_up(back, "n1", live - {peer}, returning=False)
    assert _holders(without_peer)[shard] == _holders(alone)[shard]
    # The catch-up's finish makes it Available and keeps the (Available) peer.
    done = finish_move(back, TABLE, shard, "n1")
    assert sorted(_holders(done)[shard]) == sorted([("n1", AVAILABLE, ""), (peer, AVAILABLE, "")])
    # A table with one replica has no peer to catch up from: nothing changes.
    assert catch_up(_placed(replicas=1), "n1", live) == _placed(replicas=1)


def test_re_replicate_replaces_a_dead_nodes_replicas_from_live_peers() -> None:
    placed = _placed(nodes=("n0", "n1", "n2", "n3"))
    live = {"n0", "n1", "n3"}
    replaced = re_replicate(placed, "n2", live, {})
    assert "n2" not in replaced.nodes and not replaced.replicas_on("n2")
    for rs in _holders(replaced):
        assert len({n for n, _, _ in rs}) == 2
        for node, state, source in rs:
            assert state == AVAILABLE or (source in live and node in live)
    # A shard whose other replica is down too keeps the dead node's replica.
    kept = re_replicate(placed, "n2", {"n0"}, {})
    assert kept.replicas_on("n2")
    # Draining one of two nodes holding a table with 2 replicas is refused.
    with pytest.raises(InvalidArgument, match="the last node that can hold"):
        drain(_placed(nodes=("n0", "n1")), "n1", {})


def _call(address: str, method: str, request):
    with open_channel(address) as channel:
        return getattr(pb_grpc.FeatureStoreStub(channel), method)(request, timeout=30)


def _create(address: str, replicas: int) -> None:
    schema = TableSchema.build(TABLE, "int64", FEATURES, SHARDS)
    _call(
        address,
        "CreateTable",
        pb.CreateTableRequest(schema=schema_to_proto(schema), replicas=replicas),
    )


def _shards(keys: np.ndarray) -> np.ndarray:
    return KeyBatch.from_values("int64", keys, TABLE).shard_ids(SHARDS)


def _write(cmap: pb.ClusterMap, schema: TableSchema, keys: np.ndarray, skip: str = "") -> None:
    """Write ``feature_rows(keys)`` to every replica of each key's shard (but ``skip``)."""
    shard_of = _shards(keys)
    for shard, replicas in enumerate(placed_replicas(cmap, TABLE)):
        mine = keys[shard_of == shard]
        if not len(mine):
            continue
        rows = encode_rows(schema, feature_rows(mine), "key")
        request = pb.WriteRequest(
            table=TABLE,
            schema_id=schema.schema_id,
            keys=rows.keys.to_proto(),
            rows=rows.rows,
            row_offsets=rows.offsets.astype("<i8").tobytes(),
            features=rows.features,
        )
        for node_id, address, _ in replicas:
            if node_id != skip:
                _call(address, "Write", request)


def _get(address: str, keys: np.ndarray) -> pb.GetResponse:
    keys_proto = KeyBatch.from_values("int64", keys, TABLE).to_proto()
    return _call(address, "Get", pb.GetRequest(table=TABLE, keys=keys_proto))


def _same_on_every_replica(cmap: pb.ClusterMap, keys: np.ndarray) -> None:
    """Every replica of each shard answers its keys, found, from the same version, byte
    for byte the same."""
    shard_of = _shards(keys)
    for shard, replicas in enumerate(placed_replicas(cmap, TABLE)):
        mine = keys[shard_of == shard]
        assert len(replicas) == 2 and all(state == "Available" for *_, state in replicas)
        answers = [_get(address, mine) for _, address, _ in replicas]
        lengths = np.frombuffer(answers[0].lengths, "<i4")
        assert (lengths >= 0).all(), f"shard {shard}: a key is missing"
        for other in answers[1:]:
            assert (other.version, other.values, other.lengths, other.order) == (
                answers[0].version,
                answers[0].values,
                answers[0].lengths,
                answers[0].order,
            ), f"shard {shard}: the replicas {[r[0] for r in replicas]} differ"


def _wait_map(seed: str, condition, timeout_s: float, what: str) -> pb.ClusterMap:
    """The cluster map once ``condition(map)`` holds (polled)."""

    def satisfied() -> pb.ClusterMap | None:
        cmap = cluster_map(seed)
        return cmap if condition(cmap) else None

    return wait_until(satisfied, timeout_s, what)


def _states_on(node_id: str):
    def states(cmap: pb.ClusterMap) -> set[str]:
        return {s for rs in placed_replicas(cmap, TABLE) for n, _, s in rs if n == node_id}

    return states


def test_replicas_take_writes_catch_up_after_a_restart_and_after_a_wiped_disk(
    cluster: Cluster, tmp_path: Path
) -> None:
    for i in range(3):
        cluster.start(f"n{i}", env={"KVSTORE_REPLICA_GRACE_S": "600"})
    seed = cluster.nodes["n0"].address
    _create(seed, replicas=2)

    # Two replicas of every shard, on distinct nodes, both Available; spread evenly.
    cmap = cluster_map(seed)
    table = next(t for t in cmap.tables if t.table == TABLE)
    assert (table.replica_count, table.write_quorum) == (2, 2)
    placed = placed_replicas(cmap, TABLE)
    assert all(len({n for n, _, _ in rs}) == 2 for rs in placed)
    counts = [sum(n == f"n{i}" for rs in placed for n, _, _ in rs) for i in range(3)]
    assert sorted(counts) == [8, 8, 8], counts

    with Client(seed, timeout=10) as client:
        schema = client.describe_table(TABLE).schema
        first = np.arange(0, 300, dtype=np.int64)
        _write(cmap, schema, first)
        _same_on_every_replica(cmap, first)
        check_all(client.get(TABLE, first), first)

        # n1 is killed; writes go on to the other replicas only.
        cluster.nodes["n1"].kill()
        missed = np.arange(300, 600, dtype=np.int64)
        _write(cmap, schema, missed, skip="n1")

        # Restarted, n1 marks its replicas Initializing before it serves anything, and
        # (held by the fault hook) refuses reads of them while it takes writes.
        hold = tmp_path / "hold-catch-up"
        hold.touch()
        cluster.start("n1", env={FAULT_HOLD_CATCH_UP: str(hold)})
        cmap = _wait_map(
            seed,
            lambda m: _states_on("n1")(m) == {"Initializing"},
            30,
            "n1's replicas to be Initializing",
        )
        n1 = cluster.nodes["n1"].address
        n1_keys = first[[("n1" in {n for n, _, _ in placed[s]}) for s in _shards(first)]]
        with pytest.raises(grpc.RpcError) as caught:
            _get(n1, n1_keys[:5])
        assert isinstance(from_rpc_error(caught.value, n1, 30), StaleMap)
        during = np.arange(600, 900, dtype=np.int64)
        _write(cmap, schema, during)

        hold.unlink()
        cmap = _wait_map(
            seed,
            lambda m: _states_on("n1")(m) == {"Available"},
            CATCH_UP_TIMEOUT_S,
            "n1 to catch up",
        )
        every = np.arange(0, 900, dtype=np.int64)
        _same_on_every_replica(cmap, every)
        check_all(client.get(TABLE, every), every)

        # n1's disk is wiped while it is down: it copies its shards from the peers.
        cluster.nodes["n1"].kill()
        shutil.rmtree(cluster.workdir / "n1")
        more = np.arange(900, 1000, dtype=np.int64)
        _write(cmap, schema, more, skip="n1")
        cluster.start("n1")
        cmap = _wait_map(
            seed,
            lambda m: _states_on("n1")(m) == {"Available"},
            CATCH_UP_TIMEOUT_S,
            "the wiped n1 to copy its shards back",
        )
        every = np.arange(0, 1000, dtype=np.int64)
        _same_on_every_replica(cmap, every)
        check_all(client.get(TABLE, every), every)

    # kvstore cluster status shows the table's replicas, all Available.
    status = subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "cluster", "status", "-a", seed],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    line = next(x for x in status.stdout.splitlines() if x.startswith(TABLE))
    assert "2 (quorum 2)" in line and f"{2 * SHARDS}/{2 * SHARDS}" in line, line


def test_a_client_that_takes_a_returned_node_for_down_is_refused_and_writes_to_both(
    cluster: Cluster,
) -> None:
    """A client's map marks n1 down (its writes failed there, it refreshed once the lease
    lapsed) and stays so while n1 returns and catches up: its writes carry that map's
    epoch, n1's peers refuse them with StaleMap, the client refreshes and writes to both.
    Without the epoch its peers' acks made the quorum and n1 never got the rows (seen in
    make soak: 489 acked rows lost over 10 kills)."""
    for i in range(3):
        cluster.start(f"n{i}", env={"KVSTORE_REPLICA_GRACE_S": "600"})
    seed = cluster.nodes["n0"].address
    _create(seed, replicas=2)
    with Client(seed, timeout=10) as client:
        client.write(TABLE, feature_rows(np.arange(0, 300, dtype=np.int64)))
        cluster.nodes["n1"].kill()
        _wait_map(
            seed,
            lambda m: _node_state(m, "n1") == "down",
            30,
            "n1's lease to lapse",
        )
        during = np.arange(300, 600, dtype=np.int64)
        assert client.write(TABLE, feature_rows(during)) == len(during)  # n1 counted out
        stale = client._ops.route.epoch
        assert client._ops.route.down.any()

        cluster.start("n1")
        cmap = _wait_map(
            seed,
            lambda m: (
                m.epoch > stale
                and _states_on("n1")(m) == {"Available"}
                and _node_state(m, "n1") == "live"
            ),
            CATCH_UP_TIMEOUT_S,
            "n1 to come back and catch up",
        )
        assert client._ops.route.epoch == stale and client._ops.route.down.any()
        after = np.arange(600, 900, dtype=np.int64)
        assert client.write(TABLE, feature_rows(after)) == len(after)
        assert client._ops.route.epoch > stale  # refused, refreshed
        every = np.arange(0, 900, dtype=np.int64)
        _same_on_every_replica(cmap, every)
        check_all(client.get(TABLE, every), every)


def test_a_node_gone_past_the_grace_period_is_re_replicated(cluster: Cluster) -> None:
    for i in range(3):
        cluster.start(f"n{i}", env={"KVSTORE_REPLICA_GRACE_S": "2"})
    seed = cluster.nodes["n0"].address
    _create(seed, replicas=2)
    cmap = cluster_map(seed)
    keys = np.arange(0, 500, dtype=np.int64)
    with Client(seed, timeout=10) as client:
        schema = client.describe_table(TABLE).schema
        _write(cmap, schema, keys)
        cluster.nodes["n2"].kill()
        # Its lease lapses (5 s), the grace passes (2 s): its replicas go to n0 and n1,
        # copied from the surviving replica of each shard.
        cmap = _wait_map(
            seed,
            lambda m: (
                not _states_on("n2")(m)
                and _states_on("n0")(m) == _states_on("n1")(m) == {"Available"}
            ),
            CATCH_UP_TIMEOUT_S,
            "n2's replicas to be replaced",
        )
        assert all({n for n, _, _ in rs} == {"n0", "n1"} for rs in placed_replicas(cmap, TABLE))
        _same_on_every_replica(cmap, keys)
        check_all(client.get(TABLE, keys), keys)


def test_a_bulk_load_while_a_replica_is_down_commits_and_the_replica_installs_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    for i in range(3):
        cluster.start(f"n{i}", env={"KVSTORE_REPLICA_GRACE_S": "600"})
    seed = cluster.nodes["n0"].address
    _create(seed, replicas=2)

    # Every replica of a shard gets the load's files and installs the version.
    first = np.arange(0, 500, dtype=np.int64)
    _parquet(tmp_path / "first.parquet", first)
    load(seed, TABLE, str(tmp_path / "first.parquet"), progress=False)
    _same_on_every_replica(cluster_map(seed), first)

    # n1 is down (its lease lapsed): a load commits on the replicas that are up.
    cluster.nodes["n1"].kill()
    _wait_map(seed, lambda m: _node_state(m, "n1") == "down", 30, "n1 to be down")
    every = np.arange(0, 1000, dtype=np.int64)
    _parquet(tmp_path / "second.parquet", every)
    load(seed, TABLE, str(tmp_path / "second.parquet"), progress=False)
    version = next(t.version for t in cluster_map(seed).tables if t.table == TABLE)
    assert version == 2

    # Back, n1 copies version 2 of its shards from the peers before it serves them.
    cluster.start("n1")
    cmap = _wait_map(
        seed,
        lambda m: _node_state(m, "n1") == "live" and _states_on("n1")(m) == {"Available"},
        CATCH_UP_TIMEOUT_S,
        "n1 to install the version",
    )
    _same_on_every_replica(cmap, every)
    with Client(seed, timeout=10) as client:
        check_all(client.get(TABLE, every), every)
        assert client.get(TABLE, every).version == version


def _parquet(path: Path, keys: np.ndarray) -> None:
    pq.write_table(pa.table(feature_rows(keys)), path)


def _node_state(cmap: pb.ClusterMap, node_id: str) -> str:
    return next(n.state for n in cmap.nodes if n.node_id == node_id)


def test_a_node_stopped_past_its_lease_catches_up_once_continued(
    cluster: Cluster, tmp_path: Path
) -> None:
    hold = tmp_path / "hold-catch-up"  # absent until the node is stopped
    for i in range(3):
        env = {"KVSTORE_REPLICA_GRACE_S": "600", FAULT_HOLD_CATCH_UP: str(hold)}
        cluster.start(f"n{i}", env=env)
    seed = cluster.nodes["n0"].address
    _create(seed, replicas=2)
    cmap = cluster_map(seed)
    first = np.arange(0, 300, dtype=np.int64)
    with Client(seed, timeout=10) as client:
        schema = client.describe_table(TABLE).schema
        _write(cmap, schema, first)
        stopped = cluster.nodes["n1"]
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            _wait_map(seed, lambda m: _node_state(m, "n1") == "down", 30, "n1's lease to lapse")
            missed = np.arange(300, 600, dtype=np.int64)
            _write(cmap, schema, missed, skip="n1")
            hold.touch()
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        # It registers again, marks its replicas Initializing (held here) ...
        _wait_map(
            seed,
            lambda m: _node_state(m, "n1") == "live" and _states_on("n1")(m) == {"Initializing"},
            30,
            "n1 to register again and catch up",
        )
        hold.unlink()
        # ... and serves them once caught up: the writes it missed included.
        cmap = _wait_map(
            seed,
            lambda m: _states_on("n1")(m) == {"Available"},
            CATCH_UP_TIMEOUT_S,
            "n1 to catch up",
        )
        every = np.arange(0, 600, dtype=np.int64)
        _same_on_every_replica(cmap, every)
        check_all(client.get(TABLE, every), every)
