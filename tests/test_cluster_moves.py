"""Moving shards with their data (docs/cluster.md, "Moves"): a node joining takes its
share of the existing shards, ``kvstore drain`` moves a node's shards away; the new
node copies the base versions and the delta, catches up, and takes over with no read
failing and no acknowledged write lost, through real node processes on a real etcd.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cluster_fixtures import (
    FEATURES,
    KEYS,
    SHARDS,
    Cluster,
    check_all,
    cluster_map,
    feature_rows,
    placed_replicas,
    settled_counts,
)

from kvstore import Client
from kvstore.cluster.moves import FAULT_EXIT_AFTER_COPY_CHUNKS, FAULT_EXIT_AT_HANDOVER
from kvstore.columns import encode_rows
from kvstore.errors import LoadConflict, StaleMap, from_rpc_error
from kvstore.ingest.bulk import load
from kvstore.keys import KeyBatch
from kvstore.server.process import NodeProcess, NodeProcessError, wait_until
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire.dial import open_channel

#: Keys the writer thread writes during a move: apart from the reader's KEYS.
WRITER_BASE = 100_000
MOVES_TIMEOUT_S = 120.0


def _table_with_data(client: Client, name: str, tmp_path: Path) -> None:
    """A table whose first half of KEYS comes from a bulk version (base) and whose
    second half from writes (delta); every key reads as ``feature_rows``."""
    client.create_table(name, key="int64", features=FEATURES, shards=SHARDS)
    half = KEYS[: len(KEYS) // 2]
    file = tmp_path / f"{name}.parquet"
    pq.write_table(pa.table(feature_rows(half)), file)
    load(client.address, name, str(file), progress=False)
    client.write(name, feature_rows(KEYS[len(KEYS) // 2 :]))
    check_all(client.get(name, KEYS), KEYS)


class Traffic:
    """A reader checking every key in a loop and a writer writing new keys, each on its
    own client and thread, counting failures and keeping every acknowledged write."""

    def __init__(self, address: str, table: str) -> None:
        self.address = address
        self.table = table
        self.stop = threading.Event()
        self.reads = self.writes = 0
        self.read_errors: list[str] = []
        self.write_errors: list[str] = []
        self.acked: list[np.ndarray] = []
        self.threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._write, daemon=True),
        ]

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _read(self) -> None:
        with Client(self.address, timeout=10) as client:
            while not self.stop.is_set():
                try:
                    check_all(client.get(self.table, KEYS), KEYS)
                except Exception as exc:  # counted: the test asserts there are none
                    self.read_errors.append(f"{type(exc).__name__}: {exc}")
                self.reads += 1

    def _write(self) -> None:
        with Client(self.address, timeout=10) as client:
            batch = 0
            while not self.stop.is_set():
                keys = WRITER_BASE + batch * 24 + np.arange(24, dtype=np.int64)
                batch += 1
                try:
                    client.write(self.table, feature_rows(keys))
                except Exception as exc:
                    epoch = client._ops.route.epoch
                    self.write_errors.append(
                        f"{time.time():.3f} (map epoch {epoch}) {type(exc).__name__}: {exc}"
                    )
                    continue
                self.acked.append(keys)
                self.writes += 1

    def check(self, client: Client) -> None:
        """No read or write failed, reads and writes happened, every acked write reads back."""
        assert not self.read_errors, self.read_errors[:5]
        assert not self.write_errors, self.write_errors[:5]
        assert self.reads > 0 and self.writes > 0
        written = np.concatenate(self.acked)
        check_all(client.get(self.table, written), written)


def test_a_fourth_node_joins_during_reads_and_writes_and_takes_its_share(
    cluster: Cluster, tmp_path: Path
) -> None:
    for i in range(3):
        cluster.start(f"n{i}")
    seed = cluster.nodes["n0"].address
    name = "joined"
    with Client(seed, timeout=10) as client:
        _table_with_data(client, name, tmp_path)
        before = client.cluster_map()
        with Traffic(seed, name) as traffic:
            wait_until(lambda: traffic.reads > 2 and traffic.writes > 2, 30, "traffic")
            cluster.start("n3")
            counts = wait_until(
                lambda: settled_counts(client.address, name),
                MOVES_TIMEOUT_S,
                "the join's moves to finish",
            )
            reads_at_end = traffic.reads
            wait_until(lambda: traffic.reads > reads_at_end + 2, 30, "reads after the moves")
        assert sorted(counts.values()) == [3, 3, 3, 3], counts  # 12 shards over 4 nodes
        traffic.check(client)
        check_all(client.get(name, KEYS), KEYS)
        after = client.cluster_map()

    # kvstore cluster status shows the newcomer with its shards.
    out = subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "cluster", "status", "-a", seed],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "MOVING" in out.stdout
    line = next(line for line in out.stdout.splitlines() if line.startswith("n3 "))
    assert cluster.nodes["n3"].address in line and " 3 " in line, line

    # A write sent to the old owner of a moved shard is refused with StaleMap and never
    # applied there; the key stays absent everywhere.
    index = {n["node_id"]: i for i, n in enumerate(after["nodes"])}
    moved = [s for s, o in enumerate(after["tables"][name]) if o == index["n3"]]
    old_owner = before["nodes"][before["tables"][name][moved[0]]]["address"]
    key = next(
        k
        for k in range(200_000, 300_000)
        if KeyBatch.from_values("int64", np.array([k]), name).shard_ids(SHARDS)[0] == moved[0]
    )
    with Client(seed, timeout=10) as client:
        schema = client.describe_table(name).schema
        rows = encode_rows(schema, feature_rows(np.array([key])), "key", 1_000)
        request = pb.WriteRequest(
            table=name,
            schema_id=schema.schema_id,
            keys=rows.keys.to_proto(),
            rows=rows.rows,
            row_offsets=rows.offsets.astype("<i8").tobytes(),
            features=rows.features,
        )
        with open_channel(old_owner) as channel, pytest.raises(grpc.RpcError) as caught:
            pb_grpc.FeatureStoreStub(channel).Write(request, timeout=10)
        error = from_rpc_error(caught.value, old_owner, 10)
        assert isinstance(error, StaleMap), error
        assert error.epoch == after["epoch"]
        assert not client.get(name, [key]).found.any()


def _drain(address: str, node_id: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "drain", node_id, "-a", address, *extra],
        capture_output=True,
        text=True,
        timeout=MOVES_TIMEOUT_S + 30,
    )


def test_kvstore_drain_moves_a_nodes_shards_away_during_reads_and_writes(
    cluster: Cluster, tmp_path: Path
) -> None:
    for i in range(3):
        cluster.start(f"n{i}")
    seed = cluster.nodes["n0"].address
    name = "drained"
    with Client(seed, timeout=10) as client:
        _table_with_data(client, name, tmp_path)
        with Traffic(seed, name) as traffic:
            wait_until(lambda: traffic.reads > 2 and traffic.writes > 2, 30, "traffic")
            out = _drain(seed, "n2")
            assert out.returncode == 0, out.stdout + out.stderr
            assert "n2 holds no shard: it may stop" in out.stdout
            counts = settled_counts(client.address, name)
            assert counts == {"n0": 6, "n1": 6}, counts
            # n2 stops; nothing fails.
            cluster.nodes["n2"].stop()
            reads_at_stop = traffic.reads
            wait_until(lambda: traffic.reads > reads_at_stop + 3, 30, "reads after n2 stopped")
        traffic.check(client)
        check_all(client.get(name, KEYS), KEYS)


def test_drain_of_the_last_node_or_an_unknown_one_is_refused(cluster: Cluster) -> None:
    node = cluster.start("n0")
    with Client(node.address, timeout=10) as client:
        client.create_table("alone", key="int64", features=FEATURES, shards=4)
        epoch = client.cluster_map()["epoch"]
    out = _drain(node.address, "n0")
    assert out.returncode == 1
    assert "last node that can hold table 'alone'" in out.stderr, out.stderr
    assert "add a node before draining" in out.stderr
    out = _drain(node.address, "nx")
    assert out.returncode == 1
    assert "node 'nx' is not one of the cluster's nodes" in out.stderr, out.stderr
    with Client(node.address, timeout=10) as client:
        assert client.cluster_map()["epoch"] == epoch  # nothing was written


def test_a_target_killed_mid_copy_starts_the_move_over_once_restarted(
    cluster: Cluster, tmp_path: Path
) -> None:
    for i in range(2):
        cluster.start(f"n{i}")
    seed = cluster.nodes["n0"].address
    name = "restarted"
    with Client(seed, timeout=10) as client:
        _table_with_data(client, name, tmp_path)
    # It may die before it reports serving: the copy begins during its start.
    with contextlib.suppress(NodeProcessError):
        cluster.start("n2", env={FAULT_EXIT_AFTER_COPY_CHUNKS: "3"})
    crashed = cluster.nodes.get("n2")
    if crashed is not None:
        wait_until(lambda: not crashed.running(), 60, "the fault hook to stop n2")
    with Client(seed, timeout=10) as client:
        replicas = placed_replicas(cluster_map(client.address), name)
        assert any(
            (p.node, p.state) == ("n2", "Initializing") for r in replicas for p in r
        )  # the move is pending
        # A bulk load of a table with a shard moving is refused until the move is done.
        file = tmp_path / "during.parquet"
        pq.write_table(pa.table(feature_rows(KEYS[:10])), file)
        with pytest.raises(LoadConflict, match="moving between nodes"):
            load(seed, name, str(file), progress=False)
        cluster.start("n2")
        counts = wait_until(
            lambda: settled_counts(client.address, name),
            MOVES_TIMEOUT_S,
            "the moves to n2 to finish",
        )
        assert sorted(counts.values()) == [4, 4, 4], counts
        check_all(client.get(name, KEYS), KEYS)


def test_a_target_dead_after_the_seal_loses_no_write_and_the_move_finishes_later(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The source's writes to the sealed shard wait, then it gives the hand-over up (the
    move's attempt bumped by CAS) and takes them again; the restarted target starts a
    new attempt and finishes."""
    for i in range(2):
        cluster.start(f"n{i}")
    seed = cluster.nodes["n0"].address
    name = "handover"
    with Client(seed, timeout=10) as client:
        _table_with_data(client, name, tmp_path)
        with Traffic(seed, name) as traffic:
            wait_until(lambda: traffic.reads > 2 and traffic.writes > 2, 30, "traffic")
            with contextlib.suppress(NodeProcessError):
                cluster.start("n2", env={FAULT_EXIT_AT_HANDOVER: "1"})
            crashed = cluster.nodes.get("n2")
            if crashed is not None:
                wait_until(lambda: not crashed.running(), 60, "the fault hook to stop n2")

            def given_up() -> bool:  # the source's log says so (see transfer._give_up)
                return any(
                    "will start over; writes resume here" in _log(cluster.nodes[n])
                    for n in ("n0", "n1")
                )

            wait_until(given_up, 30, "the source to give the hand-over up")
            writes_then = traffic.writes
            wait_until(lambda: traffic.writes > writes_then + 3, 30, "writes after it")
            cluster.start("n2")
            counts = wait_until(
                lambda: settled_counts(client.address, name),
                MOVES_TIMEOUT_S,
                "the moves to n2 to finish",
            )
        assert sorted(counts.values()) == [4, 4, 4], counts
        traffic.check(client)
        check_all(client.get(name, KEYS), KEYS)


def _log(node: NodeProcess) -> str:
    """The node's whole log (it is appended to across restarts)."""
    return node.log_path.read_text(errors="replace")
