"""Freshness and updates (issue 4): update → readable, update rows/s, reads under updates.

Runs against the bulk-loaded benchmark table, after the read sections, so that the
updates land in the delta over the bulk base, as a streaming job's would. Every
update sets a few features (``UPDATE_FEATURES``) of existing keys, event time now.

* **Freshness**: a writer (this process) and a poller (a client process) share the
  machine's monotonic clock (``time.monotonic_ns``, CLOCK_MONOTONIC, the same in
  every process). For each update the poller is told the key and the new value,
  reads the key once (it must not see the value yet), says it is polling, and then
  calls ``get`` on that key back to back until it sees the value; the writer takes
  its clock, sends the update (``client.write`` of one row), and the poller's clock
  reading when the value first showed up, minus the writer's, is the freshness of
  that update. Its resolution is one poll (a 1-key ``get``), reported beside it.
* **Update throughput**: one client process sending batches of ``BATCH_ROWS`` rows
  back to back for a window, unary (``client.write``, one batch per call) and
  streaming (``update_stream``, ``max_in_flight`` batches awaiting their ack);
  rows/s = rows acknowledged / (last ack - first send).
* **Reads under updates**: 100-key ``get`` latency from this process, first with no
  update running, then while a streaming producer process sends updates at half of
  the streaming rate just measured (paced per batch). Beside each window, as
  diagnostics that change nothing measured: the shares of the window the node's main
  thread (its event loop) and the reader ran and waited for a core (/proc schedstat),
  and the machine's busy cores, which say whether a busy p99 is the loop's work or the
  cores.
* **Redis beside it** (issue 17, part 4; ``measure_redis_reads_under_updates``):
  the same on the bench's Redis hashes: the maximum rate of one producer process
  sending pipelines of ``BATCH_ROWS`` HSETs of the same 4 fields, 16 in flight, then
  100-key HGETALL reads idle and while a producer sends at half that, paced per batch.

``python -m loadtests.updates`` runs the section alone (a node and a redis-server of
its own, ``--rows`` rows loaded); ``--help``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtests.servers import machine_busy_seconds, proc_cpu_seconds
from loadtests.systems import TABLE

__all__ = [
    "UpdateSettings",
    "measure_redis_reads_under_updates",
    "measure_updates",
]

UPDATE_FEATURES = ["f00", "f01", "f02", "f03"]
BATCH_ROWS = 1000
#: Targets of issue 4, printed beside the measurements.
TARGET_FRESHNESS_P99_MS = 10.0
TARGET_STREAM_ROWS_PER_S = 100_000
#: Target of issue 17 (part 4): 100-key read p99 under updates / idle p99.
TARGET_READ_P99_RATIO = 1.5
#: Keys per lookup for the reads-under-updates measurement.
READ_BATCH = 100
#: A poller gives up on one update after this long, seconds.
POLL_TIMEOUT_S = 10.0
#: Distinct precomputed update batches a producer cycles through.
PRODUCER_BATCHES = 64


@dataclass
class UpdateSettings:
    """How long and how much; times in seconds."""

    freshness_updates: int = 300
    throughput_window_s: float = 5.0
    read_window_s: float = 6.0
    max_in_flight: int = 16


# -- freshness --------------------------------------------------------------------------


def _poller_main(address: str, conn: Any) -> None:
    """The second client: for each (key, value) received, poll ``get`` until it shows."""
    from kvstore import Client

    client = Client(address, timeout=30.0)
    try:
        while (msg := conn.recv()) is not None:
            key, value = msg
            keys = np.array([key], np.int64)
            first = client.get(TABLE, keys, ["f00"]).to_numpy()["f00"][0]
            if first == value:
                conn.send(("error", f"key {key} already holds {value} before the update"))
                continue
            conn.send("polling")
            polls = 0
            poll_ns = []
            deadline = time.monotonic_ns() + int(POLL_TIMEOUT_S * 1e9)
            while True:
                t0 = time.monotonic_ns()
                got = client.get(TABLE, keys, ["f00"]).to_numpy()["f00"][0]
                t1 = time.monotonic_ns()
                polls += 1
                poll_ns.append(t1 - t0)
                if got == value:
                    # the value was there when the node answered: at most t1
                    conn.send(("seen", t1, polls, int(np.median(poll_ns))))
                    break
                if t1 > deadline:
                    conn.send(("error", f"key {key}: {value} not visible after {POLL_TIMEOUT_S} s"))
                    break
    finally:
        client.close()


def measure_freshness(address: str, rows: int, n: int, seed: int) -> dict:
    """Send→visible latency of ``n`` one-row updates, each seen by another client process."""
    from kvstore import Client

    ctx = mp.get_context("forkserver")
    parent, child = ctx.Pipe()
    poller = ctx.Process(target=_poller_main, args=(address, child), daemon=True)
    poller.start()
    rng = np.random.default_rng([seed, 41])
    keys = rng.choice(rows, size=n, replace=False).astype(np.int64)
    fresh_ns: list[int] = []
    ack_ns: list[int] = []
    polls: list[int] = []
    poll_rtt_ns: list[int] = []
    client = Client(address, timeout=30.0)
    try:
        # warm-up: connections and code paths on both sides
        for i in range(min(20, n)):
            _one_update(client, parent, int(keys[i]), np.float32(-1000.0 - i))
        for i in range(n):
            value = np.float32(1000.0 + i + 0.25)
            seen, sent, acked, npolls, rtt = _one_update(client, parent, int(keys[i]), value)
            fresh_ns.append(seen - sent)
            ack_ns.append(acked - sent)
            polls.append(npolls)
            poll_rtt_ns.append(rtt)
    finally:
        client.close()
        parent.send(None)
        poller.join(10)
        if poller.is_alive():
            poller.kill()
    fresh = np.asarray(fresh_ns) / 1e6
    ack = np.asarray(ack_ns) / 1e6
    return {
        "updates": n,
        "p50_ms": float(np.percentile(fresh, 50)),
        "p99_ms": float(np.percentile(fresh, 99)),
        "max_ms": float(fresh.max()),
        "mean_ms": float(fresh.mean()),
        "write_ack_p50_ms": float(np.percentile(ack, 50)),
        "write_ack_p99_ms": float(np.percentile(ack, 99)),
        "poll_rtt_p50_ms": float(np.median(poll_rtt_ns)) / 1e6,
        "polls_p50": float(np.median(polls)),
        "target_p99_ms": TARGET_FRESHNESS_P99_MS,
        "samples_ms": fresh.round(4).tolist(),
    }


def _one_update(client: Any, conn: Any, key: int, value: np.float32) -> tuple[int, ...]:
    conn.send((key, float(value)))
    msg = conn.recv()
    if msg != "polling":
        raise RuntimeError(f"freshness poller: {msg[1]}")
    sent = time.monotonic_ns()
    client.write(TABLE, {"key": np.array([key], np.int64), "f00": np.array([value], np.float32)})
    acked = time.monotonic_ns()
    reply = conn.recv()
    if reply[0] != "seen":
        raise RuntimeError(f"freshness poller: {reply[1]}")
    return reply[1], sent, acked, reply[2], reply[3]


# -- update producers ---------------------------------------------------------------------


def _batches(seed: int, rows: int, index: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng([seed, 43, index])
    out = []
    for _ in range(PRODUCER_BATCHES):
        batch = {"key": rng.choice(rows, size=BATCH_ROWS, replace=False).astype(np.int64)}
        for name in UPDATE_FEATURES:
            batch[name] = rng.random(BATCH_ROWS, dtype=np.float32)
        out.append(batch)
    return out


def _producer_main(
    address: str,
    mode: str,
    rows: int,
    seed: int,
    rate: float,
    max_in_flight: int,
    conn: Any,
) -> None:
    """Send update batches until told to stop; ``rate`` rows/s (0 = as fast as possible).

    Protocol (``_paced_sends``): sends "ready" once warmed up, waits for "go", sends
    "started", runs until "stop" (or 10 min), then reports its figures.
    """
    from kvstore import Client

    batches = _batches(seed, rows, 0 if mode == "unary" else 1)
    client = Client(address, timeout=60.0)
    stream = client.update_stream(TABLE, max_in_flight=max_in_flight) if mode != "unary" else None
    try:
        if stream is None:
            _paced_sends(conn, mode, batches, lambda b: client.write(TABLE, b), rate)
        else:
            _paced_sends(
                conn,
                mode,
                batches,
                stream.send,
                rate,
                flush=lambda: stream.flush(timeout=120),
                rows_acked=lambda: stream.rows_acked,
            )
    except Exception as exc:  # reported to the parent, which raises it
        conn.send({"error": f"{mode} producer: {exc!r}"})
    finally:
        if stream is not None:
            stream.close()
        client.close()


def _paced_sends(
    conn: Any,
    mode: str,
    batches: list,
    send: Callable[[Any], Any],
    rate: float,
    flush: Callable[[], Any] = lambda: None,
    rows_acked: Callable[[], int] | None = None,
    wait: Callable[[float], Any] = time.sleep,
) -> None:
    """A producer process's protocol and figures, for kvstore's and Redis's: ``send``
    4 batches and ``flush`` (warm-up), send "ready", wait for "go", send "started",
    then ``send`` batches (``BATCH_ROWS`` rows each) paced to ``rate`` rows/s (0 = as
    fast as possible; ``wait(s)`` between them) until "stop" (or 10 min), ``flush``,
    and send the figures. ``rows_acked``: the rows acknowledged so far (None: every
    sent row, acknowledged by its ``send``)."""
    for b in batches[:4]:  # warm-up
        send(b)
    flush()
    acked0 = rows_acked() if rows_acked is not None else 0
    conn.send("ready")
    conn.recv()  # "go"
    conn.send("started")
    cpu0 = time.process_time()
    start = time.monotonic_ns()
    sent = 0
    call_ns: list[int] = []
    late_ns = 0
    deadline = start + int(600e9)
    i = 0
    while not conn.poll():
        if rate > 0:
            due = start + int(sent / rate * 1e9)
            now = time.monotonic_ns()
            if due > now:
                wait((due - now) / 1e9)
            else:
                late_ns = max(late_ns, now - due)
        b = batches[i % PRODUCER_BATCHES]
        i += 1
        t0 = time.monotonic_ns()
        send(b)
        call_ns.append(time.monotonic_ns() - t0)
        sent += BATCH_ROWS
        if t0 > deadline:
            break
    send_end = time.monotonic_ns()
    flush()
    end = time.monotonic_ns()
    acked = rows_acked() - acked0 if rows_acked is not None else sent
    conn.recv()  # "stop"
    conn.send(
        {
            "mode": mode,
            "rows": acked,
            "rows_sent": sent,
            "batches": i,
            "seconds": (end - start) / 1e9,
            "flush_s": (end - send_end) / 1e9,
            "rows_per_s": acked / ((end - start) / 1e9),
            "call_p50_ms": float(np.percentile(call_ns, 50)) / 1e6 if call_ns else 0.0,
            "call_p99_ms": float(np.percentile(call_ns, 99)) / 1e6 if call_ns else 0.0,
            "max_behind_schedule_ms": late_ns / 1e6,
            "cpu_s": time.process_time() - cpu0,
            "start_ns": start,
            "end_ns": end,
        }
    )


class Producer:
    """An update producer process (``_producer_main``), as a context manager."""

    def __init__(self, address: str, mode: str, rows: int, seed: int, rate: float, mif: int):
        ctx = mp.get_context("forkserver")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_producer_main,
            args=(address, mode, rows, seed, rate, mif, child),
            daemon=True,
            name=f"bench-updates-{mode}",
        )

    def __enter__(self) -> Producer:
        self.proc.start()
        msg = self._recv(120)
        if msg != "ready":
            raise RuntimeError(msg["error"] if isinstance(msg, dict) else str(msg))
        self.conn.send("go")
        if self._recv(30) != "started":
            raise RuntimeError("update producer did not start")
        return self

    def _recv(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"update producer {self.proc.name} did not answer")
        return self.conn.recv()

    def stop(self) -> dict:
        self.conn.send("stop")
        result = self._recv(180)
        if "error" in result:
            raise RuntimeError(result["error"])
        return result

    def __exit__(self, *exc: object) -> None:
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def measure_update_rate(
    address: str, node_pid: int, rows: int, seed: int, mode: str, window_s: float, mif: int
) -> dict:
    """Update rows/s of one producer process, ``mode`` "unary" or "stream", for ``window_s``."""
    with Producer(address, mode, rows, seed, 0.0, mif) as producer:
        node0, machine0, wall0 = (
            proc_cpu_seconds(node_pid),
            machine_busy_seconds(),
            time.monotonic(),
        )
        time.sleep(window_s)  # the measuring window: the producer runs meanwhile
        result = producer.stop()
        wall = time.monotonic() - wall0
        result["node_cpu_cores"] = (proc_cpu_seconds(node_pid) - node0) / wall
        result["machine_cpu_cores"] = (machine_busy_seconds() - machine0) / wall
        result["client_cpu_cores"] = result["cpu_s"] / result["seconds"]
    return result


def _main_thread_times(pid: int) -> tuple[float, float]:
    """(run, runqueue wait) of process ``pid``'s main thread so far, in seconds, from
    /proc/PID/task/PID/schedstat: the time it ran, and the time it was ready to run but
    waited for a core. (0, 0) where the kernel does not keep them."""
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
            run_ns, wait_ns, _ = f.read().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def _this_thread_times() -> tuple[float, float]:
    """(run, runqueue wait) of the calling thread so far, in seconds (as
    ``_main_thread_times``); (0, 0) where the kernel does not keep them."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            run_ns, wait_ns, _ = f.read().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


