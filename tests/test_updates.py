"""Streaming updates: newest event time wins per feature, durably, through a real node."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import kvstore
from kvstore import AsyncClient, Client
from kvstore.clock import now_us
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc


@pytest.fixture
def table(client: Client, table_name: str) -> str:
    client.create_table(
        table_name, key="int64", features={"a": "int64", "b": "string", "c": "float32"}, shards=4
    )
    return table_name


def test_reordered_and_duplicated_updates_converge(client: Client, table: str) -> None:
    rng = random.Random(7)
    base = now_us() - 10_000_000
    updates = []
    for n in range(300):
        key = rng.randrange(20)
        feature = rng.choice(["a", "b", "c"])
        value = {"a": n, "b": f"s{n}", "c": float(n)}[feature]
        updates.append((key, feature, value, base + n))
    expected: dict[int, dict] = {}
    for key, feature, value, _t in updates:  # in event-time order: the truth
        expected.setdefault(key, {})[feature] = value
    shuffled = updates + rng.sample(updates, 100)  # duplicates
    rng.shuffle(shuffled)
    for key, feature, value, t in shuffled:
        client.write(table, {"key": [key], feature: [value]}, event_time=t)
    rows = client.get(table, sorted(expected)).to_pylist()
    for row in rows:
        want = expected[row["key"]]
        assert {k: row[k] for k in want} == want
        assert all(row[k] is None for k in {"a", "b", "c"} - set(want))


def test_delete_hides_older_values_and_newer_writes_show(client: Client, table: str) -> None:
    t = now_us() - 1_000_000
    client.write(table, {"key": [1, 2], "a": [10, 20], "b": ["x", "y"]}, event_time=t)
    client.delete(table, [1], event_time=t + 10)
    assert client.get(table, [1, 2], ["a"]).found.tolist() == [False, True]
    client.write(table, {"key": [1], "a": [11]}, event_time=t + 5)  # older than the delete
    assert client.get(table, [1], ["a"]).found.tolist() == [False]
    client.write(table, {"key": [1], "b": ["new"]}, event_time=t + 20)
    assert client.get(table, [1]).to_pylist() == [{"key": 1, "a": None, "b": "new", "c": None}]


def test_missing_event_time_gets_the_node_clock(client: Client, table: str, shared_node) -> None:
    from kvstore.columns import encode_rows

    schema = client.describe_table(table).schema
    rows = encode_rows(schema, {"key": [5], "a": [1]}, event_time=0)
    stub = pb_grpc.FeatureStoreStub(__import__("grpc").insecure_channel(shared_node.address))
    before = now_us()
    stub.Write(
        pb.WriteRequest(
            table=table,
            schema_id=schema.schema_id,
            keys=rows.keys.to_proto(),
            rows=rows.rows,
            row_offsets=rows.offsets.tobytes(),
            features=rows.features,
        ),
        timeout=5,
    )
    stamp = int(client.get(table, [5]).event_times[0])
    assert before <= stamp <= now_us()


def test_event_time_too_far_ahead_is_refused(client: Client, table: str) -> None:
    client.write(table, {"key": [1], "a": [1]})
    future = now_us() + 3600 * 10**6
    with pytest.raises(
        kvstore.InvalidArgument,
        match=r"row 1 \(key 2\).*ahead of the node's clock.*max_clock_skew_s",
    ):
        client.write(table, {"key": [1, 2], "a": [5, 6]}, event_time=np.array([now_us(), future]))
    assert client.get(table, [1, 2], ["a"]).to_pylist() == [{"key": 1, "a": 1}, None]


def test_a_delete_too_far_ahead_is_refused_and_hides_nothing(client: Client, table: str) -> None:
    client.write(table, {"key": [1], "a": [1]})
    future = now_us() + 3600 * 10**6
    with pytest.raises(kvstore.InvalidArgument, match=r"key 1\).*ahead of the node's clock"):
        client.delete(table, [1], event_time=future)
    assert client.get(table, [1], ["a"]).to_pylist() == [{"key": 1, "a": 1}]
    client.write(table, {"key": [1], "a": [2]})  # a later write still lands
    assert client.get(table, [1], ["a"]).to_pylist() == [{"key": 1, "a": 2}]


def test_update_stream_acknowledges_every_batch(client: Client, table: str) -> None:
    with client.update_stream(table, max_in_flight=2) as stream:
        for batch in range(50):
            keys = np.arange(batch * 10, batch * 10 + 10)
            stream.send({"key": keys, "a": keys * 2})
        stream.flush()
        assert stream.rows_acked == 500
    res = client.get(table, np.arange(500), ["a"])
    assert res.found.all()
    assert np.array_equal(res.to_numpy()["a"].data, np.arange(500) * 2)


def test_a_batch_acknowledged_during_its_own_send_is_not_sent_again(
    client: Client, table: str
) -> None:
    """After a node failed, ``send``'s first ``_progress`` sends every batch not yet
    acknowledged again, the new one too, and may take their acks before ``send`` goes
    on: the new batch is then acknowledged already (a KeyError in a test of the cluster
    suite before). Replayed here on one node, deterministically."""
    with client.update_stream(table) as stream:
        original = stream._progress
        calls = 0

        def progress(quiet: bool = False) -> None:
            nonlocal calls
            calls += 1
            if calls > 1:
                original(quiet)
                return
            for number in list(stream._batches):  # as after a failed node's reroute
                stream._send(stream._plan(number))
            deadline = time.monotonic() + 10
            while stream._batches and time.monotonic() < deadline:
                original(quiet)
                time.sleep(0.005)
            assert not stream._batches

        stream._progress = progress  # type: ignore[method-assign]
        stream.send({"key": [7], "a": [70]})
        stream.flush()
        assert stream.rows_acked == 1
    assert client.get(table, [7], ["a"]).to_pylist() == [{"key": 7, "a": 70}]


def test_update_stream_error_names_the_batch_and_keeps_earlier_ones(
    client: Client, table: str
) -> None:
    stream = client.update_stream(table)
    stream.send({"key": [1], "a": [1]})
    stream.send({"key": [2], "a": [2]}, event_time=now_us() + 3600 * 10**6)
    with pytest.raises(kvstore.InvalidArgument, match="update 2 of the stream"):
        stream.flush()
    assert client.get(table, [1, 2], ["a"]).found.tolist() == [True, False]


def test_async_update_stream(shared_node, table: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(shared_node.address) as c:
            stream = await c.update_stream(table, max_in_flight=4)
            async with stream:
                for i in range(20):
                    await stream.send({"key": [i], "b": [f"v{i}"]})
                await stream.flush()
                assert stream.rows_acked == 20
            res = await c.get(table, list(range(20)), ["b"])
            assert res.to_arrow().column("b").to_pylist() == [f"v{i}" for i in range(20)]

    asyncio.run(scenario())


def test_ttl_reads_old_values_as_null_at_once(client: Client, table_name: str) -> None:
    client.create_table(
        table_name, key="int64", features={"fresh": "float32", "kept": "int32"}, ttl={"fresh": 60}
    )
    old = now_us() - 120 * 10**6
    client.write(table_name, {"key": [1, 2], "fresh": [0.5, 0.5], "kept": [1, 2]}, event_time=old)
    client.write(table_name, {"key": [2], "fresh": [0.75]})
    rows = client.get(table_name, [1, 2]).to_pylist()
    assert rows == [{"key": 1, "fresh": None, "kept": 1}, {"key": 2, "fresh": 0.75, "kept": 2}]
    assert client.describe_table(table_name).schema.features[0].ttl_s == 60


def test_consumer_positions_are_stored_with_the_data(client: Client, table: str) -> None:
    assert client.consumer_positions(table, "c1", "orders") == {}
    client.write(table, {"key": [1], "a": [1]}, position=("c1", "orders", 0, 41))
    client.write(table, {"key": [2, 3], "a": [2, 3]}, position=("c1", "orders", 0, 42))
    client.delete(table, [3], position=("c1", "orders", 1, 7))
    assert client.consumer_positions(table, "c1", "orders") == {0: 42, 1: 7}
    assert client.consumer_positions(table, "c2", "orders") == {}
    assert client.get(table, [1, 2, 3], ["a"]).found.tolist() == [True, True, False]


def test_stats_and_status_show_freshness(client: Client, table: str, shared_node) -> None:
    client.write(table, {"key": np.arange(100), "a": np.arange(100)})
    client.get(table, [1, 2, 3])
    stats = client.stats()["tables"][table]
    assert stats["rows_updated"] == 100 and stats["keys_read"] == 3
    assert 0 <= stats["newest_event_age_us"] < 60 * 10**6
    assert stats["lag_samples"] == 100 and 0 <= stats["lag_p50_us"] <= stats["lag_p99_us"]
    out = subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "status", "--address", shared_node.address, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(out.stdout)["tables"][table]["rows_updated"] == 100


def test_acknowledged_updates_survive_kill_9(start_node) -> None:
    node = start_node()
    with Client(node.address, timeout=5) as c:
        c.create_table("durable", key="int64", features={"n": "int64"}, shards=4)
    acked = 0
    for round_ in range(5):
        stop = threading.Event()
        progress = {"acked": 0}

        def produce(
            address: str = node.address,
            start: int = acked,
            stop: threading.Event = stop,
            progress: dict = progress,
        ) -> None:
            c = Client(address, timeout=5)
            try:
                with c.update_stream("durable", max_in_flight=4) as stream:
                    i = start
                    while not stop.is_set():
                        keys = np.arange(i * 10, i * 10 + 10)
                        stream.send({"key": keys, "n": keys})
                        i += 1
                        progress["acked"] = stream.rows_acked // 10 + start
            except kvstore.KvstoreError:
                pass
            finally:
                c.close()

        thread = threading.Thread(target=produce)
        thread.start()
        deadline = time.monotonic() + 20
        while progress["acked"] < acked + 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        acked_before_kill = progress["acked"]
        node.kill()  # SIGKILL: no shutdown, no flush
        stop.set()
        thread.join(timeout=30)
        assert acked_before_kill >= acked + 20, f"round {round_}: the stream made no progress"
        node.start()
        with Client(node.address, timeout=5) as c:
            keys = np.arange(acked_before_kill * 10)
            res = c.get("durable", keys, ["n"])
            lost = keys[~res.found]
            assert not len(lost), f"round {round_}: {len(lost)} acknowledged rows lost: {lost[:5]}"
        acked = acked_before_kill


def test_an_update_streams_request_in_its_wire_form_parses_as_the_plain_one() -> None:
    """The update stream sends each WriteRequest serialized by hand (its rows appended,
    not copied through protobuf): the node parses the same message, whatever the
    lengths (one- to three-byte varints), a position or features set or not."""
    from kvstore.client.core import serialized_write

    position = pb.ConsumerPosition(consumer="c", source="s", partition=2, offset=9)
    for size in (0, 1, 127, 128, 16_383, 16_384, 402_000):
        rows = bytes(range(256)) * (size // 256) + bytes(size % 256)
        offsets = np.arange(size // 8 + 1, dtype="<i8").tobytes()
        for extra in ({}, {"position": position, "features": ["a", "c"]}):
            head = pb.WriteRequest(table="t", schema_id=3, epoch=7, **extra)
            head.keys.count = 2
            head.keys.int64_le = np.array([1, 2], "<i8").tobytes()
            plain = pb.WriteRequest()
            plain.CopyFrom(head)
            plain.rows, plain.row_offsets = rows, offsets
            assert pb.WriteRequest.FromString(serialized_write(head, rows, offsets)) == plain


def test_a_write_call_sends_a_serialized_write_as_it_is() -> None:
    """Client.write and AsyncClient.write plan each node's request in its wire form; their
    Write calls' serializer passes it through (and still serializes a plain message)."""
    from kvstore.client.core import SerializedWrite, write_wire

    plain = pb.WriteRequest(table="t", rows=b"\x01\x02", epoch=4)
    assert write_wire(SerializedWrite(b"wire", 4)) == b"wire"
    assert write_wire(plain) == plain.SerializeToString()
