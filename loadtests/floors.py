"""The floors of lookup latency, measured in the same run as the systems they bound.

A floor is a round trip with nothing behind it, from the same Python client process
shape as the lookups, so that each system's latency has its limit beside it:

* ``uvloop-echo``: a bare echo server, one process on uvloop serving an
  ``asyncio.Protocol`` as a kvstore node's fast read path does, on 127.0.0.1 port 0.
  The client sends a small frame (``u32 length, u32 request id``, then the body: the
  fast path's request framing) on a plain blocking socket with TCP_NODELAY, one
  ``send`` and ``recv_into`` as ``kvstore/client/fast.py`` does, and reads the same
  bytes back. No Python server can answer faster here: kvstore's floor.
* ``redis-ping``: ``PING`` through redis-py on hiredis (``loadtests/redis_client.py``)
  to the redis-server that holds the packed rows: the floor of any Redis command from
  this client, Redis's floor.

Both look like the benchmark's systems (``name``, ``server_pid``, ``reader()`` whose
``lookup(keys, names)`` ignores the keys), so the latency rounds alternate them with
kvstore and Redis. ``python -m loadtests.floors --port-file PATH`` is the echo server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadtests.redis_client import connect
from loadtests.servers import wait_until

__all__ = ["FLOOR_OF", "FRAME_BYTES", "EchoFloor", "EchoServer", "PingFloor", "floor_ratios"]

#: The fast path's request header: body length, request id.
HEADER = struct.Struct("<II")
#: Bytes of the echoed frame: the header and an 8-byte body, about a 1-key request.
FRAME_BYTES = 16
#: Seconds the echo server may take to start, to stop, or to answer one frame.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
SOCKET_TIMEOUT_S = 30.0
RECEIVE_BUFFER = 64 * 1024
#: Which floor bounds which system: a Python server over raw TCP, or a Redis command.
FLOOR_OF = {"kvstore": "uvloop-echo", "redis-packed": "redis-ping", "redis-hash": "redis-ping"}
ROOT = Path(__file__).resolve().parent.parent


# -- the echo server (its own process) ------------------------------------------------


class EchoProtocol(asyncio.Protocol):
    """Writes back every byte it receives, as it arrives."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:  # as the fast path's server: no Nagle delay on small answers
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve_echo(port_file: Path) -> None:
    """Serve on 127.0.0.1, port 0, until SIGTERM or SIGINT; write the port and the event
    loop's class to ``port_file`` (JSON, replaced atomically) once listening."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, "127.0.0.1", 0)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = server.sockets[0].getsockname()[1]
    tmp = port_file.with_name(port_file.name + ".tmp")
    loop_class = f"{type(loop).__module__}.{type(loop).__qualname__}"
    tmp.write_text(json.dumps({"port": port, "loop": loop_class}))
    tmp.replace(port_file)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """The echo server process: ``python -m loadtests.floors --port-file PATH``."""
    parser = argparse.ArgumentParser(prog="python -m loadtests.floors", description=__doc__)
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve_echo(args.port_file))
    return 0


class EchoServer:
    """The echo server as a subprocess of this one, for a ``with`` block."""

    def __init__(self, workdir: Path) -> None:
        self.port_file = workdir / "echo.port"
        self.log_path = workdir / "echo.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        #: The server's event loop class, e.g. ``uvloop.Loop``.
        self.loop = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> EchoServer:
        self.port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "loadtests.floors", "--port-file", str(self.port_file)]
        # loadtests/ is a folder of the repository, not an installed package
        path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_until(
                lambda: self._alive() and self.port_file.exists(),
                START_TIMEOUT_S,
                "the echo server",
            )
            info = json.loads(self.port_file.read_text())
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        self.port, self.loop = info["port"], info["loop"]
        return self

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = self.log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"the echo server exited with {self.proc.returncode}:\n{log}")
        return True

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the floors as systems of the benchmark -------------------------------------------


class EchoFloor:
    """The bare uvloop echo round trip (``uvloop-echo``)."""

    name = "uvloop-echo"

    def __init__(self, server: EchoServer, frame_bytes: int = FRAME_BYTES) -> None:
        self.port = server.port
        self.server_pid = server.pid
        self.frame_bytes = frame_bytes
        #: What one round trip is, for the results and the tables.
        self.what = (
            f"a {frame_bytes}-byte frame echoed by a bare uvloop server ({server.loop}), "
            "blocking socket as kvstore's fast client (kvstore's floor)"
        )

    def reader(self) -> EchoReader:
        return EchoReader(self.port, self.frame_bytes)


class EchoReader:
    """One blocking socket to the echo server, used as kvstore's fast client uses its own."""

    __slots__ = ("body", "next_id", "sock", "view")

    def __init__(self, port: int, frame_bytes: int = FRAME_BYTES) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S)
        # Blocking, bounded by the kernel's SO_RCVTIMEO / SO_SNDTIMEO as in the fast
        # client: a Python socket timeout would add system calls to every round trip.
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wait = struct.pack("@ll", int(SOCKET_TIMEOUT_S), 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, wait)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, wait)
        self.body = bytes(max(0, frame_bytes - HEADER.size))
        self.next_id = 0
        self.view = memoryview(bytearray(RECEIVE_BUFFER))

    def lookup(self, keys: Any, names: Any) -> bytes:
        """One round trip of a ``FRAME_BYTES`` frame (``keys`` and ``names`` unused)."""
        return self.echo(self.body)

    def echo(self, body: bytes) -> bytes:
        """Send ``body`` in a frame (header: length, a new request id) and read the frame
        back; the body that came back. RuntimeError if other bytes come back."""
        self.next_id = request_id = (self.next_id + 1) & 0xFFFFFFFF
        frame = HEADER.pack(len(body), request_id) + body
        if len(frame) > len(self.view):
            raise ValueError(f"a frame of {len(frame)} bytes is over {len(self.view)}")
        self.sock.sendall(frame)
        view, got = self.view, 0
        while got < len(frame):
            try:
                n = self.sock.recv_into(view[got:])
            except BlockingIOError:  # the kernel's wait (SO_RCVTIMEO) ended
                raise TimeoutError(f"no echo within {SOCKET_TIMEOUT_S:.0f} s") from None
            if not n:
                raise ConnectionError("the echo server closed the connection")
            got += n
        if got != len(frame) or view[:got] != frame:
            raise RuntimeError(f"the echo server answered request {request_id} with other bytes")
        return bytes(view[HEADER.size : got])

    def close(self) -> None:
        self.sock.close()


