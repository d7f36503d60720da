"""The node side of a bulk load, seen from the loader: the table, begin, upload, commit.

``SeedNode`` is the node the loader was pointed at: it describes (or creates, or
drops) the table and says which node owns each shard. ``BeginLoad`` opens the load
on the node of shard 0, which names the version it will become and the table format
to build; in a cluster (the node says so) the load is then begun with that version on
every other node holding a shard. Each file of a shard's database is streamed with
``UploadShardFile`` to each live Available replica of its shard (one node without
replicas; a load refuses to begin when a shard has fewer live replicas than the
table's write quorum), in chunks of ``CHUNK_BYTES`` with
the file's crc32 in the last chunk, by a few uploader threads per node, while the
loader goes on writing: a table file as soon as it is flushed (it never changes
again), the database's other files when it is closed. Alone, ``CommitLoad`` makes the
version current on every shard at once; in a cluster every node stages its shards
(``CommitLoad`` with ``stage``), then ``PublishVersion`` makes the version current by
one etcd transaction and the loader waits until every node serves it. Any failure
before that aborts the load on every node (``AbortLoad``), so each drops what it
staged and the old version stays current everywhere.

The loader speaks to the nodes through the wire layer (``kvstore.wire``), not through
``kvstore.Client``: ``Client.load`` runs the loader, so the loader importing the
client would make the two depend on each other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait

import grpc

from kvstore.errors import KvstoreError, from_rpc_error
from kvstore.schema import TableSchema
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire.dial import open_channel, resolve_address
from kvstore.wire.messages import TableInfo, cluster_map_json, schema_to_proto

logger = logging.getLogger(__name__)

__all__ = ["CHUNK_BYTES", "LoadSession", "SeedNode"]

#: Bytes of a file per ShardFileChunk message.
CHUNK_BYTES = 1 << 20
#: Files waiting for upload per node before the loader waits: the loader's temporary
#: disk holds about this many table files per node, not whole shards.
MAX_QUEUED_FILES = 8
#: UploadShardFile calls in flight per node.
STREAMS_PER_NODE = 4
_ABORT_TIMEOUT_S = 10.0
#: How often the loader asks whether a node serves a published version (s).
_POLL_S = 0.02


class _Nodes:
    """Blocking gRPC channels to nodes by address; a failed call raises its KvstoreError."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._channels: dict[str, grpc.Channel] = {}

    def stub(self, address: str) -> pb_grpc.FeatureStoreStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address)
        return pb_grpc.FeatureStoreStub(channel)

    def call(self, address: str, method: str, request, timeout: float | None = None):
        """``method``'s response to ``request`` from ``address``; ``timeout`` in s
        (default the loader's)."""
        timeout = self.timeout if timeout is None else timeout
        try:
            return getattr(self.stub(address), method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, address, timeout) from None

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