class _Window:
    """Diagnostics of one read window, beside its latencies: the node's main thread (the
    event loop that serves reads and runs write steps) as shares of the window's wall
    time, running and waiting for a core, the same for the reader (the thread that
    makes the window and times the reads in it), and the machine's busy cores. A main
    thread near 1.0 running + waiting is saturated: reads queue behind whatever it
    runs. A reader that waits for a core sees its answers late however fast the node
    is: on 2 cores its wake-ups queue behind the node's loop or the update producer."""

    def __init__(self, node_pid: int) -> None:
        self.node_pid = node_pid
        self.wall = time.monotonic()
        self.main = _main_thread_times(node_pid)
        self.reader = _this_thread_times()
        self.machine = machine_busy_seconds()

    def end(self) -> dict:
        wall = time.monotonic() - self.wall
        run, wait = _main_thread_times(self.node_pid)
        reader_run, reader_wait = _this_thread_times()
        return {
            "node_main_thread_running": (run - self.main[0]) / wall,
            "node_main_thread_waiting_for_a_core": (wait - self.main[1]) / wall,
            "reader_running": (reader_run - self.reader[0]) / wall,
            "reader_waiting_for_a_core": (reader_wait - self.reader[1]) / wall,
            "machine_busy_cores": (machine_busy_seconds() - self.machine) / wall,
        }


