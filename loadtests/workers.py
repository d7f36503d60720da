"""Concurrent load generators for the throughput runs: client processes or client threads.

Each client (process or thread) has its own connection to every system and its own
pools of random keys. For one measurement (a "cell": system, batch size,
concurrency) the first ``concurrency`` clients warm up, meet at a barrier, then look
up batches back to back for the window; each reports its calls, its call latencies
and its first start and last end, so the cell's throughput is all calls divided by
(last end - first start).

Processes are the default: the load generator is Python too (redis-py builds every
command in Python even with hiredis parsing the replies, gRPC and NumPy hold the GIL
part of the time), so client threads in one process convoy on the GIL and undercount
what the servers can do. Threads stay available (``--clients threads``) to show that
effect.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtests.servers import machine_busy_seconds, proc_cpu_seconds
from loadtests.systems import KeyPool, open_reader

__all__ = [
    "CELL_FIGURES",
    "CellRun",
    "ClientProcesses",
    "ClientThreads",
    "cell_figures",
    "medians_of_rounds",
    "run_cell",
]

#: A client waits at most this long for the others at the start barrier, in seconds.
BARRIER_TIMEOUT_S = 120.0
#: Upper bound on lookups per client per phase, whatever the window.
MAX_CALLS = 5_000_000


@dataclass(slots=True)
class CellRun:
    """The clients' ``run_cell`` results and the CPU the two sides used, in cores.

    CPU is measured from the start barrier to the last client's end; 1.0 = one core
    busy the whole time.
    """

    clients: list[dict]
    client_cpu_cores: float
    server_cpu_cores: float
    #: Every core of the machine, busy (clients, server and anything else running).
    machine_cpu_cores: float


CELL_FIGURES = (
    "batches_per_s",
    "keys_per_s",
    "p50_ms",
    "p99_ms",
    "client_cpu_cores",
    "server_cpu_cores",
    "other_cpu_cores",
)


def cell_figures(cell: CellRun, batch_size: int) -> dict:
    """The figures of one cell run: rates per second, latencies in ms, CPU in cores."""
    calls = sum(c["calls"] for c in cell.clients)
    span_s = (
        max(c["end_ns"] for c in cell.clients) - min(c["start_ns"] for c in cell.clients)
    ) / 1e9
    lat_ms = np.concatenate([c["latencies_ns"] for c in cell.clients]) / 1e6
    return {
        "clients": len(cell.clients),
        "calls": calls,
        "span_s": span_s,
        "batches_per_s": calls / span_s,
        "keys_per_s": calls * batch_size / span_s,
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "client_cpu_cores": cell.client_cpu_cores,
        "server_cpu_cores": cell.server_cpu_cores,
        "machine_cpu_cores": cell.machine_cpu_cores,
        # what the rest of the machine (other work, the idle servers) used meanwhile
        "other_cpu_cores": max(
            0.0, cell.machine_cpu_cores - cell.client_cpu_cores - cell.server_cpu_cores
        ),
    }


def medians_of_rounds(
    runs: dict[str, dict[str, list[dict]]], figures: tuple[str, ...] = CELL_FIGURES
) -> dict[str, dict[str, dict]]:
    """system → "CxB" → each of ``figures``' median over the rounds, and the rounds."""
    out: dict[str, dict[str, dict]] = {}
    for name, cells in runs.items():
        out[name] = {}
        for key, cell_runs in cells.items():
            conc, b = (int(x) for x in key.split("x"))
            med = {f: float(np.median([run[f] for run in cell_runs])) for f in figures}
            out[name][key] = {"concurrency": conc, "batch_size": b, **med, "rounds": cell_runs}
    return out


