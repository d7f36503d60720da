"""Bulk loads: Parquet / Arrow IPC files become a new table version, swapped in atomically.

Through real node processes: every happy path ends with the rows read back with
``client.get`` from the new version; every bad input ends with the version that was
current still serving the same rows, no new version, and no temporary file left.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import rocksdict
from helpers import FEATURES, expected, snapshot

from kvstore import Client, InvalidArgument, KvstoreError, TableNotFound
from kvstore import columns as kv_columns
from kvstore.config import BASE_FORMATS
from kvstore.errors import StorageFull
from kvstore.ingest import bulk_job, bulk_upload
from kvstore.ingest.bulk import LoadError, LoadSummary, load
from kvstore.ingest.bulk_input import BulkInput
from kvstore.ingest.bulk_sort import IntKeys, ShardSorter, StrKeys
from kvstore.schema import TableSchema
from kvstore.server.loads import FAULT_EXIT_AFTER_UPLOAD_CHUNKS, FAULT_EXIT_STATUS
from kvstore.storage.shard import Shard, base_options


@pytest.fixture(autouse=True)
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The loader's temporary directory, checked empty by the tests that fail loads."""
    path = tmp_path / "loader-tmp"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


@pytest.fixture
def table(client: Client, table_name: str, tmp_path: Path) -> str:
    """A table with version 1 loaded from keys 0..49."""
    client.create_table(table_name, key="int64", features=FEATURES, shards=4)
    pq.write_table(snapshot(list(range(50))), tmp_path / "v1.parquet")
    summary = load(client.address, table_name, str(tmp_path / "v1.parquet"), progress=False)
    assert summary.rows == 50
    return table_name


def read_all(client: Client, table: str, keys: list) -> tuple[list, int]:
    result = client.get(table, keys)
    return result.to_pylist(), result.version


# -- happy paths ---------------------------------------------------------------------


def test_parquet_file_becomes_the_current_version(
    client: Client, table_name: str, tmp_path: Path
) -> None:
    client.create_table(table_name, key="int64", features=FEATURES, shards=4)
    data = snapshot(list(range(-20, 180)))
    pq.write_table(data, tmp_path / "day.parquet", row_group_size=64)

    summary = load(
        client.address, table_name, str(tmp_path / "day.parquet"), label="day-1", progress=False
    )

    assert isinstance(summary, LoadSummary)
    assert (summary.table, summary.rows, summary.input_rows, summary.label) == (
        table_name,
        200,
        200,
        "day-1",
    )
    assert summary.shard_db_bytes > 0 and summary.input_bytes > 0 and summary.seconds > 0
    assert summary.to_json()["version"] == summary.version
    rows, version = read_all(client, table_name, [*range(-20, 180), 999])
    assert version == summary.version == client.describe_table(table_name).version
    assert rows == [*expected(data), None]
    (info,) = [v for v in client.versions(table_name) if v.current]
    assert (info.version, info.label, info.rows) == (summary.version, "day-1", 200)
    # The cold tier is written once: the version's files are all it got.
    assert summary.cold_bytes_written == info.bytes >= summary.shard_db_bytes
    assert summary.logical_bytes > 0
    assert summary.cold_write_amplification == round(
        summary.cold_bytes_written / summary.logical_bytes, 3
    )


