"""make bench's cluster step: one node process against N on the same data, and the p99
of reads while a shard moves (issue 15).

Starts, as real processes on 127.0.0.1, one node alone (``kvstore serve``, no etcd:
the node of ``make run`` and of the rest of the bench) and a cluster of N nodes on a
real etcd (``kvstore.cluster.local.LocalCluster``, the launcher of ``make cluster``;
N = the cores by default). Both get the benchmark table (same schema and shards),
bulk-loaded from the same zstd Parquet file of the bench's rows.

1. **Throughput**: ``clients`` client processes (``loadtests.workers``, the c32 step's
   load generator) look up random existing keys back to back, rounds alternating the
   lone node and the cluster, for each batch size (1 and 100 keys). Per cell, as in
   the main throughput step: gets/s, keys/s, p50/p99 of the calls, and the CPU the
   clients and the node process(es) used, in cores; the figures are medians of the
   rounds. From the CPU per call comes what the machine allows (``ceilings``): the
   clients share the cores with the nodes here, so N node processes can serve at
   most ``cores / (client CPU + node CPU per call)`` gets/s, and with the clients on
   other machines at most ``min(N, cores) / node CPU per call``, against one node
   process's ``1 core / its node CPU per call`` (a node process serves about one
   core's worth of RPCs).
2. **Reads while a shard moves** (``loadtests/shard_moves.py``), on the same cluster:
   p99 of 100-key reads idle against p99 while a joining node takes its share of the
   shards.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvstore import Client
from loadtests.bulkload import write_parquet
from loadtests.servers import (
    SETTLE_TIMEOUT_S,
    KvstoreNode,
    proc_cpu_seconds,
    running_cluster,
    wait_until_idle,
)
from loadtests.shard_moves import MoveSettings, measure_move
from loadtests.systems import TABLE, KvstoreSystem
from loadtests.workers import CELL_FIGURES, ClientProcesses, cell_figures, medians_of_rounds

__all__ = ["ClusterSettings", "measure_cluster", "render_cluster"]

#: The issue's target: N node processes / one at 100 keys per lookup.
TARGET_SCALE = 1.6
#: The batch size the scale target is about.
SCALE_BATCH = 100
LONE = "kvstore-1"
LOAD_TIMEOUT_S = 1800.0


@dataclass
class ClusterSettings:
    """What the cluster step runs. Times in seconds, sizes in rows/keys."""

    #: Node processes in the cluster (default: one per core, the production layout).
    nodes: int = field(default_factory=lambda: os.cpu_count() or 2)
    rows: int = 1_000_000
    shards: int = 8
    clients: int = 32
    batch_sizes: list[int] = field(default_factory=lambda: [1, SCALE_BATCH])
    rounds: int = 3
    warmup_s: float = 0.5
    window_s: float = 2.5
    pool_keys: int = 50_000
    seed: int = 20261123
    #: The shard-move half (loadtests/shard_moves.py).
    moves: MoveSettings = field(default_factory=MoveSettings)

    @classmethod
    def quick(cls, **overrides: Any) -> ClusterSettings:
        """make bench QUICK=1: 100k rows, two short rounds."""
        s = cls(rows=100_000, rounds=2, warmup_s=0.2, window_s=0.8, moves=MoveSettings(idle_s=2.0))
        for key, value in overrides.items():
            setattr(s, key, value)
        return s

    @property
    def cluster_name(self) -> str:
        return f"kvstore-{self.nodes}"


# -- the processes ------------------------------------------------------------------


def load_table(address: str, pid: int, parquet: dict, shards: int) -> float:
    """Create the bench table through ``address`` and bulk-load ``parquet`` into it (over
    every node holding a shard); seconds taken. Checks 1000 random keys are found."""
    kv = KvstoreSystem(address, pid, shards=shards)
    try:
        kv.create()
        t0 = time.monotonic()
        with Client(address, timeout=LOAD_TIMEOUT_S) as client:
            client.load(TABLE, parquet["path"], timeout=LOAD_TIMEOUT_S)
        seconds = time.monotonic() - t0
        rows = parquet["rows"]
        probe = np.random.default_rng(rows).integers(0, rows, 1000, dtype=np.int64)
        found = kv.count_found(probe)
        if found != len(probe):
            raise AssertionError(f"after the load, {address} holds {found} of 1000 keys")
        return seconds
    finally:
        kv.close()


# -- throughput ---------------------------------------------------------------------


def _per_call(cell: dict) -> dict:
    """CPU per call in µs (clients, node processes) from a cell's cores and rate."""
    rate = cell["batches_per_s"]
    return {
        "client_cpu_us_per_call": cell["client_cpu_cores"] / rate * 1e6,
        "node_cpu_us_per_call": cell["server_cpu_cores"] / rate * 1e6,
    }


