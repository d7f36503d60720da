"""The node's catalog: which tables exist, their schemas and current versions, on disk.

One JSON file, replaced atomically (write, fsync, rename, fsync the directory), so a
crash leaves either the old catalog or the new one, never half of each.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvstore.schema import TableSchema

__all__ = ["Catalog"]

CATALOG_FILE = "catalog.json"


class Catalog:
    """Table schemas and versions, persisted under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / CATALOG_FILE
        self.next_schema_id = 1
        self.tables: dict[str, dict] = {}
        if self.path.exists():
            data = json.loads(self.path.read_text())
            self.next_schema_id = data["next_schema_id"]
            self.tables = data["tables"]

    def schemas(self) -> list[tuple[TableSchema, int]]:
        """Every table's schema and current version."""
        return [
            (TableSchema.from_json(entry["schema"]), entry["version"])
            for entry in self.tables.values()
        ]

    def add(self, schema: TableSchema) -> TableSchema:
        """Give ``schema`` a fresh schema id, record it at version 1, persist; return it."""
        schema = schema.with_id(self.next_schema_id)
        self.next_schema_id += 1
        self.tables[schema.name] = {"schema": schema.to_json(), "version": 1}
        self._save()
        return schema

    def remove(self, name: str) -> None:
        del self.tables[name]
        self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        payload = {"next_schema_id": self.next_schema_id, "tables": self.tables}
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
