"""Reads of a node's tables: a batch of keys grouped by shard, the delta overlaid on
the base of the version read, large batches read on several threads.

RocksDB's errors reach here already translated by the shards; the codec's are
translated here, with the table, shard and key they are about.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import count

import numpy as np

from kvstore import _codec
from kvstore.clock import now_us
from kvstore.config import NodeConfig
from kvstore.errors import CorruptValue, RequestTooLarge
from kvstore.keys import KeyBatch
from kvstore.server.hot_rows import HOT_ROWS_MAX_KEYS, HotRowCache
from kvstore.server.stats import StatsByTable
from kvstore.storage.shard import Shard
from kvstore.storage.table import Table

logger = logging.getLogger(__name__)

__all__ = ["GetAnswer", "Reads", "check_key_count"]


@dataclass(slots=True)
class GetAnswer:
    """Rows for a batch of keys, in shard order; ``order[i]`` is row i's request position."""

    schema_id: int
    version: int
    values: bytes
    lengths: np.ndarray  # int32, -1 = missing
    order: np.ndarray | None  # int32, None = request order


def check_key_count(n: int, table: str, limit: int) -> None:
    """Refuse a request of ``n`` keys over the node's ``limit`` (max_keys_per_request)."""
    if n > limit:
        raise RequestTooLarge(
            f"table {table!r}: the request has {n} keys; the node's limit is {limit} "
            "keys per request (max_keys_per_request); split the batch"
        )


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


def _corrupt(
    table: Table,
    shard: int,
    position: int,
    order: np.ndarray | None,
    keys: KeyBatch,
    exc: Exception,
) -> CorruptValue:
    """The error (logged) for the codec's ``exc`` about the key at ``position`` in the
    shard order of ``keys``."""
    position = int(order[position]) if order is not None else position
    message = (
        f"table {table.schema.name!r}, shard {shard}, key {keys.describe(position)}: "
        f"the stored value is corrupt ({exc})"
    )
    logger.error("%s", message)
    return CorruptValue(message)