def _read_latencies(address: str, rows: int, seed: int, seconds: float) -> dict:
    """100-key gets from kvstore for ``seconds`` (``_timed_lookups``)."""
    from loadtests.systems import KvstoreReader

    return _timed_lookups(KvstoreReader(address), rows, seed, seconds)


def _timed_lookups(reader: Any, rows: int, seed: int, seconds: float) -> dict:
    """``reader.lookup`` of ``READ_BATCH`` random existing keys back to back for
    ``seconds`` (after 50 untimed); its latencies' p50, p99 and mean. Closes ``reader``."""
    from loadtests.systems import KeyPool

    rng = np.random.default_rng([seed, 47])
    pool = KeyPool.of(rng.integers(0, rows, size=(2000, READ_BATCH), dtype=np.int64))
    try:
        for j in range(50):  # warm-up
            reader.lookup(pool.ints[j], pool.names[j])
        lat = []
        deadline = time.monotonic_ns() + int(seconds * 1e9)
        j = 0
        while True:
            k = j % len(pool)
            t0 = time.perf_counter_ns()
            reader.lookup(pool.ints[k], pool.names[k])
            lat.append(time.perf_counter_ns() - t0)
            j += 1
            if time.monotonic_ns() > deadline:
                break
    finally:
        reader.close()
    ms = np.asarray(lat) / 1e6
    return {
        "count": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def measure_reads_under_updates(
    address: str, node_pid: int, rows: int, seed: int, rate: float, window_s: float, mif: int
) -> dict:
    """100-key read latency without updates, then with a producer at ``rate`` rows/s.

    Each window also reports, as diagnostics (``_Window``), the node's main thread's
    running and waiting shares and the machine's busy cores."""
    window = _Window(node_pid)
    idle = _read_latencies(address, rows, seed, window_s)
    idle.update(window.end())
    with Producer(address, "stream", rows, seed + 1, rate, mif) as producer:
        node0, wall0 = proc_cpu_seconds(node_pid), time.monotonic()
        window = _Window(node_pid)
        busy = _read_latencies(address, rows, seed + 1, window_s)
        busy.update(window.end())
        node_cores = (proc_cpu_seconds(node_pid) - node0) / (time.monotonic() - wall0)
        updates = producer.stop()
    return {
        "read_batch": READ_BATCH,
        "no_updates": idle,
        "under_updates": busy,
        "update_rate_target_rows_per_s": rate,
        "updates": updates,
        "node_cpu_cores": node_cores,
        "p99_ratio": busy["p99_ms"] / idle["p99_ms"],
        "target_p99_ratio": TARGET_READ_P99_RATIO,
    }


def measure_updates(
    address: str, node_pid: int, rows: int, seed: int, u: UpdateSettings, redis: Any = None
) -> dict:
    """The whole section; prints a line per part. ``redis`` (a ``RedisServer`` holding the
    rows as hashes, or None) adds Redis's reads under updates beside kvstore's
    (``measure_redis_reads_under_updates``)."""
    out: dict[str, Any] = {"features": UPDATE_FEATURES, "batch_rows": BATCH_ROWS}
    f = measure_freshness(address, rows, u.freshness_updates, seed)
    out["freshness"] = f
    print(
        f"  freshness over {f['updates']} updates: p50 {f['p50_ms']:.2f} ms, p99 "
        f"{f['p99_ms']:.2f} ms (write ack p50 {f['write_ack_p50_ms']:.2f} ms, one poll "
        f"{f['poll_rtt_p50_ms']:.2f} ms)",
        flush=True,
    )
    for mode in ("unary", "stream"):
        r = measure_update_rate(
            address, node_pid, rows, seed, mode, u.throughput_window_s, u.max_in_flight
        )
        out[mode] = r
        print(
            f"  {mode} updates: {r['rows_per_s']:,.0f} rows/s over {r['seconds']:.1f} s "
            f"(node {r['node_cpu_cores']:.2f} cores, producer {r['client_cpu_cores']:.2f})",
            flush=True,
        )
    out["stream"]["max_in_flight"] = u.max_in_flight
    out["stream"]["target_rows_per_s"] = TARGET_STREAM_ROWS_PER_S
    rate = out["stream"]["rows_per_s"] / 2
    r = measure_reads_under_updates(
        address, node_pid, rows, seed, rate, u.read_window_s, u.max_in_flight
    )
    out["reads_under_updates"] = r
    idle, busy = r["no_updates"], r["under_updates"]
    print(
        f"  {READ_BATCH}-key reads: p99 {idle['p99_ms']:.2f} ms without updates, "
        f"{busy['p99_ms']:.2f} ms with {r['updates']['rows_per_s']:,.0f} update rows/s: "
        f"{r['p99_ratio']:.2f}x (target <= {TARGET_READ_P99_RATIO}x); p50 "
        f"{idle['p50_ms']:.2f} -> {busy['p50_ms']:.2f} ms; node {r['node_cpu_cores']:.2f} cores",
        flush=True,
    )
    print(
        "  the node's main thread running / waiting for a core: "
        f"{idle['node_main_thread_running']:.2f} / "
        f"{idle['node_main_thread_waiting_for_a_core']:.2f} without updates, "
        f"{busy['node_main_thread_running']:.2f} / "
        f"{busy['node_main_thread_waiting_for_a_core']:.2f} with them; machine busy "
        f"{idle['machine_busy_cores']:.2f} -> {busy['machine_busy_cores']:.2f} cores",
        flush=True,
    )
    print(
        "  the reader running / waiting for a core: "
        f"{idle['reader_running']:.2f} / {idle['reader_waiting_for_a_core']:.2f} without "
        f"updates, {busy['reader_running']:.2f} / {busy['reader_waiting_for_a_core']:.2f} "
        f"with them; the producer {r['updates']['cpu_s'] / r['updates']['seconds']:.2f} "
        "cores",
        flush=True,
    )
    if redis is not None:
        rr = measure_redis_reads_under_updates(
            redis.port,
            redis.pid,
            rows,
            seed,
            u.throughput_window_s,
            u.read_window_s,
            u.max_in_flight,
        )
        rr["kvstore_p99_ratio"] = r["p99_ratio"]  # the two side by side in the JSON too
        out["redis_reads_under_updates"] = rr
        print_redis_reads_under_updates(rr, r["p99_ratio"])
    return out


# -- Redis beside it: the peer's reads under updates (issue 17, part 4) ----------------
#
# The same measurement on Redis, as the bench sets it up (redis-py on hiredis,
# ``loadtests/redis_client.py``; the bench's "redis-hash" server): a Redis user updates
# 4 features of a row with HSET of 4 fields on the entity's hash (the packed layout
# cannot be updated in part without reading the row back), so the producer sends
# HSETs and the reader reads those hashes (``RedisHashReader``: pipelined HGETALL).


def _redis_commands(seed: int, rows: int, index: int) -> list[list[tuple]]:
    """``_batches(seed, rows, index)`` (the same keys and values as kvstore's producer)
    as HSET commands: one per row, its 4 features as 4-byte float32 fields."""
    from loadtests.systems import redis_key

    out = []
    for batch in _batches(seed, rows, index):
        columns = [(name.encode(), batch[name].tobytes()) for name in UPDATE_FEATURES]
        commands = []
        for i, key in enumerate(batch["key"].tolist()):
            args: list[bytes] = [b"HSET", redis_key(key)]
            for field, values in columns:
                args += [field, values[4 * i : 4 * i + 4]]
            commands.append(tuple(args))
        out.append(commands)
    return out


class _RedisPipelines:
    """Pipelines of HSETs on one redis-py connection (hiredis parser), up to ``window``
    of them sent and not yet answered: redis-py's ``Pipeline.execute`` sends one and
    waits for its replies; this sends with the connection's own ``pack_commands`` and
    ``send_packed_command`` (what ``execute`` does) and reads the replies later, the
    way ``update_stream`` keeps ``max_in_flight`` batches awaiting their ack."""

    def __init__(self, port: int, window: int) -> None:
        from loadtests.redis_client import connect

        self.client = connect(port)
        self.conn = self.client.connection_pool.get_connection()
        self.window = max(1, window)
        self.in_flight: list[int] = []  # replies awaited, per pipeline, oldest first
        self.rows_acked = 0

    def send(self, commands: list[tuple]) -> None:
        """Send one pipeline, after reading the oldest one's replies if the window is full."""
        while len(self.in_flight) >= self.window:
            self._read_oldest()
        self.conn.send_packed_command(self.conn.pack_commands(commands))
        self.in_flight.append(len(commands))

    def _read_oldest(self) -> None:
        n = self.in_flight.pop(0)
        for _ in range(n):
            reply = self.conn.read_response()
            if isinstance(reply, Exception):
                raise reply
        self.rows_acked += n

    def read_ready(self, timeout_s: float) -> None:
        """Read the replies of pipelines whose replies arrive within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight:
            left = deadline - time.monotonic()
            if not self.conn.can_read(timeout=max(0.0, left)):
                return
            self._read_oldest()

    def wait(self, seconds: float) -> None:
        """Wait ``seconds``, reading the replies that arrive meanwhile (as a stream's
        acks are)."""
        end = time.monotonic() + seconds
        self.read_ready(seconds)
        left = end - time.monotonic()
        if left > 0:
            time.sleep(left)

    def flush(self) -> None:
        while self.in_flight:
            self._read_oldest()

    def close(self) -> None:
        self.client.connection_pool.release(self.conn)
        self.client.close()


def _redis_producer_main(
    port: int, rows: int, seed: int, rate: float, window: int, conn: Any
) -> None:
    """``_producer_main`` for Redis: the same protocol, pacing and figures
    (``_paced_sends``); a batch is a pipeline of ``BATCH_ROWS`` HSETs
    (``_redis_commands``), ``window`` in flight, their replies read while it waits."""
    batches = _redis_commands(seed, rows, 1)
    pipes = None
    try:
        pipes = _RedisPipelines(port, window)
        _paced_sends(
            conn,
            "redis-hset-pipelines",
            batches,
            pipes.send,
            rate,
            flush=pipes.flush,
            rows_acked=lambda: pipes.rows_acked,
            wait=pipes.wait,
        )
    except Exception as exc:  # reported to the parent, which raises it
        conn.send({"error": f"redis producer: {exc!r}"})
    finally:
        if pipes is not None:
            pipes.close()


class RedisProducer(Producer):
    """A Redis update producer process (``_redis_producer_main``), as a context manager."""

    def __init__(self, port: int, rows: int, seed: int, rate: float, window: int):
        ctx = mp.get_context("forkserver")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_redis_producer_main,
            args=(port, rows, seed, rate, window, child),
            daemon=True,
            name="bench-updates-redis",
        )


def _redis_read_latencies(port: int, rows: int, seed: int, seconds: float) -> dict:
    """``_read_latencies`` on Redis: 100-key reads of the hashes (pipelined HGETALL)."""
    from loadtests.redis_client import connect
    from loadtests.systems import RedisHashReader

    return _timed_lookups(RedisHashReader(connect(port)), rows, seed, seconds)


def _redis_window(server_pid: int) -> Any:
    """``_Window`` on the redis-server process (its main thread runs every command), and
    the same shares of this process's main thread, the reader: a read that waited for a
    core is the machine's doing, not the server's. Returns the function ending it."""
    window = _Window(server_pid)
    reader = _main_thread_times(os.getpid())

    def end() -> dict:
        d = _Window.end(window)
        run, wait = _main_thread_times(os.getpid())
        wall = time.monotonic() - window.wall
        return {
            "redis_main_thread_running": d["node_main_thread_running"],
            "redis_main_thread_waiting_for_a_core": d["node_main_thread_waiting_for_a_core"],
            "reader_running": (run - reader[0]) / wall,
            "reader_waiting_for_a_core": (wait - reader[1]) / wall,
            "machine_busy_cores": d["machine_busy_cores"],
        }

    return end


def measure_redis_reads_under_updates(
    port: int,
    server_pid: int,
    rows: int,
    seed: int,
    rate_window_s: float,
    read_window_s: float,
    max_in_flight: int,
) -> dict:
    """Redis's floor beside ``measure_reads_under_updates``: its maximum HSET rate from
    one producer process over ``rate_window_s``, then 100-key reads of the hashes for
    ``read_window_s`` idle and while a producer sends at half that rate, paced per batch
    like kvstore's. Each read window also reports (``_Window`` on the redis-server) its
    main thread's running and waiting shares and the machine's busy cores."""
    with RedisProducer(port, rows, seed, 0.0, max_in_flight) as producer:
        cpu0, machine0, wall0 = (
            proc_cpu_seconds(server_pid),
            machine_busy_seconds(),
            time.monotonic(),
        )
        time.sleep(rate_window_s)  # the measuring window: the producer runs meanwhile
        top = producer.stop()
        wall = time.monotonic() - wall0
        top["redis_cpu_cores"] = (proc_cpu_seconds(server_pid) - cpu0) / wall
        top["machine_cpu_cores"] = (machine_busy_seconds() - machine0) / wall
        top["client_cpu_cores"] = top["cpu_s"] / top["seconds"]
    top["max_in_flight"] = max_in_flight
    rate = top["rows_per_s"] / 2
    end = _redis_window(server_pid)
    idle = _redis_read_latencies(port, rows, seed, read_window_s)
    idle.update(end())
    with RedisProducer(port, rows, seed + 1, rate, max_in_flight) as producer:
        cpu0, wall0 = proc_cpu_seconds(server_pid), time.monotonic()
        end = _redis_window(server_pid)
        busy = _redis_read_latencies(port, rows, seed + 1, read_window_s)
        busy.update(end())
        redis_cores = (proc_cpu_seconds(server_pid) - cpu0) / (time.monotonic() - wall0)
        updates = producer.stop()
    return {
        "layout": "redis-hash: HSET of 4 fields per row, 100-key reads by pipelined HGETALL",
        "read_batch": READ_BATCH,
        "max_stream": top,
        "no_updates": idle,
        "under_updates": busy,
        "update_rate_target_rows_per_s": rate,
        "updates": updates,
        "redis_cpu_cores": redis_cores,
        "p99_ratio": busy["p99_ms"] / idle["p99_ms"],
        "target_p99_ratio": TARGET_READ_P99_RATIO,
    }


def print_redis_reads_under_updates(r: dict, kvstore_ratio: float | None) -> None:
    """The Redis lines of the section's printout, kvstore's ratio beside Redis's."""
    top, idle, busy = r["max_stream"], r["no_updates"], r["under_updates"]
    beside = f" (kvstore {kvstore_ratio:.2f}x)" if kvstore_ratio is not None else ""
    print(
        f"  Redis (hash, {BATCH_ROWS}-HSET pipelines, {top['max_in_flight']} in flight): "
        f"{top['rows_per_s']:,.0f} rows/s at most (redis-server {top['redis_cpu_cores']:.2f} "
        f"cores, producer {top['client_cpu_cores']:.2f})",
        flush=True,
    )
    print(
        f"  Redis {READ_BATCH}-key reads (HGETALL): p99 {idle['p99_ms']:.2f} ms without "
        f"updates, {busy['p99_ms']:.2f} ms with {r['updates']['rows_per_s']:,.0f} update "
        f"rows/s: {r['p99_ratio']:.2f}x{beside}; p50 {idle['p50_ms']:.2f} -> "
        f"{busy['p50_ms']:.2f} ms; redis-server {r['redis_cpu_cores']:.2f} cores, its main "
        f"thread running {idle['redis_main_thread_running']:.2f} -> "
        f"{busy['redis_main_thread_running']:.2f}, the reader waiting for a core "
        f"{idle['reader_waiting_for_a_core']:.2f} -> {busy['reader_waiting_for_a_core']:.2f}; "
        "machine busy "
        f"{idle['machine_busy_cores']:.2f} -> {busy['machine_busy_cores']:.2f} cores",
        flush=True,
    )


# -- the section alone: python -m loadtests.updates -------------------------------------


def run_section(rows: int, seed: int, u: UpdateSettings, with_kvstore: bool = True) -> dict:
    """Start a kvstore node and a redis-server (loadtests/servers.py) in a temporary
    directory, load ``rows`` rows the way the bench does (Redis: pipelined HSET of each
    hash; kvstore: bulk load of a zstd Parquet file of the same rows), wait for both to
    settle, and run the section (kvstore's parts unless ``with_kvstore`` is False, then
    Redis's reads under updates)."""
    import tempfile
    from contextlib import ExitStack
    from pathlib import Path

    from loadtests.bench import LOAD_CHUNK_ROWS, bulk_load
    from loadtests.bulkload import ParquetSink
    from loadtests.servers import (
        SETTLE_TIMEOUT_S,
        KvstoreNode,
        RedisServer,
        wait_until_idle,
    )
    from loadtests.systems import Chunk, KvstoreSystem, RedisHashSystem

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvupdates-")))
        (work / "redis-hash").mkdir()
        redis_server = stack.enter_context(RedisServer(work / "redis-hash"))
        node = stack.enter_context(KvstoreNode(work)) if with_kvstore else None
        hashed = RedisHashSystem(redis_server)
        stack.callback(hashed.close)
        sink = ParquetSink(work / "bench_features.parquet") if node is not None else None
        print(f"loading {rows:,} rows (Redis hashes, pipelined HSET; Parquet)", flush=True)
        for lo in range(0, rows, LOAD_CHUNK_ROWS):
            chunk = Chunk.generate(seed, lo, min(lo + LOAD_CHUNK_ROWS, rows))
            hashed.load(chunk)
            if sink is not None:
                sink.write(chunk)
        pids = [redis_server.pid]
        if node is not None:
            assert sink is not None
            kv = KvstoreSystem(node.address, node.pid)
            stack.callback(kv.close)
            kv.create()
            bulk_load(kv, node, TABLE, sink.close(), work, rows)
            pids.append(node.pid)
        wait_until_idle(pids, SETTLE_TIMEOUT_S)
        machine0, wall0 = machine_busy_seconds(), time.monotonic()
        if node is not None:
            print("freshness and updates (kvstore; updates set 4 features of existing keys)")
            out = measure_updates(node.address, node.pid, rows, seed, u, redis=redis_server)
        else:
            rr = measure_redis_reads_under_updates(
                redis_server.port,
                redis_server.pid,
                rows,
                seed,
                u.throughput_window_s,
                u.read_window_s,
                u.max_in_flight,
            )
            print_redis_reads_under_updates(rr, None)
            out = {"redis_reads_under_updates": rr}
        out["machine_busy_cores"] = (machine_busy_seconds() - machine0) / (time.monotonic() - wall0)
        out["settings"] = {"rows": rows, "seed": seed, **u.__dict__}
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m loadtests.updates``: the section alone (``run_section``)."""
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(
        prog="python -m loadtests.updates",
        description=(
            "The bench's freshness and updates section alone, Redis's reads under updates "
            "beside kvstore's: starts a kvstore node and a redis-server, loads --rows rows "
            "into both (kvstore by bulk load, Redis as hashes), then measures."
        ),
    )
    p.add_argument("--rows", type=int, default=100_000, help="rows loaded (default 100000)")
    p.add_argument("--seed", type=int, default=20261123)
    p.add_argument("--freshness-updates", type=int, default=100, help="default 100")
    p.add_argument(
        "--rate-window", type=float, default=5.0, help="s of each max-rate window (default 5)"
    )
    p.add_argument(
        "--read-window", type=float, default=6.0, help="s of each read window (default 6)"
    )
    p.add_argument("--max-in-flight", type=int, default=16, help="batches in flight (16)")
    p.add_argument("--redis-only", action="store_true", help="no kvstore node: Redis's part alone")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    u = UpdateSettings(
        freshness_updates=args.freshness_updates,
        throughput_window_s=args.rate_window,
        read_window_s=args.read_window,
        max_in_flight=args.max_in_flight,
    )
    out = run_section(args.rows, args.seed, u, with_kvstore=not args.redis_only)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
