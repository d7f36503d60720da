"""Bad input gets a clear error naming the thing, through a real node, and loses nothing."""

from __future__ import annotations

import time

import numpy as np
import pytest
import rocksdict

import kvstore
from kvstore import Client
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc

FEATURES = {"age": "int32", "ctr": "float32", "emb": "float32[3]", "name": "string"}


@pytest.fixture
def table(client: Client, table_name: str) -> str:
    client.create_table(table_name, key="int64", features=FEATURES, shards=4)
    client.write(
        table_name,
        {
            "key": [1, 2, 3],
            "age": [30, 40, 50],
            "ctr": [0.1, 0.2, 0.3],
            "emb": [[1, 2, 3], [4, 5, 6], [7, 8, 9]],
            "name": ["a", "b", "c"],
        },
    )
    return table_name


def _unchanged(client: Client, table: str) -> None:
    """What was stored before the bad request is still served, unchanged."""
    rows = client.get(table, [1, 2, 3], ["age", "name"]).to_pylist()
    assert rows == [
        {"key": 1, "age": 30, "name": "a"},
        {"key": 2, "age": 40, "name": "b"},
        {"key": 3, "age": 50, "name": "c"},
    ]


def _raw_stub(address: str):
    import grpc

    return pb_grpc.FeatureStoreStub(grpc.insecure_channel(address))


def test_unknown_table(client: Client) -> None:
    with pytest.raises(kvstore.TableNotFound, match="no table 'nope'"):
        client.get("nope", [1])
    with pytest.raises(kvstore.NotFound, match="'nope'"):
        client.write("nope", {"key": [1], "x": [1]})


def test_unknown_feature_names_it_and_lists_the_features(client: Client, table: str) -> None:
    with pytest.raises(kvstore.UnknownFeature, match=r"no feature 'agee'.*age, ctr, emb, name"):
        client.get(table, [1], ["agee"])
    with pytest.raises(kvstore.UnknownFeature, match=r"column 'colour'"):
        client.write(table, {"key": [1], "colour": ["red"]})
    _unchanged(client, table)


