"""Table formats of the bulk versions (``--base-format plain|block``).

The loader builds each shard of a version as a RocksDB database in the format the node
names; the node moves it in, opens it and checks it before the swap. Versions keep the
format they were loaded with, so one table can hold both, and versions loaded before
formats existed (no ``format`` in the catalog) open as block-based.
"""

from __future__ import annotations

import errno
import json
import os
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvstore import Client, InvalidArgument
from kvstore.config import NodeConfig
from kvstore.errors import LoadConflict, StorageFull
from kvstore.ingest import bulk_job, bulk_shard_db, bulk_upload
from kvstore.ingest.bulk import load
from kvstore.ingest.bulk_sort import Chunk, IntKeys
from kvstore.schema import TableSchema
from kvstore.server.loads import LoadStaging
from kvstore.server.node import Node
from kvstore.v1 import feature_store_pb2 as pb

ROWS = 3000


def _snapshot(salt: int, n: int = ROWS) -> pa.Table:
    keys = np.arange(n, dtype=np.int64) * 7 - 1000  # negative keys too
    return pa.table(
        {
            "key": keys,
            "x": (keys * 2 + salt).astype(np.float32),
            "tag": [f"t{k}-{salt}" for k in keys.tolist()],
        }
    )


def _load(address: str, tmp_path: Path, table: str, data: pa.Table, name: str) -> int:
    pq.write_table(data, tmp_path / f"{name}.parquet")
    return load(address, table, str(tmp_path / f"{name}.parquet"), progress=False).version


def _read(client: Client, table: str, keys, version: int = 0) -> list[dict]:
    return client.get(table, keys, version=version).to_pylist()


def _expected(data: pa.Table) -> list[dict]:
    return data.to_pylist()


def _assert_first_load_refused(node, tmp_path: Path, match: str) -> None:
    """The first load of a new two-shard table is refused (InvalidArgument matching
    ``match``): no version appears, nothing is served, the staging area is empty."""
    with Client(node.address, timeout=10) as c:
        c.create_table("t", key="int64", features={"x": "float32", "tag": "string"}, shards=2)
        with pytest.raises(InvalidArgument, match=match):
            _load(node.address, tmp_path, "t", _snapshot(1), "v1")
        assert c.versions("t") == []
        assert not c.get("t", [-1000]).found.any()
    assert os.listdir(node.data_dir / "cold" / "staging") == []


def test_both_formats_serve_side_by_side_and_an_old_catalog_opens_as_block(
    start_node, tmp_path: Path
) -> None:
    node = start_node("--base-format", "block")
    v1_data, v2_data = _snapshot(1), _snapshot(2)
    keys = v1_data["key"].to_numpy()
    with Client(node.address, timeout=10) as c:
        c.create_table("t", key="int64", features={"x": "float32", "tag": "string"}, shards=4)
        v1 = _load(node.address, tmp_path, "t", v1_data, "v1")
        assert [v.format for v in c.versions("t")] == ["block"]
    node.stop()

    # A catalog written before versions had a format: its versions are block-based.
    catalog_path = node.data_dir / "catalog.json"
    catalog = json.loads(catalog_path.read_text())
    for entry in catalog["tables"].values():
        for meta in entry["versions"].values():
            del meta["format"]
    catalog_path.write_text(json.dumps(catalog))

    node = start_node(data_dir=node.data_dir)  # the default format: plain
    with Client(node.address, timeout=10) as c:
        assert _read(c, "t", keys) == _expected(v1_data)
        v2 = _load(node.address, tmp_path, "t", v2_data, "v2")
        formats = {v.version: (v.format, v.current) for v in c.versions("t")}
        assert formats == {v1: ("block", False), v2: ("plain", True)}
        assert _read(c, "t", keys) == _expected(v2_data)
        assert _read(c, "t", keys, version=v1) == _expected(v1_data)  # pinned: block
        # Keys between, below and above the loaded ones are missing in both formats.
        absent = np.array([-1001, -999, 2, 5, 7 * ROWS, 2**62], np.int64)
        assert not c.get("t", absent).found.any()
        assert not c.get("t", absent, version=v1).found.any()
        c.rollback("t", v1)
        assert _read(c, "t", keys) == _expected(v1_data)
    node.stop()
    # A version directory the catalog does not name (a crash between moving a load's
    # shards in and the catalog write) is moved aside at start, not deleted.
    [table_dir] = (node.data_dir / "cold" / "tables").glob("t-*")
    (table_dir / "v000099" / "shard-0000").mkdir(parents=True)

    node = start_node(data_dir=node.data_dir)
    assert sorted(p.name for p in table_dir.glob("v*")) == [f"v{v1:06d}", f"v{v2:06d}"]
    [moved] = (node.data_dir / "cold" / "orphans").iterdir()
    assert moved.name.startswith(f"{table_dir.name}-v000099-") and (moved / "shard-0000").is_dir()
    with Client(node.address, timeout=10) as c:
        assert _read(c, "t", keys) == _expected(v1_data)
        assert _read(c, "t", keys, version=v2) == _expected(v2_data)


