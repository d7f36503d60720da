"""Block-format bulk versions are read without RocksDB's per-block checksum unless the
node runs with ``--verify-base-checksums``; with it, a damaged base file is reported,
never served. (Plain-format files have no block checksums: the default format serves
such damage, like the block format without the flag.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvstore import Client, CorruptValue
from kvstore.ingest.bulk import load

ROWS = 2000


def _load_and_damage(
    node, tmp_path: Path, shards: int = 1
) -> tuple[Client, np.ndarray, np.ndarray]:
    """Load ROWS random 64-byte values (incompressible: stored as they are), stop the
    node, flip one byte of the middle row's value in the base file, start the node again
    (so no block of it is cached)."""
    keys = np.arange(ROWS, dtype=np.int64)
    rng = np.random.default_rng(3)
    values = np.array([rng.bytes(64) for _ in range(ROWS)], dtype=object)
    with Client(node.address) as client:
        client.create_table("t", key="int64", features={"x": "bytes"}, shards=shards)
        pq.write_table(pa.table({"key": keys, "x": values}), tmp_path / "v1.parquet")
        load(client.address, "t", str(tmp_path / "v1.parquet"), progress=False)
    node.stop()
    (sst,) = [
        p for p in (node.data_dir / "cold").rglob("*.sst") if values[ROWS // 2] in p.read_bytes()
    ]
    blob = sst.read_bytes()
    at = blob.index(values[ROWS // 2]) + 10
    with open(sst, "r+b") as f:
        f.seek(at)
        f.write(bytes([blob[at] ^ 0xFF]))
    node.start()
    return Client(node.address), keys, values


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
    client, keys, values = _load_and_damage(node, tmp_path, shards)
    with client:
        with pytest.raises(CorruptValue, match=r"table 't'.*checksum"):
            client.get("t", keys)
        # Only the damaged block is refused: a key of another block still serves.
        assert client.get("t", [0]).to_numpy()["x"][0] == values[0]


@pytest.mark.parametrize("table_format", ["block", "plain"])
def test_without_verification_the_damage_is_not_detected(
    start_node, tmp_path: Path, table_format: str
) -> None:
    # What the defaults give up (and why the files are crc32-checked on upload): a byte
    # flipped on disk after the upload is served.
    node = start_node("--base-format", table_format)
    client, keys, values = _load_and_damage(node, tmp_path)
    with client:
        got = client.get("t", keys).to_numpy()["x"]
    assert np.flatnonzero(got != values).tolist() == [ROWS // 2]
