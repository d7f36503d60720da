"""How the blocking Client drives a HedgedRead (kvstore.client.hedging) on the calling
thread: gRPC calls as futures whose ends come through a queue, or fast-path requests
on the thread's sockets, waited on with a selector; either way the wait ends at the
next hedge's time, so a slow part is hedged while the others are still out."""

from __future__ import annotations

import queue
import selectors
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from kvstore.client.fast import FastConnections, _Connection
from kvstore.client.hedging import HedgedRead
from kvstore.errors import DeadlineExceeded, KvstoreError, Unavailable
from kvstore.wire.frames import read_answer

__all__ = ["drive_fast", "drive_grpc"]

#: How long a new fast-path connection may take (s). Connecting blocks the thread (no
#: hedge meanwhile); a node that hangs (SIGSTOP) accepts connections until its backlog
#: fills, then not at all: past this, the part fails over to another replica.
CONNECT_TIMEOUT_S = 0.25


def _late(timeout: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"a read's replicas did not answer within the deadline of {timeout} s")


def drive_grpc(
    read: HedgedRead,
    stub: Callable[[str], Any],
    rpc_error: Callable[[grpc.RpcError, str, float], KvstoreError],
    timeout: float,
) -> None:
    """Run ``read`` over gRPC: ``stub(address)`` gives a node's stub, ``rpc_error`` turns
    a failed call into its KvstoreError."""
    deadline = time.monotonic() + timeout
    ended: queue.SimpleQueue[int] = queue.SimpleQueue()
    futures: dict[int, Any] = {}
    outstanding = read.core.outstanding

    def send(ids: list[int]) -> None:
        left = max(deadline - time.monotonic(), 0.001)
        for i in ids:
            call = read.calls[i]
            outstanding[call.address] = outstanding.get(call.address, 0) + 1
            future = getattr(stub(call.address), call.method).future(call.request, timeout=left)
            futures[i] = future
            future.add_done_callback(lambda _, i=i: ended.put(i))

    try:
        send(read.start())
        while not read.done:
            now = time.monotonic()
            if now >= deadline:
                raise _late(timeout)
            try:
                i = ended.get(timeout=max(min(read.next_due(), deadline) - now, 0))
            except queue.Empty:
                send(read.hedge())
                continue
            future = futures.pop(i)
            address = read.calls[i].address
            outstanding[address] -= 1
            try:
                outcome = future.result()
            except grpc.RpcError as exc:
                outcome = rpc_error(exc, address, timeout)
            send(read.answered(i, outcome))
    finally:
        for i, future in futures.items():  # losers of hedges, or all on an error
            future.cancel()
            outstanding[read.calls[i].address] -= 1


def drive_fast(
    read: HedgedRead, connections: FastConnections, fast: Mapping[str, str], timeout: float
) -> None:
    """Run ``read`` over the fast read path: ``fast`` maps a node's gRPC address to its
    fast one. A connection left with an answer nobody reads is closed at the end."""
    deadline = time.monotonic() + timeout
    selector = selectors.DefaultSelector()
    #: connection → (call id, request id) in the order sent (a node answers in order).
    waiting: dict[_Connection, deque[tuple[int, int]]] = {}
    #: Connections of this read's own, closed once answered: a blocking connection
    #: reads one answer per receive (a second one already in its socket buffer would
    #: be "bytes after an answer"), so a call to a node that has one of this read's
    #: calls waiting on the thread's connection (a failover or hedge sent to it) goes
    #: on a connection of its own.
    spare: set[_Connection] = set()
    failed: deque[tuple[int, KvstoreError]] = deque()
    outstanding = read.core.outstanding

    def send(ids: list[int]) -> None:
        for i in ids:
            call = read.calls[i]
            outstanding[call.address] = outstanding.get(call.address, 0) + 1
            address = fast[call.address]
            try:
                try:
                    conn = connections._connection(address, CONNECT_TIMEOUT_S)
                    if conn in waiting:  # see spare
                        conn = _Connection(address, CONNECT_TIMEOUT_S)
                        spare.add(conn)
                except DeadlineExceeded as exc:  # a hung node's full backlog: fail over
                    raise Unavailable(str(exc)) from None
                body = call.request.SerializeToString()
                # conn has no request waiting: a failed send loses only this call
                request_id = connections._send(conn, body, deadline, timeout)
            except KvstoreError as exc:  # _send dropped the connection
                outstanding[call.address] -= 1
                failed.append((i, exc))
                continue
            if conn not in waiting:
                waiting[conn] = deque()
                selector.register(conn.sock, selectors.EVENT_READ, conn)
            waiting[conn].append((i, request_id))

    def forget(conn: _Connection) -> None:
        selector.unregister(conn.sock)
        del waiting[conn]
        if conn in spare:
            spare.discard(conn)
            conn.close()

    def lost(conn: _Connection, error: KvstoreError) -> None:
        """``conn`` was dropped: every request still waiting on it failed."""
        for i, _ in waiting[conn]:
            outstanding[read.calls[i].address] -= 1
            failed.append((i, error))
        forget(conn)

    try:
        send(read.start())
        while not read.done:
            if failed:
                i, error = failed.popleft()
                send(read.answered(i, error))
                continue
            now = time.monotonic()
            if now >= deadline:
                raise _late(timeout)
            ready = selector.select(max(min(read.next_due(), deadline) - now, 0))
            if not ready:
                send(read.hedge())
                continue
            for key, _ in ready:
                conn = key.data
                if conn not in waiting:  # lost meanwhile (a send on it failed)
                    continue
                i, request_id = waiting[conn].popleft()
                outstanding[read.calls[i].address] -= 1
                try:
                    status, body = connections._receive(conn, request_id, deadline, timeout)
                except KvstoreError as exc:  # the connection was dropped: so are the rest
                    failed.append((i, exc))
                    lost(conn, exc)
                    continue
                if not waiting[conn]:
                    forget(conn)
                try:
                    outcome: Any = read_answer(status, body)
                except KvstoreError as exc:
                    outcome = exc
                send(read.answered(i, outcome))
    finally:
        for conn, sent in waiting.items():  # answers nobody will read: close
            for i, _ in sent:
                outstanding[read.calls[i].address] -= 1
            selector.unregister(conn.sock)
            connections._drop(conn)
        selector.close()
