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

from kvstore._codec import unfilled_bytes
from kvstore.errors import DeadlineExceeded, KvstoreError, Unavailable
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.wire.frames import REQUEST_HEADER, RESPONSE_HEADER, read_answer

__all__ = ["FastConnections"]

#: Bytes of the per-connection receive buffer: a 100-key answer of the benchmark's
#: table (~42 KB) fits.
RECEIVE_BUFFER = 64 * 1024
TIMEVAL = struct.Struct("@ll")
#: A connection's armed wait is ARM_SHARE of the time a call has left, at most
#: MAX_ARM, and is armed again when it exceeds ARM_LIMIT of what is left (so calls
#: with one timeout arm it once).
ARM_SHARE = 0.8
ARM_LIMIT = 0.9
MAX_ARM = 0.1


def connect_error(address: str, timeout: float, exc: OSError) -> KvstoreError:
    """What a failed connection to the fast-path address ``address`` raises, for both
    clients: a timeout (``timeout`` s) is DeadlineExceeded, anything else Unavailable."""
    if isinstance(exc, TimeoutError):
        return DeadlineExceeded(
            f"fast read path of node {address}: no connection within {timeout} s"
        )
    return Unavailable(f"fast read path of node {address} is unavailable: {exc}")


def late(address: str, timeout: float) -> DeadlineExceeded:
    """What a fast-path call that ``address`` did not answer within ``timeout`` s raises."""
    return DeadlineExceeded(f"node {address} did not answer within the deadline of {timeout} s")


