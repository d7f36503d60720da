"""Fixtures: real node processes on 127.0.0.1, port 0, stopped at the end; a failed
test shows the logs of the nodes it started.

The processes are ``kvstore.server.process.NodeProcess``, the supervisor the
benchmarks (loadtests/servers.py) use too.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cluster_fixtures import Cluster
from etcd_server import EtcdServer

from kvstore import Client
from kvstore.server.process import NodeProcess, NodeProcessError

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Keep each phase's report on the test item, for the fixtures' teardown."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"report_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


def _node(data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> NodeProcess:
    # One log per NodeProcess, so that a node started again on the same data directory
    # (a new NodeProcess) shows only its own output.
    log = data_dir.parent / f"{data_dir.name}-{uuid.uuid4().hex[:6]}.log"
    return NodeProcess(data_dir, *extra, env=env, log_path=log, start_timeout_s=START_TIMEOUT_S)


def _finish(nodes: list[NodeProcess], request: pytest.FixtureRequest) -> None:
    """Stop the nodes still running; print the logs of every node when the test failed
    (pytest shows them under the failure)."""
    if _failed(request):
        for node in nodes:
            print(f"--- log of the node on {node.address} (data {node.data_dir}):")
            print(node.log_tail())
    errors = []
    for node in nodes:  # every node, even when one of them will not stop
        if node.running():
            try:
                node.stop(timeout=STOP_TIMEOUT_S)
            except NodeProcessError as exc:
                errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def start_node(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., NodeProcess]]:
    """Start nodes (``start_node(*extra_cli_args, data_dir=None, env=None)``, ``env``: more
    environment variables); all are stopped at the end."""
    nodes: list[NodeProcess] = []

    def start(
        *extra: str, data_dir: Path | None = None, env: dict[str, str] | None = None
    ) -> NodeProcess:
        node = _node(data_dir or tmp_path / f"node{len(nodes)}", *extra, env=env)
        nodes.append(node)
        return node.start()

    yield start
    _finish(nodes, request)


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for a whole test module (tests use their own table names)."""
    node = _node(tmp_path_factory.mktemp("shared") / "data").start()
    yield node
    if node.running():
        node.stop(timeout=STOP_TIMEOUT_S)


@pytest.fixture
def client(shared_node: NodeProcess, request: pytest.FixtureRequest) -> Iterator[Client]:
    """A client of the module's shared node; a failed test shows that node's log."""
    with Client(shared_node.address, timeout=10) as c:
        yield c
    if _failed(request):
        print(f"--- log of the shared node on {shared_node.address}:")
        print(shared_node.log_tail())


@pytest.fixture
def table_name(request: pytest.FixtureRequest) -> str:
    """A table name unique to the test."""
    return "t_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:80]


os.environ.setdefault("PYTHONUNBUFFERED", "1")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A real etcd on free ports (tests/etcd_server.py), one per test module that asks."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd")).start()
    yield server
    server.stop()


@pytest.fixture
def cluster(tmp_path: Path, etcd: EtcdServer) -> Iterator[Cluster]:
    """An empty test cluster on the module's etcd (tests/cluster_fixtures.py): start its
    nodes with ``cluster.start(node_id)``; stopped, with their logs printed on a
    failure, at the end of the test."""
    cluster = Cluster(tmp_path / "nodes", etcd)
    try:
        yield cluster
    finally:
        # pytest does not raise a test's failure into its fixtures: print always;
        # pytest shows a test's captured output only when it fails.
        print(cluster.logs())
        cluster.stop()
