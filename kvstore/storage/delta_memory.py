"""DeltaMemory: the rows of a small delta shard kept in memory beside RocksDB, so a read
looks a key up in the delta without a RocksDB MultiGet.

Every change of a delta shard passes ``Shard.write``, which applies it here after
RocksDB took it, so the dict holds exactly what the shard holds. A delta is small
(streaming updates since the last bulk version; compaction empties it), but not
bounded: past ``limit`` bytes (``NodeConfig.delta_memory_bytes``, a table's, split over
its shards) the copy is dropped and the shard reads from RocksDB alone, as before. It
is made again, if the rows fit, when the shard is next opened or after a compaction.

Why (issue 17, part 3): with a delta shard in RocksDB, each read pays a delta MultiGet
of every key besides the base's, and a key the delta holds costs twice what a key it
lacks does (its value copied into a std::string, then into a Python bytes). Measured
in-process in ``loadtests.tiers`` (30k rows, 100-key reads): see the commit that adds
this module.

The rows live in ``_codec.DeltaRows``, a C hash table with 8-byte keys in its slots,
not in a dict: py-spy put the dict's lookups at 14% of a base+delta read, mostly
cache misses on the key objects each hit compares (the commit that made the change
has the A/B).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from kvstore._codec import DeltaRows

logger = logging.getLogger(__name__)

__all__ = ["ENTRY_OVERHEAD_BYTES", "DeltaMemory"]

#: What a key costs besides its value, on average: its share of the hash table's 32-byte
#: slots (a quarter to a half of them full: 64-128 B a key), the value's bytes header
#: (~33 B), and a key object for keys other than 8 bytes long (~41 B). The figure of the
#: dict this replaced, kept: close to the mean for int64 keys, low for string keys.
ENTRY_OVERHEAD_BYTES = 128


class DeltaMemory:
    """The key -> stored value map of one delta shard, while it fits in ``limit`` bytes."""

    __slots__ = ("bytes", "limit", "rows")

    def __init__(self, limit: int) -> None:
        #: The shard's keys and stored values (the node's own keys too).
        self.rows = DeltaRows()
        #: Bytes counted against ``limit`` (values + ENTRY_OVERHEAD_BYTES a key).
        self.bytes = 0
        self.limit = limit

    @classmethod
    def load(
        cls, items: Iterator[tuple[bytes, bytes]], limit: int, name: str
    ) -> DeltaMemory | None:
        """The copy of the shard ``name`` whose keys and values ``items`` yields; None
        once they exceed ``limit`` bytes (the rest is not read)."""
        memory = cls(limit)
        rows = memory.rows
        size = 0
        for key, value in items:
            size += len(value) + ENTRY_OVERHEAD_BYTES
            if size > limit:
                logger.info("%s: over %d bytes, read from RocksDB alone", name, limit)
                return None
            rows.apply([(key, value)], (), ENTRY_OVERHEAD_BYTES)
        memory.bytes = size
        return memory

    def get(self, keys: list[bytes]) -> list[bytes | None]:
        """The values of ``keys``, None where the shard has none (as a MultiGet)."""
        return self.rows.get_many(keys)

    def apply(self, puts: list[tuple[bytes, bytes]], deletes: Iterable[bytes], name: str) -> bool:
        """Apply a write RocksDB took to the shard ``name`` (puts first, then deletes, as
        its WriteBatch); False when the copy has outgrown ``limit`` (the caller drops it)."""
        size = self.bytes + self.rows.apply(puts, deletes, ENTRY_OVERHEAD_BYTES)
        self.bytes = size
        if size <= self.limit:
            return True
        logger.info("%s: over %d bytes, read from RocksDB alone from now", name, self.limit)
        return False
