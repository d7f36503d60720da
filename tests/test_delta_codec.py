"""Delta rows (format 3; format 2 as written before it) and reads of delta over base,
checked against the oracle.

The node applies every online write with ``delta_apply``, every delete with
``delta_delete``, reads with ``overlay`` and compacts the delta with ``delta_compact``
when a version becomes current (docs/row-format.md, "Delta rows"). Each property draws
a random schema (every kind), random stored rows, some of them sloppy, and event
times from a small range so that ties are common, plus the int64 extremes; the codec
must agree with tests/rowformat_oracle.py byte for byte. The last properties are the
promises the product makes on top of the format: updates converge whatever their
order, deletes win over older updates, a version hides what it supersedes, and
compaction never changes a read.
"""

import os
import struct

import numpy as np
import pytest
import rowformat_oracle as oracle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rowformat_strategies import dirty, mutate, mutations, same_value, schemas, value_strategy

from kvstore import _codec as codec

# KVSTORE_CODEC_EXAMPLES=5000 runs a long search, as in test_codec.py.
examples = settings(
    max_examples=int(os.environ.get("KVSTORE_CODEC_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# µs; a small range makes equal times (and times equal to T or deleted_at) common
event_times = st.integers(-3, 12) | st.sampled_from([INT64_MIN, INT64_MIN + 1, -1, 0, INT64_MAX])
snapshot_times = st.just(codec.NO_DELETE) | event_times
ttls = st.integers(-1, 15) | st.sampled_from([0, 1, INT64_MAX])


# --------------------------------------------------------------------------------------
# Strategies and helpers


def dirty_delta(kinds: list[int], dims: list[int], row: bytes) -> bytes:
    """A delta row as a sloppy writer might store it, still valid: absent features have a
    null bit (and in format 2 a time and fixed bytes), the present bitmap's padding bits
    are set; null fixed bytes are not zero; true bools are 0x80."""
    lay = oracle.layout(kinds, dims)
    n = len(kinds)
    bitmap_at = oracle.DELTA_HEADER.size
    present_at = bitmap_at + lay.null_bitmap_size
    times_at = present_at + lay.null_bitmap_size
    dense = row[0] == oracle.DELTA_DENSE_FORMAT
    present = [row[present_at + f // 8] >> (f % 8) & 1 for f in range(n)]
    out = bytearray(row)
    if n % 8:
        out[present_at + lay.null_bitmap_size - 1] |= 0xFF << (n % 8) & 0xFF
    at = times_at + 8 * sum(present)  # format 3: the first present fixed value
    for f, kind in enumerate(kinds):
        null = row[bitmap_at + f // 8] >> (f % 8) & 1
        if not present[f]:
            out[bitmap_at + f // 8] |= 1 << (f % 8)
            if dense:
                out[times_at + 8 * f : times_at + 8 * f + 8] = struct.pack("<q", 0x5A5A + f)
        if kind in oracle.VAR_KINDS or not (dense or present[f]):
            continue
        width = lay.widths[f]
        offset = lay.fixed_offsets[f] + oracle.delta_shift(lay) if dense else at
        at += width
        if not present[f] or null:
            out[offset : offset + width] = b"\xab" * width
        elif kind == oracle.BOOL and row[offset]:
            out[offset] = 0x80
    _, schema_id = struct.unpack_from("<BI", row)
    assert oracle.check_delta_row(kinds, dims, schema_id, bytes(out)) is None
    return bytes(out)


@st.composite
def delta_rows(draw, kinds: list[int], dims: list[int], schema_id: int) -> bytes:
    """Any valid delta row: features absent or at any time, any deleted_at, and an event
    time that is usually the newest of them (as the codec writes it) but not always."""
    times = [draw(st.none() | event_times) for _ in kinds]
    values = [draw(st.none() | value_strategy(k, d)) for k, d in zip(kinds, dims, strict=True)]
    deleted_at = draw(st.just(oracle.NO_DELETE) | event_times)
    newest = max([deleted_at] + [t for t in times if t is not None])
    event_time = draw(st.just(newest) | event_times)
    # Format 2 too: rows written before format 3 are read (and rewritten) by every operation.
    dense = draw(st.booleans())
    row = oracle.encode_delta_row(
        kinds, dims, schema_id, event_time, deleted_at, times, values, dense
    )
    return dirty_delta(kinds, dims, row) if draw(st.booleans()) else row


@st.composite
def base_rows(draw, kinds: list[int], dims: list[int], schema_id: int) -> bytes:
    values = [draw(st.none() | value_strategy(k, d)) for k, d in zip(kinds, dims, strict=True)]
    row = oracle.encode_row(kinds, dims, schema_id, draw(event_times), values)
    return dirty(kinds, dims, row) if draw(st.booleans()) else row


@st.composite
def updates(draw, kinds: list[int], dims: list[int], schema_id: int, present: list[bool]) -> bytes:
    """An update: a format-1 row at its event time; what it holds for the features it does
    not set (``present``) is ignored, so it is anything."""
    values = [draw(st.none() | value_strategy(k, d)) for k, d in zip(kinds, dims, strict=True)]
    row = oracle.encode_row(kinds, dims, schema_id, draw(event_times), values)
    return dirty(kinds, dims, row) if draw(st.booleans()) else row


def masks(n: int) -> st.SearchStrategy[list[bool]]:
    return st.lists(st.booleans(), min_size=n, max_size=n)


def ttl_arrays(n: int) -> st.SearchStrategy[list[int] | None]:
    return st.none() | st.just([0] * n) | st.lists(ttls, min_size=n, max_size=n)


def joined(rows: list[bytes]) -> tuple[bytes, np.ndarray]:
    """Rows in one buffer and their n + 1 offsets, as delta_apply takes updates."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows], dtype=np.int64)
    return b"".join(rows), offsets


def ttl_array(ttl: list[int] | None) -> np.ndarray | None:
    return None if ttl is None else np.array(ttl, dtype=np.int64)


def apply_one(layout, row: bytes | None, update: bytes, present: list[bool]) -> bytes:
    buf, offsets = joined([update])
    (out,) = codec.delta_apply(layout, [row], buf, offsets, np.array(present, dtype=np.uint8))
    return out


def delete_one(layout, row: bytes | None, t: int) -> bytes:
    (out,) = codec.delta_delete(layout, [row], np.array([t], dtype=np.int64))
    return out


def read_one(layout, base, delta, snapshot_time, now, ttl) -> bytes | None:
    (out,) = codec.overlay(layout, [base], [delta], snapshot_time, now, ttl_array(ttl))
    return out


def same_read(got: bytes | None, want: bytes | None, base: bytes | None) -> bool:
    """Equal rows, and the base row object itself exactly when the oracle passes it on."""
    return got == want and (base is not None and got is base) == (base is not None and want is base)


# --------------------------------------------------------------------------------------
# The oracle itself


@examples
@given(schemas(max_features=10), st.booleans(), st.data())
def test_oracle_delta_rows_round_trip(schema, dense, data):
    kinds, dims, schema_id = schema
    times = [data.draw(st.none() | event_times) for _ in kinds]
    values = [
        None if t is None else data.draw(st.none() | value_strategy(k, d))
        for k, d, t in zip(kinds, dims, times, strict=True)
    ]
    event_time, deleted_at = data.draw(event_times), data.draw(event_times)
    row = oracle.encode_delta_row(
        kinds, dims, schema_id, event_time, deleted_at, times, values, dense
    )
    lay = oracle.layout(kinds, dims)
    assert oracle.check_delta_row(kinds, dims, schema_id, row) is None
    assert row[0] == (oracle.DELTA_DENSE_FORMAT if dense else oracle.DELTA_FORMAT)
    # Format 3 stores only the present features: 8 bytes of time and the value each.
    present = [f for f, t in enumerate(times) if t is not None]
    values_bytes = sum(lay.widths[f] or 4 for f in present)
    assert len(row) >= 21 + 2 * lay.null_bitmap_size + 8 * len(present) + values_bytes
    if not dense:
        var_bytes = len(row) - 21 - 2 * lay.null_bitmap_size - 8 * len(present) - values_bytes
        assert var_bytes == sum(
            len(oracle.encode_value(kinds[f], lay.dims[f], values[f]))
            for f in present
            if kinds[f] in oracle.VAR_KINDS and values[f] is not None
        )
    got = oracle.decode_delta_row(kinds, dims, schema_id, row)
    assert got[:3] == (event_time, deleted_at, times)
    assert all(same_value(k, a, b) for k, a, b in zip(kinds, got[3], values, strict=True))
    sloppy = oracle.decode_delta_row(kinds, dims, schema_id, dirty_delta(kinds, dims, row))
    assert sloppy[:3] == got[:3]
    assert all(same_value(k, a, b) for k, a, b in zip(kinds, sloppy[3], values, strict=True))
    if not dense:
        return
    # Format 2's body is format 1's: behind a format-1 header, the present values decode alike.
    assert len(row) >= lay.min_row_size + oracle.delta_shift(lay)
    body = row[oracle.delta_header_size(lay) :]
    bitmap = row[oracle.DELTA_HEADER.size : oracle.DELTA_HEADER.size + lay.null_bitmap_size]
    as_row = oracle.HEADER.pack(1, schema_id, event_time) + bitmap + body
    _, as_values = oracle.decode_row(kinds, dims, schema_id, as_row)
    for kind, value, t, want in zip(kinds, as_values, times, values, strict=True):
        assert same_value(kind, value if t is not None else None, want)


def test_oracle_example_delta_row():
    # int32, string, bool, int64; the int32 is present at time 5, the string present and
    # null at time 7, the bool absent, the int64 present at 6; no delete
    row = oracle.encode_delta_row(
        [1, 6, 0, 2], [0, 0, 0, 0], 9, 7, codec.NO_DELETE, [5, 7, None, 6], [-2, None, True, 3]
    )
    assert row == (
        b"\x03" + b"\x09\x00\x00\x00" + (7).to_bytes(8, "little")  # format, schema id, event time
        + b"\x00\x00\x00\x00\x00\x00\x00\x80"  # deleted_at: INT64_MIN
        + b"\x02"  # null bitmap: feature 1
        + b"\x0b"  # present bitmap: features 0, 1 and 3
        + struct.pack("<3q", 5, 7, 6)  # the present features' times, in order
        + b"\xfe\xff\xff\xff" + (3).to_bytes(8, "little")  # fixed values: the int32, int64
        + b"\x00\x00\x00\x00"  # the null string ends at 0
    )  # fmt: skip
    assert len(row) == 21 + 2 * 1 + 8 * 3 + 4 + 8 + 4


def test_oracle_example_dense_delta_row():
    # Format 2, as written before format 3 (and still read): every feature has its slot.
    row = oracle.encode_delta_row(
        [1, 6, 0], [0, 0, 0], 9, 7, codec.NO_DELETE, [5, 7, None], [-2, None, True], dense=True
    )
    assert row == (
        b"\x02" + b"\x09\x00\x00\x00" + (7).to_bytes(8, "little")  # format, schema id, event time
        + b"\x00\x00\x00\x00\x00\x00\x00\x80"  # deleted_at: INT64_MIN
        + b"\x02"  # null bitmap: feature 1
        + b"\x03"  # present bitmap: features 0 and 1
        + struct.pack("<3q", 5, 7, 0)  # feature times, 0 where absent
        + b"\xfe\xff\xff\xff" + b"\x00"  # fixed section: the int32, the absent bool
        + b"\x00\x00\x00\x00"  # the null string ends at 0
    )  # fmt: skip
    assert len(row) == 21 + 2 * 1 + 8 * 3 + 5 + 4


def test_delta_constants():
    assert codec.DELTA_FORMAT_VERSION == oracle.DELTA_FORMAT == 3
    assert codec.NO_DELETE == oracle.NO_DELETE == INT64_MIN


@examples
@given(schemas(max_features=12), st.booleans(), st.data())
def test_rows_written_whole_read_as_the_oracle_says(schema, sloppy, data):
    """A row written whole (every feature present: the codec copies its stored body in
    one piece) and the same row with a partial update read over a base row, in both
    read paths, against the oracle; the row with a dirty writer's bytes too."""
    kinds, dims, schema_id = schema
    layout = codec.Layout(schema_id, kinds, dims)
    t = data.draw(st.integers(1, 12))
    values = [data.draw(st.none() | value_strategy(k, d)) for k, d in zip(kinds, dims, strict=True)]
    whole = oracle.encode_delta_row(kinds, dims, schema_id, t, INT64_MIN, [t] * len(kinds), values)
    if sloppy:
        whole = dirty_delta(kinds, dims, whole)
    update = data.draw(updates(kinds, dims, schema_id, [True] * len(kinds)))
    assert apply_one(layout, None, update, [True] * len(kinds)) == oracle.delta_apply(
        kinds, dims, schema_id, None, update, [True] * len(kinds)
    )
    base = data.draw(st.none() | base_rows(kinds, dims, schema_id))
    snapshot_time = data.draw(st.just(codec.NO_DELETE) | st.integers(-3, 12))
    for b in (None, base):
        want = oracle.overlay(kinds, dims, schema_id, b, whole, snapshot_time, 0)
        assert same_read(read_one(layout, b, whole, snapshot_time, 0, None), want, b)
        block, lengths = codec.overlay_join(layout, [([whole], [b])], snapshot_time, 0)
        assert block == (want or b"") and lengths.tolist() == [-1 if want is None else len(want)]


# --------------------------------------------------------------------------------------
# Each operation against the oracle


@examples
@given(schemas(max_features=10), st.integers(0, 5), st.data())
def test_delta_apply_matches_oracle(schema, n, data):
    kinds, dims, schema_id = schema
    present = data.draw(masks(len(kinds)))
    old_rows = [data.draw(st.none() | delta_rows(kinds, dims, schema_id)) for _ in range(n)]
    new_rows = [data.draw(updates(kinds, dims, schema_id, present)) for _ in range(n)]
    layout = codec.Layout(schema_id, kinds, dims)
    buf, offsets = joined(new_rows)
    got = codec.delta_apply(layout, old_rows, buf, offsets, np.array(present, dtype=np.bool_))
    want = [
        oracle.delta_apply(kinds, dims, schema_id, old, new, present)
        for old, new in zip(old_rows, new_rows, strict=True)
    ]
    assert got == want
    assert all(type(row) is bytes for row in got)


@examples
@given(schemas(max_features=10), st.integers(0, 5), st.data())
def test_delta_delete_matches_oracle(schema, n, data):
    kinds, dims, schema_id = schema
    old_rows = [data.draw(st.none() | delta_rows(kinds, dims, schema_id)) for _ in range(n)]
    times = data.draw(st.lists(event_times, min_size=n, max_size=n))
    layout = codec.Layout(schema_id, kinds, dims)
    got = codec.delta_delete(layout, old_rows, np.array(times, dtype=np.int64))
    want = [
        oracle.delta_delete(kinds, dims, schema_id, old, t)
        for old, t in zip(old_rows, times, strict=True)
    ]
    assert got == want


@examples
@given(schemas(max_features=10), st.integers(0, 5), st.data())
def test_overlay_matches_oracle(schema, n, data):
    kinds, dims, schema_id = schema
    base = [data.draw(st.none() | base_rows(kinds, dims, schema_id)) for _ in range(n)]
    delta = [data.draw(st.none() | delta_rows(kinds, dims, schema_id)) for _ in range(n)]
    snapshot_time, now = data.draw(snapshot_times), data.draw(event_times)
    ttl = data.draw(ttl_arrays(len(kinds)))
    layout = codec.Layout(schema_id, kinds, dims)
    got = codec.overlay(layout, base, delta, snapshot_time, now, ttl_array(ttl))
    for i in range(n):
        want = oracle.overlay(kinds, dims, schema_id, base[i], delta[i], snapshot_time, now, ttl)
        assert same_read(got[i], want, base[i]), i


@examples
@given(schemas(max_features=10), st.lists(st.integers(0, 4), max_size=4), st.data())
def test_overlay_join_is_join_values_of_overlay(schema, group_sizes, data):
    """The one-pass read of several shard groups (Reads without the hot-row cache) answers
    the block and lengths that overlay of each group then join_values would, and those
    rows are the oracle's."""
    kinds, dims, schema_id = schema
    layout = codec.Layout(schema_id, kinds, dims)
    snapshot_time, now = data.draw(snapshot_times), data.draw(event_times)
    ttl = ttl_array(data.draw(ttl_arrays(len(kinds))))
    fetched, answers = [], []
    for size in group_sizes:
        base = [data.draw(st.none() | base_rows(kinds, dims, schema_id)) for _ in range(size)]
        delta = [data.draw(st.none() | delta_rows(kinds, dims, schema_id)) for _ in range(size)]
        fetched.append((delta, base))
        answers.extend(codec.overlay(layout, base, delta, snapshot_time, now, ttl))
    block, lengths = codec.overlay_join(layout, fetched, snapshot_time, now, ttl)
    want_block, want_lengths = codec.join_values(answers)
    assert block == want_block
    assert lengths.dtype == np.int32 and lengths.tolist() == want_lengths.tolist()


def assert_window_holds(answer_at, now: int, lo: int, hi: int, got, others=()) -> None:
    """A read at ``now`` answered ``got`` with the window [lo, hi] (µs): ``now`` is inside,
    and ``answer_at(t)``, the oracle's answer at t (µs), is ``got`` at both ends, in the
    middle and at every time of ``others``."""
    assert INT64_MIN <= lo <= now <= hi <= INT64_MAX
    # Python's integers do not overflow, so (lo + hi) // 2 is inside [lo, hi]; halving each
    # first (lo // 2 + hi // 2) is not: with lo == hi odd it is lo - 1, outside the window.
    for other in {lo, hi, (lo + hi) // 2, now, *others}:
        assert answer_at(other) == got, other


@examples
@given(schemas(max_features=8), st.integers(1, 4), st.data())
def test_overlay_valid_window_holds_the_same_answer(schema, n, data):
    """``valid_us``: between its two times a read at another ``now_us`` answers the same
    (the node's hot-row cache keeps an answer that long)."""
    kinds, dims, schema_id = schema
    base = [data.draw(st.none() | base_rows(kinds, dims, schema_id)) for _ in range(n)]
    delta = [data.draw(st.none() | delta_rows(kinds, dims, schema_id)) for _ in range(n)]
    snapshot_time, now = data.draw(snapshot_times), data.draw(event_times)
    ttl = data.draw(ttl_arrays(len(kinds)))
    layout = codec.Layout(schema_id, kinds, dims)
    valid = np.empty(2 * n, np.int64)
    got = codec.overlay(layout, base, delta, snapshot_time, now, ttl_array(ttl), valid)
    for i in range(n):
        lo, hi = int(valid[2 * i]), int(valid[2 * i + 1])
        somewhere = data.draw(st.integers(lo, hi)) if lo <= hi else now

        def answer_at(t: int, i: int = i) -> bytes | None:
            return oracle.overlay(kinds, dims, schema_id, base[i], delta[i], snapshot_time, t, ttl)

        assert_window_holds(answer_at, now, lo, hi, got[i], (somewhere,))


# The int64 edges of the window, each as (feature time t, TTL, now, the window): t + ttl
# (the last µs a value lives) saturates at INT64_MAX, now - ttl is below INT64_MIN near
# the smallest clock, and a value dropped at now came back one µs after t + ttl.
WINDOW_EDGES = {
    # hypothesis's find: dropped at INT64_MAX, back at INT64_MAX - 1 = t + ttl
    "dropped at the largest now": (-1, INT64_MAX, INT64_MAX, (INT64_MAX, INT64_MAX)),
    "kept until the largest now": (0, INT64_MAX, INT64_MAX, (INT64_MIN, INT64_MAX)),
    "t + ttl past INT64_MAX": (INT64_MAX, INT64_MAX, INT64_MAX, (INT64_MIN, INT64_MAX)),
    "oldest value, longest ttl": (INT64_MIN, INT64_MAX, INT64_MAX, (0, INT64_MAX)),
    "oldest value, largest now, ttl 1": (INT64_MIN, 1, INT64_MAX, (INT64_MIN + 2, INT64_MAX)),
    "smallest now, ttl 1": (INT64_MIN, 1, INT64_MIN, (INT64_MIN, INT64_MIN + 1)),
    "smallest now, longest ttl": (INT64_MIN, INT64_MAX, INT64_MIN, (INT64_MIN, -1)),
    "newest value, smallest now": (INT64_MAX, 1, INT64_MIN, (INT64_MIN, INT64_MAX)),
    # the oldest a delta value read over a snapshot at INT64_MIN can be
    "oldest delta time, longest ttl": (INT64_MIN + 1, INT64_MAX, INT64_MAX, (1, INT64_MAX)),
    "oldest delta time, smallest now": (INT64_MIN + 1, 1, INT64_MIN, (INT64_MIN, INT64_MIN + 2)),
}


@pytest.mark.parametrize("source", ["base", "delta"])
@pytest.mark.parametrize("case", WINDOW_EDGES.values(), ids=WINDOW_EDGES.keys())
def test_overlay_valid_window_at_the_int64_edges(case, source):
    """The window at the int64 edges, exactly, and the answer changes just outside it;
    checked on every run, not when hypothesis happens to draw these times."""
    t, ttl_us, now, (lo, hi) = case
    kinds, dims = [codec.KIND_BOOL, codec.KIND_BOOL], [0, 0]  # feature 1: no TTL
    layout = codec.Layout(0, kinds, dims)
    ttl = [ttl_us, 0]
    if source == "base":
        base, delta = oracle.encode_row(kinds, dims, 0, t, [True, True]), None
    else:
        base = None
        delta = oracle.encode_delta_row(kinds, dims, 0, t, INT64_MIN, [t, t], [True, True])
    valid = np.empty(2, np.int64)
    (got,) = codec.overlay(layout, [base], [delta], INT64_MIN, now, ttl_array(ttl), valid)
    if source == "delta" and t == INT64_MIN:
        # never newer than the snapshot: the key is missing, whatever the time
        assert got is None
        lo, hi = INT64_MIN, INT64_MAX
    assert (int(valid[0]), int(valid[1])) == (lo, hi)

    def answer_at(t: int) -> bytes | None:
        return oracle.overlay(kinds, dims, 0, base, delta, INT64_MIN, t, ttl)

    assert_window_holds(answer_at, now, lo, hi, got)
    for outside in (lo - 1, hi + 1):
        if INT64_MIN <= outside <= INT64_MAX:
            assert answer_at(outside) != got, outside


def test_overlay_valid_window_without_ttl_is_for_ever():
    layout = codec.Layout(1, [codec.KIND_INT64], [0])
    valid = np.zeros(4, dtype=np.int64)
    codec.overlay(layout, [None, None], [None, None], 0, 10, None, valid)
    assert valid.tolist() == [INT64_MIN, INT64_MAX] * 2


@examples
@given(schemas(max_features=10), st.integers(0, 5), snapshot_times, st.data())
def test_delta_compact_matches_oracle(schema, n, snapshot_time, data):
    kinds, dims, schema_id = schema
    rows = [data.draw(st.none() | delta_rows(kinds, dims, schema_id)) for _ in range(n)]
    layout = codec.Layout(schema_id, kinds, dims)
    got = codec.delta_compact(layout, rows, snapshot_time)
    for row, out in zip(rows, got, strict=True):
        want = oracle.delta_compact(kinds, dims, schema_id, row, snapshot_time)
        assert out == want
        assert (out is row) == (want is row)  # unchanged: the same object, nothing to write


@examples
@given(schemas(max_features=10), st.data())
def test_delta_info_matches_oracle(schema, data):
    kinds, dims, schema_id = schema
    row = data.draw(delta_rows(kinds, dims, schema_id))
    layout = codec.Layout(schema_id, kinds, dims)
    assert codec.delta_info(layout, row) == oracle.delta_info(kinds, dims, schema_id, row)


def test_overlay_example():
    # int64 a, string b, float32 c; a version with snapshot time 100
    kinds, dims = [codec.KIND_INT64, codec.KIND_STRING, codec.KIND_FLOAT32], [0, 0, 0]
    layout = codec.Layout(3, kinds, dims)
    base = oracle.encode_row(kinds, dims, 3, 90, [1, "base", 1.5])
    delta = oracle.encode_delta_row(kinds, dims, 3, 120, -1, [80, 120, None], [2, "delta", None])
    (row,) = codec.overlay(layout, [base], [delta], 100, 200, None)
    # a's delta value is older than the version: the base's; b's is newer: the delta's
    assert oracle.decode_row(kinds, dims, 3, row) == (120, [1, "delta", 1.5])
    # b and c live 100 µs: at now = 200 the base's c (time 90) has expired, the delta's b
    # (time 120) not
    ttl = np.array([0, 100, 100], dtype=np.int64)
    (row,) = codec.overlay(layout, [base], [delta], 100, 200, ttl)
    assert oracle.decode_row(kinds, dims, 3, row) == (120, [1, "delta", None])
    # nothing newer in the delta and nothing expired: the stored base row itself
    (row,) = codec.overlay(layout, [base], [delta], 120, 100, ttl)
    assert row is base
    (row,) = codec.overlay(layout, [base], [None], 120, 100, None)
    assert row is base
    # a delete after the snapshot hides the base; newer delta features still show
    deleted = delete_one(layout, delta, 110)
    (row,) = codec.overlay(layout, [base], [deleted], 100, 200, None)
    assert oracle.decode_row(kinds, dims, 3, row) == (120, [None, "delta", None])
    assert codec.overlay(layout, [None, None], [None, deleted], 120, 200, None) == [None, None]


def test_apply_and_delete_example():
    kinds, dims = [codec.KIND_INT64, codec.KIND_INT64_LIST], [0, 0]
    layout = codec.Layout(8, kinds, dims)
    first = oracle.encode_row(kinds, dims, 8, 10, [1, [1, 2]])
    row = apply_one(layout, None, first, [True, True])
    assert codec.delta_info(layout, row) == (10, codec.NO_DELETE, {0: 10, 1: 10})
    older = oracle.encode_row(kinds, dims, 8, 5, [2, None])
    row = apply_one(layout, row, older, [True, True])  # older than both: ignored
    assert oracle.decode_delta_row(kinds, dims, 8, row)[3] == [1, [1, 2]]
    same_time = oracle.encode_row(kinds, dims, 8, 10, [3, None])
    row = apply_one(layout, row, same_time, [True, False])  # equal time: applied later, wins
    assert oracle.decode_delta_row(kinds, dims, 8, row)[2:] == ([10, 10], [3, [1, 2]])
    row = delete_one(layout, row, 10)
    assert codec.delta_info(layout, row) == (10, 10, {})
    assert codec.delta_compact(layout, [row], 10) == [None]
    assert codec.delta_compact(layout, [row], 9) == [row]


def test_a_version_holds_the_deletes_before_its_snapshot():
    kinds, dims = [codec.KIND_INT64, codec.KIND_INT64], [0, 0]
    layout = codec.Layout(1, kinds, dims)
    base = oracle.encode_row(kinds, dims, 1, 5, [10, 20])
    tombstone = delete_one(layout, None, 7)
    # A version with snapshot time 10 was taken after the delete at 7: its row is what the
    # key reads, before compaction drops the tombstone and after.
    assert codec.overlay(layout, [base], [tombstone], 10, 0, None)[0] is base
    assert codec.delta_compact(layout, [tombstone], 10) == [None]
    # A version taken before the delete (snapshot time 6) is hidden by it.
    assert codec.overlay(layout, [base], [tombstone], 6, 0, None) == [None]
    assert codec.delta_compact(layout, [tombstone], 6) == [tombstone]


def test_edges_of_the_int64_range():
    kinds, dims = [codec.KIND_INT64, codec.KIND_INT64], [0, 0]
    layout = codec.Layout(1, kinds, dims)
    # An update at INT64_MIN is never newer than "no delete": ignored, row or no row, so
    # the order of a key's first updates does not matter.
    at_min = oracle.encode_row(kinds, dims, 1, INT64_MIN, [1, None])
    at_5 = oracle.encode_row(kinds, dims, 1, 5, [None, 2])
    first = apply_one(layout, None, at_min, [True, False])
    assert codec.delta_info(layout, first) == (INT64_MIN, INT64_MIN, {})
    one_way = apply_one(layout, first, at_5, [False, True])
    other_way = apply_one(
        layout, apply_one(layout, None, at_5, [False, True]), at_min, [True, False]
    )
    assert one_way == other_way
    assert codec.delta_info(layout, one_way) == (5, INT64_MIN, {1: 5})
    # An update that sets nothing leaves the row's event time alone.
    assert codec.delta_info(layout, apply_one(layout, one_way, at_5, [False, False]))[0] == 5
    nothing = apply_one(layout, None, at_5, [False, False])
    assert codec.delta_info(layout, nothing) == (INT64_MIN, INT64_MIN, {})
    # Near the smallest clock value now - ttl is below INT64_MIN: nothing has expired.
    base = oracle.encode_row(kinds, dims, 1, INT64_MIN, [1, 2])
    ttl = np.array([10, INT64_MAX], np.int64)
    assert codec.overlay(layout, [base], [None], 0, INT64_MIN + 5, ttl)[0] is base
    assert codec.overlay(layout, [base], [nothing], 0, INT64_MIN + 5, ttl)[0] is base
    assert codec.overlay(layout, [base], [None], 0, INT64_MIN + 11, ttl)[0] != base


# --------------------------------------------------------------------------------------
# What the product promises


@st.composite
def histories(draw, kinds: list[int], dims: list[int], schema_id: int):
    """Updates (each with its own feature subset) and deletes of one key, in event-time
    order; two updates at one time never set the same feature (then the order decides)."""
    ops = []
    taken: set[tuple[int, int]] = set()  # (time, feature) some update sets
    for _ in range(draw(st.integers(1, 7))):
        if draw(st.integers(0, 3)) == 0:
            ops.append(("delete", draw(event_times), None, None))
            continue
        present = draw(masks(len(kinds)))
        row = draw(updates(kinds, dims, schema_id, present))
        t = struct.unpack_from("<q", row, 5)[0]
        sets = {(t, f) for f, p in enumerate(present) if p}
        if sets & taken:
            continue
        taken |= sets
        ops.append(("update", t, row, present))
    return sorted(ops, key=lambda op: op[1])


def replay(layout, ops) -> bytes | None:
    """The key's delta row after the operations, applied in the order given."""
    row = None
    for kind, t, update, present in ops:
        row = (
            delete_one(layout, row, t)
            if kind == "delete"
            else apply_one(layout, row, update, present)
        )
    return row


@examples
@given(schemas(max_features=6), st.data())
def test_updates_converge_in_any_order(schema, data):
    kinds, dims, schema_id = schema
    layout = codec.Layout(schema_id, kinds, dims)
    ops = data.draw(histories(kinds, dims, schema_id))
    redelivered = data.draw(st.lists(st.sampled_from(ops), max_size=4))
    shuffled = data.draw(st.permutations(ops + redelivered))
    in_order = replay(layout, ops)
    assert replay(layout, shuffled) == in_order
    want = None
    for kind, t, update, present in ops:
        if kind == "delete":
            want = oracle.delta_delete(kinds, dims, schema_id, want, t)
        else:
            want = oracle.delta_apply(kinds, dims, schema_id, want, update, present)
    assert in_order == want


@examples
@given(schemas(max_features=8), st.integers(0, 4), st.data())
def test_a_delete_wins_over_older_and_equal_updates(schema, age, data):
    kinds, dims, schema_id = schema
    layout = codec.Layout(schema_id, kinds, dims)
    row = data.draw(st.none() | delta_rows(kinds, dims, schema_id))
    deleted_at = data.draw(event_times)
    deleted = delete_one(layout, row, deleted_at)
    assert codec.delta_info(layout, deleted)[1] >= deleted_at
    assert all(t > deleted_at for t in codec.delta_info(layout, deleted)[2].values())
    present = data.draw(masks(len(kinds)))
    update = data.draw(updates(kinds, dims, schema_id, present))
    t = max(INT64_MIN, deleted_at - age)
    update = update[:5] + struct.pack("<q", t) + update[13:]
    assert apply_one(layout, deleted, update, present) == deleted


def without_old_features(kinds, dims, schema_id, row: bytes, snapshot_time: int, how: str):
    """The delta row with every feature no newer than the snapshot made absent, or null."""
    delta = oracle.delta_cells(kinds, dims, schema_id, row)
    for f, t in enumerate(delta.times):
        if t is not None and t <= snapshot_time:
            if how == "absent":
                delta.times[f] = None
            delta.cells[f] = None
    return oracle.encode_delta(oracle.layout(kinds, dims), schema_id, delta)


@examples
@given(schemas(max_features=8), snapshot_times, event_times, st.data())
def test_overlay_never_reads_delta_features_the_version_supersedes(
    schema, snapshot_time, now, data
):
    kinds, dims, schema_id = schema
    layout = codec.Layout(schema_id, kinds, dims)
    base = data.draw(st.none() | base_rows(kinds, dims, schema_id))
    delta = data.draw(delta_rows(kinds, dims, schema_id))
    ttl = data.draw(ttl_arrays(len(kinds)))
    read = read_one(layout, base, delta, snapshot_time, now, ttl)
    for how in ("absent", "null"):
        other = without_old_features(kinds, dims, schema_id, delta, snapshot_time, how)
        assert same_read(read_one(layout, base, other, snapshot_time, now, ttl), read, base)
    if read is not None and read is not base:
        event_time, _ = oracle.decode_row(kinds, dims, schema_id, read)
        tb = struct.unpack_from("<q", base, 5)[0] if base is not None else INT64_MIN
        times = oracle.delta_info(kinds, dims, schema_id, delta)[2].values()
        assert event_time in {tb, *(t for t in times if t > snapshot_time)}


@examples
@given(schemas(max_features=8), snapshot_times, st.data())
def test_compaction_never_changes_a_read_of_its_version(schema, snapshot_time, data):
    kinds, dims, schema_id = schema
    layout = codec.Layout(schema_id, kinds, dims)
    base = data.draw(st.none() | base_rows(kinds, dims, schema_id))
    if data.draw(st.booleans()):
        delta = data.draw(delta_rows(kinds, dims, schema_id))
    else:
        delta = replay(layout, data.draw(histories(kinds, dims, schema_id)))
    (compacted,) = codec.delta_compact(layout, [delta], snapshot_time)
    for _ in range(3):  # any read of that version: any clock, any TTLs
        now, ttl = data.draw(event_times), data.draw(ttl_arrays(len(kinds)))
        before = read_one(layout, base, delta, snapshot_time, now, ttl)
        assert same_read(read_one(layout, base, compacted, snapshot_time, now, ttl), before, base)
    # and compacting again changes nothing
    if compacted is not None:
        assert codec.delta_compact(layout, [compacted], snapshot_time)[0] is compacted


# --------------------------------------------------------------------------------------
# Corrupt and foreign rows: CorruptRow / SchemaMismatch name the key's index

KINDS = [codec.KIND_INT32, codec.KIND_STRING, codec.KIND_FLOAT32_VECTOR, codec.KIND_BYTES]
DIMS = [0, 0, 2, 0]
SCHEMA_ID = 4
LAYOUT = oracle.layout(KINDS, DIMS)
BASE = oracle.encode_row(KINDS, DIMS, SCHEMA_ID, 10, [1, "abc", [1.0, 2.0], b"xy"])
DELTA = oracle.encode_delta_row(
    KINDS, DIMS, SCHEMA_ID, 20, 5, [20, 20, None, 15], [2, "de", None, b"f"]
)
DENSE_DELTA = oracle.encode_delta_row(
    KINDS, DIMS, SCHEMA_ID, 20, 5, [20, 20, None, 15], [2, "de", None, b"f"], dense=True
)
# Format 3: 23-byte header and bitmaps, 3 times, the int32, the two u32 var ends at 51.
DELTA_ENDS = 21 + 2 + 3 * 8 + 4
DENSE_DELTA_ENDS = LAYOUT.ends_start + oracle.delta_shift(LAYOUT)  # 67


def with_u32(row: bytes, offset: int, value: int) -> bytes:
    return row[:offset] + struct.pack("<I", value) + row[offset + 4 :]


def delta_corruptions(row: bytes, ends: int, minimum: int, cut: int) -> dict:
    return {
        "truncated header": (row[:20], "delta row: length 20 is shorter than the 23-byte minimum"),
        "truncated times": (
            row[:cut],
            f"delta row: length {cut} is shorter than the {minimum}-byte minimum",
        ),
        "truncated var data": (
            row[:-1],
            "delta row: var data length mismatch: the var ends cover 3 bytes, the row holds 2",
        ),
        "trailing garbage": (
            row + b"\x00",
            "delta row: var data length mismatch: the var ends cover 3 bytes, the row holds 4",
        ),
        "a base row": (BASE, "delta row: format byte 0x01, expected 0x03 (or 0x02)"),
        "decreasing var ends": (
            with_u32(row, ends, 4),
            "delta row: var ends decrease: feature 3 ends at 3, before the previous end 4",
        ),
    }


# Rows of both formats: every operation reads rows written before format 3 too.
DELTA_CORRUPTIONS = {
    **{f"format 3, {k}": v for k, v in delta_corruptions(DELTA, DELTA_ENDS, 59, 40).items()},
    **{
        f"format 2, {k}": v
        for k, v in delta_corruptions(DENSE_DELTA, DENSE_DELTA_ENDS, 75, 50).items()
    },
}
BASE_CORRUPTIONS = {
    "truncated": (BASE[:20], "base row: length 20 is shorter than the 34-byte minimum"),
    "a delta row": (DELTA, "base row: format byte 0x03, expected 0x01"),
    "trailing garbage": (
        BASE + b"\x00",
        "base row: var data length mismatch: the var ends cover 5 bytes, the row holds 6",
    ),
}


def run(op: str, rows: list, position: int):
    """One codec call on four keys, ``rows`` as the stored rows the op reads."""
    layout = codec.Layout(SCHEMA_ID, KINDS, DIMS)
    if op == "delta_apply":
        buf, offsets = joined([BASE] * len(rows))
        return codec.delta_apply(layout, rows, buf, offsets, np.ones(4, np.uint8))
    if op == "delta_delete":
        return codec.delta_delete(layout, rows, np.full(len(rows), 30, np.int64))
    if op == "overlay delta":
        return codec.overlay(layout, [BASE] * len(rows), rows, 0, 0, None)
    if op == "overlay base":
        return codec.overlay(layout, rows, [DELTA, None, None, DELTA], 0, 0, None)
    if op == "overlay_join delta":  # two shard groups: the index counts across both
        return codec.overlay_join(layout, [(rows[:2], [BASE] * 2), (rows[2:], [BASE] * 2)], 0, 0)
    if op == "overlay_join base":
        groups = [([DELTA, None], rows[:2]), ([None, DELTA], rows[2:])]
        return codec.overlay_join(layout, groups, 0, 0)
    if op == "delta_compact":
        return codec.delta_compact(layout, rows, 0)
    if op == "delta_merge_rows stored":
        return codec.delta_merge_rows(layout, rows, [DELTA] * len(rows))
    if op == "delta_merge_rows incoming":  # a move's rows and changes: never None
        return codec.delta_merge_rows(layout, [DELTA] * len(rows), [r or DELTA for r in rows])
    assert op == "delta_info"
    return codec.delta_info(layout, rows[position])


DELTA_OPS = [
    "delta_apply",
    "delta_delete",
    "overlay delta",
    "overlay_join delta",
    "delta_compact",
    "delta_merge_rows stored",
    "delta_merge_rows incoming",
    "delta_info",
]


@pytest.mark.parametrize("case", sorted(DELTA_CORRUPTIONS))
@pytest.mark.parametrize("op", DELTA_OPS)
@pytest.mark.parametrize("position", [0, 3])
def test_corrupt_delta_rows_are_named(case, op, position):
    bad, reason = DELTA_CORRUPTIONS[case]
    assert "delta row: " + oracle.check_delta_row(KINDS, DIMS, SCHEMA_ID, bad) == reason
    rows = [DELTA, None, DELTA, DELTA]
    rows[position] = bad
    with pytest.raises(codec.CorruptRow) as raised:
        run(op, rows, position)
    assert raised.value.index == (0 if op == "delta_info" else position)
    assert raised.value.reason == reason
    assert str(raised.value).endswith(reason)


@pytest.mark.parametrize("case", sorted(BASE_CORRUPTIONS))
@pytest.mark.parametrize("position", [0, 1, 3])  # with a delta row (0, 3) and without (1)
@pytest.mark.parametrize("op", ["overlay base", "overlay_join base"])
def test_corrupt_base_rows_are_named(case, position, op):
    bad, reason = BASE_CORRUPTIONS[case]
    assert "base row: " + oracle.check_row(KINDS, DIMS, SCHEMA_ID, bad) == reason
    rows = [BASE, None, BASE, BASE]
    rows[position] = bad
    with pytest.raises(codec.CorruptRow) as raised:
        run(op, rows, position)
    assert (raised.value.index, raised.value.reason) == (position, reason)


@pytest.mark.parametrize("op", [*DELTA_OPS, "overlay base", "overlay_join base"])
def test_rows_of_another_schema_are_a_schema_mismatch(op):
    base = op.endswith(" base")
    foreign = with_u32(BASE if base else DELTA, 1, 9)
    rows = [BASE if base else DELTA] * 4
    rows[2] = foreign
    with pytest.raises(codec.SchemaMismatch) as raised:
        run(op, rows, 2)
    error = raised.value
    assert (error.index, error.schema_id, error.expected) == (
        0 if op == "delta_info" else 2,
        9,
        SCHEMA_ID,
    )


def first_error(calls) -> tuple[int, oracle.StoredRowError] | None:
    """The first key whose oracle call refuses a stored row, as the codec must report it."""
    for i, call in enumerate(calls):
        try:
            call()
        except oracle.StoredRowError as error:
            return i, error
    return None


def expect_error(call, expected):
    with pytest.raises((codec.CorruptRow, codec.SchemaMismatch)) as raised:
        call()
    i, error = expected
    assert raised.value.index == i
    if error.schema_id is None:
        assert type(raised.value) is codec.CorruptRow
        assert raised.value.reason == error.reason
    else:
        assert type(raised.value) is codec.SchemaMismatch
        assert raised.value.schema_id == error.schema_id


@examples
@given(schemas(max_features=8), st.integers(1, 4), snapshot_times, st.data())
def test_mutated_rows_agree_with_oracle(schema, n, snapshot_time, data):
    kinds, dims, schema_id = schema
    base = [data.draw(st.none() | base_rows(kinds, dims, schema_id)) for _ in range(n)]
    delta = [data.draw(st.none() | delta_rows(kinds, dims, schema_id)) for _ in range(n)]
    for rows in (base, delta):
        for i in data.draw(st.lists(st.integers(0, n - 1), max_size=2)):
            if rows[i] is not None:
                rows[i] = mutate(rows[i], data.draw(mutations))
    layout = codec.Layout(schema_id, kinds, dims)
    mask = [True] * len(kinds)
    buf, offsets = joined([oracle.encode_row(kinds, dims, schema_id, 1, [None] * len(kinds))] * n)
    checks = {
        "overlay": (
            lambda: codec.overlay(layout, base, delta, snapshot_time, 0, None),
            [
                lambda i=i: oracle.overlay(
                    kinds, dims, schema_id, base[i], delta[i], snapshot_time, 0
                )
                for i in range(n)
            ],
        ),
        "delta_apply": (
            lambda: codec.delta_apply(layout, delta, buf, offsets, np.ones(len(kinds), np.uint8)),
            [
                lambda i=i: oracle.delta_apply(
                    kinds, dims, schema_id, delta[i], buf[offsets[i] : offsets[i + 1]], mask
                )
                for i in range(n)
            ],
        ),
        "delta_delete": (
            lambda: codec.delta_delete(layout, delta, np.zeros(n, np.int64)),
            [
                lambda i=i: oracle.delta_delete(kinds, dims, schema_id, delta[i], 0)
                for i in range(n)
            ],
        ),
        "delta_compact": (
            lambda: codec.delta_compact(layout, delta, snapshot_time),
            [
                lambda i=i: oracle.delta_compact(kinds, dims, schema_id, delta[i], snapshot_time)
                for i in range(n)
            ],
        ),
    }
    for call, oracle_calls in checks.values():
        expected = first_error(oracle_calls)
        if expected is None:
            assert call() == [each() for each in oracle_calls]
        else:
            expect_error(call, expected)


# --------------------------------------------------------------------------------------
# Bad arguments: the caller's mistakes are ValueError / TypeError, not corrupt rows


def test_a_bad_update_is_the_callers_error():
    layout = codec.Layout(SCHEMA_ID, KINDS, DIMS)
    mask = np.ones(4, np.uint8)
    buf, offsets = joined([BASE, BASE[:-1]])
    with pytest.raises(ValueError, match=r"^update 1: var data length mismatch") as raised:
        codec.delta_apply(layout, [None, DELTA], buf, offsets, mask)
    assert type(raised.value) is ValueError
    buf, offsets = joined([BASE, with_u32(BASE, 1, 9)])
    with pytest.raises(ValueError, match=r"^update 1: schema id 9, expected 4") as raised:
        codec.delta_apply(layout, [None, None], buf, offsets, mask)
    assert type(raised.value) is ValueError
    with pytest.raises(ValueError, match="update 0: bytes \\[0, 99\\) are not a range"):
        codec.delta_apply(layout, [None], BASE, np.array([0, 99]), mask)
    with pytest.raises(ValueError, match="new_offsets has 2 entries, expected 3"):
        codec.delta_apply(layout, [None, None], BASE, np.array([0, len(BASE)]), mask)
    with pytest.raises(ValueError, match="present has shape"):
        codec.delta_apply(layout, [None], BASE, np.array([0, len(BASE)]), np.ones(3, np.uint8))


def test_bad_arguments():
    layout = codec.Layout(SCHEMA_ID, KINDS, DIMS)
    with pytest.raises(ValueError, match="times has 1 entries, expected 2"):
        codec.delta_delete(layout, [None, None], np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="1 delta rows for 2 base rows"):
        codec.overlay(layout, [BASE, BASE], [None], 0, 0, None)
    with pytest.raises(ValueError, match="ttl_us has 3 entries, expected 4"):
        codec.overlay(layout, [BASE], [None], 0, 0, np.ones(3, np.int64))
    with pytest.raises(TypeError, match="row 0 must be bytes or None"):
        codec.overlay(layout, [bytearray(BASE)], [None], 0, 0, None)
    # valid_us receives the windows: an array it would have to convert (a copy that
    # the caller never sees) or could not write is refused, as is one too short.
    for bad in (
        np.zeros(2, np.int32),
        np.zeros(4, np.int64)[::2],
        np.frombuffer(bytes(16), np.int64),
        np.zeros(2, ">i8"),
        [0, 0],
    ):
        with pytest.raises(ValueError, match="valid_us must be a writable"):
            codec.overlay(layout, [BASE], [None], 0, 0, None, bad)
    with pytest.raises(ValueError, match="valid_us has 2 entries, 4 needed"):
        codec.overlay(layout, [BASE], [None], 0, 0, None, np.zeros(2, np.int64), 1)
    with pytest.raises(ValueError, match="valid_us has 2 entries"):
        codec.overlay(layout, [BASE], [None], 0, 0, None, np.zeros(2, np.int64), -2)
    with pytest.raises(TypeError, match="delta row 1 must be bytes or None"):
        codec.delta_compact(layout, [None, bytearray(DELTA)], 0)
    with pytest.raises(TypeError):
        codec.delta_info(layout, None)
    with pytest.raises(ValueError, match="2 stored rows but 1 incoming ones"):
        codec.delta_merge_rows(layout, [None, DELTA], [DELTA])


@examples
@given(schemas(max_features=10), st.integers(0, 5), st.data())
def test_delta_merge_rows_matches_oracle(schema, n, data):
    """A replica's catch-up and a move's replay merge another copy's rows by event time."""
    kinds, dims, schema_id = schema
    stored = [data.draw(st.none() | delta_rows(kinds, dims, schema_id)) for _ in range(n)]
    incoming = [data.draw(delta_rows(kinds, dims, schema_id)) for _ in range(n)]
    layout = codec.Layout(schema_id, kinds, dims)
    got = codec.delta_merge_rows(layout, stored, incoming)
    want = [
        oracle.delta_merge(kinds, dims, schema_id, old, new)
        for old, new in zip(stored, incoming, strict=True)
    ]
    assert got == want
    # Merging the same row again changes nothing: a change replayed twice converges.
    assert codec.delta_merge_rows(layout, got, incoming) == got


@examples
@given(schemas(max_features=6), st.data())
def test_replicas_converge_by_merging(schema, data):
    """Two replicas each applied part of a key's history (each op on at least one of
    them, in any order); merging one's row into the other's gives the whole history's
    row: what a returning replica's catch-up relies on."""
    kinds, dims, schema_id = schema
    layout = codec.Layout(schema_id, kinds, dims)
    ops = data.draw(histories(kinds, dims, schema_id))
    sides = data.draw(st.lists(st.sampled_from("ab+"), min_size=len(ops), max_size=len(ops)))
    on_a = [op for op, side in zip(ops, sides, strict=True) if side in "a+"]
    on_b = [op for op, side in zip(ops, sides, strict=True) if side in "b+"]
    a = replay(layout, data.draw(st.permutations(on_a)))
    b = replay(layout, data.draw(st.permutations(on_b)))
    if b is None:
        return
    (merged,) = codec.delta_merge_rows(layout, [a], [b])
    assert merged == replay(layout, ops)


def test_overlay_join_combines_on_a_base_row_with_stray_bytes_as_overlay_does():
    """overlay_join writes a combined row over a copy of its base row: a null feature's
    fixed bytes and the bitmap's padding bits, whatever the stored row holds there, come
    out as overlay's freshly assembled row has them."""
    layout = codec.Layout(SCHEMA_ID, KINDS, DIMS)
    clean = oracle.encode_row(KINDS, DIMS, SCHEMA_ID, 10, [None, "abc", [1.0, 2.0], b"xy"])
    stray = bytearray(clean)
    stray[13] |= 0xF0  # the 4 features' bitmap byte: bits 4-7 are padding
    at = LAYOUT.ends_start - 8 - 4  # feature 0's int32, before the float32[2] vector
    stray[at : at + 4] = b"\x07\x07\x07\x07"
    deltas = [
        oracle.encode_delta_row(
            KINDS, DIMS, SCHEMA_ID, 20, 5, [None, 20, None, None], [None, "de", None, None]
        ),
        oracle.encode_delta_row(
            KINDS, DIMS, SCHEMA_ID, 20, 5, [20, None, 20, None], [3, None, None, None]
        ),
    ]
    for base in (clean, bytes(stray)):
        for delta in deltas:
            rows = codec.overlay(layout, [base], [delta], 0, 0, None)
            assert rows[0] is not base  # combined
            block, lengths = codec.overlay_join(layout, [([delta], [base])], 0, 0)
            assert (block, lengths.tolist()) == (rows[0], [len(rows[0])])


@pytest.mark.parametrize("stray", [0, 1, 64])
def test_a_whole_row_with_a_null_string_holding_bytes_reads_as_the_oracle_says(stray):
    """A format-3 row with every feature present, a null string among them and bytes
    stored for it anyway (valid by the format; a corrupted bitmap can make one): read
    whole, it was copied with those bytes into an answer sized without them (past the
    end of the answer's bytes object: found by a byte-flip fuzz in review)."""
    kinds, dims, schema_id = [codec.KIND_INT64, codec.KIND_STRING], [0, 0], 3
    layout = codec.Layout(schema_id, kinds, dims)
    clean = oracle.encode_delta_row(
        kinds, dims, schema_id, 120, codec.NO_DELETE, [120, 120], [7, None]
    )
    row = clean[:-4] + struct.pack("<I", stray) + b"A" * stray  # the string's end, its bytes
    assert oracle.check_delta_row(kinds, dims, schema_id, row) is None
    want = oracle.overlay(kinds, dims, schema_id, None, row, codec.NO_DELETE, 200, None)
    (got,) = codec.overlay(layout, [None], [row], codec.NO_DELETE, 200, None)
    assert got == want
    block, lengths = codec.overlay_join(layout, [([row], [None])], codec.NO_DELETE, 200, None)
    assert (block, lengths.tolist()) == (want, [len(want)])
