"""AsyncClient reads over the fast read path: many tasks pipeline their gets on one
connection per node, and cancellation, deadlines and node restarts leave it usable."""

from __future__ import annotations

import asyncio
import select
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cluster_fixtures import FEATURES as CLUSTER_FEATURES
from cluster_fixtures import KEYS, SHARDS, Cluster, check_all, feature_rows
from etcd_server import EtcdServer, free_port

import kvstore
from kvstore import AsyncClient, Client, _codec
from kvstore.client import aio_fast
from kvstore.client.aio_fast import AsyncFastConnections
from kvstore.client.fast import FastConnections
from kvstore.wire.frames import RESPONSE_HEADER

ROOT = Path(__file__).resolve().parent.parent
FEATURES = {"x": "float32", "s": "string", "v": "float32[3]", "l": "int64[]"}
ROWS = 500


def rows(keys: np.ndarray) -> dict:
    return {
        "key": keys,
        "x": keys.astype(np.float32) * 0.5,
        "s": [f"s{k}" for k in keys.tolist()],
        "v": np.stack([keys, keys + 1, keys + 2], axis=1).astype(np.float32),
        "l": [[k] * (k % 3) for k in keys.tolist()],
    }


def check(result: kvstore.GetResult, keys: list[int]) -> None:
    """``result`` holds what ``rows`` wrote for each of ``keys`` (< ROWS), nothing for
    the others."""
    expect = [
        {"key": k, "x": k * 0.5, "s": f"s{k}", "v": [k, k + 1.0, k + 2.0], "l": [k] * (k % 3)}
        if 0 <= k < ROWS
        else None
        for k in keys
    ]
    assert result.to_pylist() == expect


@pytest.fixture
def table(client: Client, table_name: str) -> str:
    client.create_table(table_name, key="int64", features=FEATURES, shards=4)
    client.write(table_name, rows(np.arange(ROWS)))
    return table_name


def only_connection(c: AsyncClient) -> aio_fast._Pipeline:
    """The one fast-path connection ``c`` holds in the running loop."""
    assert c._fast is not None
    (conns,) = c._fast._by_loop.values()
    (conn,) = conns.values()
    assert isinstance(conn, aio_fast._Pipeline)
    return conn


