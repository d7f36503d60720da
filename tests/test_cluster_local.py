"""``make cluster`` (python -m kvstore.cluster.local): one command starts etcd and N
nodes, prints where they are, reports a node that dies, stops everything on Ctrl-C or
SIGTERM, and a restart reuses the same node ids and data.

The launcher runs as a real process on free ports, in its own session so that a
signal to its process group is what a Ctrl-C in a terminal would be.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvstore import Client
from kvstore.server.process import wait_until

START_TIMEOUT_S = 120.0  # two nodes and etcd on a machine shared with other test runs
STOP_TIMEOUT_S = 60.0
ROW = re.compile(r"^(etcd|n\d+)\s+(\S+)\s+(\d+)\s+(\S+)$")

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None, reason="etcd is not installed (make test installs etcd-server)"
)


@dataclass
class Child:
    address: str
    pid: int
    log: Path


class Launcher:
    """``python -m kvstore.cluster.local`` on free ports; its stdout read line by line."""

    def __init__(self, data: Path, *args: str) -> None:
        self.stderr_path = data.with_name(data.name + ".launcher.err")
        cmd = [sys.executable, "-m", "kvstore.cluster.local", "--data", str(data)]
        cmd += ["--base-port", "0", "--etcd-port", "0", "--etcd-peer-port", "0", *args]
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
            )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.children: dict[str, Child] = {}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self) -> dict[str, Child]:
        """Wait for the printed table; etcd and every node by name."""

        def printed() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the launcher exited with {self.proc.returncode}:\n{self.stderr()}"
                )
            return any(line.startswith("Ctrl-C stops") for line in self.lines)

        wait_until(printed, START_TIMEOUT_S, "the launcher's table")
        for line in self.lines:
            if m := ROW.match(line):
                self.children[m[1]] = Child(m[2], int(m[3]), Path(m[4]))
        return self.children

    def stop(self, sig: int = signal.SIGINT) -> int:
        """Send ``sig`` to the launcher's process group, as a terminal's Ctrl-C does; its
        exit status."""
        os.killpg(self.proc.pid, sig)
        return self.proc.wait(STOP_TIMEOUT_S)

    def cleanup(self) -> None:
        """After a failed test: nothing is left running."""
        for pid in [self.proc.pid, *(c.pid for c in self.children.values())]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def launch(tmp_path: Path):
    started: list[Launcher] = []

    def start(*args: str) -> Launcher:
        launcher = Launcher(tmp_path / "cluster", *args)
        started.append(launcher)
        return launcher

    yield start
    for launcher in started:
        launcher.cleanup()


def etcd_healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=5) as resp:
        return b'"true"' in resp.read()


def test_two_nodes_and_etcd_start_answer_and_stop_on_ctrl_c(launch, tmp_path: Path) -> None:
    launcher = launch("--nodes", "2")
    children = launcher.wait_ready()
    assert set(children) == {"etcd", "n1", "n2"}
    assert etcd_healthy(children["etcd"].address)
    for node_id in ("n1", "n2"):
        node = children[node_id]
        assert node.log == tmp_path / "cluster" / f"{node_id}.log"
        with Client(node.address, timeout=10) as client:
            assert client.list_tables() == []
        # Each node was told its id, its own data and the etcd the launcher started.
        argv = Path(f"/proc/{node.pid}/cmdline").read_text().split("\0")
        assert argv[argv.index("--node-id") + 1] == node_id
        assert argv[argv.index("--etcd") + 1] == children["etcd"].address
        assert Path(argv[argv.index("--data") + 1]) == tmp_path / "cluster" / node_id
    assert any(f'Client("{children["n1"].address}")' in line for line in launcher.lines)
    # A terminal's Ctrl-C goes to the launcher's process group only: the launcher, not
    # the terminal, decides the order in which the children stop.
    for name, child in children.items():
        assert os.getpgid(child.pid) != os.getpgid(launcher.proc.pid), name

    assert launcher.stop(signal.SIGINT) == 0
    for name, child in children.items():
        assert not alive(child.pid), f"{name} (pid {child.pid}) outlived the launcher"
    for node_id in ("n1", "n2"):
        assert "databases closed" in children[node_id].log.read_text()
    assert "stopped 2 node(s) and etcd" in launcher.stderr()


def test_a_restart_reuses_the_node_ids_and_their_data(launch) -> None:
    first = launch("--nodes", "2")
    children = first.wait_ready()
    with Client(children["n1"].address, timeout=10) as client:
        client.create_table("user_features", features={"age": "int64"}, shards=4)
        client.write("user_features", {"key": [1, 2], "age": [30, 40]})
    assert first.stop(signal.SIGTERM) == 0

    second = launch("--nodes", "2")
    again = second.wait_ready()
    assert set(again) == set(children)
    for node_id in ("n1", "n2"):
        assert again[node_id].log == children[node_id].log
        assert again[node_id].pid != children[node_id].pid
    with Client(again["n1"].address, timeout=10) as client:
        assert [t.schema.name for t in client.list_tables()] == ["user_features"]
        rows = client.get("user_features", [1, 2]).to_pylist()
        assert rows == [{"key": 1, "age": 30}, {"key": 2, "age": 40}]
    assert second.stop(signal.SIGINT) == 0


def test_a_node_that_dies_is_reported_with_its_log_and_the_rest_keep_serving(launch) -> None:
    launcher = launch("--nodes", "2")
    children = launcher.wait_ready()
    os.kill(children["n2"].pid, signal.SIGKILL)
    wait_until(
        lambda: "n2 exited with status -9" in launcher.stderr(), 30, "the report of n2's death"
    )
    # The report carries the end of n2's log (what it printed when it started).
    report = launcher.stderr().split("n2 exited with status -9", 1)[1]
    assert children["n2"].log.read_text()[-200:].strip().splitlines()[-1] in report
    with Client(children["n1"].address, timeout=10) as client:
        assert client.list_tables() == []
    assert launcher.stop(signal.SIGINT) == 0
    assert not alive(children["n1"].pid) and not alive(children["etcd"].pid)


def test_an_etcd_port_in_use_fails_the_start_with_etcd_s_log(launch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        launcher = launch("--nodes", "1", "--etcd-port", str(port))
        assert launcher.proc.wait(START_TIMEOUT_S) == 1
    err = launcher.stderr()
    assert "the cluster did not start: etcd exited" in err
    assert "address already in use" in err
    assert not any(ROW.match(line) for line in launcher.lines)