def run_cell(
    reader: Any, pool: KeyPool, barrier: Any, warmup_s: float, window_s: float, offset: int
) -> dict:
    """Warm up for ``warmup_s`` s, wait at ``barrier``, then look up for ``window_s`` s.

    At least one measured call is made, so a slow call still yields a figure.
    Returns ``calls``, ``start_ns`` / ``end_ns`` (time.monotonic_ns of the first
    measured call's start and the last one's end), ``latencies_ns`` and ``cpu_s``
    (CPU time of this process during the measured part, in seconds; meaningful for a
    client process only, threads share the process).
    """
    n = len(pool)
    j = offset
    deadline = time.monotonic_ns() + int(warmup_s * 1e9)
    for _ in range(MAX_CALLS):
        j = (j + 1) % n
        reader.lookup(pool.ints[j], pool.names[j])
        if time.monotonic_ns() >= deadline:
            break
    barrier.wait(BARRIER_TIMEOUT_S)
    cpu0 = time.process_time()
    latencies = []
    start = time.monotonic_ns()
    deadline = start + int(window_s * 1e9)
    end = start
    for _ in range(MAX_CALLS):
        j = (j + 1) % n
        t0 = time.perf_counter_ns()
        reader.lookup(pool.ints[j], pool.names[j])
        latencies.append(time.perf_counter_ns() - t0)
        end = time.monotonic_ns()
        if end >= deadline:
            break
    return {
        "calls": len(latencies),
        "start_ns": start,
        "end_ns": end,
        "latencies_ns": np.asarray(latencies, np.int64),
        "cpu_s": time.process_time() - cpu0,
    }


def _draw_pools(seed: int, index: int, rows: int, batch_sizes: list[int], keys: int) -> dict:
    rng = np.random.default_rng([seed, 7, index])
    return {b: KeyPool.draw(rng, rows, b, keys) for b in batch_sizes}


def _process_main(
    index: int,
    conn: Any,
    endpoints: dict[str, str],
    barriers: dict[int, Any],
    seed: int,
    rows: int,
    batch_sizes: list[int],
    pool_keys: int,
) -> None:
    """A client process: open readers, draw key pools, then run cells until told to stop."""
    readers = {name: open_reader(name, endpoint) for name, endpoint in endpoints.items()}
    pools = _draw_pools(seed, index, rows, batch_sizes, pool_keys)
    gc.collect()
    gc.freeze()  # the pools are long-lived: keep them out of every GC pass
    conn.send("ready")
    try:
        while (cmd := conn.recv()) is not None:
            name, batch, conc, warmup_s, window_s = cmd
            try:
                result = run_cell(
                    readers[name], pools[batch], barriers[conc], warmup_s, window_s, 0
                )
            except Exception as exc:
                barriers[conc].abort()
                result = {"error": f"client process {index}: {exc!r}"}
            conn.send(result)
    finally:
        for reader in readers.values():
            reader.close()