@pytest.mark.parametrize("table_format", ["plain", "block"])
def test_string_keys_sharing_long_prefixes_are_told_apart(
    start_node, tmp_path: Path, table_format: str
) -> None:
    # PlainTable hashes a key's first 128 bytes: keys that share a long prefix, keys
    # longer than 128 bytes that differ only after it, short keys, and absent keys with
    # a loaded key's prefix must all still be exact.
    node = start_node("--base-format", table_format)
    long = "x" * 128
    keys = [f"user_000000{i:05d}" for i in range(0, 4000, 2)] + ["", "a", "ab", "é", "user_0"]
    keys += [f"{long}{i}" for i in range(0, 100, 2)]
    data = pa.table({"key": keys, "n": np.arange(len(keys), dtype=np.int64)})
    with Client(node.address, timeout=10) as c:
        c.create_table("s", key="string", features={"n": "int64"}, shards=3)
        _load(node.address, tmp_path, "s", data, "s")
        res = c.get("s", keys)
        assert res.found.all()
        assert res.to_numpy()["n"].tolist() == list(range(len(keys)))
        absent = [f"user_000000{i:05d}" for i in range(1, 4000, 2)] + ["user_", "user_00", "b"]
        absent += [f"{long}{i}" for i in range(1, 100, 2)] + [long, long + "00"]
        assert not c.get("s", absent).found.any()
        assert [v.format for v in c.versions("s")] == [table_format]


