"""RocksDB's errors become kvstore's at the shard, in one place: damaged data is a
``CorruptValue`` naming the table, the shard and its files, whatever the operation
(open, read, scan); any other RocksDB failure goes up unchanged, as the node's own.

Real RocksDB databases, damaged on disk the way a bad disk would (see also
test_base_checksums.py, which sees the same through a running node).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rocksdict

from kvstore.errors import CorruptValue, KvstoreError
from kvstore.storage.shard import Shard, base_read_options, build_options, rocksdb_options

ROWS = 2000


def _keys() -> list[bytes]:
    return [i.to_bytes(8, "big") for i in range(ROWS)]


def _build(path: Path, options: rocksdict.Options) -> list[bytes]:
    """A database at ``path`` of ROWS random 64-byte values (incompressible: stored as
    they are), flushed into a table file; returns the values."""
    rng = np.random.default_rng(7)
    values = [rng.bytes(64) for _ in range(ROWS)]
    path.mkdir(parents=True)
    db = rocksdict.Rdict(str(path), options, column_families={"default": options})
    for key, value in zip(_keys(), values, strict=True):
        db[key] = value
    db.flush()
    db.close()
    return values


def _flip_byte_of(path: Path, value: bytes) -> None:
    """Flip one byte of ``value`` where the table file under ``path`` stores it."""
    (sst,) = [p for p in path.glob("*.sst") if value in p.read_bytes()]
    blob = sst.read_bytes()
    at = blob.index(value) + 10
    with open(sst, "r+b") as f:
        f.seek(at)
        f.write(bytes([blob[at] ^ 0xFF]))


def test_a_damaged_block_read_is_a_corrupt_value_naming_table_and_shard(tmp_path: Path) -> None:
    path = tmp_path / "v000001" / "shard-0003"
    values = _build(path, build_options("block"))
    _flip_byte_of(path, values[ROWS // 2])
    options = build_options("block")
    shard = Shard(path, 3, options, base_read_options(True), base=True, table="t")
    try:
        with pytest.raises(CorruptValue, match=r"^table 't', shard 3 \(.*shard-0003\): .*checksum"):
            shard.multi_get(_keys()[ROWS // 2 : ROWS // 2 + 1])
        # Only the damaged block is refused: a key of another block still reads.
        assert shard.multi_get(_keys()[:1]) == values[:1]
    finally:
        shard.close()


def test_a_damaged_delta_is_a_corrupt_value_when_scanned(tmp_path: Path) -> None:
    path = tmp_path / "delta" / "shard-0000"
    options = rocksdb_options(rocksdict.Cache(1 << 20))
    values = _build(path, options)
    _flip_byte_of(path, values[ROWS // 2])
    shard = Shard(path, 0, options, table="t")
    try:
        with pytest.raises(CorruptValue, match=r"^table 't', shard 0 .*could not scan it"):
            for _ in shard.scan(chunk=100):
                pass
    finally:
        shard.close()


@pytest.mark.parametrize("damage", ["another format's table file", "no CURRENT file"])
def test_base_files_rocksdb_cannot_open_are_a_corrupt_value(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "v000001" / "shard-0001"
    if damage == "no CURRENT file":
        _build(path, build_options("plain"))
        (path / "CURRENT").unlink()
    else:
        _build(path, build_options("block"))
    with pytest.raises(CorruptValue, match=r"^table 't', shard 1 .*could not open it"):
        Shard(path, 1, build_options("plain"), base=True, table="t")


def test_other_rocksdb_failures_go_up_unchanged(tmp_path: Path) -> None:
    # A second open of a delta shard fails on RocksDB's lock: the node's own doing, not
    # damage, so it is not dressed up as a kvstore error.
    options = rocksdb_options(rocksdict.Cache(1 << 20))
    first = Shard(tmp_path / "delta" / "shard-0000", 0, options, table="t")
    try:
        with pytest.raises(Exception, match="lock") as raised:
            Shard(tmp_path / "delta" / "shard-0000", 0, options, table="t")
        assert not isinstance(raised.value, KvstoreError)
    finally:
        first.close()


def test_without_a_table_name_the_error_names_the_shard(tmp_path: Path) -> None:
    # How a bulk load opens an uploaded shard (it adds the load and table itself).
    path = tmp_path / "staging" / "shard-0002"
    _build(path, build_options("plain"))
    (path / "CURRENT").unlink()
    with pytest.raises(CorruptValue, match=r"^shard 2 \(.*shard-0002\): RocksDB could not open"):
        Shard(path, 2, build_options("plain"), base=True)
