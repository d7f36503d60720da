"""What a small answer's dtypes cost: a 1-key get of six mixed features into NumPy
against a 1-key float-only get, same node, same client, same run (issue 18's target:
within 1.3x).

The table has the demo table's six features (int32, float32, string, bool,
float32[8], int64[]); the mixed get asks for all six, the float-only get for the
float32 one, each followed by ``to_numpy()``. Rounds alternate the two (and which
goes first), so that drift on the shared machine hits both alike.

``make bench`` runs it among the other sections; ``python -m loadtests.mixed`` runs it
alone against a node of its own (``--help``: sizes), printing the same table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvstore import Client
from kvstore.server.demo import DEMO_FEATURES, demo_rows

__all__ = ["MixedSettings", "measure_mixed_dtypes", "render_mixed"]

TABLE = "bench_mixed_dtypes"
FEATURES = DEMO_FEATURES
FLOAT_ONLY = ["ctr_7d"]
#: The issue's target: mixed p50 / float-only p50.
TARGET_RATIO = 1.3


@dataclass
class MixedSettings:
    """Rows in the table; rounds; lookups of each kind per round."""

    rows: int = 10_000
    rounds: int = 6
    samples: int = 1000
    warmup: int = 300
    seed: int = 20261206


def _load(client: Client, s: MixedSettings) -> None:
    rng = np.random.default_rng(s.seed)
    client.create_table(TABLE, key="int64", features=FEATURES, shards=8)
    for start in range(0, s.rows, 5000):
        keys = np.arange(start, min(start + 5000, s.rows), dtype=np.int64)
        client.write(TABLE, demo_rows(keys, rng))


def _cell(client: Client, keys: np.ndarray, features: list[str] | None) -> list[int]:
    """One lookup of one key per entry of ``keys``, then to_numpy(); latencies in ns."""
    samples = []
    for key in keys.tolist():
        t0 = time.perf_counter_ns()
        client.get(TABLE, [key], features).to_numpy()
        samples.append(time.perf_counter_ns() - t0)
    return samples


def _summary(samples_ns: list[int], round_p50: list[float]) -> dict[str, Any]:
    us = np.asarray(samples_ns, np.int64) / 1e3
    return {
        "count": len(us),
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
        "round_p50_us": round_p50,
    }


def measure_mixed_dtypes(address: str, s: MixedSettings) -> dict[str, Any]:
    """Load the table on the node at ``address``, then time both kinds of get in
    alternating rounds; p50 and p99 in µs, and the ratio of the mixed get's p50 to the
    float-only get's against TARGET_RATIO."""
    with Client(address, timeout=60.0) as client:
        _load(client, s)
        rng = np.random.default_rng(s.seed + 1)
        kinds = {"mixed": None, "float_only": FLOAT_ONLY}
        for features in kinds.values():
            _cell(client, rng.integers(0, s.rows, s.warmup), features)
        samples: dict[str, list[int]] = {name: [] for name in kinds}
        round_p50: dict[str, list[float]] = {name: [] for name in kinds}
        for r in range(s.rounds):
            order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
            for name in order:
                got = _cell(client, rng.integers(0, s.rows, s.samples), kinds[name])
                samples[name] += got
                round_p50[name].append(float(np.median(got)) / 1e3)
        client.drop_table(TABLE)
    out: dict[str, Any] = {name: _summary(samples[name], round_p50[name]) for name in kinds}
    out["features"] = {"mixed": list(FEATURES.values()), "float_only": ["float32"]}
    out["ratio_p50"] = out["mixed"]["p50_us"] / out["float_only"]["p50_us"]
    out["ratio_p99"] = out["mixed"]["p99_us"] / out["float_only"]["p99_us"]
    out["target_ratio"] = TARGET_RATIO
    out["met"] = out["ratio_p50"] <= TARGET_RATIO
    return out


def render_mixed(m: dict[str, Any]) -> str:
    """The section's table, as text."""
    lines = [
        "a 1-key get into NumPy, one client, µs: the demo table's six mixed features "
        f"({', '.join(m['features']['mixed'])}) against one float32 feature, alternating "
        "rounds:",
        "",
        "| get | p50 | p99 | p50 by round | samples |",
        "|---|---:|---:|---|---:|",
    ]
    for name in ("mixed", "float_only"):
        c = m[name]
        rounds = ", ".join(f"{x:.0f}" for x in c["round_p50_us"])
        lines.append(
            f"| {name} | {c['p50_us']:.0f} | {c['p99_us']:.0f} | {rounds} | {c['count']} |"
        )
    verdict = "met" if m["met"] else "NOT met"
    lines.append(
        f"\nmixed / float-only: p50 {m['ratio_p50']:.2f}x, p99 {m['ratio_p99']:.2f}x "
        f"(target p50 <= {m['target_ratio']}x: {verdict})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run this section alone: a node of its own in a temporary directory, the same
    measurement as ``make bench``'s, the table printed (and the figures as JSON)."""
    from loadtests.servers import KvstoreNode

    d = MixedSettings()
    p = argparse.ArgumentParser(prog="python -m loadtests.mixed", description=__doc__)
    p.add_argument("--rows", type=int, default=d.rows, help=f"rows in the table ({d.rows})")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"rounds ({d.rounds})")
    p.add_argument(
        "--samples", type=int, default=d.samples, help=f"gets of each kind a round ({d.samples})"
    )
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"warm-up gets ({d.warmup})")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    a = p.parse_args(argv)
    s = MixedSettings(rows=a.rows, rounds=a.rounds, samples=a.samples, warmup=a.warmup)
    with (
        tempfile.TemporaryDirectory(prefix="kvstore-mixed-") as tmp,
        KvstoreNode(Path(tmp)) as node,
    ):
        m = measure_mixed_dtypes(node.address, s)
    print(render_mixed(m))
    if a.json is not None:
        a.json.write_text(json.dumps(m, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
