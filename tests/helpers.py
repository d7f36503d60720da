"""What several test modules share: waiting on a condition, running the ``kvstore``
command, a bulk snapshot with a feature of every dtype, and the small three-feature
table the read-path tests (C answers, hot rows, delta tier) load, change and compare.

Node processes come from ``kvstore.server.process`` (the supervisor the benchmarks use
too), through the fixtures in conftest.py.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kvstore import Client
from kvstore.server.process import NodeProcess, wait_until

__all__ = [
    "FEATURES",
    "SMALL_FEATURES",
    "NodeProcess",
    "check_ttl_expiry",
    "expected",
    "kvstore",
    "reads_alike_through_random_changes",
    "small_version",
    "snapshot",
    "wait_for",
]

#: One feature of every dtype, as ``create_table`` takes them.
FEATURES = {
    "flag": "bool",
    "age": "int32",
    "clicks": "int64",
    "ctr": "float32",
    "score": "float64",
    "country": "string",
    "blob": "bytes",
    "emb": "float32[4]",
    "items": "int64[]",
}


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); TimeoutError
    naming ``what`` after ``timeout`` s."""
    return wait_until(condition, timeout, what)


def kvstore(
    *args: str,
    address: str | None,
    stdin: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``kvstore`` command; ``address`` None leaves ``--address`` out."""
    full_env = {k: v for k, v in os.environ.items() if k != "KVSTORE_ADDRESS"}
    full_env.update(env or {})
    argv = [sys.executable, "-m", "kvstore.cli", *args]
    if address is not None:
        argv += ["--address", address]
    return subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=60,
    )


def snapshot(keys: list[int], *, salt: int = 0, key_column: str = "key") -> pa.Table:
    """Rows of every dtype (FEATURES) for ``keys``; ``salt`` makes the values of another
    snapshot differ."""
    n = len(keys)
    emb = np.array([[k + salt, 0.5, -1.0, 2.25] for k in keys], np.float32)
    return pa.table(
        {
            key_column: pa.array(keys, pa.int64()),
            "flag": [k % 2 == 0 for k in keys],
            "age": pa.array([None if k % 7 == 3 else 20 + k + salt for k in keys], pa.int32()),
            "clicks": pa.array([2**40 + k for k in keys], pa.int64()),
            "ctr": pa.array([k / 4 + salt for k in keys], pa.float32()),
            "score": [k / 3 for k in keys],
            "country": [f"c{k}é" for k in keys],
            "blob": [bytes([k % 256]) * 3 for k in keys],
            "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 4),
            "items": pa.array([list(range(k % 4)) for k in keys], pa.list_(pa.int64())),
        }
    ).slice(0, n)


def expected(table: pa.Table, key_column: str = "key") -> list[dict]:
    """The rows ``client.get(...).to_pylist()`` gives back for a loaded ``table``."""
    rows = table.to_pylist()
    for row in rows:
        row["key"] = row.pop(key_column)
    return rows


#: The three features (int, string, float) the read-path tests write, load and compare.
SMALL_FEATURES = {"a": "int64", "s": "string", "x": "float32"}


def small_version(path: Path, keys: range, salt: int) -> str:
    """A Parquet snapshot of ``keys`` with SMALL_FEATURES, its values made from ``salt``
    (each load of another salt is a different version); its path."""
    pq.write_table(
        pa.table(
            {
                "key": pa.array(list(keys), pa.int64()),
                "a": pa.array([k + salt for k in keys], pa.int64()),
                "s": [f"base{salt}-{k}" for k in keys],
                "x": pa.array([k / 2 for k in keys], pa.float32()),
            }
        ),
        path,
    )
    return str(path)


def answers_of(nodes: dict[str, Any], table: str, keys: list[int]) -> dict[str, list]:
    """Each node's answer (``to_pylist()``) to a get of ``keys`` of ``table``, by name:
    ``nodes`` maps names to started nodes (anything with an ``address``)."""
    out = {}
    for name, node in nodes.items():
        with Client(node.address) as client:
            out[name] = client.get(table, keys).to_pylist()
    return out


def reads_alike_through_random_changes(
    a: Client, b: Client, writers: tuple[Client, ...], tmp_path: Path
) -> None:
    """240 random steps of loads, rollbacks, writes and deletes, applied through each of
    ``writers`` (clients), with gets between them: clients ``a`` and ``b`` must answer
    each get alike, pinned older versions included (the same rows, the same version)."""
    rng = random.Random(5)
    now = int(time.time() * 1e6)
    for c in writers:
        c.create_table("t", key="int64", features=SMALL_FEATURES, shards=4)
    files = [
        small_version(tmp_path / f"v{i}.parquet", range(i * 10, 60 + i * 10), i) for i in range(3)
    ]
    snapshot = now - 10_000_000
    for step in range(240):
        op = rng.random()
        keys = [rng.randrange(-5, 100) for _ in range(rng.choice((1, 1, 2, 10)))]
        when = now + step * 1000 + rng.randrange(-20_000, 1000)
        kept = [v.version for v in a.versions("t") if not v.current]
        back = rng.choice(kept) if kept else 0
        for c in writers:
            if op < 0.03:
                c.load("t", files[step % 3], progress=False, snapshot_time_us=snapshot + step)
            elif op < 0.05 and back:
                c.rollback("t", back)
            elif op < 0.25:
                distinct = sorted(set(keys))
                c.write(
                    "t",
                    {"key": distinct, "a": [step] * len(distinct), "s": ["w"] * len(distinct)},
                    event_time=when,
                )
            elif op < 0.32:
                c.delete("t", keys, event_time=when)
        if op >= 0.32:
            got, want = a.get("t", keys), b.get("t", keys)
            assert (got.to_pylist(), got.version) == (want.to_pylist(), want.version), step
            versions = [v.version for v in a.versions("t")]
            if versions and op > 0.9:  # a pinned, older version
                pinned = versions[0]
                assert (
                    a.get("t", keys, version=pinned).to_pylist()
                    == b.get("t", keys, version=pinned).to_pylist()
                ), step


def check_ttl_expiry(address: str) -> None:
    """A row written 0.3 s ago with a 1 s TTL on feature x, read over and over from the
    node at ``address``: x is served only by reads that began before its time was up,
    and then never again."""
    ttl_s = 1.0
    with Client(address) as client:
        client.create_table("t", key="int64", features=SMALL_FEATURES, shards=2, ttl={"x": ttl_s})
        written = int(time.time() * 1e6) - 300_000
        client.write("t", {"key": [1], "x": [1.5], "a": [7]}, event_time=written)
        expires = written + int(ttl_s * 1e6)

        def expired_and_consistent() -> bool:
            asked = int(time.time() * 1e6)
            (row,) = client.get("t", [1]).to_pylist()
            assert row["a"] == 7
            if row["x"] is not None:
                # Served with x: the read began before x's time was up.
                assert asked <= expires, (asked - expires, row)
                return False
            return True

        wait_for(expired_and_consistent, 10.0, "x to expire")
        assert client.get("t", [1]).to_pylist()[0]["x"] is None