def measure_throughput(
    endpoints: dict[str, str], pids: dict[str, list[int]], s: ClusterSettings
) -> dict[str, dict[str, dict]]:
    """Rounds alternating the systems: system → "CxB" → median figures and the rounds."""
    clients = ClientProcesses(
        s.clients, endpoints, [s.clients], s.seed, s.rows, s.batch_sizes, s.pool_keys
    )
    runs: dict[str, dict[str, list[dict]]] = {name: {} for name in endpoints}
    with clients:
        for r in range(s.rounds):
            for b in s.batch_sizes:
                # Which system goes first alternates too: drift hits both alike.
                order = list(endpoints) if r % 2 == 0 else list(endpoints)[::-1]
                for name in order:
                    cell = clients.run(name, b, s.clients, s.warmup_s, s.window_s, pids[name])
                    figures = cell_figures(cell, b)
                    runs[name].setdefault(f"{s.clients}x{b}", []).append(
                        {**figures, **_per_call(figures)}
                    )
            big = f"{s.clients}x{max(s.batch_sizes)}"
            print(
                f"  cluster round {r + 1}/{s.rounds}, {s.clients} clients, batch "
                f"{max(s.batch_sizes)}: "
                + ", ".join(f"{n} {runs[n][big][-1]['keys_per_s']:,.0f} keys/s" for n in runs),
                flush=True,
            )
    return medians_of_rounds(
        runs, (*CELL_FIGURES, "client_cpu_us_per_call", "node_cpu_us_per_call")
    )


def ceilings(lone: dict, cluster: dict, nodes: int, cores: int) -> dict:
    """What this machine allows at one batch size, from the CPU per call measured.

    ``shared``: the cluster's gets/s if every core ran only clients and nodes at the
    measured CPU per call (the clients share the cores here), over the lone node's
    measured gets/s. ``clients_elsewhere``: the cluster's node processes' ceiling,
    ``min(N, cores)`` cores over their CPU per call, against the lone node process's,
    one core (a Python process serves one core's worth of RPCs) or what it used if more,
    over its CPU per call.
    """
    cluster_cpu_us = cluster["client_cpu_us_per_call"] + cluster["node_cpu_us_per_call"]
    shared_gets = cores / cluster_cpu_us * 1e6
    lone_cores = max(1.0, lone["server_cpu_cores"])
    lone_alone = min(lone_cores, cores) / lone["node_cpu_us_per_call"] * 1e6
    cluster_alone = min(nodes, cores) / cluster["node_cpu_us_per_call"] * 1e6
    return {
        "cores": cores,
        "measured_ratio": cluster["batches_per_s"] / lone["batches_per_s"],
        "shared_ceiling_gets_per_s": shared_gets,
        "shared_ratio": shared_gets / lone["batches_per_s"],
        "clients_cores_cluster": cluster["client_cpu_cores"],
        "cores_left_for_nodes": max(0.0, cores - cluster["client_cpu_cores"]),
        "lone_ceiling_gets_per_s": lone_alone,
        "cluster_ceiling_gets_per_s": cluster_alone,
        "clients_elsewhere_ratio": cluster_alone / lone_alone,
    }


# -- the step -----------------------------------------------------------------------


def measure_cluster(s: ClusterSettings, workdir: Path, parquet: dict | None = None) -> dict:
    """The whole step; ``parquet``: the bench's file of ``s.rows`` rows (written here
    when None). Returns every figure (see ``render_cluster``)."""
    if shutil.which("etcd") is None:
        print("  cluster: etcd is not installed (make bench installs it); skipped", flush=True)
        return {"skipped": "etcd is not installed"}
    workdir.mkdir(parents=True, exist_ok=True)
    if parquet is None:
        parquet = write_parquet(workdir / "cluster_rows.parquet", s.seed, s.rows)
    if parquet["rows"] != s.rows:
        raise ValueError(f"the Parquet file has {parquet['rows']} rows, not {s.rows}")
    out: dict[str, Any] = {"settings": asdict(s), "cores": os.cpu_count() or 1}
    many = s.cluster_name
    with ExitStack() as stack:
        lone = stack.enter_context(KvstoreNode(workdir / "lone"))
        cluster = stack.enter_context(running_cluster(workdir / "cluster", s.nodes))
        seed_address = next(iter(cluster.nodes.values())).address
        node_pids = [n.pid for n in cluster.nodes.values()]
        print(
            f"  a lone node and {s.nodes} node processes on etcd; bulk-loading "
            f"{s.rows:,} rows into each",
            flush=True,
        )
        out["load_s"] = {
            LONE: load_table(lone.address, lone.pid, parquet, s.shards),
            many: load_table(seed_address, node_pids[0], parquet, s.shards),
        }
        out["settle_s"] = wait_until_idle([lone.pid, *node_pids], SETTLE_TIMEOUT_S)
        endpoints = {LONE: lone.address, many: seed_address}
        pids = {LONE: [lone.pid], many: node_pids}
        cpu0 = {n: sum(proc_cpu_seconds(p) for p in ps) for n, ps in pids.items()}
        out["throughput"] = measure_throughput(endpoints, pids, s)
        out["node_cpu_s"] = {
            n: sum(proc_cpu_seconds(p) for p in ps) - cpu0[n] for n, ps in pids.items()
        }
        out["ceilings"] = {}
        for b in s.batch_sizes:
            key = f"{s.clients}x{b}"
            out["ceilings"][key] = ceilings(
                out["throughput"][LONE][key], out["throughput"][many][key], s.nodes, out["cores"]
            )
        scale = out["ceilings"].get(f"{s.clients}x{SCALE_BATCH}")
        if scale is not None:
            out["scale"] = {
                "ratio": scale["measured_ratio"],
                "target_ratio": TARGET_SCALE,
                "met": scale["measured_ratio"] >= TARGET_SCALE,
            }
        print(f"  reads while a shard moves ({s.moves.readers} readers)", flush=True)
        out["moves"] = measure_move(cluster, workdir / "cluster", s.moves, s.rows, s.seed)
    return out


