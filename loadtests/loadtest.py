"""`make loadtest`: Locust against a real node, YCSB-style workloads, and their key popularity.

    python -m loadtests.loadtest --workload B --distribution zipfian --batch-size 100 \\
        --users 8 --time 60s --rows 100000

Starts a kvstore node on 127.0.0.1 (a free port, a temporary data directory), writes
a zstd Parquet snapshot (int64 keys ``0..rows-1``, 32 float32 features and a
float32[64] embedding: the table and rows of ``make bench``, written by
``loadtests.bulkload.write_parquet``) and bulk-loads it with
``kvstore.ingest.bulk.load``, runs Locust headless with ``loadtests/locustfile.py``
for a fixed time, stops the node and prints where the reports are:
``bench/locust/<run>_stats.csv`` (and Locust's other CSVs), ``<run>.html``, and
``<run>_latency.json`` (percentiles at 1 µs resolution; Locust rounds response
times under 100 ms to whole milliseconds, too coarse for sub-millisecond lookups).

The workload and key-popularity definitions live here, not in the locustfile,
because importing Locust monkey-patches the interpreter (gevent): the tests import
this module, and only the Locust process imports the locustfile.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadtests.bulkload import write_parquet
from loadtests.servers import KvstoreNode, proc_cpu_seconds
from loadtests.systems import FLOAT_FEATURES, KvstoreSystem

__all__ = [
    "DISTRIBUTIONS",
    "FLOAT_FEATURES",
    "WORKLOADS",
    "KeyChooser",
    "RunResult",
    "Settings",
    "ZipfianGenerator",
    "main",
    "parse_duration",
    "run",
]

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"

#: Fraction of requests that are updates, per YCSB workload (the rest are batch reads).
WORKLOADS = {"C": 0.0, "B": 0.05, "A": 0.5}
WORKLOAD_HELP = "C: 100%% reads · B: 95%% reads, 5%% updates · A: 50%% reads, 50%% updates"
DISTRIBUTIONS = ("zipfian", "uniform")
#: YCSB's default skew: about 13% of the draws over 1,000 keys hit the hottest one.
ZIPFIAN_THETA = 0.99
#: An update writes this many float32 features (picked at random) of each of its keys.
UPDATE_FEATURES = 4
DEFAULT_TABLE = "loadtest_features"
DEFAULT_SEED = 20261123
#: Keys drawn at a time by each simulated user, so that a request pays no NumPy setup.
KEY_BLOCK = 16_384
#: Beyond Locust's run time: start-up, its stop timeout and writing the reports (s).
LOCUST_GRACE_S = 120.0
LOCUST_STOP_TIMEOUT_S = 10
#: The files of a run <out>/<run><suffix>: Locust's CSVs and HTML, ours, the log.
REPORT_SUFFIXES = (
    "_stats.csv",
    "_stats_history.csv",
    "_failures.csv",
    "_exceptions.csv",
    ".html",
    "_latency.json",
    ".log",
)
DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


# -- key popularity -------------------------------------------------------------------


class ZipfianGenerator:
    """Ranks ``0..items-1`` drawn with P(rank i) ∝ 1 / (i + 1) ** theta; rank 0 is hottest.

    The algorithm of Gray et al., "Quickly generating billion-record synthetic
    databases" (SIGMOD 1994), which YCSB's ZipfianGenerator implements, vectorised
    with NumPy: zeta(items, theta) once (O(items), ~30 ms for 10M items), then O(1)
    per draw. Ranks 0 and 1 come out with their exact frequencies; the others are
    within about 20% of theirs (the head a little hot, the tail a little cold), as in
    YCSB. ``0 < theta < 1``.
    """

    __slots__ = ("_alpha", "_eta", "_half_pow_theta", "_zetan", "items", "theta")

    def __init__(self, items: int, theta: float = ZIPFIAN_THETA) -> None:
        if items < 1:
            raise ValueError(f"items must be at least 1, not {items}")
        if not 0.0 < theta < 1.0:
            raise ValueError(f"theta must be in (0, 1), not {theta}")
        self.items = items
        self.theta = theta
        self._zetan = zeta(items, theta)
        self._alpha = 1.0 / (1.0 - theta)
        self._half_pow_theta = 0.5**theta
        # With 1 or 2 items, the first two branches of ranks() cover every draw.
        zeta2 = zeta(2, theta)
        self._eta = (
            (1.0 - (2.0 / items) ** (1.0 - theta)) / (1.0 - zeta2 / self._zetan)
            if items > 2
            else 0.0
        )

    def probability(self, rank: int | np.ndarray) -> float | np.ndarray:
        """The exact Zipf probability of ``rank`` (what ``ranks`` approximates)."""
        return (np.asarray(rank, np.float64) + 1.0) ** -self.theta / self._zetan

    def ranks(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` ranks in ``0..items-1`` as an int64 array."""
        u = rng.random(size)
        uz = u * self._zetan
        tail = self.items * np.power(self._eta * u - self._eta + 1.0, self._alpha)
        # float rounding must not step outside the range
        out = np.minimum(tail.astype(np.int64), self.items - 1)
        out[uz < 1.0 + self._half_pow_theta] = 1
        out[uz < 1.0] = 0
        return out