class PingFloor:
    """Redis ``PING`` through redis-py on hiredis (``redis-ping``)."""

    name = "redis-ping"
    what = "PING, redis-py on hiredis (Redis's floor)"

    def __init__(self, server: Any) -> None:
        self.port = server.port
        self.server_pid = server.pid

    def reader(self) -> PingReader:
        return PingReader(self.port)


class PingReader:
    """One checked redis-py connection (``redis_client.connect``) sending PING."""

    __slots__ = ("conn",)

    def __init__(self, port: int) -> None:
        self.conn = connect(port)

    def lookup(self, keys: Any, names: Any) -> bool:
        """One PING round trip (``keys`` and ``names`` unused)."""
        if not self.conn.ping():
            raise RuntimeError("redis-server did not answer PONG")
        return True

    def close(self) -> None:
        self.conn.close()


def floor_ratios(latency: dict) -> dict:
    """Each system's latency over its floor, by batch size: ``{system: {batch: {"floor",
    "p50", "p99"}}}`` (p50 / the floor's p50, p99 / its p99; 1.0 = at the floor)."""
    floors = latency.get("floors", {})
    out: dict[str, dict] = {}
    for system, floor in FLOOR_OF.items():
        if system not in latency or floor not in floors:
            continue
        f = floors[floor]
        out[system] = {
            b: {
                "floor": floor,
                "p50": cell["p50_ms"] / f["p50_ms"],
                "p99": cell["p99_ms"] / f["p99_ms"],
            }
            for b, cell in latency[system].items()
        }
    return out


if __name__ == "__main__":
    sys.exit(main())
