"""A/B of two node settings: two kvstore nodes on copies of one bulk-loaded table.

    python -m loadtests.ab --b KVSTORE_ROW_CACHE_BYTES=67108864 --dist zipfian
    python -m loadtests.ab --batch-sizes 100,1000 --b KVSTORE_PARALLEL_READ_KEYS=1000000
    python -m loadtests.ab --rows 200000 --throughput 8,32 --b KVSTORE_READ_THREADS=0
    python -m loadtests.ab --a KVSTORE_BASE_FORMAT=block --b KVSTORE_BASE_FORMAT=plain
    python -m loadtests.ab --rows 200000 --batch-sizes 100 --under-updates 3 \\
        --b PYTHONPATH=/tmp/kvstore-before  # a copy of the package before a change
    python -m loadtests.ab --rows 200000 --batch-sizes 1 --throughput 32 \\
        --b PYTHONPATH=/tmp/uvloop-0.23     # after pip install --target /tmp/uvloop-0.23 ...

On a shared machine, two runs minutes apart differ by more than most changes do, so a
setting is judged by running both variants at once: the benchmark's table (int64 keys,
32 float32 features and a float32[64] embedding) is written to a Parquet file and bulk
loaded into node A, A's data directory is copied for node B (or, when the two differ
in a setting that shapes what a load writes, KVSTORE_BASE_FORMAT, the file is loaded
into B too), and the two nodes start with their own ``KVSTORE_*`` environment
(``--a`` and ``--b``: comma-separated ``NAME=VALUE``; see docs/operations.md for the
settings). One client then alternates between them round by round: p50 of each round
and over all of them, per batch size. ``--throughput`` adds closed-loop client
processes at those concurrencies, alternating A and B by round (uniform keys).
``--under-updates`` adds the reads-under-updates measurement of ``loadtests.updates``
on both nodes: the streaming update rate of node A is measured, and then, in rounds
alternating A and B, each node's 100-key read p99 idle and while a producer streams
updates at half that rate (the same rate for both); the ratio busy/idle per round and
its median. Results go to ``bench/ab.json``.

Key pools hold ``--pool-keys`` keys (default: as many as the table has rows), so a
cache cannot hold a whole pool when the table does not fit it either.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from kvstore import Client
from kvstore.config import ENV_SETTINGS
from loadtests.bench import (
    Settings,
    loaded_data_dir,
    measure_throughput,
    summarize_latency,
    time_lookups,
)
from loadtests.bulkload import write_parquet
from loadtests.loadtest import DISTRIBUTIONS, KeyChooser
from loadtests.servers import KvstoreNode
from loadtests.systems import TABLE, KeyPool, KvstoreReader, KvstoreSystem
from loadtests.updates import UpdateSettings, measure_reads_under_updates, measure_update_rate

__all__ = ["main", "parse_env", "run"]

#: Settings that decide what a bulk load writes: sides that differ in one load apart.
LOAD_SETTINGS = ("KVSTORE_BASE_FORMAT",)


def parse_env(spec: str) -> dict[str, str]:
    """``"A=1,B=2"`` as a dict; names must be the node's settings (``ENV_SETTINGS``): a
    misspelt one would leave the two nodes alike and the A/B measuring nothing. Also
    ``PYTHONPATH``, to run one node with other versions of its packages (a directory
    filled by ``pip install --target``)."""
    out = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.partition("=")
        if sep and name == "PYTHONPATH":
            out[name] = value
            continue
        if not sep or not name.startswith("KVSTORE_"):
            raise ValueError(f"{item!r} is not KVSTORE_NAME=VALUE (or PYTHONPATH=DIR)")
        if name not in ENV_SETTINGS:
            raise ValueError(
                f"{name} is not a node setting; the settings are: {', '.join(ENV_SETTINGS)}"
            )
        out[name] = value
    return out


def _pool(rows: int, batch: int, keys: int, dist: str, seed: int) -> KeyPool:
    """``keys`` keys of ``dist`` popularity in batches of ``batch`` (at least 64 batches),
    without the Redis key names only the benchmark's Redis readers use."""
    chooser = KeyChooser(rows, dist, seed=seed)
    rng = np.random.default_rng(seed)
    return KeyPool.chosen(chooser, rng, batch, max(64, keys // batch), names=False)


def run(
    rows: int,
    batch_sizes: list[int],
    env_a: dict[str, str],
    env_b: dict[str, str],
    dist: str = "uniform",
    pool_keys: int = 0,
    rounds: int = 5,
    samples: int = 1500,
    throughput: list[int] | None = None,
    seed: int = 20261123,
    update_rounds: int = 0,
) -> dict:
    """Load, copy, start both nodes, measure; the raw figures as a dict (ms, keys/s)."""
    out: dict = {"rows": rows, "dist": dist, "a": env_a, "b": env_b, "latency": {}}
    with tempfile.TemporaryDirectory(prefix="kvab-") as tmp:
        work = Path(tmp)
        dir_a, dir_b = work / "a", work / "b"
        dir_a.mkdir()
        dir_b.mkdir()
        parquet = write_parquet(work / "features.parquet", seed, rows)
        data_a = loaded_data_dir(dir_a, parquet, rows, work, env_a)
        if any(env_a.get(k) != env_b.get(k) for k in LOAD_SETTINGS):
            loaded_data_dir(dir_b, parquet, rows, work, env_b)
        else:
            shutil.copytree(data_a, dir_b / "data")
        with KvstoreNode(dir_a, env=env_a) as node_a, KvstoreNode(dir_b, env=env_b) as node_b:
            nodes = {"a": node_a, "b": node_b}
            keys = pool_keys or rows
            for b in batch_sizes:
                pool = _pool(rows, b, keys, dist, seed + b)
                readers = {n: KvstoreReader(v.address) for n, v in nodes.items()}
                try:
                    for reader in readers.values():
                        time_lookups(reader, pool, 0, 200, 2.0)
                    got: dict = {n: {"ns": [], "round_p50_ms": []} for n in readers}
                    cursor = 200
                    for _ in range(rounds):
                        for n, reader in readers.items():
                            ns = time_lookups(reader, pool, cursor, samples, 5.0)
                            got[n]["ns"].extend(ns)
                            got[n]["round_p50_ms"].append(float(np.median(ns)) / 1e6)
                        cursor += samples
                finally:
                    for reader in readers.values():
                        reader.close()
                out["latency"][str(b)] = {
                    n: {**summarize_latency(g["ns"]), "round_p50_ms": g["round_p50_ms"]}
                    for n, g in got.items()
                }
                print(_latency_line(b, out["latency"][str(b)]), flush=True)
            if throughput:
                out["throughput"] = _throughput(nodes, rows, batch_sizes, throughput, seed)
            if update_rounds:
                out["under_updates"] = _under_updates(nodes, rows, seed, update_rounds)
            out["caches"] = {n: _caches(v.address) for n, v in nodes.items()}
            out["base_formats"] = {n: _base_format(v.address) for n, v in nodes.items()}
    return out


def _caches(address: str) -> dict:
    """The node's cache figures from Stats: the proof that its settings took."""
    with Client(address) as client:
        stats = client.stats()
    return {k: v for k, v in stats.items() if k.endswith("_bytes")}


def _base_format(address: str) -> str:
    """The table format of the node's current version: the proof that a load setting took."""
    with Client(address) as client:
        return next(v.format for v in client.versions(TABLE) if v.current)


def _throughput(nodes: dict, rows: int, batch_sizes: list[int], concs: list[int], seed: int):
    s = Settings(
        rows=rows,
        seed=seed,
        batch_sizes=batch_sizes,
        concurrencies=concs,
        throughput_rounds=1,
        throughput_window_s=2.0,
    )
    systems = {n: KvstoreSystem(node.address, node.pid) for n, node in nodes.items()}
    got: dict = {n: {} for n in nodes}
    try:
        for _ in range(3):
            for n, system in systems.items():
                for key, cell in measure_throughput([system], s)["kvstore"].items():
                    got[n].setdefault(key, []).append(cell["keys_per_s"])
    finally:
        for system in systems.values():
            system.close()
    return {
        key: {n: {"keys_per_s": float(np.median(got[n][key])), "rounds": got[n][key]} for n in got}
        for key in got["a"]
    }


def _under_updates(nodes: dict, rows: int, seed: int, rounds: int) -> dict:
    """Reads under updates (``loadtests.updates``) on each node, alternating by round."""
    u = UpdateSettings()
    a = nodes["a"]
    top = measure_update_rate(a.address, a.pid, rows, seed, "stream", 3.0, u.max_in_flight)
    rate = top["rows_per_s"] / 2
    print(f"under updates: A streams {top['rows_per_s']:,.0f} rows/s; half: {rate:,.0f}")
    got: dict = {n: [] for n in nodes}
    for r in range(rounds):
        order = list(nodes) if r % 2 == 0 else list(nodes)[::-1]
        for n in order:
            node = nodes[n]
            cell = measure_reads_under_updates(
                node.address, node.pid, rows, seed + r, rate, 4.0, u.max_in_flight
            )
            got[n].append(cell)
            print(
                f"  round {r} {n.upper()}: p99 idle {cell['no_updates']['p99_ms'] * 1e3:.0f} us, "
                f"under {cell['updates']['rows_per_s']:,.0f} rows/s "
                f"{cell['under_updates']['p99_ms'] * 1e3:.0f} us (x{cell['p99_ratio']:.2f})",
                flush=True,
            )
    out: dict = {"stream_rows_per_s_a": top["rows_per_s"], "rate_rows_per_s": rate}
    for n, cells in got.items():
        out[n] = {
            "p99_ratio_median": float(np.median([c["p99_ratio"] for c in cells])),
            "idle_p99_ms_median": float(np.median([c["no_updates"]["p99_ms"] for c in cells])),
            "busy_p99_ms_median": float(np.median([c["under_updates"]["p99_ms"] for c in cells])),
            "rounds": cells,
        }
        print(
            f"under updates {n.upper()}: p99 ratio median x{out[n]['p99_ratio_median']:.2f} "
            f"(idle {out[n]['idle_p99_ms_median'] * 1e3:.0f} us, "
            f"busy {out[n]['busy_p99_ms_median'] * 1e3:.0f} us)"
        )
    return out


def _latency_line(batch: int, cell: dict) -> str:
    a, b = cell["a"], cell["b"]
    return (
        f"{batch} keys: p50 A {a['p50_ms'] * 1e3:.0f} us, B {b['p50_ms'] * 1e3:.0f} us "
        f"(B/A {b['p50_ms'] / a['p50_ms']:.2f}); p99 A {a['p99_ms'] * 1e3:.0f}, "
        f"B {b['p99_ms'] * 1e3:.0f} us; round p50s A "
        f"{[round(x * 1e3) for x in a['round_p50_ms']]}, B "
        f"{[round(x * 1e3) for x in b['round_p50_ms']]}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.ab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--a", default="", help="node A's KVSTORE_* settings (default: none)")
    p.add_argument(
        "--b", default="", help="node B's KVSTORE_* settings (and PYTHONPATH=DIR: other packages)"
    )
    p.add_argument("--rows", type=int, default=1_000_000, help="rows in the table (default 1M)")
    p.add_argument("--batch-sizes", default="100", help="keys per lookup (default 100)")
    p.add_argument("--dist", choices=DISTRIBUTIONS, default="uniform", help="key popularity")
    p.add_argument("--pool-keys", type=int, default=0, help="keys per pool (default: --rows)")
    p.add_argument("--rounds", type=int, default=5, help="rounds alternating A and B")
    p.add_argument("--samples", type=int, default=1500, help="lookups per node and round")
    p.add_argument("--throughput", default="", help="concurrencies, e.g. 8,32 (default none)")
    p.add_argument(
        "--under-updates",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="rounds of reads under streaming updates per node (default none)",
    )
    p.add_argument("--out", type=Path, default=Path("bench"), help="where ab.json goes")
    args = p.parse_args(argv)
    try:
        env_a, env_b = parse_env(args.a), parse_env(args.b)
    except ValueError as exc:
        p.error(str(exc))
    res = run(
        args.rows,
        [int(x) for x in args.batch_sizes.split(",")],
        env_a,
        env_b,
        args.dist,
        args.pool_keys,
        args.rounds,
        args.samples,
        [int(x) for x in args.throughput.split(",") if x],
        update_rounds=args.under_updates,
    )
    for key, cell in res.get("throughput", {}).items():
        a, b = cell["a"]["keys_per_s"], cell["b"]["keys_per_s"]
        print(f"throughput {key}: A {a:,.0f} keys/s, B {b:,.0f} keys/s (B/A {b / a:.2f})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ab.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out / 'ab.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
