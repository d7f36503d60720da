"""Memory cgroups for the RAM-capped benchmark (loadtests/memcap.py): make one, cap it
(page cache included), read what it is charged, and the page-cache and fault figures
that go with it. Needs root and a cgroup memory controller (v1 or v2).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "CgroupUnavailable",
    "cgroup_memory",
    "evict_page_cache",
    "major_faults",
    "memory_cgroup",
    "read_bytes",
    "set_limit",
]

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


class CgroupUnavailable(RuntimeError):
    pass


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@contextlib.contextmanager
def memory_cgroup(name: str) -> Iterator[Path]:
    """A fresh memory cgroup (no limit yet, see ``set_limit``); yields its
    ``cgroup.procs`` file. Removed on exit (its processes must have ended)."""
    if (CGROUP_V1 / "memory.limit_in_bytes").exists():
        path = CGROUP_V1 / name
    elif "memory" in _read(CGROUP_V2 / "cgroup.controllers").split():
        path = CGROUP_V2 / name
    else:
        raise CgroupUnavailable("no cgroup memory controller (v1 or v2) is mounted")
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise CgroupUnavailable(f"cannot create the memory cgroup {path}: {exc}") from None
    if not any((path / f).exists() for f in ("memory.limit_in_bytes", "memory.max")):
        path.rmdir()  # v2 with the controller not enabled for children (subtree_control)
        raise CgroupUnavailable(f"the cgroup {path} has no memory limit file")
    try:
        yield path / "cgroup.procs"
    finally:
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def set_limit(procs: Path, limit_bytes: int) -> bool:
    """Limit the cgroup's memory, page cache included (the kernel reclaims down to it),
    and restart its peak figure; returns whether the peak could be restarted (else it
    counts from the cgroup's creation)."""
    d = procs.parent
    v1 = (d / "memory.limit_in_bytes").exists()
    (d / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(limit_bytes))
    try:
        (d / ("memory.max_usage_in_bytes" if v1 else "memory.peak")).write_text("0")
    except OSError:
        return False
    return True


def cgroup_memory(procs: Path) -> dict[str, int]:
    """Current and peak memory charged to the cgroup (page cache included), bytes."""
    d = procs.parent
    if (d / "memory.usage_in_bytes").exists():
        return {
            "usage_bytes": int((d / "memory.usage_in_bytes").read_text()),
            "max_usage_bytes": int((d / "memory.max_usage_in_bytes").read_text()),
        }
    out = {"usage_bytes": int((d / "memory.current").read_text())}
    if (d / "memory.peak").exists():
        out["max_usage_bytes"] = int((d / "memory.peak").read_text())
    return out


def major_faults(pid: int) -> int:
    """Page faults of ``pid`` that had to read from the disk (majflt of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[9])


def read_bytes(pid: int) -> int:
    """Bytes ``pid`` has had read from the disk (``read_bytes`` of /proc/<pid>/io): the
    page cache misses of its reads and of its page faults alike, direct reads too."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise ValueError(f"no read_bytes in /proc/{pid}/io")


def evict_page_cache(root: Path) -> int:
    """Drop the clean cached pages of every file under ``root`` (pages a process maps
    stay); returns the bytes of the files. A file a running node deletes meanwhile (an
    old log) is skipped."""
    total = 0
    for path in root.rglob("*"):
        try:
            if not path.is_file():
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
        except FileNotFoundError:
            continue
    return total
