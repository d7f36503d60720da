"""A shard moving between nodes, node side: the source's copy, change log and seal, and
the target's install of what it receives (docs/cluster.md, "Moves").

Source (``ShardTransfers``, behind the CopyShard and ShardChanges RPCs):

* ``copy`` starts **recording** the shard's delta changes (``Shard.recorder``: every
  batch ``Shard.write`` applies, raw, with a sequence number, in memory, at most
  ``CHANGE_LOG_BYTES``; beyond that the log is dropped and the move starts over), then
  streams the base files of every kept version of the shard and the delta rows, raw.
  Recording starts before the rows are read, so the rows read plus the log replayed in
  order give the source's state: each key's last logged value wins.
* ``changes`` answers the changes after a sequence number (forgetting those before).
* ``seal`` (the hand-over): writes to the shard wait (``ClusterView.sealed``), the
  writes already being applied finish, and every change left is answered. A seal that
  the placement does not end within ``SEAL_S`` (the target died) is given up: the
  cluster agent bumps the move's attempt by CAS (a finish of this attempt is then
  refused), and only then do writes resume here; while etcd does not answer, the shard
  stays sealed. When the placement no longer gives the shard to this node the
  log goes, the seal ends, and the waiting writes are refused with StaleMap.
* ``drop_shard``: a shard moved away loses its delta rows and its base files.

Target (``ShardReceiver``): empties its copy of the shard (a move; a replica catching
up keeps its own, see below), takes the streamed files into the staging area, merges
the delta rows and changes into its own by event time (``_codec.delta_merge_rows``:
per feature the newest wins, deletes with their times), and installs the bases into
each version (``Table.replace_base_shard`` / ``add_version``). Merging rather than
writing raw matters with replicas: the target takes clients' writes directly while it
copies, and a logged row older than such a write must not overwrite it. The raw
deletes of the log (the source's compaction dropping rows its current version
supersedes) are not replayed: a delta row the version supersedes reads the same.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kvstore import _codec
from kvstore.errors import InvalidArgument, NotFound, StaleMap, Unavailable
from kvstore.server.node import Node
from kvstore.storage.shard import SYSTEM_PREFIX, Shard
from kvstore.storage.table import Table
from kvstore.storage.versions import VersionMeta
from kvstore.v1 import feature_store_pb2 as pb

__all__ = ["CHANGE_LOG_BYTES", "SEAL_S", "ShardReceiver", "ShardTransfers"]

log = logging.getLogger(__name__)

#: Bytes of delta changes a source keeps for one move before giving the move up (the
#: target then starts over): the catch-up trims what the target has taken.
CHANGE_LOG_BYTES = 64 << 20
#: How long a sealed shard's writes wait for the placement to end the move (s); then
#: the hand-over is given up (the target is presumed dead; see ``_give_up``).
SEAL_S = 5.0
#: How long a seal waits for the writes already being applied to the shard (s).
SEAL_DRAIN_S = 2.0
#: A node seals one shard at a time, at least this long after its last hand-over ended
#: (s): a client that met one hand-over (StaleMap, map refreshed, one retry) does not
#: meet the next one within its single retry. Measured: at 0.25 s, on 2 loaded cores, a
#: test writer's retry met the next seal once in three drains.
HANDOVER_GAP_S = 1.0
#: Bytes of a base file per CopyShard message, and delta rows per message.
FILE_CHUNK_BYTES = 1 << 20
ROWS_CHUNK = 2048
#: Bytes of changes one ShardChanges answer carries at most (a sealed one: all of them).
CHANGES_ANSWER_BYTES = 4 << 20

Change = tuple[int, list[tuple[bytes, bytes]], list[bytes]]


@dataclass
class ChangeLog:
    """The delta changes of one shard since its copy began, for one move's target."""

    table: str
    shard: int
    target: str
    log_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    entries: list[Change] = field(default_factory=list)
    seq: int = 0
    size: int = 0
    overflowed: bool = False
    sealed: bool = False
    timer: asyncio.TimerHandle | None = None

    def record(self, puts: list[tuple[bytes, bytes]], deletes: list[bytes]) -> None:
        """Shard.recorder: one applied batch, in order."""
        self.seq += 1
        if self.overflowed:
            return
        self.entries.append((self.seq, puts, deletes))
        self.size += sum(len(k) + len(v) for k, v in puts) + sum(len(k) for k in deletes)
        if self.size > CHANGE_LOG_BYTES:
            self.overflowed = True
            self.entries.clear()
            log.warning(
                "table %r shard %d: the move's change log to %s passed %d bytes; dropped "
                "(the target starts over)",
                self.table,
                self.shard,
                self.target,
                CHANGE_LOG_BYTES,
            )

    def since(self, seq: int, limit_bytes: int | None) -> list[Change]:
        """The changes after ``seq`` (those up to it are forgotten), at most about
        ``limit_bytes`` of them (None: all)."""
        if self.overflowed:
            raise Unavailable(
                f"table {self.table!r} shard {self.shard}: the move's change log overflowed "
                f"{CHANGE_LOG_BYTES} bytes; the move starts over"
            )
        self.entries = [e for e in self.entries if e[0] > seq]
        if limit_bytes is None:
            return list(self.entries)
        out, size = [], 0
        for entry in self.entries:
            out.append(entry)
            size += sum(len(k) + len(v) for k, v in entry[1]) + sum(len(k) for k in entry[2])
            if size >= limit_bytes:
                break
        return out