class ClientProcesses:
    """``count`` client processes (forkserver), reused for every cell; a context manager."""

    kind = "processes"

    def __init__(
        self,
        count: int,
        endpoints: dict[str, str],
        concurrencies: list[int],
        seed: int,
        rows: int,
        batch_sizes: list[int],
        pool_keys: int,
    ) -> None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["loadtests.systems"])
        self._barriers = {c: ctx.Barrier(c + 1) for c in concurrencies}
        self._conns = []
        self._procs = []
        for i in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_process_main,
                args=(i, child, endpoints, self._barriers, seed, rows, batch_sizes, pool_keys),
                daemon=True,
                name=f"bench-client-{i}",
            )
            self._conns.append(parent)
            self._procs.append(proc)

    def __enter__(self) -> ClientProcesses:
        for proc in self._procs:
            proc.start()
        for i, conn in enumerate(self._conns):
            if not conn.poll(BARRIER_TIMEOUT_S):
                raise TimeoutError(f"client process {i} did not start")
            conn.recv()
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def run(
        self,
        name: str,
        batch: int,
        conc: int,
        warmup_s: float,
        window_s: float,
        server_pid: int | list[int],
    ) -> CellRun:
        """One cell on the first ``conc`` processes; ``server_pid``: the server's process,
        or a list of them (a cluster's nodes), whose CPU is added up."""
        pids = [server_pid] if isinstance(server_pid, int) else server_pid
        barrier = self._barriers[conc]
        barrier.reset()
        for conn in self._conns[:conc]:
            conn.send((name, batch, conc, warmup_s, window_s))
        barrier.wait(BARRIER_TIMEOUT_S + warmup_s)
        server0, machine0 = sum(map(proc_cpu_seconds, pids)), machine_busy_seconds()
        wall0 = time.monotonic_ns()
        results = []
        limit = BARRIER_TIMEOUT_S + window_s
        for i, conn in enumerate(self._conns[:conc]):
            if not conn.poll(limit):
                raise TimeoutError(f"client process {i} did not finish its cell")
            results.append(conn.recv())
        wall_s = (time.monotonic_ns() - wall0) / 1e9
        server_cores = (sum(map(proc_cpu_seconds, pids)) - server0) / wall_s
        machine_cores = (machine_busy_seconds() - machine0) / wall_s
        for r in results:
            if "error" in r:
                raise RuntimeError(r["error"])
        span_s = (max(r["end_ns"] for r in results) - min(r["start_ns"] for r in results)) / 1e9
        client_cores = sum(r["cpu_s"] for r in results) / span_s
        return CellRun(results, client_cores, server_cores, machine_cores)

    def __exit__(self, *exc: object) -> None:
        for conn in self._conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()


class ClientThreads:
    """``count`` client threads in this process, each with its own connections."""

    kind = "threads"

    def __init__(
        self,
        count: int,
        endpoints: dict[str, str],
        concurrencies: list[int],
        seed: int,
        rows: int,
        batch_sizes: list[int],
        pool_keys: int,
    ) -> None:
        self._readers = [
            {name: open_reader(name, endpoint) for name, endpoint in endpoints.items()}
            for _ in range(count)
        ]
        # One pool per batch size shared by the threads; each starts at its own offset.
        self._pools = _draw_pools(seed, 0, rows, batch_sizes, pool_keys)

    def __enter__(self) -> ClientThreads:
        return self

    @property
    def pids(self) -> list[int]:
        return []

    def run(
        self,
        name: str,
        batch: int,
        conc: int,
        warmup_s: float,
        window_s: float,
        server_pid: int,
    ) -> CellRun:
        """One cell on ``conc`` threads."""
        barrier = threading.Barrier(conc + 1)
        pool = self._pools[batch]
        results: list[dict | None] = [None] * conc
        errors: list[BaseException] = []

        def client(t: int) -> Callable[[], None]:
            def body() -> None:
                try:
                    results[t] = run_cell(
                        self._readers[t][name],
                        pool,
                        barrier,
                        warmup_s,
                        window_s,
                        t * len(pool) // conc,
                    )
                except BaseException as exc:
                    errors.append(exc)
                    barrier.abort()

            return body

        threads = [threading.Thread(target=client(t), daemon=True) for t in range(conc)]
        for thread in threads:
            thread.start()
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(BARRIER_TIMEOUT_S + warmup_s)
        cpu0 = (time.process_time(), proc_cpu_seconds(server_pid), machine_busy_seconds())
        wall0 = time.monotonic_ns()
        for thread in threads:
            thread.join(BARRIER_TIMEOUT_S + window_s)
            if thread.is_alive():
                raise TimeoutError("a client thread did not finish its cell")
        wall_s = (time.monotonic_ns() - wall0) / 1e9
        cpu1 = (time.process_time(), proc_cpu_seconds(server_pid), machine_busy_seconds())
        if errors:
            raise errors[0]
        client, server, machine = ((b - a) / wall_s for a, b in zip(cpu0, cpu1, strict=True))
        return CellRun(results, client, server, machine)  # type: ignore[arg-type]

    def __exit__(self, *exc: object) -> None:
        for readers in self._readers:
            for reader in readers.values():
                reader.close()
