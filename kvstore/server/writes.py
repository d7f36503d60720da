"""Writes to a node's tables: full and partial rows, deletes, the one
read-modify-write of the delta behind both, event times and the clock-skew limit,
stream consumers' positions, and compacting the delta against a new version.

A write is a generator of steps, each a part of one shard of at most ``STEP_KEYS``
keys (``run_steps`` runs it in one go), so the server can answer reads between the
parts of a large write.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np

from kvstore import _codec
from kvstore.clock import now_us
from kvstore.config import NodeConfig
from kvstore.errors import CorruptValue, InvalidArgument, SchemaChanged, TableNotFound
from kvstore.keys import KeyBatch
from kvstore.server.reads import check_key_count
from kvstore.server.stats import StatsByTable
from kvstore.storage.engine import Engine
from kvstore.storage.shard import SYSTEM_PREFIX
from kvstore.storage.table import Table

logger = logging.getLogger(__name__)

__all__ = ["STEP_KEYS", "Position", "Writes", "position_prefix", "run_steps"]

#: A pass's merge: ``merge(shard, lo, hi, old_rows)`` → the new delta rows of the keys
#: at ``order[lo:hi]`` (the positions given to the pass's ``plan``), ``old_rows`` their stored ones.
Merge = Callable[[int, int, int, list], list[bytes]]

#: Keys of one shard a write step reads, merges and writes before yielding to reads.
#: One step per shard (125 keys on 8 shards) held the event loop ~0.66 ms, long enough
#: to show in the p99 of reads served meanwhile. With format-3 delta rows a step costs
#: ~8 us plus ~0.7 us a key (1,000-row partial updates of the benchmark's table,
#: in-process thread CPU): 32 keys ~30 us; 16-key steps cost ~23% more CPU a batch,
#: 64-key steps ~11% less with a step p99 of 85-120 us (docs/streaming.md).
STEP_KEYS = 32


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


class Writes:
    """The node's write path: rows, deletes and consumer positions into the delta."""

    def __init__(
        self,
        config: NodeConfig,
        tables: dict[str, Table],
        engine: Engine,
        stats: StatsByTable,
    ) -> None:
        """``tables``: the node's open tables (a write stops if its table is dropped
        between two steps); ``engine``: whose write options every write uses."""
        self._config = config
        self._tables = tables
        self._write_options = engine.write_options
        self._stats = stats

    def write_steps(
        self,
        table: Table,
        schema_id: int,
        keys: KeyBatch,
        rows: bytes,
        row_offsets: np.ndarray,
        features: list[str],
        position: Position | None = None,
    ) -> Generator[None, None, int]:
        """Apply full or partial rows to the delta; per feature the newest event time wins.

        A generator: it yields after the request's checks and after each step of at
        most ``STEP_KEYS`` keys of one shard, so the server can answer reads in
        between (a 1,000-row write held the event loop for ~15 ms in one piece, then
        ~0.7 ms a shard). Each step is one atomic WriteBatch; it returns the rows
        written.

        ``features`` names the features the rows set (empty = all); the others keep
        their values. Each row's event time is its header's; 0 means the node's clock,
        and a time more than ``max_clock_skew_s`` ahead of it is refused. A
        ``position`` is stored in every shard's write, atomically with the rows.
        """
        schema = table.schema
        name = schema.name
        n = keys.count
        check_key_count(n, name, self._config.max_keys_per_request)
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
        layout = schema.layout
        yield  # the checks: a step of their own (~40 us of CPU for 1,000 rows)

        def plan(order: np.ndarray) -> Merge:
            def merge(shard: int, lo: int, hi: int, old_rows: list) -> list[bytes]:
                # The step's rows gathered in C into one block for delta_apply: no bytes
                # object per row, and no pass over the whole request in one step.
                buf, offsets = _codec.gather_rows(rows, row_offsets, order[lo:hi])
                while True:
                    try:
                        return _codec.delta_apply(layout, old_rows, buf, offsets, present)
                    except (_codec.CorruptRow, _codec.SchemaMismatch) as exc:
                        at = keys.describe(order[lo + exc.index])
                        where = f"table {name!r}, shard {shard}, key {at}"
                        if not present.all():
                            raise CorruptValue(
                                f"{where}: the stored value is corrupt ({exc}); a write of "
                                "every feature replaces it"
                            ) from None
                        # A write of every feature needs nothing from the old row: replace it.
                        logger.warning("%s: replacing a corrupt stored value (%s)", where, exc)
                        old_rows[exc.index] = None

            return merge

        yield from self._update_steps(table, keys, plan, position)
        self._stats[name].record_updates(event_times, now_us())
        return n

    def _event_times(
        self, name: str, keys: KeyBatch, rows: bytes, row_offsets: np.ndarray
    ) -> tuple[bytes, np.ndarray]:
        """The rows' event times (µs); a 0 becomes the node's clock (rows rewritten)."""
        times = _codec.row_event_times(rows, row_offsets)
        now = now_us()
        missing = times == 0
        if missing.any():
            at = row_offsets[:-1, None] + 5 + np.arange(8)
            fixed = bytearray(rows)
            view = np.frombuffer(fixed, np.uint8)
            view[at[missing]] = np.frombuffer(np.int64(now).astype("<i8").tobytes(), np.uint8)
            rows = bytes(fixed)
            times[missing] = now
        self._check_not_ahead(name, keys, times, now)
        return rows, times

    def _check_not_ahead(self, name: str, keys: KeyBatch, times: np.ndarray, now: int) -> None:
        """Refuse event times further ahead of the node's clock than max_clock_skew_s."""
        limit = now + int(self._config.max_clock_skew_s * 1e6)
        ahead = np.flatnonzero(times > limit)
        if len(ahead):
            i = int(ahead[0])
            raise InvalidArgument(
                f"table {name!r}, row {i} (key {keys.describe(i)}): event time {times[i]} µs "
                f"is {(times[i] - now) / 1e6:.0f} s ahead of the node's clock; the limit is "
                f"{self._config.max_clock_skew_s:.0f} s (max_clock_skew_s)"
            )

    def _update_steps(
        self,
        table: Table,
        keys: KeyBatch,
        plan: Callable[[np.ndarray], Merge],
        position: Position | None,
    ) -> Generator[None, None, None]:
        """The one read-modify-write of the delta, behind writes and deletes.

        Per pass: the keys' positions in step order (shard by shard) and their stored
        bytes (C, ~25 us for 1,000 int64 keys), ``plan(order)``, which returns the pass's
        ``merge``; then, shard by shard, ``STEP_KEYS`` keys a step: read their delta rows,
        ``merge(shard, lo, hi, old_rows)`` them (the keys at ``order[lo:hi]``) into new
        rows, write those in one WriteBatch, yield. A pass's preparation is a step of
        its own (part of its first step when the pass has at most ``STEP_KEYS`` keys);
        no other step does work in proportion to the whole request. No key is in two
        steps of one pass, and nothing else runs during a step (other writes above all),
        so each key's read-modify-write is atomic. Repeated keys go in later passes
        (``_rounds``), so they apply in request order. The position, if any, is written
        with the last step of each shard in the last pass, so it never runs ahead of the
        data (a crash in between re-applies the shard's rows on replay: idempotent, the
        newest event time wins); shards without keys record it at the end.
        """
        n_shards = len(table.delta)
        shard_ids = keys.shard_ids(n_shards)
        rounds = _rounds(keys)
        touched: set[int] = set()
        for r, positions in enumerate(rounds):
            self._check_not_dropped(table)
            pos = position if r == len(rounds) - 1 else None
            extra = [] if pos is None else [(pos.key(), struct.pack("<q", pos.offset))]
            if positions is None:
                order, counts = _codec.group_by_shard(shard_ids, n_shards)
            else:
                order, counts = _codec.group_by_shard(shard_ids[positions], n_shards)
                order = positions[order]
            round_keys = keys.encoded(order)  # in C for int64 keys: ~15 us for 1,000
            merge = plan(order)
            if len(order) > STEP_KEYS:
                # A step of its own (~30 us for 1,000 keys): in the first shard step it
                # made that step the longest of the write.
                yield
            end = 0
            for s, count in enumerate(counts):
                if not count:
                    continue
                start, end = end, end + count
                shard = table.delta[s]
                for lo in range(start, end, STEP_KEYS):
                    self._check_not_dropped(table)
                    hi = min(lo + STEP_KEYS, end)
                    step_keys = round_keys[lo:hi]
                    new_rows = merge(s, lo, hi, shard.multi_get(step_keys))
                    puts = list(zip(step_keys, new_rows, strict=True))
                    # The position goes with the shard's last step only, never ahead of
                    # the rows before it.
                    last = hi == end
                    shard.write(puts + extra if last else puts, (), self._write_options)
                    if extra and last:
                        touched.add(s)
                    yield
            if extra:
                self._check_not_dropped(table)
                for shard in table.delta:
                    if shard.index not in touched:
                        shard.write(extra, (), self._write_options)

    def _check_not_dropped(self, table: Table) -> None:
        """Stop a write whose table was dropped since its last step."""
        name = table.schema.name
        if self._tables.get(name) is not table:
            raise TableNotFound(f"table {name!r} was dropped during the write")

    def consumer_positions(
        self, table: Table, consumer: str, source: str, held: np.ndarray | None = None
    ) -> dict[int, int]:
        """Partition → the offset every shard of the table has applied (the minimum);
        ``held``: a bool per shard, the shards to count (None: all)."""
        prefix = position_prefix(consumer, source)
        per_shard: list[dict[int, int]] = []
        for shard in table.delta:
            if held is not None and not held[shard.index]:
                continue
            found = {}
            for key, value in shard.prefix_items(prefix):
                (partition,) = struct.unpack(">I", key[len(prefix) :])
                (found[partition],) = struct.unpack("<q", value)
            per_shard.append(found)
        partitions = set().union(*per_shard) if per_shard else set()
        return {p: min(found.get(p, -1) for found in per_shard) for p in sorted(partitions)}

    def delete_steps(
        self,
        table: Table,
        keys: KeyBatch,
        event_time_us: int = 0,
        position: Position | None = None,
    ) -> Generator[None, None, int]:
        """Tombstone ``keys`` at ``event_time_us`` (default now), shard by shard.

        The delete hides every older value of the key in the delta, and the base row
        when the delete is newer than the version's snapshot. No keys and a position:
        every shard records the position (a consumer's batch that wrote nothing).
        """
        name = table.schema.name
        check_key_count(keys.count, name, self._config.max_keys_per_request)
        now = now_us()
        when = event_time_us or now
        self._check_not_ahead(name, keys, np.full(keys.count, when, np.int64), now)
        layout = table.schema.layout

        def plan(order: np.ndarray) -> Merge:
            def merge(shard: int, lo: int, hi: int, old_rows: list) -> list[bytes]:
                times = np.full(len(old_rows), when, np.int64)
                try:
                    return _codec.delta_delete(layout, old_rows, times)
                except (_codec.CorruptRow, _codec.SchemaMismatch) as exc:
                    at = keys.describe(order[lo + exc.index])
                    raise CorruptValue(
                        f"table {name!r}, shard {shard}, key {at}: the stored delta value is "
                        f"corrupt ({exc})"
                    ) from None

            return merge

        yield from self._update_steps(table, keys, plan, position)
        self._stats[name].keys_deleted += keys.count
        return keys.count

    def compact_delta(self, table: Table, chunk: int = 4096) -> int:
        """Drop delta entries the current version's snapshot makes obsolete; returns how many
        delta rows changed or went. Runs to completion (no await), so no write interleaves."""
        name = table.schema.name
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


def run_steps(steps: Generator[None, None, int]) -> int:
    """Run ``Node.write_steps`` or ``delete_steps`` to the end without yielding control
    (the servicer's ``_drive`` lets other calls run between the steps); its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _rounds(keys: KeyBatch) -> list[np.ndarray | None]:
    """Batches of distinct keys, in request order: [None] (all) when no key repeats,
    else the positions (int32) of the first occurrences, then the second ones, and so
    on. Repeated int64 keys are found in C (~2 us for 1,000 keys)."""
    if keys.ints is not None:
        before = _codec.key_repeats(keys.ints)
        if before is None:
            return [None]
    else:
        encoded = keys.encoded()
        if len(set(encoded)) == len(encoded):
            return [None]
        seen: dict[bytes, int] = {}
        before = np.empty(len(encoded), np.int32)
        for i, key in enumerate(encoded):
            before[i] = seen.get(key, 0)
            seen[key] = before[i] + 1
    return [np.flatnonzero(before == r).astype(np.int32) for r in range(int(before.max()) + 1)]
