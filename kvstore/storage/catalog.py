"""The node's catalog: tables, schemas, bulk versions and which one is current, on disk.

One JSON file, replaced atomically (write, fsync, rename, fsync the directory), so a
crash leaves either the old catalog or the new one, never half of each. A version
swap is one catalog write: that is what makes it atomic across a restart.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kvstore.schema import TableSchema
from kvstore.storage.table import VersionMeta

__all__ = ["Catalog", "TableEntry"]

CATALOG_FILE = "catalog.json"


@dataclass
class TableEntry:
    schema: TableSchema
    current: int = 0
    next_version: int = 1
    versions: dict[int, VersionMeta] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "schema": self.schema.to_json(),
            "current": self.current,
            "next_version": self.next_version,
            "versions": {str(v): m.to_json() for v, m in sorted(self.versions.items())},
        }

    @classmethod
    def from_json(cls, data: dict) -> TableEntry:
        return cls(
            TableSchema.from_json(data["schema"]),
            data.get("current", 0),
            data.get("next_version", 1),
            {int(v): VersionMeta(**m) for v, m in data.get("versions", {}).items()},
        )


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

    def add(self, schema: TableSchema) -> TableEntry:
        """Give ``schema`` a fresh schema id, record it with no version yet, persist."""
        schema = schema.with_id(self.next_schema_id)
        self.next_schema_id += 1
        entry = TableEntry(schema)
        self.entries[schema.name] = entry
        self.save()
        return entry

    def remove(self, name: str) -> None:
        del self.entries[name]
        self.save()

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