async def until(condition, timeout: float, what: str) -> None:
    """Let the loop run until ``condition()`` holds; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        await asyncio.sleep(0.001)  # a poll step, not a synchronisation


def test_64_tasks_pipeline_their_gets_on_one_connection(
    shared_node, table: str, monkeypatch
) -> None:
    in_flight: list[int] = []
    send = aio_fast._Pipeline.send

    def observed(self, *args):
        in_flight.append(len(self.waiting) + 1)  # the calls waiting, and this one
        return send(self, *args)

    monkeypatch.setattr(aio_fast._Pipeline, "send", observed)
    rng = np.random.default_rng(18)

    async def scenario() -> None:
        async with AsyncClient(shared_node.address, timeout=10) as c:
            await c.get(table, [0])  # describes the table and fetches the map

            async def task(seed: int) -> None:
                for _ in range(20):
                    keys = rng.integers(-5, ROWS + 5, int(rng.integers(1, 40))).tolist()
                    check(await c.get(table, keys), keys)

            await asyncio.gather(*(task(i) for i in range(64)))
            conn = only_connection(c)
            # every answer went to its call, and took its deadline along: nothing of
            # the 1,281 calls is kept
            assert not conn.waiting
            assert conn.lost is None

    asyncio.run(scenario())
    assert len(in_flight) == 64 * 20 + 1
    # Tasks did not wait for each other: many requests were on the wire at once.
    assert max(in_flight) >= 32


def test_an_answer_already_received_is_taken_without_a_loop_pass_in_bounded_runs(
    shared_node, table: str, monkeypatch
) -> None:
    """A get alone on its connection whose answer is in the socket when its request is
    sent returns without waiting for a pass of the event loop; a task that loops on
    such gets still lets the loop run at least every EAGER_RUN + 1 calls (here every
    answer is made to be there: each send waits until its answer is readable)."""
    send = aio_fast._Pipeline.send

    def answered_before_return(self, *args):
        out = send(self, *args)
        readable, _, _ = select.select([self.sock], [], [], 10)  # a wait on a condition
        assert readable, "no answer within 10 s"
        return out

    async def scenario() -> None:
        async with AsyncClient(shared_node.address, timeout=10) as c:
            await c.get(table, [0])  # describes the table, opens the connection
            monkeypatch.setattr(aio_fast._Pipeline, "send", answered_before_return)
            passes = 0

            async def ticker() -> None:
                nonlocal passes
                while True:
                    passes += 1
                    await asyncio.sleep(0)

            ticking = asyncio.create_task(ticker())
            await asyncio.sleep(0)
            calls = 20 * (aio_fast.EAGER_RUN + 1)
            before = passes
            for k in range(calls):
                check(await c.get(table, [k % (ROWS + 3)]), [k % (ROWS + 3)])
            ticks = passes - before
            ticking.cancel()
            assert not only_connection(c).waiting
        # each call waiting for the loop gave the ticker a pass or a few; the others none
        assert 20 <= ticks <= calls // 4, ticks

    asyncio.run(scenario())


def test_only_small_gets_look_for_their_answer_at_once_and_a_miss_backs_off(
    shared_node, table: str, monkeypatch
) -> None:
    """Gets of more than EAGER_KEYS keys never look (the node needs longer than the
    send); after a look that finds nothing, the next EAGER_BACKOFF calls do not look."""
    looked: list[int] = []

    def finds_nothing(self, request_id):
        looked.append(request_id)
        return None  # as if the answer were not there yet: the call waits for the loop

    async def scenario() -> None:
        async with AsyncClient(shared_node.address, timeout=10) as c:
            await c.get(table, [0])
            monkeypatch.setattr(aio_fast._Pipeline, "take_answer", finds_nothing)
            large = list(range(aio_fast.EAGER_KEYS + 1))
            for _ in range(10):
                check(await c.get(table, large), large)
            assert looked == []
            small = list(range(aio_fast.EAGER_KEYS))
            calls = 4 * (aio_fast.EAGER_BACKOFF + 1)
            for _ in range(calls):
                check(await c.get(table, small), small)
            assert len(looked) == 4  # the first, then one after each backoff

    asyncio.run(scenario())


def test_the_look_reads_once_and_returns_only_a_whole_answer_to_its_request() -> None:
    """``_codec.take_answer``: one read without waiting; (status, body) only when the
    read is the one whole frame answering the request; else the bytes read (-1:
    nothing there, 0: the peer closed); a failed read raises OSError."""
    mine, node = socket.socketpair()
    mine.setblocking(False)
    buffer = bytearray(64)
    view = memoryview(buffer)

    def frame(request_id: int, body: bytes, status: int = 0) -> bytes:
        return RESPONSE_HEADER.pack(len(body), request_id, status) + body

    try:
        assert _codec.take_answer(mine.fileno(), view, 5) == -1
        node.sendall(frame(5, b"rows", 1))
        assert _codec.take_answer(mine.fileno(), view, 5) == (1, b"rows")
        node.sendall(frame(4, b"late"))  # a cancelled call's answer: left for the loop
        assert _codec.take_answer(mine.fileno(), view, 5) == 13
        assert bytes(view[:13]) == frame(4, b"late")
        node.sendall(frame(6, b"ab") + frame(7, b""))  # more than the answer
        assert _codec.take_answer(mine.fileno(), view, 6) == 20
        node.sendall(frame(8, b"x" * 10)[:12])  # a part of it
        assert _codec.take_answer(mine.fileno(), view, 8) == 12
        node.close()
        assert _codec.take_answer(mine.fileno(), view, 9) == 0
    finally:
        mine.close()
        node.close()
    with pytest.raises(OSError):
        _codec.take_answer(mine.fileno(), view, 9)  # -1: closed
    with pytest.raises(BufferError):
        _codec.take_answer(0, b"read-only", 1)


def test_answers_larger_than_the_receive_buffer_between_small_ones(
    shared_node, client: Client, table_name: str
) -> None:
    """Answers of 1 to 20,000 keys (up to ~1.5 MB, beyond the 64 KB buffer and the 1 MB
    a buffer is kept at), pipelined on one connection, each to its own call."""
    client.create_table(table_name, key="int64", features=FEATURES, shards=4)
    client.write(table_name, rows(np.arange(ROWS)))
    big = [k % (ROWS + 10) for k in range(20_000)]
    expect = client.get(table_name, big).to_arrow()

    async def scenario() -> None:
        async with AsyncClient(shared_node.address, timeout=20) as c:
            await c.get(table_name, [0])

            async def task(i: int) -> None:
                for n in (20_000, 1, 3000, 2, 700):
                    keys = big[i : i + n]
                    got = await c.get(table_name, keys)
                    if n > 100:
                        assert got.to_arrow().equals(expect.slice(i, len(keys)))
                    else:
                        check(got, keys)

            await asyncio.gather(*(task(i) for i in range(8)))
            conn = only_connection(c)
            assert conn.have == 0 and len(conn.buffer) <= aio_fast.LARGEST_IDLE_BUFFER

    asyncio.run(scenario())


def test_the_grpc_transport_and_the_fast_path_answer_alike(shared_node, table: str) -> None:
    keys = [3, 99, 3, 0, 499, -5, 10_000]

    async def scenario() -> None:
        async with (
            AsyncClient(shared_node.address) as fast,
            AsyncClient(shared_node.address, transport="grpc") as grpc_only,
        ):
            a = (await fast.get(table, keys)).to_arrow()
            b = (await grpc_only.get(table, keys)).to_arrow()
            assert a.equals(b)
            assert only_connection(fast) is not None
            assert grpc_only._fast is None
            check(await fast.get(table, keys), keys)

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="transport"):
        AsyncClient(shared_node.address, transport="tcp")


def test_both_clients_read_a_fast_answer_with_the_one_reader(
    client: Client, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AsyncClient reads a fast-path answer as Client does (``Operations.finish_frame``:
    the GetResponse read in C), with the same results, projections, pinned versions
    and missing keys; a table redefined under the same name is described again."""
    from kvstore.client.flows import Operations

    read = Operations.finish_frame
    reads: list[str] = []

    def counted(self, table, plan, keys, address, status, body):  # type: ignore[no-untyped-def]
        reads.append(table)
        return read(self, table, plan, keys, address, status, body)

    monkeypatch.setattr(Operations, "finish_frame", counted)
    asks = [([3], None), ([7, 7, -1, 499, 10_000], None), ([5, 2], ["l", "x"]), ([1], ["s"])]

    async def scenario() -> None:
        async with AsyncClient(client.address, timeout=10) as c:
            version = (await c.get(table, [0])).version
            reads.clear()
            for keys, features in asks:
                a = await c.get(table, keys, features)
                b = client.get(table, keys, features)
                assert a.to_arrow().equals(b.to_arrow())
                assert a.to_pylist() == b.to_pylist() and a.version == b.version
                pinned = await c.get(table, keys, features, version=version)
                assert pinned.to_arrow().equals(a.to_arrow())
            assert reads == [table] * (3 * len(asks))  # every get of both: the C reader
            # the same name, another schema: the old plan's reader raises
            # SchemaMismatch, the client describes the table again and reads anew
            client.drop_table(table)
            client.create_table(table, key="int64", features={"y": "int64"}, shards=2)
            client.write(table, {"key": np.arange(4), "y": np.arange(4) * 10})
            got = await c.get(table, [3, 9])
            assert got.to_pylist() == [{"key": 3, "y": 30}, None]

    asyncio.run(scenario())


