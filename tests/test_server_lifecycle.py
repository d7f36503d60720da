"""A node's life: health and reflection while serving, clean stop on signals, restart, demo data.

Every node here is a real ``kvstore serve`` process on 127.0.0.1 port 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import wait_for

from kvstore import Client, KvstoreError, Unavailable

SERVICE = "kvstore.v1.FeatureStore"
GRACE_S = 5.0  # NodeConfig.shutdown_grace_s, the default `kvstore serve` runs with
STOP_TIMEOUT_S = GRACE_S + 10.0

FEATURES = {"v": "int64", "name": "string", "ctr": "float32"}


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return reply.status


def _write_rows(client: Client, table: str, keys: np.ndarray) -> None:
    client.write(
        table,
        {"key": keys, "v": keys * 7, "name": [f"n{k}" for k in keys.tolist()], "ctr": keys / 4},
    )


def _check_rows(client: Client, table: str, keys: np.ndarray, stored: int) -> list[str]:
    """Problems with a Get of ``keys`` (keys below ``stored`` exist); [] when all is right."""
    res = client.get(table, keys, timeout=GRACE_S + 5)
    problems = []
    expect_found = keys < stored
    if res.found.tolist() != expect_found.tolist():
        problems.append(f"found {res.found.tolist()} for keys {keys.tolist()}")
    cols = res.to_numpy()
    v = np.ma.filled(cols["v"], -1)
    if v.tolist() != np.where(expect_found, keys * 7, -1).tolist():
        problems.append(f"v {v.tolist()} for keys {keys.tolist()}")
    names = [f"n{k}" if f else None for k, f in zip(keys.tolist(), expect_found, strict=True)]
    if list(cols["name"]) != names:
        problems.append(f"name {list(cols['name'])} for keys {keys.tolist()}")
    return problems


# -- while serving -------------------------------------------------------------------


def test_health_reports_serving_for_the_server_and_the_service(shared_node) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    assert _health(shared_node.address, "") == serving
    assert _health(shared_node.address, SERVICE) == serving
    with pytest.raises(grpc.RpcError) as info:
        _health(shared_node.address, "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_feature_store_service(shared_node) -> None:
    with grpc.insecure_channel(shared_node.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert SERVICE in names
    assert "grpc.health.v1.Health" in names

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    methods = {
        m.name
        for f in files
        if f.package == "kvstore.v1"
        for s in f.service
        if s.name == "FeatureStore"
        for m in s.method
    }
    assert {"Get", "Write", "Delete", "CreateTable", "DescribeTable"} <= methods


# -- stopping ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_and_a_restart_serves_the_data(start_node, sig: int) -> None:
    node = start_node()
    keys = np.arange(300, dtype=np.int64)
    with Client(node.address, timeout=10) as client:
        client.create_table("kept", key="int64", features=FEATURES, shards=4)
        _write_rows(client, "kept", keys)

    assert node.stop(sig, timeout=STOP_TIMEOUT_S) == 0, node.output()
    log = node.output()
    assert "databases closed" in log, log
    assert "Traceback" not in log, log

    again = start_node(data_dir=node.data_dir)
    with Client(again.address, timeout=10) as client:
        assert [t.schema.name for t in client.list_tables()] == ["kept"]
        assert _check_rows(client, "kept", np.array([0, 299, 150, 300, 7]), stored=300) == []


def test_a_second_signal_cuts_the_grace_period_short_but_still_closes_the_databases(
    start_node,
) -> None:
    node = start_node()
    keys = np.arange(200, dtype=np.int64)
    with Client(node.address, timeout=10) as client:
        client.create_table("hurried", key="int64", features=FEATURES, shards=4)
        _write_rows(client, "hurried", keys[:100])
        # An update stream left open is a call in flight: the node's drain waits for it
        # until the grace period ends, unless a second signal cuts the wait short.
        stream = client.update_stream("hurried")
        stream.send({"key": keys[100:], "v": keys[100:] * 7, "name": [f"n{k}" for k in keys[100:]]})
        stream.send({"key": keys[100:], "ctr": keys[100:] / 4})
        stream.flush()  # acknowledged: durable

        node.proc.send_signal(signal.SIGINT)
        wait_for(lambda: "draining in-flight calls" in node.output(), 10, "the graceful stop")
        assert node.proc.poll() is None, node.output()  # held by the stream in flight
        # Only now the second: two SIGINTs pending at once would be delivered as one.
        signalled = time.monotonic()
        node.proc.send_signal(signal.SIGINT)
        returncode = node.proc.wait(STOP_TIMEOUT_S)
        stopped_after = time.monotonic() - signalled
        with contextlib.suppress(KvstoreError):  # the node cancelled the stream
            stream.close()

    log = node.output()
    assert stopped_after < GRACE_S - 1, f"the node took {stopped_after:.1f} s to stop:\n{log}"
    assert returncode == 1, log  # a stop cut short
    assert "second signal (SIGINT)" in log and "databases closed" in log, log
    assert "Traceback" not in log, log

    again = start_node(data_dir=node.data_dir)
    with Client(again.address, timeout=10) as client:
        assert _check_rows(client, "hurried", np.array([0, 99, 100, 199, 200]), stored=200) == []
        ctr = client.get("hurried", keys[98:102], ["ctr"]).to_numpy()["ctr"]
        assert ctr.tolist() == (keys[98:102] / 4).tolist()


def test_a_port_already_in_use_fails_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "kvstore.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--data",
                str(tmp_path / "data"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    # gRPC's core logs its own line about the bind; the node must say it in its own words.
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("kvstore serve: error:")] or [
        f"no 'kvstore serve: error: ...' line in:\n{proc.stderr}"
    ]
    assert f"127.0.0.1:{port}" in line and "in use" in line, line


SERVE = [sys.executable, "-m", "kvstore.cli", "serve", "--port", "0"]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("--read-threads", "-1"), {}, "read_threads must be at least 0"),
        (("--parallel-read-keys", "0"), {}, "parallel_read_keys must be at least 1"),
        (("--row-cache-mb", "-1"), {}, "row_cache_bytes must be at least 0"),
        (("--keep-versions", "-1"), {}, "keep_versions must be at least 0"),
        (("--max-keys-per-request", "0"), {}, "max_keys_per_request must be at least 1"),
        ((), {"KVSTORE_BASE_FORMAT": "cuckoo"}, "base_format 'cuckoo' is not one of plain, block"),
        (
            ("--verify-base-checksums",),
            {},
            "verify_base_checksums checks the block checksums of block-format versions; new "
            "versions would be in the 'plain' format, which has none: add --base-format block",
        ),
    ],
)
def test_a_bad_setting_is_refused_before_the_node_starts(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    proc = subprocess.run(
        [*SERVE, "--data", str(tmp_path / "data"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert proc.returncode == 1, proc.stderr  # the CLI's status for a refused command
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"kvstore serve: error: {message}" in proc.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was created


# -- the demo table ------------------------------------------------------------------


def test_demo_table_is_created_once_and_kept_across_restarts(start_node) -> None:
    node = start_node("--demo")
    all_keys = np.arange(1001, dtype=np.int64)
    with Client(node.address, timeout=10) as client:
        assert [t.schema.name for t in client.list_tables()] == ["demo_users"]
        res = client.get("demo_users", all_keys)
        assert res.found.tolist() == [True] * 1000 + [False]
        assert len(res.features) >= 2
        client.write("demo_users", {"key": [7], "age": [999]})
        client.delete("demo_users", [8])
        before = client.get("demo_users", all_keys).to_pylist()
    assert before[7]["age"] == 999 and before[8] is None
    assert node.stop() == 0, node.output()

    again = start_node("--demo", data_dir=node.data_dir)
    with Client(again.address, timeout=10) as client:
        assert [t.schema.name for t in client.list_tables()] == ["demo_users"]
        after = client.get("demo_users", all_keys).to_pylist()
    # Neither re-created (key 8 would be back, key 7 reset) nor read differently.
    assert after == before


# -- draining in-flight calls --------------------------------------------------------


@dataclass
class Outcomes:
    ok: int = 0
    unavailable: int = 0
    wrong: list[str] = field(default_factory=list)
    longest_call_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


def test_sigterm_drains_in_flight_gets_without_a_wrong_answer(start_node) -> None:
    stored = 2000
    node = start_node()
    with Client(node.address, timeout=10) as client:
        client.create_table("drain", key="int64", features=FEATURES, shards=8)
        _write_rows(client, "drain", np.arange(stored, dtype=np.int64))

    outcomes = Outcomes()
    hard_deadline = time.monotonic() + 60

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with Client(node.address, timeout=GRACE_S + 5) as client:
            # Until the node has gone away: a call after that must fail, not hang.
            while time.monotonic() < hard_deadline:
                keys = rng.integers(0, stored + 100, size=int(rng.integers(1, 400)))
                started = time.monotonic()
                try:
                    problems = _check_rows(client, "drain", keys, stored)
                except Unavailable:
                    result = "unavailable"
                except Exception as exc:  # anything else is a wrong answer
                    result = f"{type(exc).__name__}: {exc}"
                else:
                    result = "; ".join(problems) or "ok"
                elapsed = time.monotonic() - started
                with outcomes.lock:
                    outcomes.longest_call_s = max(outcomes.longest_call_s, elapsed)
                    if result == "ok":
                        outcomes.ok += 1
                    elif result == "unavailable":
                        outcomes.unavailable += 1
                    else:
                        outcomes.wrong.append(result)
                if result == "unavailable" and node.proc.poll() is not None:
                    return

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(worker, seed) for seed in range(8)]
        wait_for(lambda: outcomes.ok >= 200 or outcomes.wrong, 30, "200 successful Gets")
        ok_before = outcomes.ok
        signalled = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        returncode = node.proc.wait(STOP_TIMEOUT_S)
        stopped_after = time.monotonic() - signalled
        for f in futures:
            f.result(timeout=GRACE_S + 15)

    assert outcomes.wrong == [], (
        f"{len(outcomes.wrong)} calls neither answered right nor failed with Unavailable "
        f"({outcomes.ok} ok, {outcomes.unavailable} Unavailable): "
        f"{Counter(outcomes.wrong).most_common(3)}"
    )
    assert returncode == 0, node.output()
    assert "databases closed" in node.output()
    assert stopped_after < GRACE_S + 2, f"the node took {stopped_after:.1f} s to stop"
    assert outcomes.longest_call_s < GRACE_S + 2, f"a call took {outcomes.longest_call_s:.1f} s"
    assert ok_before >= 200 and outcomes.unavailable >= 8
