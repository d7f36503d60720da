"""Partition encoded rows by shard and sort them by key, within a memory budget.

An external merge sort, per shard:

1. **Buffer.** Encoded batches are kept as they arrive, in input order, with a
   stable argsort of their shard ids, until they hold ``run_bytes`` of rows and keys.
2. **Sort.** Each shard is sorted as *references* (key, seq, batch, row): only keys
   and positions move, never the rows. The sort is stable, so equal keys stay in
   input order; duplicate keys are rejected or dropped right there.
3. **Runs.** If the input ends before the buffer is full (the common case), nothing
   touches the disk: each shard's rows are gathered from the buffered batches a chunk
   at a time, in key order, as the shard databases are written. Otherwise each full buffer
   becomes a *run*: one Arrow IPC file (columns key, seq, row; record batches of about
   1 MiB, grouped by shard, with an index of each shard's batches).
4. **Merge.** With runs, a shard's sorted stream is the merge of its part of every
   run. A cursor per run holds a window of that run's batches, sized so that all
   cursors together stay within ``merge_bytes``; each step takes, from every cursor,
   the rows whose key is at most the smallest last key among the windows, and sorts
   those (stable) in run order. Keys are unique within a run, so every copy of a key
   in any run is inside the same step, where duplicates across runs are handled the
   same way as within one.

Keys are int64 values (sorted as numbers: the stored form, big-endian with the sign
bit flipped, sorts the same) or the UTF-8 bytes of string keys (sorted bytewise, as
RocksDB does). ``seq`` is each row's position in the input: duplicates are reported
by it and ``dedupe`` keeps the first or the last in input order.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .arrow_types import MAX_EXAMPLES

__all__ = ["Chunk", "DuplicateKeys", "IntKeys", "ShardSorter", "StrKeys", "release_memory"]

SPILL_BATCH_BYTES = 1 << 20


class DuplicateKeys(ValueError):
    """Keys seen more than once with ``dedupe=None``: ``examples`` is [(key, [input rows])]."""

    def __init__(self, examples: list[tuple[str, list[int]]], count: int) -> None:
        super().__init__(f"{count} duplicate keys")
        self.examples = examples
        self.count = count


@dataclass(slots=True)
class Chunk:
    """Rows of one shard: keys (int64 ndarray or large_binary array), seq (int64), rows."""

    keys: np.ndarray | pa.Array
    seq: np.ndarray
    rows: pa.Array  # large_binary

    def __len__(self) -> int:
        return len(self.seq)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.keys.nbytes + self.seq.nbytes


class IntKeys:
    """Key operations for int64 keys (NumPy)."""

    arrow_type = pa.int64()

    @staticmethod
    def take(keys: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return keys[idx]

    @staticmethod
    def concat(parts: list[np.ndarray]) -> np.ndarray:
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    @staticmethod
    def argsort(keys: np.ndarray) -> np.ndarray:
        return np.argsort(keys, kind="stable")

    @staticmethod
    def same_as_previous(keys: np.ndarray) -> np.ndarray:
        return keys[1:] == keys[:-1]

    @staticmethod
    def count_at_most(keys: np.ndarray, bound: int) -> int:
        return int(np.searchsorted(keys, bound, side="right"))

    @staticmethod
    def at(keys: np.ndarray, i: int) -> int:
        return int(keys[i])

    @staticmethod
    def to_arrow(keys: np.ndarray) -> pa.Array:
        return pa.array(keys, pa.int64())

    @staticmethod
    def from_arrow(arr: pa.Array) -> np.ndarray:
        return arr.to_numpy(zero_copy_only=False)

    @staticmethod
    def describe(key: int) -> str:
        return str(key)


class StrKeys:
    """Key operations for string keys held as a large_binary Arrow array of UTF-8 bytes."""

    arrow_type = pa.large_binary()

    @staticmethod
    def take(keys: pa.Array, idx: np.ndarray) -> pa.Array:
        return keys.take(idx)

    @staticmethod
    def concat(parts: list[pa.Array]) -> pa.Array:
        return parts[0] if len(parts) == 1 else pa.concat_arrays(parts)

    @staticmethod
    def argsort(keys: pa.Array) -> np.ndarray:
        # Arrow's sort is stable and compares binary values bytewise, like RocksDB.
        return pc.sort_indices(keys).to_numpy()

    @staticmethod
    def same_as_previous(keys: pa.Array) -> np.ndarray:
        n = len(keys)
        if n < 2:
            return np.zeros(0, bool)
        return pc.equal(keys.slice(1), keys.slice(0, n - 1)).to_numpy(zero_copy_only=False)

    @staticmethod
    def count_at_most(keys: pa.Array, bound: bytes) -> int:
        return bisect.bisect_right(_PyView(keys), bound)

    @staticmethod
    def at(keys: pa.Array, i: int) -> bytes:
        return keys[i].as_py()

    @staticmethod
    def to_arrow(keys: pa.Array) -> pa.Array:
        return keys

    @staticmethod
    def from_arrow(arr: pa.Array) -> pa.Array:
        return arr

    @staticmethod
    def describe(key: bytes) -> str:
        return repr(key.decode("utf-8", "replace"))


class _PyView:
    """An Arrow array as a sequence of Python values, for bisect (log n lookups)."""

    __slots__ = ("arr",)

    def __init__(self, arr: pa.Array) -> None:
        self.arr = arr

    def __len__(self) -> int:
        return len(self.arr)

    def __getitem__(self, i: int) -> bytes:
        return self.arr[i].as_py()


KeyOps = type[IntKeys] | type[StrKeys]


def release_memory() -> None:
    """Hand freed Arrow memory back to the system.

    Arrow's allocator (mimalloc) keeps what it freed for reuse, per thread: after a
    run, 600 MB of a 3M-row load was held that way, not allocated. Called between
    runs and shards, so that resident memory follows what is in use.
    """
    pa.default_memory_pool().release_unused()


def unique_order(ops: KeyOps, keys, seq: np.ndarray, dedupe: str | None) -> np.ndarray | None:
    """Positions that sort ``keys`` with one row per key (None: already so).

    The sort is stable, so equal keys stay in the order given (input order): ``"first"``
    keeps the earliest, ``"last"`` the latest; ``dedupe=None`` raises DuplicateKeys.
    """
    n = len(seq)
    order = None
    if n > 1:
        order = ops.argsort(keys)
        if (order[1:] > order[:-1]).all():
            order = None
        else:
            keys = ops.take(keys, order)
    same = ops.same_as_previous(keys)
    if not len(same) or not same.any():
        return order
    if dedupe is None:
        raise _duplicates(ops, keys, seq if order is None else seq[order], same)
    keep = np.ones(n, bool)
    if dedupe == "first":
        keep[1:][same] = False
    else:
        keep[:-1][same] = False
    kept = np.flatnonzero(keep)
    return kept if order is None else order[kept]


def _duplicates(ops: KeyOps, keys, seq: np.ndarray, same: np.ndarray) -> DuplicateKeys:
    starts = np.flatnonzero(same & ~np.concatenate(([False], same[:-1])))
    examples = []
    for s in starts[:MAX_EXAMPLES].tolist():
        end = s + 1
        while end < len(same) and same[end]:
            end += 1
        rows = sorted(seq[s : end + 1].tolist())
        # at and describe come from the same class (int or bytes keys); mypy does not pair
        # them across the KeyOps union.
        examples.append((ops.describe(ops.at(keys, s)), rows))  # type: ignore[arg-type]
    return DuplicateKeys(examples, len(starts))


def take(ops: KeyOps, chunk: Chunk, idx: np.ndarray | None) -> Chunk:
    if idx is None:
        return chunk
    return Chunk(ops.take(chunk.keys, idx), chunk.seq[idx], chunk.rows.take(idx))


def concat(ops: KeyOps, chunks: list[Chunk]) -> Chunk:
    if len(chunks) == 1:
        return chunks[0]
    return Chunk(
        ops.concat([c.keys for c in chunks]),
        np.concatenate([c.seq for c in chunks]),
        pa.concat_arrays([c.rows for c in chunks]),
    )


def gather(rows: list[pa.Array], batch: np.ndarray, local: np.ndarray) -> pa.Array:
    """Row ``local[i]`` of ``rows[batch[i]]`` for every i, in that order, as one array.

    One take per batch and one to restore the order: Arrow's take on a chunked array
    would concatenate every chunk first, a copy of the whole buffer per call.
    """
    if len(batch) and batch[0] == batch[-1] and (batch == batch[0]).all():
        return rows[int(batch[0])].take(local)
    by_batch = np.argsort(batch, kind="stable")
    grouped = batch[by_batch]
    present, starts = np.unique(grouped, return_index=True)
    ends = [*starts[1:].tolist(), len(grouped)]
    pieces = [
        rows[b].take(local[by_batch[a:e]])
        for b, a, e in zip(present.tolist(), starts.tolist(), ends, strict=True)
    ]
    restore = np.empty_like(by_batch)
    restore[by_batch] = np.arange(len(by_batch))
    return pa.concat_arrays(pieces).take(restore)


@dataclass(slots=True)
class _Refs:
    """A shard's rows in a run, sorted: keys, seq, and where each row's bytes are."""

    keys: np.ndarray | pa.Array
    seq: np.ndarray
    batch: np.ndarray  # index of the buffered batch holding the row
    local: np.ndarray  # row within that batch


class _Buffered:
    """One encoded batch, in input order, and where each shard's rows are in it."""

    __slots__ = ("by_shard", "chunk", "ends")

    def __init__(self, chunk: Chunk, shard_ids: np.ndarray, n_shards: int) -> None:
        self.chunk = chunk
        self.by_shard = np.argsort(shard_ids, kind="stable")
        self.ends = np.cumsum(np.bincount(shard_ids, minlength=n_shards))

    def positions(self, shard: int) -> np.ndarray:
        start = int(self.ends[shard - 1]) if shard else 0
        return self.by_shard[start : int(self.ends[shard])]


