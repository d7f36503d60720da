"""The synthetic feature table and the three systems that serve it in the benchmark.

* ``kvstore``: one table, int64 key, 32 float32 features + a float32[64] embedding,
  bulk-loaded from zstd Parquet, read with ``client.get(table, keys).to_numpy()`` (all
  features; ``Client(address)`` sends ``get`` over the node's fast read path).
* ``redis-packed``: one string value per key, the 32 + 64 float32 as 384 raw bytes,
  written with pipelined MSET, read with MGET (GET for one key, as a user reads one
  row) and decoded into one (n, 96) array.
* ``redis-hash``: one hash per entity, one field per feature (the 32 floats as 4 raw
  bytes each, the embedding as one 256-byte field), written with pipelined HSET,
  read with pipelined HGETALL and decoded into a (n, 32) and a (n, 64) array.

Redis is read with redis-py on the hiredis reply parser, the client Redis's docs
advise for performance: every connection comes from ``redis_client.connect``, which
refuses to hand out one that would parse in Python.

Every system has ``reader()`` (a new connection with ``lookup(keys, names)``), so the
benchmark reads all three the same way. The Redis systems have ``load(chunk)`` (one
chunk of rows, returns seconds spent in the client calls); kvstore is bulk-loaded
from a Parquet file of the same rows instead (``loadtests/bulkload.py``), the way
production data arrives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from kvstore import Client
from loadtests.redis_client import connect

__all__ = [
    "EMB_DIM",
    "FLOAT_FEATURES",
    "ROW_FLOATS",
    "TABLE",
    "Chunk",
    "KeyPool",
    "KvstoreSystem",
    "RedisHashSystem",
    "RedisPackedSystem",
    "open_reader",
    "redis_key",
]

N_FLOATS = 32
EMB_DIM = 64
ROW_FLOATS = N_FLOATS + EMB_DIM
ROW_BYTES = ROW_FLOATS * 4
FLOAT_FEATURES = [f"f{i:02d}" for i in range(N_FLOATS)]
FLOAT_FIELDS = [name.encode() for name in FLOAT_FEATURES]
EMB_FIELD = b"emb"
TABLE = "bench_features"
#: Keys per MSET command and hashes per pipeline round trip when loading Redis.
REDIS_MSET_KEYS = 1000
REDIS_PIPELINE_HASHES = 1000

_NAN4 = np.full(1, np.nan, np.float32).tobytes()
_NAN_ROW = np.full(ROW_FLOATS, np.nan, np.float32).tobytes()
_NAN_HASH = {**dict.fromkeys(FLOAT_FIELDS, _NAN4), EMB_FIELD: _NAN4 * EMB_DIM}


def redis_key(key: int) -> bytes:
    """The Redis key name of entity ``key`` (the same for both Redis layouts)."""
    return b"e:%d" % key


@dataclass(slots=True)
class Chunk:
    """Rows ``keys`` with ``floats`` (32, n) float32 (one row per feature) and ``emb`` (n, 64)."""

    keys: np.ndarray
    floats: np.ndarray
    emb: np.ndarray

    @classmethod
    def generate(cls, seed: int, start: int, stop: int) -> Chunk:
        """Rows ``start``..``stop - 1``; the same arguments always give the same values."""
        rng = np.random.default_rng([seed, start])
        n = stop - start
        return cls(
            keys=np.arange(start, stop, dtype=np.int64),
            floats=rng.random((N_FLOATS, n), dtype=np.float32),
            emb=rng.standard_normal((n, EMB_DIM), dtype=np.float32),
        )

    def matrix(self) -> np.ndarray:
        """The rows as one C-contiguous (n, 96) float32 array: the 32 floats, then the emb."""
        return np.ascontiguousarray(np.concatenate([self.floats.T, self.emb], axis=1))


@dataclass(slots=True)
class KeyPool:
    """Batches of random existing keys: ``ints[j]`` as int64, ``names[j]`` as Redis keys.

    Drawn before measuring, so that no lookup pays for making up its keys.
    """

    batch_size: int
    ints: np.ndarray  # (batches, batch_size) int64
    names: list[list[bytes]]

    @classmethod
    def draw(cls, rng: np.random.Generator, rows: int, batch_size: int, keys: int) -> KeyPool:
        """Uniform random keys in ``0..rows-1``: ``keys`` keys, at least 64 batches."""
        batches = max(64, keys // batch_size)
        return cls.of(rng.integers(0, rows, size=(batches, batch_size), dtype=np.int64))

    @classmethod
    def chosen(
        cls,
        chooser: Any,
        rng: np.random.Generator,
        batch_size: int,
        batches: int,
        names: bool = True,
    ) -> KeyPool:
        """``batches`` batches of ``batch_size`` keys drawn by ``chooser`` (anything with
        ``draw(rng, n)``: ``loadtest.KeyChooser``); ``names=False`` leaves out the Redis
        key names, which only the Redis readers use."""
        ints = chooser.draw(rng, batches * batch_size).reshape(batches, batch_size)
        return cls.of(ints) if names else cls(batch_size, ints, [[]] * batches)

    @classmethod
    def of(cls, ints: np.ndarray) -> KeyPool:
        """The batches of ``ints`` (batches, batch_size), with their Redis key names."""
        names = [[redis_key(k) for k in row] for row in ints.tolist()]
        return cls(ints.shape[1], ints, names)

    def __len__(self) -> int:
        return len(self.names)


def open_reader(system: str, endpoint: str) -> Any:
    """A new reader of ``system`` at ``endpoint`` (kvstore HOST:PORT, or a Redis port);
    ``kvstore-…`` names another kvstore endpoint (the cluster step's)."""
    if system == "kvstore" or system.startswith("kvstore-"):
        return KvstoreReader(endpoint)
    conn = connect(int(endpoint))
    if system == "redis-packed":
        return RedisPackedReader(conn)
    if system == "redis-hash":
        return RedisHashReader(conn)
    raise ValueError(f"unknown system {system!r}")


class KvstoreSystem:
    """The kvstore node under test."""

    name = "kvstore"

    def __init__(self, address: str, server_pid: int, shards: int = 8) -> None:
        self.address = address
        self.server_pid = server_pid
        self.shards = shards
        self._client = Client(address, timeout=60.0)

    def create(self) -> None:
        """Create the benchmark table (``shards`` shards; the default of the client is 8)."""
        self.create_table(TABLE)

    def create_table(self, name: str) -> None:
        """Create another table of the benchmark's schema (for the extra bulk-load sizes)."""
        features = dict.fromkeys(FLOAT_FEATURES, "float32")
        features["emb"] = f"float32[{EMB_DIM}]"
        self._client.create_table(name, key="int64", features=features, shards=self.shards)

    def drop_table(self, name: str) -> None:
        self._client.drop_table(name, timeout=600.0)

    def count_found(self, keys: np.ndarray, table: str = TABLE) -> int:
        """How many of ``keys`` the table holds (the check that a load is queryable)."""
        return int(np.count_nonzero(self._client.get(table, keys, ["f00"]).found))

    @property
    def endpoint(self) -> str:
        return self.address

    def reader(self) -> KvstoreReader:
        return KvstoreReader(self.address)

    def close(self) -> None:
        self._client.close()


class KvstoreReader:
    """One kvstore Client (its own gRPC channel) for one load-generator thread."""

    __slots__ = ("_client",)

    def __init__(self, address: str) -> None:
        self._client = Client(address, timeout=60.0)

    def lookup(self, keys: np.ndarray, names: list[bytes]) -> dict[str, np.ndarray]:
        """All features of ``keys`` (an int64 array; ``names`` unused) as NumPy columns."""
        return self._client.get(TABLE, keys).to_numpy()

    @staticmethod
    def as_matrix(result: dict[str, np.ndarray]) -> np.ndarray:
        """A lookup result as (n, 96) float32, the layout of ``Chunk.matrix``."""
        return np.concatenate(
            [np.stack([result[f] for f in FLOAT_FEATURES], axis=1), result["emb"]], axis=1
        )

    def close(self) -> None:
        self._client.close()


class RedisPackedSystem:
    """Redis, one 384-byte value per key (the row's 96 float32, little-endian)."""

    name = "redis-packed"

    def __init__(self, server) -> None:
        self.server = server
        self.server_pid = server.pid
        self._conn = connect(server.port)

    def load(self, chunk: Chunk) -> float:
        """Pipelined MSET of 1000 keys per command; seconds spent (encoding included)."""
        t0 = time.perf_counter_ns()
        buf = chunk.matrix().tobytes()
        names = [redis_key(k) for k in chunk.keys.tolist()]
        pipe = self._conn.pipeline(transaction=False)
        for lo in range(0, len(names), REDIS_MSET_KEYS):
            hi = min(lo + REDIS_MSET_KEYS, len(names))
            pipe.mset({names[i]: buf[i * ROW_BYTES : (i + 1) * ROW_BYTES] for i in range(lo, hi)})
        pipe.execute()
        return (time.perf_counter_ns() - t0) / 1e9

    @property
    def endpoint(self) -> str:
        return str(self.server.port)

    def reader(self) -> RedisPackedReader:
        return RedisPackedReader(connect(self.server.port))

    def close(self) -> None:
        self._conn.close()


class RedisPackedReader:
    """One Redis connection reading packed rows with MGET."""

    __slots__ = ("_conn",)

    def __init__(self, conn: redis.Redis) -> None:
        self._conn = conn

    def lookup(self, keys: np.ndarray, names: list[bytes]) -> np.ndarray:
        """MGET ``names`` (GET if one); the rows as one (n, 96) float32 array, NaN rows
        where missing."""
        values = self._conn.mget(names) if len(names) != 1 else [self._conn.get(names[0])]
        if None in values:
            values = [_NAN_ROW if v is None else v for v in values]
        return np.frombuffer(b"".join(values), np.float32).reshape(len(values), ROW_FLOATS)

    @staticmethod
    def as_matrix(result: np.ndarray) -> np.ndarray:
        return result

    def close(self) -> None:
        self._conn.close()


class RedisHashSystem:
    """Redis, one hash per entity, one field per feature (the common feature-store layout)."""

    name = "redis-hash"

    def __init__(self, server) -> None:
        self.server = server
        self.server_pid = server.pid
        self._conn = connect(server.port)

    def load(self, chunk: Chunk) -> float:
        """Pipelined HSET, one per entity, 1000 per round trip; seconds spent (encoding too)."""
        t0 = time.perf_counter_ns()
        n = len(chunk.keys)
        floats = chunk.floats.T.tobytes()  # row-major (n, 32)
        emb = chunk.emb.tobytes()
        row = N_FLOATS * 4
        pipe = self._conn.pipeline(transaction=False)
        for i, key in enumerate(chunk.keys.tolist()):
            base = i * row
            mapping = {
                field: floats[base + 4 * j : base + 4 * j + 4]
                for j, field in enumerate(FLOAT_FIELDS)
            }
            mapping[EMB_FIELD] = emb[i * EMB_DIM * 4 : (i + 1) * EMB_DIM * 4]
            pipe.hset(redis_key(key), mapping=mapping)
            if (i + 1) % REDIS_PIPELINE_HASHES == 0 or i + 1 == n:
                pipe.execute()
        return (time.perf_counter_ns() - t0) / 1e9

    @property
    def endpoint(self) -> str:
        return str(self.server.port)

    def reader(self) -> RedisHashReader:
        return RedisHashReader(connect(self.server.port))

    def close(self) -> None:
        self._conn.close()


class RedisHashReader:
    """One Redis connection reading hashes with pipelined HGETALL."""

    __slots__ = ("_conn",)

    def __init__(self, conn: redis.Redis) -> None:
        self._conn = conn

    def lookup(self, keys: np.ndarray, names: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """HGETALL each of ``names`` in one pipeline; (n, 32) floats and (n, 64) embeddings.

        A missing key (empty hash) decodes as NaN.
        """
        pipe = self._conn.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(name)
        rows = pipe.execute()
        if not all(rows):
            rows = [r or _NAN_HASH for r in rows]
        n = len(rows)
        floats = np.frombuffer(b"".join([r[f] for r in rows for f in FLOAT_FIELDS]), np.float32)
        emb = np.frombuffer(b"".join([r[EMB_FIELD] for r in rows]), np.float32)
        return floats.reshape(n, N_FLOATS), emb.reshape(n, EMB_DIM)

    @staticmethod
    def as_matrix(result: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return np.concatenate(result, axis=1)

    def close(self) -> None:
        self._conn.close()
