"""``--row-cache-mb``: RocksDB's row cache in front of the bulk versions. Rows read once
are kept there, answers do not change, and ``kvstore status`` shows how full it is."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from helpers import FEATURES, expected, kvstore, snapshot

from kvstore import Client
from kvstore.ingest.bulk import load


def _load(client: Client, tmp_path: Path):
    client.create_table("t", key="int64", features=FEATURES, shards=4)
    data = snapshot(list(range(400)))
    pq.write_table(data, tmp_path / "v1.parquet")
    load(client.address, "t", str(tmp_path / "v1.parquet"), progress=False)
    return data


def test_rows_read_fill_the_row_cache_and_answers_stay_the_same(start_node, tmp_path: Path) -> None:
    node = start_node("--row-cache-mb", "4")
    with Client(node.address) as client:
        data = _load(client, tmp_path)
        before = client.stats()
        first = client.get("t", list(range(-5, 405))).to_pylist()
        again = client.get("t", list(range(-5, 405))).to_pylist()
        after = client.stats()
    assert first == again == [None] * 5 + expected(data) + [None] * 5
    assert before["row_cache_capacity_bytes"] == after["row_cache_capacity_bytes"] == 4 << 20
    assert before["row_cache_bytes"] == 0 < after["row_cache_bytes"] <= 4 << 20
    out = kvstore("status", address=node.address)
    assert out.returncode == 0, out.stderr
    assert "row cache" in out.stdout and "of 4 MiB" in out.stdout


def test_the_row_cache_is_off_by_default(start_node, tmp_path: Path) -> None:
    node = start_node()
    with Client(node.address) as client:
        _load(client, tmp_path)
        client.get("t", list(range(400)))
        stats = client.stats()
    assert stats["row_cache_capacity_bytes"] == stats["row_cache_bytes"] == 0
    assert "row cache off" in kvstore("status", address=node.address).stdout
