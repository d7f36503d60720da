"""A real single-member etcd on free 127.0.0.1 ports for the cluster tests.

Debian's ``etcd-server`` (``make test`` installs it). The defaults of etcd use fixed
ports, so every URL flag is given. ``kill()`` is a SIGKILL; ``start()`` again brings
it back on the same ports, with its data (or without, after ``wipe()``).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

START_TIMEOUT_S = 20.0


def free_port() -> int:
    """A port free on 127.0.0.1 now (etcd must be told its port: it advertises it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition`` until truthy, or fail after ``timeout`` s naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class EtcdServer:
    """One etcd process with its own data directory and ports."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd is not installed: apt-get install etcd-server (make test)")
        self.workdir = workdir
        self.data_dir = workdir / "etcd-data"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "etcd.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self) -> EtcdServer:
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            "etcd",
            "--name",
            "test",
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.url,
            "--advertise-client-urls",
            self.url,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"test={peer}",
            "--log-level",
            "warn",
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(self.healthy, START_TIMEOUT_S, f"etcd to answer on {self.url}")
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"etcd exited:\n{self.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
                return json.load(resp).get("health") == "true"
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: etcd vanishes as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def wipe(self) -> None:
        """Forget everything (an etcd restored from nothing); only while stopped."""
        assert self.proc is None or self.proc.poll() is not None
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
