"""A single-member etcd as a child process: the one way ``make cluster`` and the tests
start etcd.

Debian's ``etcd-server`` (3.4) binary. etcd's own defaults listen on fixed ports
(2379 for clients, 2380 for peers), so every URL flag is given: port 0 here means a
port free on the host now, chosen before the start because etcd must advertise it.
``kill()`` is a SIGKILL as in a crash; ``start()`` again brings etcd back on the same
ports with its data (or without, after ``wipe()``). A data directory from an earlier
run is reused, even on other ports: a single member needs no peer to reach.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

from kvstore.server.process import POLL_INTERVAL_S, wait_until

__all__ = ["EtcdProcess", "EtcdProcessError", "free_port"]

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
#: Characters of etcd's log that an error message carries.
LOG_TAIL_CHARS = 3000
#: How to get the binary, for the error when it is missing.
INSTALL_HINT = "apt-get install etcd-server (make cluster and make test install it)"


class EtcdProcessError(RuntimeError):
    """etcd is not installed, exited, or did not answer in time; the message ends with
    the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (it may be taken again before it is bound)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EtcdProcess:
    """One etcd with its data in ``data_dir``, its output in ``log_path`` (default
    ``<data_dir>.log``, appended to across restarts), as a child process.

    * ``client_port`` / ``peer_port``: 0 = a free port, chosen once and kept across
      restarts of this object.
    * ``new_session``: run etcd in its own session, so a Ctrl-C in the terminal reaches
      only the supervisor, which stops etcd after the nodes that use it.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        client_port: int = 0,
        peer_port: int = 0,
        name: str = "kvstore",
        log_path: Path | None = None,
        new_session: bool = False,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self.name = name
        self.log_path = log_path or self.data_dir.with_name(f"{self.data_dir.name}.log")
        self.new_session = new_session
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The client URL, ``http://host:port``: what ``kvstore serve --etcd`` takes."""
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "etcd was not started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> EtcdProcess:
        """Start etcd and wait until it reports healthy (``start_timeout_s`` s at most)."""
        binary = shutil.which("etcd")
        if binary is None:
            raise EtcdProcessError(f"etcd is not installed: {INSTALL_HINT}")
        cmd = [
            binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.url,
            "--advertise-client-urls",
            self.url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            f"{self.name}={self.peer_url}",
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.new_session,
            )
        try:
            wait_until(
                self.healthy, self.start_timeout_s, f"etcd to answer on {self.url}", POLL_INTERVAL_S
            )
        except TimeoutError as exc:
            self.kill()
            raise EtcdProcessError(f"{exc}; its log:\n{self.log_tail()}") from None
        except BaseException:
            self.kill()
            raise
        return self

    def healthy(self) -> bool:
        """Whether etcd answers its ``/health`` as healthy; EtcdProcessError if it exited."""
        if self.proc is None or self.proc.poll() is not None:
            status = None if self.proc is None else self.proc.returncode
            raise EtcdProcessError(f"etcd exited with {status}; its log:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
                return json.load(resp).get("health") == "true"
        except (OSError, ValueError):
            return False

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL if etcd has not exited after ``timeout`` s."""
        if not self.running():
            return
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: etcd vanishes as in a crash."""
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def wipe(self) -> None:
        """Forget everything (an etcd restored from nothing); only while stopped."""
        assert not self.running(), "wipe() needs etcd stopped"
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The last ``chars`` characters of etcd's log."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]
