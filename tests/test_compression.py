"""Compressed bulk versions (``--base-format zstd``) and the realistic bench table.

A zstd-format version is RocksDB's block-based table with its blocks compressed by
zstd with a dictionary trained on each table file (docs/bulk-load.md, "Table
formats"). Every dtype reads back exactly as loaded, through a real node; a damaged
compressed block is reported as corrupt, never served as other rows; the realistic
table's generator (loadtests/realistic.py) gives the same rows for the same seed, with
the distributions it documents, and Redis and kvstore serve the same answers from it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from kvstore import Client, CorruptValue
from kvstore.ingest.bulk import load
from kvstore.storage.shard import ZSTD_DICT_BYTES

# loadtests/ is a folder of the repository, not an installed package.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests import realistic  # noqa: E402

ROWS = 3000
SEED = 11


def _load_realistic(client: Client, tmp_path: Path, rows: int = ROWS, shards: int = 2) -> list:
    """Create the realistic table, bulk-load ``rows`` generated rows; the rows as dicts."""
    client.create_table(realistic.TABLE, key="int64", features=realistic.FEATURES, shards=shards)
    path = tmp_path / "realistic.parquet"
    realistic.write_parquet(path, SEED, rows)
    load(client.address, realistic.TABLE, str(path), progress=False)
    return pq.read_table(path).to_pylist()


def _sst_files(data_dir: Path) -> list[Path]:
    """The table files of the bulk versions (the cold tier)."""
    return sorted((data_dir / "cold").rglob("*.sst"))


@pytest.mark.parametrize("table_format", ["zstd", "block", "plain"])
def test_every_dtype_of_the_realistic_table_reads_back_as_loaded(
    start_node, tmp_path: Path, table_format: str
) -> None:
    node = start_node("--base-format", table_format)
    with Client(node.address) as client:
        expected = _load_realistic(client, tmp_path)
        keys = np.arange(-5, ROWS + 5, dtype=np.int64)  # a few absent keys at both ends
        got = client.get(realistic.TABLE, keys).to_pylist()
    assert got[:5] == got[-5:] == [None] * 5
    assert got[5:-5] == expected


def test_a_zstd_version_is_compressed_with_a_trained_dictionary(start_node, tmp_path: Path) -> None:
    # What says the rows went through zstd with a dictionary: the files are smaller than
    # the encoded rows, and RocksDB wrote the compression and the dictionary size into
    # each file's properties (uncompressed, readable in the file).
    node = start_node("--base-format", "zstd")
    with Client(node.address) as client:
        _load_realistic(client, tmp_path, shards=1)
    encoded, _ = realistic.encoded_rows(realistic.generate(SEED, 0, ROWS))
    files = _sst_files(node.data_dir)
    assert files
    assert sum(f.stat().st_size for f in files) < 0.85 * len(encoded)
    for f in files:
        blob = f.read_bytes()
        assert b"ZSTD" in blob
        assert f"max_dict_bytes={ZSTD_DICT_BYTES};".encode() in blob


def _damage_first_block(node, at: int) -> None:
    """Flip the byte ``at`` bytes into the first data block of the version's only table
    file, which starts the file: RocksDB writes a compressed block as the varint32 of
    its decompressed size followed by the zstd frame, whose magic number is checked
    here first (the block is compressed)."""
    (sst,) = _sst_files(node.data_dir)
    blob = bytearray(sst.read_bytes())
    header = next(i for i in range(5) if blob[i] < 0x80) + 1  # the varint's length
    assert blob[header : header + 4] == b"\x28\xb5\x2f\xfd", "not a zstd frame"
    blob[at] ^= 0xFF
    sst.write_bytes(blob)


@pytest.mark.parametrize(
    ("extra", "at", "message"),
    [
        # The block's checksum, verified on request, catches damage anywhere in it.
        (("--verify-base-checksums",), 40, "checksum"),
        # Without verification: damage to the frame (its magic number here) fails its
        # decompression, and RocksDB reports it like any other damage.
        ((), 3, "Corrupted compressed block"),
    ],
)
def test_a_damaged_compressed_block_is_reported_as_corrupt(
    start_node, tmp_path: Path, extra: tuple[str, ...], at: int, message: str
) -> None:
    node = start_node("--base-format", "zstd", *extra)
    with Client(node.address) as client:
        expected = _load_realistic(client, tmp_path, shards=1)
    assert node.stop() == 0
    _damage_first_block(node, at)
    node.start()
    with Client(node.address) as client:
        # key 0 is in the first block
        with pytest.raises(CorruptValue, match=rf"table '{realistic.TABLE}'.*{message}"):
            client.get(realistic.TABLE, [0])
        # The other blocks still serve, and the node with them.
        last = client.get(realistic.TABLE, [ROWS - 1]).to_pylist()
    assert last == [expected[-1]]


def test_the_realistic_generator_is_deterministic_per_seed_and_as_documented() -> None:
    a = realistic.generate(7, 1000, 6000)
    assert a.equals(realistic.generate(7, 1000, 6000))
    assert not a.drop(["key"]).equals(realistic.generate(8, 1000, 6000).drop(["key"]))
    assert a.column("key").to_pylist() == list(range(1000, 6000))
    assert a.schema.names == ["key", *realistic.FEATURES]
    assert all(a.column(name).null_count == 0 for name in a.schema.names)
    col = {name: a.column(name).to_numpy(zero_copy_only=False) for name in realistic.FEATURES}
    assert col["age_bucket"].min() >= 0 and col["age_bucket"].max() <= 11
    assert col["tenure_days"].min() >= 1 and col["tenure_days"].max() <= 3650
    assert set(col["device"]) <= set(realistic._DEVICES)
    # Zipfian categories: the most common country is far more common than the median one.
    _, counts = np.unique(col["country"], return_counts=True)
    assert counts.max() > 10 * np.median(counts)
    lengths = np.array([len(v) for v in col["recent_items"]])
    assert lengths.max() <= 20 and 3 < lengths.mean() < 8
    clicks, impressions = col["clicks_7d"], col["impressions_7d"]
    assert 0.2 < np.mean(clicks == 0) < 0.5 and (impressions >= clicks).all()
    np.testing.assert_allclose(
        col["ctr_7d"], np.where(impressions > 0, clicks / np.maximum(impressions, 1), 0), rtol=1e-6
    )
    assert np.stack(col["emb"]).shape == (5000, realistic.EMB_DIM)


def _comparable(columns: dict) -> dict:
    """Lookup columns as plain lists: masked entries, absent lists and strings, and NaN
    (a float where the key is absent) all as None."""
    out = {}
    for name, values in columns.items():
        if values.dtype == object:
            out[name] = [v.tolist() if isinstance(v, np.ndarray) else v for v in values]
            continue
        listed = values.tolist()  # masked entries become None
        if values.dtype.kind == "f":
            absent = np.isnan(values).reshape(len(values), -1).all(axis=1)
            listed = [None if gone else v for v, gone in zip(listed, absent, strict=True)]
        out[name] = listed
    return out


def test_redis_and_kvstore_serve_the_same_realistic_rows(tmp_path: Path) -> None:
    from loadtests.servers import KvstoreNode, RedisServer
    from loadtests.systems import redis_key

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make bench installs it)")
    rows = 2000
    (tmp_path / "redis").mkdir()
    (tmp_path / "kv").mkdir()
    with RedisServer(tmp_path / "redis") as server:
        redis_system = realistic.RealisticRedisSystem(server)
        parquet = realistic.load_redis_and_parquet(redis_system, tmp_path / "r.parquet", SEED, rows)
        realistic.loaded_data_dir(
            tmp_path / "kv", parquet, rows, tmp_path, {"KVSTORE_BASE_FORMAT": "zstd"}
        )
        keys = np.array([5, rows + 3, 0, rows - 1, 977], dtype=np.int64)  # one absent
        with KvstoreNode(tmp_path / "kv") as node:
            kv_reader = realistic.RealisticKvstoreSystem(node.address, node.pid).reader()
            redis_reader = redis_system.reader()
            try:
                names = [redis_key(k) for k in keys.tolist()]
                from_kv = _comparable(kv_reader.lookup(keys, names))
                from_redis = _comparable(redis_reader.lookup(keys, names))
                one = _comparable(redis_reader.lookup(keys[:1], names[:1]))  # GET
            finally:
                kv_reader.close()
                redis_reader.close()
                redis_system.close()
    assert from_kv == from_redis
    assert from_kv["country"][1] is None and from_kv["age_bucket"][1] is None
    assert {name: values[:1] for name, values in from_kv.items()} == one
    expected = realistic.generate(SEED, 0, rows).to_pylist()
    assert from_kv["recent_items"][3] == expected[rows - 1]["recent_items"]


def test_the_ram_capped_run_measures_the_realistic_table_compressed(tmp_path: Path) -> None:
    """loadtests/memcap.py with the realistic table in the zstd format: the cap holds
    (page cache counted), and its files are the compressed ones (needs root and cgroups)."""
    from loadtests import memcap

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make bench installs it)")
    try:
        # 60k rows, not fewer: the cap allows a third of what the rows cost Redis above
        # the started node, and at 20k rows (~2 MiB) the node's own allocations during
        # the first lookups sometimes outgrew it (the cgroup's OOM killer, seen in runs).
        res = memcap.measure(
            rows=60_000,
            batch_sizes=[100],
            rounds=1,
            samples=10,
            seed=1,
            dists=("zipfian",),
            table="realistic",
            base_format="zstd",
        )
    except memcap.CgroupUnavailable as exc:
        pytest.skip(str(exc))
    assert (res["table"], res["base_format"]) == ("realistic", "zstd")
    capped = res["kvstore_capped_memory"]
    assert capped["cgroup_usage_bytes"] <= res["cap_bytes"]
    # The block cache, which a compressed format fills, is a share of the allowance.
    allowance = res["cap_bytes"] - res["kvstore_started_bytes"]
    block_cache = int(res["capped_env"]["KVSTORE_BLOCK_CACHE_BYTES"])
    assert block_cache == int(allowance * memcap.BLOCK_CACHE_SHARE)
    encoded, _ = realistic.encoded_rows(realistic.generate(1, 0, 60_000))
    assert res["kvstore_file_bytes"] < 0.85 * len(encoded)
    lat = res["latency"]["zipfian"]
    assert lat["kvstore capped"]["100"]["count"] == lat["redis-packed"]["100"]["count"] == 10
    assert "| realistic | zstd | zipfian | 100 |" in memcap.render_summary([res])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tables", "realistc"], "--tables takes random and/or realistic"),
        (["--formats", "lz4"], "--formats takes plain, block, zstd"),
    ],
)
def test_the_ram_capped_run_refuses_unknown_tables_and_formats(argv, message, capsys) -> None:
    from loadtests import memcap

    with pytest.raises(SystemExit) as exc:
        memcap.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