class ShardTransfers:
    """The source side of the moves of this node's shards (one log per shard)."""

    def __init__(
        self, node: Node, give_up: Callable[[str, int], Awaitable[bool]] | None = None
    ) -> None:
        self.node = node
        #: Called when a seal expires (the cluster agent's give_up_handover): True once
        #: the placement says the move will not finish from the sealed state (writes may
        #: resume); False if it finished. Without it the seal is simply lifted.
        self.give_up = give_up
        self._expiries: set[asyncio.Task] = set()
        self.logs: dict[tuple[str, int], ChangeLog] = {}
        #: When this node's last seal ended (time.monotonic()).
        self._last_seal_end = 0.0

    def _delta(self, table: str, shard: int) -> tuple[Table, Shard]:
        view = self.node.view
        if view is None:
            raise InvalidArgument("this node is not in a cluster: it moves no shard")
        local = self.node.table(table)
        if not 0 <= shard < local.schema.shards:
            raise InvalidArgument(f"table {table!r} has no shard {shard}")
        readable = view.readable.get(table)
        if readable is None or not readable[shard]:
            raise StaleMap(
                f"node {view.node_id} does not serve table {table!r} shard {shard} at "
                f"placement epoch {view.epoch}: it cannot be the source of its move",
                view.epoch,
            )
        return local, local.delta[shard]

    def _log(self, table: str, shard: int, log_id: str) -> ChangeLog:
        found = self.logs.get((table, shard))
        if found is None or found.log_id != log_id:
            raise NotFound(
                f"table {table!r} shard {shard}: no move copy {log_id!r} in progress here (this "
                "node restarted, or another copy replaced it); the move starts over"
            )
        return found

    async def copy(self, table: str, shard: int, target: str) -> AsyncIterator[pb.CopyShardChunk]:
        """Start recording the shard's changes, then stream its base files (every kept
        version) and its delta rows, raw; the last message names the log."""
        local, delta = self._delta(table, shard)
        self.release(table, shard)  # an earlier copy to a target that started over
        changes = ChangeLog(table, shard, target)
        self.logs[(table, shard)] = changes
        delta.recorder = changes.record
        log.info("table %r shard %d: copying to %s (log %s)", table, shard, target, changes.log_id)
        try:
            for version, meta in sorted(local.versions.items()):
                directory = local.version_dir(version) / f"shard-{shard:04d}"
                meta_json = json.dumps(meta.to_json())
                for path in sorted(p for p in directory.iterdir() if p.is_file()):
                    async for chunk in _file_chunks(path, version, meta_json):
                        yield chunk
                    meta_json = ""
            rows = delta.raw_items()
            while batch := list(itertools.islice(rows, ROWS_CHUNK)):
                keys, values = zip(*batch, strict=True)
                yield pb.CopyShardChunk(keys=keys, values=values)
            yield pb.CopyShardChunk(done=True, log_id=changes.log_id, seq=changes.seq)
        except FileNotFoundError as exc:
            self.release(table, shard)
            raise Unavailable(
                f"table {table!r} shard {shard}: a version went during the copy ({exc}); the "
                "move starts over"
            ) from None
        except BaseException:
            self.release(table, shard)
            raise

    def changes(self, table: str, shard: int, log_id: str, since: int) -> tuple[list[Change], int]:
        """The shard's changes after ``since`` (a bounded batch) and the log's sequence."""
        changes = self._log(table, shard, log_id)
        return changes.since(since, CHANGES_ANSWER_BYTES), changes.seq

    async def seal(
        self, table: str, shard: int, log_id: str, since: int
    ) -> tuple[list[Change], int]:
        """Stop applying writes to the shard (they wait, see the module doc), let the
        writes already under way finish, and answer every change after ``since``."""
        changes = self._log(table, shard, log_id)
        view = self.node.view
        assert view is not None
        deadline = time.monotonic() + SEAL_S
        while (
            any(other.sealed for other in self.logs.values() if other is not changes)
            or time.monotonic() < self._last_seal_end + HANDOVER_GAP_S
        ):
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"table {table!r} shard {shard}: another hand-over here did not end "
                    f"within {SEAL_S:g} s; the hand-over is tried again"
                )
            await asyncio.sleep(0.01)  # hand-overs are ms apart: a short poll, bounded
        changes = self._log(table, shard, log_id)  # still this copy's after the wait
        changes.sealed = True
        view.seal(table, shard)
        loop = asyncio.get_running_loop()
        if changes.timer is not None:
            changes.timer.cancel()
        changes.timer = loop.call_later(SEAL_S, self._seal_expired, changes)
        deadline = time.monotonic() + SEAL_DRAIN_S
        under_way = set(view.writing.get(table, ()))
        while under_way & view.writing.get(table, set()):
            if time.monotonic() > deadline:
                self._unseal(changes)
                raise Unavailable(
                    f"table {table!r} shard {shard}: writes still under way after "
                    f"{SEAL_DRAIN_S:g} s; the hand-over is tried again"
                )
            await asyncio.sleep(0.001)  # writes yield between steps of 32 keys: µs
        log.info("table %r shard %d: sealed for the hand-over to %s", table, shard, changes.target)
        return changes.since(since, None), changes.seq

    def _seal_expired(self, changes: ChangeLog) -> None:
        if self.logs.get((changes.table, changes.shard)) is not changes or not changes.sealed:
            return
        log.warning(
            "table %r shard %d: the placement did not finish the move to %s within %g s of "
            "the seal; giving the hand-over up",
            changes.table,
            changes.shard,
            changes.target,
            SEAL_S,
        )
        if self.give_up is None:
            self._unseal(changes)
            return
        task = asyncio.create_task(self._give_up(changes))
        self._expiries.add(task)
        task.add_done_callback(self._expiries.discard)

    async def _give_up(self, changes: ChangeLog) -> None:
        """Lift an expired seal only once the placement cannot finish the move from it:
        its attempt bumped by CAS (else the target's CAS might land after writes applied
        here). While etcd does not answer, the shard stays sealed."""
        assert self.give_up is not None
        while self.logs.get((changes.table, changes.shard)) is changes and changes.sealed:
            try:
                resume = await self.give_up(changes.table, changes.shard)
            except Unavailable as exc:
                log.warning(
                    "table %r shard %d: %s; still sealed", changes.table, changes.shard, exc
                )
                await asyncio.sleep(1.0)
                continue
            if resume:
                log.warning(
                    "table %r shard %d: the move to %s will start over; writes resume here",
                    changes.table,
                    changes.shard,
                    changes.target,
                )
                self.release(changes.table, changes.shard, changes.log_id)
            return

    def _unseal(self, changes: ChangeLog) -> None:
        if changes.sealed:
            self._last_seal_end = time.monotonic()
        changes.sealed = False
        if changes.timer is not None:
            changes.timer.cancel()
            changes.timer = None
        if self.node.view is not None:
            self.node.view.unseal(changes.table, changes.shard)

    def release(self, table: str, shard: int, log_id: str = "") -> None:
        """Forget the shard's log (``log_id``'s only, when given): recording stops, a
        seal ends."""
        changes = self.logs.get((table, shard))
        if changes is None or (log_id and changes.log_id != log_id):
            return
        del self.logs[(table, shard)]
        local = self.node.tables.get(table)
        if local is not None and local.delta[shard].recorder == changes.record:
            local.delta[shard].recorder = None
        self._unseal(changes)

    def placement_applied(self) -> None:
        """Forget the logs of shards this node no longer serves (their move finished):
        the seal ends and the writes that waited are refused with the new epoch."""
        view = self.node.view
        assert view is not None
        for table, shard in list(self.logs):
            readable = view.readable.get(table)
            if readable is None or not readable[shard]:
                self.release(table, shard)

    async def drop_shard(self, table: str, shard: int, still_gone) -> None:
        """Delete the delta rows and base files of a shard moved away, in steps; stops
        as soon as ``still_gone()`` is false (the shard is coming back here)."""
        self.release(table, shard)
        local = self.node.tables.get(table)
        if local is None:
            return
        deleted = await empty_delta(local, shard, still_gone)
        if not still_gone() or self.node.tables.get(table) is not local:
            return
        for version in list(local.versions):
            local.replace_base_shard(version, shard, None)
        log.info(
            "table %r shard %d moved away: %d delta rows and its base files deleted",
            table,
            shard,
            deleted,
        )


