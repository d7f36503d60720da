"""The fast read path's gets answered in C from the shards (``_codec.answer_read``):
the same rows as the full path (``get_response``), whatever changes a key (writes,
deletes, TTL expiry, loads, rollbacks, a table dropped and made again), large gets
read on the node's read threads included, and no answer (the full path's) for any
request the full path would answer otherwise.
"""

from __future__ import annotations

import random
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import SMALL_FEATURES as FEATURES
from helpers import check_ttl_expiry, reads_alike_through_random_changes

from kvstore import Client
from kvstore import _codec as codec
from kvstore.columns import encode_rows
from kvstore.config import NodeConfig
from kvstore.keys import KeyBatch
from kvstore.schema import TableSchema
from kvstore.server.fast import read_table, refresh_read_table
from kvstore.server.node import Node, run_steps
from kvstore.server.servicer import get_response
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.wire.frames import RESPONSE_HEADER, STATUS_OK


@pytest.fixture(params=["small", "threads"])
def node(tmp_path: Path, request: pytest.FixtureRequest):
    """A node with the default settings, and one whose gets of 4 keys or more are
    "large": read on two read threads (``Reads.fetch``), in C as well."""
    config = NodeConfig(data_dir=tmp_path / "node")
    if request.param == "threads":
        config = NodeConfig(data_dir=tmp_path / "node", read_threads=2, parallel_read_keys=4)
    config.load()
    node = Node(config)
    node.open()
    yield node
    node.close()


def _request(name: str, keys: list[int], features=(), version: int = 0) -> pb.GetRequest:
    ints = np.array(keys, "<i8").tobytes()
    return pb.GetRequest(
        table=name, keys=pb.Keys(count=len(keys), int64_le=ints), features=features, version=version
    )


def _in_order(response: pb.GetResponse) -> list[bytes | None]:
    """A GetResponse's rows in request order (None = missing)."""
    lengths = np.frombuffer(response.lengths, "<i4").tolist()
    order = np.frombuffer(response.order, "<i4").tolist() or list(range(len(lengths)))
    out: list[bytes | None] = [None] * len(lengths)
    at = 0
    for i, length in enumerate(lengths):
        if length >= 0:
            out[order[i]] = response.values[at : at + length]
            at += length
    return out


def _c_answer(read_tables, node: Node, request: pb.GetRequest) -> pb.GetResponse | None:
    frame = codec.answer_read(read_tables, b"hdr" + request.SerializeToString(), 9, node.tables, 3)
    if frame is None:
        return None
    length, request_id, status = RESPONSE_HEADER.unpack_from(frame)
    assert (request_id, status, len(frame)) == (9, STATUS_OK, RESPONSE_HEADER.size + length)
    return pb.GetResponse.FromString(frame[RESPONSE_HEADER.size :])


def _check_same(read_tables, node: Node, request: pb.GetRequest) -> bool:
    """The C answer and the full path's agree; whether C answered. As the fast path
    does, a full-path answer refreshes the table's ReadTable."""
    fast = _c_answer(read_tables, node, request)
    full = get_response(node, request)
    if fast is None:
        refresh_read_table(read_tables, node, request.table)
        return False
    assert (fast.schema_id, fast.version) == (full.schema_id, full.version)
    assert fast.order == b""  # rows in request order
    assert _in_order(fast) == _in_order(full), request
    return True


def _write(node: Node, name: str, keys: list[int], a: list[int], when: int) -> None:
    schema = node.table(name).schema
    rows = encode_rows(schema, {"key": np.array(keys, np.int64), "a": a}, event_time=when)
    run_steps(
        node.write_steps(name, schema.schema_id, rows.keys, rows.rows, rows.offsets, rows.features)
    )


def _delete(node: Node, name: str, keys: list[int], when: int) -> None:
    run_steps(node.delete_steps(name, KeyBatch("int64", ints=np.array(keys, np.int64)), when))


def test_small_gets_are_answered_in_c_as_the_full_path_answers_them(node: Node) -> None:
    node.create_table(TableSchema.build("t", "int64", FEATURES, shards=4))
    read_tables: dict = {}
    request = _request("t", [3, 1, 30, 3, 7], ["s", "a"])
    assert not _check_same(read_tables, node, request)  # not known yet: the full path
    assert _check_same(read_tables, node, request)  # every key missing, answered in C
    stats = node.table_stats("t")
    before = stats.keys_read
    rng = random.Random(17)
    answered = 0
    for step in range(300):
        keys = [rng.randrange(-3, 40) for _ in range(rng.choice((1, 1, 3, 10, 40)))]
        op = rng.random()
        when = 1_000 + step * 10 + rng.randrange(-30, 30)  # some writes arrive late
        if op < 0.3:
            distinct = sorted(set(keys))
            _write(node, "t", distinct, [step] * len(distinct), when)
        elif op < 0.4:
            _delete(node, "t", keys, when)
        elif op < 0.42:
            node.compact_delta("t")
        else:
            answered += _check_same(read_tables, node, _request("t", keys))
    assert answered > 100  # every read after the first, written keys or not
    assert stats.keys_read > before  # C answers count their keys as the full path does
    # Dropped and made again with other features: the old table's ReadTable answers
    # nothing, the new one is taken after one full-path answer.
    node.drop_table("t")
    node.create_table(TableSchema.build("t", "int64", {"a": "int64"}, shards=2))
    _write(node, "t", [1], [5], 3_000)
    assert not _check_same(read_tables, node, _request("t", [1, 2]))
    assert _check_same(read_tables, node, _request("t", [1, 2]))
    assert _in_order(get_response(node, _request("t", [1, 2])))[1] is None


