"""Stream consumers: updates from a real broker are applied exactly once, in effect.

NATS JetStream (a real ``nats-server``, installed from Debian's packages when it is
missing) and Kafka (librdkafka's mock cluster, which speaks the Kafka protocol on
127.0.0.1, driven through its C API with ctypes). The consumers run as real
processes (``python -m kvstore.ingest.consume``) against a real node; they are
killed, the broker and the node are stopped under them, and the tables must end
up exactly as the messages say, with the stored positions at the last message.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import confluent_kafka
import nats
import pyarrow as pa
import pytest
from helpers import NodeProcess, wait_for

from kvstore import Client, KvstoreError
from kvstore.ingest.messages import BadMessage, Batch, Delete, Message, Upsert
from kvstore.ingest.nats_source import subject_matches
from kvstore.schema import TableSchema

WAIT_S = 30.0
NOW_US = time.time_ns() // 1000

# -- NATS ------------------------------------------------------------------------------


def _nats_server_binary() -> str:
    path = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None
    )
    if path is None:  # a fresh machine (CI): Debian's package, we are root
        subprocess.run(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
            "apt-get install -y -qq nats-server",
            shell=True,
            check=True,
            timeout=600,
            stdout=subprocess.DEVNULL,
        )
        path = shutil.which("nats-server") or "/usr/sbin/nats-server"
    return path


class NatsServer:
    """A ``nats-server -js`` process on 127.0.0.1; restartable on the same port and store."""

    def __init__(self, binary: str, store: Path) -> None:
        self.binary = binary
        self.store = store
        self.port = -1  # the first start picks a free port
        self.proc: subprocess.Popen | None = None
        self.log_path = store.parent / f"{store.name}.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        self.log_path.write_text("")
        log = open(self.log_path, "ab")  # noqa: SIM115
        cmd = [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"nats-server exited:\n{self.log_path.read_text()}")
            return "Server is ready" in self.log_path.read_text()

        wait_for(ready, WAIT_S, "nats-server to be ready")
        found = re.search(r"client connections on 127\.0\.0\.1:(\d+)", self.log_path.read_text())
        assert found, self.log_path.read_text()
        self.port = int(found.group(1))
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(WAIT_S)

    # The test's own client calls, each on a fresh connection.

    def add_stream(self, name: str, subjects: list[str]) -> None:
        async def run(js) -> None:
            await js.add_stream(name=name, subjects=subjects)

        self._js(run)

    def publish(self, subject: str, payloads: list[bytes]) -> list[int]:
        """Publish and wait for every acknowledgement; the stream sequences."""

        async def run(js) -> list[int]:
            futures = [await js.publish_async(subject, p) for p in payloads]
            return [(await f).seq for f in futures]

        return self._js(run)

    def read(self, stream: str) -> list:
        """Every message of a stream: (payload, headers, sequence)."""

        async def run(js) -> list:
            info = await js.stream_info(stream)
            if not info.state.messages:
                return []
            sub = await js.pull_subscribe("", stream=stream)
            out = []
            while len(out) < info.state.messages:
                for m in await sub.fetch(info.state.messages - len(out), timeout=5):
                    out.append((m.data, dict(m.headers or {}), m.metadata.sequence.stream))
            return out

        return self._js(run)

    def _js(self, body):
        async def main():
            nc = await nats.connect(self.url, allow_reconnect=False)
            try:
                return await body(nc.jetstream())
            finally:
                await nc.close()

        return asyncio.run(main())


@pytest.fixture(scope="module")
def nats_binary() -> str:
    return _nats_server_binary()


@pytest.fixture(scope="module")
def nats_server(nats_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(nats_binary, tmp_path_factory.mktemp("nats") / "store").start()
    yield server
    server.stop()


# -- Kafka: librdkafka's mock cluster, through its C API ---------------------------------


class MockKafka:
    """A mock Kafka cluster in this process; clients anywhere connect to ``bootstraps``."""

    def __init__(self, brokers: int = 1) -> None:
        libs = os.path.join(os.path.dirname(confluent_kafka.__file__), "..", "confluent_kafka.libs")
        paths = glob.glob(os.path.join(libs, "librdkafka*.so*"))
        assert paths, f"no librdkafka in {libs}"
        lib = self.lib = ctypes.CDLL(paths[0])
        vp, cp, i32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32
        lib.rd_kafka_conf_new.restype = vp
        lib.rd_kafka_new.restype = vp
        lib.rd_kafka_new.argtypes = [ctypes.c_int, vp, cp, ctypes.c_size_t]
        lib.rd_kafka_mock_cluster_new.restype = vp
        lib.rd_kafka_mock_cluster_new.argtypes = [vp, ctypes.c_int]
        lib.rd_kafka_mock_cluster_bootstraps.restype = cp
        lib.rd_kafka_mock_cluster_bootstraps.argtypes = [vp]
        lib.rd_kafka_mock_topic_create.argtypes = [vp, cp, ctypes.c_int, ctypes.c_int]
        lib.rd_kafka_mock_broker_set_down.argtypes = [vp, i32]
        lib.rd_kafka_mock_broker_set_up.argtypes = [vp, i32]
        lib.rd_kafka_mock_cluster_destroy.argtypes = [vp]
        lib.rd_kafka_destroy.argtypes = [vp]
        errors = ctypes.create_string_buffer(512)
        self.handle = lib.rd_kafka_new(1, lib.rd_kafka_conf_new(), errors, len(errors))
        assert self.handle, errors.value
        self.cluster = lib.rd_kafka_mock_cluster_new(self.handle, brokers)
        assert self.cluster
        self.bootstraps = lib.rd_kafka_mock_cluster_bootstraps(self.cluster).decode()

    def create_topic(self, name: str, partitions: int) -> None:
        assert self.lib.rd_kafka_mock_topic_create(self.cluster, name.encode(), partitions, 1) == 0

    def broker_down(self, broker: int = 1) -> None:
        assert self.lib.rd_kafka_mock_broker_set_down(self.cluster, broker) == 0

    def broker_up(self, broker: int = 1) -> None:
        assert self.lib.rd_kafka_mock_broker_set_up(self.cluster, broker) == 0

    def produce(self, topic: str, messages: list[tuple[int, bytes]]) -> None:
        """(partition, value) pairs, in order; returns once all are acknowledged."""
        producer = confluent_kafka.Producer({"bootstrap.servers": self.bootstraps})
        for partition, value in messages:
            producer.produce(topic, value=value, partition=partition)
        assert producer.flush(WAIT_S) == 0

    def read(self, topic: str, count: int) -> list:
        """The first ``count`` messages of partition 0: (value, headers)."""
        consumer = confluent_kafka.Consumer(
            {"bootstrap.servers": self.bootstraps, "group.id": "test-reader"}
        )
        consumer.assign(
            [confluent_kafka.TopicPartition(topic, 0, confluent_kafka.OFFSET_BEGINNING)]
        )
        out: list = []
        deadline = time.monotonic() + WAIT_S
        while len(out) < count and time.monotonic() < deadline:
            m = consumer.poll(0.2)
            if m is not None and m.error() is None:
                out.append((m.value(), {k: v.decode() for k, v in m.headers() or ()}))
        consumer.close()
        return out

    def close(self) -> None:
        self.lib.rd_kafka_mock_cluster_destroy(self.cluster)
        self.lib.rd_kafka_destroy(self.handle)


@pytest.fixture(scope="module")
def kafka() -> Iterator[MockKafka]:
    cluster = MockKafka()
    yield cluster
    cluster.close()


# -- consumer processes ------------------------------------------------------------------


class ConsumerProcess:
    """``python -m kvstore.ingest.consume ARGS``, its output in a log file."""

    def __init__(self, log_dir: Path, *args: str) -> None:
        self.args = list(args)
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def start(self) -> ConsumerProcess:
        self.runs += 1
        self.log_path = self.log_dir / f"consumer-{os.getpid()}-{id(self)}-{self.runs}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvstore.ingest.consume", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        """True while running; fails the test with the output if it exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"consumer exited with {self.proc.returncode}:\n{self.output()}")
        return True

    def wait(self, timeout: float = WAIT_S) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(
                f"consumer still running after {timeout} s:\n{self.output()}"
            ) from None

    def run(self, timeout: float = WAIT_S) -> str:
        """Start, wait for a clean exit (--stop-at-end), return the output."""
        self.start()
        code = self.wait(timeout)
        assert code == 0, self.output()
        return self.output()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def consumers(tmp_path: Path) -> Iterator:
    started: list[ConsumerProcess] = []

    def make(*args: str) -> ConsumerProcess:
        c = ConsumerProcess(tmp_path, *args)
        started.append(c)
        return c

    yield make
    for c in started:
        c.kill()


