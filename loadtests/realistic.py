"""The realistic bench table: features distributed as a user's features are, so that
what compression does to them is what it would do in production.

The random table of ``loadtests/systems.py`` (96 uniform or normal float32 per row)
is the worst case for compression. This one is what a recommender's user features
look like (the generator, docs/benchmarks.md "The realistic table"):

=================  ===============  ===========================================================
feature            dtype            values
=================  ===============  ===========================================================
age_bucket         int32            0..11, a bell around 4
tenure_days        int32            days since sign-up, geometric, mean ~400, at most 3650
country            string           ISO-like 2-letter codes, zipfian (s 1.3) over 200
device             string           6 platform names, fixed shares (android 45%, ios 30%, ...)
language           string           5-letter tags (``en-AD``), zipfian (s 1.5) over 40
is_premium         bool             8% true
clicks_7d          int64            counter: 0 for 30% of users, else negative binomial
                                    (mean 6): ~40% zero
impressions_7d     int64            counter, clicks x 20-ish plus noise
purchases_30d      int64            counter, Poisson 0.4
ctr_7d             float32          clicks_7d / impressions_7d, 0 where none
recent_items       int64[]          0..20 item ids (geometric length, mean ~5), ids zipfian
                                    (s 1.1) over 10M items
emb                float32[32]      a unit-scale normal embedding (incompressible, as trained
                                    embeddings are)
=================  ===============  ===========================================================

Rows are a function of (seed, first key, count) only, like ``systems.Chunk``, and a
table is always made of the same chunks (``chunks``): the same seed gives the same
table in every run, and in Redis and kvstore alike. Redis holds
each row *packed* as the bench packs rows: one string per key, here the row's bytes in
kvstore's own row encoding (docs/row-format.md: the most compact layout of these
dtypes at hand; a Redis user would pick msgpack or protobuf, no smaller), read with
MGET and decoded by the same Cython codec the kvstore client uses, into the same
columns ``Client.get(...).to_numpy()`` returns.
"""

from __future__ import annotations

import string
import time
from collections.abc import Iterator
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis

from kvstore import Client, _codec
from kvstore.columns import encode_rows
from kvstore.schema import TableSchema
from loadtests.bulkload import run_loader
from loadtests.redis_client import connect
from loadtests.servers import KvstoreNode
from loadtests.systems import REDIS_MSET_KEYS, redis_key

__all__ = [
    "FEATURES",
    "TABLE",
    "RealisticKvstoreSystem",
    "RealisticRedisSystem",
    "chunks",
    "generate",
    "load_redis_and_parquet",
    "loaded_data_dir",
    "schema",
    "write_parquet",
]

TABLE = "bench_realistic"
EMB_DIM = 32
FEATURES = {
    "age_bucket": "int32",
    "tenure_days": "int32",
    "country": "string",
    "device": "string",
    "language": "string",
    "is_premium": "bool",
    "clicks_7d": "int64",
    "impressions_7d": "int64",
    "purchases_30d": "int64",
    "ctr_7d": "float32",
    "recent_items": "int64[]",
    "emb": f"float32[{EMB_DIM}]",
}
#: The event time of every generated row (µs since the epoch): a daily snapshot's.
SNAPSHOT_US = 1_764_892_800_000_000  # 2025-12-05T00:00Z

_DEVICES = ["android", "ios", "web", "ipad", "android_tv", "other"]
_DEVICE_SHARES = [0.45, 0.30, 0.15, 0.05, 0.03, 0.02]
#: 200 two-letter codes, in a fixed order (the first the most popular).
_COUNTRIES = ["".join(p) for p in product(string.ascii_uppercase, repeat=2)][::3][:200]
#: 40 language tags: 5 languages, each with 8 regions.
_LANGUAGES = [f"{lang}-{c}" for lang in ("en", "es", "pt", "de", "fr") for c in _COUNTRIES[:8]]
ITEMS = 10_000_000
#: Rows generated, written to Redis and to the Parquet file at a time.
LOAD_CHUNK_ROWS = 20_000


def schema(shards: int = 8) -> TableSchema:
    """The realistic table's schema (``shards`` shards, schema id 0)."""
    return TableSchema.build(TABLE, "int64", FEATURES, shards=shards)


def _zipf_index(rng: np.random.Generator, s: float, n: int, size: int) -> np.ndarray:
    """``size`` indexes in 0..n-1, index i drawn with weight 1 / (i + 1) ** s."""
    weights = 1.0 / np.arange(1, n + 1) ** s
    return rng.choice(n, size=size, p=weights / weights.sum())


