"""What a benchmark's numbers were measured on: the machine, the source, the versions.

The versions are those of everything on a measured path: Python, grpcio and uvloop
(kvstore's transport and event loop), redis-server, redis-py and hiredis (Redis's
client, with the reply parser a connection actually selected), NumPy.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from loadtests.redis_client import client_versions

__all__ = ["machine_info", "versions_line"]


def machine_info(redis_server_version: str, redis_conn: object) -> dict:
    """The machine, the kvstore source (commit, uncommitted changes) and the versions;
    ``redis_conn``: a redis-py client as the benchmark reads with, for its parser."""
    cpu_model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout)
    except (OSError, ValueError):
        nproc = len(os.sched_getaffinity(0))
    import grpc
    import uvloop

    import kvstore

    source = Path(kvstore.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--", "kvstore", "ext", "ingest"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except OSError:
        commit, changed = "", ""

    return {
        "nproc": nproc,
        "cpu_model": cpu_model,
        "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "kvstore_source": str(source),
        "kvstore_commit": commit,
        "kvstore_uncommitted_changes": bool(changed),
        "redis_server": redis_server_version,
        **client_versions(redis_conn),  # type: ignore[arg-type]
        "uvloop": uvloop.__version__,
        "grpcio": grpc.__version__,
        "numpy": np.__version__,
    }


def versions_line(m: dict) -> str:
    """The versions of ``machine_info`` in one line, for the console and the README."""
    return (
        f"Python {m['python']}, redis-server {m['redis_server']}, redis-py {m['redis_py']} "
        f"with hiredis {m.get('hiredis', 'NONE')} (parser {m.get('redis_py_parser', '?')}), "
        f"uvloop {m.get('uvloop', '?')}, grpcio {m['grpcio']}"
    )