def test_what_the_full_path_must_answer_is_not_answered_in_c(node: Node) -> None:
    node.create_table(TableSchema.build("t", "int64", FEATURES, shards=4))
    node.create_table(TableSchema.build("names", "string", FEATURES, shards=2))
    _write(node, "t", list(range(20)), list(range(20)), 1_000)
    read_tables = {"t": read_table(node, "t")}
    assert read_table(node, "names") is None  # string keys: the full path
    assert read_table(node, "gone") is None
    keys = pb.Keys(count=3, int64_le=np.array([3, 1, 30], "<i8").tobytes())
    assert _c_answer(read_tables, node, pb.GetRequest(table="t", keys=keys)) is not None
    limit = node.config.max_keys_per_request  # large gets too, on the read threads
    for other in (
        pb.GetRequest(table="t", keys=keys, features=["nope"]),  # UnknownFeature
        pb.GetRequest(table="t", keys=keys, version=5),  # NotFound
        pb.GetRequest(table="u", keys=keys),  # TableNotFound
        pb.GetRequest(table="t", keys=pb.Keys(count=4, int64_le=keys.int64_le)),
        pb.GetRequest(table="t", keys=pb.Keys(count=0)),
        pb.GetRequest(table="t", keys=pb.Keys(count=1, utf8=b"a", utf8_offsets=b"")),
        _request("t", list(range(limit + 1))),
    ):
        assert _c_answer(read_tables, node, other) is None, other
    assert _c_answer(read_tables, node, _request("t", list(range(limit)))) is not None


def test_the_parser_answers_any_bytes_as_the_full_path_or_not_at_all(node: Node) -> None:
    """The request body comes off the network: cut short or with any byte changed, it
    gets no frame (the full path answers it, errors included) or the full path's rows."""
    node.create_table(TableSchema.build("t", "int64", FEATURES, shards=4))
    _write(node, "t", list(range(8)), list(range(8)), 1_000)
    read_tables = {"t": read_table(node, "t")}
    body = _request("t", [1, 2, 3], ["a"]).SerializeToString()
    rng = random.Random(3)
    bodies = [body[:i] for i in range(len(body))]
    for _ in range(400):
        changed = bytearray(body)
        for _ in range(rng.choice((1, 1, 2))):
            changed[rng.randrange(len(changed))] = rng.randrange(256)
        bodies.append(bytes(changed))
    bodies += [body.replace(b"t", b"\xff", 1), body + b"\x08", body + b"\x80" * 11]
    answered = 0
    for other in bodies:
        frame = codec.answer_read(read_tables, b"xx" + other, 9, node.tables, 2)
        if frame is None:
            continue
        answered += 1
        full = get_response(node, pb.GetRequest.FromString(other))
        fast = pb.GetResponse.FromString(frame[RESPONSE_HEADER.size :])
        assert _in_order(fast) == _in_order(full), other
    assert answered >= 1  # the whole body, at least
    with pytest.raises(ValueError, match="outside"):
        codec.answer_read(read_tables, body, 9, node.tables, len(body) + 1)


# -- real node processes: the wire, versions, TTL ------------------------------------------


def test_loads_rollbacks_writes_and_deletes_read_alike_over_both_transports(
    start_node, tmp_path: Path
) -> None:
    node = start_node()
    with Client(node.address) as fast, Client(node.address, transport="grpc") as full:
        reads_alike_through_random_changes(fast, full, (fast,), tmp_path)


def test_a_row_is_not_served_after_its_ttl(start_node) -> None:
    check_ttl_expiry(start_node().address)


def test_large_gets_read_on_the_read_threads_read_alike_over_both_transports(
    start_node, tmp_path: Path
) -> None:
    """Gets of ``parallel_read_keys`` keys or more are answered in C too, their shards
    read on the read threads: loads, rollbacks, pinned versions, writes, deletes and
    TTLs read as the full path (gRPC) reads them."""
    threads = ("--read-threads", "2", "--parallel-read-keys", "1")
    node = start_node(*threads)
    with Client(node.address) as fast, Client(node.address, transport="grpc") as full:
        reads_alike_through_random_changes(fast, full, (fast,), tmp_path)
    check_ttl_expiry(start_node(*threads).address)


