"""A large Get is read on several threads (``--read-threads``); its answer must be the
one the event loop's thread alone gives: same rows, same order, delta over base."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from test_bulk_load import FEATURES, expected, snapshot

from kvstore import Client
from kvstore.ingest.bulk import load


def test_a_batch_read_on_several_threads_answers_like_one_thread(
    start_node, tmp_path: Path
) -> None:
    # Every Get of 2 keys or more is split between the loop and 2 read threads.
    node = start_node("--read-threads", "2", "--parallel-read-keys", "2")
    with Client(node.address) as client:
        client.create_table("t", key="int64", features=FEATURES, shards=8)
        data = snapshot(list(range(600)))
        pq.write_table(data, tmp_path / "v1.parquet")
        load(client.address, "t", str(tmp_path / "v1.parquet"), progress=False)
        # The delta, over the base: newer values for some keys, new keys, deletes.
        client.write("t", {"key": np.arange(0, 600, 7), "ctr": np.full(86, -1.0, np.float32)})
        client.write("t", {"key": [1000, 1001], "age": [1, 2]})
        client.delete("t", [3, 4, 5])
        rng = np.random.default_rng(7)
        keys = rng.permutation(np.r_[np.arange(-10, 610), 1000, 1001, 5, 5])

        batch = client.get("t", keys).to_pylist()
        one_by_one = [client.get("t", [int(k)]).to_pylist()[0] for k in keys]

    assert batch == one_by_one
    base = {row["key"]: row for row in expected(data)}
    for key, row in zip(keys.tolist(), batch, strict=True):
        if key in (3, 4, 5) or not (0 <= key < 600 or key in (1000, 1001)):
            assert row is None, key
        elif key >= 1000:
            assert (row["key"], row["age"], row["ctr"]) == (key, key - 999, None)
        elif key % 7 == 0:
            assert row == {**base[key], "ctr": -1.0}
        else:
            assert row == base[key]
