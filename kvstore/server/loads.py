"""Bulk loads on the node: staging the uploaded shard databases, checking them, the swap.

A load is ``begin`` (reserve the next version; one load per table at a time; tell the
loader the table format to build, ``NodeConfig.base_format``), ``upload`` (chunks of the
files of each shard's RocksDB database, which the loader built from the sorted rows,
checked by size and crc32), ``commit`` (move each shard's directory into the new
version, open it and check it holds the rows the loader wrote, then
Node.install_version swaps it in with one catalog write) or ``abort``.
Staging is under the cold directory, so moving a shard in is a rename: the cold tier
is written once.
In a cluster (docs/cluster.md, "Bulk loads") every node holding a shard of the table
runs its own load of the same version (``begin`` with the version the first node
allocated), and ``commit`` with ``stage`` stops before the swap: the checked version
waits in ``Node.staged`` until the placement's table version names it (the cluster
agent then calls Node.publish_version), or ``abort`` discards it.
Nothing of a load is visible before the swap; a failed or abandoned load (no upload
for ``load_lease_s``) leaves no file behind, and the staging area is emptied at start.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kvstore.clock import now_us
from kvstore.errors import (
    CorruptValue,
    InvalidArgument,
    KvstoreError,
    LoadConflict,
    SchemaChanged,
    StorageFull,
    is_disk_full,
)
from kvstore.schema import TableSchema
from kvstore.server.node import Node
from kvstore.storage.catalog import fsync_dir
from kvstore.storage.shard import Shard, create_empty_base, files_bytes
from kvstore.storage.table import VersionMeta

logger = logging.getLogger(__name__)

__all__ = ["LoadStaging", "StagedLoad"]

#: A fault hook for tests (docs/operations.md, "Fault hooks"): with this variable set
#: to N, the node exits at once (status FAULT_EXIT_STATUS, nothing closed or flushed, as
#: a crash would) on receiving the Nth upload chunk since it started, before writing it.
#: Read once, when the node opens its loads; unset, a chunk costs one falsy test.
FAULT_EXIT_AFTER_UPLOAD_CHUNKS = "KVSTORE_FAULT_EXIT_AFTER_UPLOAD_CHUNKS"
FAULT_EXIT_STATUS = 70

_FILE_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass
class _StagedFile:
    path: Path
    size: int = 0
    crc: int = 0
    complete: bool = False


@dataclass
class StagedLoad:
    """One bulk load in progress on the node: what it will become, its staged files."""

    load_id: str
    table: str
    schema_id: int
    version: int
    label: str
    snapshot_time_us: int
    #: The table format the loader builds (the node's base_format when the load began).
    table_format: str
    staging: Path
    started: float
    last_activity: float
    files: dict[tuple[int, str], _StagedFile] = field(default_factory=dict)


class LoadStaging:
    """The bulk loads in progress on one node and their staging area under the cold directory."""

    def __init__(self, node: Node) -> None:
        self.node = node
        assert node.config.cold_dir is not None
        self.staging_root = node.config.cold_dir / "staging"
        self.loads: dict[str, StagedLoad] = {}
        #: Why recent loads were aborted by the node itself (e.g. a full disk): the
        #: loader's other calls still streaming then get that cause, not "no such load".
        self._causes: dict[str, KvstoreError] = {}
        self._exit_at_chunk = int(os.environ.get(FAULT_EXIT_AFTER_UPLOAD_CHUNKS) or 0)
        self._chunks_received = 0
        #: load id → (table, version) of loads committed with ``stage``, not yet
        #: published: ``abort`` discards their version.
        self.staged: dict[str, tuple[str, int]] = {}

    def open(self) -> None:
        """Remove what loads interrupted by a crash or kill left behind: the staging
        area, and version directories the catalog does not list (a crash between
        moving a version in and the catalog write that makes it one, or after the
        write that forgot an old version). Those are moved aside to
        ``<cold>/orphans/``, not deleted: when the catalog and the cold directory
        disagree for another reason (an older catalog restored), the files are kept
        and the log says where."""
        if self.staging_root.exists():
            shutil.rmtree(self.staging_root)
            logger.info("removed the staging files of interrupted loads")
        self.staging_root.mkdir(parents=True, exist_ok=True)
        for table in self.node.tables.values():
            if not table.cold_root.exists():
                continue
            for path in table.cold_root.glob("v*"):
                number = path.name[1:]
                if number.isdigit() and int(number) not in table.versions:
                    orphans = self.staging_root.parent / "orphans"
                    orphans.mkdir(exist_ok=True)
                    target = orphans / f"{table.cold_root.name}-{path.name}-{uuid.uuid4().hex[:8]}"
                    os.rename(path, target)
                    logger.warning(
                        "table %r: %s is not a version in the catalog (an interrupted load or "
                        "deletion); moved to %s: delete it if nothing is missing",
                        table.schema.name,
                        path,
                        target,
                    )

    def _load(self, load_id: str) -> StagedLoad:
        load = self.loads.get(load_id)
        if load is None:
            cause = self._causes.get(load_id)
            if cause is not None:
                raise type(cause)(str(cause))
            raise LoadConflict(
                f"no bulk load {load_id!r} is open on this node (it was committed, aborted, "
                f"or expired after {self.node.config.load_lease_s:.0f} s without uploads); "
                "start the load again"
            )
        return load

    def table_of(self, load_id: str) -> str:
        """The table an open load writes."""
        return self._load(load_id).table

    def begin(
        self, table: str, label: str, snapshot_time_us: int, schema_id: int = 0, version: int = 0
    ) -> StagedLoad:
        """Open a load of ``table``; ``version``: the number to load as (a cluster load's,
        allocated in the placement), else the table's next one here."""
        t = self.node.table(table)
        if schema_id and schema_id != t.schema.schema_id:
            raise SchemaChanged(
                f"table {table!r}: the load's rows were encoded with schema id {schema_id}, "
                f"the table's is {t.schema.schema_id}; load again"
            )
        for other in self.loads.values():
            if other.table == table:
                raise LoadConflict(
                    f"table {table!r}: bulk load {other.load_id} (version {other.version}) is "
                    f"in progress since {time.time() - other.started:.0f} s; one load per "
                    "table at a time"
                )
        entry = t.entry
        if version:
            if version in entry.versions or version <= entry.current:
                raise LoadConflict(
                    f"table {table!r}: version {version} is not newer than this node's "
                    f"(current {entry.current}, kept {sorted(entry.versions)})"
                )
            entry.next_version = max(entry.next_version, version + 1)
        else:
            version = max([entry.next_version, *[v + 1 for v in entry.versions]])
            entry.next_version = version + 1  # a failed load's number is not reused
        load_id = uuid.uuid4().hex
        now = time.monotonic()
        load = StagedLoad(
            load_id,
            table,
            t.schema.schema_id,
            version,
            label,
            snapshot_time_us or now_us(),
            self.node.config.base_format,
            self.staging_root / load_id,
            time.time(),
            now,
        )
        load.staging.mkdir(parents=True)
        self.loads[load_id] = load
        logger.info("table %r: bulk load %s of version %d begins", table, load_id, version)
        return load

    def _fault_exit_check(self) -> None:
        """The FAULT_EXIT_AFTER_UPLOAD_CHUNKS hook: exit on the chunk it names."""
        self._chunks_received += 1
        if self._chunks_received >= self._exit_at_chunk:
            logger.error(
                "%s=%d: exiting on upload chunk %d, as a crash would",
                FAULT_EXIT_AFTER_UPLOAD_CHUNKS,
                self._exit_at_chunk,
                self._chunks_received,
            )
            logging.shutdown()  # the line above reaches the log; nothing else is closed
            os._exit(FAULT_EXIT_STATUS)

    def upload(
        self,
        load_id: str,
        shard: int,
        file_name: str,
        offset: int,
        data: bytes,
        last: bool,
        file_size: int,
        crc32: int,
    ) -> int:
        """Append one chunk; returns the bytes of the file so far."""
        if self._exit_at_chunk:
            self._fault_exit_check()
        load = self._load(load_id)
        load.last_activity = time.monotonic()
        table = self.node.table(load.table)
        if not 0 <= shard < table.schema.shards:
            raise InvalidArgument(
                f"load {load_id}: shard {shard} is not a shard of table {load.table!r} "
                f"({table.schema.shards} shards)"
            )
        if not file_name or not set(file_name) <= _FILE_NAME_OK or file_name.startswith("."):
            raise InvalidArgument(f"load {load_id}: file name {file_name!r} is not allowed")
        f = load.files.get((shard, file_name))
        if f is None:
            f = load.files[(shard, file_name)] = _StagedFile(
                load.staging / f"shard-{shard:04d}" / file_name
            )
        if f.complete:
            raise InvalidArgument(
                f"load {load_id}: shard {shard} file {file_name} was already complete"
            )
        if offset != f.size:
            raise InvalidArgument(
                f"load {load_id}: shard {shard} file {file_name}: chunk at offset {offset}, "
                f"expected {f.size}"
            )
        try:
            if not f.size:  # the file's first chunk
                f.path.parent.mkdir(exist_ok=True)
            with open(f.path, "ab") as out:
                out.write(data)
                if last:
                    out.flush()
                    os.fsync(out.fileno())
        except OSError as exc:
            self.abort(load_id)
            if is_disk_full(exc):
                full = StorageFull(
                    f"load {load_id} of table {load.table!r} aborted: the node's disk is full "
                    f"at {self.staging_root}; the current version is unchanged"
                )
                self._causes[load_id] = full
                while len(self._causes) > 64:
                    del self._causes[next(iter(self._causes))]
                raise full from None
            raise
        f.size += len(data)
        f.crc = zlib.crc32(data, f.crc)
        if last:
            if f.size != file_size or f.crc != crc32:
                raise InvalidArgument(
                    f"load {load_id}: shard {shard} file {file_name} arrived damaged: "
                    f"{f.size} bytes crc32 {f.crc:08x}, the loader sent {file_size} bytes "
                    f"crc32 {crc32:08x}"
                )
            f.complete = True
        return f.size

    def commit(
        self,
        load_id: str,
        files_per_shard: list[int],
        rows: int,
        rows_per_shard: list[int],
        stage: bool = False,
    ) -> tuple[VersionMeta, float]:
        """Move in, check and swap in the load's version; returns it and the seconds.

        ``stage``: stop before the swap (Node.stage_version); a cluster publishes it.
        Any failure before the swap aborts the load and removes what it moved in: the
        current version keeps serving.
        """
        load = self._load(load_id)
        table = self.node.table(load.table)
        started = time.perf_counter()
        version_dir = table.version_dir(load.version)
        # Version numbers are not reused and the start moves unnamed version directories
        # aside, so one already there is a fault: mkdir refuses it and it is left alone.
        existed = version_dir.exists()
        opened: list[Shard] = []
        try:
            self._check_commit(load, table.schema, files_per_shard, rows, rows_per_shard, stage)
            opened = self._open_shards(load, version_dir, rows_per_shard)
            cold_bytes = files_bytes(version_dir)
            meta = VersionMeta(
                load.version,
                load.label,
                load.snapshot_time_us,
                rows,
                cold_bytes,
                now_us(),
                load.table_format,
            )
            if stage:
                self.node.stage_version(load.table, meta, opened)
                self.staged[load_id] = (load.table, load.version)
            else:
                self.node.install_version(load.table, meta, opened)
        except BaseException as exc:
            for shard in opened:
                shard.close()
            self.abort(load_id)
            if not existed:
                shutil.rmtree(version_dir, ignore_errors=True)
            if is_disk_full(exc):
                where = getattr(exc, "filename", None) or version_dir
                raise StorageFull(
                    f"load {load_id} of table {load.table!r} aborted: the node's disk is full "
                    f"at {where}; the current version is unchanged"
                ) from None
            raise
        self.loads.pop(load_id, None)
        shutil.rmtree(load.staging, ignore_errors=True)
        return meta, time.perf_counter() - started

    @staticmethod
    def _check_commit(
        load: StagedLoad,
        schema: TableSchema,
        files_per_shard: list[int],
        rows: int,
        rows_per_shard: list[int],
        stage: bool = False,
    ) -> None:
        """What the loader says it sent against what arrived and what the table is.

        A staged load may hold no rows: in a cluster, this node's shards of the load
        may all be empty."""
        load_id = load.load_id
        if schema.schema_id != load.schema_id:
            raise LoadConflict(f"table {load.table!r} was dropped and recreated during the load")
        shards = schema.shards
        if len(files_per_shard) != shards:
            raise InvalidArgument(
                f"load {load_id}: files_per_shard has {len(files_per_shard)} entries, the "
                f"table has {shards} shards"
            )
        received = Counter(shard for shard, _ in load.files)
        for (shard, name), f in sorted(load.files.items()):
            if not f.complete:
                raise InvalidArgument(
                    f"load {load_id}: shard {shard} file {name} was not uploaded completely"
                )
        for shard, expected in enumerate(files_per_shard):
            if received[shard] != expected:
                raise InvalidArgument(
                    f"load {load_id}: shard {shard} received {received[shard]} files, "
                    f"the loader sent {expected}"
                )
        if not stage and (rows <= 0 or not any(files_per_shard)):
            raise InvalidArgument(f"load {load_id}: no rows; an empty load makes no version")
        if not rows_per_shard:
            raise InvalidArgument(
                f"load {load_id}: the loader sent no rows_per_shard: it is older than "
                "this node; upgrade kvstore where the load runs"
            )
        if len(rows_per_shard) != shards or sum(rows_per_shard) != rows:
            raise InvalidArgument(
                f"load {load_id}: rows_per_shard {rows_per_shard} does not give {rows} "
                f"rows over the table's {shards} shards"
            )

    def _open_shards(
        self, load: StagedLoad, version_dir: Path, rows_per_shard: list[int]
    ) -> list[Shard]:
        """Each shard's uploaded database moved into ``version_dir`` (a rename; a shard
        that received no file is an empty database), opened and checked to hold the
        rows the loader wrote. On failure the shards opened so far are closed."""
        options = self.node.base_options(load.table_format)
        where = f"load {load.load_id} of table {load.table!r}"
        new_root = not version_dir.parent.exists()  # the table's first version
        version_dir.mkdir(parents=True)
        shards: list[Shard] = []
        try:
            for index, expected in enumerate(rows_per_shard):
                path = version_dir / f"shard-{index:04d}"
                if (load.staging / path.name).exists():
                    os.rename(load.staging / path.name, path)
                else:
                    create_empty_base(path, options)
                # The files were fsynced as they arrived; their entries here must last.
                fsync_dir(path)
                try:
                    shard = Shard(path, index, options, self.node.base_read_options, base=True)
                except CorruptValue as exc:  # the uploaded files are at fault
                    raise InvalidArgument(
                        f"{where}: shard {index}: RocksDB could not open the uploaded "
                        f"{load.table_format}-format database: {exc}"
                    ) from None
                shards.append(shard)
                held = shard.estimate_keys()
                if held != expected:
                    raise InvalidArgument(
                        f"{where}: shard {index}: the uploaded database holds {held} rows, "
                        f"the loader wrote {expected}"
                    )
            # The renames must last before the catalog names the version.
            fsync_dir(version_dir)
            fsync_dir(version_dir.parent)
            if new_root:
                fsync_dir(version_dir.parent.parent)
        except BaseException:
            for shard in shards:
                shard.close()
            raise
        return shards

    def abort(self, load_id: str) -> None:
        """Drop the load: its staged files, or its staged version if not yet published."""
        staged = self.staged.pop(load_id, None)
        if staged is not None and self.node.discard_staged(*staged):
            logger.info("table %r: bulk load %s aborted after staging", staged[0], load_id)
        load = self.loads.pop(load_id, None)
        if load is not None:
            shutil.rmtree(load.staging, ignore_errors=True)
            logger.info("table %r: bulk load %s aborted", load.table, load_id)

    def expire(self) -> None:
        """Abort loads with no upload for longer than the lease."""
        lease = self.node.config.load_lease_s
        now = time.monotonic()
        # Staged versions published since (installed by the node) need no abort.
        self.staged = {k: v for k, v in self.staged.items() if v in self.node.staged}
        for load in list(self.loads.values()):
            if now - load.last_activity > lease:
                logger.warning(
                    "table %r: bulk load %s expired (no upload for %.0f s)",
                    load.table,
                    load.load_id,
                    lease,
                )
                self.abort(load.load_id)
