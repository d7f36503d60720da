"""The asyncio end of the fast read path (docs/fast-path.md): Get over plain TCP, pipelined.

One connection per node per event loop, shared by every task of that loop. Each
request frame carries a request id (``kvstore.wire.frames``); the connection's
protocol splits the answers as they arrive and hands each to the future waiting on that
id, so 64 tasks have 64 requests in flight on one connection and none waits for
another's answer to be read. A node answers one connection's requests in order, but nothing
here relies on it: an answer whose id nobody waits on (its call was cancelled or
ran past its deadline) is dropped, and the connection serves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
from typing import Any

from kvstore._codec import AnswerReader, take_answer
from kvstore.client.fast import connect_error, late
from kvstore.errors import KvstoreError, Unavailable
from kvstore.wire.frames import REQUEST_HEADER, read_answer

__all__ = ["AsyncFastConnections"]


#: Bytes of a connection's receive buffer: a few 100-key answers of the benchmark's
#: table (~42 KB each) fit; a larger answer gets a larger one.
RECEIVE_BUFFER = 256 * 1024
#: The least room a read gets: less, and the unread bytes move to the buffer's front.
MIN_READ = 64 * 1024
#: A buffer grown past this for a large answer shrinks back once it is read (bytes).
LARGEST_IDLE_BUFFER = 1024 * 1024
#: Request ids wrap at 2**32 (a u32 in the frame).
ID_MASK = 0xFFFFFFFF
#: Calls in a row a connection may answer from its socket at once, without a pass of
#: the event loop (see AsyncFastConnections.get_answer); then one call waits for the
#: loop, so a task that loops on gets lets the loop's other tasks and timers run.
EAGER_RUN = 16
#: The most keys of a call that looks for its answer at once: the node answers a few
#: keys while the request's send is in the kernel (measured here: the answer was there
#: for 93-99% of 1-3 key calls, 80% at 4-6 keys, 56% at 8, 22% at 10, 1% at 100), and
#: a look that finds nothing is not free (it cost a 100-key get 2-3 µs, read in Python).
EAGER_KEYS = 8
#: After a look that found nothing, the calls that do not look (a node slower than the
#: send, a busy machine), before one looks again.
EAGER_BACKOFF = 4


class _Pipeline(AnswerReader, asyncio.BufferedProtocol):
    """One connection to one node's fast path: requests written as they come, answers
    matched to their waiting futures by request id.

    A BufferedProtocol: the loop reads straight into ``buffer``, and each answer's body
    is copied out of it once, for its caller to read in C as ``Client`` does (a plain
    Protocol's ``data_received`` gets a new bytes object per read, and an answer that
    spans reads was copied twice more to join it). Its reading half, ``get_buffer``
    and ``buffer_updated``, is ``_codec.AnswerReader``, in C: ``buffer``, ``view``,
    ``start``, ``have``, ``need`` and ``waiting`` (request id → (the future of the
    call waiting on its answer, its deadline in loop time s, its timeout s); an
    answered call leaves with its answer)."""

    def __init__(self, address: str) -> None:
        AnswerReader.__init__(self, RECEIVE_BUFFER, MIN_READ, LARGEST_IDLE_BUFFER)
        self.address = address
        self.transport: asyncio.Transport | None = None
        #: The connection's socket, a duplicate of the transport's descriptor: a request
        #: is sent with it at once when the transport has nothing queued (see submit).
        self.sock: socket.socket | None = None
        self.next_id = 0
        #: Why the connection is no longer usable (None while it is).
        self.lost: KvstoreError | None = None
        #: The one timer of the connection's deadlines, and when it wakes (see submit).
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf
        #: Calls that may still be answered at once before one waits for the loop.
        self.eager = EAGER_RUN
        #: Calls that will not look for their answer at once (see EAGER_BACKOFF).
        self.backoff = 0
        #: Bytes take_answer read into the buffer, not handed out yet.
        self.unread = 0

    # -- asyncio.BufferedProtocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:  # asyncio and uvloop set it already; one call to be sure
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # The same open socket (a dup shares its non-blocking mode), for send()
            self.sock = socket.socket(fileno=os.dup(sock.fileno()))
            # Not a timed socket under socket.setdefaulttimeout(): a full send buffer must
            # give EAGAIN (the transport takes the frame), never a wait on the loop.
            self.sock.setblocking(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._close_sock()
        why = f": {exc}" if exc else ""
        self.fail(Unavailable(f"fast read path of node {self.address}: connection closed{why}"))

    # -- calls ---------------------------------------------------------------------------

    def fail(self, error: KvstoreError) -> None:
        """Fail every waiting call with ``error``; no call is accepted after."""
        if self.lost is None:
            self.lost = error
        waiting, self.waiting = self.waiting, {}
        for future, _, _ in waiting.values():
            if not future.done():
                future.set_exception(error)
        if self.timer is not None:
            self.timer.cancel()
            self.timer, self.timer_at = None, math.inf

    def submit(
        self, body: bytes, loop: asyncio.AbstractEventLoop, deadline: float, timeout: float
    ) -> tuple[int, asyncio.Future]:
        """Write a request frame of ``body``; its id and the future of its answer (the
        GetResponse, or the node's error as its KvstoreError), failed with
        DeadlineExceeded at ``deadline`` (loop time, s) naming ``timeout`` (s), the
        call's (``send``, then ``expect``)."""
        request_id = self.send(body)
        return request_id, self.expect(request_id, loop, deadline, timeout)

    def send(self, body: bytes) -> int:
        """Write a request frame of ``body``; its request id. Its answer is taken by
        ``take_answer`` or, for a future, by ``expect``, before the loop runs again."""
        transport = self.transport
        if self.lost is not None or transport is None or transport.is_closing():
            raise self.lost or Unavailable(f"fast read path of node {self.address}: closed")
        self.next_id = request_id = (self.next_id + 1) & ID_MASK
        frame = REQUEST_HEADER.pack(len(body), request_id) + body
        sock = self.sock
        if sock is not None and not transport.get_write_buffer_size():
            # uvloop queues a small write until the loop's next turn (its check phase):
            # sent now, the request is on its way an event-loop iteration sooner.
            try:
                sent = sock.send(frame)
            except OSError:  # full (BlockingIOError), or broken: the transport reports it
                sent = 0
            if sent < len(frame):
                transport.write(frame[sent:])
        else:  # behind queued bytes: after them
            transport.write(frame)
        return request_id

    def take_answer(self, request_id: int) -> tuple[int, bytes] | None:
        """The answer to ``request_id`` (its status and a copy of its body) when the
        socket holds it whole now and nothing else, read as the loop would once it
        polls; else None, and whatever was read waits in the buffer for ``expect``.
        For a call alone on the connection (nothing waiting, nothing half read). The
        read is ``_codec.take_answer``'s: Python's ``recv_into`` would raise (and cost
        ~0.7 µs) when nothing is there yet."""
        sock = self.sock
        if sock is None or self.have:
            return None
        try:
            got = take_answer(sock.fileno(), self.view, request_id)
        except OSError as exc:  # reset: the connection is done for
            self.fail(Unavailable(f"fast read path of node {self.address}: {exc}"))
            if self.transport is not None:
                self.transport.abort()
            return None
        if isinstance(got, tuple):
            return got
        if got > 0:  # part of it, or more: for buffer_updated, from expect
            self.unread = got
        # -1: nothing yet, the loop will wait; 0: the node's end of the connection,
        # which the transport's next read sees too
        return None

    def expect(
        self, request_id: int, loop: asyncio.AbstractEventLoop, deadline: float, timeout: float
    ) -> asyncio.Future:
        """The future of the answer to the request ``request_id`` just sent, failed with
        DeadlineExceeded at ``deadline`` (loop time, s) naming ``timeout`` (s).

        One timer per connection, not one per call (a loop timer costs several µs to
        start and cancel, a good part of a call here), and no queue of deadlines (a heap
        push per call, and answered calls' entries to prune): the timer wakes at the
        earliest deadline of a call when it was armed, which calls with one timeout
        leave where it is; when it wakes it fails the calls past their deadline and
        is armed at the earliest left. Calls with one timeout T wake it once per T s."""
        future = loop.create_future()
        if self.lost is not None:  # take_answer found the connection reset
            future.set_exception(self.lost)
            return future
        self.waiting[request_id] = (future, deadline, timeout)
        if deadline < self.timer_at:
            self._arm(loop, deadline)
        if self.unread:  # what take_answer read: this call's answer, maybe, or a part
            got, self.unread = self.unread, 0
            self.buffer_updated(got)
        return future

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = loop.call_at(when, self._expire, loop)
        self.timer_at = when

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the calls whose deadline passed (an answer that comes for one later is
        dropped); wake again at the next deadline."""
        self.timer, self.timer_at = None, math.inf
        waiting = self.waiting
        now = loop.time()
        earliest = math.inf
        for request_id, (future, deadline, timeout) in list(waiting.items()):
            if deadline <= now:
                del waiting[request_id]
                if not future.done():
                    future.set_exception(late(self.address, timeout))
            elif deadline < earliest:
                earliest = deadline
        if earliest < math.inf:
            self._arm(loop, earliest)

    def _close_sock(self) -> None:
        if self.sock is not None:
            self.sock.close()  # the duplicate only: the transport closes its own
            self.sock = None

    def close(self) -> None:
        self._close_sock()
        if self.transport is not None:
            # RuntimeError: its loop is closed; the socket closes with the transport
            with contextlib.suppress(RuntimeError):
                self.transport.close()


class AsyncFastConnections:
    """Fast-path connections of one AsyncClient: per event loop and node."""

    def __init__(self) -> None:
        #: event loop → address → its connection, or the task still opening it.
        self._by_loop: dict[asyncio.AbstractEventLoop, dict[str, Any]] = {}

    def _loop_connections(self, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        conns = self._by_loop.get(loop)
        if conns is None:
            for old in [lp for lp in list(self._by_loop) if lp.is_closed()]:
                for conn in self._by_loop.pop(old).values():
                    if isinstance(conn, _Pipeline):
                        conn.close()
            conns = self._by_loop[loop] = {}
        return conns

    async def _connection(
        self, loop: asyncio.AbstractEventLoop, address: str, timeout: float
    ) -> _Pipeline:
        conns = self._loop_connections(loop)
        conn = conns.get(address)
        if conn is None or (isinstance(conn, _Pipeline) and conn.lost is not None):
            # One task opens it; the others that come meanwhile await the same task.
            conn = conns[address] = loop.create_task(self._open(address, timeout))
        if isinstance(conn, _Pipeline):
            return conn
        try:
            opened = await asyncio.shield(conn)
        except KvstoreError:
            if conns.get(address) is conn:
                del conns[address]  # the next call tries again
            raise
        if conns.get(address) is conn:
            conns[address] = opened
        return opened

    @staticmethod
    async def _open(address: str, timeout: float) -> _Pipeline:
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Pipeline(address), host.strip("[]"), int(port)
                )
        except OSError as exc:  # asyncio.timeout's TimeoutError too
            raise connect_error(address, timeout, exc) from None
        return conn

    async def get(self, address: str, body: bytes, timeout: float) -> Any:
        """The GetResponse to one serialized GetRequest sent to ``address`` (a fast-path
        address), within ``timeout`` s; errors as KvstoreError."""
        return read_answer(*await self.get_answer(address, body, timeout))

    async def get_answer(
        self, address: str, body: bytes, timeout: float, keys: int = 0
    ) -> tuple[int, bytes]:
        """The answer's status and body (``kvstore.wire.frames``) to one serialized
        GetRequest of ``keys`` keys (0: not known) sent to ``address`` within
        ``timeout`` s; the transport's errors as KvstoreError (the node's are in the
        answer: ``Operations.finish_frame`` or ``read_answer`` raise them)."""
        loop = asyncio.get_running_loop()
        conns = self._by_loop.get(loop)
        conn = conns.get(address) if conns is not None else None
        if conn is None or conn.__class__ is not _Pipeline or conn.lost is not None:
            conn = await self._connection(loop, address, timeout)
        request_id = conn.send(body)
        # Alone on the connection, a small get's answer is most often there by the time
        # the send returns (the node answers a 1-key get in a few µs, while the send is
        # in the kernel): taken now, without a future, the timer or a pass of the loop
        # (its poll, the read callback, the task's wake-up: ~2 µs of a ~20 µs get).
        # With other calls in flight, the loop's reads serve them all.
        if 0 < keys <= EAGER_KEYS and conn.eager and not conn.waiting:
            if conn.backoff:
                conn.backoff -= 1
            else:
                answer = conn.take_answer(request_id)
                if answer is not None:
                    conn.eager -= 1
                    return answer
                conn.backoff = EAGER_BACKOFF
        future = conn.expect(request_id, loop, loop.time() + timeout, timeout)
        if not future.done():
            conn.eager = EAGER_RUN  # this call lets the loop run
        try:
            return await future
        finally:
            # Cancelled, expired or answered: nobody waits on this id any more.
            conn.waiting.pop(request_id, None)

    async def get_many(
        self, calls: list[tuple[str, Any]], timeout: float, settled: bool = False
    ) -> list[Any]:
        """GetResponses for (fast address, GetRequest) pairs, within ``timeout`` s; errors
        as KvstoreError. Every request is written before any answer is awaited, so the
        nodes work in parallel. ``settled``: each call's KvstoreError in its place
        instead of raising the first."""
        if settled:
            return await self._get_settled(calls, timeout)
        loop = asyncio.get_running_loop()
        conns = [await self._connection(loop, address, timeout) for address, _ in calls]
        sent: list[tuple[_Pipeline, int, asyncio.Future]] = []
        deadline = loop.time() + timeout
        try:
            for conn, (_, request) in zip(conns, calls, strict=True):
                body = request.SerializeToString()
                sent.append((conn, *conn.submit(body, loop, deadline, timeout)))
            return [read_answer(*await future) for _, _, future in sent]
        finally:
            for conn, request_id, future in sent:
                conn.waiting.pop(request_id, None)
                if not future.done():
                    future.cancel()

    async def _get_settled(self, calls: list[tuple[str, Any]], timeout: float) -> list[Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sent: list[Any] = []  # per call: (connection, request id, future) or its error
        out: list[Any] = []
        try:
            for address, request in calls:
                try:
                    conn = await self._connection(loop, address, timeout)
                    body = request.SerializeToString()
                    sent.append((conn, *conn.submit(body, loop, deadline, timeout)))
                except KvstoreError as exc:
                    sent.append(exc)
            for item in sent:
                if isinstance(item, KvstoreError):
                    out.append(item)
                    continue
                try:
                    out.append(read_answer(*await item[2]))
                except KvstoreError as exc:
                    out.append(exc)
            return out
        finally:
            for item in sent:
                if not isinstance(item, KvstoreError):
                    conn, request_id, future = item
                    conn.waiting.pop(request_id, None)
                    if not future.done():
                        future.cancel()

    def close(self) -> None:
        """Close every connection of this client (those of loops other than the running
        one are closed from their loop, if it still runs)."""
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, conns in self._by_loop.items():
            for conn in conns.values():
                if isinstance(conn, _Pipeline):
                    if loop is current or loop.is_closed():
                        conn.close()
                    else:
                        loop.call_soon_threadsafe(conn.close)
                elif not conn.done():
                    conn.cancel()
        self._by_loop.clear()
