"""A delta shard's rows kept in memory (``kvstore.storage.delta_memory``, the node's
``--delta-memory-mb``) change how fast online rows are read, never what a read
answers: the copy follows every write and delete, is dropped past its limit, comes
back when the rows fit again, and is made from the files when the node starts."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import rocksdict
from helpers import SMALL_FEATURES as FEATURES
from helpers import answers_of, small_version
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import Client
from kvstore._codec import DeltaRows
from kvstore.storage.delta_memory import ENTRY_OVERHEAD_BYTES, DeltaMemory
from kvstore.storage.shard import Shard, delta_options

HOUR_US = 3600 * 1_000_000


def _shard(path: Path, limit: int) -> Shard:
    return Shard(path, 0, delta_options(rocksdict.Cache(8 << 20)), memory_bytes=limit)


def _from_rocksdb(shard: Shard, keys: list[bytes]) -> list[bytes | None]:
    """What RocksDB itself answers, the in-memory copy set aside."""
    memory, shard.memory = shard.memory, None
    try:
        return shard.multi_get(keys)
    finally:
        shard.memory = memory


def _random_writes(shard: Shard, rng: np.random.Generator, writes: int) -> list[bytes]:
    """Puts (some keys twice in one batch) and deletes over 400 keys; all the keys."""
    keys = [int(k).to_bytes(8, "little") for k in range(400)]
    for _ in range(writes):
        chosen = rng.choice(400, 60).tolist()  # with repeats: a key put twice
        puts = [
            (keys[k], bytes(rng.integers(0, 256, rng.integers(0, 90)).tolist())) for k in chosen
        ]
        deletes = [keys[k] for k in rng.choice(400, 15, replace=False).tolist()]
        shard.write(puts, deletes)
    return keys


def _counted_bytes(shard: Shard) -> int:
    assert shard.memory is not None
    return sum(len(v) + ENTRY_OVERHEAD_BYTES for v in shard.memory.rows.values())


def test_the_copy_answers_as_rocksdb_after_puts_and_deletes(tmp_path: Path) -> None:
    shard = _shard(tmp_path / "d", 1 << 20)
    try:
        assert shard.memory is not None and shard.empty
        keys = _random_writes(shard, np.random.default_rng(1), 40)
        assert shard.memory is not None  # still within its limit
        got = shard.multi_get([*keys, b"absent"])
        assert got == _from_rocksdb(shard, [*keys, b"absent"])
        assert 100 < sum(v is not None for v in got) < 400  # puts and deletes both left a mark
        assert shard.memory.bytes == _counted_bytes(shard)
    finally:
        shard.close()


def test_the_copy_is_dropped_past_its_limit_and_made_again_when_the_rows_fit(
    tmp_path: Path,
) -> None:
    shard = _shard(tmp_path / "d", 20 * (ENTRY_OVERHEAD_BYTES + 50))
    try:
        shard.write([(b"k%03d" % i, b"v" * 50) for i in range(15)])
        assert shard.memory is not None and len(shard.memory.rows) == 15
        shard.write([(b"k%03d" % i, b"w" * 50) for i in range(15, 30)])
        assert shard.memory is None  # 30 rows do not fit: RocksDB alone from now
        keys = [b"k%03d" % i for i in range(31)]
        assert shard.multi_get(keys) == [b"v" * 50] * 15 + [b"w" * 50] * 15 + [None]
        # A compaction deletes most rows: the rest fit again.
        shard.write([], keys[5:])
        shard.recheck_empty()
        assert shard.memory is not None and not shard.empty
        assert shard.multi_get(keys) == [b"v" * 50] * 5 + [None] * 26
        assert shard.memory.bytes == _counted_bytes(shard)
    finally:
        shard.close()


def test_a_copy_that_fails_half_way_through_a_write_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RocksDB took the batch, then the copy ran out of memory after its first put: reads
    must come from RocksDB alone, never from a copy holding half the batch."""
    shard = _shard(tmp_path / "d", 1 << 20)
    try:
        shard.write([(b"a", b"1"), (b"b", b"1")])
        apply = DeltaMemory.apply

        def out_of_memory(self, puts, deletes, name):
            apply(self, puts[:1], [], name)
            raise MemoryError

        monkeypatch.setattr(DeltaMemory, "apply", out_of_memory)
        with pytest.raises(MemoryError):
            shard.write([(b"a", b"2"), (b"b", b"2")], [b"c"])
        assert shard.memory is None
        assert shard.multi_get([b"a", b"b"]) == [b"2", b"2"]
    finally:
        shard.close()


def test_the_copy_is_made_from_the_files_when_the_shard_opens(tmp_path: Path) -> None:
    shard = _shard(tmp_path / "d", 1 << 20)
    keys = _random_writes(shard, np.random.default_rng(2), 20)
    shard.flush()  # some rows in table files, some in the memtable
    _random_writes(shard, np.random.default_rng(3), 5)
    expect = shard.multi_get(keys)
    shard.close()
    for limit, kept in ((1 << 20, True), (2000, False)):
        again = _shard(tmp_path / "d", limit)
        try:
            assert (again.memory is not None) is kept
            assert again.multi_get(keys) == expect
            if kept:
                assert again.memory.bytes == _counted_bytes(again)  # type: ignore[union-attr]
        finally:
            again.close()


