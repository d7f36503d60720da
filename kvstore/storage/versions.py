"""A table's bulk versions: what each one is, which is current, which are kept.

``TableEntry`` is the catalog's record of one table; the version bookkeeping (which
version a read uses, installing a version and forgetting those beyond
``keep_versions``, rolling back) works on it in memory. Persisting it is the
catalog's (``kvstore.storage.catalog``), moving files the table's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kvstore.errors import NotFound
from kvstore.schema import TableSchema

__all__ = ["TableEntry", "VersionMeta"]


@dataclass
class VersionMeta:
    """One bulk version. Times in µs since the epoch, sizes in bytes."""

    version: int
    label: str
    snapshot_time_us: int
    rows: int
    bytes: int
    created_at_us: int
    #: The base shards' table format; versions loaded before formats existed are
    #: block-based (they were SST files ingested by the node).
    format: str = "block"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TableEntry:
    """A table's schema, its kept versions and the current one (0 = none: delta only)."""

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

    def resolve(self, version: int) -> int:
        """The version a read uses: ``version`` if kept, else the current one (0 = none)."""
        if not version:
            return self.current
        if version not in self.versions:
            kept = ", ".join(str(v) for v in sorted(self.versions)) or "none"
            raise NotFound(
                f"table {self.schema.name!r} has no version {version}; kept versions: {kept}"
            )
        return version

    def install(self, meta: VersionMeta, keep_versions: int) -> list[int]:
        """Make ``meta`` current and forget the versions older than it beyond
        ``keep_versions``; returns those forgotten, whose files the caller deletes."""
        older = sorted(v for v in self.versions if v < meta.version)
        dropped = older[: max(0, len(older) - keep_versions)]
        self.versions[meta.version] = meta
        for version in dropped:
            del self.versions[version]
        self.current = meta.version
        self.next_version = max(self.next_version, meta.version + 1)
        return dropped

    def rollback_target(self, to_version: int = 0) -> int:
        """The kept version a rollback makes current: ``to_version``, or the one before
        the current one."""
        if to_version:
            return self.resolve(to_version)
        older = sorted(v for v in self.versions if v < self.current)
        if not older:
            raise NotFound(
                f"table {self.schema.name!r}: no version before {self.current} is kept "
                "to roll back to"
            )
        return older[-1]