class SeedNode:
    """The node a load was pointed at: the table's description, creation or removal,
    and the cluster map. The same calls and results as ``kvstore.Client``'s, blocking,
    each with the deadline ``timeout`` (s)."""

    def __init__(self, address: str | None, timeout: float) -> None:
        self.address = resolve_address(address)
        self._nodes = _Nodes(timeout)

    def describe_table(self, name: str) -> TableInfo:
        """The table's schema, current version and size; TableNotFound if there is none."""
        request = pb.DescribeTableRequest(table=name)
        return TableInfo.from_proto(self._nodes.call(self.address, "DescribeTable", request))

    def create_table(
        self, name: str, *, key: str, features: dict[str, str], shards: int
    ) -> TableInfo:
        """Create the table (``features``: name → dtype); its TableInfo."""
        schema = TableSchema.build(name, key, features, shards)
        request = pb.CreateTableRequest(schema=schema_to_proto(schema))
        return TableInfo.from_proto(self._nodes.call(self.address, "CreateTable", request))

    def drop_table(self, name: str) -> None:
        """Delete the table and its data."""
        self._nodes.call(self.address, "DropTable", pb.DropTableRequest(table=name))

    def cluster_map(self) -> dict:
        """Epoch, nodes (as advertised) and each table's owner per shard."""
        cmap = self._nodes.call(self.address, "GetClusterMap", pb.GetClusterMapRequest())
        return cluster_map_json(cmap)

    def close(self) -> None:
        self._nodes.close()

    def __enter__(self) -> SeedNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LoadSession:
    """One load of one table on the cluster: RPCs to the seed and the shard owners."""

    def __init__(self, seed: str, table: str, timeout: float) -> None:
        self.seed = seed
        self.table = table
        self.timeout = timeout
        self.load_id = ""
        self.version = 0
        self.lease_s = 0.0
        #: The table format the node wants each shard's database built in.
        self.base_format = ""
        self._nodes = _Nodes(timeout)
        self._uploaders: dict[str, _Uploader] = {}
        #: Per shard, the addresses its files go to: every live Available replica (the
        #: owner alone when the map lists no replicas).
        self._holders_of: list[list[str]] = []
        #: path → uploads of it still to confirm (a file goes to every replica holder).
        self._uploads_left: dict[str, int] = {}
        self._files_lock = threading.Lock()
        self.files_per_shard: list[int] = []
        #: node address → the load's id there (one node alone; every holder of a
        #: shard in a cluster, the first one being the one that allocated the version).
        self.load_ids: dict[str, str] = {}
        self.clustered = False
        #: True once PublishVersion succeeded: the load can no longer be aborted.
        self.published = False

    def stub(self, address: str) -> pb_grpc.FeatureStoreStub:
        return self._nodes.stub(address)

    def _call(self, address: str, method: str, request, timeout: float | None = None):
        return self._nodes.call(address, method, request, timeout)

    def begin(
        self,
        label: str,
        snapshot_time_us: int,
        owners: list[int],
        nodes: list[str],
        schema_id: int = 0,
    ) -> None:
        """Open the load on the node of shard 0, then (a cluster) with the version it
        allocated on every other node holding a shard; ``owners[shard]`` indexes
        ``nodes`` (host:port to dial).

        ``schema_id``: the schema the rows were encoded with (the node refuses another).
        """
        self._holders_of = self._replica_holders(owners, nodes)
        self.files_per_shard = [0] * len(owners)
        # Nodes in order of their first shard, so the first one allocates the version.
        holders = list(dict.fromkeys(a for shard in self._holders_of for a in shard)) or [self.seed]
        first = self._begin_on(holders[0], label, snapshot_time_us, schema_id, 0)
        self.load_id = first.load_id
        self.version = first.version
        self.lease_s = first.lease_s
        self.base_format = first.base_format
        self.clustered = first.clustered
        self.load_ids = {holders[0]: first.load_id}
        if not self.base_format:
            raise KvstoreError(
                f"node {holders[0]} did not name a table format for the load: it is older "
                "than this loader; upgrade kvstore on the node"
            )
        if not self.clustered and len(holders) > 1:
            raise KvstoreError(
                f"node {holders[0]} is not in a cluster, yet the map names {len(holders)} "
                "nodes for the table"
            )

        def begin_other(address: str) -> None:
            response = self._begin_on(address, label, snapshot_time_us, schema_id, self.version)
            # Recorded at once, so that abort() reaches it even if another node refused.
            self.load_ids[address] = response.load_id

        self._on_each(holders[1:], begin_other)
        logger.info(
            "load %s of table %r began on %d node(s): version %d, lease %.0f s",
            self.load_id,
            self.table,
            len(self.load_ids),
            self.version,
            self.lease_s,
        )

    def _replica_holders(self, owners: list[int], nodes: list[str]) -> list[list[str]]:
        """Per shard, the addresses its files go to: its live serving replicas in the
        seed's map (Available, and a move's Leaving source; docs/cluster.md, "Replicas");
        the owner alone when the map has no replica list. A replica on a node the map
        says is down is out of the count, as for writes (R=2: both, or one when the
        other is down): it installs the version from a peer when it comes back.
        KvstoreError when a shard has fewer live serving replicas than that quorum."""
        cmap = self._call(self.seed, "GetClusterMap", pb.GetClusterMapRequest())
        table = next((t for t in cmap.tables if t.table == self.table), None)
        if table is None or len(table.replicas) != len(owners) or len(cmap.nodes) != len(nodes):
            return [[nodes[i]] for i in owners]
        holders = []
        for shard, replicas in enumerate(table.replicas):
            up = [i for i in replicas.node if cmap.nodes[i].state in ("", "live")]
            live = [
                nodes[i]
                for i, state in zip(replicas.node, replicas.state, strict=True)
                if state in ("Available", "Leaving") and i in up
            ]
            quorum = max(1, min(table.write_quorum or 1, len(up)))
            if len(live) < quorum:
                raise KvstoreError(
                    f"table {self.table!r} shard {shard}: {len(live)} live serving "
                    f"replica(s), the write quorum is {quorum}; load again once enough "
                    "nodes are back"
                )
            holders.append(live)
        return holders

    def _begin_on(
        self, address: str, label: str, snapshot_time_us: int, schema_id: int, version: int
    ) -> pb.BeginLoadResponse:
        request = pb.BeginLoadRequest(
            table=self.table,
            label=label,
            snapshot_time_us=snapshot_time_us,
            schema_id=schema_id,
            version=version,
        )
        return self._call(address, "BeginLoad", request)

    def _on_each(self, addresses: list[str], call: Callable[[str], object]) -> list:
        """``call(address)`` for every address at once (one thread each); the results in
        order, or the first error once all have finished (so none is left running)."""
        if len(addresses) <= 1:
            return [call(a) for a in addresses]
        with ThreadPoolExecutor(len(addresses), thread_name_prefix="kvstore-load") as pool:
            futures = [pool.submit(call, a) for a in addresses]
            wait(futures)
        return [f.result() for f in futures]

    def upload(self, shard: int, name: str, path: str, size: int) -> None:
        """Queue one file of a shard's database (a flushed table file, or one of the
        files written at close) for upload to each of the shard's replica nodes;
        deleted once every one of them has it."""
        addresses = self._holders_of[shard]
        with self._files_lock:
            self._uploads_left[path] = len(addresses)
        self.files_per_shard[shard] += 1
        for address in addresses:
            uploader = self._uploaders.get(address)
            if uploader is None:
                uploader = _Uploader(self, address)
                self._uploaders[address] = uploader
            uploader.submit((shard, name, path, size))

    def file_sent(self, path: str) -> None:
        """One node confirmed ``path``: deleted once every node it goes to has it."""
        with self._files_lock:
            left = self._uploads_left.get(path, 1) - 1
            if left > 0:
                self._uploads_left[path] = left
                return
            self._uploads_left.pop(path, None)
        os.unlink(path)

    def check(self) -> None:
        """Raise the first upload error, if any (the loader calls it between files)."""
        for uploader in self._uploaders.values():
            if uploader.error is not None:
                raise uploader.error

    @property
    def bytes_sent(self) -> int:
        """Bytes of files the nodes have confirmed so far."""
        return sum(u.bytes_sent for u in self._uploaders.values())

    def finish_uploads(self, on_progress: Callable[[int], None] | None = None) -> int:
        """Wait for every queued file to be sent; the bytes sent.

        ``on_progress(bytes_sent)`` is called about every 0.2 s while waiting.
        """
        for uploader in self._uploaders.values():
            uploader.submit(None)
        for uploader in self._uploaders.values():
            while not uploader.join(0.2):
                if on_progress is not None:
                    on_progress(self.bytes_sent)
        self.check()
        return self.bytes_sent

    def commit(self, rows_per_shard: list[int]) -> pb.CommitLoadResponse:
        """Make the version current: alone, the one node's commit swaps it in; in a
        cluster, every node stages its shards (in parallel), then the node of shard 0
        publishes the version (one etcd transaction) and the loader waits until every
        node serves it. The response of the first node (``cold_bytes_written``: the
        sum over the nodes)."""
        addresses = list(self.load_ids)  # the node the load began on first
        if not self.clustered:
            return self._commit_on(addresses[0], rows_per_shard, stage=False)
        responses = self._on_each(addresses, lambda a: self._commit_on(a, rows_per_shard, True))
        self._call(
            addresses[0],
            "PublishVersion",
            pb.PublishVersionRequest(table=self.table, version=self.version),
        )
        self.published = True
        self._wait_current(addresses)
        first = responses[0]
        first.cold_bytes_written = sum(r.cold_bytes_written for r in responses)
        first.ingest_s = max(r.ingest_s for r in responses)
        return first

    def _commit_on(
        self, address: str, rows_per_shard: list[int], stage: bool
    ) -> pb.CommitLoadResponse:
        """CommitLoad on one node, with the counts of the shards sent to it (zero for
        the others: the node makes them empty databases it never serves)."""
        mine = [address in shard for shard in self._holders_of]
        rows = [r if m else 0 for r, m in zip(rows_per_shard, mine, strict=True)]
        files = [f if m else 0 for f, m in zip(self.files_per_shard, mine, strict=True)]
        request = pb.CommitLoadRequest(
            load_id=self.load_ids[address],
            files_per_shard=files,
            rows=sum(rows),
            rows_per_shard=rows,
            stage=stage,
        )
        return self._call(address, "CommitLoad", request)

    def _wait_current(self, addresses: list[str]) -> None:
        """Wait (the loader's timeout) until every node serves the published version:
        each follows the placement within milliseconds, and ``load`` returning means
        every read sees the new version."""
        deadline = time.monotonic() + self.timeout
        request = pb.DescribeTableRequest(table=self.table)
        for address in addresses:
            while self._call(address, "DescribeTable", request).version != self.version:
                if time.monotonic() > deadline:
                    raise KvstoreError(
                        f"table {self.table!r}: version {self.version} was published, but "
                        f"node {address} did not serve it within {self.timeout:g} s"
                    )
                time.sleep(_POLL_S)

    def abort(self) -> None:
        """Best effort: tell every node to drop the load (each also drops it when the
        lease ends). Once published, the version stays: the placement names it."""
        for uploader in self._uploaders.values():
            uploader.cancel()
        if self.published:
            return
        timeout = min(self.timeout, _ABORT_TIMEOUT_S)

        def abort_on(address: str) -> None:
            request = pb.AbortLoadRequest(load_id=self.load_ids[address])
            try:
                self._call(address, "AbortLoad", request, timeout=timeout)
            except KvstoreError as exc:
                logger.warning(
                    "could not abort load %s of %r on %s: %s",
                    self.load_ids[address],
                    self.table,
                    address,
                    exc,
                )

        self._on_each(list(self.load_ids), abort_on)

    def close(self) -> None:
        for uploader in self._uploaders.values():
            uploader.cancel()
        self._nodes.close()