class Reads:
    """The node's read path, and the threads that read part of a large batch."""

    def __init__(self, config: NodeConfig, stats: StatsByTable) -> None:
        self._config = config
        self._stats = stats
        #: Recent answers by table version and key (None when hot_rows_bytes is 0).
        self.hot = (
            HotRowCache(config.hot_rows_bytes, stats, config.max_keys_per_request)
            if config.hot_rows_bytes > 0
            else None
        )
        #: Threads that read part of a large batch's shards (see ``fetch``).
        self.pool = (
            ThreadPoolExecutor(config.read_threads, thread_name_prefix="kvstore-read")
            if config.read_threads > 0
            else None
        )

    def close(self) -> None:
        """Stop the read threads (after their reads)."""
        if self.pool is not None:
            self.pool.shutdown()

    def get(self, table: Table, keys: KeyBatch, features: list[str], version: int) -> GetAnswer:
        """The rows of ``keys`` in ``table``, delta over the base of ``version`` (0 =
        current); ``features`` are only checked (the client decodes)."""
        schema = table.schema
        name = schema.name
        if features:
            schema.projection(features)  # raises UnknownFeature
        n = keys.count
        check_key_count(n, name, self._config.max_keys_per_request)
        version = table.entry.resolve(version)
        if n == 0:
            return GetAnswer(schema.schema_id, version, b"", np.empty(0, np.int32), None)
        base = table.base(version) if version else None
        snapshot = table.versions[version].snapshot_time_us if version else _codec.NO_DELETE
        now = now_us()
        shards = table.delta
        if len(shards) == 1:
            order = None
            groups = [(0, keys.encoded())]
        else:
            order, groups = keys.shard_groups(len(shards))
        hot = self.hot
        if hot is None or n > HOT_ROWS_MAX_KEYS or not hot.rows.use():
            block, lengths = self._read_block(table, groups, base, snapshot, now, order, keys, n)
        else:
            values = self._read_through(table, groups, base, version, snapshot, now, order, keys)
            block, lengths = _codec.join_values(values)
        self._stats[name].keys_read += n
        return GetAnswer(schema.schema_id, version, block, lengths, order)

    def _read_block(
        self,
        table: Table,
        groups: list[tuple[int, list[bytes]]],
        base: list[Shard] | None,
        snapshot: int,
        now: int,
        order: np.ndarray | None,
        keys: KeyBatch,
        n: int,
    ) -> tuple[bytes, np.ndarray]:
        """``_read`` and ``join_values`` of its answers in one pass of the codec
        (``overlay_join``): a row the delta changes is written straight into the block,
        never a bytes object of its own (the path of every read the hot-row cache does
        not take)."""
        schema = table.schema
        fetched = self.fetch(groups, table.delta, base, n)
        try:
            return _codec.overlay_join(schema.layout, fetched, snapshot, now, schema.ttl_us)
        except (_codec.CorruptRow, _codec.SchemaMismatch) as exc:
            # The shard of the key the codec names (its index counts across the groups).
            ends = np.cumsum([len(shard_keys) for _, shard_keys in groups])
            shard = groups[int(np.searchsorted(ends, exc.index, side="right"))][0]
            raise _corrupt(table, shard, exc.index, order, keys, exc) from None

    def _read(
        self,
        table: Table,
        groups: list[tuple[int, list[bytes]]],
        base: list[Shard] | None,
        snapshot: int,
        now: int,
        order: np.ndarray | None,
        keys: KeyBatch,
        n: int,
        windows: np.ndarray | None = None,
        places: list[int] | None = None,
    ) -> list[bytes | None]:
        """The answers of ``groups``' ``n`` keys from RocksDB, delta over base, in group
        order. ``windows``: 2n int64 that receive each answer's ``overlay`` validity
        (µs); ``places``: where each of the keys is in the shard order of ``keys`` (for
        errors; default: the groups' keys are those of ``keys``, in order)."""
        schema = table.schema
        layout = schema.layout
        values: list[bytes | None] = []
        done = 0
        fetched = self.fetch(groups, table.delta, base, n)
        for (s, shard_keys), (delta_rows, base_rows) in zip(groups, fetched, strict=True):
            try:
                values.extend(
                    _codec.overlay(
                        layout, base_rows, delta_rows, snapshot, now, schema.ttl_us, windows, done
                    )
                )
            except (_codec.CorruptRow, _codec.SchemaMismatch) as exc:
                position = done + exc.index
                if places is not None:
                    position = places[position]
                raise _corrupt(table, s, position, order, keys, exc) from None
            done += len(shard_keys)
        return values

    def _read_through(
        self,
        table: Table,
        groups: list[tuple[int, list[bytes]]],
        base: list[Shard] | None,
        version: int,
        snapshot: int,
        now: int,
        order: np.ndarray | None,
        keys: KeyBatch,
    ) -> list[bytes | None]:
        """``_read`` through the hot-row cache: cached answers as they are, the others
        read from RocksDB, and cached when the doorkeeper has seen them miss before."""
        hot = self.hot
        assert hot is not None
        rows = hot.table_rows(table)
        prefix = rows.prefix(version, base)
        cache = hot.rows
        values, missed, positions = cache.lookup_groups(prefix, groups, now)
        if missed:
            m = len(positions)
            windows = np.empty(2 * m, np.int64)
            answers = self._read(
                table, missed, base, snapshot, now, order, keys, m, windows, positions
            )
            # Puts the answers in values, and caches those the doorkeeper admits.
            cache.store_groups(prefix, missed, answers, windows, values, positions, True)
        if version == table.current and rows.published is not prefix:
            hot.publish(rows, version, prefix)
        return values

    def fetch(
        self,
        groups: list[tuple[int, list[bytes]]],
        delta: list[Shard],
        base: list[Shard] | None,
        n: int,
    ) -> list[tuple[list, list]]:
        """Each group's (delta rows, base rows), from RocksDB.

        A large batch is read by this thread and the read threads together: the
        MultiGets release the GIL, so shards are read in parallel (1,000 keys: 2.5 ->
        1.3 ms in-process on 2 cores). Each thread takes the next group no thread has
        taken yet (``_fetch_shared``), so a read thread that is slow to start (the
        cores busy) costs nothing: this thread reads what is left, and cancels the
        helpers that have not started. This thread waits for the others, so nothing
        else runs meanwhile and no version can change under the reads. Small batches
        stay on this thread: the hand-off costs ~50 us.
        """
        pool = self.pool
        if pool is None or n < self._config.parallel_read_keys or len(groups) < 2:
            return _fetch_groups(groups, delta, base)
        return _fetch_shared(pool, self._config.read_threads, groups, delta, base)


def _fetch_shared(
    pool: ThreadPoolExecutor,
    threads: int,
    groups: list[tuple[int, list[bytes]]],
    delta: list[Shard],
    base: list[Shard] | None,
) -> list[tuple[list, list]]:
    """``_fetch_groups`` of ``groups``, read by this thread and up to ``threads`` read
    threads, each taking the next group not yet taken until none is left. Measured
    with both cores busy (``loadtests.ab``, 1000 keys, load ~5): p50 941 us against 980
    with a fixed half for the read thread, 939 against 899 for this thread alone (a
    fixed half: ~10% slower than alone); with a core free the read thread takes about
    half the shards, as a fixed half does."""
    out: list = [None] * len(groups)
    take_next = count().__next__  # atomic under the GIL: each group is taken once
    failed: list[BaseException] = []

    def take() -> None:
        while not failed:
            k = take_next()
            if k >= len(groups):
                return
            try:
                out[k] = _fetch_groups([groups[k]], delta, base)[0]
            except BaseException as exc:
                failed.append(exc)
                raise

    helpers: list = []
    try:
        # Submitted inside the try: a submit that fails part way (no thread to start)
        # still waits for the helpers already reading.
        for _ in range(min(threads, len(groups) - 1)):
            helpers.append(pool.submit(take))
        take()
    finally:
        # Never leave with a helper still reading: the loop could then close its shard.
        # One that has not started never will (and is not waited for: wait() counts a
        # cancelled future as done only once its thread has come to it).
        wait([helper for helper in helpers if not helper.cancel()])
    if failed:
        raise failed[0]
    return out
