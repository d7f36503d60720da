"""What several test modules share: waiting on a condition, running the ``kvstore``
command, and a bulk snapshot with a feature of every dtype.

Node processes come from ``kvstore.server.process`` (the supervisor the benchmarks use
too), through the fixtures in conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kvstore.server.process import NodeProcess, wait_until

__all__ = ["FEATURES", "NodeProcess", "expected", "kvstore", "snapshot", "wait_for"]

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
