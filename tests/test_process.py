"""The supervisor of node processes (kvstore.server.process), which every other test
and the benchmarks start their nodes with: it finds port 0 through the port file, and
reports a node that dies while starting or will not stop, with the node's log."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from kvstore import Client
from kvstore.server.process import NodeProcess, NodeProcessError


def test_a_node_on_port_0_is_found_serving_and_stops_cleanly(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data")
    with node:
        assert node.running() and node.port > 0
        assert node.port == int((tmp_path / "data.port").read_text())
        with Client(node.address, timeout=10) as c:
            assert c.list_tables() == []
    assert not node.running() and node.proc.returncode == 0
    assert "databases closed" in node.output()


def test_a_node_that_exits_while_starting_is_reported_with_its_log(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", "--verify-base-checksums", "--base-format", "plain")
    with pytest.raises(NodeProcessError, match=r"(?s)exited with \d+ while starting.*verify"):
        node.start()
    assert not node.running()


def test_a_node_that_does_not_stop_in_time_is_killed_and_reported(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data").start()
    # SIGSTOP: the process neither exits nor can be asked to.
    with pytest.raises(NodeProcessError, match="did not stop within 1 s of signal SIGSTOP"):
        node.stop(signal.SIGSTOP, timeout=1)
    assert not node.running() and node.proc.returncode == -signal.SIGKILL
