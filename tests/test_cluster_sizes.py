"""Shard sizes reported in etcd (kvstore.cluster.sizes) reach the moves: a node joining
takes its share by count, and among the shards it could take, the one that evens out
the bytes (docs/cluster.md, "Assignment"). Real etcd, real node processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from cluster_fixtures import FEATURES, Cluster, cluster_map, placed_replicas, settled_counts

from kvstore import Client
from kvstore.keys import KeyBatch
from kvstore.server.process import wait_until
from kvstore.storage.shard import files_bytes

SHARDS = 6
TIMEOUT_S = 120.0

# read_sizes in a process of its own: an aetcd (grpc.aio) client in the test process
# can hang a later fork of a node in gRPC's fork handler.
READ_SIZES = """
import asyncio, json, sys
from kvstore.cluster.etcd import connect
from kvstore.cluster.placement import PlacementStore
from kvstore.cluster.sizes import read_sizes

async def main():
    etcd = await connect(sys.argv[1], sys.argv[2])
    placement, _ = await PlacementStore(etcd).read()
    sizes = await read_sizes(etcd, placement)
    await etcd.close()
    print(json.dumps({f"{t}/{s}": n for (t, s), n in sizes.items()}))

asyncio.run(main())
"""


def _sizes(cluster: Cluster) -> dict[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", READ_SIZES, cluster.etcd.url, cluster.name],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return {int(k.split("/")[1]): v for k, v in json.loads(out).items()}


def test_a_joining_node_takes_the_shard_that_evens_out_the_bytes(cluster: Cluster) -> None:
    n0 = cluster.start("n0")
    cluster.start("n1")
    client = Client(n0.address)
    client.create_table("t", key="int64", features=FEATURES, shards=SHARDS)
    placed = placed_replicas(cluster_map(n0.address), "t")
    on_n0 = [s for s, r in enumerate(placed) if r[0].node == "n0"]
    assert len(on_n0) == SHARDS // 2
    # Two of n0's three shards hold nearly all the bytes: not its first, the one count
    # alone would move (ties go to the lowest shard), so this test fails without sizes.
    heavy = set(on_n0[1:])

    keys = np.arange(60_000, dtype=np.int64)
    shard_of = KeyBatch.from_values("int64", keys, "t").shard_ids(SHARDS)
    chosen = keys[np.isin(shard_of, sorted(heavy))]
    for start in range(0, len(chosen), 2_000):
        part = chosen[start : start + 2_000]
        client.write("t", {"key": part, "score": part.astype(np.float32), "clicks": part})
    light = [s for s in range(SHARDS) if s not in heavy]
    client.write(
        "t",
        {
            "key": keys[np.isin(shard_of, light)][:6],
            "score": np.zeros(6, np.float32),
            "clicks": np.zeros(6, np.int64),
        },
    )

    # The nodes report sizes at every placement they apply and every 30 s: a new table
    # (just created) brings one; wait for the heavy shards' writes to be in a report.
    def reported() -> bool:
        sizes = _sizes(cluster)
        return min(sizes.get(s, 0) for s in heavy) > 10 * max(sizes.get(s, 0) for s in light)

    # A placement change makes every node report at once: create another table.
    client.create_table("nudge", key="int64", features=FEATURES, shards=2)
    wait_until(reported, TIMEOUT_S, "the heavy shards reported as the largest")

    cluster.start("n2")

    def settled() -> bool:
        counts = settled_counts(n0.address, "t")
        return counts is not None and "n2" in counts

    wait_until(settled, TIMEOUT_S, "the join's moves to finish")
    owners = [r[0].node for r in placed_replicas(cluster_map(n0.address), "t")]
    by_node = {n: {s for s, o in enumerate(owners) if o == n} for n in ("n0", "n1", "n2")}
    assert sorted(len(s) for s in by_node.values()) == [2, 2, 2]
    # Balanced by bytes too: each heavy shard on its own node (by count alone, n2 would
    # take whichever of n0's shards the tie-breaks name).
    assert len(by_node["n2"] & heavy) == 1 and len(by_node["n0"] & heavy) == 1
    # every row still answers
    got = client.get("t", chosen)
    assert got.found.all()


def test_a_shards_bytes_count_nested_files_and_a_missing_directory_as_none(
    tmp_path: Path,
) -> None:
    """What a node reports: every file under a shard's directory (a base shard's files
    sit in subdirectories of its version), and 0, not an error, for a directory gone."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one").write_bytes(b"x" * 10)
    (tmp_path / "a" / "b" / "two").write_bytes(b"y" * 32)
    assert files_bytes(tmp_path / "a") == 42
    assert files_bytes(tmp_path / "gone") == 0