def test_many_files_and_a_hive_partitioned_directory(
    client: Client, table_name: str, tmp_path: Path
) -> None:
    client.create_table(table_name, key="int64", features=FEATURES, shards=4)
    parts = [snapshot(list(range(i * 40, i * 40 + 40))) for i in range(3)]
    for i, part in enumerate(parts):
        pq.write_table(part, tmp_path / f"part-{i}.parquet")
    files = [str(tmp_path / f"part-{i}.parquet") for i in range(3)]
    summary = load(client.address, table_name, files, progress=False)
    assert summary.rows == 120 and summary.input_files == 3
    assert read_all(client, table_name, list(range(120)))[0] == expected(pa.concat_tables(parts))

    # dt=…/bucket=… directories: partition fields that are not features are ignored.
    root = tmp_path / "hive"
    for day, bucket in [("2026-11-22", 0), ("2026-11-23", 1)]:
        (root / f"dt={day}" / f"bucket={bucket}").mkdir(parents=True)
    second = [snapshot(list(range(0, 60)), salt=1), snapshot(list(range(60, 100)), salt=1)]
    pq.write_table(second[0], root / "dt=2026-11-22" / "bucket=0" / "a.parquet")
    pq.write_table(second[1], root / "dt=2026-11-23" / "bucket=1" / "b.parquet")
    (root / "_SUCCESS").write_text("")
    summary = load(client.address, table_name, str(root), progress=False)
    assert summary.rows == 100 and summary.version == client.describe_table(table_name).version
    rows, _ = read_all(client, table_name, list(range(120)))
    assert rows == [*expected(pa.concat_tables(second)), *[None] * 20]  # 100..119 are gone

    # Directories and files mixed in one list; keys 80..99 are in both, the file's win.
    summary = load(client.address, table_name, [str(root), files[2]], dedupe="last")
    assert (summary.rows, summary.input_rows, summary.input_files) == (120, 140, 3)
    rows, _ = read_all(client, table_name, [50, 80])
    assert [r["ctr"] for r in rows] == [50 / 4 + 1, 80 / 4]


def test_arrow_ipc_files_and_string_keys(client: Client, table_name: str, tmp_path: Path) -> None:
    client.create_table(table_name, key="string", features=FEATURES, shards=3)
    data = snapshot(list(range(90)))
    ids = pa.array([f"user-{k}-ü" for k in range(90)], pa.string())
    data = data.drop_columns(["key"]).append_column("user_id", ids)
    feather.write_feather(data.slice(0, 50), tmp_path / "a.arrow", chunksize=16)
    feather.write_feather(data.slice(50), tmp_path / "b.feather")

    summary = load(
        client.address,
        table_name,
        [str(tmp_path / "a.arrow"), str(tmp_path / "b.feather")],
        key_column="user_id",
        progress=False,
    )

    assert summary.rows == 90
    rows, version = read_all(client, table_name, [*ids.to_pylist(), "nobody"])
    assert version == summary.version
    assert rows == [*expected(data, "user_id"), None]


def test_create_derives_the_table_from_the_arrow_schema(
    client: Client, table_name: str, tmp_path: Path
) -> None:
    n = 30
    times = pa.array(np.arange(n, dtype=np.int64) * 1_000_000 + 1_700_000_000_000_000)
    data = pa.table(
        {
            "id": pa.array(range(n), pa.int32()),
            "small": pa.array(range(n), pa.int8()),
            "seen_at": times.cast(pa.timestamp("us", "UTC")),
            "ratio": pa.array(np.linspace(0, 1, n), pa.float64()),
            "half": pa.array(np.ones(n), pa.float32()),
            "country": pa.array(["fr", "jp", "fr"] * 10).dictionary_encode(),
            "vec": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * 3), pa.float64()), 3),
            "ids": pa.array([[1, 2]] * n, pa.list_(pa.int32())),
            "event_time": times,
        }
    )
    pq.write_table(data, tmp_path / "new.parquet")

    summary = load(
        client.address,
        table_name,
        str(tmp_path / "new.parquet"),
        key_column="id",
        create=True,
        shards=2,
        progress=False,
    )

    schema = client.describe_table(table_name).schema
    assert schema.key_type == "int64" and schema.shards == 2
    assert {f.name: f.dtype.name for f in schema.features} == {
        "small": "int32",
        "seen_at": "int64",
        "ratio": "float64",
        "half": "float32",
        "country": "string",
        "vec": "float32[3]",
        "ids": "int64[]",
    }
    assert summary.snapshot_time_us == times[-1].as_py()  # the newest event time
    result = client.get(table_name, [0, 29])
    assert result.event_times.tolist() == [times[0].as_py(), times[-1].as_py()]
    row = result.to_pylist()[1]
    assert row["seen_at"] == times[-1].as_py() and row["country"] == "fr"
    assert row["vec"] == [1.0, 1.0, 1.0] and row["ids"] == [1, 2]


