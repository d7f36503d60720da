"""The node: tables by name, and each request routed to the shards that hold its keys.

This layer knows tables, shards and keys; it does not know gRPC (the servicer
translates) or RocksDB (the shards do). Every call runs to completion on the event
loop thread without awaiting, so a partial write's read-modify-write is not
interleaved with another request.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import rocksdict

from kvstore import _codec
from kvstore.clock import now_us
from kvstore.columns import encode_rows
from kvstore.config import NodeConfig
from kvstore.errors import (
    AlreadyExists,
    CorruptValue,
    InvalidArgument,
    NotFound,
    RequestTooLarge,
    SchemaChanged,
    TableNotFound,
    Unavailable,
)
from kvstore.keys import KeyBatch
from kvstore.schema import TableSchema
from kvstore.storage.catalog import Catalog
from kvstore.storage.shard import (
    SYSTEM_PREFIX,
    Shard,
    base_options,
    base_read_options,
    rocksdb_options,
)
from kvstore.storage.table import Table, VersionMeta

logger = logging.getLogger(__name__)

__all__ = ["GetAnswer", "Node"]

DEMO_TABLE = "demo_users"
DEMO_ROWS = 1000


@dataclass(slots=True)
class GetAnswer:
    """Rows for a batch of keys, in shard order; ``order[i]`` is row i's request position."""

    schema_id: int
    version: int
    values: bytes
    lengths: np.ndarray  # int32, -1 = missing
    order: np.ndarray | None  # int32, None = request order


@dataclass(frozen=True, slots=True)
class Position:
    """A stream consumer's offset in one partition of its source."""

    consumer: str
    source: str
    partition: int
    offset: int

    def key_prefix(self) -> bytes:
        return position_prefix(self.consumer, self.source)

    def key(self) -> bytes:
        return self.key_prefix() + struct.pack(">I", self.partition)


def position_prefix(consumer: str, source: str) -> bytes:
    return SYSTEM_PREFIX + b"pos\x00" + consumer.encode() + b"\x00" + source.encode() + b"\x00"


LAG_SAMPLES = 4096


@dataclass
class TableStats:
    """Activity and freshness of one table since the node started. Times in µs."""

    rows_updated: int = 0
    keys_deleted: int = 0
    keys_read: int = 0
    newest_event_time_us: int = 0
    lags_us: np.ndarray = field(default_factory=lambda: np.zeros(LAG_SAMPLES, np.int64))
    lag_count: int = 0

    def record_updates(self, event_times: np.ndarray, applied_us: int) -> None:
        """Record that updates with these event times became readable at ``applied_us``."""
        self.rows_updated += len(event_times)
        newest = int(event_times.max())
        self.newest_event_time_us = max(self.newest_event_time_us, newest)
        lags = applied_us - event_times[-LAG_SAMPLES:]
        start = self.lag_count % LAG_SAMPLES
        end = start + len(lags)
        if end <= LAG_SAMPLES:
            self.lags_us[start:end] = lags
        else:
            split = LAG_SAMPLES - start
            self.lags_us[start:] = lags[:split]
            self.lags_us[: end - LAG_SAMPLES] = lags[split:]
        self.lag_count += len(lags)

    def lag_percentiles(self) -> tuple[float, float, int]:
        """(p50, p99, samples) of the update lag over the last updates, µs."""
        n = min(self.lag_count, LAG_SAMPLES)
        if not n:
            return 0.0, 0.0, 0
        p50, p99 = np.percentile(self.lags_us[:n], [50, 99])
        return float(p50), float(p99), n


def _fetch_groups(
    groups: list[tuple[int, list[bytes]]], delta: list[Shard], base: list[Shard] | None
) -> list[tuple[list, list]]:
    """(delta rows, base rows) of each (shard, keys) group; None where a shard lacks a key."""
    out = []
    for s, shard_keys in groups:
        nones = [None] * len(shard_keys)
        delta_rows = nones if delta[s].empty else delta[s].multi_get(shard_keys)
        base_rows = base[s].multi_get(shard_keys) if base and not base[s].empty else nones
        out.append((delta_rows, base_rows))
    return out


