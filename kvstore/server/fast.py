"""The fast read path: Get over plain TCP, for the latency gRPC's HTTP/2 layer costs.

gRPC in Python costs about 400 µs a round trip on loopback here, raw TCP about 75 µs
(DESIGN.md). So besides gRPC, a node serves Get on a second port with the smallest
framing that works (``kvstore.wire.frames``, docs/fast-path.md): a GetRequest in, a
GetResponse or a FastError out. Requests on one connection are answered in order.
The answer is built by the same ``get_response`` the gRPC servicer uses; only the
transport differs. Two shortcuts answer the common requests in C, without a protobuf
object, with the rows in request order: with the hot-row cache on, a request whose keys
are all cached is answered from it (``HotRows.answer_frame``, kvstore.server.hot_rows);
with it off, a small get of an int64-keyed table's current version is read from the
shards (``_codec.answer_read``, the ``ReadTable`` a full-path answer of the table
left in ``FastServer.read_tables``). Any other request, error or doubt takes the full
path.
"""

from __future__ import annotations

import asyncio
import logging

from google.protobuf.message import DecodeError

from kvstore import _codec
from kvstore.errors import InvalidArgument, KvstoreError, RequestTooLarge
from kvstore.server.node import Node
from kvstore.server.servicer import get_response
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.wire.frames import REQUEST_HEADER, RESPONSE_HEADER, STATUS_OK, error_frame

logger = logging.getLogger(__name__)

__all__ = ["FastGetProtocol", "FastServer", "read_table", "refresh_read_table"]


def read_table(node: Node, name: str) -> _codec.ReadTable | None:
    """What ``_codec.answer_read`` answers ``name``'s gets with: its current version's
    shards as the node holds them now; None for a table it cannot answer (string keys,
    gone). Gets of ``parallel_read_keys`` keys or more are read on the node's read
    threads (``Reads.fetch``), as the full path reads them."""
    table = node.tables.get(name)
    if table is None or table.schema.key_type != "int64":
        return None
    config = node.config
    reads = node.reads
    entry = table.entry
    schema = entry.schema
    version = entry.current
    base = table.base(version) if version else None
    snapshot = table.versions[version].snapshot_time_us if version else _codec.NO_DELETE
    return _codec.ReadTable(
        table,
        entry,
        schema,
        version,
        base,
        table.delta,
        snapshot,
        schema.layout,
        schema.ttl_us,
        schema.schema_id,
        [f.name for f in schema.features],
        node.stats[name],
        config.max_keys_per_request,
        fetch=None if reads.pool is None else reads.fetch,
        parallel_keys=config.parallel_read_keys,
    )


def refresh_read_table(read_tables: dict[str, _codec.ReadTable], node: Node, name: str) -> None:
    """After a full-path answer of table ``name``: its ReadTable made again if it no
    longer ``holds`` (the table's first read, a new version, a dropped table...), so that
    the next gets are answered in C."""
    held = read_tables.get(name)
    if held is not None and held.holds(node.tables):
        return
    for gone in [held_name for held_name in read_tables if held_name not in node.tables]:
        del read_tables[gone]  # a dropped table's shards and stats are not kept alive
    try:
        fresh = read_table(node, name)
    except Exception:
        # The full path answered; only the C path's copy could not be made (e.g. the
        # current version's base cannot be opened while a pinned read succeeded).
        logger.exception("fast path: table %r stays on the full path", name)
        fresh = None
    if fresh is None:
        read_tables.pop(name, None)
    else:
        read_tables[name] = fresh