def test_a_second_load_replaces_the_data_and_rollback_switches_back(
    client: Client, table: str, tmp_path: Path
) -> None:
    first_version = client.describe_table(table).version
    new = snapshot(list(range(30, 80)), salt=5)
    pq.write_table(new, tmp_path / "v2.parquet")

    summary = load(client.address, table, str(tmp_path / "v2.parquet"), progress=False)

    assert summary.version > first_version
    rows, version = read_all(client, table, list(range(80)))
    assert version == summary.version
    assert rows == [None] * 30 + expected(new)  # keys 0..29 are not in the new snapshot
    pinned = client.get(table, [0, 30], version=first_version)
    assert pinned.version == first_version and pinned.to_pylist()[0]["key"] == 0

    info = client.rollback(table)
    assert info.version == first_version and info.current
    rows, version = read_all(client, table, list(range(50)))
    assert version == first_version
    assert rows == expected(snapshot(list(range(50))))


def test_duplicate_keys_are_rejected_with_examples_or_deduped(
    client: Client, table: str, tmp_path: Path, temp_dir: Path
) -> None:
    a = snapshot([1, 2, 3, 4])
    b = snapshot([3, 5, 1], salt=100)
    pq.write_table(a, tmp_path / "a.parquet")
    pq.write_table(b, tmp_path / "b.parquet")
    files = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    before = read_all(client, table, list(range(50)))

    with pytest.raises(LoadError) as err:
        load(client.address, table, files, progress=False)
    message = str(err.value)
    assert "duplicate keys" in message and "key 1 at row 0" in message
    assert "b.parquet, row 2" in message and "dedupe='last'" in message
    assert read_all(client, table, list(range(50))) == before
    assert os.listdir(temp_dir) == []

    last = load(client.address, table, files, dedupe="last", progress=False)
    assert (last.rows, last.input_rows, last.duplicates_dropped) == (5, 7, 2)
    rows, _ = read_all(client, table, [1, 2, 3, 4, 5])
    assert [r["ctr"] for r in rows] == [100.25, 0.5, 100.75, 1.0, 101.25]

    load(client.address, table, files, dedupe="first", progress=False)
    rows, _ = read_all(client, table, [1, 2, 3, 4, 5])
    assert [r["ctr"] for r in rows] == [0.25, 0.5, 0.75, 1.0, 101.25]


