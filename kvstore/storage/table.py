"""A table on a node: its schema, the delta shards, and the bulk versions of its base.

Two tiers per shard (docs/architecture.md, "Base and delta"):

* the **delta**, one RocksDB per shard under the hot data directory: every online
  write, update and delete, with per-feature event times (format-3 rows);
* the **base**, one immutable RocksDB per shard per bulk version under the cold
  directory, built by the loader, moved in by a bulk load and then only read; its
  table format (``VersionMeta.format``, see ``kvstore.storage.shard.BASE_FORMATS``)
  is recorded per version.

A read overlays the delta on the base of the current (or a pinned) version.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from kvstore.schema import TableSchema
from kvstore.storage.catalog import fsync_dir
from kvstore.storage.engine import Engine
from kvstore.storage.shard import Shard, create_empty_base, files_bytes
from kvstore.storage.versions import TableEntry, VersionMeta

logger = logging.getLogger(__name__)

__all__ = ["Table", "VersionMeta"]


class Table:
    """Delta shards plus the kept bulk versions of one table."""

    def __init__(
        self,
        hot_root: Path,
        cold_root: Path,
        entry: TableEntry,
        engine: Engine,
    ) -> None:
        """Open the delta shards (base shards open on first use), with ``engine``'s
        options and caches."""
        self.hot_root = hot_root
        self.cold_root = cold_root
        #: The catalog's record of this table: schema, current version, kept versions.
        self.entry = entry
        self._engine = engine
        schema = entry.schema
        self.delta = [
            Shard(
                hot_root / "delta" / f"shard-{i:04d}",
                i,
                engine.delta_options,
                table=schema.name,
                memory_bytes=engine.delta_memory_bytes // schema.shards,
            )
            for i in range(schema.shards)
        ]
        self._bases: dict[int, list[Shard]] = {}

    @property
    def schema(self) -> TableSchema:
        return self.entry.schema

    @property
    def current(self) -> int:
        """The version reads use by default; 0 = no bulk version (the delta alone)."""
        return self.entry.current

    @property
    def versions(self) -> dict[int, VersionMeta]:
        return self.entry.versions

    def version_dir(self, version: int) -> Path:
        return self.cold_root / f"v{version:06d}"

    def base(self, version: int) -> list[Shard]:
        """The base shards of a kept version, opened on first use."""
        shards = self._bases.get(version)
        if shards is None:
            root = self.version_dir(version)
            options = self._engine.base_options(self.versions[version].format)
            read_options = self._engine.base_read_options
            shards = [
                Shard(
                    root / f"shard-{i:04d}",
                    i,
                    options,
                    read_options,
                    base=True,
                    table=self.schema.name,
                )
                for i in range(self.schema.shards)
            ]
            self._bases[version] = shards
        return shards

    def adopt_base(self, version: int, shards: list[Shard]) -> None:
        """Take over the shards a bulk load opened for ``version``."""
        self._bases[version] = shards

    def replace_base_shard(self, version: int, index: int, source: Path | None) -> None:
        """Put the database at ``source`` (None: an empty one) in place of shard ``index``
        of kept version ``version``: a shard moved here, or moved away. The old files go
        aside first, then the new ones are renamed in (same file system), then the old
        ones are deleted; the shard is reopened if it was open."""
        path = self.version_dir(version) / f"shard-{index:04d}"
        options = self._engine.base_options(self.versions[version].format)
        opened = self._bases.get(version)
        if opened is not None:
            opened[index].close()
        aside = path.with_name(path.name + ".old")
        shutil.rmtree(aside, ignore_errors=True)
        if path.exists():
            os.rename(path, aside)
        if source is None:
            create_empty_base(path, options)
        else:
            os.rename(source, path)
        fsync_dir(path)
        fsync_dir(path.parent)
        shutil.rmtree(aside, ignore_errors=True)
        if opened is not None:
            # A new list, not an item set in place: the hot-row cache keys a version's
            # rows by the identity of its shard list (kvstore.server.hot_rows).
            opened = list(opened)
            opened[index] = Shard(
                path, index, options, self._engine.base_read_options, base=True, table=self.name
            )
            self._bases[version] = opened

    def add_version(self, meta: VersionMeta, index: int, source: Path) -> None:
        """Keep version ``meta`` (not current) holding only shard ``index``, the database
        at ``source``: a moved shard's version this node had none of (its other shards
        empty here, as after a load that sent this node nothing for them). The caller
        persists the catalog."""
        root = self.version_dir(meta.version)
        root.mkdir(parents=True, exist_ok=True)
        options = self._engine.base_options(meta.format)
        for i in range(self.schema.shards):
            path = root / f"shard-{i:04d}"
            if i == index:
                shutil.rmtree(path, ignore_errors=True)
                os.rename(source, path)
            elif not path.exists():
                create_empty_base(path, options)
        fsync_dir(root)
        fsync_dir(root.parent)
        self._bases.pop(meta.version, None)
        self.versions[meta.version] = meta

    @property
    def name(self) -> str:
        return self.schema.name

    def drop_version(self, version: int) -> None:
        """Close and delete a version's files (never the current one)."""
        assert version != self.current
        for shard in self._bases.pop(version, []):
            shard.close()
        self.versions.pop(version, None)
        shutil.rmtree(self.version_dir(version), ignore_errors=True)
        logger.info("table %r: deleted version %d", self.schema.name, version)

    def estimate_keys(self) -> int:
        base = self.base(self.current) if self.current else []
        return max(sum(s.estimate_keys() for s in self.delta), sum(s.estimate_keys() for s in base))

    def shard_bytes(self, index: int) -> int:
        """Bytes of shard ``index``: its delta and its base in the current version."""
        total = self.delta[index].disk_bytes()
        if self.current:
            total += files_bytes(self.version_dir(self.current) / f"shard-{index:04d}")
        return total

    def disk_bytes(self) -> int:
        """Bytes of the delta and of every kept version."""
        total = sum(s.disk_bytes() for s in self.delta)
        return total + sum(files_bytes(self.version_dir(v)) for v in self.versions)

    def close(self) -> None:
        for shard in self.delta:
            shard.close()
        for shards in self._bases.values():
            for shard in shards:
                shard.close()
        self._bases.clear()

    def destroy(self) -> None:
        """Close every shard and delete the table's files, hot and cold."""
        self.close()
        shutil.rmtree(self.hot_root, ignore_errors=True)
        shutil.rmtree(self.cold_root, ignore_errors=True)