def test_a_get_of_a_thousand_keys_is_answered_in_c_on_the_read_threads(node: Node) -> None:
    node.create_table(TableSchema.build("t", "int64", FEATURES, shards=8))
    _write(node, "t", list(range(0, 3000, 2)), list(range(1500)), 1_000)
    _delete(node, "t", list(range(0, 300, 4)), 2_000)
    read_tables = {"t": read_table(node, "t")}
    rng = np.random.default_rng(4)
    request = _request("t", rng.integers(-10, 3010, 1000).tolist())
    assert _check_same(read_tables, node, request)
    response = _c_answer(read_tables, node, request)
    assert response is not None and sum(r is not None for r in _in_order(response)) > 300


def test_frames_that_arrive_together_are_answered_in_order(start_node) -> None:
    """Pipelined requests (the buffered path of the node) get C answers, in order."""
    node = start_node()
    with Client(node.address) as client:
        client.create_table("t", key="int64", features=FEATURES, shards=4)
        client.write("t", {"key": list(range(10)), "a": list(range(10))})
        client.get("t", [0])  # the table's first read takes the full path
        (address,) = client._ops.fast.values()
    host, _, port = address.rpartition(":")
    bodies = [_request("t", [k, k + 1]).SerializeToString() for k in range(6)]
    frames = b"".join(struct.pack("<II", len(b), 40 + i) + b for i, b in enumerate(bodies))
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(frames)
        got = b""
        answers = []
        while len(answers) < len(bodies):
            got += sock.recv(65536)
            while len(got) >= RESPONSE_HEADER.size:
                length, request_id, status = RESPONSE_HEADER.unpack_from(got)
                end = RESPONSE_HEADER.size + length
                if len(got) < end:
                    break
                answers.append((request_id, status, got[RESPONSE_HEADER.size : end]))
                got = got[end:]
    for i, (request_id, status, body) in enumerate(answers):
        assert (request_id, status) == (40 + i, STATUS_OK)
        response = pb.GetResponse.FromString(body)
        assert response.order == b""  # answered in C (the full path sends 4 shards' order)
        rows = _in_order(response)
        assert [r is not None for r in rows] == [True, i + 1 < 10]


def test_a_whole_frame_in_one_read_is_answered_from_its_header(node: Node) -> None:
    node.create_table(TableSchema.build("t", "int64", FEATURES, shards=4))
    _write(node, "t", [1, 2], [10, 20], 1_000)
    read_tables = {"t": read_table(node, "t")}
    body = _request("t", [2, 1, 5]).SerializeToString()
    frame = struct.pack("<II", len(body), 77) + body
    answer = codec.answer_request(read_tables, frame, node.tables, 1 << 20)
    assert answer == codec.answer_read(read_tables, body, 77, node.tables)
    assert answer is not None and RESPONSE_HEADER.unpack_from(answer)[1:] == (77, STATUS_OK)
    # Anything but exactly one frame within the limit: the protocol's other ways.
    for other, limit in (
        (frame[:-1], 1 << 20),  # cut short
        (frame + frame, 1 << 20),  # two frames
        (frame[:7], 1 << 20),  # not even a header
        (frame, len(body) - 1),  # over the limit: RequestTooLarge
        (bytearray(frame), 1 << 20),  # not bytes (the protocol gets bytes)
    ):
        assert codec.answer_request(read_tables, other, node.tables, limit) is None


def test_a_dropped_table_is_let_go_and_a_table_that_cannot_be_held_keeps_the_full_path(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.create_table(TableSchema.build("t", "int64", FEATURES, shards=2))
    node.create_table(TableSchema.build("u", "int64", FEATURES, shards=2))
    read_tables: dict = {}
    refresh_read_table(read_tables, node, "t")
    refresh_read_table(read_tables, node, "u")
    assert set(read_tables) == {"t", "u"}
    node.drop_table("t")
    node.create_table(TableSchema.build("v", "int64", FEATURES, shards=2))
    refresh_read_table(read_tables, node, "v")
    assert set(read_tables) == {"u", "v"}  # "t", never asked for again, is not kept

    def cannot_open(node: Node, name: str):
        raise OSError("the current version's base cannot be opened")

    monkeypatch.setattr("kvstore.server.fast.read_table", cannot_open)
    node.drop_table("u")
    node.create_table(TableSchema.build("u", "int64", FEATURES, shards=2))
    refresh_read_table(read_tables, node, "u")  # logged, not raised: the answer stands
    assert set(read_tables) == {"v"}
