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
from kvstore.server.node import Node, Position, run_steps
from kvstore.server.writes import STEP_KEYS


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


def _x_values(node: Node, table: str, keys: np.ndarray) -> np.ndarray:
    """Feature ``x`` (int64, never null here) of ``keys``, in request order: the last
    8 bytes of each row (a one-feature row has no variable-width section)."""
    answer = node.get(table, KeyBatch("int64", ints=keys), [])
    assert (answer.lengths > 0).all()
    ends = np.cumsum(answer.lengths)
    raw = np.frombuffer(answer.values, np.uint8)
    x = np.array([raw[e - 8 : e].view("<i8")[0] for e in ends], np.int64)
    out = np.empty_like(x)
    out[answer.order if answer.order is not None else np.arange(len(x))] = x
    return out


def _shard_counts(node: Node, table: str, keys: np.ndarray) -> np.ndarray:
    batch = KeyBatch("int64", ints=keys)
    return np.bincount(batch.shard_ids(len(node.table(table).delta)), minlength=4)


def test_a_write_yields_after_its_checks_its_preparation_and_every_step_of_a_shard(
    node: Node,
) -> None:
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
    # The checks, the pass's preparation (the keys put in step order, in C), then each
    # shard's keys STEP_KEYS at a time, each gathering its own rows.
    expected_steps = 2 + sum(-(-int(c) // STEP_KEYS) for c in _shard_counts(node, "t", keys))
    assert len(found_after_each_step) == expected_steps
    assert found_after_each_step[:2] == [0, 0]  # the checks and the preparation write nothing
    assert 1 <= found_after_each_step[2] <= STEP_KEYS
    found_after_each_step = found_after_each_step[1:]
    # Between steps a reader sees whole steps: the count grows by at most STEP_KEYS.
    grown = np.diff(found_after_each_step)
    assert (grown >= 1).all() and (grown <= STEP_KEYS).all()
    assert found_after_each_step[-1] == 1000


def test_a_bad_row_is_refused_before_any_step_writes(node: Node) -> None:
    node.create_table(TableSchema.build("t", "int64", {"x": "int64"}, shards=4))
    keys = np.arange(100, dtype=np.int64)
    schema = node.table("t").schema
    rows = encode_rows(schema, {"key": keys, "x": keys})
    broken = bytearray(rows.rows)
    broken[int(rows.offsets[50])] = 0x7F  # the format byte of row 50
    steps = node.write_steps(
        "t", schema.schema_id, rows.keys, bytes(broken), rows.offsets, rows.features
    )
    with pytest.raises(kvstore.InvalidArgument, match="row 50"):
        next(steps)
    assert (_read(node, "t", keys) == -1).all()


def test_the_position_lands_with_each_shards_last_step(node: Node) -> None:
    node.create_table(TableSchema.build("t", "int64", {"x": "int64"}, shards=4))
    keys = np.arange(400, dtype=np.int64)
    schema = node.table("t").schema
    rows = encode_rows(schema, {"key": keys, "x": keys})
    position = Position("c", "topic", 0, 99)
    steps = node.write_steps(
        "t", schema.schema_id, rows.keys, rows.rows, rows.offsets, rows.features, position
    )
    per_shard = _shard_counts(node, "t", keys)
    table = node.table("t")
    prefix = position.key_prefix()
    seen_with_rows = []
    while True:
        try:
            next(steps)
        except StopIteration:
            break
        ids = KeyBatch("int64", ints=keys).shard_ids(4)
        for s, shard in enumerate(table.delta):
            has_position = any(True for _ in shard.prefix_items(prefix))
            # A shard holds the position only once all of its rows are in.
            written = int((_read(node, "t", keys[ids == s]) >= 0).sum())
            if has_position:
                assert written == per_shard[s]
                seen_with_rows.append(s)
    assert node.consumer_positions("t", "c", "topic") == {0: 99}
    assert set(seen_with_rows) == {0, 1, 2, 3}


def test_repeated_keys_apply_in_request_order_across_steps(node: Node) -> None:
    node.create_table(TableSchema.build("t", "int64", {"x": "int64"}, shards=2))
    first = np.arange(200, dtype=np.int64)
    keys = np.concatenate([first, first[::-1], first])
    values = np.concatenate([first, first + 1000, first + 2000])
    schema = node.table("t").schema
    rows = encode_rows(schema, {"key": keys, "x": values}, event_time=1_700_000_000_000_000)
    run_steps(
        node.write_steps("t", schema.schema_id, rows.keys, rows.rows, rows.offsets, rows.features)
    )
    # Equal event times: the later write in the request wins.
    assert _x_values(node, "t", first).tolist() == (first + 2000).tolist()


def test_repeated_string_keys_apply_in_request_order_and_every_key_lands(node: Node) -> None:
    node.create_table(TableSchema.build("s", "string", {"x": "int64"}, shards=3))
    names = np.array([f"user_{i:04d}" for i in range(150)], dtype=object)
    keys = np.concatenate([names, names[::-1], names[:50]])
    values = np.arange(len(keys), dtype=np.int64)
    schema = node.table("s").schema
    rows = encode_rows(schema, {"key": keys, "x": values}, event_time=1_700_000_000_000_000)
    written = run_steps(
        node.write_steps("s", schema.schema_id, rows.keys, rows.rows, rows.offsets, rows.features)
    )
    assert written == len(keys)
    # Equal event times: the last occurrence of each key in the request wins.
    last = {k: int(v) for k, v in zip(keys.tolist(), values.tolist(), strict=True)}
    answer = node.get("s", KeyBatch.from_values("string", names, "s", "key"), [])
    assert (answer.lengths > 0).all()
    ends = np.cumsum(answer.lengths)
    raw = np.frombuffer(answer.values, np.uint8)
    x = [int(raw[e - 8 : e].view("<i8")[0]) for e in ends]
    order = answer.order if answer.order is not None else np.arange(len(names))
    by_key = {names[int(i)]: v for i, v in zip(order.tolist(), x, strict=True)}
    assert by_key == last


def test_a_table_dropped_during_a_write_is_reported(node: Node) -> None:
    node.create_table(TableSchema.build("t", "int64", {"x": "int64"}, shards=4))
    keys = np.arange(100, dtype=np.int64)
    steps = _steps(node, "t", keys, keys)
    next(steps)
    node.drop_table("t")
    with pytest.raises(kvstore.TableNotFound, match="dropped during the write"):
        next(steps)


def _corrupt_delta_row(node: Node, table: str, key: int) -> None:
    """Replace ``key``'s delta row with bytes that are not a row."""
    batch = KeyBatch("int64", ints=np.array([key], np.int64))
    t = node.table(table)
    shard = t.delta[int(batch.shard_ids(len(t.delta))[0])]
    shard.write([(batch.encoded()[0], b"\x7fnot a row")])


def test_a_corrupt_stored_row_is_named_by_its_key_in_any_step(node: Node) -> None:
    # The damaged key is the last of the request: in its shard's last step, not its
    # first, so the key named is found through the step's place in the shard's keys.
    node.create_table(TableSchema.build("t", "int64", {"x": "int64", "y": "int64"}, shards=4))
    schema = node.table("t").schema
    keys = np.arange(1000, dtype=np.int64)
    run_steps(_steps(node, "t", keys, keys))
    _corrupt_delta_row(node, "t", 999)
    partial = encode_rows(schema, {"key": keys, "y": keys})
    with pytest.raises(kvstore.CorruptValue, match=r"table 't', shard \d, key 999: the stored"):
        run_steps(
            node.write_steps(
                "t", schema.schema_id, partial.keys, partial.rows, partial.offsets, partial.features
            )
        )
    with pytest.raises(kvstore.CorruptValue, match=r"table 't', shard \d, key 999: the stored"):
        run_steps(node.delete_steps("t", KeyBatch("int64", ints=keys)))
    # A write of every feature replaces the damaged row (and the others) in place.
    full = encode_rows(schema, {"key": keys, "x": keys * 3, "y": keys})
    run_steps(
        node.write_steps("t", schema.schema_id, full.keys, full.rows, full.offsets, full.features)
    )
    answer = node.get("t", KeyBatch("int64", ints=np.array([999, 5], np.int64)), ["x"])
    assert (answer.lengths > 0).all()


def test_a_delete_that_waited_while_its_table_was_made_again_with_other_keys_applies_nothing(
    node: Node,
) -> None:
    """The servicer reads a Delete's keys for the table as it is, then the delete waits
    for its write turn; a table dropped and made again with string keys meanwhile must
    not get tombstones of int64-encoded keys."""
    node.create_table(TableSchema.build("t", "int64", {"a": "int64"}, shards=2))
    steps = node.delete_steps("t", KeyBatch("int64", ints=np.array([1, 2], np.int64)))
    node.drop_table("t")
    node.create_table(TableSchema.build("t", "string", {"a": "int64"}, shards=2))
    with pytest.raises(kvstore.SchemaChanged, match="now has string keys"):
        run_steps(steps)
    assert all(shard.empty for shard in node.table("t").delta)


def test_numpy_columns_of_the_features_dtype_encode_as_their_arrow_arrays() -> None:
    """A stream's batch of NumPy columns already of each feature's dtype skips Arrow:
    the same rows (NaN a value, a strided column read in order); another dtype still
    goes through Arrow's checks."""
    import pyarrow as pa

    from kvstore.errors import InvalidArgument
    from kvstore.schema import TableSchema

    schema = TableSchema.build("t", "int64", {"f": "float32", "i": "int32", "d": "float64"}, 4)
    keys = np.arange(6, dtype=np.int64)
    f = np.array([0.5, np.nan, -1.0, 2.0, np.inf, 3.0], np.float32)
    i = np.arange(12, dtype=np.int32)[::2]  # not contiguous
    d = np.linspace(0, 1, 6)
    fast = encode_rows(schema, {"key": keys, "f": f, "i": i, "d": d}, event_time=7)
    arrow = {"key": keys, "f": pa.array(f), "i": pa.array(i), "d": pa.array(d)}
    slow = encode_rows(schema, arrow, event_time=7)
    assert fast.rows == slow.rows and fast.offsets.tolist() == slow.offsets.tolist()
    with pytest.raises(InvalidArgument, match="'i'"):
        encode_rows(schema, {"key": keys, "i": np.full(6, 2**40, np.int64)})
    with pytest.raises(InvalidArgument, match="5 values for 6 keys"):
        encode_rows(schema, {"key": keys, "f": f[:5]})


def test_masked_numpy_columns_write_nulls_where_masked() -> None:
    """A MaskedArray (what ``GetResult.to_numpy`` gives for int columns with missing
    rows) of the feature's dtype is not taken as plain values: its masked rows are
    nulls, as Arrow reads them, not the values under the mask."""
    from kvstore.schema import TableSchema

    schema = TableSchema.build("t", "int64", {"v": "float64", "w": "int64"}, 4)
    keys = np.arange(3, dtype=np.int64)
    mask = [False, True, False]
    masked = {
        "key": keys,
        "v": np.ma.masked_array(np.array([1.0, 2.0, 3.0]), mask=mask),
        "w": np.ma.masked_array(np.array([4, 5, 6], np.int64), mask=mask),
    }
    nulls = {"key": keys, "v": [1.0, None, 3.0], "w": [4, None, 6]}
    assert (
        encode_rows(schema, masked, event_time=5).rows
        == encode_rows(schema, nulls, event_time=5).rows
    )
