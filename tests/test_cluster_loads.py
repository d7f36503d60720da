"""Bulk loads across a cluster of 3 node processes on a real etcd: each shard's files go
to the node holding it, one etcd transaction makes the version current everywhere, a
get never mixes versions, rollback is cluster-wide, and a load that fails on one node
leaves the old version current on all of them.

Every node is ``kvstore serve --etcd URL`` (kvstore.server.process.NodeProcess); the
rows of each load carry a ``load`` column saying which load wrote them.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cluster_fixtures import START_TIMEOUT_S, Cluster

from kvstore import Client
from kvstore.errors import KvstoreError
from kvstore.ingest.bulk import load
from kvstore.server.loads import FAULT_EXIT_AFTER_UPLOAD_CHUNKS, FAULT_EXIT_STATUS
from kvstore.server.process import NodeProcess, wait_until

FEATURES = {"load": "int32", "value": "int64"}
KEYS = np.arange(3_000, dtype=np.int64)
SHARDS = 12


@pytest.fixture
def three(cluster: Cluster) -> Cluster:
    """Three nodes of a fresh cluster (a test may stop and restart them)."""
    for i in range(3):
        cluster.start(f"n{i}")
    return cluster


def _snapshot(path: Path, number: int) -> str:
    """A Parquet file of every key, written by load ``number``: value = key * number."""
    rows = pa.table(
        {
            "key": KEYS,
            "load": np.full(len(KEYS), number, dtype=np.int32),
            "value": KEYS * number,
        }
    )
    file = path / f"load-{number}.parquet"
    pq.write_table(rows, file)
    return str(file)


def _create(client: Client) -> str:
    name = f"loads_{uuid.uuid4().hex[:6]}"
    client.create_table(name, key="int64", features=FEATURES, shards=SHARDS)
    return name


def _read_all(client: Client, table: str, version: int = 0) -> tuple[int, int]:
    """(the load every row came from, the version that answered); fails on a mix."""
    result = client.get(table, KEYS, version=version)
    assert result.found.all()
    columns = result.to_numpy()
    loads = np.unique(columns["load"])
    assert len(loads) == 1, f"one get read loads {loads.tolist()}"
    np.testing.assert_array_equal(columns["value"], KEYS * int(loads[0]))
    return int(loads[0]), result.version


def _current_on_each(cluster: Cluster, table: str) -> list[int]:
    versions = []
    for node in cluster.nodes.values():
        with Client(node.address, timeout=10, transport="grpc") as client:
            versions.append(client.describe_table(table).version)
    return versions


def test_a_load_sends_each_shard_to_its_node_and_every_key_reads_the_new_version(
    three: Cluster, tmp_path: Path
) -> None:
    n0 = three.nodes["n0"]
    with Client(n0.address, timeout=10) as client:
        table = _create(client)
        owners = client.cluster_map()["tables"][table]
        assert len(set(owners)) == 3  # spread: every node holds shards of the table
        summary = load(n0.address, table, _snapshot(tmp_path, 1), progress=False)
        assert summary.rows == len(KEYS)
        # load() returns once every node serves the version.
        assert _current_on_each(three, table) == [summary.version] * 3
        assert _read_all(client, table) == (1, summary.version)
        table_map = client.cluster_map()
        assert table_map["epoch"] > 0
    # Each node holds the rows of its own shards only: together, every key once.
    held = 0
    for node in three.nodes.values():
        with Client(node.address, timeout=10, transport="grpc") as other:
            (info,) = [v for v in other.versions(table) if v.current]
            assert info.version == summary.version
            held += info.rows
            assert _read_all(other, table) == (1, summary.version)
    assert held == len(KEYS)


def test_a_second_load_and_a_rollback_never_mix_versions_in_one_get(
    three: Cluster, tmp_path: Path
) -> None:
    n0, n1 = three.nodes["n0"], three.nodes["n1"]
    with Client(n0.address, timeout=10) as client:
        table = _create(client)
        first = load(n0.address, table, _snapshot(tmp_path, 1), progress=False)
        # (load, version) each time the reader's answer changed.
        history: list[tuple[int, int]] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def reader() -> None:
            # Its own client, through another seed: it learns nothing from the loader.
            with Client(n1.address, timeout=10) as own:
                while not stop.is_set():
                    try:
                        answer = _read_all(own, table)
                    except BaseException as exc:  # an assertion: a mixed get
                        errors.append(exc)
                        return
                    if not history or history[-1] != answer:
                        history.append(answer)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        try:
            second = load(n0.address, table, _snapshot(tmp_path, 2), progress=False)
            assert second.version > first.version
            wait_until(
                lambda: (2, second.version) in history or bool(errors),
                30,
                "the reader to see load 2",
            )
            # Back and forth: each switch reaches the nodes a few ms apart, a window in
            # which an unguarded batch would read some shards of each version.
            expected = [(1, first.version), (2, second.version)]
            for number, version in [(1, first.version), (2, second.version)] * 3:
                to = version if number == 2 else 0  # 0: the version before the current
                assert client.rollback(table, to_version=to).version == version
                wait_until(
                    lambda v=version: _current_on_each(three, table) == [v] * 3,
                    30,
                    f"every node to make version {version} current",
                )
                wait_until(
                    lambda a=(number, version): history[-1] == a or bool(errors),
                    30,
                    f"the reader to see load {number}",
                )
                expected.append((number, version))
            # A get after the rollback reads load 1 again.
            assert client.rollback(table).version == first.version
            assert _read_all(client, table) == (1, first.version)
            expected.append((1, first.version))
            wait_until(
                lambda: history[-1] == (1, first.version) or bool(errors),
                30,
                "the reader to see the rollback",
            )
        finally:
            stop.set()
            thread.join(30)
        assert not errors, errors[0]
        assert history == expected
        # The rolled-back version stays readable, pinned, on every node.
        assert _read_all(client, table, version=second.version) == (2, second.version)
        # And it can be made current again by a rollback "forward".
        assert client.rollback(table, to_version=second.version).version == second.version
        wait_until(
            lambda: _current_on_each(three, table) == [second.version] * 3,
            30,
            "every node to follow",
        )


def test_a_load_that_fails_on_one_node_leaves_the_old_version_current_everywhere(
    three: Cluster, tmp_path: Path
) -> None:
    n0 = three.nodes["n0"]
    with Client(n0.address, timeout=10) as client:
        table = _create(client)
        first = load(n0.address, table, _snapshot(tmp_path, 1), progress=False)

    # n2 again (same id and data), with the fault hook: it exits, as a crash would, on
    # the first upload chunk it receives.
    old = three.nodes["n2"]
    assert old.stop() == 0
    crashing = NodeProcess(
        old.data_dir,
        *("--etcd", three.etcd.url, "--cluster", three.name, "--node-id", "n2"),
        log_path=tmp_path / "n2-fault.log",
        env={FAULT_EXIT_AFTER_UPLOAD_CHUNKS: "1"},
        start_timeout_s=START_TIMEOUT_S,
    ).start()
    three.nodes["n2"] = crashing
    with pytest.raises(KvstoreError):
        load(n0.address, table, _snapshot(tmp_path, 2), progress=False, timeout=10)
    assert crashing.proc.wait(10) == FAULT_EXIT_STATUS, crashing.log_tail()

    restarted = three.start("n2")
    with Client(n0.address, timeout=10) as client:
        assert _current_on_each(three, table) == [first.version] * 3

        def read() -> tuple[int, int] | None:
            try:
                return _read_all(client, table)
            except KvstoreError:  # n2 not registered again yet: its old address
                return None

        assert wait_until(read, 30, "every key readable") == (1, first.version)
        # The aborted load left nothing staged: the next load gets a new number and works.
        retry = load(n0.address, table, _snapshot(tmp_path, 3), progress=False)
        assert retry.version > first.version + 1
        assert _current_on_each(three, table) == [retry.version] * 3
        assert _read_all(client, table) == (3, retry.version)
    assert restarted.running()
