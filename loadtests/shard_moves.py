"""make bench's cluster step, second half: the p99 of reads while a shard moves (issue
15's target: within 2x idle, and no failed read).

A few client processes read 100-key batches from a running cluster back to back; after
an idle window a node joins (``kvstore serve --etcd … --node-id nN+1``), the placement
moves its share of the shards to it with their data, and the reads go on until the map
shows the joined node owning shards and no replica in flight. ``MoveWatch`` polls the
map meanwhile: the moves' window runs from the first map showing a replica in flight
(else from the joining node serving: it can all happen between two polls) to the map
showing them done. Every read records its start on time.monotonic_ns, one clock for
every process, so each falls in the idle window, the moves' window, or neither.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from kvstore.cluster.local import LocalCluster
from kvstore.errors import KvstoreError
from kvstore.server.process import NodeProcess
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire.dial import open_channel
from loadtests.systems import TABLE, KeyPool, KvstoreReader

__all__ = ["MoveSettings", "MoveWatch", "cluster_map", "measure_move", "move_state"]

#: The issue's target: p99 while a shard moves / p99 idle.
TARGET_MOVE_P99 = 2.0
#: How long the moves may take before the step reports them unfinished (s).
MOVE_TIMEOUT_S = 300.0
MOVE_POLL_S = 0.05


@dataclass
class MoveSettings:
    """Reader processes, the idle window before the join (s), keys per lookup."""

    readers: int = 4
    idle_s: float = 5.0
    batch: int = 100


def _move_reader(
    index: int, address: str, seed: int, rows: int, batch: int, stop: Any, conn: Any
) -> None:
    """A reader process: lookups back to back until ``stop`` is set (or 10 min pass);
    sends each call's start (time.monotonic_ns, one clock for every process) and
    latency in ns, and the number of calls that raised."""
    reader = KvstoreReader(address)
    pool = KeyPool.draw(np.random.default_rng([seed, 11, index]), rows, batch, 20_000)
    conn.send("ready")
    starts: list[int] = []
    latencies: list[int] = []
    failures: list[str] = []
    deadline = time.monotonic() + 600
    j = 0
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            j = (j + 1) % len(pool)
            t0 = time.monotonic_ns()
            try:
                reader.lookup(pool.ints[j], pool.names[j])
            except KvstoreError as exc:
                failures.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            starts.append(t0)
            latencies.append(time.monotonic_ns() - t0)
    finally:
        reader.close()
    conn.send(
        {
            "start_ns": np.asarray(starts, np.int64),
            "latency_ns": np.asarray(latencies, np.int64),
            "failures": failures,
        }
    )


def cluster_map(address: str) -> pb.ClusterMap:
    """The cluster map as the node at ``address`` serves it (raises grpc.RpcError)."""
    with open_channel(address) as channel:
        return pb_grpc.FeatureStoreStub(channel).GetClusterMap(
            pb.GetClusterMapRequest(), timeout=10
        )


def move_state(address: str, node_id: str) -> tuple[bool, bool]:
    """(in flight, done) of the moves to ``node_id`` in the bench table: a replica not
    Available; ``node_id`` owning a shard with every replica Available. (False, False)
    while the seed does not answer."""
    try:
        cmap = cluster_map(address)
    except grpc.RpcError:
        return False, False
    ids = [n.node_id for n in cmap.nodes]
    for table in cmap.tables:
        if table.table == TABLE:
            states = {state for shard in table.replicas for state in shard.state}
            owners = {ids[i] for i in table.owner}
            settled = states <= {"Available"}
            return not settled, settled and node_id in owners
    return False, False


class MoveWatch(threading.Thread):
    """Polls the map every MOVE_POLL_S s from the join on: when a move was first seen in
    flight and when they were all done (time.monotonic_ns; 0 = not seen)."""

    def __init__(self, address: str, node_id: str, timeout_s: float) -> None:
        super().__init__(daemon=True, name="move-watch")
        self.address, self.node_id, self.timeout_s = address, node_id, timeout_s
        self.first_in_flight_ns = 0
        self.done_ns = 0
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            in_flight, done = move_state(self.address, self.node_id)
            now = time.monotonic_ns()
            if in_flight and not self.first_in_flight_ns:
                self.first_in_flight_ns = now
            if done:
                self.done_ns = now
                return
            self.stop.wait(MOVE_POLL_S)


def _p99_ms(latency_ns: np.ndarray) -> float:
    return float(np.percentile(latency_ns, 99) / 1e6) if len(latency_ns) else float("nan")


def measure_move(
    cluster: LocalCluster, workdir: Path, m: MoveSettings, rows: int, seed: int
) -> dict:
    """p99 of reads idle, then while a joining node takes its share of shards; ``rows``:
    the table's keys are 0..rows-1. Times in ms and s."""
    seed_address = next(iter(cluster.nodes.values())).address
    ctx = mp.get_context("forkserver")
    stop = ctx.Event()
    conns, procs = [], []
    for i in range(m.readers):
        parent, child = ctx.Pipe()
        args = (i, seed_address, seed, rows, m.batch, stop, child)
        proc = ctx.Process(target=_move_reader, args=args, daemon=True)
        proc.start()
        conns.append(parent)
        procs.append(proc)
    joined: NodeProcess | None = None
    node_id = f"n{len(cluster.nodes) + 1}"
    try:
        for conn in conns:
            if not conn.poll(120):
                raise TimeoutError("a move reader did not start")
            conn.recv()
        idle_from = time.monotonic_ns()
        time.sleep(m.idle_s)  # the idle window: a measuring interval
        join_at = time.monotonic_ns()
        watch = MoveWatch(seed_address, node_id, MOVE_TIMEOUT_S)
        watch.start()
        args = ["--etcd", cluster.etcd.url, "--cluster", cluster.config.cluster]
        joined = NodeProcess(
            workdir / node_id, *args, "--node-id", node_id, "--log-level", "warning"
        )
        try:
            joined.start()
            serving_at = time.monotonic_ns()
            watch.join(MOVE_TIMEOUT_S)
        finally:
            watch.stop.set()
        finished = watch.done_ns > 0
        done_at = watch.done_ns or time.monotonic_ns()
        # The move proper: from the first map showing it in flight (else from the joining
        # node serving: it may all happen between two polls) to the map showing it done.
        move_from = watch.first_in_flight_ns or serving_at
        stop.set()
        parts = []
        for conn in conns:
            if not conn.poll(120):
                raise TimeoutError("a move reader did not finish")
            parts.append(conn.recv())
    finally:
        stop.set()
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        if joined is not None and joined.running():
            with contextlib.suppress(Exception):
                joined.stop()
    starts = np.concatenate([p["start_ns"] for p in parts])
    lat = np.concatenate([p["latency_ns"] for p in parts])
    idle = lat[(starts >= idle_from) & (starts < join_at)]
    moving = lat[(starts >= move_from) & (starts <= done_at)]
    joining = lat[(starts >= join_at) & (starts <= done_at)]
    failures = [f for p in parts for f in p["failures"]]
    idle_p99, move_p99 = _p99_ms(idle), _p99_ms(moving)
    return {
        "readers": m.readers,
        "batch_size": m.batch,
        "joined": node_id,
        "finished": finished,
        "seen_in_flight": watch.first_in_flight_ns > 0,
        "join_s": (done_at - join_at) / 1e9,
        "move_s": (done_at - move_from) / 1e9,
        "idle_calls": len(idle),
        "move_calls": len(moving),
        # From the join's start: the joining process's own start shares the cores too.
        "join_p99_ms": _p99_ms(joining),
        "idle_p50_ms": float(np.percentile(idle, 50) / 1e6) if len(idle) else float("nan"),
        "move_p50_ms": float(np.percentile(moving, 50) / 1e6) if len(moving) else float("nan"),
        "idle_p99_ms": idle_p99,
        "move_p99_ms": move_p99,
        "p99_ratio": move_p99 / idle_p99,
        "target_ratio": TARGET_MOVE_P99,
        "met": finished and not failures and move_p99 / idle_p99 <= TARGET_MOVE_P99,
        "failed_reads": len(failures),
        "failures_sample": failures[:5],
    }
