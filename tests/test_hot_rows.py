"""The node's hot-row cache (``--hot-rows-mb``): recent answers kept by table version
and key, and the fast read path's answers from it in C. A node with the cache answers
exactly what a node without it answers, whatever changes a key: writes, deletes, TTL
expiry, loads, rollbacks, a table dropped and made again.

(Not RocksDB's row cache, ``--row-cache-mb``: that one is tests/test_row_cache.py.)
"""

from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import SMALL_FEATURES as FEATURES
from helpers import check_ttl_expiry, reads_alike_through_random_changes

from kvstore import Client
from kvstore import _codec as codec
from kvstore.columns import encode_rows
from kvstore.config import NodeConfig
from kvstore.keys import KeyBatch
from kvstore.schema import TableSchema
from kvstore.server.hot_rows import HotRowCache, TableRows
from kvstore.server.node import Node, run_steps
from kvstore.server.servicer import get_response
from kvstore.server.stats import StatsByTable
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.wire.frames import RESPONSE_HEADER, STATUS_OK

MiB = 1 << 20


# -- the cache itself ----------------------------------------------------------------------


def _store(cache, prefix, keys, rows, lo=-(2**63), hi=2**63 - 1, admit=False):
    out = [None] * len(keys)
    valid = np.array([lo, hi] * len(keys), np.int64)
    cache.store_groups(prefix, [(0, keys)], rows, valid, out, list(range(len(keys))), admit)
    return out


def _lookup(cache, prefix, keys, now_us):
    """(rows, misses): each key's cached row and the positions of those not cached."""
    rows, _, misses = cache.lookup_groups(prefix, [(0, keys)], now_us)
    return rows, misses


def test_the_cache_is_bounded_in_bytes_and_drops_the_least_recently_used():
    entry = codec.HOT_ENTRY_BYTES + 16 + 100  # prefix + key, row
    cache = codec.HotRows(10 * entry)
    keys = [b"k%07d" % i for i in range(12)]
    _store(cache, b"p" * 8, keys[:10], [bytes(100)] * 10)
    assert len(cache) == 10 and cache.used == 10 * entry
    _lookup(cache, b"p" * 8, [keys[0]], 0)  # k0 is now the most recently used
    _store(cache, b"p" * 8, keys[10:], [bytes(100)] * 2)
    assert cache.used <= cache.capacity and cache.evictions == 2
    _, misses = _lookup(cache, b"p" * 8, keys, 0)
    assert misses == [1, 2]  # the two least recently used went; k0 stayed
    # Full: with admit, a key goes in on its second miss only (the doorkeeper).
    _store(cache, b"p" * 8, [b"new"], [bytes(100)], admit=True)
    assert _lookup(cache, b"p" * 8, [b"new"], 0)[1] == [0] and cache.refused == 1
    _store(cache, b"p" * 8, [b"new"], [bytes(100)], admit=True)
    assert _lookup(cache, b"p" * 8, [b"new"], 0)[1] == []
    _store(cache, b"p" * 8, [b"huge"], [bytes(20 * entry)])  # larger than the cache
    assert _lookup(cache, b"p" * 8, [b"huge"], 0)[1] == [0]


def test_an_entry_holds_only_inside_its_window_and_writes_forget_keys():
    cache = codec.HotRows(1 * MiB)
    _store(cache, b"a" * 8, [b"k1", b"k2"], [b"row1", None], lo=100, hi=200)
    _store(cache, b"b" * 8, [b"k1"], [b"other"])
    assert _lookup(cache, b"a" * 8, [b"k1", b"k2"], 150) == ([b"row1", None], [])
    assert _lookup(cache, b"a" * 8, [b"k1"], 201) == ([None], [0])  # expired: dropped
    assert _lookup(cache, b"a" * 8, [b"k2"], 99) == ([None], [0])
    cache.discard([b"a" * 8, b"b" * 8], [(b"k1", b"new")], ())
    assert _lookup(cache, b"b" * 8, [b"k1"], 0) == ([None], [0])
    assert len(cache) == 0 and cache.used == 0


