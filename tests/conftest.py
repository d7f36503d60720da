"""Real node processes on 127.0.0.1, port 0, for the tests; stopped at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore import Client

START_TIMEOUT_S = 30.0


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.02):
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class NodeProcess:
    """A ``kvstore serve`` subprocess with its own data directory."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-{uuid.uuid4().hex[:6]}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> NodeProcess:
        port_file = self.data_dir.parent / f"{self.data_dir.name}.port"
        port_file.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "kvstore.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--data",
            str(self.data_dir),
            "--port-file",
            str(port_file),
            *self.extra,
        ]
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.output()}")
            return port_file.exists() and port_file.read_text().endswith("\n")

        wait_for(ready, START_TIMEOUT_S, "the node to listen")
        self.port = int(port_file.read_text())
        wait_for(self.serving, START_TIMEOUT_S, "the node to report SERVING")
        return self

    def serving(self) -> bool:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"node did not stop within {timeout} s:\n{self.output()}"
                ) from None
        self.log.close()
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.log.close()


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start nodes (``start_node(*extra_cli_args)``); all are stopped at the end."""
    nodes: list[NodeProcess] = []

    def start(*extra: str, data_dir: Path | None = None) -> NodeProcess:
        node = NodeProcess(data_dir or tmp_path / f"node{len(nodes)}", *extra).start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        if node.proc is not None and node.proc.poll() is None:
            node.stop()


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for a whole test module (tests use their own table names)."""
    node = NodeProcess(tmp_path_factory.mktemp("shared") / "data").start()
    yield node
    if node.proc is not None and node.proc.poll() is None:
        node.stop()


@pytest.fixture
def client(shared_node: NodeProcess) -> Iterator[Client]:
    with Client(shared_node.address, timeout=10) as c:
        yield c


@pytest.fixture
def table_name(request: pytest.FixtureRequest) -> str:
    """A table name unique to the test."""
    return "t_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:80]


os.environ.setdefault("PYTHONUNBUFFERED", "1")
