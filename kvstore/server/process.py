"""A node as a child process: the one supervisor the tests, the benchmarks and a cluster
launcher share.

``NodeProcess`` runs ``python -m kvstore.cli serve`` on a host and port 0 (or a port
given), finds the bound port in the port file the node writes once it serves
(``--port-file``: written atomically, after health turns SERVING), checks health
with a deadline, stops the node with SIGTERM and then SIGKILL after a timeout, and
keeps everything the node printed in one log file, whose tail every error carries.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.wire.dial import open_channel

__all__ = ["NodeProcess", "NodeProcessError", "wait_until"]

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.02
#: Characters of the node's log that an error message carries.
LOG_TAIL_CHARS = 4000


class NodeProcessError(RuntimeError):
    """The node exited while starting, did not serve in time, or did not stop in time;
    the message ends with the tail of its log."""


def wait_until(
    condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = POLL_INTERVAL_S
) -> Any:
    """Poll ``condition`` every ``interval_s`` s until it returns something truthy, and
    return that; TimeoutError naming ``what`` after ``timeout_s`` s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


class NodeProcess:
    """``kvstore serve`` with data in ``data_dir``, as a child process; restartable.

    * ``args``: more ``kvstore serve`` options; given after the supervisor's own, so
      ``"--port", "7071"`` replaces port 0.
    * ``env``: environment variables set for the node (``KVSTORE_*`` settings).
    * ``log_path`` / ``port_file``: default ``<data_dir>.log`` / ``<data_dir>.port``
      beside the data directory; the log is appended to across restarts.
    * ``cgroup_procs``: a cgroup's ``cgroup.procs``; the node joins it before the
      interpreter starts (``sh`` writes its pid there, then execs the node), so every
      page it touches is charged there. Not a ``preexec_fn``: that makes subprocess
      fork() instead of vfork(), which runs gRPC's fork handlers in this process, and
      they can hang when a gRPC client of this process is busy.
    * ``new_session``: run the node in its own session, so a Ctrl-C in the terminal
      reaches only the supervisor, which then stops the node in its own order.
    """

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        port_file: Path | None = None,
        cgroup_procs: Path | None = None,
        new_session: bool = False,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.args = list(args)
        self.host = host
        self.env = dict(env or {})
        self.log_path = log_path or self.data_dir.with_name(f"{self.data_dir.name}.log")
        self.port_file = port_file or self.data_dir.with_name(f"{self.data_dir.name}.port")
        self.cgroup_procs = cgroup_procs
        self.new_session = new_session
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def address(self) -> str:
        """host:port of the node's gRPC service (once started)."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the node was not started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> NodeProcess:
        """Start the node and wait until it serves (``start_timeout_s`` s at most)."""
        self.port_file.unlink(missing_ok=True)  # a node started here before left its port
        cmd = [
            sys.executable,
            "-m",
            "kvstore.cli",
            "serve",
            "--host",
            self.host,
            "--port",
            "0",
            "--data",
            str(self.data_dir),
            "--port-file",
            str(self.port_file),
            *self.args,
        ]
        if self.cgroup_procs is not None:
            cmd = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.cgroup_procs), *cmd]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=self.new_session,
            )
        try:
            wait_until(self._port_written, self.start_timeout_s, "the node's port file")
            self.port = int(self.port_file.read_text())
            wait_until(self._serving, self.start_timeout_s, "the node to report SERVING")
        except TimeoutError as exc:
            self._terminate(signal.SIGKILL)
            raise NodeProcessError(f"{exc}; its log:\n{self.log_tail()}") from None
        except BaseException:
            self._terminate(signal.SIGKILL)
            raise
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Send ``sig`` and wait up to ``timeout`` s; the exit status. A node that does not
        exit in time is killed (SIGKILL) and NodeProcessError raised."""
        assert self.proc is not None, "the node was not started"
        if self._terminate(sig, timeout):
            raise NodeProcessError(
                f"node {self.address} did not stop within {timeout:g} s of signal "
                f"{signal.Signals(sig).name} and was killed; its log:\n{self.log_tail()}"
            )
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is closed or flushed."""
        assert self.proc is not None, "the node was not started"
        self._terminate(signal.SIGKILL)

    def output(self) -> str:
        """Everything the node printed so far, across restarts."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The last ``chars`` characters of the node's log."""
        return self.output()[-chars:]

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.proc is None:
            return
        try:
            self.stop()
        except NodeProcessError:
            if exc_type is None:  # else the error that is leaving the block is the one to see
                raise

    def _port_written(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise NodeProcessError(
                f"node exited with {self.proc.returncode} while starting; its log:\n"
                f"{self.log_tail()}"
            )
        return self.port_file.exists()

    def _serving(self) -> bool:
        with open_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def _terminate(self, sig: int, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Signal the process unless it has exited and reap it; whether it had to be
        killed after ``timeout`` s."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            return False
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return True
        return False