def test_a_shard_database_missing_a_file_is_refused_and_the_current_version_serves(
    start_node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = start_node()
    with Client(node.address, timeout=10) as c:
        c.create_table("t", key="int64", features={"x": "float32", "tag": "string"}, shards=4)
        v1 = _load(node.address, tmp_path, "t", _snapshot(1), "v1")
        keys = _snapshot(1)["key"].to_numpy()

        shipped = bulk_shard_db.shipped_files

        def without_current(directory: str) -> list[str]:
            names = shipped(directory)
            return [n for n in names if n != "CURRENT"] if directory.endswith("2") else names

        monkeypatch.setattr(bulk_shard_db, "shipped_files", without_current)
        with pytest.raises(InvalidArgument, match=r"table 't': shard 2: RocksDB could not open"):
            _load(node.address, tmp_path, "t", _snapshot(2), "v2")

        assert [(v.version, v.current) for v in c.versions("t")] == [(v1, True)]
        assert _read(c, "t", keys) == _expected(_snapshot(1))
        staging = node.data_dir / "cold" / "staging"
        assert os.listdir(staging) == []
        tables = node.data_dir / "cold" / "tables"
        assert [p.name for p in tables.glob("*/v*")] == [f"v{v1:06d}"]


def test_a_database_in_another_format_than_the_node_asked_for_is_refused(
    start_node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = start_node()  # asks for plain
    begin = bulk_upload.LoadSession.begin

    def build_block(self, *args) -> None:
        begin(self, *args)
        assert self.base_format == "plain"
        self.base_format = "block"

    monkeypatch.setattr(bulk_upload.LoadSession, "begin", build_block)
    _assert_first_load_refused(
        node, tmp_path, r"RocksDB could not open the uploaded plain-format database"
    )


@pytest.mark.parametrize("table_format", ["plain", "block"])
def test_shards_of_several_files_and_of_none_serve_across_a_restart(
    start_node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table_format: str
) -> None:
    # A shard larger than the loader's memtable is several table files of disjoint key
    # ranges (all in level 0, never compacted); a shard that got no row is an empty
    # database the node creates.
    monkeypatch.setattr(bulk_job, "MEMTABLE_SHARE", 0)
    monkeypatch.setattr(bulk_job, "MIN_MEMTABLE_BYTES", 128 << 10)
    node = start_node("--base-format", table_format)
    n = 3000
    keys = np.arange(n, dtype=np.int64) * 3
    blobs = [bytes([k % 251]) * 300 for k in range(n)]
    with Client(node.address, timeout=10) as c:
        c.create_table("big", key="int64", features={"b": "bytes"}, shards=2)
        c.create_table("one", key="int64", features={"b": "bytes"}, shards=4)
        _load(node.address, tmp_path, "big", pa.table({"key": keys, "b": blobs}), "big")
        _load(node.address, tmp_path, "one", pa.table({"key": [42], "b": [b"x"]}), "one")
    node.stop()
    cold = node.data_dir / "cold" / "tables"
    files = [len(list(d.glob("*.sst"))) for d in sorted(cold.glob("big-*/v*/shard-*"))]
    assert len(files) == 2 and min(files) >= 3, files
    assert [len(list(d.glob("*.sst"))) for d in sorted(cold.glob("one-*/v*/shard-*"))].count(0) == 3

    node = start_node(data_dir=node.data_dir)
    with Client(node.address, timeout=10) as c:
        res = c.get("big", keys)
        assert res.found.all() and res.to_pylist() == [
            {"key": int(k), "b": b} for k, b in zip(keys, blobs, strict=True)
        ]
        assert not c.get("big", keys + 1).found.any()  # between keys, across every file
        assert c.get("one", [42, 41, 43, 0]).found.tolist() == [True, False, False, False]
        assert [v.rows for v in c.versions("one")] == [1]


def test_table_files_are_handed_over_as_they_are_flushed(tmp_path: Path) -> None:
    # The node hears from a load with every flushed table file (its lease), and the
    # loader's temporary disk holds files, not whole shards: a table file goes out as
    # soon as it is flushed, the rest of the database when it is closed.
    handed: list[str] = []
    writer = bulk_shard_db.ShardDbWriter(
        0,
        str(tmp_path / "db"),
        IntKeys,
        "plain",
        lambda _shard, name, _path, _size: handed.append(name),
        64 << 10,
    )
    n = 2000
    rows = pa.array([bytes([i % 251]) * 100 for i in range(n)], pa.large_binary())
    writer.add(Chunk(np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64), rows))
    before_close = list(handed)
    assert len(before_close) >= 2 and all(name.endswith(".sst") for name in before_close)
    writer.close()
    assert handed[: len(before_close)] == before_close  # each file handed over once
    assert "CURRENT" in handed and any(name.startswith("MANIFEST-") for name in handed)
    assert len(handed) == len(set(handed))
    assert writer.rows == n


@pytest.mark.parametrize("row_bytes", [4, 200])
def test_the_loader_alone_decides_when_a_table_file_ends(tmp_path: Path, row_bytes: int) -> None:
    # Tiny rows cost RocksDB far more memtable than their bytes: had the loader counted
    # row bytes, RocksDB would flush first, into more and smaller files than flushes.
    writer = bulk_shard_db.ShardDbWriter(
        0, str(tmp_path / "db"), IntKeys, "plain", _ignore, 4 << 20
    )
    flushes = 0
    flush = writer._flush

    def counted() -> None:
        nonlocal flushes
        flushes += 1
        flush()

    writer._flush = counted  # type: ignore[method-assign]
    n = 300_000 if row_bytes == 4 else 60_000
    rows = pa.array([bytes([i % 251]) * row_bytes for i in range(n)], pa.large_binary())
    writer.add(Chunk(np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64), rows))
    during = flushes
    writer.close()
    files = [f for f in os.listdir(tmp_path / "db") if f.endswith(".sst")]
    # (the flush at close makes no file when the last one emptied the memtable)
    assert during >= 2 and during <= len(files) <= flushes