def generate(seed: int, start: int, stop: int) -> pa.Table:
    """Rows with keys ``start``..``stop - 1`` as an Arrow table (``key`` + FEATURES); the
    same arguments always give the same rows."""
    rng = np.random.default_rng([seed, start, 17])
    n = stop - start
    clicks = rng.negative_binomial(1, 1 / 7, n) * (rng.random(n) >= 0.3)
    impressions = clicks * rng.integers(12, 30, n) + rng.poisson(15, n)
    lengths = np.minimum(rng.geometric(1 / 6, n) - 1, 20)
    ids = (rng.zipf(1.1, int(lengths.sum())) - 1) % ITEMS
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    countries = np.array(_COUNTRIES, dtype=object)[_zipf_index(rng, 1.3, len(_COUNTRIES), n)]
    languages = np.array(_LANGUAGES, dtype=object)[_zipf_index(rng, 1.5, len(_LANGUAGES), n)]
    devices = np.array(_DEVICES, dtype=object)[rng.choice(len(_DEVICES), n, p=_DEVICE_SHARES)]
    emb = rng.standard_normal((n, EMB_DIM), dtype=np.float32)
    return pa.table(
        {
            "key": pa.array(np.arange(start, stop, dtype=np.int64)),
            "age_bucket": pa.array(np.clip(rng.normal(4, 2, n), 0, 11).astype(np.int32)),
            "tenure_days": pa.array(np.minimum(rng.geometric(1 / 400, n), 3650).astype(np.int32)),
            "country": pa.array(countries, pa.string()),
            "device": pa.array(devices, pa.string()),
            "language": pa.array(languages, pa.string()),
            "is_premium": pa.array(rng.random(n) < 0.08),
            "clicks_7d": pa.array(clicks.astype(np.int64)),
            "impressions_7d": pa.array(impressions.astype(np.int64)),
            "purchases_30d": pa.array(rng.poisson(0.4, n).astype(np.int64)),
            "ctr_7d": pa.array(
                np.divide(clicks, impressions, out=np.zeros(n), where=impressions > 0).astype(
                    np.float32
                )
            ),
            "recent_items": pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(ids.astype(np.int64))
            ),
            "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), EMB_DIM),
        }
    )


def encoded_rows(data: pa.Table) -> tuple[bytes, np.ndarray]:
    """The rows of ``data`` in kvstore's row encoding (what the loader stores, at
    ``SNAPSHOT_US``): one buffer and its len + 1 offsets."""
    rows = encode_rows(schema(), data, event_time=SNAPSHOT_US)
    return rows.rows, rows.offsets


def chunks(seed: int, rows: int) -> Iterator[pa.Table]:
    """The table of ``rows`` rows of ``seed``, ``LOAD_CHUNK_ROWS`` rows at a time (rows
    depend on where their chunk starts: always these chunks, so one seed is one table)."""
    for lo in range(0, rows, LOAD_CHUNK_ROWS):
        yield generate(seed, lo, min(lo + LOAD_CHUNK_ROWS, rows))


def write_parquet(path: Path, seed: int, rows: int) -> dict:
    """``rows`` rows of ``seed`` as one zstd Parquet file: what ``bench.bulk_load`` takes."""
    t0 = time.perf_counter()
    writer = None
    for data in chunks(seed, rows):
        if writer is None:
            writer = pq.ParquetWriter(path, data.schema, compression="zstd")
        writer.write_table(data)
    if writer is not None:
        writer.close()
    size = path.stat().st_size
    return {
        "path": str(path),
        "rows": rows,
        "bytes": size,
        "bytes_per_row": size / max(rows, 1),
        "write_seconds": time.perf_counter() - t0,
    }


def load_redis_and_parquet(
    redis_system: RealisticRedisSystem, path: Path, seed: int, rows: int
) -> dict:
    """Generate ``rows`` rows chunk by chunk into Redis (packed) and a zstd Parquet file
    at ``path`` (what ``loaded_data_dir`` loads); the Parquet file's figures."""
    writer = None
    spent = 0.0
    for data in chunks(seed, rows):
        if writer is None:
            writer = pq.ParquetWriter(path, data.schema, compression="zstd")
        writer.write_table(data)
        spent += redis_system.load(data)
    if writer is not None:
        writer.close()
    print(f"  Redis loaded at {rows / max(spent, 1e-9):,.0f} rows/s", flush=True)
    size = path.stat().st_size
    return {"path": str(path), "rows": rows, "bytes": size, "bytes_per_row": size / max(rows, 1)}