def nats_args(server: NatsServer, node_address: str, table: str, subject: str, *extra: str):
    return [
        "nats",
        "--table",
        table,
        "--subject",
        subject,
        "--servers",
        server.url,
        "--address",
        node_address,
        "--timeout",
        "5",
        *extra,
    ]


def positions(client: Client, table: str, consumer: str, source: str) -> dict[int, int]:
    return client.consumer_positions(table, consumer, source)


def rows(client: Client, table: str, keys: list, features: list[str]) -> list:
    return client.get(table, keys, features).to_pylist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arrow_message(**columns) -> bytes:
    batch = pa.RecordBatch.from_pydict(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def j(doc) -> bytes:
    return json.dumps(doc).encode()


FEATURES = {
    "ctr": "float32",
    "age": "int32",
    "country": "string",
    "emb": "float32[2]",
    "tags": "int64[]",
    "blob": "bytes",
}


# -- NATS: formats, positions, resume ----------------------------------------------------


def test_json_updates_are_applied_and_a_restart_resumes_after_the_stored_position(
    nats_server: NatsServer, shared_node: NodeProcess, client: Client, consumers, table_name: str
) -> None:
    client.create_table(table_name, key="int64", features=FEATURES, shards=4)
    stream, subject = table_name.upper(), f"{table_name}.updates"
    nats_server.add_stream(stream, [f"{table_name}.>"])
    before = time.time_ns() // 1000
    seqs = nats_server.publish(
        subject,
        [
            j({"key": 1, "event_time": 100, "features": {"ctr": 0.5, "age": 30}}),
            j({"key": 2, "event_time": 100, "features": {"country": "FR", "emb": [1, 2]}}),
            j({"key": 1, "event_time": 90, "features": {"ctr": 0.9}}),  # older: no effect
            j({"key": 1, "event_time": 110, "features": {"age": 31}}),
            j({"key": 3, "event_time": 100, "features": {"tags": [1, 2], "blob": "aGk="}}),
            j({"key": 3, "event_time": 120, "delete": True}),
            j({"key": 3, "event_time": 115, "features": {"age": 5}}),  # before the delete
            j({"key": 4, "features": {"age": 44}}),  # no event time: the broker's
            j({"key": 2, "event_time": 100, "features": {"country": "JP"}}),  # a tie: later wins
            j({"key": 5, "event_time": 200, "features": {"ctr": None, "age": 7}}),
        ],
    )
    after = time.time_ns() // 1000
    assert seqs == list(range(1, 11))
    consumer = consumers(
        *nats_args(nats_server, shared_node.address, table_name, subject, "--stop-at-end")
    )
    assert "from the beginning" in consumer.run()

    got = client.get(table_name, [1, 2, 3, 4, 5], ["ctr", "age", "country", "emb"])
    assert got.found.tolist() == [True, True, False, True, True]
    assert got.to_pylist() == [
        {"key": 1, "ctr": 0.5, "age": 31, "country": None, "emb": None},
        {"key": 2, "ctr": None, "age": None, "country": "JP", "emb": [1.0, 2.0]},
        None,
        {"key": 4, "ctr": None, "age": 44, "country": None, "emb": None},
        {"key": 5, "ctr": None, "age": 7, "country": None, "emb": None},
    ]
    assert before <= got.event_times[3] <= after
    assert positions(client, table_name, subject, stream) == {0: 10}

    # A write with the same event time as message 4 wins the tie: if the restart
    # replayed message 4, age would go back to 31.
    client.write(table_name, {"key": [1], "age": [999]}, event_time=110)
    nats_server.publish(
        subject,
        [
            j({"key": 6, "event_time": 100, "features": {"age": 6}}),
            j({"key": 1, "event_time": 105, "features": {"ctr": 0.7}}),
        ],
    )
    assert "from partition 0 after 10" in consumer.run()
    assert rows(client, table_name, [1, 6], ["ctr", "age"]) == [
        {"key": 1, "ctr": pytest.approx(0.7), "age": 999},
        {"key": 6, "ctr": None, "age": 6},
    ]
    assert positions(client, table_name, subject, stream) == {0: 12}


def test_arrow_messages_set_the_columns_they_hold(
    nats_server: NatsServer, shared_node: NodeProcess, client: Client, consumers, table_name: str
) -> None:
    client.create_table(
        table_name,
        key="string",
        features={"score": "float64", "count": "int32", "vec": "float32[2]"},
        shards=2,
    )
    stream, subject = table_name.upper(), f"{table_name}.arrow"
    nats_server.add_stream(stream, [subject])
    before = time.time_ns() // 1000
    nats_server.publish(
        subject,
        [
            arrow_message(
                key=["a", "b", "c"],
                event_time=[100, 100, 100],
                score=[1.0, 2.0, None],
                count=pa.array([1, 2, 3], pa.int16()),  # any integer type fits int32
            ),
            arrow_message(
                key=["a", "b"],
                event_time=pa.array([110, 90], pa.timestamp("us")),
                vec=[[1.0, 2.0], [3.0, 4.0]],
                count=[10, 20],
            ),
            arrow_message(key=["c"], event_time=[120], delete=[True]),
            arrow_message(key=["d", "d"], event_time=[50, 40], score=[1.0, 2.0]),  # newest wins
            arrow_message(key=["e"], count=[5]),  # no event time: the broker's
            arrow_message(key=["b"], event_time=[130], score=pa.array([None], pa.float64())),
        ],
    )
    consumer = consumers(
        *nats_args(
            nats_server,
            shared_node.address,
            table_name,
            subject,
            "--format",
            "arrow",
            "--stop-at-end",
        )
    )
    consumer.run()
    got = client.get(table_name, ["a", "b", "c", "d", "e"], ["score", "count", "vec"])
    assert got.to_pylist() == [
        {"key": "a", "score": 1.0, "count": 10, "vec": [1.0, 2.0]},
        {"key": "b", "score": None, "count": 2, "vec": [3.0, 4.0]},  # a null sets null
        None,
        {"key": "d", "score": 1.0, "count": None, "vec": None},
        {"key": "e", "score": None, "count": 5, "vec": None},
    ]
    assert got.event_times[4] >= before
    assert positions(client, table_name, subject, stream) == {0: 6}


# -- NATS: bad input -------------------------------------------------------------------


def test_malformed_messages_go_to_the_dead_letter_and_the_stream_goes_on(
    nats_server: NatsServer, shared_node: NodeProcess, client: Client, consumers, table_name: str
) -> None:
    client.create_table(
        table_name, key="int64", features={"age": "int32", "ctr": "float32", "emb": "float32[2]"}
    )
    stream, subject, dead = table_name.upper(), f"{table_name}.in", f"{table_name}.dead"
    nats_server.add_stream(stream, [subject])
    nats_server.add_stream(stream + "_DEAD", [dead])
    future = NOW_US + 3600 * 10**6
    bad = [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (j({"key": 2, "features": {"agee": 3}}), "no feature 'agee'; its features are: age"),
        (j({"key": 2, "features": {"age": "old"}}), "feature 'age' (int32): expected an integer"),
        (j({"key": 2, "features": {"age": 1.5}}), "expected an integer"),
        (j({"features": {"age": 3}}), "no 'key'"),
        (j({"key": "two", "features": {"age": 3}}), "keys are int64"),
        (j({"key": 2, "features": {"emb": [1]}}), "expected 2 numbers, got 1"),
        (j({"key": 2, "feature": {"age": 3}}), "unknown field 'feature'"),
        (j({"key": 2, "event_time": -5, "features": {"age": 9}}), "positive integer"),
        # Valid here, refused by the node (too far ahead of its clock): dead-lettered
        # after the others, once the node has said no.
        (j({"key": 2, "event_time": future, "features": {"age": 9}}), "refused by the node"),
    ]
    payloads = [j({"key": 1, "event_time": 100, "features": {"age": 1}})]
    payloads += [p for p, _ in bad]
    payloads += [
        j({"key": 2, "event_time": 100, "features": {"age": 2}}),  # same key as the refused one
        j({"key": 3, "event_time": 100, "features": {"ctr": 0.5}}),
    ]
    nats_server.publish(subject, payloads)
    consumer = consumers(
        *nats_args(
            nats_server,
            shared_node.address,
            table_name,
            subject,
            "--dead-letter",
            dead,
            "--stop-at-end",
        )
    )
    output = consumer.run()
    assert output.count("dead letter:") == len(bad)
    assert rows(client, table_name, [1, 2, 3], ["age", "ctr"]) == [
        {"key": 1, "age": 1, "ctr": None},
        {"key": 2, "age": 2, "ctr": None},
        {"key": 3, "age": None, "ctr": 0.5},
    ]
    assert positions(client, table_name, subject, stream) == {0: len(payloads)}
    letters = nats_server.read(stream + "_DEAD")
    assert [(payload, seq) for payload, _, seq in letters] == [
        (p, i + 1) for i, (p, _) in enumerate(bad)
    ]
    for (_, headers, _), (_, reason), offset in zip(letters, bad, range(2, 20), strict=False):
        assert reason in headers["Kvstore-Error"], headers
        assert headers["Kvstore-Offset"] == str(offset)
        assert headers["Kvstore-Source"] == stream
        assert headers["Kvstore-Table"] == table_name


def test_a_batch_of_only_bad_messages_still_moves_the_position(
    nats_server: NatsServer, shared_node: NodeProcess, client: Client, consumers, table_name: str
) -> None:
    client.create_table(table_name, key="int64", features={"age": "int32"})
    stream, subject = table_name.upper(), f"{table_name}.in"
    nats_server.add_stream(stream, [subject])
    nats_server.publish(subject, [j({"key": 1, "event_time": 5, "features": {"age": 1}})])
    args = nats_args(nats_server, shared_node.address, table_name, subject, "--stop-at-end")
    consumers(*args).run()
    nats_server.publish(subject, [b"oops", b"{}"])  # no dead letter given: logged, skipped
    output = consumers(*args).run()
    assert output.count("dead letter:") == 2
    assert positions(client, table_name, subject, stream) == {0: 3}
    # Nothing is dead-lettered twice: the next run starts after them.
    assert "dead letter:" not in consumers(*args).run()


def test_unknown_table_stream_or_format_fails_at_start(
    nats_server: NatsServer, shared_node: NodeProcess, client: Client, consumers, table_name: str
) -> None:
    stream, subject = table_name.upper(), f"{table_name}.in"
    nats_server.add_stream(stream, [subject])
    c = consumers(*nats_args(nats_server, shared_node.address, "no_such_table", subject))
    c.start()
    assert c.wait() == 1
    assert "table 'no_such_table' does not exist" in c.output()

    client.create_table(table_name, key="int64", features={"age": "int32", "delete": "bool"})
    c = consumers(*nats_args(nats_server, shared_node.address, table_name, "nobody.listens"))
    c.start()
    assert c.wait() == 1
    assert "no JetStream stream capturing 'nobody.listens'" in c.output()

    c = consumers(
        *nats_args(nats_server, shared_node.address, table_name, subject, "--format", "arrow")
    )
    c.start()
    assert c.wait() == 1
    assert "a feature named 'delete', a reserved column of Arrow messages" in c.output()

    args = nats_args(nats_server, shared_node.address, table_name, f"{table_name}.>")
    c = consumers(*args, "--dead-letter", f"{table_name}.dead")
    c.start()
    assert c.wait() == 1
    assert "dead letters would come back as input" in c.output()


# -- NATS: failures under a running consumer -----------------------------------------------


def test_the_broker_going_down_and_coming_back(
    nats_binary: str,
    tmp_path: Path,
    shared_node: NodeProcess,
    client: Client,
    consumers,
    table_name: str,
) -> None:
    server = NatsServer(nats_binary, tmp_path / "nats-store").start()
    try:
        client.create_table(table_name, key="int64", features={"n": "int64"}, shards=2)
        stream, subject = "S", "s.updates"
        server.add_stream(stream, [subject])
        update = lambda i: j({"key": i % 10, "event_time": i, "features": {"n": i}})  # noqa: E731
        server.publish(subject, [update(i) for i in range(1, 101)])
        consumer = consumers(*nats_args(server, shared_node.address, table_name, subject)).start()
        wait_for(
            lambda: (
                consumer.running() and positions(client, table_name, subject, stream) == {0: 100}
            ),
            WAIT_S,
            "the first 100 messages",
        )
        server.stop()
        resuming = re.compile(r"; resuming from the stored position in (\d+\.\d+) s")
        wait_for(
            lambda: consumer.running() and len(resuming.findall(consumer.output())) >= 4,
            WAIT_S,
            "the consumer to retry 4 times while the broker is gone",
        )
        assert "cannot connect" in consumer.output()
        server.start()  # same port, same store: the stream and its messages are back
        server.publish(subject, [update(i) for i in range(101, 201)])
        wait_for(
            lambda: (
                consumer.running() and positions(client, table_name, subject, stream) == {0: 200}
            ),
            WAIT_S,
            "the next 100 messages after the broker came back",
        )
        assert rows(client, table_name, [0, 1, 9], ["n"]) == [
            {"key": 0, "n": 200},
            {"key": 1, "n": 191},
            {"key": 9, "n": 199},
        ]

        # A second outage backs off from 0.1 s again: batches were applied since the first.
        first_outage = len(resuming.findall(consumer.output()))
        server.stop()
        wait_for(
            lambda: consumer.running() and len(resuming.findall(consumer.output())) > first_outage,
            WAIT_S,
            "the consumer to retry in the second outage",
        )
        delays = [float(d) for d in resuming.findall(consumer.output())]
        assert delays[3] >= 0.4 and delays[first_outage] <= 0.1, delays  # 0.1 s · 2^n · 0.5-1
        consumer.proc.send_signal(signal.SIGTERM)  # while it waits to retry
        assert consumer.wait() == 0, consumer.output()
    finally:
        server.stop()


def test_an_unreachable_node_is_retried_with_backoff_until_stopped(
    nats_server: NatsServer, consumers, table_name: str
) -> None:
    stream, subject = table_name.upper(), f"{table_name}.in"
    nats_server.add_stream(stream, [subject])
    nobody = f"127.0.0.1:{free_port()}"
    consumer = consumers(*nats_args(nats_server, nobody, table_name, subject)).start()
    retries = re.compile(r"; retrying in (\d+\.\d+) s")
    wait_for(
        lambda: consumer.running() and len(retries.findall(consumer.output())) >= 7,
        WAIT_S,
        "7 retries",
    )
    consumer.proc.send_signal(signal.SIGTERM)  # during a backoff: no further attempt
    assert consumer.wait() == 1
    log = consumer.output()
    assert "stopped before the consumer could start" in log, log
    # 0.1 s doubling up to 5 s, each times 0.5 to 1 (jitter); 2 decimals in the log.
    for n, delay in enumerate(float(d) for d in retries.findall(log)[:7]):
        bound = min(5.0, 0.1 * 2**n)
        assert bound / 2 - 0.005 <= delay <= bound + 0.005, (n, delay, log)
    assert nobody in log, log


def test_the_node_restarting_mid_stream(
    nats_server: NatsServer, start_node, tmp_path: Path, consumers, table_name: str
) -> None:
    port, data = free_port(), tmp_path / "node-data"
    node = start_node("--port", str(port), data_dir=data)
    with Client(node.address, timeout=10) as c:
        c.create_table(table_name, key="int64", features={"n": "int64"}, shards=4)
    stream, subject = table_name.upper(), f"{table_name}.in"
    nats_server.add_stream(stream, [subject])
    update = lambda i: j({"key": i % 50, "event_time": i, "features": {"n": i}})  # noqa: E731
    nats_server.publish(subject, [update(i) for i in range(1, 501)])
    consumer = consumers(*nats_args(nats_server, node.address, table_name, subject)).start()

    def at(n: int) -> bool:
        consumer.running()
        with Client(node.address, timeout=2) as c:
            try:
                return positions(c, table_name, subject, stream) == {0: n}
            except KvstoreError:  # the node is down
                return False

    wait_for(lambda: at(500), WAIT_S, "the first 500 messages")
    node.kill()
    nats_server.publish(subject, [update(i) for i in range(501, 1001)])
    wait_for(
        lambda: consumer.running() and "resuming from the stored position" in consumer.output(),
        WAIT_S,
        "the consumer to notice the node is gone",
    )
    node = start_node("--port", str(port), data_dir=data)
    wait_for(lambda: at(1000), WAIT_S, "every message after the node came back")
    with Client(node.address, timeout=10) as c:
        got = c.get(table_name, list(range(50)), ["n"]).to_numpy()["n"]
    assert got.tolist() == [950 + k if k else 1000 for k in range(50)]


def test_a_second_signal_abandons_the_batch_in_hand_and_a_restart_applies_it(
    nats_server: NatsServer, start_node, consumers, table_name: str
) -> None:
    node = start_node()
    with Client(node.address, timeout=10) as c:
        c.create_table(table_name, key="int64", features={"n": "int64"}, shards=2)
    stream, subject = table_name.upper(), f"{table_name}.in"
    nats_server.add_stream(stream, [subject])
    update = lambda i: j({"key": i % 10, "event_time": i, "features": {"n": i}})  # noqa: E731
    nats_server.publish(subject, [update(i) for i in range(1, 101)])
    args = nats_args(nats_server, node.address, table_name, subject)
    consumer = consumers(*args, "--timeout", "60", "--log-level", "debug").start()

    def position() -> dict[int, int]:
        with Client(node.address, timeout=10) as c:
            return positions(c, table_name, subject, stream)

    wait_for(lambda: consumer.running() and position() == {0: 100}, WAIT_S, "100 messages")
    node.proc.send_signal(signal.SIGSTOP)  # the node stops answering: the next write hangs
    try:
        nats_server.publish(subject, [update(i) for i in range(101, 201)])
        wait_for(
            lambda: consumer.running() and "offsets 101 to" in consumer.output(),
            WAIT_S,
            "the consumer to write the next batch",
        )
        consumer.proc.send_signal(signal.SIGTERM)
        wait_for(
            lambda: "stopping after the current batch" in consumer.output(),
            WAIT_S,
            "the consumer to take the first signal",
        )
        assert consumer.proc.poll() is None, consumer.output()  # the batch in hand holds it
        signalled = time.monotonic()
        consumer.proc.send_signal(signal.SIGTERM)
        assert consumer.wait() == 128 + signal.SIGTERM, consumer.output()
        stopped_after = time.monotonic() - signalled
    finally:
        node.proc.send_signal(signal.SIGCONT)
    log = consumer.output()
    assert stopped_after < 10, f"the consumer took {stopped_after:.1f} s to stop:\n{log}"
    assert "second signal (SIGTERM)" in log and "Traceback" not in log, log
    assert "consumed 100 messages" in log, log  # it closed down, no os._exit

    # Whether or not the abandoned write reached the node, the restart resumes from the
    # position stored with the data and applies the rest.
    consumer = consumers(*args, "--stop-at-end")
    consumer.run()
    assert position() == {0: 200}
    with Client(node.address, timeout=10) as c:
        got = c.get(table_name, list(range(10)), ["n"]).to_numpy()["n"]
    assert got.tolist() == [200, *range(191, 200)]


def test_kill_9_of_the_consumer_loses_nothing_and_applies_nothing_twice(
    nats_server: NatsServer, shared_node: NodeProcess, client: Client, consumers, table_name: str
) -> None:
    """A producer publishes N numbered updates while the consumer is killed 5 times."""
    n_messages, n_keys = 20_000, 200
    client.create_table(table_name, key="int64", features={"n": "int64"}, shards=4)
    stream, subject = table_name.upper(), f"{table_name}.in"
    nats_server.add_stream(stream, [subject])
    published: list[int] = []

    def produce() -> None:
        # A steady stream over a few seconds (pacing, not synchronisation).
        for start in range(1, n_messages + 1, 200):
            chunk = range(start, min(start + 200, n_messages + 1))
            docs = [j({"key": i % n_keys, "event_time": i, "features": {"n": i}}) for i in chunk]
            published.extend(nats_server.publish(subject, docs))
            time.sleep(0.02)

    producer = threading.Thread(target=produce)
    producer.start()
    args = nats_args(nats_server, shared_node.address, table_name, subject, "--batch", "300")
    consumer = consumers(*args)
    starts, during = [], []
    try:
        for _ in range(5):
            before = positions(client, table_name, subject, stream).get(0, 0)
            consumer.start()
            wait_for(
                lambda before=before: (
                    consumer.running()
                    and positions(client, table_name, subject, stream).get(0, 0) > before
                ),
                WAIT_S,
                "the consumer to make progress",
            )
            consumer.kill()  # SIGKILL: mid-batch, mid-write, wherever it is
            starts.append((before, consumer.output()))
            during.append(producer.is_alive())
    finally:
        producer.join(WAIT_S * 2)
    assert published == list(range(1, n_messages + 1))
    assert any(during), "every kill came after the producer had finished"
    consumers(*args, "--stop-at-end").run(timeout=WAIT_S * 2)

    for before, output in starts:  # each run resumed right after what was stored
        expected = f"partition 0 after {before}" if before else "from the beginning"
        assert expected in output, output
    assert positions(client, table_name, subject, stream) == {0: n_messages}
    got = client.get(table_name, list(range(n_keys)), ["n"])
    newest = [n_messages - (n_messages - k) % n_keys for k in range(n_keys)]
    assert got.to_numpy()["n"].tolist() == newest
    assert got.event_times.tolist() == newest


# -- Kafka ---------------------------------------------------------------------------------


def kafka_args(cluster: MockKafka, node_address: str, table: str, topic: str, *extra: str):
    return [
        "kafka",
        "--table",
        table,
        "--topic",
        topic,
        "--bootstrap",
        cluster.bootstraps,
        "--address",
        node_address,
        *extra,
    ]


def test_kafka_partitions_are_applied_and_resumed(
    kafka: MockKafka, shared_node: NodeProcess, client: Client, consumers, table_name: str
) -> None:
    client.create_table(table_name, key="int64", features={"n": "int64", "p": "int32"}, shards=4)
    topic = table_name.replace("_", "-")
    kafka.create_topic(topic, 3)
    # Key k always goes to partition k % 3, as a keyed producer would send it.
    first = [
        (k % 3, j({"key": k, "event_time": 10 + k, "features": {"n": k, "p": k % 3}}))
        for k in range(30)
    ]
    kafka.produce(topic, first)
    args = kafka_args(kafka, shared_node.address, table_name, topic, "--stop-at-end")
    consumers(*args).run()
    group = f"kvstore.{table_name}"
    assert positions(client, table_name, group, topic) == {0: 9, 1: 9, 2: 9}
    kafka.produce(
        topic,
        [
            (0, j({"key": 0, "event_time": 100, "features": {"n": -1}})),
            (0, j({"key": 3, "delete": True, "event_time": 100})),
        ],
    )
    client.write(table_name, {"key": [4], "n": [444]}, event_time=14)  # replaying would undo it
    output = consumers(*args).run()
    assert "partition 0 after 9" in output and "partition 1 after 9" in output
    assert positions(client, table_name, group, topic) == {0: 11, 1: 9, 2: 9}
    got = client.get(table_name, [0, 1, 3, 4], ["n", "p"]).to_pylist()
    assert got == [
        {"key": 0, "n": -1, "p": 0},
        {"key": 1, "n": 1, "p": 1},
        None,
        {"key": 4, "n": 444, "p": 1},
    ]


def test_kafka_dead_letters_unknown_topic_and_a_broker_outage(
    kafka: MockKafka, shared_node: NodeProcess, client: Client, consumers, table_name: str
) -> None:
    client.create_table(table_name, key="int64", features={"n": "int64"}, shards=2)
    topic, dead = table_name.replace("_", "-"), table_name.replace("_", "-") + "-dead"
    kafka.create_topic(topic, 1)
    kafka.create_topic(dead, 1)

    c = consumers(*kafka_args(kafka, shared_node.address, table_name, "no-such-topic"))
    c.start()
    assert c.wait() == 1 and "no topic 'no-such-topic'" in c.output()

    kafka.produce(
        topic,
        [
            (0, j({"key": 1, "event_time": 1, "features": {"n": 1}})),
            (0, b"\x00garbage"),
            (0, j({"key": 1, "event_time": 2, "features": {"n": "two"}})),
            (0, j({"key": 2, "event_time": 2, "features": {"n": 2}})),
        ],
    )
    consumer = consumers(
        *kafka_args(kafka, shared_node.address, table_name, topic, "--dead-letter", dead)
    ).start()
    group = f"kvstore.{table_name}"
    wait_for(
        lambda: consumer.running() and positions(client, table_name, group, topic) == {0: 3},
        WAIT_S,
        "the first messages",
    )
    letters = kafka.read(dead, 2)
    assert [v for v, _ in letters] == [
        b"\x00garbage",
        j({"key": 1, "event_time": 2, "features": {"n": "two"}}),
    ]
    assert "not valid JSON" in letters[0][1]["Kvstore-Error"]
    assert letters[1][1]["Kvstore-Offset"] == "2" and letters[1][1]["Kvstore-Source"] == topic

    kafka.broker_down()
    wait_for(
        lambda: consumer.running() and "the client retries by itself" in consumer.output(),
        WAIT_S,
        "the consumer to log the broker outage",
    )
    kafka.broker_up()
    kafka.produce(topic, [(0, j({"key": 2, "event_time": 3, "features": {"n": 3}}))])
    wait_for(
        lambda: consumer.running() and positions(client, table_name, group, topic) == {0: 4},
        WAIT_S,
        "the message produced after the outage",
    )
    assert rows(client, table_name, [1, 2], ["n"]) == [{"key": 1, "n": 1}, {"key": 2, "n": 3}]
    consumer.proc.send_signal(signal.SIGTERM)
    assert consumer.wait() == 0


# -- the message formats, in process ---------------------------------------------------------

SCHEMA = TableSchema.build("t", "int64", FEATURES, shards=2, schema_id=1)


def message(payload: bytes, offset: int = 1, ts: int = 1_000) -> Message:
    return Message(payload, 0, offset, ts, "subject")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe", "not valid JSON"),
        (b"42", "must be a JSON object, not a number"),
        (j({"key": 1}), "sets no feature"),
        (j({"key": 1, "features": {}}), "sets no feature"),
        (j({"key": None, "features": {"age": 1}}), "no 'key'"),
        (j({"key": True, "features": {"age": 1}}), "keys are int64"),
        (j({"key": 2**63, "features": {"age": 1}}), "keys are int64"),
        (j({"key": 1, "event_time": "now", "features": {"age": 1}}), "'event_time' must be"),
        (j({"key": 1, "delete": False}), "'delete' must be true"),
        (j({"key": 1, "delete": True, "features": {"age": 1}}), "not both"),
        (j({"key": 1, "features": {"age": 2**31}}), "out of range for int32"),
        (j({"key": 1, "features": {"age": True}}), "expected an integer"),
        (j({"key": 1, "features": {"ctr": "0.5"}}), "expected a number"),
        (j({"key": 1, "features": {"country": 7}}), "expected a string"),
        (j({"key": 1, "features": {"blob": "not base64!"}}), "base64"),
        (j({"key": 1, "features": {"emb": [1, "x"]}}), "a list of 2 numbers"),
        (j({"key": 1, "features": {"tags": [1.5]}}), "a list of integers"),
    ],
)
def test_json_message_problems_name_the_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(BadMessage, match=re.escape(reason)):
        Batch(SCHEMA, "json").add(message(payload))


