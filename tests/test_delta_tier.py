"""The delta tier's RocksDB options (a hashed memtable with a whole-key bloom filter,
``kvstore.storage.shard.delta_options``) change how fast online rows are found, never
what a read answers or what a scan of the delta sees."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import rocksdict
from helpers import SMALL_FEATURES as FEATURES
from helpers import small_version

from kvstore import Client
from kvstore.columns import encode_rows
from kvstore.config import NodeConfig
from kvstore.errors import CorruptValue
from kvstore.keys import KeyBatch
from kvstore.schema import TableSchema
from kvstore.server.node import Node, Position, run_steps
from kvstore.storage.shard import rocksdb_options

HOUR_US = 3600 * 1_000_000


def _rows(client: Client, keys: list[int]) -> dict[int, dict | None]:
    got = client.get("t", keys).to_pylist()
    return {
        k: (None if r is None else {f: r[f] for f in FEATURES})
        for k, r in zip(keys, got, strict=True)
    }


def test_online_rows_read_back_through_a_node_before_and_after_a_version_swap(
    start_node, tmp_path: Path
) -> None:
    node = start_node()
    now = int(time.time() * 1e6)
    with Client(node.address) as client:
        client.create_table("t", key="int64", features=FEATURES, shards=4, ttl={"x": 3600})
        # Snapshot 3 h ago: rows written online 2 h ago are newer than it.
        v1 = small_version(tmp_path / "v1.parquet", range(300), 0)
        client.load("t", v1, progress=False, snapshot_time_us=now - 3 * HOUR_US)
        # Their event time is the snapshot's: x, with a TTL of 1 h, has expired in them.
        expect: dict[int, dict | None] = {
            k: {"a": k, "s": f"base0-{k}", "x": None} for k in range(300)
        }
        # Updates of bulk rows, in one feature.
        updated = list(range(0, 300, 3))
        client.write("t", {"key": updated, "a": [-k for k in updated]})
        for k in updated:
            expect[k]["a"] = -k  # type: ignore[index]
        # Rows only the delta holds, whole; some of them with an expired x.
        fresh = list(range(1000, 1400))
        client.write(
            "t",
            {
                "key": fresh,
                "a": fresh,
                "s": [f"new-{k}" for k in fresh],
                "x": [1.5] * len(fresh),
            },
        )
        stale = list(range(1400, 1450))
        client.write(
            "t",
            {"key": stale, "a": stale, "s": ["old"] * 50, "x": [2.5] * 50},
            event_time=now - 2 * HOUR_US,
        )
        for k in fresh:
            expect[k] = {"a": k, "s": f"new-{k}", "x": 1.5}
        for k in stale:
            expect[k] = {"a": k, "s": "old", "x": None}  # x is older than its TTL
        # Deletes of bulk rows, of updated rows and of delta rows.
        deleted = [5, 6, 9, 1003, 1401]
        client.delete("t", deleted)
        for k in deleted:
            expect[k] = None
        keys = [*range(-5, 300), *range(995, 1455)]
        for k in keys:
            expect.setdefault(k, None)
        assert _rows(client, keys) == {k: expect[k] for k in keys}

        # A new version, snapshot now: it holds everything written before it.
        client.load("t", small_version(tmp_path / "v2.parquet", range(100, 400), 7), progress=False)
        after = {k: None for k in keys}
        after.update({k: {"a": k + 7, "s": f"base7-{k}", "x": k / 2} for k in range(100, 400)})
        keys2 = [*keys, *range(300, 400)]
        after.update({k: after.get(k) for k in keys2})
        assert _rows(client, keys2) == after
        # Writes after the swap read over the new version.
        client.write("t", {"key": [150, 2000], "s": ["late", "late"]})
        after[150] = {**after[150], "s": "late"}  # type: ignore[dict-item]
        after[2000] = {"a": None, "s": "late", "x": None}
        assert _rows(client, [150, 2000, 151]) == {k: after[k] for k in (150, 2000, 151)}


def _open(path: Path, previous_options: bool) -> Node:
    config = NodeConfig(data_dir=path)
    config.load()
    node = Node(config)
    if previous_options:  # the delta as it was opened before delta_options
        node.engine.delta_options = rocksdb_options(rocksdict.Cache(8 << 20))
    node.open()
    return node


def _apply(node: Node, step: int) -> None:
    """The same online writes on any node: rows, partial updates, deletes, a position."""
    if step == 0:
        node.create_table(TableSchema.build("t", "int64", {"a": "int64", "s": "string"}, shards=3))
    schema = node.table("t").schema
    keys = np.arange(step * 500, step * 500 + 2000, dtype=np.int64)
    data = {"key": keys, "a": keys * 10, "s": [f"s{step}-{k}" for k in keys.tolist()]}
    if step % 2:
        data.pop("s")
    rows = encode_rows(schema, data, event_time=1_700_000_000_000_000 + step)
    position = Position("c", "src", step % 2, step)
    run_steps(
        node.write_steps(
            "t", schema.schema_id, rows.keys, rows.rows, rows.offsets, rows.features, position
        )
    )
    gone = KeyBatch("int64", ints=np.arange(step * 500, step * 500 + 2000, 7, dtype=np.int64))
    run_steps(node.delete_steps("t", gone, 1_700_000_000_000_000 + step))


@pytest.mark.parametrize("flush_between", [False, True])
def test_the_delta_answers_and_scans_as_with_the_previous_options(
    tmp_path: Path, flush_between: bool
) -> None:
    nodes = {name: _open(tmp_path / name, name == "previous") for name in ("previous", "now")}
    try:
        for step in range(4):
            for node in nodes.values():
                _apply(node, step)
                if flush_between and step == 1:
                    for shard in node.table("t").delta:
                        shard.flush()  # later steps: some keys in files, some in the memtable
        probe = KeyBatch("int64", ints=np.arange(-10, 4000, dtype=np.int64))
        answers = {name: node.get("t", probe, []) for name, node in nodes.items()}
        a, b = answers["previous"], answers["now"]
        assert a.values == b.values
        assert a.lengths.tolist() == b.lengths.tolist()
        assert (a.order is None and b.order is None) or a.order.tolist() == b.order.tolist()
        assert (b.lengths >= 0).sum() > 2500  # the probe found rows: the test reads something
        # Scans: every key in order, the positions, and emptiness.
        for name, node in nodes.items():
            for shard in node.table("t").delta:
                keys = [k for chunk, _ in shard.scan(chunk=100) for k in chunk]
                assert keys == sorted(keys), name
            assert node.consumer_positions("t", "c", "src") == {0: 2, 1: 3}, name
        scans = {
            name: [list(shard.scan()) for shard in node.table("t").delta]
            for name, node in nodes.items()
        }
        assert scans["previous"] == scans["now"]
        for node in nodes.values():
            shard = node.table("t").delta[0]
            assert not shard.empty
            keys = [k for chunk, _ in shard.scan() for k in chunk]
            shard.write([], keys + [k for k, _ in shard.prefix_items(b"\xff\xfe")])
            shard.recheck_empty()
            assert shard.empty
    finally:
        for node in nodes.values():
            node.close()


@pytest.mark.parametrize("hot_rows_bytes", [0, 1 << 20])  # overlay_join / the cache's path
def test_a_corrupt_delta_row_is_named_by_its_shard_and_key(
    tmp_path: Path, hot_rows_bytes: int
) -> None:
    config = NodeConfig(data_dir=tmp_path / "data", hot_rows_bytes=hot_rows_bytes)
    config.load()
    node = Node(config)
    node.open()
    try:
        _apply(node, 0)
        keys = np.arange(0, 60, dtype=np.int64)
        before = node.get("t", KeyBatch("int64", ints=keys), [])
        # The delta row of a key of the last shard, damaged behind the node's back.
        order, groups = KeyBatch("int64", ints=keys).shard_groups(3)
        # The first key of shard 2: at a boundary between two shards in the answer.
        stored = dict(groups)[2][0]
        damaged = int(keys[order[sum(len(k) for s, k in groups if s < 2)]])
        node.table("t").delta[2].write([(stored, b"\x02garbage")])
        with pytest.raises(CorruptValue, match=rf"^table 't', shard 2, key {damaged}: .*corrupt"):
            node.get("t", KeyBatch("int64", ints=keys), [])
        # The other keys still read as before.
        others = keys[keys != damaged]
        after = node.get("t", KeyBatch("int64", ints=others), [])
        assert sorted(after.lengths.tolist()) == sorted(
            np.delete(before.lengths, np.argsort(before.order)[damaged]).tolist()
        )
    finally:
        node.close()