def _timeval(seconds: float) -> bytes:
    """A socket timeout as the kernel's struct timeval (never 0, which means none)."""
    usec = max(1, int(seconds * 1e6))
    return TIMEVAL.pack(usec // 1_000_000, usec % 1_000_000)


class _Connection:
    """One blocking socket to one node's fast path.

    The deadline is the kernel's: SO_RCVTIMEO / SO_SNDTIMEO bound each blocking send and
    receive. A Python socket timeout would instead cost two more system calls per send
    or receive (setting the mode, then poll before each), ~4 µs a call, doubled under
    contention. The wait is set only when a call needs a shorter one than the one
    armed, so calls with one timeout set it once. The kernel's timer may fire up to
    ~1/8 late, so the armed wait is ``ARM_SHARE`` of the time left (at most
    ``MAX_ARM``), and a wait that ends before the deadline is armed again with the
    rest: a call fails a few ms at most after its deadline, never before it. (A signal
    handler interrupts a wait and Python restarts it whole: a process that gets signals
    more often than every ``MAX_ARM`` s can wait past a dead node's deadline.)
    """

    __slots__ = ("address", "armed", "buffer", "next_id", "sock", "view")

    def __init__(self, address: str, timeout: float) -> None:
        host, _, port = address.rpartition(":")
        self.address = address
        self.next_id = 0
        try:
            self.sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        except OSError as exc:
            raise connect_error(address, timeout, exc) from None
        self.sock.settimeout(None)  # blocking: each call's deadline is armed (see arm)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        #: The kernel's wait for one send or receive, s (0: not armed yet).
        self.armed = 0.0
        #: Where a response lands: the header and, up to its size, the body arrive in
        #: one recv (one system call instead of two for most answers).
        self.buffer = bytearray(RECEIVE_BUFFER)
        self.view = memoryview(self.buffer)

    def arm(self, deadline: float, woke_early: bool = False) -> None:
        """Bound the next blocking send or receive by ``deadline`` (time.monotonic);
        TimeoutError if it has passed. ``woke_early``: the armed wait ended first."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        if woke_early or not self.armed or self.armed > remaining * ARM_LIMIT:
            self.armed = min(remaining * ARM_SHARE, MAX_ARM)
            tv = _timeval(self.armed)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)

    def send(self, body: bytes, deadline: float) -> int:
        """Send a request frame; its id. TimeoutError past ``deadline``."""
        self.next_id = request_id = (self.next_id + 1) & 0xFFFFFFFF
        frame = REQUEST_HEADER.pack(len(body), request_id) + body
        self.arm(deadline)
        try:
            sent = self.sock.send(frame)
        except BlockingIOError:  # the armed wait ended with the buffers full
            sent = -1
        if sent != len(frame):  # most frames go whole; the rest, piece by piece
            self._send_rest(memoryview(frame), max(sent, 0), sent < 0, deadline)
        return request_id

    def _send_rest(self, frame: memoryview, sent: int, woke_early: bool, deadline: float) -> None:
        while sent < len(frame):
            self.arm(deadline, woke_early)
            try:
                sent += self.sock.send(frame[sent:])
                woke_early = False
            except BlockingIOError:
                woke_early = True

    def receive(self, request_id: int, deadline: float) -> tuple[int, bytes]:
        """The status and body of the answer to ``request_id``; TimeoutError past
        ``deadline`` (time.monotonic)."""
        view = self.view
        self.arm(deadline)
        try:  # most answers come whole, in one recv
            got = self.sock.recv_into(view)
        except BlockingIOError:
            got = self._fill(view, 0, RESPONSE_HEADER.size, deadline, True)
        else:
            if not got:
                raise ConnectionError("the node closed the connection")
            if got < RESPONSE_HEADER.size:
                got = self._fill(view, got, RESPONSE_HEADER.size, deadline)
        length, answered, status = RESPONSE_HEADER.unpack_from(view)
        end = RESPONSE_HEADER.size + length
        if got > end:
            raise Unavailable(
                f"fast read path of node {self.address}: {got - end} bytes after an answer"
            )
        if end <= len(view):
            if got < end:
                self._fill(view[:end], got, end, deadline)
            body = bytes(view[RESPONSE_HEADER.size : end])
        else:  # larger than the buffer: received straight into the body's own bytes
            body, large = unfilled_bytes(length)
            start = got - RESPONSE_HEADER.size
            large[:start] = view[RESPONSE_HEADER.size : got]
            self._fill(large, start, length, deadline, wait_all=True)
            large.release()
        if answered != request_id:
            raise Unavailable(
                f"fast read path of node {self.address}: answer {answered} to request {request_id}"
            )
        return status, body

    def _fill(
        self,
        view: memoryview,
        got: int,
        need: int,
        deadline: float,
        woke_early: bool = False,
        wait_all: bool = False,
    ) -> int:
        """Receive into ``view`` from ``got`` until at least ``need`` bytes are there
        (never past the view's end); returns how many are. ``woke_early``: the last
        armed wait ended before the deadline. ``wait_all``: the view's end is ``need``,
        so each receive waits for all of it (MSG_WAITALL: one system call for a large
        answer, not one per packet; it returns less when the armed wait ends)."""
        recv_into = self.sock.recv_into
        flags = socket.MSG_WAITALL if wait_all else 0
        while got < need:
            self.arm(deadline, woke_early)
            try:
                k = recv_into(view[got:] if got else view, 0, flags)
            except BlockingIOError:  # the armed wait ended: arm what is left
                woke_early = True
                continue
            if not k:
                raise ConnectionError("the node closed the connection")
            got += k
            woke_early = False
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
        try:
            conns = self._local.conns
        except AttributeError:
            conns = self._local.conns = {}
        conn = conns.get(address)
        if conn is None:
            conn = conns[address] = _Connection(address, timeout)
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop(self, conn: _Connection) -> None:
        conns = self._local.conns
        if conns.get(conn.address) is conn:
            del conns[conn.address]
        conn.close()

    def get(self, address: str, body: bytes, timeout: float) -> Any:
        """The GetResponse to one serialized GetRequest sent to ``address``; errors as
        KvstoreError."""
        return read_answer(*self.get_answer(address, body, timeout))

    def get_answer(self, address: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        """The answer's status and body (``kvstore.wire.frames``) to one serialized
        GetRequest sent to ``address``; the transport's errors as KvstoreError."""
        deadline = time.monotonic() + timeout
        conn = self._connection(address, timeout)
        request_id = self._send(conn, body, deadline, timeout)
        return self._receive(conn, request_id, deadline, timeout)

    def get_many(
        self, calls: list[tuple[str, pb.GetRequest]], timeout: float, settled: bool = False
    ) -> list[Any]:
        """GetResponses for (fast address, request) pairs; errors as KvstoreError. Every
        request is sent before any answer is read, so the nodes work in parallel.
        ``settled``: each call's KvstoreError in its place instead of raising the first."""
        if settled:
            return self._get_settled(calls, timeout)
        deadline = time.monotonic() + timeout
        sent: list[tuple[_Connection, int]] = []
        try:
            for address, request in calls:
                conn = self._connection(address, timeout)
                body = request.SerializeToString()
                sent.append((conn, self._send(conn, body, deadline, timeout)))
            out = []
            for k, (conn, request_id) in enumerate(sent):
                answer = self._receive(conn, request_id, deadline, timeout)
                sent[k] = (conn, -1)  # answered
                out.append(read_answer(*answer))
            return out
        except KvstoreError:
            # A connection whose answer was not read would hand it to the next call.
            for conn, request_id in sent:
                if request_id >= 0:
                    self._drop(conn)
            raise

    def _get_settled(self, calls: list[tuple[str, pb.GetRequest]], timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        sent: list[Any] = []  # per call: (connection, request id) or its error
        for address, request in calls:
            try:
                conn = self._connection(address, timeout)
                sent.append(
                    (conn, self._send(conn, request.SerializeToString(), deadline, timeout))
                )
            except KvstoreError as exc:
                sent.append(exc)
        out: list[Any] = []
        for item in sent:
            if isinstance(item, KvstoreError):
                out.append(item)
                continue
            conn, request_id = item
            try:  # _receive drops the connection on a failure
                out.append(read_answer(*self._receive(conn, request_id, deadline, timeout)))
            except KvstoreError as exc:
                out.append(exc)
        return out

    def _send(self, conn: _Connection, body: bytes, deadline: float, timeout: float) -> int:
        try:
            return conn.send(body, deadline)
        except TimeoutError:
            self._drop(conn)
            raise late(conn.address, timeout) from None
        except OSError as exc:
            self._drop(conn)
            raise Unavailable(f"fast read path of node {conn.address}: {exc}") from None

    def _receive(
        self, conn: _Connection, request_id: int, deadline: float, timeout: float
    ) -> tuple[int, bytes]:
        try:
            return conn.receive(request_id, deadline)
        except TimeoutError:
            self._drop(conn)
            raise late(conn.address, timeout) from None
        except (OSError, KvstoreError) as exc:
            self._drop(conn)
            raise Unavailable(f"fast read path of node {conn.address}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()
