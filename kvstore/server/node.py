"""The node: tables by name, and each request routed to the shards that hold its keys.

This layer knows tables, shards and keys; it does not know gRPC (the servicer
translates) or RocksDB (the shards do). Every call runs to completion on the event
loop thread without awaiting, so a partial write's read-modify-write is not
interleaved with another request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rocksdict

from kvstore import _codec
from kvstore.columns import encode_rows
from kvstore.config import NodeConfig
from kvstore.errors import (
    AlreadyExists,
    CorruptValue,
    InvalidArgument,
    RequestTooLarge,
    SchemaChanged,
    TableNotFound,
)
from kvstore.keys import KeyBatch
from kvstore.schema import TableSchema
from kvstore.storage.catalog import Catalog
from kvstore.storage.shard import Shard, rocksdb_options
from kvstore.storage.table import Table

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


class Node:
    """The tables of one storage node and the requests that touch them."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.tables: dict[str, Table] = {}
        self._cache = rocksdict.Cache(config.block_cache_bytes)
        self._options = rocksdb_options(self._cache, config.bloom_bits_per_key)
        self.catalog: Catalog | None = None

    # -- lifecycle -------------------------------------------------------------------

    def open(self) -> None:
        """Open every table in the catalog (creating the data directory if new)."""
        data_dir = self.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(data_dir)
        for schema, version in self.catalog.schemas():
            self.tables[schema.name] = Table(
                self._table_root(schema), schema, version, self._options
            )
        logger.info("opened %d table(s) from %s", len(self.tables), data_dir)
        if self.config.demo and DEMO_TABLE not in self.tables:
            self._load_demo()

    def close(self) -> None:
        for table in self.tables.values():
            table.close()
        self.tables.clear()

    def _table_root(self, schema: TableSchema) -> Path:
        return self.config.data_dir / "tables" / f"{schema.name}-{schema.schema_id}"

    # -- tables ----------------------------------------------------------------------

    def table(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
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
        schema = self.catalog.add(schema)
        table = Table(self._table_root(schema), schema, 1, self._options)
        self.tables[schema.name] = table
        logger.info("created table %r (schema id %d)", schema.name, schema.schema_id)
        return table

    def drop_table(self, name: str) -> None:
        table = self.table(name)
        assert self.catalog is not None
        self.catalog.remove(name)
        del self.tables[name]
        table.destroy()
        logger.info("dropped table %r", name)

    # -- data ------------------------------------------------------------------------

    def _check_count(self, n: int, table: str) -> None:
        limit = self.config.max_keys_per_request
        if n > limit:
            raise RequestTooLarge(
                f"table {table!r}: the request has {n} keys; the node's limit is {limit} "
                "keys per request (max_keys_per_request); split the batch"
            )

    def get(self, name: str, keys: KeyBatch, features: list[str]) -> GetAnswer:
        """The stored rows of ``keys``; ``features`` are only checked (the client decodes)."""
        table = self.table(name)
        schema = table.schema
        schema.projection(features)
        n = keys.count
        self._check_count(n, name)
        if n == 0:
            return GetAnswer(schema.schema_id, table.version, b"", np.empty(0, np.int32), None)
        shards = table.shards
        if len(shards) == 1:
            order = None
            values = shards[0].multi_get(keys.encoded())
            counts = [n]
        else:
            shard_ids = keys.shard_ids(len(shards))
            order = np.argsort(shard_ids, kind="stable").astype(np.int32)
            counts = np.bincount(shard_ids, minlength=len(shards)).tolist()
            encoded = keys.encoded(order)
            values = []
            pos = 0
            for shard, count in zip(shards, counts, strict=True):
                if count:
                    values.extend(shard.multi_get(encoded[pos : pos + count]))
                    pos += count
        block, lengths = _codec.join_values(values)
        lengths64 = lengths.astype(np.int64)
        starts = np.zeros(n, np.int64)
        np.cumsum(np.maximum(lengths64[:-1], 0), out=starts[1:])
        bad = _codec.check_rows(schema.layout, block, starts, lengths64)
        if bad is not None:
            index, reason = bad
            shard_index = int(np.searchsorted(np.cumsum(counts), index, side="right"))
            position = int(order[index]) if order is not None else index
            message = (
                f"table {name!r}, shard {shard_index}, key {keys.describe(position)}: "
                f"the stored value is corrupt ({reason})"
            )
            logger.error("%s", message)
            raise CorruptValue(message)
        return GetAnswer(schema.schema_id, table.version, block, lengths, order)

    def write(
        self,
        name: str,
        schema_id: int,
        keys: KeyBatch,
        rows: bytes,
        row_offsets: np.ndarray,
        features: list[str],
    ) -> int:
        """Upsert encoded rows; with ``features``, only those features change (merge)."""
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
        present = None
        if features and len(set(features)) < len(schema.features):
            present = np.zeros(len(schema.features), np.uint8)
            for feature in features:
                present[schema.index_of(feature)] = 1
        shards = table.shards
        shard_ids = keys.shard_ids(len(shards)).tolist()
        encoded = keys.encoded()
        if present is None:
            new_rows = _codec.split_rows(rows, row_offsets)
        else:
            old_rows: list[bytes | None] = [None] * n
            for shard, positions in self._group(shards, shard_ids):
                found = shard.multi_get([encoded[i] for i in positions])
                for i, value in zip(positions, found, strict=True):
                    old_rows[i] = value
            try:
                new_rows = _codec.merge_rows(schema.layout, old_rows, rows, row_offsets, present)
            except (_codec.CorruptRow, _codec.SchemaMismatch) as exc:
                raise CorruptValue(
                    f"table {name!r}, shard {shard_ids[exc.index]}, key "
                    f"{keys.describe(exc.index)}: the stored value is corrupt ({exc})"
                ) from None
        for shard, positions in self._group(shards, shard_ids):
            shard.write([(encoded[i], new_rows[i]) for i in positions])
        return n

    def delete(self, name: str, keys: KeyBatch) -> int:
        """Delete ``keys`` (missing ones are fine); returns how many keys were named."""
        table = self.table(name)
        self._check_count(keys.count, name)
        if keys.count == 0:
            return 0
        shards = table.shards
        encoded = keys.encoded()
        for shard, positions in self._group(shards, keys.shard_ids(len(shards)).tolist()):
            shard.write([], [encoded[i] for i in positions])
        return keys.count

    @staticmethod
    def _group(shards: list[Shard], shard_ids: list[int]) -> list[tuple[Shard, list[int]]]:
        """Request positions grouped by shard, for the shards that have any."""
        groups: list[list[int]] = [[] for _ in shards]
        for i, s in enumerate(shard_ids):
            groups[s].append(i)
        return [(shards[s], g) for s, g in enumerate(groups) if g]

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
        self.write(
            DEMO_TABLE, table.schema.schema_id, encoded.keys, encoded.rows, encoded.offsets, []
        )
        logger.info("loaded the demo table %r with %d rows", DEMO_TABLE, DEMO_ROWS)