def test_unknown_feature_is_invalid_argument_from_the_node(shared_node, table: str) -> None:
    import grpc

    stub = _raw_stub(shared_node.address)
    keys = pb.Keys(count=1, int64_le=np.array([1], "<i8").tobytes())
    with pytest.raises(grpc.RpcError) as info:
        stub.Get(pb.GetRequest(table=table, keys=keys, features=["agee"]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "agee" in info.value.details() and "age, ctr, emb, name" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Get(pb.GetRequest(table="ghost", keys=keys), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "ghost" in info.value.details()


def test_key_of_the_wrong_type(client: Client, table: str) -> None:
    with pytest.raises(kvstore.InvalidArgument, match=r"column 'key', row 1: key 'x' \(str\)"):
        client.get(table, [1, "x"])
    with pytest.raises(kvstore.InvalidArgument, match=r"row 0: key 'x'"):
        client.write(table, {"key": ["x"], "age": [1]})
    _unchanged(client, table)


def test_string_keys_sent_to_an_int_table_are_refused_by_the_node(shared_node, table: str) -> None:
    import grpc

    stub = _raw_stub(shared_node.address)
    keys = pb.Keys(count=1, utf8=b"a", utf8_offsets=np.array([0, 1], "<i8").tobytes())
    with pytest.raises(grpc.RpcError) as info:
        stub.Get(pb.GetRequest(table=table, keys=keys), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "int64 keys" in info.value.details()


def test_null_key(client: Client, table: str) -> None:
    with pytest.raises(kvstore.InvalidArgument, match=r"column 'key', row 2: the key is null"):
        client.write(table, {"key": [5, 6, None], "age": [1, 2, 3]})
    with pytest.raises(kvstore.InvalidArgument, match="row 1: the key is null"):
        client.get(table, [1, None])
    _unchanged(client, table)


def test_keys_that_are_not_int64_are_named(client: Client, table: str) -> None:
    # A list of plain ints is packed by NumPy; anything else in it goes through Arrow.
    with pytest.raises(kvstore.InvalidArgument, match=r"row 1: key 9223372036854775808 \(int\)"):
        client.get(table, [1, 2**63])
    with pytest.raises(kvstore.InvalidArgument, match=r"row 1: key True \(bool\)"):
        client.get(table, [1, True])
    with pytest.raises(kvstore.InvalidArgument, match=r"row 0: key 'x' \(str\)"):
        client.get(table, ["x", 1])
    assert client.get(table, [-(2**63), 2**63 - 1]).found.tolist() == [False, False]


def test_value_of_the_wrong_dtype_names_row_and_column(client: Client, table: str) -> None:
    with pytest.raises(
        kvstore.InvalidArgument, match=r"column 'age' \(int32\), row 2: 'x' \(str\)"
    ):
        client.write(table, {"key": [1, 2, 3], "age": [7, 8, "x"]})
    with pytest.raises(kvstore.InvalidArgument, match=r"column 'age' \(int32\), row 1: 1.5"):
        client.write(table, {"key": [1, 2], "age": [7, 1.5]})
    with pytest.raises(kvstore.InvalidArgument, match=r"column 'age' \(int32\), row 0: 4294967296"):
        client.write(table, {"key": [1], "age": [2**32]})
    with pytest.raises(kvstore.InvalidArgument, match=r"column 'name' \(string\), row 0: 5"):
        client.write(table, [{"key": 1, "name": 5}])
    _unchanged(client, table)


def test_embedding_of_the_wrong_length(client: Client, table: str) -> None:
    with pytest.raises(
        kvstore.InvalidArgument, match=r"column 'emb' .*row 1: an embedding of length 2, expected 3"
    ):
        client.write(table, {"key": [1, 2], "emb": [[1, 2, 3], [1, 2]]})
    with pytest.raises(kvstore.InvalidArgument, match="embeddings of length 4, expected 3"):
        client.write(table, {"key": [1], "emb": np.zeros((1, 4), np.float32)})
    _unchanged(client, table)


def test_column_length_mismatch(client: Client, table: str) -> None:
    with pytest.raises(kvstore.InvalidArgument, match=r"column 'age': 1 values for 2 keys"):
        client.write(table, {"key": [1, 2], "age": [1]})


def test_request_over_the_key_limit_names_the_limit(start_node) -> None:
    node = start_node("--max-keys-per-request", "100")
    with Client(node.address) as c:
        c.create_table("small", key="int64", features={"x": "int32"}, shards=2)
        c.write("small", {"key": [1], "x": [1]})
        with pytest.raises(
            kvstore.RequestTooLarge, match=r"101 keys.*limit is 100 keys per request"
        ):
            c.get("small", list(range(101)))
        with pytest.raises(kvstore.RequestTooLarge, match="max_keys_per_request"):
            c.write("small", {"key": list(range(200)), "x": list(range(200))})
        assert c.get("small", [1]).to_pylist() == [{"key": 1, "x": 1}]


def test_request_over_the_byte_limit_names_the_limit(start_node) -> None:
    node = start_node("--max-request-mb", "1")
    with Client(node.address) as c:
        c.create_table("blobs", key="int64", features={"b": "bytes"}, shards=1)
        with pytest.raises(kvstore.RequestTooLarge, match="max_request_bytes"):
            c.write("blobs", {"key": [1, 2], "b": [b"x" * 700_000, b"y" * 700_000]})
        assert c.get("blobs", [1]).found.tolist() == [False]


def test_unreachable_node_fails_within_the_deadline() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with (
        Client(f"127.0.0.1:{port}", timeout=2.0) as c,
        pytest.raises(kvstore.Unavailable, match=f"127.0.0.1:{port}"),
    ):
        c.get("t", [1])
    assert time.monotonic() - started < 2.0 + 1.0


def test_node_dying_gives_unavailable_and_restart_serves_again(start_node) -> None:
    node = start_node()
    c = Client(node.address, timeout=3)
    c.create_table("t", key="int64", features={"x": "int32"}, shards=2)
    c.write("t", {"key": [1], "x": [9]})
    node.kill()
    with pytest.raises((kvstore.Unavailable, kvstore.DeadlineExceeded)):
        c.get("t", [1])
    c.close()


def test_corrupt_stored_value_names_table_shard_and_key(start_node) -> None:
    node = start_node()
    with Client(node.address) as c:
        c.create_table("corrupt", key="int64", features={"x": "int32", "s": "string"}, shards=4)
        c.write("corrupt", {"key": list(range(20)), "x": list(range(20)), "s": ["v"] * 20})
    assert node.stop() == 0
    # Damage key 7's stored value directly in its shard's RocksDB.
    from kvstore import _codec

    shard = _codec.shard_ids_int(np.array([7], np.int64), 4)[0]
    shard_dirs = sorted(node.data_dir.glob(f"tables/corrupt-*/delta/shard-{shard:04d}"))
    assert len(shard_dirs) == 1
    opts = rocksdict.Options(raw_mode=True)
    db = rocksdict.Rdict(str(shard_dirs[0]), opts, column_families={"default": opts})
    key = _codec.encode_int_keys(np.array([7], np.int64))[0]
    db[key] = db[key][:10]  # truncated
    db.close()
    del db
    node.start()
    with Client(node.address) as c:
        with pytest.raises(kvstore.CorruptValue, match=rf"table 'corrupt', shard {shard}, key 7"):
            c.get("corrupt", [1, 7, 8])
        # The node stays up and serves the other keys.
        res = c.get("corrupt", [1, 8, 19], ["x"])
        assert res.to_numpy()["x"].tolist() == [1, 8, 19]
        # A partial write over the corrupt row is refused, not merged with garbage.
        with pytest.raises(kvstore.CorruptValue, match="key 7"):
            c.write("corrupt", {"key": [7], "x": [0]})
        # A full write replaces it.
        c.write("corrupt", {"key": [7], "x": [70], "s": ["ok"]})
        assert c.get("corrupt", [7]).to_pylist() == [{"key": 7, "x": 70, "s": "ok"}]


def test_create_existing_table_with_another_schema(client: Client, table: str) -> None:
    with pytest.raises(kvstore.AlreadyExists, match=f"table '{table}' exists with another schema"):
        client.create_table(table, key="int64", features={"age": "int64"}, shards=4)
    _unchanged(client, table)


def test_bad_schemas_are_refused_with_the_reason(client: Client) -> None:
    with pytest.raises(kvstore.InvalidArgument, match=r"unknown dtype 'float16'"):
        client.create_table("bad1", features={"x": "float16"})
    with pytest.raises(kvstore.InvalidArgument, match="key type 'uuid'"):
        client.create_table("bad2", key="uuid", features={"x": "int32"})
    with pytest.raises(kvstore.InvalidArgument, match="at least one feature"):
        client.create_table("bad3", features={})
    with pytest.raises(kvstore.InvalidArgument, match="'key' is reserved"):
        client.create_table("bad4", features={"key": "int32"})
    for ttl in (-1, float("inf"), float("nan"), 1e20, "60"):
        with pytest.raises(kvstore.InvalidArgument, match="feature 'x': the TTL must be"):
            client.create_table("bad5", features={"x": "int32"}, ttl={"x": ttl})
    for more in ({"replicas": 2}, {"write_quorum": 2}):
        with pytest.raises(kvstore.InvalidArgument, match="need a cluster"):
            client.create_table("bad6", features={"x": "int32"}, **more)
    created = {t.schema.name for t in client.list_tables()}
    assert not {"bad1", "bad2", "bad3", "bad4", "bad5", "bad6"} & created


def test_garbage_rows_sent_to_the_node_are_refused(shared_node, table: str, client: Client) -> None:
    import grpc

    schema_id = client.describe_table(table).schema.schema_id
    stub = _raw_stub(shared_node.address)
    keys = pb.Keys(count=1, int64_le=np.array([1], "<i8").tobytes())
    request = pb.WriteRequest(
        table=table,
        schema_id=schema_id,
        keys=keys,
        rows=b"\x01garbage",
        row_offsets=np.array([0, 8], "<i8").tobytes(),
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.Write(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "row 0 (key 1)" in info.value.details()
    _unchanged(client, table)
