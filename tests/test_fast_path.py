"""The fast read path (Get over plain TCP) answers exactly as gRPC Get does."""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time

import numpy as np
import pytest

import kvstore
from kvstore import Client, _codec
from kvstore.client.core import NodeCall
from kvstore.client.fast import RECEIVE_BUFFER, FastConnections
from kvstore.client.flows import Operations
from kvstore.keys import KeyBatch
from kvstore.schema import TableSchema
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.wire.frames import RESPONSE_HEADER

FEATURES = {"x": "float32", "s": "string", "v": "float32[3]", "l": "int64[]"}


@pytest.fixture
def table(client: Client, table_name: str) -> str:
    client.create_table(table_name, key="int64", features=FEATURES, shards=4)
    client.write(
        table_name,
        {
            "key": np.arange(50),
            "x": np.arange(50, dtype=np.float32),
            "s": [f"s{i}" for i in range(50)],
            "v": np.ones((50, 3), np.float32),
            "l": [[i] * (i % 3) for i in range(50)],
        },
    )
    return table_name


def test_the_node_offers_a_fast_path_and_the_client_uses_it(client: Client, table: str) -> None:
    cmap = client.cluster_map()
    assert cmap["nodes"][0]["address"] in client._ops.fast
    fast = Client(client.address)
    grpc_only = Client(client.address, transport="grpc")
    keys = [3, 99, 3, 0, 49, -5]
    a = fast.get(table, keys).to_arrow()
    b = grpc_only.get(table, keys).to_arrow()
    assert a.equals(b)
    assert a.column("s").to_pylist() == ["s3", None, "s3", "s0", "s49", None]
    fast.close()
    grpc_only.close()


@pytest.mark.parametrize("rows", [1, 150, 3000])
def test_answers_smaller_and_larger_than_the_receive_buffer(
    client: Client, table_name: str, rows: int
) -> None:
    # ~310 B a row in the answer: 1 and 150 rows fit the client's 64 KiB receive
    # buffer, 3000 do not (checked below on the answer's frame).
    client.create_table(table_name, key="int64", features={"e": "float32[72]"}, shards=4)
    emb = np.random.default_rng(rows).random((rows, 72), dtype=np.float32)
    client.write(table_name, {"key": np.arange(rows), "e": emb})
    keys = np.r_[np.arange(rows), -1]
    with Client(client.address) as fast, Client(client.address, transport="grpc") as slow:
        for _ in range(2):  # the buffer is reused from one answer to the next
            got = fast.get(table_name, keys).to_numpy()["e"]
            assert np.array_equal(got[:-1], emb) and np.isnan(got[-1]).all()
        assert fast.get(table_name, keys).to_arrow().equals(slow.get(table_name, keys).to_arrow())
        (address,) = fast._ops.fast.values()
        request = pb.GetRequest(table=table_name, keys=KeyBatch("int64", ints=keys).to_proto())
        (answer,) = fast._fast.get_many([(address, request)], timeout=5)
        frame = RESPONSE_HEADER.size + answer.ByteSize()
        assert (frame <= RECEIVE_BUFFER) == (rows < 3000)


def test_node_errors_arrive_with_their_class_over_the_fast_path(client: Client, table: str) -> None:
    with pytest.raises(kvstore.NotFound, match=f"table '{table}' has no version 7"):
        client.get(table, [1], version=7)
    other = Client(client.address)
    other.get(table, [1])  # caches the schema and the route
    client.drop_table(table)
    with pytest.raises(kvstore.TableNotFound, match=f"no table '{table}'"):
        other.get(table, [1])
    assert table not in other._ops.schemas  # forgotten: a new table of that name is read
    other.close()


def _fast_address(client: Client) -> tuple[str, int]:
    client.cluster_map()
    host, _, port = next(iter(client._ops.fast.values())).rpartition(":")
    return host, int(port)


def _read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    header = b""
    while len(header) < 9:
        header += sock.recv(9 - len(header))
    length, request_id, status = struct.unpack("<IIB", header)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return request_id, status, body