def test_node_errors_arrive_with_their_class(client: Client, table: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(client.address, timeout=10) as c:
            await c.get(table, [1])
            with pytest.raises(kvstore.NotFound, match=f"table '{table}' has no version 7"):
                await c.get(table, [1], version=7)
            check(await c.get(table, [1, 2]), [1, 2])  # the connection serves on
            assert only_connection(c).lost is None
            client.drop_table(table)
            with pytest.raises(kvstore.TableNotFound, match=f"no table '{table}'"):
                await c.get(table, [1])
            assert table not in c._ops.schemas  # forgotten: a new table of that name is read

    asyncio.run(scenario())


def test_a_cancelled_get_leaves_the_connection_usable(start_node) -> None:
    """A get cancelled while its request is on the wire: its answer, when it arrives
    (before the next call's), is dropped, and the next calls get their own answers."""
    node = start_node()
    with Client(node.address) as sync:
        sync.create_table("cancel", key="int64", features=FEATURES, shards=4)
        sync.write("cancel", rows(np.arange(ROWS)))

    async def scenario() -> None:
        async with AsyncClient(node.address, timeout=10) as c:
            check(await c.get("cancel", [7]), [7])
            conn = only_connection(c)
            node.proc.send_signal(signal.SIGSTOP)  # the answer cannot come before the cancel
            try:
                victim = asyncio.create_task(c.get("cancel", [1, 2, 3]))
                await until(lambda: conn.waiting, 5, "the request to be sent")
                victim.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await victim
                assert not conn.waiting
                later = asyncio.create_task(c.get("cancel", [4, 5]))
                await until(lambda: conn.waiting, 5, "the next request to be sent")
            finally:
                node.proc.send_signal(signal.SIGCONT)
            check(await later, [4, 5])  # not the cancelled call's answer, sent first
            keys = list(range(-2, 60))
            results = await asyncio.gather(*(c.get("cancel", keys[i:]) for i in range(30)))
            for i, result in enumerate(results):
                check(result, keys[i:])
            assert only_connection(c) is conn  # the same connection throughout

    asyncio.run(scenario())


def test_a_fast_address_nobody_listens_on_is_unavailable_alike_in_both_clients() -> None:
    address = f"127.0.0.1:{free_port()}"  # bound and released: refused
    sync = FastConnections()
    with pytest.raises(kvstore.Unavailable, match="is unavailable") as sync_error:
        sync.get(address, b"", 2.0)
    sync.close()

    async def main() -> None:
        conns = AsyncFastConnections()
        with pytest.raises(kvstore.Unavailable, match="is unavailable") as async_error:
            await conns.get(address, b"", 2.0)
        conns.close()
        message = str(async_error.value)
        assert message.split(":")[:2] == str(sync_error.value).split(":")[:2]
        assert f"fast read path of node {address}" in message

    asyncio.run(main())


def test_a_paused_node_fails_the_call_at_its_deadline_and_serves_once_resumed(
    start_node,
) -> None:
    node = start_node()
    with Client(node.address) as sync:
        sync.create_table("paused", key="int64", features=FEATURES, shards=2)
        sync.write("paused", rows(np.arange(ROWS)))

    async def scenario() -> None:
        async with AsyncClient(node.address, timeout=10) as c:
            check(await c.get("paused", [1]), [1])
            conn = only_connection(c)
            node.proc.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(kvstore.DeadlineExceeded, match=r"deadline of 0\.3 s"):
                    await c.get("paused", [1], timeout=0.3)
                assert 0.29 <= time.monotonic() - started < 1.0
                # the other tasks' calls are bounded by their own deadlines, each
                late = await asyncio.gather(
                    *(c.get("paused", [k], timeout=0.2 + k / 10) for k in range(3)),
                    return_exceptions=True,
                )
                assert all(isinstance(e, kvstore.DeadlineExceeded) for e in late)
                # a short deadline after a long one is kept: the timer wakes earlier
                patient = asyncio.create_task(c.get("paused", [4], timeout=30))
                await until(lambda: conn.waiting, 5, "the patient call to be sent")
                started = time.monotonic()
                with pytest.raises(kvstore.DeadlineExceeded, match=r"deadline of 0\.25 s"):
                    await c.get("paused", [5], timeout=0.25)
                assert 0.24 <= time.monotonic() - started < 1.0
                assert not patient.done()
            finally:
                node.proc.send_signal(signal.SIGCONT)
            check(await patient, [4])  # answered once the node runs again
            # the expired calls' answers arrived first and were dropped
            check(await c.get("paused", [2, 3, 900]), [2, 3, 900])
            assert only_connection(c) is conn

    asyncio.run(scenario())


def test_a_deadline_after_an_answered_earlier_one_still_fails_its_call(start_node) -> None:
    """The connection's one timer is armed at the first call's deadline; that call is
    answered, a later one with a longer timeout is not: the timer, waking for nothing,
    is armed again at the later call's deadline, and fails it then (not before)."""
    node = start_node()
    with Client(node.address) as sync:
        sync.create_table("rearm", key="int64", features=FEATURES, shards=2)
        sync.write("rearm", rows(np.arange(ROWS)))

    async def scenario() -> None:
        async with AsyncClient(node.address, timeout=10) as c:
            check(await c.get("rearm", [1]), [1])  # the map and the connection
            check(await c.get("rearm", [2], timeout=0.3), [2])  # arms the timer at +0.3 s
            conn = only_connection(c)
            node.proc.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(kvstore.DeadlineExceeded, match=r"deadline of 0\.8 s"):
                    # wait_for: a timer never armed again would wait for ever
                    await asyncio.wait_for(c.get("rearm", [3], timeout=0.8), 5)
                assert 0.79 <= time.monotonic() - started < 2.0
                assert not conn.waiting
            finally:
                node.proc.send_signal(signal.SIGCONT)
            check(await c.get("rearm", [4, 5]), [4, 5])  # the late answer was dropped
            assert only_connection(c) is conn

    asyncio.run(scenario())


def test_requests_queued_behind_a_full_socket_keep_their_order(start_node) -> None:
    """With the node stopped, large requests fill the socket's buffers: a request is
    sent in part and the rest queued in the transport, and those after it wait behind
    it (none is sent straight to the socket ahead of queued bytes). Once the node runs
    again every call gets its own answer."""
    node = start_node()
    with Client(node.address) as sync:
        sync.create_table("queued", key="int64", features=FEATURES, shards=2)
        sync.write("queued", rows(np.arange(ROWS)))
    # ~720 KB a request, 16 of them: more than the socket buffers hold (a few MB)
    # while the node reads nothing; most keys are missing, so the answers stay small
    many = list(range(ROWS - 50, ROWS + 90_000))

    async def scenario() -> None:
        async with AsyncClient(node.address, timeout=30) as c:
            check(await c.get("queued", [1]), [1])
            conn = only_connection(c)
            assert conn.transport is not None
            node.proc.send_signal(signal.SIGSTOP)
            try:
                calls = [
                    asyncio.create_task(c.get("queued", many[i:] if i % 2 else [i]))
                    for i in range(32)
                ]
                await until(
                    lambda: conn.transport.get_write_buffer_size() > 0,
                    5,
                    "requests to queue behind the full socket",
                )
                assert len(conn.waiting) == 32
            finally:
                node.proc.send_signal(signal.SIGCONT)
            answers = await asyncio.gather(*calls)
            for i, got in enumerate(answers):
                keys = many[i:] if i % 2 else [i]
                assert np.array_equal(got.found, np.array(keys) < ROWS)
                x = got.to_numpy()["x"]
                assert np.array_equal(x[got.found], np.array(keys)[got.found] * 0.5)
            check(await c.get("queued", [6, 7]), [6, 7])
            assert only_connection(c) is conn

    asyncio.run(scenario())


def test_a_node_restarted_on_a_new_fast_port_is_found_again(start_node, tmp_path: Path) -> None:
    """Tasks read while the node is killed and started again (same gRPC port, a new
    fast-path port): calls while it is down fail as Unavailable, every call after it
    is back succeeds (the client refreshes the map and retries once)."""
    node = start_node(data_dir=tmp_path / "restarted")
    with Client(node.address) as sync:
        sync.create_table("restart", key="int64", features=FEATURES, shards=4)
        sync.write("restart", rows(np.arange(ROWS)))

    async def scenario() -> None:
        async with AsyncClient(node.address, timeout=5) as c:
            check(await c.get("restart", [1]), [1])
            old_fast = dict(c._ops.fast)
            back = asyncio.Event()
            stop = asyncio.Event()
            after: list[int] = []
            during: list[BaseException] = []

            async def reader(seed: int) -> None:
                keys = [seed, seed + 100, ROWS + seed]
                while not stop.is_set():
                    was_back = back.is_set()
                    try:
                        check(await c.get("restart", keys), keys)
                    except (kvstore.Unavailable, kvstore.DeadlineExceeded) as exc:
                        if was_back:
                            raise
                        during.append(exc)
                    else:
                        if was_back:
                            after.append(seed)
                    await asyncio.sleep(0.002)  # pace the readers; not a synchronisation

            readers = [asyncio.create_task(reader(i)) for i in range(8)]
            port = node.port
            await asyncio.to_thread(node.kill)
            node.args = [*node.args, "--port", str(port)]
            await asyncio.to_thread(node.start)
            back.set()
            await until(lambda: len(after) >= 80, 30, "80 reads after the restart")
            stop.set()
            await asyncio.gather(*readers)
            assert c._ops.fast != old_fast  # the map names the new fast port

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("two"), etcd) as cluster:
        cluster.start("n0")
        cluster.start("n1")
        yield cluster


