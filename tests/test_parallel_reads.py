"""A large Get is read on several threads (``--read-threads``); its answer must be the
one the event loop's thread alone gives: same rows, same order, delta over base."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import FEATURES, expected, snapshot

from kvstore import Client, _codec
from kvstore.columns import encode_rows
from kvstore.config import NodeConfig
from kvstore.ingest.bulk import load
from kvstore.keys import KeyBatch
from kvstore.schema import TableSchema
from kvstore.server.node import Node, run_steps


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


@pytest.fixture
def node(tmp_path: Path):
    config = NodeConfig(data_dir=tmp_path / "data", read_threads=1, parallel_read_keys=2)
    config.load()
    node = Node(config)
    node.open()
    node.create_table(TableSchema.build("t", "int64", {"x": "int64"}, shards=8))
    keys = np.arange(800, dtype=np.int64)
    rows = encode_rows(node.table("t").schema, {"key": keys, "x": keys * 10})
    schema_id = node.table("t").schema.schema_id
    run_steps(node.write_steps("t", schema_id, rows.keys, rows.rows, rows.offsets, rows.features))
    yield node
    node.close()


def _spy_on_pool(node: Node, delay_s: float = 0.0) -> list:
    """Record the futures of what the node hands its read thread, which starts its part
    ``delay_s`` late."""
    handed: list = []
    submit = node.reads.pool.submit

    def late(fn, *args):
        time.sleep(delay_s)
        return fn(*args)

    def spy(fn, *args):
        future = submit(late, fn, *args)
        handed.append(future)
        return future

    node.reads.pool.submit = spy
    return handed


class _Recorded:
    """A delta shard of table t that records which thread reads it; reads on the loop's
    thread take ``loop_delay_s`` longer, the others 1 ms (each read lets go of the GIL,
    as RocksDB's MultiGet does; the in-memory delta's does not). Everything else is the
    shard's."""

    def __init__(self, shard, s: int, readers: list, loop_delay_s: float) -> None:
        self._shard, self._s, self._readers, self._delay = shard, s, readers, loop_delay_s
        self._loop = threading.current_thread()

    def multi_get(self, keys):
        self._readers.append((self._s, threading.current_thread()))
        time.sleep(self._delay if threading.current_thread() is self._loop else 0.001)
        return self._shard.multi_get(keys)

    def __getattr__(self, name: str):
        return getattr(self._shard, name)


def _readers(node: Node, loop_delay_s: float = 0.0) -> list:
    """Record the thread that reads each shard of table t (its delta): (shard, thread)."""
    readers: list = []
    delta = node.table("t").delta
    delta[:] = [_Recorded(shard, s, readers, loop_delay_s) for s, shard in enumerate(delta)]
    return readers


def test_the_loop_and_the_read_thread_share_a_large_batch_shard_by_shard(node: Node) -> None:
    # The loop's thread reads slowly here: the read thread takes shards meanwhile.
    readers = _readers(node, loop_delay_s=0.02)
    keys = np.arange(800, dtype=np.int64)
    answer = node.get("t", KeyBatch("int64", ints=keys), [])
    assert (answer.lengths > 0).all()
    assert sorted(s for s, _ in readers) == list(range(8))  # each shard read once
    loop = threading.current_thread()
    assert {t is loop for _, t in readers} == {True, False}  # by both threads
    readers.clear()
    node.get("t", KeyBatch("int64", ints=keys[:1]), [])  # under parallel_read_keys
    assert [t for _, t in readers] == [loop]


def test_a_read_thread_that_has_not_started_leaves_the_batch_to_the_loop(node: Node) -> None:
    # The read thread is busy elsewhere: the loop's thread reads every shard itself,
    # and returns without waiting for the read thread's turn (its part is cancelled).
    busy = node.reads.pool.submit(time.sleep, 1.0)
    handed = _spy_on_pool(node)
    readers = _readers(node, loop_delay_s=0.001)
    started = time.monotonic()
    answer = node.get("t", KeyBatch("int64", ints=np.arange(800, dtype=np.int64)), [])
    assert time.monotonic() - started < 0.9 and not busy.done()
    assert (answer.lengths > 0).all()
    assert len(readers) == 8 and {t for _, t in readers} == {threading.current_thread()}
    assert handed and all(future.cancelled() for future in handed)
    busy.result()


def test_a_failed_read_waits_for_the_read_thread_before_raising(node: Node) -> None:
    # The loop's own part fails at once; the read thread is still busy with its part.
    # Returning then would let the loop close shards under the thread.
    handed = _spy_on_pool(node, delay_s=0.3)
    delta = node.table("t").delta
    keys = KeyBatch("int64", ints=np.arange(800, dtype=np.int64))
    order, counts = _codec.group_by_shard(keys.shard_ids(8), 8)
    encoded = keys.encoded(order)
    bounds = np.cumsum([0, *counts]).tolist()
    groups = [(s, encoded[bounds[s] : bounds[s + 1]]) for s in range(8)]
    for shard in delta:
        shard.close()  # every read now fails
    node.tables.clear()  # nothing left for node.close() to close
    with pytest.raises(TypeError):
        node.reads.fetch(groups, delta, None, 800)
    assert handed and all(future.done() for future in handed)