@pytest.mark.parametrize(
    ("columns", "reason"),
    [
        ({"id": [1], "age": [1]}, "no key column 'key'"),
        ({"key": ["a"], "age": [1]}, "the table's keys are int64"),
        ({"key": pa.array([1, None]), "age": [1, 2]}, "a null key at row 1"),
        ({"key": [1], "agee": [1]}, "no feature 'agee'"),
        ({"key": [1], "age": ["x"]}, "column 'age' (int32): the column is string"),
        ({"key": [1], "age": [2**40]}, "do not fit in int32"),
        ({"key": [1], "emb": [[1.0, 2.0, 3.0]]}, "wrong length"),
        ({"key": [1], "event_time": ["x"], "age": [1]}, "an event time is a timestamp"),
        ({"key": [1], "event_time": [0], "age": [1]}, "positive number"),
        ({"key": [1], "delete": [1]}, "must be bool"),
        ({"key": [1], "event_time": [5]}, "no feature column"),
    ],
)
def test_arrow_message_problems_name_the_reason(columns: dict, reason: str) -> None:
    with pytest.raises(BadMessage, match=re.escape(reason)):
        Batch(SCHEMA, "arrow").add(message(arrow_message(**columns)))
    with pytest.raises(BadMessage, match="not an Arrow IPC stream"):
        Batch(SCHEMA, "arrow").add(message(b"{}"))


