"""Locust load test of a kvstore node: YCSB-style workloads of batch reads and updates.

    make loadtest WORKLOAD=B DIST=zipfian BATCH=100 USERS=8 TIME=60s ROWS=100000

or, against a node that already holds the table (int64 keys 0..rows-1, float32
features f00..f31 and a float32[64] "emb", as ``make loadtest`` loads it):

    .venv/bin/python -m locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 60s \\
        --host 127.0.0.1:7070 --workload B --distribution zipfian --batch-size 100 \\
        --table loadtest_features --rows 100000

Locust's pattern for protocols other than HTTP: ``KvstoreLocustClient`` wraps
``kvstore.Client`` and fires ``events.request`` after each call, with its time in
ms. Each simulated user has its own client (its own gRPC channel and fast-path
socket) and sends its next request as soon as the last one is answered (a closed
loop, as in YCSB). Requests are named ``get[100]`` and ``update[100]``:

* a read is ``client.get(table, keys).to_numpy()``, all features, timed to the
  decoded columns; a key that is not found counts as a failure (every key drawn
  exists, so a miss means a wrong answer or the wrong ``--rows``);
* an update is ``client.write(table, ...)`` of 4 random float32 features of
  ``batch-size`` keys (a partial row, as a streaming job sends).

With ``--csv PREFIX`` the locustfile also writes ``PREFIX_latency.json``: p50, p90,
p99, p99.9 and max per request name at 1 µs resolution, because Locust rounds
response times under 100 ms to whole milliseconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import gevent
import grpc.experimental.gevent as grpc_gevent
import locust.stats
import numpy as np
from locust import User, constant, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

# `locust -f loadtests/locustfile.py` puts loadtests/ on sys.path, not the repository.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvstore import Client, KvstoreError
from loadtests.loadtest import (
    DEFAULT_SEED,
    DEFAULT_TABLE,
    DISTRIBUTIONS,
    FLOAT_FEATURES,
    UPDATE_FEATURES,
    WORKLOAD_HELP,
    WORKLOADS,
    ZIPFIAN_THETA,
    KeyChooser,
)

# gRPC's C core would block the whole gevent loop (every user) on each write: run its
# I/O on gevent instead. Must happen before any channel exists. The fast read path
# is a plain socket, which Locust's monkey-patching already makes cooperative.
grpc_gevent.init_gevent()

logger = logging.getLogger(__name__)

REQUEST_TYPE = "kvstore"
#: Deadline of each call, s: long enough that an overloaded node shows as latency.
CALL_TIMEOUT_S = 30.0
LATENCY_PERCENTILES = (50, 90, 99, 99.9)


class KeysNotFound(Exception):
    """A read answered without some of the keys it asked for."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    group = parser.add_argument_group("kvstore workload")
    group.add_argument("--workload", choices=sorted(WORKLOADS), default="C", help=WORKLOAD_HELP)
    group.add_argument(
        "--distribution",
        choices=DISTRIBUTIONS,
        default="zipfian",
        help=f"key popularity: zipfian (theta {ZIPFIAN_THETA}) or uniform",
    )
    group.add_argument(
        "--batch-size", type=_positive, default=100, help="keys per request: 1, 10, 100 or 1000"
    )
    group.add_argument("--table", default=DEFAULT_TABLE, help="the table (int64 keys)")
    group.add_argument(
        "--rows", type=_positive, default=100_000, help="rows loaded: the keys are 0..rows-1"
    )
    group.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the key draws")