def _online_writes(client: Client, tmp_path: Path, now: int) -> None:
    """Updates of bulk rows, whole rows only the delta holds (some with an expired
    feature), deletes of all three kinds, a version swap and writes after it."""
    client.create_table("t", key="int64", features=FEATURES, shards=4, ttl={"x": 3600})
    client.load(
        "t",
        small_version(tmp_path / "v1.parquet", range(300), 0),
        progress=False,
        snapshot_time_us=now - 3 * HOUR_US,
    )
    updated = list(range(0, 300, 3))
    client.write("t", {"key": updated, "a": [-k for k in updated]})
    fresh = list(range(1000, 1400))
    client.write("t", {"key": fresh, "a": fresh, "s": [f"n{k}" for k in fresh], "x": [1.5] * 400})
    stale = list(range(1400, 1450))
    client.write(
        "t",
        {"key": stale, "a": stale, "s": ["old"] * 50, "x": [2.5] * 50},
        event_time=now - 2 * HOUR_US,
    )
    client.delete("t", [5, 6, 9, 1003, 1401])


def test_nodes_answer_the_same_with_the_copy_off_on_and_outgrown(
    start_node, tmp_path: Path
) -> None:
    # A few KiB a table: the copy of the third node is dropped during the writes.
    settings = {"off": ("--delta-memory-mb", "0"), "on": (), "outgrown": ()}
    env = {"outgrown": {"KVSTORE_DELTA_MEMORY_BYTES": "16384"}}
    nodes = {
        name: start_node(*args, data_dir=tmp_path / name, env=env.get(name))
        for name, args in settings.items()
    }
    now = int(time.time() * 1e6)
    keys = [*range(-5, 300), *range(995, 1455), 2000]

    def answers() -> dict[str, list]:
        return answers_of(nodes, "t", keys)

    for name, node in nodes.items():
        with Client(node.address) as client:
            _online_writes(client, tmp_path / name, now)
    first = answers()
    # The copies were in use, and the small one was dropped (the nodes log that).
    assert "RocksDB alone" in nodes["outgrown"].log_tail()
    assert "RocksDB alone" not in nodes["on"].log_tail()
    assert first["on"] == first["off"] == first["outgrown"]
    assert first["on"][keys.index(0)]["a"] == 0 and first["on"][keys.index(3)]["a"] == -3
    assert first["on"][keys.index(5)] is None and first["on"][keys.index(1000)]["s"] == "n1000"
    # After a version swap (the delta compacted) and writes over the new version.
    for name, node in nodes.items():
        with Client(node.address) as client:
            client.load(
                "t",
                small_version(tmp_path / name / "v2.parquet", range(100, 400), 7),
                progress=False,
            )
            client.write("t", {"key": [150, 2000], "s": ["late", "late"]})
            client.delete("t", [151])
    second = answers()
    assert second["on"] == second["off"] == second["outgrown"]
    assert second["on"][keys.index(150)]["s"] == "late" and second["on"][keys.index(151)] is None
    # A restart makes the copy from the files.
    for name in nodes:
        nodes[name].stop()
        nodes[name] = start_node(*settings[name], data_dir=tmp_path / name, env=env.get(name))
    assert answers() == second


_KEYS = st.one_of(
    st.integers(0, 40).map(lambda k: k.to_bytes(8, "little")),  # int64 keys: kept in the slot
    st.binary(max_size=12),  # string keys, 8 bytes long too, and the empty key
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("put"), st.lists(st.tuples(_KEYS, st.binary(max_size=20)))),
            st.tuples(st.just("delete"), st.lists(_KEYS)),
        ),
        max_size=30,
    )
)
def test_the_hash_table_maps_keys_as_a_dict_does(ops: list) -> None:
    """``DeltaRows`` (open addressing, rows moved back on delete) against a dict: the
    same values, length, items and counted bytes after any puts and deletes."""
    rows, oracle, counted = DeltaRows(), {}, 0
    for kind, arg in ops:
        if kind == "put":
            counted += rows.apply(arg, (), ENTRY_OVERHEAD_BYTES)
            oracle.update(arg)
        else:
            counted += rows.apply([], arg, ENTRY_OVERHEAD_BYTES)
            for key in arg:
                oracle.pop(key, None)
        probe = [*oracle, b"", b"\0" * 8, (99).to_bytes(8, "little"), b"absent-key"]
        assert rows.get_many(probe) == [oracle.get(k) for k in probe]
        assert [rows.get(k) for k in probe] == [oracle.get(k) for k in probe]
        assert len(rows) == len(oracle)
        assert sorted(rows.items()) == sorted(oracle.items())
        assert counted == sum(len(v) + ENTRY_OVERHEAD_BYTES for v in oracle.values())


def test_the_hash_table_refuses_what_is_not_bytes() -> None:
    rows = DeltaRows()
    with pytest.raises(TypeError):
        rows.get_many(["k"])
    with pytest.raises(TypeError):
        rows.apply([("k", b"v")], (), 0)
    assert len(rows) == 0
