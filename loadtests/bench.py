"""The side-by-side benchmark: kvstore against Redis (packed rows and hashes), same run.

    python -m loadtests.bench            # 1M rows (+ a 10M-row bulk load), ~10 min on 2 cores
    python -m loadtests.bench --quick    # 100k rows, fewer samples, ~1.5 min

Starts a kvstore node and two redis-servers (one per Redis layout, so that each
one's memory is its own) as subprocesses on 127.0.0.1 and loads the same synthetic
table into all three: Redis with pipelined writes, kvstore the way production data
arrives, from a zstd Parquet file of the same rows through the bulk loader
(``loadtests/bulkload.py``), so that its reads come from the bulk-loaded base. Then:

1. lookups of random existing keys, alternating between the systems round by round
   so that drift on the shared machine hits all of them equally: latency with one
   client, beside the floors measured in the same rounds (``loadtests/floors.py``: a
   bare uvloop echo round trip, kvstore's floor, and a Redis PING, Redis's);
   throughput at several concurrencies; memory;
   a 1-key get of six mixed dtypes into NumPy against a float-only one
   (``loadtests/mixed.py``); AsyncClient against Client and against redis.asyncio
   (``loadtests/aio_reads.py``); the FastAPI example on kvstore against the same app
   on Redis (``loadtests/serving.py``);
2. freshness and updates (``loadtests/updates.py``): update → readable latency,
   update rows/s unary and streaming, read latency while updates run, and beside it
   the same on Redis's hashes (HSET pipelines at half Redis's maximum);
3. the cluster step (``loadtests/cluster_bench.py``): one node process against N on a
   real etcd, same rows, 32 client processes; reads while a shard moves; the replica
   step (``loadtests/replica_bench.py``) and the kill -9 soak (``loadtests/kill_soak.py``,
   also ``make soak``): failed reads and acked writes lost over kills in a row;
4. bulk loads of more rows (``--load-rows``, 10M in the full run) into other tables.

Redis is read as its docs advise, with redis-py on the hiredis reply parser, both
pinned; the run stops at once if redis-py would parse in Python
(``loadtests/redis_client.py``). Prints the tables and the versions, and writes
``bench/results.json`` and ``bench/latency.png``.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvstore.config import NodeConfig
from loadtests import report
from loadtests.aio_reads import AsyncSettings, measure_async_reads, render_async_reads
from loadtests.bulkload import ParquetSink, run_loader, write_parquet
from loadtests.cluster_bench import ClusterSettings, measure_cluster, render_cluster
from loadtests.floors import EchoFloor, EchoServer, PingFloor, floor_ratios
from loadtests.kill_soak import SoakSettings, measure_soak, render_soak
from loadtests.machine import machine_info
from loadtests.mixed import MixedSettings, measure_mixed_dtypes, render_mixed
from loadtests.redis_client import HiredisMissing, connect, require_hiredis
from loadtests.replica_bench import ReplicaSettings, measure_replicas, render_replicas
from loadtests.servers import (
    SETTLE_TIMEOUT_S,
    KvstoreNode,
    RedisServer,
    dir_bytes,
    machine_busy_seconds,
    proc_cpu_seconds,
    proc_memory_bytes,
    wait_until_idle,
)
from loadtests.serving import ServingSettings, measure_serving, render_serving
from loadtests.systems import (
    TABLE,
    Chunk,
    KeyPool,
    KvstoreSystem,
    RedisHashSystem,
    RedisPackedSystem,
    redis_key,
)
from loadtests.updates import UpdateSettings, measure_updates
from loadtests.workers import ClientProcesses, ClientThreads, cell_figures, medians_of_rounds

LOAD_CHUNK_ROWS = 20_000
#: How many rows are checked to be identical in the three systems after the load.
VERIFY_ROWS = 200

CONCURRENCY_MODELS = {
    "processes": (
        "client processes, one connection per system each. The load generator is Python "
        "too (redis-py builds commands and runs its pool in Python, hiredis parses the "
        "replies; gRPC and NumPy hold the GIL part of the time): in one process, client "
        "threads convoy on the GIL, leave cores idle and undercount every server (in a "
        "trial, with redis-py's Python parser, 8 threads gave Redis less throughput than "
        "1). Processes let the client side use whatever CPU the server leaves; the "
        "2 cores are shared by server and load generator, so compare the ratios."
    ),
    "threads": (
        "client threads in this one process, one connection per system each. They share "
        "one GIL: past a few threads the load generator, not the server, is the limit "
        "(see the CPU table); use --clients processes for the servers' capacity."
    ),
}


MiB = 1 << 20


@dataclass
class Settings:
    """What to run. Times in seconds, sizes in rows/keys."""

    rows: int = 1_000_000
    batch_sizes: list[int] = field(default_factory=lambda: [1, 10, 100, 1000])
    concurrencies: list[int] = field(default_factory=lambda: [1, 8, 32])
    seed: int = 20261123
    #: Latency: rounds (each visits every batch size and system once) and, per visit,
    #: at most ``latency_cell_samples`` lookups or ``latency_cell_s`` seconds.
    latency_rounds: int = 5
    latency_cell_samples: int = 2000
    latency_cell_s: float = 2.0
    #: Throughput: rounds; per visit, a warm-up then a measured window.
    throughput_rounds: int = 3
    throughput_warmup_s: float = 0.5
    throughput_window_s: float = 2.5
    #: Warm-up lookups per system and batch size before the latency rounds.
    warmup_lookups: int = 200
    warmup_s: float = 2.0
    #: Random keys drawn per batch size; lookups cycle through them.
    pool_keys: int = 200_000
    #: Concurrent load: "processes" or "threads" (see CONCURRENCY_MODELS).
    clients: str = "processes"
    #: The node's hot-row cache in MiB (KVSTORE_HOT_ROWS_BYTES); None = its default.
    #: Keys are uniform over the table, so few are read twice (docs/benchmarks.md).
    hot_rows_mb: int | None = None
    #: 1-key gets of mixed dtypes against float-only ones (issue 18).
    mixed: MixedSettings = field(default_factory=MixedSettings)
    #: AsyncClient against Client and redis.asyncio; the FastAPI example (issue 18).
    aio: AsyncSettings = field(default_factory=AsyncSettings)
    serving: ServingSettings = field(default_factory=ServingSettings)
    #: Freshness and updates section (issue 4).
    updates: UpdateSettings = field(default_factory=UpdateSettings)
    #: The cluster step (issue 15); nodes = 0 skips it. Its rows and seed are these.
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    #: The replica step (issue 16, loadtests/replica_bench.py); run with the cluster step.
    replicas: ReplicaSettings = field(default_factory=ReplicaSettings)
    #: The kill -9 soak (issue 16, loadtests/kill_soak.py, make soak); run with the cluster step.
    soak: SoakSettings = field(default_factory=SoakSettings)
    #: More bulk-load sizes, each into a table of its own after the other sections.
    load_rows: list[int] = field(default_factory=lambda: [10_000_000])
    out_dir: Path = Path("bench")
    quick: bool = False

    @classmethod
    def quick_settings(cls, **overrides: Any) -> Settings:
        """Small and short: 100k rows, fewer samples (about 1-2 minutes in all)."""
        s = cls(
            rows=100_000,
            latency_rounds=2,
            latency_cell_samples=500,
            latency_cell_s=0.4,
            throughput_rounds=2,
            throughput_warmup_s=0.2,
            throughput_window_s=0.5,
            warmup_lookups=50,
            warmup_s=0.5,
            pool_keys=50_000,
            updates=UpdateSettings(
                freshness_updates=100, throughput_window_s=1.5, read_window_s=1.5
            ),
            mixed=MixedSettings(rows=2000, rounds=4, samples=300, warmup=100),
            cluster=ClusterSettings.quick(),
            replicas=ReplicaSettings.quick(),
            soak=SoakSettings(kills=2, readers=4, rows=5000),
            aio=AsyncSettings.quick(),
            serving=ServingSettings.quick(),
            load_rows=[],
            quick=True,
        )
        for key, value in overrides.items():
            setattr(s, key, value)
        return s


# -- measurement --------------------------------------------------------------------


def time_lookups(reader: Any, pool: KeyPool, cursor: int, count: int, seconds: float) -> list[int]:
    """Lookups one after the other, at most ``count`` or ``seconds`` s; latencies in ns."""
    samples: list[int] = []
    deadline = time.perf_counter_ns() + int(seconds * 1e9)
    n = len(pool)
    for i in range(count):
        j = (cursor + i) % n
        keys, names = pool.ints[j], pool.names[j]
        t0 = time.perf_counter_ns()
        reader.lookup(keys, names)
        t1 = time.perf_counter_ns()
        samples.append(t1 - t0)
        if t1 > deadline:
            break
    return samples


def summarize_latency(samples_ns: list[int]) -> dict:
    """p50, p99, mean and count of latencies given in ns; the figures in ms."""
    ms = np.asarray(samples_ns, np.int64) / 1e6
    return {
        "count": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "max_ms": float(ms.max()),
    }


# -- phases -------------------------------------------------------------------------


def load_redis_and_parquet(redis_systems: list[Any], sink: ParquetSink, s: Settings) -> dict:
    """Load the rows into the Redis systems and write them to ``sink``, chunk by chunk.

    Returns each Redis system's seconds and rows/s (client encoding included).
    """
    spent = {sys_.name: 0.0 for sys_ in redis_systems}
    started = time.monotonic()
    for lo in range(0, s.rows, LOAD_CHUNK_ROWS):
        chunk = Chunk.generate(s.seed, lo, min(lo + LOAD_CHUNK_ROWS, s.rows))
        sink.write(chunk)
        for system in redis_systems:
            spent[system.name] += system.load(chunk)
        done = min(lo + LOAD_CHUNK_ROWS, s.rows)
        if done % (10 * LOAD_CHUNK_ROWS) == 0 or done == s.rows:
            progress = ", ".join(f"{k} {done / v:,.0f} rows/s" for k, v in spent.items() if v)
            print(
                f"  loaded {done:,}/{s.rows:,} rows ({time.monotonic() - started:.0f} s): "
                f"{progress}; Parquet written in {sink.seconds:.1f} s",
                flush=True,
            )
    return {name: {"seconds": sec, "rows_per_s": s.rows / sec} for name, sec in spent.items()}


def bulk_load(
    kv: KvstoreSystem, node: KvstoreNode, table: str, parquet: dict, workdir: Path, rows: int
) -> dict:
    """Bulk-load ``parquet`` into ``table`` (a child process) and check it is queryable."""
    probe = np.random.default_rng(rows).integers(0, rows, 1000, dtype=np.int64)

    def check() -> None:
        found = kv.count_found(probe, table)
        if found != len(probe):
            raise AssertionError(f"after the load, {table} holds {found} of {len(probe)} keys")

    out = run_loader(kv.address, node.pid, node.data_dir, table, parquet, workdir, check)
    print(
        f"  kvstore bulk load of {rows:,} rows from {parquet['bytes'] / 1e6:,.0f} MB of zstd "
        f"Parquet: {out['seconds']:.1f} s, {out['rows_per_s']:,.0f} rows/s, "
        f"{out['parquet_mb_per_s']:.0f} MB/s; loader peak RSS "
        f"{out['loader_peak_rss_bytes'] / 2**20:,.0f} MiB",
        flush=True,
    )
    return out


def loaded_data_dir(
    workdir: Path, parquet: dict, rows: int, tmp: Path, env: dict[str, str] | None = None
) -> Path:
    """Start a node in ``workdir`` (``env``: its ``KVSTORE_*`` settings), create the
    benchmark table, bulk-load ``parquet`` into it and stop the node: the returned
    ``workdir / "data"`` then holds the loaded table, for nodes started on it or on
    copies of it (memcap.py, ab.py)."""
    with KvstoreNode(workdir, env=env) as node:
        kv = KvstoreSystem(node.address, node.pid)
        try:
            kv.create()
            bulk_load(kv, node, TABLE, parquet, tmp, rows)
        finally:
            kv.close()
    return node.data_dir


def extra_bulk_loads(kv: KvstoreSystem, node: KvstoreNode, workdir: Path, s: Settings) -> list:
    """Bulk loads of ``s.load_rows`` rows, each into a table of its own, dropped afterwards."""
    out = []
    for rows in s.load_rows:
        if rows <= 0 or rows == s.rows:
            continue
        table = f"bench_load_{rows}"
        path = workdir / f"{table}.parquet"
        print(f"bulk load of {rows:,} rows: writing {path.name}", flush=True)
        parquet = write_parquet(path, s.seed + 3, rows)
        kv.create_table(table)
        try:
            out.append(bulk_load(kv, node, table, parquet, workdir, rows))
        finally:
            kv.drop_table(table)
            path.unlink()
    return out


def verify(systems: list[Any], s: Settings) -> None:
    """Check that the three systems answer the same rows (and NaN for missing keys)."""
    rng = np.random.default_rng(s.seed + 1)
    keys = np.concatenate([rng.integers(0, s.rows, VERIFY_ROWS), [s.rows, s.rows + 7]])
    names = [redis_key(k) for k in keys.tolist()]
    expected = np.full((len(keys), 96), np.nan, np.float32)
    for i, key in enumerate(keys[:VERIFY_ROWS].tolist()):
        lo = key - key % LOAD_CHUNK_ROWS
        chunk = Chunk.generate(s.seed, lo, min(lo + LOAD_CHUNK_ROWS, s.rows))
        expected[i] = chunk.matrix()[key - lo]
    for system in systems:
        reader = system.reader()
        try:
            got = reader.as_matrix(reader.lookup(keys, names))
        finally:
            reader.close()
        if not np.array_equal(got, expected, equal_nan=True):
            bad = np.flatnonzero(~np.all((got == expected) | np.isnan(expected), axis=1))
            raise AssertionError(f"{system.name} answers other values for keys {keys[bad][:5]}")
    print(f"  verified: the three systems answer the same {len(keys)} rows", flush=True)


def measure_latency(
    systems: list[Any], pools: dict[int, KeyPool], s: Settings, floors: Sequence[Any] = ()
) -> dict:
    """Latency with one client, rounds alternating systems; per system and batch size.

    ``floors`` (``loadtests/floors.py``) take their turn before the systems at every
    batch size of every round, so that each floor is measured beside the lookups it
    bounds; their samples are pooled under ``"floors"`` (a floor has no batch size).
    Figures in ms; ``other_cpu_cores`` per round is the CPU (in cores) that other work
    on the machine used meanwhile, beside this process and the servers.
    """
    readers = {f.name: f.reader() for f in floors}
    readers.update((system.name, system.reader()) for system in systems)
    floor_names = [f.name for f in floors]
    ours = [os.getpid(), *{x.server_pid for x in [*floors, *systems]}]
    other_cpu: list[float] = []
    samples: dict[str, dict[int, list[int]]] = {n: {b: [] for b in pools} for n in readers}
    rounds: dict[str, dict[int, list[float]]] = {n: {b: [] for b in pools} for n in readers}
    floor_rounds: dict[str, list[float]] = {n: [] for n in floor_names}
    cursors = dict.fromkeys(readers, 0)
    try:
        for pool in pools.values():  # warm-up: connections, caches, code paths
            for reader in readers.values():
                time_lookups(reader, pool, len(pool) // 2, s.warmup_lookups, s.warmup_s)
        for r in range(s.latency_rounds):
            cpu0, busy0, wall0 = _cpu_of(ours), machine_busy_seconds(), time.monotonic()
            this_round: dict[str, list[int]] = {n: [] for n in floor_names}
            for b, pool in pools.items():
                for name, reader in readers.items():
                    got = time_lookups(
                        reader, pool, cursors[name], s.latency_cell_samples, s.latency_cell_s
                    )
                    cursors[name] += len(got)
                    samples[name][b].extend(got)
                    rounds[name][b].append(float(np.median(got)) / 1e6)
                    if name in this_round:
                        this_round[name].extend(got)
            for name, got in this_round.items():
                floor_rounds[name].append(float(np.median(got)) / 1e6)
            wall = time.monotonic() - wall0
            other = (machine_busy_seconds() - busy0 - (_cpu_of(ours) - cpu0)) / wall
            other_cpu.append(max(0.0, other))
            line = ", ".join(
                [f"{n} {floor_rounds[n][-1]:.3f}" for n in floor_names]
                + [
                    f"{n} b={b} {rounds[n][b][-1]:.3f}"
                    for b in (1, 1000)
                    if b in pools
                    for n in readers
                    if n not in floor_rounds
                ]
            )
            print(
                f"  latency round {r + 1}/{s.latency_rounds} (p50 ms): {line}; "
                f"other work on the machine: {other_cpu[-1]:.2f} cores",
                flush=True,
            )
    finally:
        for reader in readers.values():
            reader.close()
    out: dict[str, Any] = {
        name: {
            str(b): {**summarize_latency(samples[name][b]), "round_p50_ms": rounds[name][b]}
            for b in pools
        }
        for name in readers
        if name not in floor_rounds
    }
    out["floors"] = {
        f.name: {
            "what": f.what,
            **summarize_latency([x for b in pools for x in samples[f.name][b]]),
            "round_p50_ms": floor_rounds[f.name],
        }
        for f in floors
    }
    out["floor_ratios"] = floor_ratios(out)
    out["other_cpu_cores_per_round"] = other_cpu
    return out


def _cpu_of(pids: list[int]) -> float:
    """CPU time of processes ``pids`` together so far, in seconds."""
    return sum(proc_cpu_seconds(p) for p in pids)


def measure_throughput(systems: list[Any], s: Settings) -> dict:
    """Throughput per system, concurrency and batch size; rounds alternate the systems.

    Per cell: keys/s and batches/s (all calls / (last end - first start)), call
    latency p50/p99 under load in ms, CPU of the load generator and the server in
    cores; the figures are medians of the rounds, each round is kept too.
    """
    endpoints = {system.name: system.endpoint for system in systems}
    pids = {system.name: system.server_pid for system in systems}
    clients_class = ClientProcesses if s.clients == "processes" else ClientThreads
    clients = clients_class(
        max(s.concurrencies),
        endpoints,
        s.concurrencies,
        s.seed,
        s.rows,
        s.batch_sizes,
        s.pool_keys // 4 if s.clients == "processes" else s.pool_keys,
    )
    runs: dict[str, dict[str, list[dict]]] = {name: {} for name in endpoints}
    with clients:
        for r in range(s.throughput_rounds):
            for conc in s.concurrencies:
                for b in s.batch_sizes:
                    for name in endpoints:
                        cell = clients.run(
                            name, b, conc, s.throughput_warmup_s, s.throughput_window_s, pids[name]
                        )
                        runs[name].setdefault(f"{conc}x{b}", []).append(cell_figures(cell, b))
                biggest = max(s.batch_sizes)
                print(
                    f"  throughput round {r + 1}/{s.throughput_rounds}, concurrency {conc}, "
                    f"batch {biggest}: "
                    + ", ".join(
                        f"{n} {runs[n][f'{conc}x{biggest}'][-1]['keys_per_s']:,.0f} keys/s"
                        for n in runs
                    ),
                    flush=True,
                )
    return medians_of_rounds(runs)


def measure_memory(
    node: KvstoreNode,
    redis_servers: dict[str, RedisServer],
    rows: int,
    empty: dict | None = None,
) -> dict:
    """Memory of each system, bytes, and per row (total, and above the empty server).

    kvstore: the node's resident memory (VmRSS, split into its private memory, RssAnon,
    and the mapped file pages, RssFile) and the bytes of the files under its data
    directory. Redis: INFO memory used_memory (and used_memory_rss).
    """
    out: dict[str, dict] = {}
    mem = proc_memory_bytes(node.pid)
    rss = mem["rss"]
    disk = dir_bytes(node.data_dir)
    out["kvstore"] = {
        "rss_bytes": rss,
        "rss_anon_bytes": mem["anon"],
        "rss_file_bytes": mem["file"],
        "disk_bytes": disk,
    }
    for name, server in redis_servers.items():
        with server.connect() as conn:
            info = conn.info("memory")
            encoding = conn.object("encoding", redis_key(0)) if conn.exists(redis_key(0)) else None
        out[name] = {
            "used_memory_bytes": int(info["used_memory"]),
            "used_memory_rss_bytes": int(info["used_memory_rss"]),
            "encoding": encoding.decode() if isinstance(encoding, bytes) else encoding,
        }
    kv = out["kvstore"]
    kv["rss_per_row"] = rss / rows
    kv["disk_per_row"] = disk / rows
    kv["total_per_row"] = (rss + disk) / rows
    for name in redis_servers:
        out[name]["used_memory_per_row"] = out[name]["used_memory_bytes"] / rows
        out[name]["total_per_row"] = out[name]["used_memory_per_row"]
    if empty is not None:
        kv["rss_empty_bytes"] = empty["kvstore"]["rss_bytes"]
        kv["rss_above_empty_per_row"] = (rss - kv["rss_empty_bytes"]) / rows
        for part in ("anon", "file"):
            empty_part = empty["kvstore"][f"rss_{part}_bytes"]
            kv[f"rss_{part}_empty_bytes"] = empty_part
            kv[f"rss_{part}_above_empty_per_row"] = (kv[f"rss_{part}_bytes"] - empty_part) / rows
        for name in redis_servers:
            r = out[name]
            r["used_memory_empty_bytes"] = empty[name]["used_memory_bytes"]
            r["used_memory_above_empty_per_row"] = (
                r["used_memory_bytes"] - r["used_memory_empty_bytes"]
            ) / rows
    return out


# -- the run ------------------------------------------------------------------------


def run(s: Settings) -> dict:
    """Start the servers, load, measure, stop the servers; all raw numbers as a dict."""
    results: dict[str, Any] = {"settings": {**asdict(s), "out_dir": str(s.out_dir)}}
    results["concurrency_model"] = CONCURRENCY_MODELS[s.clients]
    results["load_average_start"] = os.getloadavg()
    require_hiredis()  # before anything starts: never measure a handicapped Redis
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvbench-")))
        print(f"starting a kvstore node and two redis-servers (work dir {workdir})", flush=True)
        hot_rows = NodeConfig().hot_rows_bytes if s.hot_rows_mb is None else s.hot_rows_mb * MiB
        results["kvstore_hot_rows_bytes"] = hot_rows
        print(f"  kvstore's hot-row cache: {hot_rows / MiB:.0f} MiB (--hot-rows-mb)", flush=True)
        node = stack.enter_context(
            KvstoreNode(workdir, env={"KVSTORE_HOT_ROWS_BYTES": str(hot_rows)})
        )
        redis_servers = {}
        for name in ("redis-packed", "redis-hash"):
            (workdir / name).mkdir()
            redis_servers[name] = stack.enter_context(RedisServer(workdir / name))
        echo = stack.enter_context(EchoServer(workdir))
        floors = [EchoFloor(echo), PingFloor(redis_servers["redis-packed"])]
        with connect(redis_servers["redis-packed"].port) as probe:
            results["machine"] = machine_info(redis_servers["redis-packed"].version(), probe)
        results["machine"]["echo_server_loop"] = echo.loop
        kv = KvstoreSystem(node.address, node.pid)
        stack.callback(kv.close)
        packed = RedisPackedSystem(redis_servers["redis-packed"])
        stack.callback(packed.close)
        hashed = RedisHashSystem(redis_servers["redis-hash"])
        stack.callback(hashed.close)
        systems = [kv, packed, hashed]
        kv.create()
        empty = measure_memory(node, redis_servers, 1)

        print(
            f"loading {s.rows:,} rows into each Redis (pipelined) and into a zstd Parquet file",
            flush=True,
        )
        sink = ParquetSink(workdir / "bench_features.parquet")
        results["load"] = load_redis_and_parquet([packed, hashed], sink, s)
        parquet = sink.close()
        print("bulk-loading the Parquet file into kvstore (the loader in a child process)")
        main_load = bulk_load(kv, node, TABLE, parquet, workdir, s.rows)
        results["load"] = {
            "kvstore": {"seconds": main_load["seconds"], "rows_per_s": main_load["rows_per_s"]},
            **results["load"],
        }
        results["bulk_load"] = {"runs": [main_load]}
        verify(systems, s)
        results["memory_after_load"] = measure_memory(node, redis_servers, s.rows, empty)
        pids = [system.server_pid for system in systems]
        results["settle_s"] = wait_until_idle(pids, SETTLE_TIMEOUT_S)
        print(f"  servers idle after {results['settle_s']:.0f} s", flush=True)

        rng = np.random.default_rng(s.seed + 2)
        pools = {b: KeyPool.draw(rng, s.rows, b, s.pool_keys) for b in s.batch_sizes}
        gc.collect()
        gc.freeze()  # the pools are long-lived: keep them out of every GC pass
        print(
            "latency, one client (rounds alternate the systems and the floors: "
            f"{', '.join(f.name for f in floors)})",
            flush=True,
        )
        results["latency"] = measure_latency(systems, pools, s, floors)
        del pools
        print("a 1-key get of six mixed dtypes against a float-only one (alternating)")
        results["mixed_dtypes"] = measure_mixed_dtypes(kv.address, s.mixed)
        print(render_mixed(results["mixed_dtypes"]), flush=True)
        print(f"throughput ({s.clients}; rounds alternate the systems)", flush=True)
        results["throughput"] = measure_throughput(systems, s)
        results["memory"] = measure_memory(node, redis_servers, s.rows, empty)
        print("from an event loop: AsyncClient against Client and redis.asyncio (alternating)")
        packed_port = redis_servers["redis-packed"].port
        results["async_reads"] = measure_async_reads(kv.address, packed_port, s.rows, s.aio)
        print(render_async_reads(results["async_reads"]), flush=True)
        print("the FastAPI example on kvstore against the same app on Redis (alternating)")
        results["serving"] = measure_serving(kv.address, packed_port, workdir, s.serving)
        print(render_serving(results["serving"]), flush=True)
        print(
            "freshness and updates (kvstore; updates set 4 features of existing keys; "
            "Redis's reads under updates beside kvstore's, on the hashes)"
        )
        results["updates"] = measure_updates(
            kv.address, node.pid, s.rows, s.seed, s.updates, redis=redis_servers["redis-hash"]
        )
        if s.cluster.nodes:
            s.cluster.rows, s.cluster.seed = s.rows, s.seed
            print(f"cluster: one node process against {s.cluster.nodes}, the same rows")
            results["cluster"] = measure_cluster(s.cluster, workdir / "cluster", parquet)
            print(render_cluster(results["cluster"]), flush=True)
            print("replicas: reads while a node dies or hangs, writes with R = 1, 2, 3")
            results["replicas"] = measure_replicas(s.replicas, workdir / "replicas")
            print(render_replicas(results["replicas"]), flush=True)
            print(f"kill -9 soak: {s.soak.kills} kills in a row of 1 of 3 nodes (R=2) under load")
            results["kill_soak"] = measure_soak(s.soak, workdir / "soak")
            print(render_soak(results["kill_soak"]), flush=True)
        results["bulk_load"]["runs"] += extra_bulk_loads(kv, node, workdir, s)
        results["load_average_end"] = os.getloadavg()
        print("stopping the servers", flush=True)
    return results


def parse_args(argv: list[str] | None = None) -> Settings:
    """Settings from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description=(
            "Benchmark kvstore against Redis (packed rows and hashes) on the same machine, "
            "in the same run: load rows/s, lookup latency p50/p99 by batch size, throughput "
            "by concurrency, memory. Writes OUT/results.json and OUT/latency.png."
        ),
        epilog=(
            "examples:\n"
            "  python -m loadtests.bench                1M rows + a 10M-row load, ~10 min\n"
            "  python -m loadtests.bench --quick        100k rows, short (~1-2 min)\n"
            "  python -m loadtests.bench --rows 300000 --batch-sizes 1,100"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="100k rows and fewer, shorter rounds (~1-2 min)"
    )
    parser.add_argument("--rows", type=int, default=None, help="rows in the table (default 1M)")
    parser.add_argument(
        "--batch-sizes",
        default=None,
        help="comma-separated keys per lookup (default 1,10,100,1000)",
    )
    parser.add_argument(
        "--concurrency", default=None, help="comma-separated concurrent clients (default 1,8,32)"
    )
    parser.add_argument(
        "--clients",
        choices=["processes", "threads"],
        default="processes",
        help="concurrent load from client processes (default) or threads of one process",
    )
    parser.add_argument(
        "--hot-rows-mb",
        type=int,
        default=None,
        help="the kvstore node's hot-row cache in MiB (default: the node's, off); the "
        "keys are uniform over the table, so few are read twice (docs/benchmarks.md)",
    )
    parser.add_argument(
        "--load-rows",
        default=None,
        help="comma-separated row counts of more bulk loads, each from its own Parquet file "
        "into its own table, after the other sections (default 10000000; none with --quick; "
        "0 = none)",
    )
    parser.add_argument(
        "--freshness-updates",
        type=int,
        default=None,
        help="updates timed for freshness (default 300; 100 with --quick)",
    )
    parser.add_argument(
        "--cluster-nodes",
        type=int,
        default=None,
        help="node processes of the cluster step (default: one per core; 0 = skip the step)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the data and the keys")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write results (default bench/, or bench/quick/ with --quick, so that "
        "a quick run leaves the full run's results alone)",
    )
    args = parser.parse_args(argv)
    out_dir = args.out or (Path("bench/quick") if args.quick else Path("bench"))
    overrides: dict[str, Any] = {
        "out_dir": out_dir,
        "clients": args.clients,
        "hot_rows_mb": args.hot_rows_mb,
    }
    if args.rows is not None:
        if args.rows < 1000:
            parser.error("--rows must be at least 1000")
        overrides["rows"] = args.rows
    if args.batch_sizes:
        overrides["batch_sizes"] = [int(x) for x in args.batch_sizes.split(",")]
    if args.concurrency:
        overrides["concurrencies"] = [int(x) for x in args.concurrency.split(",")]
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.load_rows is not None:
        overrides["load_rows"] = [int(x) for x in args.load_rows.split(",") if int(x) > 0]
    if args.quick:
        s = Settings.quick_settings(**overrides)
    else:
        s = Settings()
        for key, value in overrides.items():
            setattr(s, key, value)
    if args.freshness_updates is not None:
        s.updates.freshness_updates = args.freshness_updates
    if args.cluster_nodes is not None:
        s.cluster.nodes = args.cluster_nodes
    return s


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables; write results.json and latency.png."""
    s = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # stop the servers on SIGTERM too
    started = time.monotonic()
    try:
        results = run(s)
    except HiredisMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        return 130
    results["elapsed_s"] = time.monotonic() - started
    print()
    print(report.render(results))
    s.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = report.write_json(results, s.out_dir / "results.json")
    png_path = report.plot(results, s.out_dir / "latency.png")
    print(f"\nwrote {json_path} and {png_path} ({results['elapsed_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
