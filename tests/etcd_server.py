"""A real single-member etcd on free 127.0.0.1 ports for the cluster tests.

A thin fixture over ``kvstore.cluster.etcd_process.EtcdProcess``, the same code that
``make cluster`` starts etcd with. ``kill()`` is a SIGKILL; ``start()`` again brings
it back on the same ports, with its data (or without, after ``wipe()``).
"""

from __future__ import annotations

from pathlib import Path

from kvstore.cluster.etcd_process import EtcdProcess, free_port

__all__ = ["EtcdServer", "free_port"]


class EtcdServer(EtcdProcess):
    """etcd with its data in ``workdir/etcd-data`` and its log in ``workdir/etcd.log``."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir / "etcd-data", name="test", log_path=workdir / "etcd.log")
        self.workdir = workdir
