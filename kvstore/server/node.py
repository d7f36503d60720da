"""The node: its tables by name, and each request handed to the module that serves it.

A thin facade: the node owns the lifecycle (open the catalog and every table, close),
creates and drops tables, and delegates reads (``reads``), writes, deletes and
consumer positions (``writes``), activity counts (``stats``) and version bookkeeping
(``kvstore.storage``). It does not know gRPC (the servicer translates) or RocksDB
(the storage engine and shards do). Every call, and each shard's step of a write
(``write_steps``, ``delete_steps``), runs to completion on the event loop thread
without awaiting, so a partial write's read-modify-write is not interleaved with
another request.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np

from kvstore.config import NodeConfig
from kvstore.errors import (
    AlreadyExists,
    NotFound,
    SchemaChanged,
    StaleMap,
    TableNotFound,
    Unavailable,
)
from kvstore.keys import KeyBatch
from kvstore.schema import TableSchema
from kvstore.server.demo import DEMO_TABLE, load_demo
from kvstore.server.reads import GetAnswer, Reads
from kvstore.server.stats import StatsByTable, TableStats
from kvstore.server.writes import Position, Writes, run_steps
from kvstore.storage.catalog import Catalog
from kvstore.storage.engine import Engine
from kvstore.storage.shard import Shard
from kvstore.storage.table import Table
from kvstore.storage.versions import TableEntry, VersionMeta

if TYPE_CHECKING:  # a node without etcd never imports the cluster's modules (aetcd)
    from kvstore.server.cluster_view import ClusterView

logger = logging.getLogger(__name__)

# GetAnswer, Position and run_steps are the types and driver of Node's own calls:
# callers import them from here.
__all__ = ["GetAnswer", "Node", "Position", "run_steps"]


class Node:
    """The tables of one storage node and the requests that touch them."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.tables: dict[str, Table] = {}
        #: Caches and options of every shard.
        self.engine = Engine(config)
        self.catalog: Catalog | None = None
        self.stats = StatsByTable()
        self.reads = Reads(config, self.stats)
        self.writes = Writes(config, self.tables, self.engine, self.stats)
        self.started = time.monotonic()
        self.closed = False
        #: The placement's view of a node in a cluster (--etcd): the shards it may serve.
        #: None when the node runs alone and holds every shard (no check is made).
        self.view: ClusterView | None = None
        #: (table, version) → a version a load staged (moved in, opened and checked)
        #: but not made current: publish_version installs it, discard_staged drops it.
        #: Kept in memory only: a restart moves a staged version's files aside.
        self.staged: dict[tuple[str, int], tuple[VersionMeta, list[Shard]]] = {}

    # -- lifecycle -------------------------------------------------------------------

    def open(self) -> None:
        """Open every table in the catalog (creating the data directories if new)."""
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        assert cfg.cold_dir is not None
        cfg.cold_dir.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(cfg.data_dir)
        for entry in self.catalog.entries.values():
            self.tables[entry.schema.name] = self._open_table(entry)
        logger.info("opened %d table(s) from %s", len(self.tables), cfg.data_dir)
        if cfg.demo and DEMO_TABLE not in self.tables:
            load_demo(self)

    def _open_table(self, entry: TableEntry) -> Table:
        name = f"{entry.schema.name}-{entry.schema.schema_id}"
        assert self.config.cold_dir is not None
        return Table(
            self.config.data_dir / "tables" / name,
            self.config.cold_dir / "tables" / name,
            entry,
            self.engine,
        )

    def close(self) -> None:
        self.closed = True
        self.reads.close()
        for _meta, shards in self.staged.values():
            for shard in shards:
                shard.close()
        self.staged.clear()
        for table in self.tables.values():
            table.close()
        self.tables.clear()

    # RocksDB's own types, unnamed here: they are the engine's business.
    @property
    def base_read_options(self):
        """Read options of every base shard (for the shards a bulk load opens)."""
        return self.engine.base_read_options

    def base_options(self, table_format: str):
        """The RocksDB options of base shards in ``table_format`` (``Engine.base_options``)."""
        return self.engine.base_options(table_format)

    def cache_usage(self) -> dict[str, int]:
        """Bytes in the block cache and the row cache, and the row cache's capacity."""
        return self.engine.cache_usage()

    # -- tables ----------------------------------------------------------------------

    def table(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            if self.closed:
                raise Unavailable("the node is shutting down") from None
            known = ", ".join(sorted(self.tables)) or "(none)"
            raise TableNotFound(f"no table {name!r} on this node; tables: {known}") from None

    def create_table(self, schema: TableSchema, schema_id: int = 0) -> Table:
        """Create ``schema``'s table; the same definition again returns the existing one.

        ``schema_id``: the id the cluster's placement gave it (else a fresh local one).
        """
        existing = self.tables.get(schema.name)
        if existing is not None:
            if existing.schema.same_definition(schema):
                return existing
            raise AlreadyExists(
                f"table {schema.name!r} exists with another schema: "
                f"{existing.schema.to_json()} (asked for {schema.to_json()})"
            )
        assert self.catalog is not None
        entry = self.catalog.add(schema, schema_id)
        table = self._open_table(entry)
        self.tables[schema.name] = table
        logger.info("created table %r (schema id %d)", schema.name, entry.schema.schema_id)
        return table

    def drop_table(self, name: str) -> None:
        table = self.table(name)
        assert self.catalog is not None
        self.catalog.remove(name)
        del self.tables[name]
        self.stats.pop(name, None)
        table.destroy()
        logger.info("dropped table %r", name)

    def table_stats(self, name: str) -> TableStats:
        """Activity of table ``name`` since the node started."""
        return self.stats[name]

    # -- versions --------------------------------------------------------------------

    def install_version(self, name: str, meta: VersionMeta, shards: list[Shard]) -> None:
        """Make a freshly loaded version current: one catalog write, then the swap.

        Runs without awaiting, so no read sees part of the old and part of the new
        version. The same catalog write forgets the versions beyond
        ``keep_versions``, whose files are deleted only after it (a crash in between
        leaves files the next start moves aside, never a catalog naming lost files).
        It raises only if that write fails, with the catalog in memory as before (the
        caller still owns ``shards``); what follows the swap (deleting old versions,
        compacting the delta against the new snapshot time) is logged if it fails.
        """
        table = self.table(name)
        assert self.catalog is not None
        previous = table.current
        dropped = self.catalog.install(table.entry, meta, self.config.keep_versions)
        table.adopt_base(meta.version, shards)
        logger.info(
            "table %r: version %d is current (was %d), %d rows",
            name,
            meta.version,
            previous,
            meta.rows,
        )
        try:
            for version in dropped:
                table.drop_version(version)
            self.compact_delta(name)
        except Exception:  # the version is in; the next start or load tidies up
            logger.exception("table %r: tidying up after version %d", name, meta.version)

    def stage_version(self, name: str, meta: VersionMeta, shards: list[Shard]) -> None:
        """Hold a loaded, checked version until the cluster makes it current."""
        self.staged[(name, meta.version)] = (meta, shards)
        logger.info("table %r: version %d staged, %d rows", name, meta.version, meta.rows)

    def discard_staged(self, name: str, version: int) -> bool:
        """Close and delete a staged version's files; False if none was staged."""
        staged = self.staged.pop((name, version), None)
        if staged is None:
            return False
        for shard in staged[1]:
            shard.close()
        table = self.tables.get(name)
        if table is not None and version not in table.versions:
            shutil.rmtree(table.version_dir(version), ignore_errors=True)
        logger.info("table %r: staged version %d discarded", name, version)
        return True

    def publish_version(self, name: str, version: int) -> VersionMeta:
        """Make ``version`` of table ``name`` current: a staged one is installed, a kept
        one becomes current again (a rollback). NotFound if this node has neither."""
        table = self.table(name)
        if version == table.current and version in table.versions:
            return table.versions[version]
        staged = self.staged.pop((name, version), None)
        if staged is not None:
            meta, shards = staged
            try:
                self.install_version(name, meta, shards)
            except BaseException:
                self.staged[(name, version)] = staged
                raise
            return meta
        if version not in table.versions:
            raise NotFound(
                f"table {name!r}: version {version} is neither staged nor kept on this "
                f"node (kept: {sorted(table.versions)})"
            )
        return self.rollback(name, version)

    def rollback(self, name: str, to_version: int = 0) -> VersionMeta:
        """Make a kept version current again: ``to_version``, or the one before current."""
        table = self.table(name)
        assert self.catalog is not None
        meta = self.catalog.rollback(table.entry, to_version)
        logger.info("table %r: rolled back to version %d", name, meta.version)
        return meta

    def compact_delta(self, name: str, chunk: int = 4096) -> int:
        """Drop delta entries the current version's snapshot makes obsolete; returns how many
        delta rows changed or went (``chunk``: rows a scan step)."""
        return self.writes.compact_delta(self.table(name), chunk)

    # -- data ------------------------------------------------------------------------

    def get(self, name: str, keys: KeyBatch, features: list[str], version: int = 0) -> GetAnswer:
        """The rows of ``keys``, delta over base; ``features`` are only checked (the client
        decodes). StaleMap if the node does not serve a key's shard."""
        table = self.table(name)
        if self.view is not None:
            self.view.check(name, keys, writing=False)
            if version > table.current and version not in table.versions:
                # A version the cluster published that this node has not made current
                # yet (its placement watch is a moment behind): the client refreshes
                # its map and retries, as for a shard it does not hold.
                raise StaleMap(
                    f"node {self.view.node_id} does not have version {version} of table "
                    f"{name!r} yet (current {table.current}) at placement epoch "
                    f"{self.view.epoch}; refresh the cluster map",
                    self.view.epoch,
                )
        return self.reads.get(table, keys, features, version)

    def write_steps(
        self,
        name: str,
        schema_id: int,
        keys: KeyBatch,
        rows: bytes,
        row_offsets: np.ndarray,
        features: list[str],
        position: Position | None = None,
        epoch: int = 0,
    ) -> Generator[Any, None, int]:
        """Apply full or partial rows to the delta in steps of at most 32 keys of one
        shard (``Writes.write_steps``); the number of rows written. Nothing runs before
        the first step, whose first act is to refuse (StaleMap) keys of shards the node
        does not hold, and a write planned on a map of ``epoch`` older than the table's
        replicas (``ClusterView.check``)."""
        token = yield from self._admit_write(name, keys, epoch)
        try:
            return (
                yield from self.writes.write_steps(
                    self.table(name), schema_id, keys, rows, row_offsets, features, position
                )
            )
        finally:
            if token is not None:
                self.view.end_write(name, token)  # type: ignore[union-attr]

    def delete_steps(
        self,
        name: str,
        keys: KeyBatch,
        event_time_us: int = 0,
        position: Position | None = None,
        epoch: int = 0,
    ) -> Generator[Any, None, int]:
        """Tombstone ``keys`` at ``event_time_us`` (µs, default now) in steps of at most 32
        keys of one shard (``Writes.delete_steps``); the number of keys. StaleMap, before
        anything is applied, as for ``write_steps``."""
        token = yield from self._admit_write(name, keys, epoch)
        try:
            table = self.table(name)
            if keys.key_type != table.schema.key_type:
                # Dropped and made again with other keys while this delete waited for its
                # turn (the servicer parsed the keys for the table before): not its keys.
                raise SchemaChanged(
                    f"table {name!r} now has {table.schema.key_type} keys; this delete's "
                    f"keys were read as {keys.key_type}"
                )
            return (yield from self.writes.delete_steps(table, keys, event_time_us, position))
        finally:
            if token is not None:
                self.view.end_write(name, token)  # type: ignore[union-attr]

    def _admit_write(
        self, name: str, keys: KeyBatch, epoch: int
    ) -> Generator[Any, None, int | None]:
        """In a cluster: StaleMap unless this node holds every key's shard (and the
        table's replicas are as at ``epoch``); while one of them is sealed by a move's
        hand-over, yield the future to await (``_drive`` awaits it) and check again.
        Returns the write's token in ``view.writing``."""
        if self.view is None:
            return None
        self.view.check(name, keys, writing=True, epoch=epoch)
        while (sealed := self.view.sealed_wait(name, keys)) is not None:
            yield sealed
            self.view.check(name, keys, writing=True, epoch=epoch)
        return self.view.begin_write(name)

    def consumer_positions(self, name: str, consumer: str, source: str) -> dict[int, int]:
        """Partition → the offset every shard of the table has applied (the minimum); in
        a cluster, every shard this node holds (a shard moved away is empty here)."""
        held = None if self.view is None else self.view.writable.get(name)
        return self.writes.consumer_positions(self.table(name), consumer, source, held)
