"""In-process A/B of the storage tiers: the same node reading rows that live in the base
only, in the delta only, and in the base with a delta update (issue 17, part 3).

    python -m loadtests.tiers --rows 100000 --batch 100 --rounds 9
    python -m loadtests.tiers --flush          # the delta flushed to files first

``make bench`` runs it (100k rows, its defaults) after the main steps.

No RPC and no second process: one ``Node`` object on a bulk-loaded copy of the
benchmark's table (``loadtests.bench.loaded_data_dir``), so what differs between the
three sets of keys is only the storage path (the delta's and the base's lookups and
the overlay). The key space is cut in three:

* **base**: keys ``0 .. rows/3``, as bulk-loaded;
* **base+delta**: keys ``rows/3 .. 2 rows/3``, bulk-loaded, then every one updated
  online in four features (``UPDATE_FEATURES``), as a streaming job would;
* **delta**: ``rows/3`` keys the load never had (``rows ..``), written online whole.

Rounds alternate the order of the three sets; each round times ``--calls`` reads of
``--batch`` random keys of each set. Printed: the median over rounds of each round's
median (µs), the p99 of every call, and the ratios to the base set. On a shared
machine the absolute figures drift; the ratios of one run are what to compare.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from kvstore.columns import encode_rows
from kvstore.config import NodeConfig
from kvstore.keys import KeyBatch
from kvstore.server.node import Node, run_steps
from loadtests.bench import loaded_data_dir
from loadtests.bulkload import write_parquet
from loadtests.systems import EMB_DIM, FLOAT_FEATURES, TABLE, Chunk
from loadtests.updates import UPDATE_FEATURES

#: Issue 17's target: a row written online reads within 1.1x of a bulk-loaded one.
DELTA_TARGET = 1.1

__all__ = ["SETS", "delta_memory", "main", "measure", "prepare"]

SETS = ("base", "base+delta", "delta")
WRITE_ROWS = 1000


def _write(node: Node, columns: dict) -> None:
    """Write ``columns`` through the node's write path, ``WRITE_ROWS`` rows a call."""
    schema = node.table(TABLE).schema
    n = len(columns["key"])
    for lo in range(0, n, WRITE_ROWS):
        part = {name: col[lo : lo + WRITE_ROWS] for name, col in columns.items()}
        rows = encode_rows(schema, part)
        run_steps(
            node.write_steps(
                TABLE, schema.schema_id, rows.keys, rows.rows, rows.offsets, rows.features
            )
        )


def prepare(node: Node, rows: int, seed: int) -> dict[str, tuple[int, int]]:
    """Write the online rows of the two delta sets; each set's key range [lo, hi)."""
    third = rows // 3
    sets = {"base": (0, third), "base+delta": (third, 2 * third), "delta": (rows, rows + third)}
    lo, hi = sets["base+delta"]
    rng = np.random.default_rng(seed)
    update = {"key": np.arange(lo, hi, dtype=np.int64)}
    for name in UPDATE_FEATURES:
        update[name] = rng.random(hi - lo, dtype=np.float32)
    _write(node, update)
    lo, hi = sets["delta"]
    chunk = Chunk.generate(seed, lo, hi)
    full = {"key": chunk.keys, "emb": list(chunk.emb)}
    for i, name in enumerate(FLOAT_FEATURES):
        full[name] = chunk.floats[i]
    _write(node, full)
    return sets


def measure(
    node: Node,
    sets: dict[str, tuple[int, int]],
    batch: int,
    rounds: int,
    calls: int,
    seed: int,
) -> dict:
    """Round medians and call p99 of ``node.get`` per set (µs)."""
    rng = np.random.default_rng(seed)
    pools = {
        name: [
            KeyBatch("int64", ints=rng.integers(lo, hi, batch, dtype=np.int64))
            for _ in range(calls)
        ]
        for name, (lo, hi) in sets.items()
    }
    for name in SETS:  # warm the caches and the code paths
        for keys in pools[name]:
            node.get(TABLE, keys, [])
    samples: dict[str, list[float]] = {name: [] for name in SETS}
    round_p50: dict[str, list[float]] = {name: [] for name in SETS}
    for r in range(rounds):
        order = SETS[r % 3 :] + SETS[: r % 3]
        if r % 2:
            order = order[::-1]
        for name in order:
            got = []
            for keys in pools[name]:
                t0 = time.perf_counter_ns()
                answer = node.get(TABLE, keys, [])
                got.append((time.perf_counter_ns() - t0) / 1e3)
            assert (answer.lengths >= 0).all(), f"{name}: a key read as missing"
            samples[name].extend(got)
            round_p50[name].append(float(np.median(got)))
    out = {}
    for name in SETS:
        out[name] = {
            "p50_us": float(np.median(round_p50[name])),
            "p99_us": float(np.percentile(samples[name], 99)),
            "round_p50_us": round_p50[name],
        }
    for name in SETS[1:]:
        out[name]["ratio_p50"] = out[name]["p50_us"] / out["base"]["p50_us"]
        out[name]["ratio_round_p50"] = float(
            np.median(np.array(round_p50[name]) / np.array(round_p50["base"]))
        )
    return out