def loaded_data_dir(
    workdir: Path, parquet: dict, rows: int, tmp: Path, env: dict[str, str] | None = None
) -> Path:
    """Start a node in ``workdir`` (``env``: its ``KVSTORE_*`` settings), create the
    realistic table, bulk-load ``parquet`` into it and stop the node: the returned
    ``workdir / "data"`` holds the loaded table (``bench.loaded_data_dir``'s twin)."""
    probe = np.random.default_rng(rows).integers(0, rows, 1000, dtype=np.int64)
    with KvstoreNode(workdir, env=env) as node:
        RealisticKvstoreSystem(node.address, node.pid).create()

        def check() -> None:
            with Client(node.address, timeout=60.0) as client:
                found = int(np.count_nonzero(client.get(TABLE, probe, ["age_bucket"]).found))
            if found != len(probe):
                raise AssertionError(f"after the load, {TABLE} holds {found} of {len(probe)} keys")

        out = run_loader(node.address, node.pid, node.data_dir, TABLE, parquet, tmp, check)
        print(f"  kvstore bulk load: {out['rows_per_s']:,.0f} rows/s", flush=True)
    return node.data_dir


def _numpy_columns(decoded: _codec.Decoded, names: list[str]) -> dict[str, Any]:
    """``decoded`` as ``GetResult.to_numpy`` gives it (the same conversions)."""
    out: dict[str, Any] = decoded.values_dict(names)
    projection = decoded.projection
    for k in projection.masked_columns:
        out[names[k]] = decoded.masked(k)
    for k in projection.var_columns:
        out[names[k]] = decoded.objects(k)
    return out


class RealisticRedisSystem:
    """Redis holding the realistic rows packed: one string per key, the encoded row."""

    name = "redis-packed"

    def __init__(self, server) -> None:
        self.server = server
        self.server_pid = server.pid
        self._conn = connect(server.port)

    def load(self, data: pa.Table) -> float:
        """Pipelined MSET of ``data``'s rows, 1000 keys per command; seconds spent."""
        t0 = time.perf_counter_ns()
        buf, offsets = encoded_rows(data)
        names = [redis_key(k) for k in data.column("key").to_numpy().tolist()]
        bounds = offsets.tolist()
        pipe = self._conn.pipeline(transaction=False)
        for lo in range(0, len(names), REDIS_MSET_KEYS):
            hi = min(lo + REDIS_MSET_KEYS, len(names))
            pipe.mset({names[i]: buf[bounds[i] : bounds[i + 1]] for i in range(lo, hi)})
        pipe.execute()
        return (time.perf_counter_ns() - t0) / 1e9

    def reader(self) -> RealisticRedisReader:
        return RealisticRedisReader(connect(self.server.port))

    def close(self) -> None:
        self._conn.close()


class RealisticRedisReader:
    """One Redis connection: MGET (GET for one key), decoded by kvstore's codec."""

    __slots__ = ("_conn", "_names", "_projection")

    def __init__(self, conn: redis.Redis) -> None:
        self._conn = conn
        table = schema()
        self._names = table.feature_names
        self._projection = _codec.Projection(table.layout, range(len(self._names)))

    def lookup(self, keys: np.ndarray, names: list[bytes]) -> dict[str, Any]:
        """Every feature of the rows named ``names`` as NumPy columns (``keys`` unused)."""
        values = self._conn.mget(names) if len(names) != 1 else [self._conn.get(names[0])]
        buf, lengths32 = _codec.join_values(values)
        lengths = lengths32.astype(np.int64)
        starts = np.zeros(len(values), dtype=np.int64)
        np.cumsum(np.maximum(lengths[:-1], 0), out=starts[1:])
        return _numpy_columns(_codec.decode(self._projection, buf, starts, lengths), self._names)

    def close(self) -> None:
        self._conn.close()


class RealisticKvstoreSystem:
    """A kvstore node serving the realistic table."""

    name = "kvstore"

    def __init__(self, address: str, server_pid: int) -> None:
        self.address = address
        self.server_pid = server_pid

    def create(self, shards: int = 8) -> None:
        with Client(self.address, timeout=60.0) as client:
            client.create_table(TABLE, key="int64", features=FEATURES, shards=shards)

    def reader(self) -> RealisticKvstoreReader:
        return RealisticKvstoreReader(self.address)

    def close(self) -> None:
        pass


class RealisticKvstoreReader:
    """One kvstore Client reading every feature of the realistic table."""

    __slots__ = ("_client",)

    def __init__(self, address: str) -> None:
        self._client = Client(address, timeout=60.0)

    def lookup(self, keys: np.ndarray, names: list[bytes]) -> dict[str, Any]:
        """Every feature of ``keys`` (int64) as NumPy columns (``names`` unused)."""
        return self._client.get(TABLE, keys).to_numpy()

    def close(self) -> None:
        self._client.close()