def _split_groups(
    groups: list[tuple[int, list[bytes]]], parts: int
) -> list[list[tuple[int, list[bytes]]]]:
    """Consecutive runs of ``groups`` with about equal key counts, at most ``parts``, none
    empty; each cut falls at the group boundary nearest to an equal share."""
    ends = np.cumsum([len(keys) for _, keys in groups])
    total = int(ends[-1])
    cuts = []
    for i in range(1, parts):
        share = total * i / parts
        k = int(np.searchsorted(ends, share))  # ends[k] is the first end >= share
        before = int(ends[k - 1]) if k else 0
        if k < len(groups) and ends[k] - share <= share - before:
            k += 1
        cuts.append(min(max(k, 1), len(groups)))
    bounds = [0, *cuts, len(groups)]
    return [groups[a:b] for a, b in pairwise(bounds) if b > a]


class Node:
    """The tables of one storage node and the requests that touch them."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.tables: dict[str, Table] = {}
        self._cache = rocksdict.Cache(config.block_cache_bytes)
        self._options = rocksdb_options(self._cache, config.bloom_bits_per_key)
        #: Hot rows of the base versions (RocksDB's row cache, shared by every base shard).
        self.row_cache = (
            rocksdict.Cache(config.row_cache_bytes) if config.row_cache_bytes > 0 else None
        )
        self._base_options: dict[str, rocksdict.Options] = {}
        #: Read options of every base shard (see ``base_read_options``).
        self.base_read_options = base_read_options(config.verify_base_checksums)
        self._write_options = rocksdict.WriteOptions()
        self._write_options.sync = config.sync_writes
        self.catalog: Catalog | None = None
        #: Threads that read part of a large batch's shards (see ``_fetch``).
        self._read_pool = (
            ThreadPoolExecutor(config.read_threads, thread_name_prefix="kvstore-read")
            if config.read_threads > 0
            else None
        )
        self.stats: dict[str, TableStats] = {}
        self.started = time.monotonic()
        self.closed = False

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
            self._load_demo()

    def _open_table(self, entry) -> Table:
        name = f"{entry.schema.name}-{entry.schema.schema_id}"
        assert self.config.cold_dir is not None
        return Table(
            self.config.data_dir / "tables" / name,
            self.config.cold_dir / "tables" / name,
            entry,
            self._options,
            self.base_options,
            self.base_read_options,
        )

    def close(self) -> None:
        self.closed = True
        if self._read_pool is not None:
            self._read_pool.shutdown()
        for table in self.tables.values():
            table.close()
        self.tables.clear()

    def base_options(self, table_format: str) -> rocksdict.Options:
        """The RocksDB options of base shards in ``table_format`` (one object per format,
        sharing the node's block and row caches)."""
        options = self._base_options.get(table_format)
        if options is None:
            options = self._base_options[table_format] = base_options(
                table_format, self._cache, self.config.bloom_bits_per_key, self.row_cache
            )
        return options

    # -- tables ----------------------------------------------------------------------

    def table(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            if self.closed:
                raise Unavailable("the node is shutting down") from None
            known = ", ".join(sorted(self.tables)) or "(none)"
            raise TableNotFound(f"no table {name!r} on this node; tables: {known}") from None

    def create_table(self, schema: TableSchema) -> Table:
        """Create ``schema``'s table; the same definition again returns the existing one."""
        existing = self.tables.get(schema.name)
        if existing is not None:
            if existing.schema.same_definition(schema):
                return existing
            raise AlreadyExists(
                f"table {schema.name!r} exists with another schema: "
                f"{existing.schema.to_json()} (asked for {schema.to_json()})"
            )
        assert self.catalog is not None
        entry = self.catalog.add(schema)
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

    # -- versions --------------------------------------------------------------------

    def _version(self, table: Table, version: int) -> int:
        """The version a read uses: ``version`` if kept, else the current one (0 = none)."""
        if not version:
            return table.current
        if version not in table.versions:
            kept = ", ".join(str(v) for v in sorted(table.versions)) or "none"
            raise NotFound(
                f"table {table.schema.name!r} has no version {version}; kept versions: {kept}"
            )
        return version

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
        entry = table.entry
        before = (dict(entry.versions), entry.current, entry.next_version)
        previous = entry.current
        older = sorted(v for v in entry.versions if v < meta.version)
        dropped = older[: max(0, len(older) - self.config.keep_versions)]
        entry.versions[meta.version] = meta
        for version in dropped:
            del entry.versions[version]
        entry.current = meta.version
        entry.next_version = max(entry.next_version, meta.version + 1)
        try:
            self.catalog.save()
        except BaseException:
            entry.versions, entry.current, entry.next_version = before
            raise
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

    def rollback(self, name: str, to_version: int = 0) -> VersionMeta:
        """Make a kept version current again: ``to_version``, or the one before current."""
        table = self.table(name)
        entry = table.entry
        if to_version:
            target = self._version(table, to_version)
        else:
            older = sorted(v for v in entry.versions if v < entry.current)
            if not older:
                raise NotFound(
                    f"table {name!r}: no version before {entry.current} is kept to roll back to"
                )
            target = older[-1]
        assert self.catalog is not None
        entry.current = target
        self.catalog.save()
        logger.info("table %r: rolled back to version %d", name, target)
        return entry.versions[target]

    def compact_delta(self, name: str, chunk: int = 4096) -> int:
        """Drop delta entries the current version's snapshot makes obsolete; returns how many
        delta rows changed or went. Runs to completion (no await), so no write interleaves."""
        table = self.table(name)
        if not table.current:
            return 0
        snapshot = table.versions[table.current].snapshot_time_us
        layout = table.schema.layout
        changed = 0
        for shard in table.delta:
            for keys, rows in shard.scan(chunk):
                new_rows = _codec.delta_compact(layout, rows, snapshot)
                puts = [
                    (k, r)
                    for k, r, o in zip(keys, new_rows, rows, strict=True)
                    if r is not None and r is not o
                ]
                deletes = [k for k, r in zip(keys, new_rows, strict=True) if r is None]
                if puts or deletes:
                    shard.write(puts, deletes, self._write_options)
                    changed += len(puts) + len(deletes)
            shard.recheck_empty()
        logger.info(
            "table %r: delta compacted against snapshot %d: %d rows changed",
            name,
            snapshot,
            changed,
        )
        return changed

    # -- data ------------------------------------------------------------------------

    def _check_count(self, n: int, table: str) -> None:
        limit = self.config.max_keys_per_request
        if n > limit:
            raise RequestTooLarge(
                f"table {table!r}: the request has {n} keys; the node's limit is {limit} "
                "keys per request (max_keys_per_request); split the batch"
            )

    def get(self, name: str, keys: KeyBatch, features: list[str], version: int = 0) -> GetAnswer:
        """The rows of ``keys``, delta over base; ``features`` are only checked (the client
        decodes)."""
        table = self.table(name)
        schema = table.schema
        if features:
            schema.projection(features)  # raises UnknownFeature
        n = keys.count
        self._check_count(n, name)
        version = self._version(table, version)
        if n == 0:
            return GetAnswer(schema.schema_id, version, b"", np.empty(0, np.int32), None)
        base = table.base(version) if version else None
        snapshot = table.versions[version].snapshot_time_us if version else _codec.NO_DELETE
        layout = schema.layout
        now = now_us()
        shards = table.delta
        if len(shards) == 1:
            order = None
            groups = [(0, keys.encoded())]
        else:
            order, groups = keys.shard_groups(len(shards))
        values: list[bytes | None] = []
        done = 0
        try:
            fetched = self._fetch(groups, shards, base, n)
        except Exception as exc:
            if not str(exc).startswith("Corruption"):
                raise
            message = f"table {name!r}: RocksDB found a damaged block ({exc})"
            logger.error("%s", message)
            raise CorruptValue(message) from None
        for (s, shard_keys), (delta_rows, base_rows) in zip(groups, fetched, strict=True):
            try:
                values.extend(
                    _codec.overlay(layout, base_rows, delta_rows, snapshot, now, schema.ttl_us)
                )
            except (_codec.CorruptRow, _codec.SchemaMismatch) as exc:
                position = done + exc.index
                position = int(order[position]) if order is not None else position
                message = (
                    f"table {name!r}, shard {s}, key {keys.describe(position)}: "
                    f"the stored value is corrupt ({exc})"
                )
                logger.error("%s", message)
                raise CorruptValue(message) from None
            done += len(shard_keys)
        block, lengths = _codec.join_values(values)
        self.table_stats(name).keys_read += n
        return GetAnswer(schema.schema_id, version, block, lengths, order)

    def _fetch(
        self,
        groups: list[tuple[int, list[bytes]]],
        delta: list[Shard],
        base: list[Shard] | None,
        n: int,
    ) -> list[tuple[list, list]]:
        """Each group's (delta rows, base rows), from RocksDB.

        A large batch is split between this thread and the node's read threads: the
        MultiGets release the GIL, so the shards are read in parallel (1,000 keys:
        2.5 -> 1.3 ms in-process on 2 cores). This thread waits for the others, so
        nothing else runs meanwhile and no version can change under the reads.
        Small batches stay on this thread: the hand-off costs ~50 us.
        """
        pool = self._read_pool
        if pool is None or n < self.config.parallel_read_keys or len(groups) < 2:
            return _fetch_groups(groups, delta, base)
        chunks = _split_groups(groups, self.config.read_threads + 1)
        futures = [pool.submit(_fetch_groups, c, delta, base) for c in chunks[1:]]
        try:
            out = _fetch_groups(chunks[0], delta, base)
            for future in futures:
                out.extend(future.result())
        finally:
            # Never leave with a helper still reading: the loop could then close its shard.
            wait(futures)
        return out

    def cache_usage(self) -> dict[str, int]:
        """Bytes in the block cache and the row cache, and the row cache's capacity."""
        return {
            "block_cache_bytes": self._cache.get_usage(),
            "row_cache_bytes": self.row_cache.get_usage() if self.row_cache else 0,
            "row_cache_capacity_bytes": self.config.row_cache_bytes if self.row_cache else 0,
        }

    def table_stats(self, name: str) -> TableStats:
        stats = self.stats.get(name)
        if stats is None:
            stats = self.stats[name] = TableStats()
        return stats

    def write_steps(
        self,
        name: str,
        schema_id: int,
        keys: KeyBatch,
        rows: bytes,
        row_offsets: np.ndarray,
        features: list[str],
        position: Position | None = None,
    ) -> Generator[None, None, int]:
        """Apply full or partial rows to the delta; per feature the newest event time wins.

        A generator: it yields after each shard's read-modify-write, so the server can
        answer reads between the shards of a large write (a 1,000-row write held the
        event loop for ~15 ms in one piece). Each shard's part stays one atomic
        WriteBatch; it returns the rows written.

        ``features`` names the features the rows set (empty = all); the others keep
        their values. Each row's event time is its header's; 0 means the node's clock,
        and a time more than ``max_clock_skew_s`` ahead of it is refused. A
        ``position`` is stored in every shard's write, atomically with the rows.
        """
        table = self.table(name)
        schema = table.schema
        n = keys.count
        self._check_count(n, name)
        if schema_id != schema.schema_id:
            raise SchemaChanged(
                f"table {name!r}: rows encoded with schema id {schema_id}, the table's is "
                f"{schema.schema_id}; describe the table again"
            )
        if len(row_offsets) != n + 1 or (
            n and (row_offsets[0] != 0 or row_offsets[-1] != len(rows))
        ):
            raise InvalidArgument(f"table {name!r}: row offsets do not match {n} keys")
        if n == 0:
            return 0
        lengths = np.diff(row_offsets)
        if (lengths < 0).any():
            raise InvalidArgument(f"table {name!r}: row offsets decrease")
        bad = _codec.check_rows(schema.layout, rows, row_offsets[:-1].copy(), lengths)
        if bad is not None:
            index, reason = bad
            raise InvalidArgument(
                f"table {name!r}, row {index} (key {keys.describe(index)}): not a valid "
                f"encoded row ({reason})"
            )
        rows, event_times = self._event_times(name, keys, rows, row_offsets)
        present = np.ones(len(schema.features), np.uint8)
        if features:
            present[:] = 0
            for feature in features:
                present[schema.index_of(feature)] = 1
        parts = _codec.split_rows(rows, row_offsets)
        layout = schema.layout

        def merge(shard: int, positions: list[int], old_rows: list) -> list[bytes]:
            group_rows = [parts[i] for i in positions]
            offsets = np.zeros(len(group_rows) + 1, np.int64)
            np.cumsum([len(r) for r in group_rows], out=offsets[1:])
            buf = b"".join(group_rows)
            while True:
                try:
                    return _codec.delta_apply(layout, old_rows, buf, offsets, present)
                except (_codec.CorruptRow, _codec.SchemaMismatch) as exc:
                    where = (
                        f"table {name!r}, shard {shard}, key {keys.describe(positions[exc.index])}"
                    )
                    if not present.all():
                        raise CorruptValue(
                            f"{where}: the stored value is corrupt ({exc}); a write of every "
                            "feature replaces it"
                        ) from None
                    # A write of every feature needs nothing from the old row: replace it.
                    logger.warning("%s: replacing a corrupt stored value (%s)", where, exc)
                    old_rows[exc.index] = None

        yield from self._update_steps(table, keys, merge, position)
        self.table_stats(name).record_updates(event_times, now_us())
        return n

    def _event_times(
        self, name: str, keys: KeyBatch, rows: bytes, row_offsets: np.ndarray
    ) -> tuple[bytes, np.ndarray]:
        """The rows' event times (µs); a 0 becomes the node's clock (rows rewritten)."""
        raw = np.frombuffer(rows, np.uint8)
        at = row_offsets[:-1, None] + 5 + np.arange(8)
        times = np.ascontiguousarray(raw[at]).view("<i8").ravel().copy()
        now = now_us()
        missing = times == 0
        if missing.any():
            fixed = bytearray(rows)
            view = np.frombuffer(fixed, np.uint8)
            view[at[missing]] = np.frombuffer(np.int64(now).astype("<i8").tobytes(), np.uint8)
            rows = bytes(fixed)
            times[missing] = now
        self._check_not_ahead(name, keys, times, now)
        return rows, times

    def _check_not_ahead(self, name: str, keys: KeyBatch, times: np.ndarray, now: int) -> None:
        """Refuse event times further ahead of the node's clock than max_clock_skew_s."""
        limit = now + int(self.config.max_clock_skew_s * 1e6)
        ahead = np.flatnonzero(times > limit)
        if len(ahead):
            i = int(ahead[0])
            raise InvalidArgument(
                f"table {name!r}, row {i} (key {keys.describe(i)}): event time {times[i]} µs "
                f"is {(times[i] - now) / 1e6:.0f} s ahead of the node's clock; the limit is "
                f"{self.config.max_clock_skew_s:.0f} s (max_clock_skew_s)"
            )

    def _update_steps(
        self,
        table: Table,
        keys: KeyBatch,
        merge: Callable[[int, list[int], list], list[bytes]],
        position: Position | None,
    ) -> Generator[None, None, None]:
        """The one read-modify-write of the delta, behind writes and deletes.

        Shard by shard: read the keys' delta rows, ``merge(shard, positions, old_rows)``
        them into new rows, write those (and the position, if any) in one WriteBatch,
        yield. Repeated keys go in later passes (``_rounds``), the position with the
        last one only, so it never runs ahead of the data; shards without keys record
        it at the end.
        """
        name = table.schema.name
        encoded = keys.encoded()
        shard_ids = keys.shard_ids(len(table.delta))
        rounds = _rounds(encoded)
        touched: set[int] = set()
        for r, positions in enumerate(rounds):
            pos = position if r == len(rounds) - 1 else None
            extra = [] if pos is None else [(pos.key(), struct.pack("<q", pos.offset))]
            index = np.arange(len(encoded)) if positions is None else np.asarray(positions)
            order, counts = _codec.group_by_shard(shard_ids[index], len(table.delta))
            grouped = index[order].tolist()
            end = 0
            for s, count in enumerate(counts):
                if not count:
                    continue
                group_positions = grouped[end : end + count]
                end += count
                if self.tables.get(name) is not table:
                    raise TableNotFound(f"table {name!r} was dropped during the write")
                shard = table.delta[s]
                old_rows = shard.multi_get([encoded[i] for i in group_positions])
                new_rows = merge(s, group_positions, old_rows)
                puts = [(encoded[i], row) for i, row in zip(group_positions, new_rows, strict=True)]
                shard.write(puts + extra, (), self._write_options)
                if extra:
                    touched.add(s)
                yield
            if extra:
                for shard in table.delta:
                    if shard.index not in touched:
                        shard.write(extra, (), self._write_options)

    def consumer_positions(self, name: str, consumer: str, source: str) -> dict[int, int]:
        """Partition → the offset every shard of the table has applied (the minimum)."""
        table = self.table(name)
        prefix = position_prefix(consumer, source)
        per_shard: list[dict[int, int]] = []
        for shard in table.delta:
            found = {}
            for key, value in shard.prefix_items(prefix):
                (partition,) = struct.unpack(">I", key[len(prefix) :])
                (found[partition],) = struct.unpack("<q", value)
            per_shard.append(found)
        partitions = set().union(*per_shard) if per_shard else set()
        return {p: min(found.get(p, -1) for found in per_shard) for p in sorted(partitions)}

    def delete_steps(
        self,
        name: str,
        keys: KeyBatch,
        event_time_us: int = 0,
        position: Position | None = None,
    ) -> Generator[None, None, int]:
        """Tombstone ``keys`` at ``event_time_us`` (default now), shard by shard.

        The delete hides every older value of the key in the delta, and the base row
        when the delete is newer than the version's snapshot. No keys and a position:
        every shard records the position (a consumer's batch that wrote nothing).
        """
        table = self.table(name)
        self._check_count(keys.count, name)
        now = now_us()
        when = event_time_us or now
        self._check_not_ahead(name, keys, np.full(keys.count, when, np.int64), now)
        layout = table.schema.layout

        def merge(shard: int, positions: list[int], old_rows: list) -> list[bytes]:
            try:
                return _codec.delta_delete(layout, old_rows, np.full(len(old_rows), when, np.int64))
            except (_codec.CorruptRow, _codec.SchemaMismatch) as exc:
                raise CorruptValue(
                    f"table {name!r}, shard {shard}, key {keys.describe(positions[exc.index])}: "
                    f"the stored delta value is corrupt ({exc})"
                ) from None

        yield from self._update_steps(table, keys, merge, position)
        self.table_stats(name).keys_deleted += keys.count
        return keys.count

    def _load_demo(self) -> None:
        """A small deterministic table so a newcomer has something to query."""
        schema = TableSchema.build(
            DEMO_TABLE,
            "int64",
            {
                "age": "int32",
                "ctr_7d": "float32",
                "country": "string",
                "is_premium": "bool",
                "emb": "float32[8]",
                "recent_items": "int64[]",
            },
            shards=4,
        )
        table = self.create_table(schema)
        rng = np.random.default_rng(42)
        keys = np.arange(DEMO_ROWS, dtype=np.int64)
        countries = ["FR", "JP", "US", "BR", "IN", "DE", "NG", "KR"]
        data = {
            "key": keys,
            "age": rng.integers(18, 80, DEMO_ROWS).astype(np.int32),
            "ctr_7d": rng.random(DEMO_ROWS, dtype=np.float32),
            "country": [countries[i % len(countries)] for i in range(DEMO_ROWS)],
            "is_premium": rng.random(DEMO_ROWS) < 0.2,
            "emb": rng.standard_normal((DEMO_ROWS, 8)).astype(np.float32),
            "recent_items": [list(range(k % 4)) for k in range(DEMO_ROWS)],
        }
        encoded = encode_rows(table.schema, data)
        run_steps(
            self.write_steps(
                DEMO_TABLE, table.schema.schema_id, encoded.keys, encoded.rows, encoded.offsets, []
            )
        )
        logger.info("loaded the demo table %r with %d rows", DEMO_TABLE, DEMO_ROWS)


def run_steps(steps: Generator[None, None, int]) -> int:
    """Run ``Node.write_steps`` or ``delete_steps`` to the end without yielding control
    (the servicer's ``_drive`` lets other calls run between the steps); its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _rounds(encoded: list[bytes]) -> list[list[int] | None]:
    """Batches of distinct keys, in request order: [None] (all) when no key repeats,
    else the first occurrences, then the second ones, and so on."""
    if len(set(encoded)) == len(encoded):
        return [None]
    seen: dict[bytes, int] = {}
    rounds: list[list[int]] = []
    for i, key in enumerate(encoded):
        r = seen.get(key, 0)
        seen[key] = r + 1
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(i)
    return rounds  # type: ignore[return-value]