def delta_memory(node: Node) -> dict:
    """How many of the table's delta shards answer from their in-memory copy
    (kvstore.storage.delta_memory), and the bytes those copies count."""
    shards = node.table(TABLE).delta
    kept = [s.memory for s in shards if s.memory is not None]
    return {
        "shards": len(shards),
        "shards_in_memory": len(kept),
        "bytes": sum(m.bytes for m in kept),
    }


def step_holds(node: Node, sets: dict[str, tuple[int, int]], writes: int, seed: int) -> dict:
    """How long each step of a ``WRITE_ROWS``-row partial update holds the thread (µs):
    the time a server's event loop could not answer a read (``_drive`` awaits between
    steps). The first step includes the checks of the whole request."""
    schema = node.table(TABLE).schema
    lo, hi = sets["base+delta"]
    rng = np.random.default_rng(seed)
    first, others, steps_per_write = [], [], []
    for _ in range(writes):
        update = {"key": rng.choice(np.arange(lo, hi, dtype=np.int64), WRITE_ROWS, replace=False)}
        for name in UPDATE_FEATURES:
            update[name] = rng.random(WRITE_ROWS, dtype=np.float32)
        rows = encode_rows(schema, update)
        steps = node.write_steps(
            TABLE, schema.schema_id, rows.keys, rows.rows, rows.offsets, rows.features
        )
        held = []
        while True:
            t0 = time.perf_counter_ns()
            try:
                next(steps)
            except StopIteration:
                held.append((time.perf_counter_ns() - t0) / 1e3)
                break
            held.append((time.perf_counter_ns() - t0) / 1e3)
        first.append(held[0])
        others.extend(held[1:])
        steps_per_write.append(len(held))
    return {
        "steps_per_write": float(np.median(steps_per_write)),
        "first_step_p50_us": float(np.median(first)),
        "step_p50_us": float(np.median(others)),
        "step_p99_us": float(np.percentile(others, 99)),
        "step_max_us": float(np.max(others + first)),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=100, help="keys a read")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=300, help="reads a set a round")
    p.add_argument("--seed", type=int, default=20261123)
    p.add_argument("--flush", action="store_true", help="flush the delta to files first")
    p.add_argument("--hold", type=float, default=0.0, help="s to keep reading base+delta after")
    p.add_argument("--writes", type=int, default=30, help="1,000-row updates timed by step")
    p.add_argument("--out", type=Path, default=None, help="JSON result file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kvtiers-") as tmp:
        work = Path(tmp)
        parquet = write_parquet(work / "features.parquet", args.seed, args.rows)
        data = loaded_data_dir(work / "node", parquet, args.rows, work)
        config = NodeConfig(data_dir=data)
        config.load()
        node = Node(config)
        node.open()
        try:
            sets = prepare(node, args.rows, args.seed)
            if args.flush:
                for shard in node.table(TABLE).delta:
                    shard.flush()
            result = measure(node, sets, args.batch, args.rounds, args.calls, args.seed)
            result["settings"] = {**vars(args), "out": str(args.out), "emb_dim": EMB_DIM}
            result["delta_memory"] = memory = delta_memory(node)
            print(
                f"delta shards read from memory (--delta-memory-mb): {memory['shards_in_memory']}"
                f" of {memory['shards']}, {memory['bytes'] / 2**20:.1f} MiB counted"
            )
            for name in SETS:
                r = result[name]
                ratio = f"  x{r['ratio_round_p50']:.2f} of base" if "ratio_p50" in r else ""
                print(f"{name:>11}: p50 {r['p50_us']:7.1f} us  p99 {r['p99_us']:7.1f} us{ratio}")
            worst = max(result[name]["ratio_round_p50"] for name in SETS if name != "base")
            verdict = "met" if worst <= DELTA_TARGET else "NOT met"
            print(
                f"online-written rows (delta, base+delta) against bulk-loaded ones, p50: at "
                f"worst {worst:.2f}x (target <= {DELTA_TARGET}x: {verdict})"
            )
            if args.writes:
                holds = result["write_steps"] = step_holds(node, sets, args.writes, args.seed)
                print("write steps (us):", json.dumps(holds))
            if args.hold:
                deadline = time.monotonic() + args.hold
                rng = np.random.default_rng(1)
                while time.monotonic() < deadline:
                    for name in SETS:
                        lo, hi = sets[name]
                        keys = rng.integers(lo, hi, args.batch, dtype=np.int64)
                        node.get(TABLE, KeyBatch("int64", ints=keys), [])
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1))
        finally:
            node.close()


if __name__ == "__main__":
    main()