def test_a_get_split_over_two_nodes_goes_to_both_at_once(two_nodes: Cluster) -> None:
    seed = two_nodes.nodes["n0"].address
    with Client(seed, timeout=20) as sync:
        sync.create_table("split", key="int64", features=CLUSTER_FEATURES, shards=SHARDS)
        sync.write("split", feature_rows(KEYS))

    async def scenario() -> None:
        async with AsyncClient(seed, timeout=10) as c:
            check_all(await c.get("split", KEYS), KEYS)
            assert len(set(c._ops.fast.values())) == 2
            assert "split" not in c._ops.route.sole  # both nodes own shards

            async def task(i: int) -> None:
                keys = KEYS[i::7]
                for _ in range(5):
                    check_all(await c.get("split", keys), keys)

            await asyncio.gather(*(task(i) for i in range(32)))
            assert c._fast is not None
            (conns,) = c._fast._by_loop.values()
            assert len(conns) == 2  # one connection per node, shared by the 32 tasks

    asyncio.run(scenario())


def test_one_client_serves_two_event_loops_with_a_connection_each(shared_node, table: str) -> None:
    c = AsyncClient(shared_node.address, timeout=10)

    async def read() -> None:
        check(await c.get(table, [5, 6]), [5, 6])

    asyncio.run(read())
    asyncio.run(read())  # the first loop is closed: a new connection for the new loop
    assert isinstance(c._fast, AsyncFastConnections)
    assert len(c._fast._by_loop) == 1
    asyncio.run(c.close())


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_the_bench_step_compares_with_client_and_redis_asyncio(start_node, tmp_path: Path) -> None:
    """make bench's async step (loadtests/aio_reads.py), short, on the bench's table in a
    real node and redis-server: both comparisons reported, the same rows on both sides
    (the step checks it). No timing is asserted."""
    if str(ROOT) not in sys.path:  # loadtests/ is a folder of the repository
        sys.path.insert(0, str(ROOT))
    from loadtests.aio_reads import AsyncSettings, measure_async_reads, render_async_reads
    from loadtests.servers import RedisServer
    from loadtests.systems import FLOAT_FEATURES, TABLE, Chunk, KvstoreSystem, RedisPackedSystem

    node = start_node()
    (tmp_path / "redis").mkdir()
    with RedisServer(tmp_path / "redis") as server:
        kv = KvstoreSystem(node.address, node.pid)
        packed = RedisPackedSystem(server)
        kv.create()
        chunk = Chunk.generate(3, 0, 2000)
        packed.load(chunk)
        columns = {"key": chunk.keys, "emb": chunk.emb}
        columns.update(zip(FLOAT_FEATURES, chunk.floats, strict=True))
        kv._client.write(TABLE, columns)
        s = AsyncSettings(rounds=2, samples=20, warmup=5, tasks=8, seconds=0.2)
        m = measure_async_reads(node.address, server.port, 2000, s)
        kv.close()
        packed.close()
    for b in ("1", "100"):
        cell = m["latency"][b]
        assert len(cell["Client"]["round_p50_us"]) == len(cell["AsyncClient"]["round_p50_us"]) == 2
        assert cell["ratio_p50"] == pytest.approx(
            cell["AsyncClient"]["p50_us"] / cell["Client"]["p50_us"]
        )
    t = m["throughput"]
    assert t["kvstore"]["calls_per_s"] > 0 and t["redis"]["calls_per_s"] > 0
    assert t["ratio"] == pytest.approx(t["kvstore"]["calls_per_s"] / t["redis"]["calls_per_s"])
    assert "redis.asyncio (hiredis)" in render_async_reads(m)
