"""Reads from an event loop: AsyncClient against Client, and against redis.asyncio.

Issue 18's targets, measured on the benchmark's table (``loadtests/systems.py``: 32
float32 features and a float32[64] embedding per key), already loaded into the
kvstore node and the packed-rows Redis:

1. latency, one caller, one call at a time: ``AsyncClient.get(...).to_numpy()`` on a
   uvloop loop against ``Client.get(...).to_numpy()``, at 1 and 100 keys (target: the
   async p50 within 1.1x of the blocking one's);
2. throughput, 32 tasks on one uvloop loop in one process, 100 keys per call: one
   ``AsyncClient`` (its tasks' requests pipelined on one connection) against one
   ``redis.asyncio`` client on hiredis (its pool opens a connection per concurrent
   command), ``MGET`` of the same rows into one (n, 96) float32 array (target: ≥ 1.0x
   Redis's calls/s).

Rounds alternate the two sides, and which goes first; figures are medians of the
rounds' medians (latency) and of the rounds' rates (throughput), so that drift on a
shared machine hits both alike.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis.asyncio
import uvloop

from kvstore import AsyncClient, Client
from loadtests.redis_client import HIREDIS_PARSER, HiredisMissing, require_hiredis
from loadtests.systems import ROW_FLOATS, TABLE, redis_key

__all__ = ["AsyncSettings", "measure_async_reads", "render_async_reads"]

#: Issue 18's targets: AsyncClient p50 / Client p50, and kvstore / Redis calls/s.
TARGET_LATENCY_RATIO = 1.1
TARGET_THROUGHPUT_RATIO = 1.0
#: Redis's asyncio reply parser on hiredis.
ASYNC_HIREDIS_PARSER = "_AsyncHiredisParser"

_NAN_ROW = np.full(ROW_FLOATS, np.nan, np.float32).tobytes()


@dataclass
class AsyncSettings:
    """Keys per call for latency; rounds; calls per latency cell; seconds per
    throughput cell; concurrent tasks and keys per call for throughput."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 100])
    rounds: int = 8
    samples: int = 400
    warmup: int = 200
    tasks: int = 32
    task_keys: int = 100
    seconds: float = 2.0
    seed: int = 20261218

    @classmethod
    def quick(cls) -> AsyncSettings:
        return cls(rounds=4, samples=200, warmup=100, seconds=1.0)


async def _connect_redis(port: int) -> redis.asyncio.Redis:
    """A redis.asyncio client of the server on ``port``, checked to parse with hiredis."""
    require_hiredis()
    conn = redis.asyncio.Redis(host="127.0.0.1", port=port, socket_timeout=60.0)
    connection = await conn.connection_pool.get_connection()
    parser = type(connection._parser).__name__
    await conn.connection_pool.release(connection)
    if parser != ASYNC_HIREDIS_PARSER:
        await conn.aclose()
        raise HiredisMissing(
            f"redis.asyncio chose the {parser} reply parser, not {ASYNC_HIREDIS_PARSER} "
            f"({HIREDIS_PARSER}'s asyncio twin): the comparison would handicap Redis"
        )
    return conn


async def _redis_rows(conn: redis.asyncio.Redis, names: list[bytes]) -> np.ndarray:
    """MGET ``names`` (GET if one) as one (n, 96) float32 array, NaN rows where missing."""
    values = await conn.mget(names) if len(names) != 1 else [await conn.get(names[0])]
    if None in values:
        values = [_NAN_ROW if v is None else v for v in values]
    return np.frombuffer(b"".join(values), np.float32).reshape(len(values), ROW_FLOATS)


def _sync_cell(client: Client, batches: np.ndarray) -> list[int]:
    out = []
    for keys in batches:
        t0 = time.perf_counter_ns()
        client.get(TABLE, keys).to_numpy()
        out.append(time.perf_counter_ns() - t0)
    return out


async def _async_cell(client: AsyncClient, batches: np.ndarray) -> list[int]:
    out = []
    for keys in batches:
        t0 = time.perf_counter_ns()
        (await client.get(TABLE, keys)).to_numpy()
        out.append(time.perf_counter_ns() - t0)
    return out


async def _throughput_cell(call: Any, batches: list[Any], tasks: int, seconds: float) -> dict:
    """``tasks`` tasks calling ``call(batch)`` over ``batches`` for ``seconds``;
    calls/s and the latency p50 / p99 (µs) of the calls."""
    stop = time.perf_counter() + seconds
    latencies: list[int] = []

    async def task(offset: int) -> None:
        k = offset
        while time.perf_counter() < stop:
            t0 = time.perf_counter_ns()
            await call(batches[k % len(batches)])
            latencies.append(time.perf_counter_ns() - t0)
            k += tasks

    started = time.perf_counter()
    await asyncio.gather(*(task(i) for i in range(tasks)))
    elapsed = time.perf_counter() - started
    us = np.asarray(latencies, np.int64) / 1e3
    return {
        "calls_per_s": len(latencies) / elapsed,
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
    }


