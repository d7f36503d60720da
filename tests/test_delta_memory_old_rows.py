"""A data directory written before delta rows took format 3 (format 2: every feature's
slot in every row) reads, takes writes and deletes, and compacts as one written since:
a node whose delta rows are all turned back into format 2 while it is stopped answers
every read as a node that kept them (docs/row-format.md, "Delta rows")."""

from __future__ import annotations

import time
from pathlib import Path

import rocksdict
import rowformat_oracle as oracle
from helpers import SMALL_FEATURES as FEATURES
from helpers import answers_of, small_version

from kvstore import Client
from kvstore.storage.shard import Shard, delta_options

HOUR_US = 3600 * 1_000_000
#: SMALL_FEATURES' kinds in schema order: a int64, s string, x float32.
KINDS, DIMS = [2, 6, 3], [0, 0, 0]


def _to_format_2(data_dir: Path) -> int:
    """Rewrite every delta row under ``data_dir`` in format 2; how many there were."""
    count = 0
    for path in sorted(data_dir.rglob("delta/shard-*")):
        shard = Shard(path, 0, delta_options(rocksdict.Cache(8 << 20)))
        try:
            puts = []
            for key, value in shard.raw_items():
                if len(key) != 8 or value[:1] != bytes([oracle.DELTA_FORMAT]):
                    continue  # the node's own keys
                schema_id = int.from_bytes(value[1:5], "little")
                row = oracle.delta_cells(KINDS, DIMS, schema_id, value)
                dense = oracle.encode_dense_delta(oracle.layout(KINDS, DIMS), schema_id, row)
                assert dense[0] == oracle.DELTA_DENSE_FORMAT and len(dense) >= len(value)
                puts.append((key, dense))
            shard.write(puts)
            count += len(puts)
        finally:
            shard.close()
    return count


def test_a_node_reads_and_rewrites_delta_rows_of_format_2(start_node, tmp_path: Path) -> None:
    now = int(time.time() * 1e6)
    nodes = {name: start_node(data_dir=tmp_path / name) for name in ("kept", "old")}
    keys = [*range(-2, 120), *range(995, 1060)]

    def answers() -> dict[str, list]:
        return answers_of(nodes, "t", keys)

    for name, node in nodes.items():
        with Client(node.address) as client:
            client.create_table("t", key="int64", features=FEATURES, shards=2, ttl={"x": 3600})
            client.load(
                "t",
                small_version(tmp_path / f"{name}-v1.parquet", range(100), 0),
                progress=False,
                snapshot_time_us=now - 3 * HOUR_US,
            )
            client.write("t", {"key": list(range(0, 100, 3)), "a": list(range(0, -100, -3))})
            fresh = list(range(1000, 1050))
            client.write("t", {"key": fresh, "a": fresh, "s": ["n"] * 50, "x": [1.5] * 50})
            client.write(
                "t", {"key": [1050, 1051], "a": [1, 2], "x": [0.5, 0.5]}, event_time=now - HOUR_US
            )
            client.delete("t", [4, 1001])
    before = answers()
    assert before["kept"] == before["old"]
    nodes["old"].stop()
    assert _to_format_2(tmp_path / "old") >= 80
    nodes["old"] = start_node(data_dir=tmp_path / "old")
    assert answers() == before
    # Updates and deletes over format-2 rows, then a version that compacts them.
    for node in nodes.values():
        with Client(node.address) as client:
            client.write("t", {"key": [3, 6, 1000, 1002], "s": ["u", "u", "u", "u"]})
            client.delete("t", [9, 1003])
    after_writes = answers()
    assert after_writes["old"] == after_writes["kept"]
    assert after_writes["old"][keys.index(3)]["s"] == "u"
    assert after_writes["old"][keys.index(9)] is None
    for name, node in nodes.items():
        with Client(node.address) as client:
            client.load(
                "t",
                small_version(tmp_path / f"{name}-v2.parquet", range(50, 110), 7),
                progress=False,
                snapshot_time_us=now - 2 * HOUR_US,
            )
    compacted = answers()
    assert compacted["old"] == compacted["kept"]
    assert compacted["old"][keys.index(6)]["s"] == "u"