def test_garbage_and_oversize_frames_get_an_error_and_the_node_serves_on(
    client: Client, table: str
) -> None:
    with socket.create_connection(_fast_address(client), timeout=5) as sock:
        sock.sendall(struct.pack("<II", 5, 77) + b"\xff\xff\xff\xff\xff")
        request_id, status, body = _read_frame(sock)
        assert (request_id, status) == (77, 1)
        error = pb.FastError.FromString(body)
        assert error.type == "InvalidArgument" and "not a GetRequest" in error.message
        # The same connection keeps working after a bad request.
        good = pb.GetRequest(
            table=table, keys=pb.Keys(count=1, int64_le=np.array([4], "<i8").tobytes())
        ).SerializeToString()
        sock.sendall(struct.pack("<II", len(good), 78) + good)
        request_id, status, body = _read_frame(sock)
        assert (request_id, status) == (78, 0)
        assert np.frombuffer(pb.GetResponse.FromString(body).lengths, "<i4")[0] > 0
    with socket.create_connection(_fast_address(client), timeout=5) as sock:
        sock.sendall(struct.pack("<II", 1 << 30, 1))
        _, status, body = _read_frame(sock)
        assert status == 1 and pb.FastError.FromString(body).type == "RequestTooLarge"
        assert sock.recv(1) == b""  # closed
    assert client.get(table, [4], ["x"]).to_pylist() == [{"key": 4, "x": 4.0}]


def test_a_node_without_fast_path_is_read_over_grpc(start_node) -> None:
    node = start_node("--fast-port", "-1")
    with Client(node.address) as c:
        c.create_table("plain", features={"x": "int32"}, shards=2)
        c.write("plain", {"key": [1], "x": [5]})
        assert c.get("plain", [1, 2]).to_pylist() == [{"key": 1, "x": 5}, None]
        assert c._ops.fast == {}


def test_a_paused_node_fails_the_call_at_its_deadline_and_serves_once_resumed(
    start_node,
) -> None:
    """The fast path's deadline is the kernel's socket timeout, armed once for calls with
    one timeout and armed again when a call needs less; a wait armed shorter than a
    call's deadline (after a call with a short timeout) must not end that call early,
    and one armed longer (after a long call) must not let a short call run over."""
    node = start_node()
    with Client(node.address) as c:
        c.create_table("paused", features={"x": "int32"}, shards=2)
        c.write("paused", {"key": [1], "x": [5]})
        assert c.get("paused", [1], timeout=0.2).to_pylist() == [{"key": 1, "x": 5}]
        assert c._fast is not None and c._ops.fast  # the fast path answered
        conn = next(iter(c._fast._local.conns.values()))

        node.proc.send_signal(signal.SIGSTOP)  # the node stops answering, sockets open
        resume = threading.Timer(0.6, node.proc.send_signal, (signal.SIGCONT,))
        resume.start()
        try:
            started = time.monotonic()
            # Armed for 0.2 s calls; this one may wait 5 s and is answered at ~0.6 s.
            assert c.get("paused", [1], timeout=5).to_pylist() == [{"key": 1, "x": 5}]
            assert 0.5 < time.monotonic() - started < 4
        finally:
            resume.join()
            node.proc.send_signal(signal.SIGCONT)
        assert next(iter(c._fast._local.conns.values())) is conn  # the same connection

        node.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()  # the same connection, armed for the 5 s call
            with pytest.raises(kvstore.DeadlineExceeded, match=r"within the deadline of 0\.3 s"):
                c.get("paused", [1], timeout=0.3)
            assert 0.3 <= time.monotonic() - started < 0.8
        finally:
            node.proc.send_signal(signal.SIGCONT)
        assert c.get("paused", [1, 2]).to_pylist() == [{"key": 1, "x": 5}, None]


def test_a_send_that_blocks_is_bounded_by_the_deadline_too(start_node) -> None:
    """A request larger than the socket buffers to a paused node blocks in send: the call
    fails at its deadline, not at an earlier short call's armed wait, nor later."""
    node = start_node()
    with Client(node.address) as c:
        c.create_table("big", features={"x": "int32"}, shards=2)
        c.get("big", [1], timeout=0.01)  # arms a ~8 ms wait
        keys = np.arange(3_000_000, dtype=np.int64)  # a 24 MB request
        node.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(kvstore.DeadlineExceeded, match=r"within the deadline of 1\.5 s"):
                c.get("big", keys, timeout=1.5)
            assert 1.5 <= time.monotonic() - started < 2.5
        finally:
            node.proc.send_signal(signal.SIGCONT)
        assert c.get("big", [1]).found.tolist() == [False]  # a new connection serves