async def _measure(address: str, redis_port: int, rows: int, s: AsyncSettings) -> dict:
    rng = np.random.default_rng(s.seed)
    sync = Client(address, timeout=60.0)
    aclient = AsyncClient(address, timeout=60.0)
    rconn = await _connect_redis(redis_port)
    try:
        latency: dict[str, Any] = {}
        for b in s.batch_sizes:
            warm = rng.integers(0, rows, (s.warmup, b))
            _sync_cell(sync, warm)
            await _async_cell(aclient, warm)
            medians: dict[str, list[float]] = {"Client": [], "AsyncClient": []}
            for r in range(s.rounds):
                order = ["Client", "AsyncClient"][:: 1 if r % 2 == 0 else -1]
                for side in order:
                    batches = rng.integers(0, rows, (s.samples, b))
                    if side == "Client":
                        got = _sync_cell(sync, batches)
                    else:
                        got = await _async_cell(aclient, batches)
                    medians[side].append(float(np.median(got)) / 1e3)
            cell = {
                side: {"p50_us": float(np.median(m)), "round_p50_us": m}
                for side, m in medians.items()
            }
            cell["ratio_p50"] = cell["AsyncClient"]["p50_us"] / cell["Client"]["p50_us"]
            cell["met"] = cell["ratio_p50"] <= TARGET_LATENCY_RATIO
            latency[str(b)] = cell

        ints = rng.integers(0, rows, (max(64, 4 * s.tasks), s.task_keys))
        names = [[redis_key(k) for k in row] for row in ints.tolist()]
        for k in range(len(ints)):  # the same rows on both sides
            a = (await aclient.get(TABLE, ints[k])).to_numpy()
            b = await _redis_rows(rconn, names[k])
            np.testing.assert_array_equal(a["emb"], b[:, 32:])

        async def kv_call(keys: np.ndarray) -> None:
            (await aclient.get(TABLE, keys)).to_numpy()

        async def redis_call(keys: list[bytes]) -> None:
            await _redis_rows(rconn, keys)

        sides = {"kvstore": (kv_call, list(ints)), "redis": (redis_call, names)}
        for call, batches in sides.values():  # warm: connections opened, pools filled
            await _throughput_cell(call, batches, s.tasks, 0.2)
        cells: dict[str, list[dict]] = {name: [] for name in sides}
        for r in range(s.rounds):
            for name in list(sides)[:: 1 if r % 2 == 0 else -1]:
                call, batches = sides[name]
                cells[name].append(await _throughput_cell(call, batches, s.tasks, s.seconds))
        throughput: dict[str, Any] = {
            name: {
                key: float(np.median([c[key] for c in got]))
                for key in ("calls_per_s", "p50_us", "p99_us")
            }
            | {"round_calls_per_s": [c["calls_per_s"] for c in got]}
            for name, got in cells.items()
        }
        throughput["ratio"] = (
            throughput["kvstore"]["calls_per_s"] / throughput["redis"]["calls_per_s"]
        )
        throughput["met"] = throughput["ratio"] >= TARGET_THROUGHPUT_RATIO
        throughput["tasks"] = s.tasks
        throughput["keys"] = s.task_keys
        return {
            "latency": latency,
            "throughput": throughput,
            "target_latency_ratio": TARGET_LATENCY_RATIO,
            "target_throughput_ratio": TARGET_THROUGHPUT_RATIO,
            "loop": "uvloop",
        }
    finally:
        sync.close()
        await aclient.close()
        await rconn.aclose()


def measure_async_reads(address: str, redis_port: int, rows: int, s: AsyncSettings) -> dict:
    """Both comparisons against the node at ``address`` and the packed-rows Redis on
    ``redis_port`` (both holding the benchmark's table of ``rows`` rows); latencies in
    µs, rates in calls/s, ratios against the targets."""
    return uvloop.run(_measure(address, redis_port, rows, s))


def render_async_reads(m: dict[str, Any]) -> str:
    """The section's two tables, as text."""
    lines = [
        "AsyncClient against Client, one caller, all 33 features into NumPy, p50 µs "
        "(medians of alternating rounds):",
        "",
        "| keys | Client | AsyncClient | ratio | target |",
        "|---:|---:|---:|---:|---|",
    ]
    for b, cell in m["latency"].items():
        verdict = "met" if cell["met"] else "NOT met"
        lines.append(
            f"| {b} | {cell['Client']['p50_us']:.0f} | {cell['AsyncClient']['p50_us']:.0f} "
            f"| {cell['ratio_p50']:.2f}x | <= {m['target_latency_ratio']}x: {verdict} |"
        )
    t = m["throughput"]
    verdict = "met" if t["met"] else "NOT met"
    lines += [
        "",
        f"{t['tasks']} tasks on one uvloop loop, {t['keys']} keys per call into NumPy: "
        "AsyncClient against redis.asyncio (hiredis) MGET of the same rows:",
        "",
        "| system | calls/s | p50 µs | p99 µs |",
        "|---|---:|---:|---:|",
    ]
    for name in ("kvstore", "redis"):
        c = t[name]
        lines.append(f"| {name} | {c['calls_per_s']:.0f} | {c['p50_us']:.0f} | {c['p99_us']:.0f} |")
    lines.append(
        f"\nkvstore / redis calls/s: {t['ratio']:.2f}x "
        f"(target >= {m['target_throughput_ratio']}x: {verdict})"
    )
    return "\n".join(lines)