class KvstoreLocustClient:
    """``kvstore.Client`` calls that report to Locust: one ``events.request`` per call."""

    def __init__(self, address: str | None, table: str, request_event: Any) -> None:
        self.client = Client(address, timeout=CALL_TIMEOUT_S)
        self.table = table
        self._fire = request_event.fire

    def get(self, keys: np.ndarray) -> dict[str, np.ndarray] | None:
        """All features of ``keys`` as NumPy columns; reported as ``get[len(keys)]``."""
        columns = None
        exception: Exception | None = None
        length = 0
        start = time.perf_counter()
        try:
            result = self.client.get(self.table, keys)
            columns = result.to_numpy()
        except KvstoreError as exc:
            exception = exc
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        if columns is not None:
            length = sum(c.nbytes for c in columns.values())
            if not result.found.all():
                # one message for all, so that Locust's failure table has one line
                exception = KeysNotFound("some keys were not found: is --rows what was loaded?")
        self._fire(
            request_type=REQUEST_TYPE,
            name=f"get[{len(keys)}]",
            response_time=elapsed_ms,
            response_length=length,
            exception=exception,
            context={},
        )
        return columns

    def update(self, keys: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        """Write ``columns`` (a partial row per key); reported as ``update[len(keys)]``."""
        data = {"key": keys, **columns}
        exception: Exception | None = None
        start = time.perf_counter()
        try:
            self.client.write(self.table, data)
        except KvstoreError as exc:
            exception = exc
        self._fire(
            request_type=REQUEST_TYPE,
            name=f"update[{len(keys)}]",
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=sum(c.nbytes for c in data.values()),
            exception=exception,
            context={},
        )

    def close(self) -> None:
        self.client.close()


_user_numbers = itertools.count()
_choosers: dict[tuple, KeyChooser] = {}


def _chooser(rows: int, distribution: str, seed: int) -> KeyChooser:
    """One KeyChooser per process (its zeta sum is O(rows)), shared by every user."""
    key = (rows, distribution, seed)
    if key not in _choosers:
        _choosers[key] = KeyChooser(rows, distribution, seed=seed)
    return _choosers[key]


class KvstoreUser(User):
    """One model server or streaming job: batch reads and, per workload, updates."""

    wait_time = constant(0)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.update_fraction = WORKLOADS[opts.workload]
        self.rng = np.random.default_rng([opts.seed, next(_user_numbers)])
        chooser = _chooser(opts.rows, opts.distribution, opts.seed)
        self.keys = chooser.batches(self.rng, opts.batch_size)
        self.kv = KvstoreLocustClient(self.host, opts.table, self.environment.events.request)

    @task
    def operation(self) -> None:
        keys = next(self.keys)
        if self.update_fraction and self.rng.random() < self.update_fraction:
            picked = self.rng.choice(len(FLOAT_FEATURES), UPDATE_FEATURES, replace=False)
            columns = {
                FLOAT_FEATURES[i]: self.rng.random(len(keys), dtype=np.float32)
                for i in sorted(picked)
            }
            self.kv.update(keys, columns)
        else:
            self.kv.get(keys)

    def on_stop(self) -> None:
        self.kv.close()


# -- exact latencies -----------------------------------------------------------------

_latency_us: dict[str, Counter[int]] = {}


@events.request.add_listener
def _record_latency(name: str, response_time: float, **_kwargs: Any) -> None:
    counts = _latency_us.get(name)
    if counts is None:
        counts = _latency_us[name] = Counter()
    counts[round(response_time * 1000.0)] += 1


def latency_summary(counts: Counter[int]) -> dict[str, float]:
    """count, mean, p50, p90, p99, p99.9 and max (ms) of a histogram in whole µs."""
    values = np.fromiter(counts.keys(), np.int64, len(counts))
    weights = np.fromiter(counts.values(), np.int64, len(counts))
    order = np.argsort(values)
    values, cumulative = values[order], np.cumsum(weights[order])
    total = int(cumulative[-1])
    out: dict[str, float] = {
        "count": total,
        "mean_ms": float(np.dot(values, weights[order]) / total / 1000.0),
    }
    for p in LATENCY_PERCENTILES:
        # nearest rank: the smallest value with at least p% of the samples at or below it
        rank = max(1, int(np.ceil(p / 100.0 * total)))
        value = values[np.searchsorted(cumulative, rank)]
        out[f"p{p:g}_ms".replace(".", "_")] = float(value) / 1000.0
    out["max_ms"] = float(values[-1]) / 1000.0
    return out


@events.test_stop.add_listener
def _write_latency(environment: Environment, **_kwargs: Any) -> None:
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if not prefix or not _latency_us or isinstance(environment.runner, WorkerRunner):
        return
    path = Path(f"{prefix}_latency.json")
    summary = {name: latency_summary(c) for name, c in sorted(_latency_us.items())}
    summary["Aggregated"] = latency_summary(sum(_latency_us.values(), Counter()))
    path.write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("exact latencies in %s", path)
    # Locust rewrites its CSV stats once a second and not at the end, so the CSV of a
    # --run-time run misses up to its last second (locust issues #1806, #2299). The
    # users have stopped: give the CSV writer one more turn with the final figures.
    gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.2)