async def _file_chunks(
    path: Path, version: int, meta_json: str
) -> AsyncIterator[pb.CopyShardChunk]:
    size = path.stat().st_size
    offset = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(FILE_CHUNK_BYTES)
            last = offset + len(data) >= size
            yield pb.CopyShardChunk(
                version=version,
                version_meta=meta_json if offset == 0 else "",
                file_name=path.name,
                offset=offset,
                data=data,
                last=last,
            )
            offset += len(data)
            if last:
                return


async def empty_delta(table: Table, shard: int, go_on=lambda: True) -> int:
    """Delete every key of ``table``'s delta shard ``shard``, in steps (reads and writes
    run in between); stops early when ``go_on()`` turns false. Returns the keys deleted."""
    delta = table.delta[shard]
    deleted = 0
    while go_on():
        keys = [key for key, _ in itertools.islice(delta.raw_items(), ROWS_CHUNK)]
        if not keys:
            break
        delta.write([], keys)
        deleted += len(keys)
        await asyncio.sleep(0)
    delta.recheck_empty()
    return deleted


class ShardReceiver:
    """The target's side of one copy: files staged, rows and changes merged by event time."""

    def __init__(self, node: Node, table: str, shard: int) -> None:
        self.node = node
        self.table = node.table(table)
        self.shard = shard
        assert node.config.cold_dir is not None
        self.staging = node.config.cold_dir / "staging" / f"move-{uuid.uuid4().hex}"
        #: version → its meta, from the source's kept versions.
        self.versions: dict[int, VersionMeta] = {}
        self.rows = 0

    async def empty(self) -> None:
        """Delete whatever this node had of the shard's delta (an earlier stay here)."""
        await empty_delta(self.table, self.shard)

    def take(self, chunk: pb.CopyShardChunk) -> None:
        """One message of the copy: a piece of a base file, or delta rows."""
        if chunk.file_name:
            if chunk.version_meta:
                self.versions[chunk.version] = VersionMeta(**json.loads(chunk.version_meta))
            if "/" in chunk.file_name or chunk.file_name.startswith("."):
                raise InvalidArgument(f"a copied file name {chunk.file_name!r} is not allowed")
            directory = self.staging / f"v{chunk.version:06d}"
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / chunk.file_name
            if chunk.offset == 0:
                path.write_bytes(chunk.data)
            else:
                with open(path, "ab") as f:
                    f.write(chunk.data)
        if chunk.keys:
            self.merge(list(zip(chunk.keys, chunk.values, strict=True)))
            self.rows += len(chunk.keys)

    def merge(self, puts: list[tuple[bytes, bytes]]) -> None:
        """Merge the source's delta rows into this node's, per feature by event time (no
        await: a client's write to the same keys cannot come in between); the node's
        own keys (consumer positions) are taken as they come."""
        delta = self.table.delta[self.shard]
        rows = [(k, v) for k, v in puts if not (k.startswith(SYSTEM_PREFIX) and len(k) != 8)]
        own = [(k, v) for k, v in puts if k.startswith(SYSTEM_PREFIX) and len(k) != 8]
        keys = [k for k, _ in rows]
        merged = (
            _codec.delta_merge_rows(
                self.table.schema.layout, delta.multi_get(keys), [v for _, v in rows]
            )
            if keys
            else []
        )
        if keys or own:
            delta.write(list(zip(keys, merged, strict=True)) + own)

    def apply(self, changes: Iterable[pb.ShardChange]) -> int:
        """Merge recorded changes in, in order (their raw deletes are not replayed: see
        the module doc); returns how many."""
        n = 0
        for change in changes:
            self.merge(list(zip(change.put_keys, change.put_values, strict=True)))
            n += 1
        return n

    def install_bases(self) -> None:
        """Each copied version's base shard in place of this node's (a version this node
        lacks is added, not current); the versions the source does not keep get an
        empty shard. One catalog write."""
        for version in list(self.table.versions):
            if version not in self.versions:
                self.table.replace_base_shard(version, self.shard, None)
        for version, meta in sorted(self.versions.items()):
            source = self.staging / f"v{version:06d}"
            if version in self.table.versions:
                self.table.replace_base_shard(version, self.shard, source)
            else:
                self.table.add_version(meta, self.shard, source)
        assert self.node.catalog is not None
        self.node.catalog.save()
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
