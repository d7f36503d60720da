"""make bench's replica step (issue 16): reads of a table with 2 replicas per shard while
one of 3 nodes is killed or hangs, and write throughput with R = 1, 2 and 3.

On a cluster of 3 node processes on a real etcd (``loadtests.servers``'s
``running_cluster``):

1. **Reads**: ``readers`` client processes look up 100 random existing keys back to
   back; p50/p99 and failed reads per phase: idle; while one node is killed with
   SIGKILL (and restarted after); while one node is stopped with SIGSTOP (then
   SIGCONT), once with hedging on and once off (``HedgePolicy(enabled=False)``), so
   the hedge's effect shows. Each phase is its own window of ``window_s``.
2. **Writes**: one client writes batches of ``write_batch`` rows for ``window_s`` to
   a table with R = 1, 2, 3 replicas: rows/s of each, and R = 2 against R = 1.
3. **Catch-up**: one node is killed, updates of existing rows go on at
   ``update_rate`` rows/s for ``down_s`` (the rate reached and the batches not
   acknowledged are reported: until the dead node's lease lapses, a shard with R = 2
   has no quorum), then the node is restarted: seconds until it serves, and until the
   map shows every replica Available again (it caught up from its peers).

Targets (the issue's): during a kill, p99 <= 3x idle and 0 failed reads; during a
SIGSTOP with hedging, p99 <= 2x idle; writes with R = 2 at >= 60% of R = 1.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvstore import Client
from kvstore.client import HedgePolicy
from kvstore.server.process import wait_until
from loadtests.servers import replicas_available, running_cluster
from loadtests.shard_moves import cluster_map

__all__ = ["ReplicaSettings", "measure_replicas", "render_replicas"]

TABLE = "replica_bench"
FEATURES = {"score": "float32", "clicks": "int64", "emb": "float32[16]"}
TIMEOUT_S = 5.0
#: How long a node given back (restarted, continued) may take to be live and caught up.
RECOVER_TIMEOUT_S = 120.0
#: The issue's targets.
TARGET_KILL_P99 = 3.0
TARGET_STOP_P99 = 2.0
TARGET_R2_WRITES = 0.6


@dataclass
class ReplicaSettings:
    """Reader processes, rows, keys per read, the window of each phase (s)."""

    readers: int = 8
    rows: int = 100_000
    batch: int = 100
    window_s: float = 5.0
    write_batch: int = 1000
    shards: int = 12
    seed: int = 20261206
    #: The catch-up phase: how long the node is down, and the updates meanwhile (rows/s).
    down_s: float = 10.0
    update_rate: int = 50_000

    @classmethod
    def quick(cls) -> ReplicaSettings:
        return cls(readers=4, rows=20_000, window_s=2.0, down_s=3.0, update_rate=10_000)


def _rows(keys: np.ndarray) -> dict:
    return {
        "key": keys,
        "score": keys.astype(np.float32),
        "clicks": keys * 3,
        "emb": np.ones((len(keys), 16), np.float32),
    }


def _reader(
    address: str,
    rows: int,
    batch: int,
    seconds: float,
    hedge: bool,
    seed: int,
    out: Any,
    go: Any,
) -> None:
    """A reader process: once ``go`` is set, reads for ``seconds``; sends (latencies in
    s, failures)."""
    rng = np.random.default_rng(seed)
    policy = HedgePolicy() if hedge else HedgePolicy(enabled=False)
    latencies: list[float] = []
    failures = 0
    with Client(address, timeout=TIMEOUT_S, hedging=policy) as client:
        client.get(TABLE, [0])
        out.put("ready")
        go.wait(120)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            keys = rng.integers(0, rows, batch, dtype=np.int64)
            start = time.monotonic()
            try:
                client.get(TABLE, keys)
            except Exception:  # a failed read is what this counts
                failures += 1
                continue
            latencies.append(time.monotonic() - start)
    out.put((latencies, failures))


def _read_phase(address: str, s: ReplicaSettings, hedge: bool, fault: Any = None) -> dict:
    """Readers for one window; ``fault()`` (then its undo) a quarter of the way in."""
    ctx = mp.get_context("spawn")
    out, go = ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(
            target=_reader,
            args=(address, s.rows, s.batch, s.window_s, hedge, s.seed + i, out, go),
        )
        for i in range(s.readers)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        out.get(timeout=120)  # each reader has its schema and map
    # One window for all: a reader ready early would otherwise read (and send its
    # figures, taken here for a "ready") before the others, and before the fault.
    go.set()
    undo = None
    if fault is not None:
        time.sleep(s.window_s / 4)  # a duration of the benchmark, not a synchronisation
        undo = fault()
    results = [out.get(timeout=s.window_s + 120) for _ in procs]
    for p in procs:
        p.join(60)
    if undo is not None:
        undo()
    latencies = np.array([x for r in results for x in r[0]])
    # NaN when no read succeeded (as in shard_moves.py): the ratios and the text still form.
    p50, p99 = np.percentile(latencies, [50, 99]) * 1e3 if len(latencies) else (np.nan,) * 2
    return {
        "reads": len(latencies),
        "failed": int(sum(r[1] for r in results)),
        "p50_ms": float(p50),
        "p99_ms": float(p99),
    }


def _write_rate(address: str, table: str, s: ReplicaSettings) -> float:
    """Rows/s one client writes to ``table`` for ``window_s``."""
    rng = np.random.default_rng(s.seed)
    written = 0
    with Client(address, timeout=TIMEOUT_S) as client:
        start = time.monotonic()
        while time.monotonic() - start < s.window_s:
            keys = rng.integers(0, s.rows, s.write_batch, dtype=np.int64)
            written += client.write(table, _rows(keys))
        return written / (time.monotonic() - start)


def _catch_up(address: str, victim: Any, recovered: Any, s: ReplicaSettings) -> dict:
    """Kill ``victim``, update rows at ``update_rate`` for ``down_s``, restart it: the
    updates sent and acknowledged, and the seconds from the restart until it serves
    and until it has caught up (``recovered()`` returns)."""
    rng = np.random.default_rng(s.seed + 1)
    victim.kill()
    sent = acked = failed_batches = 0
    with Client(address, timeout=TIMEOUT_S) as client:
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < s.down_s:
            ahead = sent / s.update_rate - elapsed
            if ahead > 0:
                time.sleep(ahead)  # pacing the offered rate, not a synchronisation
            keys = rng.integers(0, s.rows, s.write_batch, dtype=np.int64)
            sent += len(keys)
            try:
                acked += client.write(TABLE, {"key": keys, "clicks": keys * 5})
            except Exception:  # not acknowledged: what this counts
                failed_batches += 1
        down = time.monotonic() - start
    before = cluster_map(address).epoch
    restarted = time.monotonic()
    victim.start()
    serving = time.monotonic() - restarted
    recovered(before)
    return {
        "down_s": down,
        "offered_rows_per_s": sent / down,
        "acked_rows": acked,
        "unacked_batches": failed_batches,
        "serving_s": serving,
        "caught_up_s": time.monotonic() - restarted,
    }


def measure_replicas(s: ReplicaSettings, workdir: Path) -> dict:
    """The whole step (see the module docstring); {"skipped": why} without etcd,
    {"error": what, "workdir": …} when a node did not come back in time (the rest of
    make bench goes on, as for the soak)."""
    if shutil.which("etcd") is None:
        return {"skipped": "etcd is not installed"}
    try:
        return _measure(s, workdir)
    except (RuntimeError, TimeoutError) as exc:
        return {"error": f"{exc}"[:2000], "workdir": str(workdir)}


def _measure(s: ReplicaSettings, workdir: Path) -> dict:
    out: dict[str, Any] = {"settings": asdict(s)}
    with running_cluster(workdir, 3) as cluster:
        nodes = list(cluster.nodes.values())
        address = nodes[0].address
        with Client(address, timeout=60) as client:
            client.create_table(TABLE, features=FEATURES, shards=s.shards, replicas=2)
            for part in np.array_split(np.arange(s.rows, dtype=np.int64), 20):
                client.write(TABLE, _rows(part))
        victim_id, victim = list(cluster.nodes.items())[-1]

        def recovered(after_epoch: int = 0) -> None:
            """Each phase starts on a whole cluster: a SIGSTOP past the lease (5 s) makes
            the node register again, and R = 3 cannot be placed on 2 live nodes."""
            what = f"{victim_id} to be live and caught up"
            wait_until(
                lambda: replicas_available(address, victim_id, TABLE, after_epoch),
                RECOVER_TIMEOUT_S,
                what,
            )

        out["idle"] = _read_phase(address, s, hedge=True)

        def kill() -> Any:
            victim.kill()
            return None

        out["kill"] = _read_phase(address, s, hedge=True, fault=kill)
        before = cluster_map(address).epoch
        victim.start()
        recovered(before)

        def stop() -> Any:
            os.kill(victim.pid, signal.SIGSTOP)
            return lambda: os.kill(victim.pid, signal.SIGCONT)

        out["sigstop_hedged"] = _read_phase(address, s, hedge=True, fault=stop)
        recovered()
        out["sigstop_unhedged"] = _read_phase(address, s, hedge=False, fault=stop)
        recovered()
        rates = {}
        with Client(address, timeout=60) as client:
            for r in (1, 2, 3):
                client.create_table(f"{TABLE}_r{r}", features=FEATURES, shards=s.shards, replicas=r)
        for r in (1, 2, 3):
            rates[r] = _write_rate(address, f"{TABLE}_r{r}", s)
        out["write_rows_per_s"] = rates
        out["catch_up"] = _catch_up(address, victim, recovered, s)
    idle = out["idle"]["p99_ms"]
    out["targets"] = {
        "kill_p99_ratio": out["kill"]["p99_ms"] / idle,
        "kill_failed_reads": out["kill"]["failed"],
        "sigstop_hedged_p99_ratio": out["sigstop_hedged"]["p99_ms"] / idle,
        "r2_write_ratio": rates[2] / rates[1],
    }
    return out


def render_replicas(res: dict) -> str:
    """The step's figures as text."""
    if "skipped" in res:
        return f"replicas: skipped ({res['skipped']})"
    if "error" in res:
        return f"replicas: did not finish ({res['error']}); node logs in {res['workdir']}"
    lines = ["replicas (3 nodes, R = 2): 100-key reads, p50 / p99 ms, failed reads"]
    for phase in ("idle", "kill", "sigstop_hedged", "sigstop_unhedged"):
        r = res[phase]
        lines.append(f"  {phase:<17} {r['p50_ms']:.2f} / {r['p99_ms']:.2f}  failed {r['failed']}")
    rates = res["write_rows_per_s"]
    lines.append("  writes, rows/s: " + ", ".join(f"R={r} {v:,.0f}" for r, v in rates.items()))
    c = res["catch_up"]
    lines.append(
        f"  catch-up: down {c['down_s']:.1f} s at {c['offered_rows_per_s']:,.0f} updates/s "
        f"offered ({c['acked_rows']:,} acked, {c['unacked_batches']} batches not acked); "
        f"restarted: serving in {c['serving_s']:.1f} s, caught up in {c['caught_up_s']:.1f} s"
    )
    t = res["targets"]
    lines.append(
        f"  targets: kill p99 {t['kill_p99_ratio']:.2f}x idle (<= {TARGET_KILL_P99}), "
        f"{t['kill_failed_reads']} failed (0); SIGSTOP hedged p99 "
        f"{t['sigstop_hedged_p99_ratio']:.2f}x (<= {TARGET_STOP_P99}); R=2 writes "
        f"{t['r2_write_ratio']:.0%} of R=1 (>= {TARGET_R2_WRITES:.0%})"
    )
    return "\n".join(lines)