def _k(x: float) -> str:
    return f"{x / 1000:,.1f}k" if x >= 1000 else f"{x:,.0f}"


def render_cluster(res: dict) -> str:
    """The step's tables as text (the same style as the other steps)."""
    if "skipped" in res:
        return f"cluster: skipped ({res['skipped']})"
    s = res["settings"]
    many = f"kvstore-{s['nodes']}"
    lines = [
        f"cluster: one node process against {s['nodes']} (etcd, {s['shards']} shards), the same "
        f"{s['rows']:,} rows, {s['clients']} client processes on the same "
        f"{res['cores']} cores; medians of {s['rounds']} rounds (alternating):",
        "| keys | nodes | gets/s | keys/s | p50 ms | p99 ms | client cores | node cores "
        "| client CPU µs/call | node CPU µs/call |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in s["batch_sizes"]:
        key = f"{s['clients']}x{b}"
        for name, nodes in ((LONE, 1), (many, s["nodes"])):
            c = res["throughput"][name][key]
            lines.append(
                f"| {b} | {nodes} | {_k(c['batches_per_s'])} | {_k(c['keys_per_s'])} "
                f"| {c['p50_ms']:.3f} | {c['p99_ms']:.3f} | {c['client_cpu_cores']:.2f} "
                f"| {c['server_cpu_cores']:.2f} | {c['client_cpu_us_per_call']:.0f} "
                f"| {c['node_cpu_us_per_call']:.0f} |"
            )
    lines.append("")
    for b in s["batch_sizes"]:
        c = res["ceilings"][f"{s['clients']}x{b}"]
        lines.append(
            f"{b} keys: {s['nodes']} nodes / 1 = {c['measured_ratio']:.2f}x measured; the "
            f"clients took {c['clients_cores_cluster']:.2f} of {c['cores']} cores, so with them "
            f"on these cores the CPU per call allows {c['shared_ratio']:.2f}x; with the clients "
            f"elsewhere, {c['clients_elsewhere_ratio']:.2f}x "
            f"({_k(c['cluster_ceiling_gets_per_s'])} against {_k(c['lone_ceiling_gets_per_s'])}"
            " gets/s)"
        )
    if "scale" in res:
        sc = res["scale"]
        verdict = "met" if sc["met"] else "missed"
        lines.append(
            f"target: {s['nodes']} nodes >= {sc['target_ratio']}x one at {SCALE_BATCH} keys: "
            f"{sc['ratio']:.2f}x, {verdict} on this machine"
        )
    mv = res["moves"]
    verdict = "met" if mv["met"] else "missed"
    lines.append("")
    lines.append(
        f"reads while a shard moves ({mv['readers']} readers x {mv['batch_size']} keys, "
        f"{mv['joined']} joining; moves {mv['move_s']:.1f} s of {mv['join_s']:.1f} s from "
        f"its start{'' if mv['finished'] else ', NOT finished'}): p99 idle "
        f"{mv['idle_p99_ms']:.3f} ms, during the moves {mv['move_p99_ms']:.3f} ms = "
        f"{mv['p99_ratio']:.2f}x (target <= {mv['target_ratio']}x: {verdict}); from the "
        f"join's start {mv['join_p99_ms']:.3f} ms; {mv['failed_reads']} failed reads"
    )
    return "\n".join(lines)