def _ignore(*_args: object) -> None:
    pass


@pytest.mark.parametrize(
    ("told", "match"),
    [
        # The total still adds up; one shard is said to hold one row more.
        ("moved", r"shard 0: the uploaded database holds \d+ rows, the loader"),
        # What a loader from before rows_per_shard sends.
        ("none", "the loader sent no rows_per_shard: it is older than this node"),
        ("short", r"rows_per_shard \[\d+\] does not give \d+ rows over the table's 2 shards"),
    ],
)
def test_a_commit_whose_row_counts_do_not_fit_is_refused(
    start_node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, told: str, match: str
) -> None:
    def miscounted(self, rows_per_shard: list[int]):
        counts = list(rows_per_shard)
        if told == "moved":
            counts[0] += 1
            counts[1] -= 1
        request = pb.CommitLoadRequest(
            load_id=self.load_id,
            files_per_shard=self.files_per_shard,
            rows=sum(rows_per_shard),  # the true total, whatever the shards are said to hold
            rows_per_shard={"moved": counts, "none": [], "short": counts[:1]}[told],
        )
        return self._call(self.seed, "CommitLoad", request)

    monkeypatch.setattr(bulk_upload.LoadSession, "commit", miscounted)
    _assert_first_load_refused(start_node(), tmp_path, match)


def test_a_catalog_write_that_fails_leaves_no_version_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In process, at the level of the load manager: every file arrives, then the catalog
    # write that would make the version current hits a full disk. The load is refused as
    # StorageFull, the catalog in memory is as before, and nothing of it stays on disk.
    config = NodeConfig(data_dir=tmp_path / "data")
    config.load()
    node = Node(config)
    node.open()
    loads = LoadStaging(node)
    loads.open()
    try:
        schema = node.create_table(TableSchema.build("t", "int64", {"x": "bytes"}, shards=1)).schema
        files: list[tuple[str, str, int]] = []
        writer = bulk_shard_db.ShardDbWriter(
            0,
            str(tmp_path / "db"),
            IntKeys,
            "plain",
            lambda _shard, name, path, size: files.append((name, path, size)),
            1 << 20,
        )
        n = 100
        rows = pa.array([b"row"] * n, pa.large_binary())
        writer.add(Chunk(np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64), rows))
        writer.close()
        load_id = loads.begin("t", "v", 0, schema.schema_id).load_id
        for name, path, size in files:
            data = Path(path).read_bytes()
            loads.upload(load_id, 0, name, 0, data, True, size, zlib.crc32(data))

        def full(*_args) -> None:
            raise OSError(errno.ENOSPC, "No space left on device", str(config.data_dir))

        monkeypatch.setattr(node.catalog, "save", full)
        with pytest.raises(StorageFull, match=r"the node's disk is full at .*unchanged"):
            loads.commit(load_id, [len(files)], n, [n])
        entry = node.table("t").entry
        assert (entry.current, entry.versions) == (0, {})
        assert list(node.table("t").cold_root.glob("v*")) == []
        assert os.listdir(loads.staging_root) == []
        with pytest.raises(LoadConflict):  # the load is gone, not half-committed
            loads.commit(load_id, [len(files)], n, [n])
    finally:
        node.close()
