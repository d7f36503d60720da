"""A table's version bookkeeping in the catalog: which version a read uses, installing
a version (forgetting those beyond keep_versions), rolling back, and a failed catalog
write leaving the catalog in memory as it was. A real catalog file in a temporary
directory; the failed write is one into a directory that does not exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.errors import NotFound
from kvstore.schema import TableSchema
from kvstore.storage.catalog import Catalog
from kvstore.storage.versions import TableEntry, VersionMeta


def _meta(version: int) -> VersionMeta:
    return VersionMeta(version, f"v{version}", 1000 * version, 10, 100, 2000 * version)


def _entry(catalog: Catalog) -> TableEntry:
    return catalog.add(TableSchema.build("t", "int64", {"x": "int64"}))


def test_a_read_uses_a_kept_version_or_the_current_one(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    entry = _entry(catalog)
    assert entry.resolve(0) == 0  # no version yet: the delta alone
    catalog.install(entry, _meta(1), keep_versions=2)
    catalog.install(entry, _meta(2), keep_versions=2)
    assert entry.resolve(0) == 2
    assert entry.resolve(1) == 1
    with pytest.raises(NotFound, match=r"table 't' has no version 7; kept versions: 1, 2"):
        entry.resolve(7)


def test_install_forgets_versions_beyond_keep_versions_and_persists(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    entry = _entry(catalog)
    forgotten = [catalog.install(entry, _meta(v), keep_versions=1) for v in (1, 2, 3)]
    assert forgotten == [[], [], [1]]
    again = Catalog(tmp_path).entries["t"]
    assert (again.current, sorted(again.versions), again.next_version) == (3, [2, 3], 4)
    assert again.versions[3] == _meta(3)


def test_rollback_goes_to_the_version_before_or_the_one_named(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    entry = _entry(catalog)
    for v in (1, 2, 3):
        catalog.install(entry, _meta(v), keep_versions=5)
    assert catalog.rollback(entry).version == 2
    assert catalog.rollback(entry, 3).version == 3
    assert Catalog(tmp_path).entries["t"].current == 3
    catalog.rollback(entry, 1)
    with pytest.raises(NotFound, match=r"table 't': no version before 1 is kept"):
        catalog.rollback(entry)


def test_a_failed_catalog_write_leaves_the_entry_as_it_was(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    entry = _entry(catalog)
    catalog.install(entry, _meta(1), keep_versions=0)
    catalog.install(entry, _meta(2), keep_versions=5)
    catalog.path = tmp_path / "gone" / "catalog.json"  # a directory that is not there
    with pytest.raises(FileNotFoundError):
        catalog.install(entry, _meta(3), keep_versions=0)
    with pytest.raises(FileNotFoundError):
        catalog.rollback(entry)
    assert (entry.current, sorted(entry.versions), entry.next_version) == (2, [1, 2], 3)
