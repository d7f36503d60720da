"""The servers a benchmark talks to, as real subprocesses on 127.0.0.1, and /proc readings.

A lone node, a redis-server and a cluster (etcd and node processes,
``running_cluster``) are context managers: leaving the ``with`` block (normally, on
an error or on Ctrl-C) stops the processes and waits for them. ``replicas_available``
says when a cluster's node is back and caught up after a fault.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import redis

from kvstore.cluster.local import LocalCluster, LocalClusterConfig
from kvstore.server.process import NodeProcess, wait_until
from loadtests.shard_moves import cluster_map

__all__ = [
    "SETTLE_TIMEOUT_S",
    "KvstoreNode",
    "RedisServer",
    "dir_bytes",
    "machine_busy_seconds",
    "proc_cpu_seconds",
    "proc_memory_bytes",
    "replicas_available",
    "running_cluster",
    "stop_process",
    "wait_until",
    "wait_until_idle",
]

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: After the load, wait (at most this long, s) for the servers' background work
#: (RocksDB flushes and compactions) to settle before measuring.
SETTLE_TIMEOUT_S = 180.0
#: A server counts as idle below this CPU use, in cores, over SETTLE_SAMPLE_S.
SETTLE_IDLE_CORES = 0.05
SETTLE_SAMPLE_S = 1.0


def proc_memory_bytes(pid: int) -> dict[str, int]:
    """Resident memory of process ``pid`` from /proc/<pid>/status, in bytes: ``rss``
    (VmRSS), ``anon`` (RssAnon: its private heap) and ``file`` (RssFile: mapped file
    pages it touched, i.e. page cache and shared libraries, which the kernel can drop
    and read again)."""
    fields = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name = line.split(None, 1)[0]
            if name in fields:
                out[fields[name]] = int(line.split()[1]) * 1024
    if len(out) != len(fields):
        raise RuntimeError(f"no VmRSS/RssAnon/RssFile for pid {pid}")
    return out


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3 of stat); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time all cores of the machine spent busy since boot (/proc/stat), in seconds.

    The difference over an interval, minus the CPU of the processes under test, is
    what other work on the machine took from the benchmark.
    """
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / CLOCK_TICKS


def wait_until_idle(pids: list[int], timeout_s: float) -> float:
    """Wait until processes ``pids`` use under 0.05 core together for 1 s; seconds waited.

    Gives up (and says so) after ``timeout_s`` s: the run goes on, busier.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        cpu0 = sum(proc_cpu_seconds(p) for p in pids)
        t0 = time.monotonic()
        time.sleep(SETTLE_SAMPLE_S)  # a measuring interval, not a synchronisation
        cores = (sum(proc_cpu_seconds(p) for p in pids) - cpu0) / (time.monotonic() - t0)
        if cores < SETTLE_IDLE_CORES:
            return time.monotonic() - started
    print(f"  the servers were still busy after {timeout_s:.0f} s; measuring anyway", flush=True)
    return time.monotonic() - started


def dir_bytes(path: Path) -> int:
    """Total size of the regular files under ``path``, in bytes."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # RocksDB removed it (compaction, log rotation)
                continue
    return total


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal ``proc`` and wait for it up to 30 s, then kill it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class KvstoreNode(NodeProcess):
    """``python -m kvstore.cli serve`` on 127.0.0.1, a free port, data in ``workdir/data``,
    its log in ``workdir/kvstore-node.log`` (kvstore.server.process.NodeProcess)."""

    def __init__(
        self,
        workdir: Path,
        cgroup_procs: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            workdir / "data",
            "--log-level",
            "warning",
            env=env,
            log_path=workdir / "kvstore-node.log",
            port_file=workdir / "kvstore-node.port",
            cgroup_procs=cgroup_procs,  # memcap.py: the node joins it before it starts
            start_timeout_s=START_TIMEOUT_S,
        )
        self.workdir = workdir


class RedisServer:
    """``redis-server`` on 127.0.0.1, a free port, nothing persisted (no RDB, no AOF)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / "redis.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def connect(self) -> redis.Redis:
        """A new connection (redis-py, one socket, no pool sharing), 30 s socket timeout."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=30.0)

    def version(self) -> str:
        """The server's version string, e.g. ``7.0.15``."""
        with self.connect() as conn:
            return str(conn.info("server")["redis_version"])

    def __enter__(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: `make bench` installs it (apt-get install "
                "redis-server), or install it yourself"
            )
        for _attempt in range(3):  # the free port can be taken between probe and bind
            self.port = free_port()
            cmd = [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--daemonize",
                "no",
                "--logfile",
                str(self.log_path),
            ]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            try:
                wait_until(self._answers, START_TIMEOUT_S, "redis-server to answer PING")
                return self
            except RuntimeError:
                continue
            except BaseException:
                stop_process(self.proc, signal.SIGKILL)
                raise
        log = self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""
        raise RuntimeError(f"redis-server did not start:\n{log}")

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
        try:
            with self.connect() as conn:
                return bool(conn.ping())
        except redis.ConnectionError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)


@contextmanager
def running_cluster(workdir: Path, nodes: int) -> Iterator[LocalCluster]:
    """etcd and ``nodes`` node processes on free ports under ``workdir``, yielded once
    every node's map shows them all live (``LocalCluster.start``); stopped after."""
    config = LocalClusterConfig(
        data_dir=workdir,
        nodes=nodes,
        base_port=0,
        etcd_port=0,
        etcd_peer_port=0,
        cluster="bench",
        serve_args=("--log-level", "warning"),
    )
    cluster = LocalCluster(config)
    try:
        cluster.start()  # returns once every node's map shows them all live
        yield cluster
    finally:
        cluster.stop_nodes([i for i, n in cluster.nodes.items() if n.running()])
        cluster.etcd.stop()


def replicas_available(address: str, node_id: str, table: str, after_epoch: int = 0) -> bool:
    """Whether the map the node at ``address`` serves shows ``node_id`` live and every
    replica of ``table`` Available (a node given back has caught up); False while that
    node does not answer or its map's epoch is not above ``after_epoch`` (a restarted
    node marks its replicas to catch up in a new epoch: a map from before shows them
    Available)."""
    try:
        cmap = cluster_map(address)
    except grpc.RpcError:
        return False
    if cmap.epoch <= after_epoch:
        return False
    if any(n.node_id == node_id and n.state != "live" for n in cmap.nodes):
        return False
    entry = next(t for t in cmap.tables if t.table == table)
    return all(state == "Available" for r in entry.replicas for state in r.state)