class ShardSorter:
    """Rows arrive in input order, tagged with their shard; sorted shards come out.

    ``add`` per encoded batch; then ``finish``; then ``sorted_chunks(shard)`` for each
    shard, in any order. ``run_bytes`` bounds the buffered batches (bytes of rows, keys
    and seq); ``merge_bytes`` bounds the windows of all runs together while merging.
    Buffered rows are never copied into shard order as a whole: a shard is sorted as
    references (batch, row) and its rows gathered a chunk at a time as they are written.
    """

    def __init__(
        self,
        n_shards: int,
        ops: KeyOps,
        spill_dir: str,
        run_bytes: int,
        merge_bytes: int,
        dedupe: str | None,
    ) -> None:
        self.n_shards = n_shards
        self.ops = ops
        self.spill_dir = spill_dir
        self.run_bytes = run_bytes
        self.merge_bytes = merge_bytes
        self.dedupe = dedupe
        self.dropped = 0  # rows dropped by dedupe
        self._batches: list[_Buffered] = []
        self._buffered = 0
        self._runs: list[_RunFile] = []
        self._final: list[_Refs | None] | None = None

    @property
    def spilled_runs(self) -> int:
        return len(self._runs)

    def add(self, chunk: Chunk, shard_ids: np.ndarray) -> None:
        """Buffer one batch (rows in input order); spill a run when the buffer is full."""
        self._batches.append(_Buffered(chunk, shard_ids, self.n_shards))
        self._buffered += chunk.nbytes
        if self._buffered >= self.run_bytes:
            self._spill()

    def finish(self) -> None:
        """No more rows: sort what is buffered (kept in memory if nothing was spilled)."""
        if self._runs:
            if self._batches:
                self._spill()
            return
        self._final = [self._sort_shard(s) for s in range(self.n_shards)]

    def sorted_chunks(self, shard: int, max_rows: int) -> Iterator[Chunk]:
        """The shard's rows in key order, one per key, in chunks of at most ``max_rows``."""
        if self._final is None:
            yield from self._merge(shard, max_rows)
            return
        refs, self._final[shard] = self._final[shard], None
        if refs is not None:
            yield from self._gathered(refs, max_rows)
        if not any(r is not None for r in self._final):
            self._batches.clear()

    def close(self) -> None:
        for run in self._runs:
            run.close()
        self._runs.clear()
        self._batches.clear()
        self._final = None

    # -- one run: sorted references into the buffered batches ------------------------

    def _sort_shard(self, shard: int) -> _Refs | None:
        ops = self.ops
        keys, seqs, batches, locals_ = [], [], [], []
        for i, buffered in enumerate(self._batches):
            pos = buffered.positions(shard)
            if not len(pos):
                continue
            keys.append(ops.take(buffered.chunk.keys, pos))
            seqs.append(buffered.chunk.seq[pos])
            batches.append(np.full(len(pos), i, np.int32))
            locals_.append(pos)
        if not keys:
            return None
        refs = _Refs(
            ops.concat(keys), np.concatenate(seqs), np.concatenate(batches), np.concatenate(locals_)
        )
        idx = unique_order(ops, refs.keys, refs.seq, self.dedupe)
        if idx is None:
            return refs
        self.dropped += len(refs.seq) - len(idx)
        return _Refs(ops.take(refs.keys, idx), refs.seq[idx], refs.batch[idx], refs.local[idx])

    def _gathered(self, refs: _Refs, max_rows: int) -> Iterator[Chunk]:
        rows = [b.chunk.rows for b in self._batches]
        for start in range(0, len(refs.seq), max_rows):
            stop = min(len(refs.seq), start + max_rows)
            yield Chunk(
                refs.keys[start:stop],
                refs.seq[start:stop],
                gather(rows, refs.batch[start:stop], refs.local[start:stop]),
            )

    def _spill(self) -> None:
        path = os.path.join(self.spill_dir, f"run-{len(self._runs):05d}.arrow")
        schema = pa.schema(
            [("key", self.ops.arrow_type), ("seq", pa.int64()), ("row", pa.large_binary())]
        )
        index: list[tuple[int, int]] = []
        batch_no = 0
        rows_per_batch = max(
            1024, int(SPILL_BATCH_BYTES * sum(len(b.chunk) for b in self._batches) / self._buffered)
        )
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for shard in range(self.n_shards):
                first = batch_no
                refs = self._sort_shard(shard)
                if refs is not None:
                    for part in self._gathered(refs, rows_per_batch):
                        writer.write_batch(
                            pa.record_batch(
                                [self.ops.to_arrow(part.keys), pa.array(part.seq), part.rows],
                                schema=schema,
                            )
                        )
                        batch_no += 1
                index.append((first, batch_no))
        self._runs.append(_RunFile(path, index))
        self._batches.clear()
        self._buffered = 0
        release_memory()

    # -- many runs: merge ------------------------------------------------------------

    def _merge(self, shard: int, max_rows: int) -> Iterator[Chunk]:
        ops = self.ops
        window = max(SPILL_BATCH_BYTES, self.merge_bytes // max(1, len(self._runs)))
        cursors = [_Cursor(run, shard, ops, window) for run in self._runs]
        cursors = [c for c in cursors if c.fill()]
        while cursors:
            bound = min(ops.at(c.keys, len(c.keys) - 1) for c in cursors)
            pieces = [c.pop_at_most(bound) for c in cursors]
            chunk = concat(ops, [p for p in pieces if p is not None])
            if len(pieces) > 1:
                # Concatenated in run order = input order, which the stable sort keeps.
                idx = unique_order(ops, chunk.keys, chunk.seq, self.dedupe)
                if idx is not None:
                    self.dropped += len(chunk) - len(idx)
                    chunk = take(ops, chunk, idx)
            yield from _split(chunk, max_rows)
            cursors = [c for c in cursors if c.fill()]


class _RunFile:
    """One spilled run: an IPC file and, per shard, the range of its record batches."""

    def __init__(self, path: str, index: list[tuple[int, int]]) -> None:
        self.path = path
        self.index = index

    def batches(self, shard: int) -> Iterator[pa.RecordBatch]:
        first, end = self.index[shard]
        if first == end:
            return
        with pa.OSFile(self.path, "rb") as source:
            reader = pa.ipc.open_file(source)
            for i in range(first, end):
                yield reader.get_batch(i)

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class _Cursor:
    """A window of one run's sorted rows of one shard."""

    def __init__(self, run: _RunFile, shard: int, ops: KeyOps, window_bytes: int) -> None:
        self.ops = ops
        self.window_bytes = window_bytes
        self._batches = run.batches(shard)
        self._done = False
        self.chunk: Chunk | None = None

    @property
    def keys(self):
        return self.chunk.keys  # type: ignore[union-attr]

    def fill(self) -> bool:
        """Read batches until the window is full; False when the run has no row left."""
        have = [self.chunk] if self.chunk is not None and len(self.chunk) else []
        size = sum(c.nbytes for c in have)
        while not self._done and size < self.window_bytes:
            batch = next(self._batches, None)
            if batch is None:
                self._done = True
                break
            chunk = Chunk(
                self.ops.from_arrow(batch.column(0)), batch.column(1).to_numpy(), batch.column(2)
            )
            have.append(chunk)
            size += chunk.nbytes
        self.chunk = concat(self.ops, have) if have else None
        return self.chunk is not None

    def pop_at_most(self, bound) -> Chunk | None:
        chunk = self.chunk
        assert chunk is not None
        n = self.ops.count_at_most(chunk.keys, bound)
        if n == 0:
            return None
        head = Chunk(chunk.keys[:n], chunk.seq[:n], chunk.rows.slice(0, n))
        self.chunk = Chunk(chunk.keys[n:], chunk.seq[n:], chunk.rows.slice(n))
        return head


def _split(chunk: Chunk, max_rows: int) -> Iterator[Chunk]:
    n = len(chunk)
    if n <= max_rows:
        yield chunk
        return
    for start in range(0, n, max_rows):
        stop = min(n, start + max_rows)
        yield Chunk(
            chunk.keys[start:stop], chunk.seq[start:stop], chunk.rows.slice(start, stop - start)
        )
