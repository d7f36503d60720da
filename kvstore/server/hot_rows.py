"""The node's hot-row cache: the answer of a recent read of a key, by table version.

A read's answer for a key (its base row of the version read with the delta overlaid,
or "missing") is kept in ``_codec.HotRows``, under a prefix that stands for one table
version as this node holds it, so that the next read of the key skips RocksDB, the
overlay and every Python object per row; a fast-path request whose keys are all
cached is answered in C (``HotRows.answer_frame``).

What keeps it exact (docs/serving.md, "The hot-row cache"):

* **delta changes** (writes, updates, deletes, compaction): every delta shard of a
  cached table calls ``TableRows.on_delta_write`` from ``Shard.write``, before the
  write, with the keys it writes; their entries go under every prefix of the table;
* **TTL**: each entry holds only between the times ``_codec.overlay`` gives
  (``valid_us``), so a row is never served after a feature of it expired;
* **versions** (load, rollback, publish): a prefix is per (table object, version,
  base shards object); a read resolves its version first, so a swap reads another
  prefix, and a base opened anew gets a new one;
* **drop and recreate**: a new table object gets new prefixes; the dropped one's
  entries are forgotten when its successor (or any table of that name) is first read.

Everything runs on the event loop's thread (reads, writes and swaps), except the read
threads of a large Get, which only fetch from RocksDB: the cache is touched by one
thread at a time.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable

from kvstore import _codec
from kvstore.server.stats import StatsByTable
from kvstore.storage.table import Table

__all__ = ["HOT_ROWS_MAX_KEYS", "HotRowCache", "TableRows"]

_PREFIX = struct.Struct("<Q")

#: Gets of more keys neither read nor fill the cache. The cache is for the small
#: lookups of a request's own features; a large batch of keys drawn from a table larger
#: than the cache mostly misses, and each miss costs a lookup (and, admitted, an insert
#: and an eviction): measured A/B on 1M rows, uniform keys, 64 MiB, before the
#: doorkeeper and this limit: 100-key p50 1.57x, 1000-key 1.53x the node without it.
HOT_ROWS_MAX_KEYS = 32


class TableRows:
    """The cache's view of one table object: a prefix per version read, and the hook its
    delta shards call on every write."""

    __slots__ = ("_cache", "_prefixes", "published", "table")

    def __init__(self, cache: HotRowCache, table: Table) -> None:
        self._cache = cache
        self.table = table
        #: version → (the base shards object it was read from, its prefix).
        self._prefixes: dict[int, tuple[object, bytes]] = {}
        #: The prefix the fast read path answers from (HotRowCache.publish), if any.
        self.published: bytes | None = None
        for shard in table.delta:
            shard.on_write = self.on_delta_write

    def prefix(self, version: int, base: object) -> bytes:
        """The prefix of ``version`` read from ``base`` (its shard list; None without one)."""
        held = self._prefixes.get(version)
        if held is not None and held[0] is base:
            return held[1]
        prefix = _PREFIX.pack(next(self._cache.counter))
        self._prefixes[version] = (base, prefix)
        # Forget the prefixes of versions the table no longer keeps: every delta write
        # discards its keys under each prefix held, and a node that takes a load an hour
        # would otherwise hold thousands. Their entries age out of the LRU; a version
        # read again gets a new prefix, so none of them is reached again.
        kept = self.table.versions
        held_now = (version, self.table.current)
        for old in [v for v in self._prefixes if v not in kept and v not in held_now]:
            del self._prefixes[old]
        return prefix

    def prefixes(self) -> list[bytes]:
        return [prefix for _, prefix in self._prefixes.values()]

    def on_delta_write(self, shard: int, puts: list, deletes: Iterable[bytes]) -> None:
        """``Shard.write``'s hook: forget the written keys under every version's prefix."""
        self._cache.rows.discard(self.prefixes(), puts, deletes)


class HotRowCache:
    """The hot-row cache of one node: ``capacity`` bytes (NodeConfig.hot_rows_bytes)."""

    def __init__(self, capacity: int, stats: StatsByTable, max_keys: int) -> None:
        self.rows = _codec.HotRows(capacity)
        self.counter = itertools.count(1)
        self._tables: dict[str, TableRows] = {}
        self._stats = stats
        self._max_keys = max_keys

    def table_rows(self, table: Table) -> TableRows:
        """The cache's view of ``table``, made (and the delta shards hooked) on first use,
        and again for a new table object of the same name. A Table opens its delta shards
        once, in its constructor, and keeps them: the hooks stay in place."""
        name = table.schema.name
        held = self._tables.get(name)
        if held is not None and held.table is table:
            return held
        if held is not None:
            self.rows.discard_prefixes(set(held.prefixes()))
            self.rows.published.pop(name, None)
        held = TableRows(self, table)
        self._tables[name] = held
        return held

    def publish(self, rows: TableRows, version: int, prefix: bytes) -> None:
        """Let the fast read path answer ``rows.table``'s current ``version`` from the cache."""
        table = rows.table
        schema = table.schema
        name = schema.name
        rows.published = prefix
        self.rows.published[name] = _codec.HotTable(
            table,
            table.entry,
            version,
            prefix,
            schema.schema_id,
            schema.key_type == "int64",
            [f.name for f in schema.features],
            self._stats[name],
            self._max_keys,
        )