def test_a_batch_groups_updates_by_feature_set_one_row_per_key() -> None:
    batch = Batch(SCHEMA, "json")
    docs = [
        {"key": 1, "event_time": 10, "features": {"age": 1, "ctr": 0.1}},
        {"key": 2, "event_time": 10, "features": {"age": 2}},
        {"key": 1, "event_time": 30, "features": {"ctr": 0.3, "age": 3}},  # same set, any order
        {"key": 1, "event_time": 20, "features": {"age": 2, "ctr": 0.2}},  # older: dropped
        {"key": 2, "event_time": 10, "features": {"age": 22}},  # a tie: the later one
        {"key": 3, "event_time": 5, "delete": True},
        {"key": 3, "event_time": 7, "delete": True},
        {"key": 4, "event_time": 5, "delete": True},
        {"key": 5, "features": {"blob": base64.b64encode(b"\x00\x01").decode()}},
    ]
    for i, doc in enumerate(docs):
        batch.add(message(j(doc), offset=i + 1, ts=1234))
    writes = batch.plan()
    upserts = {w.features: w for w in writes if isinstance(w, Upsert)}
    deletes = [w for w in writes if isinstance(w, Delete)]
    assert set(upserts) == {("ctr", "age"), ("age",), ("blob",)}
    both = upserts[("ctr", "age")]
    assert both.keys.to_pylist() == [1]
    assert both.event_times.tolist() == [30] and both.owners.tolist() == [2]
    assert both.columns["age"].to_pylist() == [3]
    assert len(both.full) == 3  # kept for when the node refuses the newest
    assert [len(r) for r in both.rounds()] == [1, 1, 1]
    age = upserts[("age",)]
    assert age.keys.to_pylist() == [2] and age.columns["age"].to_pylist() == [22]
    assert upserts[("blob",)].columns["blob"].to_pylist() == [b"\x00\x01"]
    assert upserts[("blob",)].event_times.tolist() == [1234]  # the broker's time
    assert [(d.event_time, sorted(d.keys)) for d in deletes] == [(5, [4]), (7, [3])]


def test_nats_subject_filters() -> None:
    assert subject_matches("a.>", "a.dead")
    assert subject_matches("a.*", "a.dead")
    assert subject_matches("a.b", "a.b")
    assert not subject_matches("a.b", "a.dead")
    assert not subject_matches("a.*", "a.b.c")
    assert not subject_matches("a.>", "a")
