"""Bulk loads on the node: staging uploaded SST files, ingesting them, the swap.

A load is ``begin`` (reserve the next version; one load per table at a time),
``upload`` (chunks of each shard's sorted SST files, checked by size and crc32),
``commit`` (ingest every shard's files into a fresh RocksDB instance of the new
version, then Node.install_version swaps it in with one catalog write) or ``abort``.
Nothing of a load is visible before the swap; a failed or abandoned load (no upload
for ``load_lease_s``) leaves no file behind, and the staging area is emptied at start.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import rocksdict

from kvstore.columns import now_us
from kvstore.errors import (
    InvalidArgument,
    KvstoreError,
    LoadConflict,
    SchemaChanged,
    StorageFull,
)
from kvstore.server.node import Node
from kvstore.storage.shard import Shard
from kvstore.storage.table import VersionMeta

logger = logging.getLogger(__name__)

__all__ = ["LoadManager"]

_FILE_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass
class _File:
    path: Path
    size: int = 0
    crc: int = 0
    complete: bool = False


@dataclass
class _Load:
    load_id: str
    table: str
    schema_id: int
    version: int
    label: str
    snapshot_time_us: int
    staging: Path
    started: float
    last_activity: float
    files: dict[tuple[int, str], _File] = field(default_factory=dict)


class LoadManager:
    """The bulk loads in progress on one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        assert node.config.cold_dir is not None
        self.staging_root = node.config.cold_dir / "staging"
        self.loads: dict[str, _Load] = {}

    def open(self) -> None:
        """Remove what loads interrupted by a crash or kill left behind."""
        if self.staging_root.exists():
            shutil.rmtree(self.staging_root)
            logger.info("removed the staging files of interrupted loads")
        self.staging_root.mkdir(parents=True, exist_ok=True)

    def _load(self, load_id: str) -> _Load:
        load = self.loads.get(load_id)
        if load is None:
            raise LoadConflict(
                f"no bulk load {load_id!r} is open on this node (it was committed, aborted, "
                f"or expired after {self.node.config.load_lease_s:.0f} s without uploads); "
                "start the load again"
            )
        return load

    def table_of(self, load_id: str) -> str:
        """The table an open load writes."""
        return self._load(load_id).table

    def begin(self, table: str, label: str, snapshot_time_us: int, schema_id: int = 0) -> _Load:
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
        version = max([entry.next_version, *[v + 1 for v in entry.versions]])
        entry.next_version = version + 1  # a failed load's number is not reused
        load_id = uuid.uuid4().hex
        now = time.monotonic()
        load = _Load(
            load_id,
            table,
            t.schema.schema_id,
            version,
            label,
            snapshot_time_us or now_us(),
            self.staging_root / load_id,
            time.time(),
            now,
        )
        load.staging.mkdir(parents=True)
        self.loads[load_id] = load
        logger.info("table %r: bulk load %s of version %d begins", table, load_id, version)
        return load

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
            path = load.staging / f"shard-{shard:04d}" / file_name
            path.parent.mkdir(exist_ok=True)
            f = load.files[(shard, file_name)] = _File(path)
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
            with open(f.path, "ab") as out:
                out.write(data)
        except OSError as exc:
            self.abort(load_id)
            if exc.errno == errno.ENOSPC:
                raise StorageFull(
                    f"load {load_id} of table {load.table!r} aborted: the node's disk is full "
                    f"at {self.staging_root}; the current version is unchanged"
                ) from None
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
            with open(f.path, "rb+") as out:
                os.fsync(out.fileno())
            f.complete = True
        return f.size

    def commit(
        self, load_id: str, files_per_shard: list[int], rows: int
    ) -> tuple[VersionMeta, float]:
        """Ingest and swap in the load's version; returns it and the ingest seconds."""
        load = self._load(load_id)
        table = self.node.table(load.table)
        started = time.perf_counter()
        try:
            if table.schema.schema_id != load.schema_id:
                raise LoadConflict(
                    f"table {load.table!r} was dropped and recreated during the load"
                )
            shards = table.schema.shards
            if len(files_per_shard) != shards:
                raise InvalidArgument(
                    f"load {load_id}: files_per_shard has {len(files_per_shard)} entries, the "
                    f"table has {shards} shards"
                )
            by_shard: list[list[_File]] = [[] for _ in range(shards)]
            for (shard, name), f in sorted(load.files.items()):
                if not f.complete:
                    raise InvalidArgument(
                        f"load {load_id}: shard {shard} file {name} was not uploaded completely"
                    )
                by_shard[shard].append(f)
            for shard, expected in enumerate(files_per_shard):
                if len(by_shard[shard]) != expected:
                    raise InvalidArgument(
                        f"load {load_id}: shard {shard} received {len(by_shard[shard])} files, "
                        f"the loader sent {expected}"
                    )
            if rows <= 0 or not any(files_per_shard):
                raise InvalidArgument(f"load {load_id}: no rows; an empty load makes no version")
            version_dir = table.version_dir(load.version)
            if version_dir.exists():
                shutil.rmtree(version_dir)
            ingested = self._ingest(version_dir, by_shard)
        except BaseException:
            self.abort(load_id)
            shutil.rmtree(table.version_dir(load.version), ignore_errors=True)
            raise
        cold_bytes = sum(p.stat().st_size for p in version_dir.rglob("*") if p.is_file())
        meta = VersionMeta(
            load.version, load.label, load.snapshot_time_us, rows, cold_bytes, now_us()
        )
        self.node.install_version(load.table, meta, ingested)
        self.loads.pop(load_id, None)
        shutil.rmtree(load.staging, ignore_errors=True)
        return meta, time.perf_counter() - started

    def _ingest(self, version_dir: Path, by_shard: list[list[_File]]) -> list[Shard]:
        options = self.node.shard_options
        ingest_options = rocksdict.IngestExternalFileOptions()
        ingest_options.set_move_files(True)  # a rename: the cold tier is written once
        shards: list[Shard] = []
        try:
            for index, files in enumerate(by_shard):
                shard = Shard(
                    version_dir / f"shard-{index:04d}", index, options, self.node.base_read_options
                )
                shards.append(shard)
                if files:
                    shard.ingest([str(f.path) for f in files], ingest_options)
        except Exception as exc:
            for shard in shards:
                shard.close()
            if isinstance(exc, KvstoreError):
                raise
            if "No space left on device" in str(exc):
                raise StorageFull(
                    f"the node's disk is full at {version_dir} while ingesting the load; "
                    "the current version is unchanged"
                ) from None
            raise InvalidArgument(f"RocksDB refused the uploaded SST files: {exc}") from exc
        return shards

    def abort(self, load_id: str) -> None:
        load = self.loads.pop(load_id, None)
        if load is not None:
            shutil.rmtree(load.staging, ignore_errors=True)
            logger.info("table %r: bulk load %s aborted", load.table, load_id)

    def expire(self) -> None:
        """Abort loads with no upload for longer than the lease."""
        lease = self.node.config.load_lease_s
        now = time.monotonic()
        for load in list(self.loads.values()):
            if now - load.last_activity > lease:
                logger.warning(
                    "table %r: bulk load %s expired (no upload for %.0f s)",
                    load.table,
                    load.load_id,
                    lease,
                )
                self.abort(load.load_id)
