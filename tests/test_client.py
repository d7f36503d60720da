"""Serving: create a table, write rows, read them back as NumPy / Arrow / Python, through a node."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pyarrow as pa
import pytest

import kvstore
from kvstore import AsyncClient, Client

FEATURES = {
    "ctr_7d": "float32",
    "age": "int32",
    "country": "string",
    "emb": "float32[4]",
    "clicks": "int64",
    "score": "float64",
    "premium": "bool",
    "blob": "bytes",
    "items": "int64[]",
}


def _rows(keys: list[int]) -> dict:
    n = len(keys)
    return {
        "key": keys,
        "ctr_7d": [0.5 + k for k in keys],
        "age": [20 + k for k in keys],
        "country": [f"c{k}é" for k in keys],
        "emb": np.arange(n * 4, dtype=np.float32).reshape(n, 4),
        "clicks": [2**40 + k for k in keys],
        "score": [k / 3 for k in keys],
        "premium": [k % 2 == 0 for k in keys],
        "blob": [bytes([k % 256]) * 3 for k in keys],
        "items": [list(range(k % 3)) for k in keys],
    }


@pytest.fixture
def table(client: Client, table_name: str) -> str:
    client.create_table(table_name, key="int64", features=FEATURES, shards=8)
    client.write(table_name, _rows(list(range(1, 11))))
    return table_name


def test_round_trip_every_dtype(client: Client, table: str) -> None:
    res = client.get(table, keys=[3, 1, 99], features=None)
    assert res.found.tolist() == [True, True, False]
    assert res.features == list(FEATURES)
    cols = res.to_numpy()
    assert cols["ctr_7d"].dtype == np.float32
    assert cols["ctr_7d"][:2].tolist() == [3.5, 1.5]
    assert np.isnan(cols["ctr_7d"][2])
    assert cols["age"].dtype == np.int32 and cols["age"].mask.tolist() == [False, False, True]
    assert cols["age"][:2].tolist() == [23, 21]
    assert cols["emb"].shape == (3, 4) and cols["emb"].dtype == np.float32
    assert cols["emb"][0].tolist() == [8, 9, 10, 11]
    assert np.isnan(cols["emb"][2]).all()
    assert cols["clicks"][0] == 2**40 + 3
    assert cols["country"].tolist() == ["c3é", "c1é", None]
    assert cols["blob"].tolist() == [b"\x03" * 3, b"\x01" * 3, None]
    rows = res.to_pylist()
    assert rows[2] is None
    assert rows[0]["items"] == [] and rows[1]["items"] == [0]
    assert rows[0]["premium"] is False and rows[0]["score"] == pytest.approx(1.0)


def _numpy_as_python(column: np.ndarray) -> list:
    """A to_numpy() column as to_arrow().to_pylist() reads it: None where masked, NaN
    (all NaN for a vector) or None; int64[] arrays as lists."""
    out = []
    for i in range(len(column)):
        if np.ma.isMaskedArray(column):
            out.append(None if column.mask[i] else column.data[i].item())
            continue
        value = column[i]
        if value is None or (column.dtype != object and np.isnan(value).all()):
            out.append(None)
        elif isinstance(value, np.ndarray):
            out.append(value.tolist())
        else:
            out.append(value.item() if isinstance(value, np.generic) else value)
    return out


def test_one_key_gets_read_the_same_in_numpy_arrow_and_python(client: Client, table: str) -> None:
    # The small gets a model server makes (one key, through the node's fast path):
    # to_numpy's columns, built in one C call, say what to_arrow and to_pylist say.
    client.write(table, {"key": [12], "age": [None], "country": [None], "items": [None]})
    for features in (None, ["items", "age", "ctr_7d"], ["premium", "country", "emb"]):
        for key in (1, 2, 12, 99):
            res = client.get(table, [key], features)
            cols = res.to_numpy()
            arrow = res.to_arrow().to_pylist()[0]
            assert list(cols) == res.features
            for name, column in cols.items():
                assert _numpy_as_python(column) == [arrow[name]], (key, name)
            row = res.to_pylist()[0]
            if key == 99:
                assert row is None and not res.found[0]
            else:
                assert row == {"key": key, **{name: arrow[name] for name in cols}}
            assert np.ma.isMaskedArray(cols.get("age", np.ma.masked_array([])))
            assert cols.get("items", np.empty(0, object)).dtype == object


def test_projection_and_arrow(client: Client, table: str) -> None:
    res = client.get(table, keys=[2, 5], features=["emb", "age"])
    assert res.features == ["emb", "age"]
    arrow = res.to_arrow()
    assert arrow.column_names == ["key", "emb", "age"]
    assert arrow.schema.field("emb").type == pa.list_(pa.float32(), 4)
    assert arrow.column("key").to_pylist() == [2, 5]
    assert arrow.column("age").to_pylist() == [22, 25]


def test_feature_lists_of_any_shape_and_the_plans_kept_for_them(client: Client, table: str) -> None:
    import pickle

    from kvstore.client import core

    # A generator is read once: its names are the ones requested, now and next time.
    res = client.get(table, [2, 99], features=(f for f in ["score", "age"]))
    assert res.features == ["score", "age"]
    assert client.get(table, [2], features=("score", "age")).features == ["score", "age"]
    assert client.get(table, [2], features=["age"]).features == ["age"]
    with pytest.raises(kvstore.InvalidArgument, match=r"feature names are strings, not \['age'\]"):
        client.get(table, [2], features=[["age"]])
    # A result holds its decode plan, and travels between processes with it.
    back = pickle.loads(pickle.dumps(res))
    assert back.features == ["score", "age"] and back.found.tolist() == [True, False]
    cols = back.to_numpy()
    assert cols["score"][0] == pytest.approx(2 / 3) and np.isnan(cols["score"][1])
    assert cols["age"].mask.tolist() == [False, True]
    # Editing the public list of names changes nothing the result reads.
    res.features[0] = "nope"
    assert list(res.to_numpy()) == ["score", "age"]
    # The client keeps at most MAX_GET_PLANS plans, and answers right past the limit.
    plans = client._ops.get_plans
    for i in range(core.MAX_GET_PLANS + 3):
        names = list(FEATURES)[: 1 + i % len(FEATURES)] + ["age"] * (1 + i // len(FEATURES))
        assert client.get(table, [4], features=names).to_numpy()["age"][0] == 24
    assert 0 < len(plans) <= core.MAX_GET_PLANS


def test_duplicates_answered_at_each_position_in_request_order(client: Client, table: str) -> None:
    keys = [7, 1, 7, 500, 1, 10, 2, 3, 4, 5, 6, 8, 9]
    res = client.get(table, keys=keys, features=["age"])
    assert res.found.tolist() == [k <= 10 for k in keys]
    ages = res.to_numpy()["age"]
    assert [int(a) if f else None for a, f in zip(ages.data, res.found, strict=True)] == [
        20 + k if k <= 10 else None for k in keys
    ]


def test_empty_key_list_gives_empty_result(client: Client, table: str) -> None:
    res = client.get(table, keys=[], features=["age", "country"])
    assert len(res) == 0
    assert res.to_numpy()["age"].shape == (0,)
    assert res.to_arrow().num_rows == 0


def test_numpy_keys_and_large_batch(client: Client, table_name: str) -> None:
    client.create_table(table_name, key="int64", features={"x": "float32"}, shards=8)
    keys = np.arange(5000, dtype=np.int64) * 7919
    client.write(table_name, {"key": keys, "x": keys.astype(np.float32)})
    probe = np.concatenate([keys[::-1], [-1, -2]])
    res = client.get(table_name, probe, ["x"])
    assert res.found.sum() == 5000
    assert np.array_equal(res.to_numpy()["x"][:5000], probe[:5000].astype(np.float32))


def test_string_keys(client: Client, table_name: str) -> None:
    client.create_table(table_name, key="string", features={"v": "int64"}, shards=3)
    client.write(table_name, [{"key": "ünï", "v": 1}, {"key": "", "v": 2}, {"key": "b", "v": 3}])
    res = client.get(table_name, ["b", "", "missing", "ünï"], ["v"])
    assert res.found.tolist() == [True, True, False, True]
    assert res.to_arrow().column("v").to_pylist() == [3, 2, None, 1]
    assert res.to_arrow().column("key").to_pylist() == ["b", "", "missing", "ünï"]


def test_partial_write_keeps_other_features(client: Client, table: str) -> None:
    client.write(table, {"key": [1, 2, 42], "age": [77, None, 5]})
    rows = client.get(table, [1, 2, 42], ["age", "country", "ctr_7d"]).to_pylist()
    assert rows[0] == {"key": 1, "age": 77, "country": "c1é", "ctr_7d": 1.5}
    assert rows[1]["age"] is None and rows[1]["country"] == "c2é"
    assert rows[2] == {"key": 42, "age": 5, "country": None, "ctr_7d": None}


def test_full_write_replaces_and_nulls_read_as_missing_values(
    client: Client, table_name: str
) -> None:
    client.create_table(table_name, key="int64", features={"a": "float64", "b": "string"}, shards=2)
    client.write(table_name, {"key": [1], "a": [1.0], "b": ["x"]})
    client.write(table_name, pa.table({"key": [1], "a": [None], "b": ["y"]}))
    res = client.get(table_name, [1])
    assert res.found.tolist() == [True]
    assert res.valid("a").tolist() == [False]
    assert res.to_pylist() == [{"key": 1, "a": None, "b": "y"}]


def test_newest_event_time_wins_per_feature(client: Client, table: str) -> None:
    now = client.get(table, [3], ["age"]).event_times[0]
    client.write(table, {"key": [3], "age": [1]}, event_time=now + 10)
    client.write(table, {"key": [3], "age": [2], "ctr_7d": [9.0]}, event_time=now + 5)  # older
    res = client.get(table, [3, 404], ["age", "ctr_7d"])
    assert res.to_pylist()[0] == {"key": 3, "age": 1, "ctr_7d": 9.0}
    assert res.event_times.tolist() == [now + 10, 0]


def test_delete(client: Client, table: str) -> None:
    assert client.delete(table, [1, 2, 12345]) == 3
    assert client.get(table, [1, 2, 3], ["age"]).found.tolist() == [False, False, True]


def test_describe_list_and_drop(client: Client, table: str) -> None:
    info = client.describe_table(table)
    assert info.schema.key_type == "int64" and info.schema.shards == 8
    assert [f.name for f in info.schema.features] == list(FEATURES)
    assert str(info.schema.features[3].dtype) == "float32[4]"
    assert table in [t.schema.name for t in client.list_tables()]
    client.drop_table(table)
    assert table not in [t.schema.name for t in client.list_tables()]


def test_create_same_schema_again_is_a_no_op(client: Client, table: str) -> None:
    info = client.create_table(table, key="int64", features=FEATURES, shards=8)
    assert client.get(table, [1], ["age"]).found.tolist() == [True]
    assert info.schema.name == table


def test_drop_and_recreate_with_another_schema_reads_the_new_one(
    client: Client, table: str, shared_node
) -> None:
    other = Client(shared_node.address)
    assert other.get(table, [1], ["age"]).found.tolist() == [True]  # caches the old schema
    client.drop_table(table)
    client.create_table(table, key="int64", features={"age": "string"}, shards=2)
    client.write(table, {"key": [1], "age": ["old"]})
    assert other.get(table, [1], ["age"]).to_pylist() == [{"key": 1, "age": "old"}]
    other.close()


def test_keys_and_features_given_as_generators_survive_a_schema_refresh(
    client: Client, table: str, shared_node
) -> None:
    other = Client(shared_node.address)
    assert other.get(table, [1], ["age"]).found.tolist() == [True]  # caches the schema
    client.drop_table(table)
    client.create_table(table, key="int64", features={"age": "string", "x": "int32"}, shards=2)
    client.write(table, {"key": [1, 2], "age": ["a", "b"], "x": [1, 2]})
    result = other.get(table, (k for k in [2, 1]), features=(f for f in ["age"]))
    assert result.to_pylist() == [{"key": 2, "age": "b"}, {"key": 1, "age": "a"}]
    other.close()


def test_cluster_map_names_this_node_for_every_shard(
    client: Client, table: str, shared_node
) -> None:
    cmap = client.cluster_map()
    # Without a configured id, a node is named by its host and its data directory.
    node_id = f"{socket.gethostname()}:{shared_node.data_dir.resolve()}"
    assert [(n["node_id"], n["address"], n["state"]) for n in cmap["nodes"]] == [
        (node_id, shared_node.address, "live")
    ]
    assert cmap["tables"][table] == [0] * 8


def test_async_client_same_calls(shared_node, table_name: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(shared_node.address) as c:
            await c.create_table(table_name, key="int64", features={"x": "float32", "s": "string"})
            assert await c.write(table_name, {"key": [1, 2], "x": [0.5, 1.5], "s": ["a", "b"]}) == 2
            res, res2 = await asyncio.gather(
                c.get(table_name, [2, 1, 3], ["x"]), c.get(table_name, [1], ["s"])
            )
            assert res.to_numpy()["x"][:2].tolist() == [1.5, 0.5]
            assert res2.to_pylist() == [{"key": 1, "s": "a"}]
            assert await c.delete(table_name, [1]) == 1
            assert (await c.get(table_name, [1])).found.tolist() == [False]
            assert table_name in [t.schema.name for t in await c.list_tables()]
            await c.drop_table(table_name)

    asyncio.run(scenario())


def test_data_and_schemas_survive_a_restart(start_node) -> None:
    node = start_node()
    with Client(node.address) as c:
        c.create_table("persist", key="string", features={"v": "int64[]"}, shards=4)
        c.write("persist", {"key": ["a", "b"], "v": [[1, 2], []]})
    assert node.stop() == 0
    node.start()
    with Client(node.address) as c:
        assert c.get("persist", ["a", "b", "c"]).to_pylist() == [
            {"key": "a", "v": [1, 2]},
            {"key": "b", "v": []},
            None,
        ]
