"""The client end of the fast read path (docs/fast-path.md): Get over plain TCP.

One connection per node per thread (a blocking socket with TCP_NODELAY); requests of
one batch that go to several nodes are all sent before any answer is read, so the
nodes work in parallel.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

from kvstore.errors import DeadlineExceeded, KvstoreError, Unavailable, error_from_name
from kvstore.v1 import feature_store_pb2 as pb

__all__ = ["FastConnections"]

REQUEST_HEADER = struct.Struct("<II")
RESPONSE_HEADER = struct.Struct("<IIB")
#: Bytes of the per-connection receive buffer: a 100-key answer of the benchmark's
#: table (~42 KB) fits.
RECEIVE_BUFFER = 64 * 1024


class _Connection:
    __slots__ = ("address", "buffer", "next_id", "sock")

    def __init__(self, address: str, timeout: float) -> None:
        host, _, port = address.rpartition(":")
        self.address = address
        self.next_id = 0
        try:
            self.sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"fast read path of node {address}: no connection within {timeout} s"
            ) from None
        except OSError as exc:
            raise Unavailable(f"fast read path of node {address} is unavailable: {exc}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        #: Where a response lands: the header and, up to its size, the body arrive in
        #: one recv (one system call instead of two for most answers).
        self.buffer = bytearray(RECEIVE_BUFFER)

    def send(self, body: bytes, timeout: float) -> int:
        self.next_id = (self.next_id + 1) & 0xFFFFFFFF
        self.sock.settimeout(timeout)
        self.sock.sendall(REQUEST_HEADER.pack(len(body), self.next_id) + body)
        return self.next_id

    def receive(self, request_id: int, timeout: float) -> tuple[int, bytes]:
        self.sock.settimeout(timeout)
        view = memoryview(self.buffer)
        got = self._fill(view, 0, RESPONSE_HEADER.size)
        length, answered, status = RESPONSE_HEADER.unpack_from(view)
        end = RESPONSE_HEADER.size + length
        if got > end:
            raise Unavailable(
                f"fast read path of node {self.address}: {got - end} bytes after an answer"
            )
        if end <= len(view):
            self._fill(view, got, end, exact=True)
            body = bytes(view[RESPONSE_HEADER.size : end])
        else:  # larger than the buffer: the body gets its own
            large = bytearray(length)
            start = got - RESPONSE_HEADER.size
            large[:start] = view[RESPONSE_HEADER.size : got]
            self._fill(memoryview(large), start, length, exact=True)
            body = bytes(large)
        if answered != request_id:
            raise Unavailable(
                f"fast read path of node {self.address}: answer {answered} to request {request_id}"
            )
        return status, body

    def _fill(self, view: memoryview, got: int, need: int, exact: bool = False) -> int:
        """Receive into ``view`` from ``got`` until at least ``need`` bytes are there
        (exactly ``need`` when ``exact``); returns how many are."""
        while got < need:
            k = self.sock.recv_into(view[got:need] if exact else view[got:])
            if not k:
                raise ConnectionError("the node closed the connection")
            got += k
        return got

    def close(self) -> None:
        self.sock.close()


class FastConnections:
    """Fast-path connections of one client, per thread and node."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list[_Connection] = []
        self._lock = threading.Lock()

    def _connection(self, address: str, timeout: float) -> _Connection:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(address)
        if conn is None:
            conn = conns[address] = _Connection(address, timeout)
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop(self, conn: _Connection) -> None:
        self._local.conns.pop(conn.address, None)
        conn.close()

    def get_many(self, calls: list[tuple[str, pb.GetRequest]], timeout: float) -> list[Any]:
        """GetResponses for (fast address, request) pairs; errors as KvstoreError."""
        deadline = time.monotonic() + timeout
        sent = []
        for address, request in calls:
            conn = self._connection(address, timeout)
            try:
                sent.append((conn, conn.send(request.SerializeToString(), timeout)))
            except OSError as exc:
                self._drop(conn)
                raise Unavailable(f"fast read path of node {address}: {exc}") from None
        out = []
        for conn, request_id in sent:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                status, body = conn.receive(request_id, remaining)
            except TimeoutError:
                self._drop(conn)
                raise DeadlineExceeded(
                    f"node {conn.address} did not answer within the deadline of {timeout} s"
                ) from None
            except (OSError, KvstoreError) as exc:
                self._drop(conn)
                raise Unavailable(f"fast read path of node {conn.address}: {exc}") from None
            if status:
                error = pb.FastError.FromString(body)
                raise error_from_name(error.type, error.message)
            out.append(pb.GetResponse.FromString(body))
        return out

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()
