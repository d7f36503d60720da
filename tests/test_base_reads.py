"""``--base-reads mmap|pread|direct``: how a node reads the files of its bulk versions.

The files are the same whichever way they are read: a node answers the same rows, in
every table format, and only the way they reach it changes. With ``mmap`` (the default)
the node maps its table files; with ``pread`` or ``direct`` it maps none of them, so a
base larger than RAM costs it no page faults and no readahead (docs/operations.md, "A
base larger than the node's RAM").
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import FEATURES, expected, kvstore, snapshot

from kvstore import Client
from kvstore.config import NodeConfig
from kvstore.ingest.bulk import load


def _mapped_table_files(pid: int) -> set[str]:
    """The RocksDB table files (``*.sst``) mapped into process ``pid``."""
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1] for line in f if line.rstrip().endswith(".sst")}


@pytest.mark.parametrize("base_format", ["plain", "zstd"])
@pytest.mark.parametrize("reads", ["mmap", "pread", "direct"])
def test_every_way_of_reading_the_base_answers_the_same_rows(
    start_node, tmp_path: Path, reads: str, base_format: str
) -> None:
    node = start_node("--base-reads", reads, "--base-format", base_format, "--row-cache-mb", "1")
    data = snapshot(list(range(0, 3000, 3)))
    pq.write_table(data, tmp_path / "v1.parquet")
    keys = list(range(-5, 3005))
    rows = dict(zip(data.column("key").to_pylist(), expected(data), strict=True))
    want = [rows.get(k) for k in keys]
    with Client(node.address) as client:
        client.create_table("t", key="int64", features=FEATURES, shards=4)
        load(client.address, "t", str(tmp_path / "v1.parquet"), progress=False)
        first = client.get("t", keys).to_pylist()
        again = client.get("t", keys).to_pylist()  # the row cache's answers this time
        small = [client.get("t", [k]).to_pylist()[0] for k in (-1, 0, 3, 4, 2997)]
    assert first == again == want
    assert small == [rows.get(k) for k in (-1, 0, 3, 4, 2997)]
    mapped = _mapped_table_files(node.pid)
    if reads == "mmap":
        assert mapped, "the node maps its table files"
    else:
        assert not mapped, f"the node reads by {reads}, yet maps {sorted(mapped)}"


def test_an_unknown_way_of_reading_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="base_reads 'mmapped' is not one of mmap, pread"):
        NodeConfig(data_dir=tmp_path, base_reads="mmapped").load()
    out = kvstore("serve", "--data", str(tmp_path / "d"), "--base-reads", "mmapped", address=None)
    assert out.returncode != 0
    assert "mmapped" in out.stderr