@pytest.mark.parametrize("transport", ["auto", "grpc"])
def test_timeouts_that_are_not_a_positive_number_are_refused(shared_node, transport) -> None:
    with Client(shared_node.address, transport=transport) as c:
        c.create_table("timeouts", features={"x": "int32"}, shards=2)
        c.get("timeouts", [1])
        for bad in (0, -1, float("inf"), float("nan"), "5", True):
            with pytest.raises(kvstore.InvalidArgument, match="timeout must be a finite"):
                c.get("timeouts", [1], timeout=bad)
        assert c.get("timeouts", [1]).found.tolist() == [False]  # still served
    with pytest.raises(kvstore.InvalidArgument, match="not -2"):
        Client(shared_node.address, timeout=-2)


def _peer_answering(frame: bytes, pieces: tuple[int, ...] = ()) -> tuple[socket.socket, str]:
    """A listening socket whose first connection gets ``frame`` once a request arrived:
    a node that breaks the protocol, which a real one cannot be made to do. ``pieces``:
    send the frame cut after these byte counts, 50 ms apart."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.recv(65536)
            at = 0
            for end in (*pieces, len(frame)):
                conn.sendall(frame[at:end])
                at = end
                time.sleep(0.05)
            conn.recv(1)  # hold the connection until the client closes it

    threading.Thread(target=serve, daemon=True).start()
    return server, f"127.0.0.1:{server.getsockname()[1]}"


def test_bytes_after_an_answer_are_refused_naming_the_node() -> None:
    body = pb.GetResponse(schema_id=1).SerializeToString()
    frame = struct.pack("<IIB", len(body), 1, 0) + body
    server, address = _peer_answering(frame + b"junk")
    conns = FastConnections()
    with server, pytest.raises(kvstore.Unavailable, match=f"{address}.*4 bytes after an answer"):
        conns.get_many([(address, pb.GetRequest(table="t"))], timeout=5)
    conns.close()


@pytest.mark.parametrize("path", ["several nodes", "one node"])
def test_an_answer_that_does_not_fit_the_request_names_the_node(path: str) -> None:
    schema = TableSchema.build("t", "int64", {"x": "int64"})
    keys = KeyBatch("int64", ints=np.arange(3, dtype=np.int64))
    ops = Operations("127.0.0.1:1", timeout=5)
    plan = ops.get_plan(schema, None)
    lengths = np.full(3, 20, "<i4").tobytes()
    short = pb.GetResponse(schema_id=schema.schema_id, lengths=lengths, values=b"x" * 40)
    with pytest.raises(
        kvstore.KvstoreError,
        match=r"table 't': a malformed Get response \(part 0 from 10.0.0.7:7070\): part 0: "
        r"its row lengths add up to 60 bytes, its values block holds 40",
    ):
        if path == "one node":
            ops.finish_one("t", plan, keys, "10.0.0.7:7070", short)
        else:
            call = NodeCall("10.0.0.7:7070", "Get", pb.GetRequest(table="t"))
            ops.finish_get("t", plan, keys, [call], [short])


@pytest.mark.parametrize("pieces", [(1,), (5, 9), (9,), (12,)], ids=str)
def test_an_answer_that_arrives_in_pieces_is_read_whole(pieces) -> None:
    # The header cut short, cut whole, and the body cut: each takes the slow path
    # after the one-recv fast path of _Connection.receive.
    body = pb.GetResponse(schema_id=7, version=3, values=b"v" * 40).SerializeToString()
    server, address = _peer_answering(struct.pack("<IIB", len(body), 1, 0) + body, pieces)
    conns = FastConnections()
    request = pb.GetRequest(table="t").SerializeToString()
    with server:
        answer = conns.get(address, request, timeout=5)
    conns.close()
    assert (answer.schema_id, answer.version, answer.values) == (7, 3, b"v" * 40)


@pytest.mark.parametrize("pieces", [(9 + 70_000,), (9 + 100, 9 + 200_000, 9 + 300_000)], ids=str)
def test_an_answer_larger_than_the_receive_buffer_that_arrives_in_pieces_is_read_whole(
    pieces,
) -> None:
    # The body is received into its own bytes, waiting for all of it (MSG_WAITALL):
    # pieces 50 ms apart, and the first recv's part of the body, land in place.
    values = np.random.default_rng(1).bytes(400_000)
    body = pb.GetResponse(schema_id=7, version=3, values=values).SerializeToString()
    frame = struct.pack("<IIB", len(body), 1, 0) + body
    assert len(frame) > RECEIVE_BUFFER
    server, address = _peer_answering(frame, pieces)
    conns = FastConnections()
    request = pb.GetRequest(table="t").SerializeToString()
    with server:
        status, got = conns.get_answer(address, request, timeout=5)
    conns.close()
    assert type(got) is bytes and (status, got) == (0, body)


def test_a_large_answer_cut_short_fails_at_the_deadline_or_when_the_node_closes() -> None:
    body = pb.GetResponse(schema_id=7, values=b"v" * 300_000).SerializeToString()
    frame = struct.pack("<IIB", len(body), 1, 0) + body
    server = socket.create_server(("127.0.0.1", 0))
    release = threading.Event()

    def serve() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(frame[:200_000])
                release.wait(5)  # first: silent past the deadline; then: closed

    threading.Thread(target=serve, daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    conns = FastConnections()
    request = pb.GetRequest(table="t").SerializeToString()
    with server:
        started = time.monotonic()
        with pytest.raises(kvstore.DeadlineExceeded, match=r"within the deadline of 0\.3 s"):
            conns.get_answer(address, request, timeout=0.3)
        assert 0.3 <= time.monotonic() - started < 0.8
        release.set()
        with pytest.raises(kvstore.Unavailable, match="closed the connection"):
            conns.get_answer(address, request, timeout=5)
    conns.close()


def test_unfilled_bytes_are_written_through_their_view() -> None:
    data, view = _codec.unfilled_bytes(5)
    view[:] = b"abcde"
    view.release()
    assert type(data) is bytes and data == b"abcde"
    assert _codec.unfilled_bytes(0)[0] == b""
    with pytest.raises(ValueError, match="-1 bytes"):
        _codec.unfilled_bytes(-1)


def test_a_node_that_closes_mid_answer_is_unavailable() -> None:
    body = pb.GetResponse(schema_id=7, values=b"v" * 40).SerializeToString()
    frame = struct.pack("<IIB", len(body), 1, 0) + body
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(frame[:20])  # and close

    threading.Thread(target=serve, daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    conns = FastConnections()
    with server, pytest.raises(kvstore.Unavailable, match=f"{address}.*closed the connection"):
        conns.get(address, pb.GetRequest(table="t").SerializeToString(), timeout=5)
    conns.close()


@pytest.mark.parametrize(
    "keys",
    [
        KeyBatch("int64", ints=np.array([5, -1, 2**40], np.int64)),
        KeyBatch.from_values("string", ["a", "ü", ""], "t"),
    ],
    ids=["int64", "string"],
)
@pytest.mark.parametrize("features", [None, ["x", "v"]], ids=["all", "two"])
@pytest.mark.parametrize("version", [0, 12])
def test_a_plans_request_is_the_get_request_a_node_parses(keys, features, version) -> None:
    # GetPlan.request appends the keys' and version's message to the plan's serialized
    # (table, features) prefix; the node must read the GetRequest built in one piece.
    schema = TableSchema.build("t", keys.key_type, {"x": "float32", "v": "float32[3]"})
    plan = Operations("127.0.0.1:1", timeout=5).get_plan(schema, features)
    whole = pb.GetRequest(table="t", keys=keys.to_proto(), features=plan.names, version=version)
    assert pb.GetRequest.FromString(plan.request(keys, version)) == whole


@pytest.mark.parametrize("keys", [[5], [5, -1, 2**40, 5]], ids=["one", "four"])
@pytest.mark.parametrize("version", [0, 12, 2**40])
def test_a_request_written_in_c_is_the_bytes_protobuf_writes(keys, version) -> None:
    schema = TableSchema.build("t", "int64", {"x": "float32", "v": "float32[3]"})
    plan = Operations("127.0.0.1:1", timeout=5).get_plan(schema, ["v"])
    batch = KeyBatch("int64", ints=np.array(keys, np.int64))
    rest = pb.GetRequest(version=version)
    batch.fill_proto(rest.keys)
    assert plan.request(batch, version) == plan.prefix + rest.SerializeToString()


def _response_of(rows: list[bytes | None], order: list[int] | None = None, **fields):
    lengths = [-1 if r is None else len(r) for r in rows]
    return pb.GetResponse(
        values=b"".join(r for r in rows if r is not None),
        lengths=np.array(lengths, "<i4").tobytes(),
        order=b"" if order is None else np.array(order, "<i4").tobytes(),
        **fields,
    )


def test_an_answer_read_in_c_decodes_as_the_protobuf_one() -> None:
    schema = TableSchema.build("t", "int64", {"x": "float32", "s": "string"})
    ops = Operations("127.0.0.1:1", timeout=5)
    plan = ops.get_plan(schema, None)
    encoded = kvstore.columns.encode_rows(
        schema, {"key": np.arange(3), "x": [1.5, 2.5, 3.5], "s": ["a", None, "ccc"]}
    )
    rows = _codec.split_rows(encoded.rows, encoded.offsets)
    keys = KeyBatch("int64", ints=np.arange(4, dtype=np.int64))
    sid = schema.schema_id
    for response in (
        _response_of([rows[0], None, rows[2], rows[1]], schema_id=sid, version=7),
        _response_of([rows[2], rows[0], None, rows[1]], [2, 0, 3, 1], schema_id=sid),
        _response_of([None, None, None, None], schema_id=sid, version=2**40),
    ):
        body = response.SerializeToString()
        got = ops.finish_frame("t", plan, keys, "n:1", 0, body)
        want = ops.finish_one("t", plan, keys, "n:1", response)
        assert got.version == want.version == response.version
        assert got.to_pylist() == want.to_pylist()
        assert _codec.decode_answer(plan.projection, body, 4) is not None  # read in C
    # Another schema: SchemaMismatch, as finish_one raises (the client describes again).
    other = _response_of([rows[0]] * 4, schema_id=sid + 1).SerializeToString()
    with pytest.raises(_codec.SchemaMismatch):
        ops.finish_frame("t", plan, keys, "n:1", 0, other)
    # Rows that do not fit the request name the node, as finish_one does.
    short = _response_of([rows[0]] * 3, schema_id=sid).SerializeToString()
    with pytest.raises(kvstore.KvstoreError, match=r"\(part 0 from n:1\): part 0: 3 rows for 4"):
        ops.finish_frame("t", plan, keys, "n:1", 0, short)
    # What C does not read (an unknown field, a field twice) is read by protobuf.
    response = _response_of([rows[0], None, rows[2], rows[1]], schema_id=sid, version=3)
    body = response.SerializeToString()
    for unusual in (body + b"\x30\x01", body + b"\x10\x05"):
        assert _codec.decode_answer(plan.projection, unusual, 4) is None
        got = ops.finish_frame("t", plan, keys, "n:1", 0, unusual)
        want = ops.finish_one("t", plan, keys, "n:1", pb.GetResponse.FromString(unusual))
        assert (got.version, got.to_pylist()) == (want.version, want.to_pylist())
    assert got.version == 5  # protobuf: the last of a field given twice
    # The node's error frame: its KvstoreError.
    error = pb.FastError(type="UnknownFeature", message="no feature 'y'").SerializeToString()
    with pytest.raises(kvstore.UnknownFeature, match="no feature 'y'"):
        ops.finish_frame("t", plan, keys, "n:1", 1, error)


def test_a_bad_row_in_an_answer_read_in_c_raises_what_the_client_acts_on() -> None:
    """A row of another schema raises SchemaMismatch (the client describes the table
    again and retries), a corrupt row CorruptValue naming its key, a garbled body a
    KvstoreError: never a bare ValueError or protobuf's DecodeError."""
    schema = TableSchema.build("t", "int64", {"x": "float32", "s": "string"})
    ops = Operations("127.0.0.1:1", timeout=5)
    plan = ops.get_plan(schema, None)
    sid = schema.schema_id
    newer = schema.with_id(sid + 1)
    data = {"key": np.arange(2), "x": [1.5, 2.5], "s": ["a", "bb"]}
    encoded = kvstore.columns.encode_rows(schema, data)
    rows = _codec.split_rows(encoded.rows, encoded.offsets)
    other = kvstore.columns.encode_rows(newer, data)
    other_rows = _codec.split_rows(other.rows, other.offsets)
    keys = KeyBatch("int64", ints=np.array([10, 11], np.int64))
    mixed = _response_of([rows[0], other_rows[1]], schema_id=sid).SerializeToString()
    with pytest.raises(_codec.SchemaMismatch):
        ops.finish_frame("t", plan, keys, "n:1", 0, mixed)
    corrupt = _response_of([rows[0], rows[1][:3]], schema_id=sid).SerializeToString()
    with pytest.raises(kvstore.CorruptValue, match="key 11"):
        ops.finish_frame("t", plan, keys, "n:1", 0, corrupt)
    with pytest.raises(kvstore.KvstoreError, match="malformed fast-path answer"):
        ops.finish_frame("t", plan, keys, "n:1", 0, b"\x1a\xff\xff\xff\x0f")
    batch = KeyBatch("int64", ints=np.array([1], np.int64))
    for bad in (-1, 1 << 64, 1.5):
        with pytest.raises(kvstore.InvalidArgument, match="version must be 0"):
            plan.request(batch, bad)
