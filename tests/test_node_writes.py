"""A large write is applied shard by shard, letting reads run between the shards.

These drive the Node directly (real RocksDB in a temporary directory), because the
point is the order of steps inside one write, which a client cannot observe reliably.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kvstore
from kvstore.columns import encode_rows
from kvstore.config import NodeConfig
from kvstore.keys import KeyBatch
from kvstore.schema import TableSchema
from kvstore.server.node import Node


@pytest.fixture
def node(tmp_path: Path):
    config = NodeConfig(data_dir=tmp_path / "data")
    config.load()
    node = Node(config)
    node.open()
    yield node
    node.close()


def _steps(node: Node, table: str, keys: np.ndarray, values: np.ndarray):
    schema = node.table(table).schema
    rows = encode_rows(schema, {"key": keys, "x": values})
    return node.write_steps(
        table, schema.schema_id, rows.keys, rows.rows, rows.offsets, rows.features
    )


def _read(node: Node, table: str, keys: np.ndarray) -> np.ndarray:
    """Row lengths of ``keys`` as a read answers them (-1 = missing), in shard order."""
    answer = node.get(table, KeyBatch("int64", ints=keys), [])
    return answer.lengths


def test_a_write_yields_once_per_shard_and_each_shard_lands_whole(node: Node) -> None:
    node.create_table(TableSchema.build("t", "int64", {"x": "int64"}, shards=4))
    keys = np.arange(1000, dtype=np.int64)
    steps = _steps(node, "t", keys, keys * 10)
    found_after_each_step = []
    while True:
        try:
            next(steps)
        except StopIteration as done:
            assert done.value == 1000
            break
        found_after_each_step.append(int((_read(node, "t", keys) >= 0).sum()))
    assert len(found_after_each_step) == 4  # one step per shard
    # Between steps a reader sees whole shards: the count only grows, shard by shard.
    assert found_after_each_step == sorted(found_after_each_step)
    assert found_after_each_step[-1] == 1000
    assert 0 < found_after_each_step[0] < 1000


def test_a_table_dropped_during_a_write_is_reported(node: Node) -> None:
    node.create_table(TableSchema.build("t", "int64", {"x": "int64"}, shards=4))
    keys = np.arange(100, dtype=np.int64)
    steps = _steps(node, "t", keys, keys)
    next(steps)
    node.drop_table("t")
    with pytest.raises(kvstore.TableNotFound, match="dropped during the write"):
        next(steps)