class FastGetProtocol(asyncio.Protocol):
    """One client connection of the fast read path."""

    def __init__(
        self,
        node: Node,
        max_request_bytes: int,
        open_: set,
        read_tables: dict[str, _codec.ReadTable],
    ) -> None:
        self.node = node
        self.max_request_bytes = max_request_bytes
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.open = open_
        cache = node.reads.hot
        self.hot = None if cache is None else cache.rows
        #: The node's ReadTables (FastServer.read_tables); unused with the hot-row cache
        #: on, whose full-path reads fill the cache.
        self.read_tables = read_tables if cache is None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.open.discard(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.open.add(self)
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        node = self.node
        read_tables = self.read_tables
        if read_tables is not None and not self.buffer and node.view is None:
            # The common case first, with as little Python as it takes: one whole small
            # get in one read, answered in C (None: anything else, handled below).
            frame = _codec.answer_request(read_tables, data, node.tables, self.max_request_bytes)
            if frame is not None:
                self.transport.write(frame)  # type: ignore[union-attr]
                return
        # Requests whose keys are all in the hot-row cache, or (without the cache) small
        # gets, are answered in C; a node in a cluster checks each key's shard against
        # the placement first: full path.
        in_cluster = node.view is not None
        hot = None if in_cluster else self.hot
        read_tables = None if in_cluster else self.read_tables
        tables = node.tables
        buffer = self.buffer
        if not buffer and len(data) >= REQUEST_HEADER.size:
            # The common case, one whole request in one read: answered from ``data``
            # without the buffer's copies.
            length, request_id = REQUEST_HEADER.unpack_from(data)
            if len(data) == REQUEST_HEADER.size + length and length <= self.max_request_bytes:
                frame = None
                if hot is not None and not hot.cold:
                    frame = hot.answer_frame(data, request_id, tables, REQUEST_HEADER.size)
                if frame is None:
                    frame = self.answer(request_id, data[REQUEST_HEADER.size :])
                self._send([frame])
                return
        buffer += data
        out = []
        while len(buffer) >= REQUEST_HEADER.size:
            length, request_id = REQUEST_HEADER.unpack_from(buffer)
            if length > self.max_request_bytes:
                out.append(
                    error_frame(
                        request_id,
                        RequestTooLarge(
                            f"a fast-path request of {length} bytes is over the node's "
                            f"max_request_bytes limit of {self.max_request_bytes}"
                        ),
                    )
                )
                self._send(out)
                assert self.transport is not None
                self.transport.close()
                return
            end = REQUEST_HEADER.size + length
            if len(buffer) < end:
                break
            body = bytes(buffer[REQUEST_HEADER.size : end])
            del buffer[:end]
            frame = None
            if read_tables is not None:
                frame = _codec.answer_read(read_tables, body, request_id, tables)
            elif hot is not None and not hot.cold:
                frame = hot.answer_frame(body, request_id, tables)
            out.append(self.answer(request_id, body) if frame is None else frame)
        self._send(out)

    def _send(self, frames: list[bytes]) -> None:
        if frames and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(frames) if len(frames) > 1 else frames[0])

    def answer(self, request_id: int, body: bytes) -> bytes:
        try:
            try:
                request = pb.GetRequest.FromString(body)
            except DecodeError:
                raise InvalidArgument("the fast-path request is not a GetRequest") from None
            response = get_response(self.node, request).SerializeToString()
        except KvstoreError as exc:
            return error_frame(request_id, exc)
        except Exception as exc:
            logger.exception("fast-path Get failed")
            return error_frame(request_id, KvstoreError(f"{type(exc).__name__}: {exc}"))
        if self.read_tables is not None and self.node.view is None:
            refresh_read_table(self.read_tables, self.node, request.table)
        return RESPONSE_HEADER.pack(len(response), request_id, STATUS_OK) + response


class FastServer:
    """The fast read path's listener and its open connections."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.connections: set[FastGetProtocol] = set()
        #: What each int64-keyed table's small gets are answered from in C, by name
        #: (``read_table``), shared by the connections.
        self.read_tables: dict[str, _codec.ReadTable] = {}
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        """Listen; port 0 picks a free one."""
        loop = asyncio.get_running_loop()
        limit = self.node.config.max_request_bytes
        self.server = await loop.create_server(
            lambda: FastGetProtocol(self.node, limit, self.connections, self.read_tables),
            host,
            port,
        )
        self.port = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Stop listening and close every connection. A fast-path call runs to completion
        within one event-loop step, so none is cut in half; clients see the connection
        close and raise Unavailable."""
        if self.server is not None:
            self.server.close()
        for protocol in list(self.connections):
            if protocol.transport is not None:
                protocol.transport.close()
        self.connections.clear()