class _Uploader:
    """Threads streaming files to one node, one UploadShardFile call per file.

    ``STREAMS_PER_NODE`` calls run at once: one stream alone moved ~200 MB/s over
    loopback, four ~650 MB/s (the node places files by name, whatever their order).
    """

    def __init__(self, session: LoadSession, address: str) -> None:
        self.session = session
        self.address = address
        self.error: KvstoreError | None = None
        self.bytes_sent = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(MAX_QUEUED_FILES)
        self._cancelled = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"kvstore-upload-{address}-{i}", daemon=True)
            for i in range(STREAMS_PER_NODE)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, item: tuple[int, str, str, int] | None) -> None:
        """Queue a file, or None once after the last file (ends the threads)."""
        for _ in range(1 if item is not None else len(self._threads)):
            while True:
                if self.error is not None:
                    raise self.error
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the threads to end (after ``submit(None)``)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def cancel(self) -> None:
        self._cancelled.set()
        for _ in self._threads:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
        self.join(_ABORT_TIMEOUT_S)

    def _run(self) -> None:
        stub = self.session.stub(self.address)
        while True:
            item = self._queue.get()
            if item is None or self._cancelled.is_set():
                return
            if self.error is not None:
                continue
            shard, name, path, size = item
            timeout = self.session.timeout
            try:
                response = stub.UploadShardFile(
                    self._chunks(shard, name, path, size), timeout=timeout
                )
            except grpc.RpcError as exc:
                self._fail(from_rpc_error(exc, self.address, timeout))
                continue
            except Exception as exc:  # reading the local file
                self._fail(KvstoreError(f"uploading {path} to node {self.address}: {exc}"))
                continue
            if response.bytes != size:
                self._fail(
                    KvstoreError(
                        f"node {self.address} received {response.bytes} bytes of {name} for "
                        f"shard {shard}, {size} were sent"
                    )
                )
                continue
            with self._lock:
                self.bytes_sent += size
            self.session.file_sent(path)

    def _fail(self, error: KvstoreError) -> None:
        """Keep the first error: it is the cause (a full disk aborts the load on the
        node, and the calls streaming beside it then fail for want of a load)."""
        with self._lock:
            if self.error is None:
                self.error = error

    def _chunks(self, shard: int, name: str, path: str, size: int) -> Iterator[pb.ShardFileChunk]:
        load_id = self.session.load_ids[self.address]
        crc = 0
        offset = 0
        with open(path, "rb") as f:
            while True:
                if self._cancelled.is_set():
                    return
                data = f.read(CHUNK_BYTES)
                crc = zlib.crc32(data, crc)
                last = offset + len(data) >= size
                yield pb.ShardFileChunk(
                    load_id=load_id,
                    shard=shard,
                    file_name=name,
                    offset=offset,
                    data=data,
                    last=last,
                    file_size=size if last else 0,
                    crc32=crc if last else 0,
                )
                offset += len(data)
                if last:
                    return
