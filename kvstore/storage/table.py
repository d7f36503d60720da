"""A table on a node: its schema, its current version, and one Shard per partition."""

from __future__ import annotations

import shutil
from pathlib import Path

import rocksdict

from kvstore.schema import TableSchema
from kvstore.storage.shard import Shard

__all__ = ["Table"]


class Table:
    """The shards of the current version of one table, under ``root/v<version>/``."""

    __slots__ = ("root", "schema", "shards", "version")

    def __init__(
        self, root: Path, schema: TableSchema, version: int, options: rocksdict.Options
    ) -> None:
        self.root = root
        self.schema = schema
        self.version = version
        version_dir = root / f"v{version:06d}"
        self.shards = [
            Shard(version_dir / f"shard-{i:04d}", i, options) for i in range(schema.shards)
        ]

    def estimate_keys(self) -> int:
        return sum(s.estimate_keys() for s in self.shards)

    def disk_bytes(self) -> int:
        return sum(s.disk_bytes() for s in self.shards)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def destroy(self) -> None:
        """Close every shard and delete the table's files."""
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)