def test_a_cache_that_keeps_missing_is_skipped_but_for_samples_until_it_hits_again():
    cache = codec.HotRows(1 * MiB)
    keys = [b"k%07d" % i for i in range(codec.HOT_WINDOW_KEYS)]
    assert not cache.cold and all(cache.use() for _ in range(100))
    _lookup(cache, b"p" * 8, keys, 0)  # a whole window of misses
    assert cache.cold
    assert sum(cache.use() for _ in range(160)) == 10  # 1 read in 16
    hot = keys[:16]
    _store(cache, b"p" * 8, hot, [b"row"] * 16)
    for _ in range(codec.HOT_WINDOW_KEYS // 16 // 16):
        _lookup(cache, b"p" * 8, hot, 0)  # the sampled reads hit: warm again
    assert not cache.cold


# -- a node in-process: every path that changes an answer ---------------------------------


def _node(path: Path, hot_rows_bytes: int) -> Node:
    config = NodeConfig(data_dir=path, hot_rows_bytes=hot_rows_bytes)
    config.load()
    node = Node(config)
    node.open()
    return node


@pytest.fixture
def nodes(tmp_path: Path):
    """A node with the cache and one without, on their own data."""
    pair = (_node(tmp_path / "hot", 4 * MiB), _node(tmp_path / "cold", 0))
    yield pair
    for node in pair:
        node.close()


def _answers(node: Node, name: str, keys: list[int], version: int = 0) -> list[bytes | None]:
    """Each key's row (None = missing), in request order."""
    answer = node.get(name, KeyBatch("int64", ints=np.array(keys, np.int64)), [], version)
    ends = np.cumsum(np.maximum(answer.lengths, 0))
    rows = [
        None if length < 0 else answer.values[end - length : end]
        for length, end in zip(answer.lengths.tolist(), ends.tolist(), strict=True)
    ]
    out: list[bytes | None] = [None] * len(keys)
    for i, row in enumerate(rows):
        out[int(answer.order[i]) if answer.order is not None else i] = row
    return out


def _write(node: Node, name: str, keys: list[int], a: list[int], when: int) -> None:
    schema = node.table(name).schema
    rows = encode_rows(schema, {"key": np.array(keys, np.int64), "a": a}, event_time=when)
    run_steps(
        node.write_steps(name, schema.schema_id, rows.keys, rows.rows, rows.offsets, rows.features)
    )


def _delete(node: Node, name: str, keys: list[int], when: int) -> None:
    run_steps(node.delete_steps(name, KeyBatch("int64", ints=np.array(keys, np.int64)), when))


def test_random_writes_deletes_and_reads_answer_as_without_the_cache(nodes) -> None:
    schema = TableSchema.build("t", "int64", FEATURES, shards=4)
    for node in nodes:
        node.create_table(schema)
    rng = random.Random(17)
    now = int(time.time() * 1e6)
    for step in range(400):
        keys = [rng.randrange(40) for _ in range(rng.choice((1, 1, 3, 10)))]
        op = rng.random()
        when = now + step * 10 + rng.randrange(-30, 30)  # some writes arrive late
        value = rng.randrange(99)
        for node in nodes:
            if op < 0.3:
                _write(node, "t", sorted(set(keys)), [value] * len(set(keys)), when)
            elif op < 0.4:
                _delete(node, "t", keys, when)
        if op >= 0.4:
            assert _answers(nodes[0], "t", keys) == _answers(nodes[1], "t", keys), step
    hot = nodes[0].reads.hot
    assert hot is not None and hot.rows.hits > 0 and hot.rows.discarded > 0


def test_compaction_after_a_swap_and_a_dropped_table_answer_as_without_the_cache(
    nodes,
) -> None:
    schema = TableSchema.build("t", "int64", FEATURES, shards=2)
    for node in nodes:
        node.create_table(schema)
        _write(node, "t", [1, 2, 3], [10, 20, 30], 1_000)
    keys = [1, 2, 3, 4]
    assert _answers(nodes[0], "t", keys) == _answers(nodes[1], "t", keys)
    assert _answers(nodes[0], "t", keys) == _answers(nodes[1], "t", keys)  # from the cache
    for node in nodes:
        node.compact_delta("t")  # no version: nothing to drop, answers unchanged
        _delete(node, "t", [2], 2_000)
    assert _answers(nodes[0], "t", keys) == _answers(nodes[1], "t", keys)
    # Dropped and made again with other features: nothing of the old table is served.
    other = TableSchema.build("t", "int64", {"a": "int64"}, shards=2)
    for node in nodes:
        node.drop_table("t")
        node.create_table(other)
    assert _answers(nodes[0], "t", keys) == _answers(nodes[1], "t", keys) == [None] * 4
    for node in nodes:
        _write(node, "t", [1], [5], 3_000)
    assert _answers(nodes[0], "t", keys) == _answers(nodes[1], "t", keys)
    assert _answers(nodes[0], "t", keys)[0] is not None


def test_a_table_view_forgets_the_prefixes_of_versions_the_table_no_longer_keeps() -> None:
    class _Table:  # what TableRows reads of a Table
        delta: list = []
        versions = {1: None, 2: None}
        current = 2

    table = _Table()
    rows = TableRows(HotRowCache(MiB, StatsByTable(), 100), table)  # type: ignore[arg-type]
    bases = [object() for _ in range(4)]
    p1, p2 = rows.prefix(1, bases[1]), rows.prefix(2, bases[2])
    assert rows.prefix(1, bases[1]) == p1 and len({p1, p2}) == 2
    # A load makes version 3 current and drops version 1: every delta write would
    # otherwise go on discarding its keys under version 1's prefix.
    table.versions = {2: None, 3: None}
    table.current = 3
    p3 = rows.prefix(3, bases[3])
    assert sorted(rows.prefixes()) == sorted([p2, p3])
    # A dropped version read again (pinned while it was dropped) gets a new prefix.
    assert rows.prefix(1, bases[1]) not in (p1, p2, p3)


# -- the fast path's answers in C ------------------------------------------------------


def _frame(cache, request: pb.GetRequest, tables: dict) -> pb.GetResponse | None:
    frame = cache.answer_frame(request.SerializeToString(), 9, tables)
    if frame is None:
        return None
    length, request_id, status = RESPONSE_HEADER.unpack_from(frame)
    assert (request_id, status, len(frame)) == (9, STATUS_OK, RESPONSE_HEADER.size + length)
    return pb.GetResponse.FromString(frame[RESPONSE_HEADER.size :])


def _in_order(response: pb.GetResponse) -> list[bytes | None]:
    lengths = np.frombuffer(response.lengths, "<i4")
    order = np.frombuffer(response.order, "<i4") if response.order else np.arange(len(lengths))
    out: list[bytes | None] = [None] * len(lengths)
    at = 0
    for i, length in enumerate(lengths.tolist()):
        if length >= 0:
            out[int(order[i])] = response.values[at : at + length]
            at += length
    return out


def test_the_fast_path_answers_cached_keys_in_c_as_the_full_path_does(nodes) -> None:
    node = nodes[0]
    node.create_table(TableSchema.build("t", "int64", FEATURES, shards=4))
    _write(node, "t", list(range(20)), list(range(20)), 1_000)
    cache = node.reads.hot.rows  # type: ignore[union-attr]
    keys = pb.Keys(count=5, int64_le=np.array([3, 1, 30, 3, 7], "<i8").tobytes())
    request = pb.GetRequest(table="t", keys=keys, features=["s", "a"])
    assert _frame(cache, request, node.tables) is None  # nothing cached yet
    full = get_response(node, request)  # the full path caches the keys (there is room)
    fast = _frame(cache, request, node.tables)
    assert fast is not None
    assert (fast.schema_id, fast.version) == (full.schema_id, full.version)
    assert _in_order(fast) == _in_order(full)
    assert _in_order(fast)[2] is None  # key 30 is missing, and that is cached too
    # What the full path must answer (errors) or may answer otherwise goes there.
    for other in (
        pb.GetRequest(table="t", keys=keys, features=["nope"]),
        pb.GetRequest(table="t", keys=keys, version=5),
        pb.GetRequest(table="u", keys=keys),
        pb.GetRequest(table="t", keys=pb.Keys(count=6, int64_le=keys.int64_le)),
        pb.GetRequest(table="t", keys=pb.Keys(count=1, int64_le=struct.pack("<q", 99))),
    ):
        assert _frame(cache, other, node.tables) is None, other
    # A write of one of the keys: that key is no longer cached.
    _write(node, "t", [7], [70], 2_000)
    assert _frame(cache, request, node.tables) is None
    get_response(node, request)  # key 7 cached again
    assert _in_order(_frame(cache, request, node.tables)) == _in_order(  # type: ignore[arg-type]
        get_response(node, request)
    )
    # A dropped table is not answered, even with its entries still cached.
    node.drop_table("t")
    assert _frame(cache, request, node.tables) is None


def test_the_fast_path_parser_answers_any_bytes_as_the_full_path_or_not_at_all(nodes) -> None:
    """The request body comes off the network: cut short or with any byte changed, it
    gets no frame (the full path answers it, errors included) or the full path's rows."""
    node = nodes[0]
    node.create_table(TableSchema.build("t", "int64", FEATURES, shards=4))
    _write(node, "t", list(range(8)), list(range(8)), 1_000)
    cache = node.reads.hot.rows  # type: ignore[union-attr]
    keys = pb.Keys(count=3, int64_le=np.array([1, 2, 3], "<i8").tobytes())
    body = pb.GetRequest(table="t", keys=keys, features=["a"]).SerializeToString()
    get_response(node, pb.GetRequest.FromString(body))  # caches keys 1-3
    rng = random.Random(3)
    bodies = [body[:i] for i in range(len(body))]
    for _ in range(400):
        changed = bytearray(body)
        for _ in range(rng.choice((1, 1, 2))):
            changed[rng.randrange(len(changed))] = rng.randrange(256)
        bodies.append(bytes(changed))
    bodies += [body.replace(b"t", b"\xff", 1), body + b"\x08", body + b"\x80" * 11]
    answered = 0
    for other in bodies:
        frame = cache.answer_frame(b"xx" + other, 9, node.tables, 2)
        if frame is None:
            continue
        answered += 1
        full = get_response(node, pb.GetRequest.FromString(other))
        fast = pb.GetResponse.FromString(frame[RESPONSE_HEADER.size :])
        assert _in_order(fast) == _in_order(full), other
    assert answered >= 1  # the whole body, at least
    with pytest.raises(ValueError, match="outside"):
        cache.answer_frame(body, 9, node.tables, len(body) + 1)


# -- real node processes: versions, TTL, the wire -------------------------------------


def test_loads_rollbacks_writes_and_deletes_over_the_wire_answer_as_without_the_cache(
    start_node, tmp_path: Path
) -> None:
    hot = start_node("--hot-rows-mb", "8")
    cold = start_node("--hot-rows-mb", "0")
    with Client(hot.address) as a, Client(cold.address) as b:
        reads_alike_through_random_changes(a, b, (a, b), tmp_path)


def test_a_cached_row_is_not_served_after_its_ttl(start_node) -> None:
    check_ttl_expiry(start_node("--hot-rows-mb", "8").address)


def test_the_hot_row_cache_setting_is_checked(tmp_path: Path) -> None:
    config = NodeConfig(data_dir=tmp_path, hot_rows_bytes=-1)
    with pytest.raises(ValueError, match="hot_rows_bytes must be at least 0"):
        config.load()
    config = NodeConfig(data_dir=tmp_path / "off", hot_rows_bytes=0)
    config.load()
    node = Node(config)
    node.open()
    try:
        assert node.reads.hot is None
    finally:
        node.close()
