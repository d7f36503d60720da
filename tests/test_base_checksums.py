"""What a node does with a base file damaged on disk after its upload (crc32-checked).

Block-format bulk versions are read without RocksDB's per-block checksum unless the
node runs with ``--verify-base-checksums``; with it, a damaged block is reported
(CorruptValue), never served. Without it, and always in the plain format (no block
checksums), the node still checks the structure of every row it reads: damage that
breaks a row is reported naming the key, while a byte changed inside a value is served
as it is on disk (docs/operations.md, "The table format of bulk versions").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvstore import Client, CorruptValue
from kvstore.ingest.bulk import load

ROWS = 2000
DAMAGED = ROWS // 2
#: Where a row's value starts: the row header (13 bytes), the null bitmap of one
#: feature (1) and its var end (4) come first (docs/row-format.md).
VALUE_AT = 13 + 1 + 4


def _load_and_damage(
    node, tmp_path: Path, shards: int = 1, *, at: int = 10
) -> tuple[Client, np.ndarray, np.ndarray, bytes]:
    """Load ROWS random 64-byte values (incompressible: each stays a run of its own
    bytes in the file, in either format), stop the node, flip the byte ``at`` bytes into
    the value of row DAMAGED (negative: into its row header) in the base file, start the
    node again (so no block of it is cached). Returns a client, the keys, the values
    loaded, and the damaged row's value as it now is on disk."""
    keys = np.arange(ROWS, dtype=np.int64)
    rng = np.random.default_rng(3)
    values = np.array([rng.bytes(64) for _ in range(ROWS)], dtype=object)
    with Client(node.address) as client:
        client.create_table("t", key="int64", features={"x": "bytes"}, shards=shards)
        pq.write_table(pa.table({"key": keys, "x": values}), tmp_path / "v1.parquet")
        load(client.address, "t", str(tmp_path / "v1.parquet"), progress=False)
    assert node.stop() == 0
    (sst,) = [
        p for p in (node.data_dir / "cold").rglob("*.sst") if values[DAMAGED] in p.read_bytes()
    ]
    blob = bytearray(sst.read_bytes())
    value_at = blob.index(values[DAMAGED])
    if at == -VALUE_AT:
        assert blob[value_at + at] == 0x01, "not the row's format byte"
    blob[value_at + at] ^= 0xFF
    sst.write_bytes(blob)
    node.start()
    return Client(node.address), keys, values, bytes(blob[value_at : value_at + 64])


@pytest.mark.parametrize(
    ("shards", "extra"),
    [
        (1, ()),
        # Several shards read on several threads: the error comes from a helper thread
        # or the loop's own part, and the node keeps serving after it.
        (4, ("--read-threads", "2", "--parallel-read-keys", "2")),
    ],
)
def test_a_damaged_base_file_is_reported_when_checksums_are_verified(
    start_node, tmp_path: Path, shards: int, extra: tuple[str, ...]
) -> None:
    node = start_node("--base-format", "block", "--verify-base-checksums", *extra)
    client, keys, values, _ = _load_and_damage(node, tmp_path, shards)
    with client:
        with pytest.raises(CorruptValue, match=r"table 't'.*checksum"):
            client.get("t", keys)
        with pytest.raises(CorruptValue, match=r"table 't'.*checksum"):
            client.get("t", [DAMAGED])
        # Only the damaged block is refused: a key of another block still serves.
        assert client.get("t", [0]).to_numpy()["x"][0] == values[0]


def test_without_verification_a_row_whose_structure_is_damaged_is_reported(
    start_node, tmp_path: Path
) -> None:
    # The row's format byte, found in the plain format (rows stored as they are; the
    # block format LZ4-compresses the rows' repeated headers, so that damage there is
    # damage to the compressed stream): the node's check of every row it reads, not a
    # checksum, catches it.
    node = start_node("--base-format", "plain")
    client, keys, values, _ = _load_and_damage(node, tmp_path, at=-VALUE_AT)
    with client:
        message = rf"table 't', shard 0, key {DAMAGED}: the stored value is corrupt .*format"
        with pytest.raises(CorruptValue, match=message):
            client.get("t", keys)
        others = np.delete(keys, DAMAGED)
        assert (
            client.get("t", others).to_numpy()["x"].tolist() == np.delete(values, DAMAGED).tolist()
        )


@pytest.mark.parametrize("table_format", ["block", "plain"])
def test_without_verification_a_byte_changed_inside_a_value_is_served_as_on_disk(
    start_node, tmp_path: Path, table_format: str
) -> None:
    # What the defaults give up for ~18% less CPU a Get (and why the files are
    # crc32-checked on upload): the damaged row passes the structure check and is served
    # with the byte as it is on disk; every other row is served as loaded.
    node = start_node("--base-format", table_format)
    client, keys, values, on_disk = _load_and_damage(node, tmp_path)
    assert on_disk != values[DAMAGED]
    with client:
        got = client.get("t", keys).to_numpy()["x"]
    assert got[DAMAGED] == on_disk
    assert np.delete(got, DAMAGED).tolist() == np.delete(values, DAMAGED).tolist()
