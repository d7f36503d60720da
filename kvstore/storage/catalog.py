"""The node's catalog: tables, schemas, bulk versions and which one is current, on disk.

One JSON file, replaced atomically (write, fsync, rename, fsync the directory), so a
crash leaves either the old catalog or the new one, never half of each. A version
swap is one catalog write: that is what makes it atomic across a restart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvstore.schema import TableSchema
from kvstore.storage.versions import TableEntry, VersionMeta

__all__ = ["Catalog", "fsync_dir"]

CATALOG_FILE = "catalog.json"


class Catalog:
    """Table entries, persisted under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / CATALOG_FILE
        self.next_schema_id = 1
        self.entries: dict[str, TableEntry] = {}
        if self.path.exists():
            data = json.loads(self.path.read_text())
            self.next_schema_id = data["next_schema_id"]
            self.entries = {n: TableEntry.from_json(e) for n, e in data["tables"].items()}

    def add(self, schema: TableSchema, schema_id: int = 0) -> TableEntry:
        """Record ``schema`` with no version yet, persist; its id is ``schema_id`` (a
        cluster's placement gives it) or else a fresh one."""
        schema = schema.with_id(schema_id or self.next_schema_id)
        self.next_schema_id = max(self.next_schema_id, schema.schema_id) + 1
        entry = TableEntry(schema)
        self.entries[schema.name] = entry
        self.save()
        return entry

    def remove(self, name: str) -> None:
        del self.entries[name]
        self.save()

    def install(self, entry: TableEntry, meta: VersionMeta, keep_versions: int) -> list[int]:
        """Make ``meta`` the current version of ``entry``'s table in one catalog write;
        returns the versions it forgot (``TableEntry.install``), whose files may go
        only now. If the write fails, ``entry`` is as before and the error raised."""
        before = (dict(entry.versions), entry.current, entry.next_version)
        dropped = entry.install(meta, keep_versions)
        try:
            self.save()
        except BaseException:
            entry.versions, entry.current, entry.next_version = before
            raise
        return dropped

    def rollback(self, entry: TableEntry, to_version: int = 0) -> VersionMeta:
        """Make a kept version current again (``TableEntry.rollback_target``), persisted."""
        target = entry.rollback_target(to_version)
        previous, entry.current = entry.current, target
        try:
            self.save()
        except BaseException:
            entry.current = previous
            raise
        return entry.versions[target]

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        payload = {
            "next_schema_id": self.next_schema_id,
            "tables": {n: e.to_json() for n, e in self.entries.items()},
        }
        with open(tmp, "w") as f:
            # No sort_keys: the order of a schema's features is the order of its rows.
            json.dump(payload, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