def test_progress_bar_goes_to_stderr_when_asked_and_only_then(
    client: Client, table: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pq.write_table(snapshot(list(range(10))), tmp_path / "p.parquet")
    load(client.address, table, str(tmp_path / "p.parquet"), progress=True)
    err = capsys.readouterr().err
    assert f"{table}: read" in err and "row" in err
    # Not asked, or by default when stderr is not a terminal (captured here): no bar.
    for progress in (False, None):
        load(client.address, table, str(tmp_path / "p.parquet"), progress=progress)
        err = capsys.readouterr().err
        assert f"{table}: read" not in err and f"{table}: write" not in err, err


# -- bad input: the current version keeps serving, nothing half-built, no temp file --


def _column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name → (files, a part of the error message)."""
    good = snapshot(list(range(100, 140)))
    cases: dict[str, tuple[pa.Table | bytes, str]] = {
        "missing key column": (
            good.rename_columns(["id", *good.column_names[1:]]),
            "no key column 'key'",
        ),
        "null keys": (
            _column(
                good, "key", pa.array([*range(30), None, 31, None, *range(33, 40)], pa.int64())
            ),
            "null keys at row 70 (file",
        ),
        "wrong column type": (
            _column(good, "age", pa.array(["x"] * 40)),
            "column 'age': table '{table}' expects int32 (an integer type), found string",
        ),
        "embedding of wrong length": (
            _column(
                good, "emb", pa.array([[1.0, 2.0, 3.0, 4.0]] * 39 + [[1.0]], pa.list_(pa.float32()))
            ),
            "embeddings of the wrong length at row 79 (file",
        ),
        "fixed-size embedding of another dimension": (
            _column(
                good,
                "emb",
                pa.FixedSizeListArray.from_arrays(pa.array(np.ones(80), pa.float32()), 2),
            ),
            "expects float32[4]",
        ),
        "unknown column": (
            good.append_column("extra", pa.array([1] * 40)),
            "column(s) extra are not features",
        ),
        "missing feature": (good.drop_columns(["score"]), "no column for feature(s) score"),
        "int32 overflow": (
            _column(good, "age", pa.array([2**40] * 40, pa.int64())),
            "values that do not fit in int32 at row 40",
        ),
    }
    out = {}
    for name, (data, needle) in cases.items():
        path = tmp / f"{name.replace(' ', '_')}.parquet"
        pq.write_table(snapshot(list(range(40))), tmp / "first.parquet")
        pq.write_table(data, path)
        out[name] = ([str(tmp / "first.parquet"), str(path)], needle)
    whole = tmp / "whole.parquet"
    pq.write_table(good, whole)
    raw = whole.read_bytes()
    (tmp / "truncated.parquet").write_bytes(raw[: len(raw) // 2])
    out["truncated parquet"] = (
        [str(whole), str(tmp / "truncated.parquet")],
        "truncated.parquet: not a readable parquet file",
    )
    (tmp / "garbage.parquet").write_bytes(os.urandom(4096))
    out["corrupt parquet"] = ([str(tmp / "garbage.parquet")], "garbage.parquet")
    pq.write_table(good.slice(0, 0), tmp / "empty.parquet")
    out["empty input"] = ([str(tmp / "empty.parquet")], "no rows")
    (tmp / "empty-dir").mkdir()
    out["empty directory"] = ([str(tmp / "empty-dir")], "the input is empty")
    return out


BAD_INPUTS = [
    "missing_key_column",
    "null_keys",
    "wrong_column_type",
    "embedding_of_wrong_length",
    "fixed-size_embedding_of_another_dimension",
    "unknown_column",
    "missing_feature",
    "int32_overflow",
    "truncated_parquet",
    "corrupt_parquet",
    "empty_input",
    "empty_directory",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_rejected_and_the_current_version_keeps_serving(
    client: Client, table: str, tmp_path: Path, temp_dir: Path, case: str
) -> None:
    (tmp_path / "in").mkdir()
    files, needle = _bad_inputs(tmp_path / "in")[case.replace("_", " ")]
    versions = client.versions(table)
    before = read_all(client, table, list(range(60)))

    with pytest.raises(LoadError) as err:
        load(client.address, table, files if len(files) > 1 else files[0], progress=False)

    assert needle.format(table=table) in str(err.value)
    assert isinstance(err.value, InvalidArgument)
    assert read_all(client, table, list(range(60))) == before
    assert client.versions(table) == versions
    assert os.listdir(temp_dir) == []


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "256k") mounted at ``path`` for the block; skips the
    test where mounting needs root."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_a_full_temporary_disk_is_a_clear_error(
    client: Client, table: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _small_tmpfs(tmp_path / "tiny", "256k") as tiny:
        monkeypatch.setattr(tempfile, "tempdir", str(tiny))
        pq.write_table(snapshot(list(range(20_000))), tmp_path / "big.parquet")
        before = read_all(client, table, list(range(50)))
        with pytest.raises(StorageFull, match=r"temporary directory .* is full"):
            load(client.address, table, str(tmp_path / "big.parquet"), progress=False)
        assert read_all(client, table, list(range(50))) == before
        assert os.listdir(tiny) == []


def test_a_full_disk_on_the_node_is_a_clear_error_and_the_old_version_serves(
    start_node, tmp_path: Path
) -> None:
    with _small_tmpfs(tmp_path / "cold", "2m") as cold:
        node = start_node("--cold-dir", str(cold))
        try:
            with Client(node.address) as c:
                c.create_table("full", key="int64", features=FEATURES, shards=2)
                pq.write_table(snapshot(list(range(50))), tmp_path / "small.parquet")
                first = load(node.address, "full", str(tmp_path / "small.parquet"), progress=False)
                before = read_all(c, "full", list(range(50)))
                pq.write_table(snapshot(list(range(40_000)), salt=1), tmp_path / "big.parquet")
                # Depending on where the space runs out: staging the upload, or opening it.
                with pytest.raises(StorageFull, match=r"the node's disk is full at "):
                    load(node.address, "full", str(tmp_path / "big.parquet"), progress=False)
                assert read_all(c, "full", list(range(50))) == before
                assert [v.version for v in c.versions("full") if v.current] == [first.version]
                assert os.listdir(cold / "staging") == []
        finally:
            node.stop()  # before the unmount: the node holds files there


def test_a_missing_table_needs_create(client: Client, table_name: str, tmp_path: Path) -> None:
    pq.write_table(snapshot([1]), tmp_path / "x.parquet")
    with pytest.raises(TableNotFound, match="create=True"):
        load(client.address, table_name, str(tmp_path / "x.parquet"), progress=False)


def test_create_is_undone_when_the_load_fails(
    client: Client, table_name: str, tmp_path: Path
) -> None:
    pq.write_table(snapshot([1, 1]), tmp_path / "dup.parquet")
    with pytest.raises(LoadError, match="duplicate keys"):
        load(client.address, table_name, str(tmp_path / "dup.parquet"), create=True, progress=False)
    with pytest.raises(TableNotFound):
        client.describe_table(table_name)


def test_the_node_dying_mid_upload_fails_cleanly_and_a_retry_succeeds(
    start_node, tmp_path: Path, temp_dir: Path
) -> None:
    node = start_node()
    with Client(node.address, timeout=10) as c:
        c.create_table("t", key="int64", features=FEATURES, shards=4)
    pq.write_table(snapshot(list(range(50))), tmp_path / "v1.parquet")
    first = load(node.address, "t", str(tmp_path / "v1.parquet"), progress=False)
    pq.write_table(snapshot(list(range(2000)), salt=9), tmp_path / "v2.parquet")
    assert node.stop() == 0

    # The node's fault hook: it exits, as a crash would, on the third chunk it receives.
    node = start_node(data_dir=node.data_dir, env={FAULT_EXIT_AFTER_UPLOAD_CHUNKS: "3"})
    with pytest.raises(KvstoreError, match="unavailable"):
        load(node.address, "t", str(tmp_path / "v2.parquet"), progress=False, timeout=10)
    assert node.proc.wait(10) == FAULT_EXIT_STATUS, node.output()
    assert "exiting on upload chunk 3" in node.output()
    assert os.listdir(temp_dir) == []

    node = start_node(data_dir=node.data_dir)
    with Client(node.address, timeout=10) as c:
        assert [v.version for v in c.versions("t") if v.current] == [first.version]
        assert read_all(c, "t", list(range(50))) == (
            expected(snapshot(list(range(50)))),
            first.version,
        )
        retry = load(node.address, "t", str(tmp_path / "v2.parquet"), progress=False)
        assert retry.rows == 2000 and retry.version > first.version
        assert read_all(c, "t", [1999])[0][0]["ctr"] == 1999 / 4 + 9


def test_two_loads_of_one_table_do_not_interleave(
    client: Client, table: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pq.write_table(snapshot(list(range(10)), salt=1), tmp_path / "a.parquet")
    pq.write_table(snapshot(list(range(10)), salt=2), tmp_path / "b.parquet")
    begin = bulk_upload.LoadSession.begin
    second: list[BaseException] = []

    def begin_then_race(self, *args):
        begin(self, *args)
        if not second:  # while the first load is open, a second one starts
            monkeypatch.setattr(bulk_upload.LoadSession, "begin", begin)
            try:
                load(client.address, table, str(tmp_path / "b.parquet"), progress=False)
            except KvstoreError as exc:
                second.append(exc)

    monkeypatch.setattr(bulk_upload.LoadSession, "begin", begin_then_race)
    summary = load(client.address, table, str(tmp_path / "a.parquet"), progress=False)

    assert len(second) == 1 and "one load per table" in str(second[0])
    rows, version = read_all(client, table, list(range(10)))
    assert version == summary.version
    assert rows == expected(snapshot(list(range(10)), salt=1))


# -- unit level: the shard databases themselves ----------------------------------------


@pytest.mark.parametrize("table_format", BASE_FORMATS)
@pytest.mark.parametrize("key_type", ["int64", "string"])
@pytest.mark.parametrize("run_bytes", [1 << 30, 20_000], ids=["in-memory", "spilled-runs"])
def test_shard_databases_hold_the_rows_byte_identical(
    tmp_path: Path, key_type: str, run_bytes: int, table_format: str
) -> None:
    n = 3000
    rng = np.random.default_rng(7)
    ints = rng.permutation(np.arange(-n, n, 2, dtype=np.int64))
    keys = pa.array(ints) if key_type == "int64" else pa.array([f"k{k}" for k in ints])
    data = snapshot(list(range(n))).set_column(0, "key", keys)
    data = data.append_column("event_time", pa.array(rng.integers(1, 10**15, n)))
    # The same key at the end again, in the last run: dedupe="last" keeps that one.
    again = _column(data.slice(5, 1), "ctr", pa.array([9.5], pa.float32()))
    data = pa.concat_tables([data, again])
    pq.write_table(data, tmp_path / "in.parquet", row_group_size=700)
    schema = TableSchema.build("t", key_type, FEATURES, shards=3, schema_id=42)

    job = bulk_job.LoadJob(
        BulkInput(str(tmp_path / "in.parquet"), None),
        schema,
        "key",
        "event_time",
        "last",
        None,
        64 << 20,
    )
    job.batch_rows = 500
    ops = IntKeys if key_type == "int64" else StrKeys
    sorter = ShardSorter(3, ops, str(tmp_path), run_bytes, 50_000, "last")
    job.read(sorter, show=False)
    assert (sorter.spilled_runs > 1) == (run_bytes < 1 << 20)
    files: list[tuple[int, str]] = []
    rows_per_shard, _ = job.write(
        sorter,
        str(tmp_path),
        lambda s, _n, p, _z: files.append((s, p)),
        lambda: None,
        False,
        table_format,
    )
    assert sum(rows_per_shard) == n and sorter.dropped == 1

    last = data.slice(0, n).to_pylist()
    last[5] = data.slice(n).to_pylist()[0]
    want = kv_columns.encode_rows(
        schema,
        pa.Table.from_pylist(last, schema=data.schema).drop_columns(["event_time"]),
        event_time=np.array([r["event_time"] for r in last], np.int64),
    )
    want_rows = dict(
        zip(want.keys.encoded(), kv_columns._codec.split_rows(want.rows, want.offsets), strict=True)
    )
    want_shard = dict(zip(want.keys.encoded(), want.keys.shard_ids(3).tolist(), strict=True))
    options = base_options(table_format, rocksdict.Cache(1 << 20))
    got: dict[bytes, bytes] = {}
    for shard in range(3):
        # What the node does at commit: the shipped files alone, in a directory, opened.
        db_dir = tmp_path / f"db{shard}"
        db_dir.mkdir()
        for _, path in (f for f in files if f[0] == shard):
            os.rename(path, db_dir / os.path.basename(path))
        opened = Shard(db_dir, shard, options, base=True)
        keys = [k for k, s in want_shard.items() if s == shard]
        assert opened.estimate_keys() == len(keys) == rows_per_shard[shard]
        got.update(zip(keys, opened.multi_get(keys), strict=True))
        opened.close()
    assert got == want_rows
    assert job.snapshot_time() == int(data["event_time"].to_numpy().max())


def test_bad_arguments_are_named() -> None:
    with pytest.raises(InvalidArgument, match="dedupe"):
        load("127.0.0.1:1", "t", "x.parquet", dedupe="newest")
    with pytest.raises(LoadError, match="format 'csv'"):
        load("127.0.0.1:1", "t", "x.parquet", format="csv")