def zeta(n: int, theta: float) -> float:
    """sum(1 / i**theta for i in 1..n), in chunks of 1M terms (bounded memory)."""
    total = 0.0
    step = 1 << 20
    for lo in range(1, n + 1, step):
        i = np.arange(lo, min(n, lo + step - 1) + 1, dtype=np.float64)
        total += float(np.sum(i**-theta))
    return total


class KeyChooser:
    """Existing keys ``0..rows-1`` drawn by popularity: ``"zipfian"`` or ``"uniform"``.

    Zipfian ranks are scattered over the key space by a bijection (a step of about
    rows / golden ratio, coprime with rows), so that the hot keys are not neighbours
    in the shards' sorted files and share no data blocks (YCSB scrambles its ranks
    for the same reason); the frequencies per key stay exactly those of the ranks.
    """

    __slots__ = ("_offset", "_step", "_zipf", "distribution", "rows")

    def __init__(
        self, rows: int, distribution: str, theta: float = ZIPFIAN_THETA, seed: int = DEFAULT_SEED
    ) -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, not {distribution!r}")
        if not 1 <= rows < 2**31:  # rank * step must fit an int64
            raise ValueError(f"rows must be in 1..2**31-1, not {rows}")
        self.rows = rows
        self.distribution = distribution
        self._zipf = ZipfianGenerator(rows, theta) if distribution == "zipfian" else None
        step = max(1, round(rows / ((1 + 5**0.5) / 2)))
        while math.gcd(step, rows) != 1:
            step += 1
        self._step = step
        self._offset = seed % rows

    def key_of_rank(self, ranks: np.ndarray) -> np.ndarray:
        """The key holding each popularity rank (a bijection of ``0..rows-1``)."""
        return (ranks * self._step + self._offset) % self.rows

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` keys (int64); a key may repeat, as in real traffic."""
        if self._zipf is None:
            return rng.integers(0, self.rows, size, dtype=np.int64)
        return self.key_of_rank(self._zipf.ranks(rng, size))

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[np.ndarray]:
        """Endless batches of ``batch_size`` keys, drawn in blocks of at least 16k keys."""
        per_block = max(1, KEY_BLOCK // batch_size)
        while True:
            block = self.draw(rng, per_block * batch_size).reshape(per_block, batch_size)
            yield from block


# -- the run --------------------------------------------------------------------------


@dataclass
class Settings:
    """One load test. Rows and keys in rows; ``time`` as Locust takes it (``60s``, ``2m``)."""

    workload: str = "C"
    distribution: str = "zipfian"
    batch_size: int = 100
    users: int = 8
    spawn_rate: float | None = None  # users started per second; default: all in 1 s
    time: str = "60s"
    rows: int = 100_000
    table: str = DEFAULT_TABLE
    seed: int = DEFAULT_SEED
    out_dir: Path = Path("bench/locust")
    name: str | None = None
    #: Locust's own output to <out>/<run>.log instead of the terminal.
    quiet: bool = False
    locust_args: list[str] = field(default_factory=list)

    @property
    def run_name(self) -> str:
        """``B-zipfian-b100-u8`` unless named: the file names of the run's reports."""
        return self.name or (
            f"{self.workload}-{self.distribution}-b{self.batch_size}-u{self.users}"
        )

    def check(self) -> None:
        """ValueError naming the first bad setting."""
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, not {self.workload!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution must be one of {DISTRIBUTIONS}, not {self.distribution!r}"
            )
        for name in ("batch_size", "users", "rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        parse_duration(self.time)


@dataclass
class RunResult:
    """Where a run's reports are, and its per-request figures (from Locust's CSV)."""

    csv_prefix: Path
    html_path: Path
    latency_path: Path
    exit_code: int
    #: One dict per row of <prefix>_stats.csv (Type, Name, Request Count, ...).
    stats: list[dict[str, str]]
    #: name -> {count, p50_ms, p99_ms, ...}: the locustfile's exact percentiles.
    latency: dict[str, dict[str, float]]
    #: Rows of <prefix>_exceptions.csv: errors in the load generator itself.
    exceptions: list[dict[str, str]]
    load_rows_per_s: float
    #: Wall-clock seconds of the Locust process, and the CPU seconds it and the node
    #: used meanwhile (Locust's include its start-up, about 1-2 s).
    locust_wall_s: float = 0.0
    locust_cpu_s: float = 0.0
    node_cpu_s: float = 0.0

    def row(self, name: str) -> dict[str, str]:
        """The stats row of request ``name`` (e.g. ``get[100]``); KeyError if none."""
        for row in self.stats:
            if row["Name"] == name:
                return row
        raise KeyError(f"no requests named {name!r} in {self.csv_prefix}_stats.csv")


def parse_duration(text: str) -> int:
    """Seconds in a Locust run time: ``90``, ``90s``, ``2m``, ``1h30m``."""
    if text.isdigit():
        return int(text)
    match = DURATION.match(text)
    if not text or match is None:
        raise ValueError(f"run time {text!r} is not like 90, 90s, 2m or 1h30m")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def locust_command(s: Settings, address: str, csv_prefix: Path, html_path: Path) -> list[str]:
    """The headless Locust command line of a run against the node at ``address``."""
    rate = s.spawn_rate if s.spawn_rate is not None else s.users
    return [
        sys.executable,
        "-m",
        "locust",
        "--locustfile",
        str(LOCUSTFILE),
        "--headless",
        "--users",
        str(s.users),
        "--spawn-rate",
        str(rate),
        "--run-time",
        s.time,
        "--stop-timeout",
        str(LOCUST_STOP_TIMEOUT_S),
        "--host",
        address,
        "--csv",
        str(csv_prefix),
        "--html",
        str(html_path),
        "--workload",
        s.workload,
        "--distribution",
        s.distribution,
        "--batch-size",
        str(s.batch_size),
        "--table",
        s.table,
        "--rows",
        str(s.rows),
        "--seed",
        str(s.seed),
        *s.locust_args,
    ]


def run_locust(cmd: list[str], timeout_s: float, log_path: Path | None) -> int:
    """Run Locust to its end (at most ``timeout_s`` s, then stop it); its exit code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    log = open(log_path, "wb") if log_path is not None else None  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT if log else None
        )
        try:
            return proc.wait(timeout_s)
        finally:
            if proc.poll() is None:  # timed out or interrupted: Locust writes its reports on TERM
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    finally:
        if log is not None:
            log.close()


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(s: Settings) -> RunResult:
    """Start a node, bulk-load the table, run Locust for ``s.time``, stop the node."""
    from kvstore.ingest.bulk import load

    s.check()
    run_s = parse_duration(s.time)
    s.out_dir.mkdir(parents=True, exist_ok=True)
    csv_prefix = s.out_dir / s.run_name
    html_path = s.out_dir / f"{s.run_name}.html"
    latency_path = s.out_dir / f"{s.run_name}_latency.json"
    for suffix in REPORT_SUFFIXES:  # a failed run must not leave an older run's figures
        (s.out_dir / f"{s.run_name}{suffix}").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvstore-loadtest-") as tmp:
        workdir = Path(tmp)
        print(f"starting a kvstore node (work dir {workdir})", flush=True)
        with KvstoreNode(workdir) as node:
            snapshot = workdir / "snapshot.parquet"
            write_parquet(snapshot, s.seed, s.rows)
            kv = KvstoreSystem(node.address, node.pid)  # the table of `make bench`, 8 shards
            try:
                kv.create_table(s.table)
            finally:
                kv.close()
            summary = load(node.address, s.table, str(snapshot), label="loadtest", progress=False)
            print(
                f"loaded {summary.rows:,} rows into {s.table!r} at {node.address} "
                f"({summary.rows_per_s:,.0f} rows/s)",
                flush=True,
            )
            cmd = locust_command(s, node.address, csv_prefix, html_path)
            print(
                f"locust: workload {s.workload}, {s.distribution} keys, {s.batch_size} keys "
                f"per request, {s.users} users, {s.time}",
                flush=True,
            )
            log_path = s.out_dir / f"{s.run_name}.log" if s.quiet else None
            node_cpu0, wall0 = proc_cpu_seconds(node.pid), time.monotonic()
            children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            exit_code = run_locust(cmd, run_s + LOCUST_GRACE_S, log_path)
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            locust_wall_s = time.monotonic() - wall0
            node_cpu_s = proc_cpu_seconds(node.pid) - node_cpu0
            print("stopping the node", flush=True)
    latency = json.loads(latency_path.read_text()) if latency_path.exists() else {}
    return RunResult(
        csv_prefix=csv_prefix,
        html_path=html_path,
        latency_path=latency_path,
        exit_code=exit_code,
        stats=_read_csv(Path(f"{csv_prefix}_stats.csv")),
        latency=latency,
        exceptions=_read_csv(Path(f"{csv_prefix}_exceptions.csv")),
        load_rows_per_s=summary.rows_per_s,
        locust_wall_s=locust_wall_s,
        locust_cpu_s=(children.ru_utime + children.ru_stime)
        - (children0.ru_utime + children0.ru_stime),
        node_cpu_s=node_cpu_s,
    )


def render(result: RunResult) -> str:
    """The run's figures as a table: requests, failures, req/s (Locust), p50/p99 (exact)."""
    lines = [
        f"{'request':<16}{'requests':>10}{'failures':>10}{'req/s':>10}"
        f"{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}"
    ]
    for row in result.stats:
        name = row["Name"]
        exact = result.latency.get(name, {})
        figures = [exact.get(k, math.nan) for k in ("p50_ms", "p99_ms", "max_ms")]
        lines.append(
            f"{name:<16}{int(row['Request Count']):>10,}{int(row['Failure Count']):>10,}"
            f"{float(row['Requests/s']):>10,.1f}" + "".join(f"{x:>10.3f}" for x in figures)
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> Settings:
    """Settings from the command line; arguments after ``--`` go to Locust as they are."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.loadtest",
        description=(
            "Start a kvstore node, bulk-load a table, run Locust headless against it "
            "(loadtests/locustfile.py) and write Locust's CSV stats and HTML report."
        ),
        epilog=(
            "examples:\n"
            "  python -m loadtests.loadtest                              workload C, 60 s\n"
            "  python -m loadtests.loadtest --workload B --batch-size 10 --users 4 --time 30s\n"
            "  python -m loadtests.loadtest -- --loglevel DEBUG          more Locust options"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = Settings()
    parser.add_argument(
        "--workload", choices=sorted(WORKLOADS), default=d.workload, help=WORKLOAD_HELP
    )
    parser.add_argument(
        "--distribution", choices=DISTRIBUTIONS, default=d.distribution, help="key popularity"
    )
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="keys per request (1, 10, 100, 1000)"
    )
    parser.add_argument("--users", type=int, default=d.users, help="simulated users (closed loop)")
    parser.add_argument(
        "--spawn-rate", type=float, default=None, help="users started per second (default: all)"
    )
    parser.add_argument("--time", default=d.time, help="run time: 90s, 2m, 1h (default 60s)")
    parser.add_argument("--rows", type=int, default=d.rows, help="rows loaded (default 100000)")
    parser.add_argument("--table", default=d.table, help=f"table name (default {d.table})")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the data and the keys")
    parser.add_argument("--out", type=Path, default=d.out_dir, help="report dir (bench/locust)")
    parser.add_argument("--name", default=None, help="run name (default e.g. B-zipfian-b100-u8)")
    parser.add_argument(
        "--quiet", action="store_true", help="Locust's output to <out>/<run>.log, not here"
    )
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    s = Settings(
        workload=args.workload,
        distribution=args.distribution,
        batch_size=args.batch_size,
        users=args.users,
        spawn_rate=args.spawn_rate,
        time=args.time,
        rows=args.rows,
        table=args.table,
        seed=args.seed,
        out_dir=args.out,
        name=args.name,
        quiet=args.quiet,
        locust_args=extra,
    )
    try:
        s.check()
    except ValueError as exc:
        parser.error(str(exc))
    return s


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run one load test; print its figures and where the reports are; Locust's exit code."""
    s = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # stop Locust and the node on TERM too
    started = time.monotonic()
    try:
        result = run(s)
    except KeyboardInterrupt:
        print("interrupted: Locust and the node stopped", file=sys.stderr)
        return 130
    except subprocess.TimeoutExpired:
        print("Locust overran its run time: stopped, and so was the node", file=sys.stderr)
        return 1
    print()
    print(render(result))
    print(
        "\nreq/s and failures from Locust; p50/p99/max at 1 µs resolution from the locustfile "
        "(Locust's own percentiles are rounded to whole ms)"
    )
    if result.exceptions:
        print(f"{len(result.exceptions)} exception(s) in the load generator: see the report")
    print(
        f"CPU over Locust's {result.locust_wall_s:.0f} s: node {result.node_cpu_s:.1f} s, "
        f"Locust {result.locust_cpu_s:.1f} s ({os.cpu_count()} cores; both on this machine)"
    )
    print(f"\nCSV:  {result.csv_prefix}_stats.csv (and _stats_history, _failures, _exceptions)")
    print(f"HTML: {result.html_path}")
    print(f"exact latencies: {result.latency_path}")
    print(f"({time.monotonic() - started:.0f} s in all; Locust exit code {result.exit_code})")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
