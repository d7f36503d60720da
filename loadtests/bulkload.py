"""The bulk-load section: the synthetic table as a zstd Parquet file, loaded by the bulk loader.

Production data reaches kvstore as a batch job's Parquet snapshot, so the benchmark
loads it that way: the rows are written once to one zstd Parquet file in the run's
work directory (``ParquetSink``, while Redis is loaded with the same chunks), then
``kvstore.ingest.bulk.load`` turns the file into a new version of the table. Reads
then come from the bulk-loaded base (SST files, block cache), not from memtables.

The loader runs in a child process (``python -m loadtests.bulkload ADDRESS TABLE
FILE``), so that its peak resident memory (``VmHWM``, ``ru_maxrss``) is its own. The
figures (``run_loader``):

* end to end: rows / the loader's own wall clock (``LoadSummary.seconds``: from
  opening the Parquet file to the new version being current, i.e. queryable), and
  Parquet MB/s over the same time; beside it the child's wall clock including
  interpreter start and imports;
* CPU: the loader's CPU seconds in ``load()`` and the node's during the child's life,
  so rows/s per core can be compared with the target (1M rows/s per core);
* disk: bytes of the version's files on the node per row, against the Parquet
  input's bytes per row;
* memory: the loader's peak RSS, and its RSS after imports (before the load).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.servers import dir_bytes, proc_cpu_seconds
from loadtests.systems import EMB_DIM, FLOAT_FEATURES, Chunk

__all__ = ["ParquetSink", "run_loader", "write_parquet"]

#: Rows per chunk when a Parquet file is written on its own (no Redis load beside it).
WRITE_CHUNK_ROWS = 100_000


class ParquetSink:
    """One zstd Parquet file written chunk by chunk: key, f00..f31, emb (float32[64]).

    ``write(chunk)`` returns the seconds spent (Arrow conversion and Parquet encoding).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self.seconds = 0.0
        self._writer: Any = None

    def write(self, chunk: Chunk) -> float:
        import pyarrow as pa
        import pyarrow.parquet as pq

        t0 = time.perf_counter_ns()
        cols: dict[str, Any] = {"key": pa.array(chunk.keys)}
        for i, name in enumerate(FLOAT_FEATURES):
            cols[name] = pa.array(chunk.floats[i])
        cols["emb"] = pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(chunk.emb).reshape(-1)), EMB_DIM
        )
        table = pa.table(cols)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        self._writer.write_table(table)
        self.rows += len(chunk.keys)
        spent = (time.perf_counter_ns() - t0) / 1e9
        self.seconds += spent
        return spent

    def close(self) -> dict:
        """Close the file; its size and how long writing it took."""
        t0 = time.perf_counter_ns()
        if self._writer is not None:
            self._writer.close()
        self.seconds += (time.perf_counter_ns() - t0) / 1e9
        size = self.path.stat().st_size
        return {
            "path": str(self.path),
            "rows": self.rows,
            "bytes": size,
            "bytes_per_row": size / max(self.rows, 1),
            "write_seconds": self.seconds,
        }


def write_parquet(path: Path, seed: int, rows: int) -> dict:
    """Write ``rows`` synthetic rows (``Chunk.generate``) to ``path`` as zstd Parquet."""
    sink = ParquetSink(path)
    for lo in range(0, rows, WRITE_CHUNK_ROWS):
        sink.write(Chunk.generate(seed, lo, min(lo + WRITE_CHUNK_ROWS, rows)))
    return sink.close()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _child(address: str, table: str, path: str) -> None:
    """The loader process: load ``path`` into ``table``; one JSON line on stdout."""
    from kvstore.ingest.bulk import load

    rss_before = _status_kib("VmRSS") * 1024
    before = resource.getrusage(resource.RUSAGE_SELF)
    summary = load(address, table, path, key_column="key", label="bench", progress=False)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {
        "summary": summary.to_json(),
        "rss_after_imports_bytes": rss_before,
        "vm_hwm_bytes": _status_kib("VmHWM") * 1024,
        "ru_maxrss_bytes": usage.ru_maxrss * 1024,
        # CPU of the load() call alone (not the interpreter's start and imports)
        "cpu_user_s": usage.ru_utime - before.ru_utime,
        "cpu_system_s": usage.ru_stime - before.ru_stime,
        "cpu_imports_s": before.ru_utime + before.ru_stime,
    }
    print(json.dumps(out), flush=True)


def _version_dir_bytes(data_dir: Path, table: str, version: int) -> int:
    """Bytes of the files of ``table``'s bulk version ``version`` under the node's cold dir."""
    total = 0
    for tdir in (data_dir / "cold" / "tables").glob(f"{table}-*"):
        vdir = tdir / f"v{version:06d}"
        if vdir.is_dir():
            total += dir_bytes(vdir)
    return total


def run_loader(
    address: str,
    node_pid: int,
    data_dir: Path,
    table: str,
    parquet: dict,
    workdir: Path,
    check: Any = None,
) -> dict:
    """Bulk-load ``parquet`` (a ``ParquetSink.close()`` dict) into ``table`` from a child.

    ``check()`` (optional) is called once the loader has exited and must succeed: the
    proof that the version is queryable. The loader's spill files (inputs larger than
    its memory budget) go to ``workdir``.
    """
    env = {**os.environ, "TMPDIR": str(workdir)}
    cwd = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [cwd, env.get("PYTHONPATH", "")]))
    node_cpu0 = proc_cpu_seconds(node_pid)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.bulkload", address, table, parquet["path"]],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=3600,
    )
    wall = time.monotonic() - t0
    node_cpu = proc_cpu_seconds(node_pid) - node_cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"the bulk loader failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    t1 = time.monotonic()
    if check is not None:
        check()
    check_s = time.monotonic() - t1
    summary = child["summary"]
    rows = summary["rows"]
    seconds = summary["seconds"]
    loader_cpu = child["cpu_user_s"] + child["cpu_system_s"]
    disk = _version_dir_bytes(data_dir, table, summary["version"])
    return {
        "table": table,
        "rows": rows,
        "summary": summary,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "parquet_mb_per_s": parquet["bytes"] / 1e6 / seconds,
        "child_wall_s": wall,
        "child_wall_rows_per_s": rows / wall,
        "check_s": check_s,
        "loader_cpu_s": loader_cpu,
        "loader_cpu_imports_s": child["cpu_imports_s"],
        "node_cpu_s": node_cpu,
        "rows_per_cpu_s": rows / max(loader_cpu + node_cpu, 1e-9),
        "loader_peak_rss_bytes": max(child["vm_hwm_bytes"], child["ru_maxrss_bytes"]),
        "loader_rss_after_imports_bytes": child["rss_after_imports_bytes"],
        "parquet": parquet,
        "parquet_bytes_per_row": parquet["bytes"] / rows,
        "disk_bytes": disk,
        "disk_bytes_per_row": disk / rows,
        "shard_db_bytes_per_row": summary["shard_db_bytes"] / rows,
    }


if __name__ == "__main__":
    _child(*sys.argv[1:4])
