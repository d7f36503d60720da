"""The row codec (kvstore._codec), checked against the plain-Python oracle.

Every property draws a random schema (every kind, float32 vectors of several sizes),
rows with nulls, empty and non-ASCII values, special floats and extreme integers,
and compares the codec with tests/rowformat_oracle.py byte for byte.
"""

import math
import os
import pickle
import random
import struct

import numpy as np
import pytest
import rowformat_oracle as oracle
import xxhash
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from rowformat_strategies import (
    INT32_MIN,
    INT64_MAX,
    INT64_MIN,
    dirty,
    int64s,
    mutate,
    mutations,
    same_value,
    schemas,
    texts,
    value_strategy,
)

from kvstore import _codec as codec

# A local settings object rather than a profile, so that other test modules keep theirs.
# KVSTORE_CODEC_EXAMPLES=5000 runs a long search.
examples = settings(
    max_examples=int(os.environ.get("KVSTORE_CODEC_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

FIXED_DTYPES = {
    oracle.BOOL: np.bool_,
    oracle.INT32: np.int32,
    oracle.INT64: np.int64,
    oracle.FLOAT32: np.float32,
    oracle.FLOAT64: np.float64,
    oracle.FLOAT32_VECTOR: np.float32,
}
# What a null row holds in a values column: the codec must write zero bytes anyway.
JUNK = {
    oracle.BOOL: True,
    oracle.INT32: -7,
    oracle.INT64: INT64_MIN,
    oracle.FLOAT32: math.nan,
    oracle.FLOAT64: -1.5,
    oracle.STRING: b"junk",
    oracle.BYTES: b"\xff",
    oracle.INT64_LIST: struct.pack("<q", 42),
}


# --------------------------------------------------------------------------------------
# Strategies


@st.composite
def batches(draw, max_rows: int = 6, max_features: int = 12):
    """A schema and rows: (kinds, dims, schema_id, event_times, rows, absent).

    ``absent[f]`` marks a feature the write leaves out: null in every row.
    """
    kinds, dims, schema_id = draw(schemas(max_features))
    n = draw(st.integers(0, max_rows))
    absent = [draw(st.integers(0, 5)) == 0 for _ in kinds]
    rows = []
    for _ in range(n):
        row = []
        for kind, dim, is_absent in zip(kinds, dims, absent, strict=True):
            value = None if is_absent else draw(st.none() | value_strategy(kind, dim))
            row.append(value)
        rows.append(row)
    event_times = draw(st.lists(int64s, min_size=n, max_size=n))
    return kinds, dims, schema_id, event_times, rows, absent


def oracle_rows(kinds, dims, schema_id, event_times, rows) -> list[bytes]:
    return [
        oracle.encode_row(kinds, dims, schema_id, t, row)
        for t, row in zip(event_times, rows, strict=True)
    ]


# --------------------------------------------------------------------------------------
# Between Python values and codec columns


def mask(valid: list[bool], style: str):
    """A valid mask in one of the accepted forms."""
    if style == "none" and all(valid):
        return None
    if style == "bool":
        return np.array(valid, dtype=np.bool_)
    return np.array(valid, dtype=np.uint8)


def to_column(kind: int, dim: int, values: list, style: str):
    """The encode_rows column of one feature's values (None = null)."""
    n = len(values)
    valid = [v is not None for v in values]
    if kind in oracle.VAR_KINDS:
        chunks = [
            JUNK[kind] * (i % 2) if v is None else oracle.encode_value(kind, dim, v)
            for i, v in enumerate(values)
        ]
        offsets = np.zeros(n + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(c) for c in chunks], dtype=np.int64)
        data = b"".join(chunks)
        if style == "bool" and kind == oracle.INT64_LIST:
            data = np.frombuffer(data, dtype=np.int64)
        elif style == "bool":
            data = np.frombuffer(data, dtype=np.uint8)
        elif style == "uint8":
            data = bytearray(data)
        return offsets, data, mask(valid, style)
    junk = [JUNK[oracle.FLOAT32]] * dim if kind == oracle.FLOAT32_VECTOR else JUNK[kind]
    filled = [junk if v is None else v for v in values]
    dtype = FIXED_DTYPES[kind]
    if kind == oracle.BOOL and style == "uint8":
        dtype = np.uint8
    if kind == oracle.FLOAT32_VECTOR:
        array = np.array(filled, dtype=dtype).reshape(n, dim)
    else:
        array = np.array(filled, dtype=dtype)
    return array, mask(valid, style)


def to_columns(kinds, dims, rows, absent, styles):
    columns = []
    for f, (kind, dim) in enumerate(zip(kinds, dims, strict=True)):
        if absent[f]:
            columns.append(None)
        else:
            columns.append(to_column(kind, dim, [row[f] for row in rows], styles[f % len(styles)]))
    return columns


def decoded_value(kind: int, dim: int, column, i: int):
    """Row i of a decode_columns column as a Python value (None when not valid)."""
    valid = column[-1]
    if not valid[i]:
        return None
    if kind in oracle.VAR_KINDS:
        offsets, data, _ = column
        raw = data[offsets[i] : offsets[i + 1]].tobytes()
        return oracle.decode_value(kind, dim, raw)
    values = column[0]
    return oracle.decode_value(kind, dim, values[i].tobytes())


def packed(rows: list[bytes | None], gap: bytes = b"") -> tuple[bytes, np.ndarray, np.ndarray]:
    """rows in one buffer (gap before each) as decode_columns takes them; None = missing."""
    buf, starts, lengths = b"", [], []
    for row in rows:
        buf += gap
        if row is None:
            starts.append(-3)  # ignored for a missing row
            lengths.append(-1)
        else:
            starts.append(len(buf))
            lengths.append(len(row))
            buf += row
    return buf, np.array(starts, dtype=np.int64), np.array(lengths, dtype=np.int64)


# --------------------------------------------------------------------------------------
# The oracle itself


@examples
@given(batches())
def test_oracle_round_trips(batch):
    kinds, dims, schema_id, event_times, rows, _ = batch
    for row_bytes, t, row in zip(
        oracle_rows(kinds, dims, schema_id, event_times, rows), event_times, rows, strict=True
    ):
        assert oracle.check_row(kinds, dims, schema_id, row_bytes) is None
        decoded_time, values = oracle.decode_row(kinds, dims, schema_id, row_bytes)
        assert decoded_time == t
        for kind, got, want in zip(kinds, values, row, strict=True):
            assert same_value(kind, got, want)


def test_oracle_example_row():
    # bool, int32, string, float32[2]; the string is null
    row = oracle.encode_row([0, 1, 6, 5], [0, 0, 0, 2], 7, 1_000, [True, -2, None, [1.0, 2.0]])
    assert row == (
        b"\x01" + b"\x07\x00\x00\x00" + (1000).to_bytes(8, "little")  # header
        + b"\x04"  # feature 2 is null
        + b"\x01" + b"\xfe\xff\xff\xff" + struct.pack("<2f", 1.0, 2.0)  # fixed section
        + b"\x00\x00\x00\x00"  # the null string ends at 0
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Layout


@examples
@given(schemas())
def test_layout_matches_oracle(schema):
    kinds, dims, schema_id = schema
    layout = codec.Layout(schema_id, kinds, dims)
    want = oracle.layout(kinds, dims)
    assert layout.schema_id == schema_id
    assert layout.n_features == len(kinds)
    assert layout.kinds == kinds
    assert layout.dims == list(want.dims)
    assert layout.widths == list(want.widths)
    assert layout.fixed_offsets == list(want.fixed_offsets)
    assert layout.var_index == list(want.var_index)
    assert layout.null_bitmap_size == want.null_bitmap_size
    assert layout.fixed_size == want.fixed_size
    assert layout.n_var == want.n_var
    n_var = sum(kind in oracle.VAR_KINDS for kind in kinds)
    bitmap = (len(kinds) + 7) // 8
    assert layout.min_row_size == want.min_row_size == 13 + bitmap + sum(want.widths) + 4 * n_var
    assert pickle.loads(pickle.dumps(layout)).kinds == kinds
    assert repr(layout).startswith("Layout(schema_id=")


def test_layout_constants():
    assert (codec.FORMAT_VERSION, codec.HEADER_SIZE) == (1, 13)
    kinds = [
        codec.KIND_BOOL,
        codec.KIND_INT32,
        codec.KIND_INT64,
        codec.KIND_FLOAT32,
        codec.KIND_FLOAT64,
        codec.KIND_FLOAT32_VECTOR,
        codec.KIND_STRING,
        codec.KIND_BYTES,
        codec.KIND_INT64_LIST,
        codec.KIND_FLOAT16_VECTOR,
        codec.KIND_INT8_VECTOR,
    ]
    assert kinds == list(oracle.ALL_KINDS)


def test_layout_ignores_dims_of_other_kinds():
    layout = codec.Layout(1, [codec.KIND_INT32, codec.KIND_FLOAT32_VECTOR], [5, 3])
    assert layout.dims == [0, 3]
    assert layout.widths == [4, 12]


@pytest.mark.parametrize(
    ("schema_id", "kinds", "dims", "message"),
    [
        (1, [11], [0], "kind 11"),
        (1, [-1], [0], "kind -1"),
        (1, [9], [0], "dim"),
        (1, [10], [-2], "dim"),
        (1, [5], [0], "dim"),
        (1, [5], [-2], "dim"),
        (-1, [0], [0], "u32"),
        (2**32, [0], [0], "u32"),
        (1, [0, 1], [0], "one per feature"),
    ],
)
def test_layout_rejects_bad_schemas(schema_id, kinds, dims, message):
    with pytest.raises(ValueError, match=message):
        codec.Layout(schema_id, kinds, dims)


def test_layout_is_immutable():
    layout = codec.Layout(1, [0], [0])
    with pytest.raises(AttributeError):
        layout.schema_id = 2
    with pytest.raises(TypeError, match="immutable"):
        layout.__init__(2, [1], [0])  # the codec reads its arrays without the GIL
    assert (layout.schema_id, layout.kinds) == (1, [0])


# --------------------------------------------------------------------------------------
# encode_rows


styles = st.lists(st.sampled_from(["none", "bool", "uint8"]), min_size=1, max_size=4)


@examples
@given(batches(), styles)
def test_encode_matches_oracle(batch, column_styles):
    kinds, dims, schema_id, event_times, rows, absent = batch
    layout = codec.Layout(schema_id, kinds, dims)
    columns = to_columns(kinds, dims, rows, absent, column_styles)
    block, offsets = codec.encode_rows(
        layout, columns, len(rows), np.array(event_times, dtype=np.int64)
    )
    want = oracle_rows(kinds, dims, schema_id, event_times, rows)
    assert isinstance(block, bytes)
    assert block == b"".join(want)
    assert offsets.dtype == np.int64
    assert offsets.tolist() == [0, *np.cumsum([len(r) for r in want]).tolist()]


def test_encode_null_values_are_zero_whatever_the_column_holds():
    layout = codec.Layout(3, [codec.KIND_INT64, codec.KIND_BYTES, codec.KIND_BOOL], [0, 0, 0])
    columns = [
        (np.array([-1, 5], dtype=np.int64), np.array([0, 1], dtype=np.uint8)),
        (np.array([0, 3, 3]), b"abc", np.array([False, True])),  # null row 0 still spans "abc"
        (np.array([2, 0], dtype=np.uint8), None),  # uint8 bools: nonzero is true, stored as 1
    ]
    block, _ = codec.encode_rows(layout, columns, 2, np.array([1, 2]))
    want = oracle_rows([2, 7, 0], [0, 0, 0], 3, [1, 2], [[None, None, True], [5, b"", False]])
    assert block == b"".join(want)


def test_encode_a_partial_update_of_a_wide_row_matches_the_oracle():
    """A stream's update sets a few features of a wide row: the absent ones (fixed and
    var, before and after the set ones) are null and zero in every row, as are a set
    feature's null values, whatever junk its column holds there."""
    F = codec.KIND_FLOAT32
    kinds = [F] * 10 + [codec.KIND_FLOAT32_VECTOR, codec.KIND_STRING, codec.KIND_INT64] + [F] * 9
    dims = [0] * 10 + [3, 0, 0] + [0] * 9
    layout = codec.Layout(7, kinds, dims)
    n = 5
    columns: list = [None] * len(kinds)
    columns[2] = (np.arange(n, dtype=np.float32) + 0.5, None)
    columns[9] = (np.full(n, 9.0, np.float32), np.array([1, 0, 1, 0, 1], np.uint8))
    columns[12] = (np.arange(n, dtype=np.int64) - 2, np.array([0, 1, 1, 1, 0], np.uint8))
    columns[21] = (np.full(n, -1.25, np.float32), None)
    block, _ = codec.encode_rows(layout, columns, n, np.arange(n, dtype=np.int64) + 100)
    rows = []
    for i in range(n):
        row: list = [None] * len(kinds)
        row[2] = i + 0.5
        row[9] = 9.0 if i % 2 == 0 else None
        row[12] = i - 2 if 0 < i < 4 else None
        row[21] = -1.25
        rows.append(row)
    want = oracle_rows(kinds, dims, 7, [100 + i for i in range(n)], rows)
    assert block == b"".join(want)


def test_encode_empty_batch_and_empty_schema():
    layout = codec.Layout(1, [codec.KIND_STRING, codec.KIND_FLOAT32_VECTOR], [0, 4])
    columns = [(np.zeros(1, np.int64), b"", None), (np.zeros((0, 4), np.float32), None)]
    block, offsets = codec.encode_rows(layout, columns, 0, np.zeros(0, np.int64))
    assert block == b""
    assert offsets.tolist() == [0]
    block, offsets = codec.encode_rows(codec.Layout(2, [], []), [], 2, np.array([5, 6]))
    assert block == oracle.encode_row([], [], 2, 5, []) + oracle.encode_row([], [], 2, 6, [])
    assert offsets.tolist() == [0, 13, 26]


BAD_COLUMNS = [
    (3, (np.zeros(5, np.float64), None), "feature 3 .*values has 5 rows, expected 6"),
    (3, (np.zeros(6, np.float32), None), "feature 3 .*dtype float32, expected float64"),
    (3, (np.zeros((6, 1), np.float64), None), "feature 3 .*shape"),
    (3, [np.zeros(6, np.float64), None], "feature 3 .*expected None or \\(values, valid\\)"),
    (3, (np.zeros(6, np.float64), np.ones(5, np.uint8)), "feature 3 .*valid has shape"),
    (3, (np.zeros(6, np.float64), np.ones(6, np.int32)), "feature 3 .*valid has dtype"),
    (0, (np.zeros(6, np.int8), None), "feature 0 .*dtype int8"),
    (1, (np.zeros((6, 3), np.float32), None), "feature 1 .*shape \\(6, 3\\), expected \\(6, 2\\)"),
    (2, (np.zeros(6, np.int64), b"", None), "feature 2 .*offsets has 6 entries, expected 7"),
    (2, (np.zeros(7, np.float64), b"", None), "feature 2 .*offsets has dtype float64"),
    (2, (np.array([0, 1, 2, 3, 4, 5, 9]), b"abc", None), "feature 2 .*not a range of the 3-byte"),
    (2, (np.array([0, 2, 1, 3, 3, 3, 3]), b"abc", None), "feature 2 .*\\[2, 1\\) of row 1"),
    (2, (np.zeros(7, np.int64), "text", None), "feature 2 .*bytes-like"),
    (4, (np.array([0, 8, 12, 16, 16, 16, 16]), bytes(16), None), "feature 4 .*multiples of 8"),
]


@pytest.mark.parametrize(("feature", "column", "message"), BAD_COLUMNS)
def test_encode_rejects_bad_columns(feature, column, message):
    kinds = [codec.KIND_BOOL, codec.KIND_FLOAT32_VECTOR, codec.KIND_STRING, codec.KIND_FLOAT64]
    kinds.append(codec.KIND_INT64_LIST)
    layout = codec.Layout(1, kinds, [0, 2, 0, 0, 0])
    columns: list = [None] * 5
    columns[feature] = column
    with pytest.raises((ValueError, TypeError), match=message):
        codec.encode_rows(layout, columns, 6, np.zeros(6, np.int64))


def test_encode_rejects_bad_arguments():
    layout = codec.Layout(1, [codec.KIND_INT32], [0])
    with pytest.raises(ValueError, match="columns has 2 entries, expected 1"):
        codec.encode_rows(layout, [None, None], 1, np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="event_times has 2 entries, expected 1"):
        codec.encode_rows(layout, [None], 1, np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="event_times has dtype float64"):
        codec.encode_rows(layout, [None], 1, np.zeros(1, np.float64))
    with pytest.raises(ValueError, match="n_rows"):
        codec.encode_rows(layout, [None], -1, np.zeros(0, np.int64))


def test_encode_ignores_offsets_of_null_var_values():
    layout = codec.Layout(1, [codec.KIND_INT64_LIST], [0])
    # row 0 is null and spans 16 bytes, row 1 is null and its offsets decrease
    column = (np.array([0, 16, 8, 8]), bytes(range(16)), np.array([0, 0, 1], np.uint8))
    block, _ = codec.encode_rows(layout, [column], 3, np.zeros(3, np.int64))
    want = oracle_rows([8], [0], 1, [0, 0, 0], [[None], [None], [[]]])
    assert block == b"".join(want)


# --------------------------------------------------------------------------------------
# decode_columns


@examples
@given(batches(max_rows=8), st.data())
def test_decode_matches_oracle(batch, data):
    kinds, dims, schema_id, event_times, rows, _ = batch
    # dirty rows: decoding must not copy the bytes of nulls, nor bools other than 0/1
    encoded = [
        dirty(kinds, dims, row) for row in oracle_rows(kinds, dims, schema_id, event_times, rows)
    ]
    # Rows arrive in any order, with bytes between them, and some keys are missing.
    order = data.draw(st.permutations(range(len(rows))))
    missing = data.draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows)))
    wanted = [None if missing[i] else i for i in order] + [None] * data.draw(st.integers(0, 2))
    buf, starts, lengths = packed([None if i is None else encoded[i] for i in wanted], b"\xee")
    projection = []
    if kinds:
        projection = data.draw(
            st.lists(st.integers(0, len(kinds) - 1), max_size=2 * len(kinds) + 2)
        )

    layout = codec.Layout(schema_id, kinds, dims)
    columns, times = codec.decode_columns(layout, projection, buf, starts, lengths)

    n = len(wanted)
    assert times.dtype == np.int64
    assert times.tolist() == [0 if i is None else event_times[i] for i in wanted]
    assert len(columns) == len(projection)
    for f, column in zip(projection, columns, strict=True):
        kind, dim = kinds[f], dims[f]
        valid = column[-1]
        assert valid.dtype == np.uint8 and valid.shape == (n,)
        if kind in oracle.VAR_KINDS:
            offsets, data_bytes, _ = column
            assert offsets.dtype == np.int64 and offsets.shape == (n + 1,)
            assert data_bytes.dtype == np.uint8 and data_bytes.ndim == 1
            assert offsets[0] == 0 and offsets[-1] == len(data_bytes)
        else:
            values = column[0]
            assert values.dtype == FIXED_DTYPES[kind]
            assert values.shape == ((n, dim) if kind == oracle.FLOAT32_VECTOR else (n,))
            if kind == oracle.BOOL:
                assert set(values.view(np.uint8).tolist()) <= {0, 1}  # numpy bools are 0 or 1
        for row, i in enumerate(wanted):
            want = None if i is None else rows[i][f]
            assert valid[row] == (want is not None)
            assert same_value(kind, decoded_value(kind, dim, column, row), want)
            if want is None and kind in (oracle.FLOAT32, oracle.FLOAT64, oracle.FLOAT32_VECTOR):
                assert np.isnan(column[0][row]).all()  # null and missing floats are NaN
            elif want is None and kind not in oracle.VAR_KINDS:
                assert not column[0][row].any()  # other null and missing entries are zero
            if want is None and kind in oracle.VAR_KINDS:
                assert column[0][row] == column[0][row + 1]  # and empty


def test_decode_normalises_sloppy_rows():
    kinds, dims = [codec.KIND_BOOL, codec.KIND_INT32, codec.KIND_BOOL], [0, 0, 0]
    layout = codec.Layout(1, kinds, dims)
    row = dirty(kinds, dims, oracle.encode_row(kinds, dims, 1, 9, [True, None, False]))
    assert row[-6:] == b"\x80\xab\xab\xab\xab\x00"  # true bool 0x80, null int32 0xab...
    buf, starts, lengths = packed([row])
    (flags, flag_valid), (ints, int_valid) = codec.decode_columns(
        layout, [0, 1], buf, starts, lengths
    )[0]
    assert flags.view(np.uint8).tolist() == [1] and flag_valid.tolist() == [1]
    assert ints.tolist() == [0] and int_valid.tolist() == [0]


def test_decode_repeated_projection_gives_separate_arrays():
    layout = codec.Layout(1, [codec.KIND_FLOAT64, codec.KIND_STRING], [0, 0])
    row = oracle.encode_row([4, 6], [0, 0], 1, 9, [2.5, "héllo"])
    buf, starts, lengths = packed([row])
    columns, _ = codec.decode_columns(layout, [1, 0, 1, 0], buf, starts, lengths)
    assert columns[0][1].tobytes() == "héllo".encode()
    assert columns[0][1] is not columns[2][1]
    columns[1][0][0] = 7.0
    assert columns[3][0][0] == 2.5


def test_decode_missing_rows_and_empty_inputs():
    layout = codec.Layout(1, [codec.KIND_FLOAT32_VECTOR, codec.KIND_BYTES], [3, 0])
    buf, starts, lengths = packed([None, None])
    columns, times = codec.decode_columns(layout, [0, 1], buf, starts, lengths)
    (vectors, vector_valid), (offsets, data, bytes_valid) = columns
    assert vectors.shape == (2, 3) and np.isnan(vectors).all()
    assert vector_valid.tolist() == bytes_valid.tolist() == [0, 0]
    assert offsets.tolist() == [0, 0, 0] and data.size == 0
    assert times.tolist() == [0, 0]
    empty = np.zeros(0, np.int64)
    columns, times = codec.decode_columns(layout, [0, 1], b"", empty, empty)
    assert columns[0][0].shape == (0, 3) and columns[1][0].tolist() == [0]
    columns, times = codec.decode_columns(layout, [], buf, starts, lengths)
    assert columns == [] and times.tolist() == [0, 0]


def test_decode_reports_found_complete_and_column_kinds():
    kinds = [codec.KIND_FLOAT32, codec.KIND_INT32, codec.KIND_STRING, codec.KIND_FLOAT32_VECTOR]
    layout = codec.Layout(1, kinds, [0, 0, 0, 2])
    full = oracle.encode_row(kinds, [0, 0, 0, 2], 1, 7, [1.5, 3, "ab", [1.0, 2.0]])
    nulls = oracle.encode_row(kinds, [0, 0, 0, 2], 1, 8, [2.5, None, None, None])
    buf, starts, lengths = packed([full, None, nulls])
    projection = codec.Projection(layout, [0, 1, 2, 3])
    assert len(projection) == 4 and projection.features == (0, 1, 2, 3)
    assert projection.masked_columns == (1,) and projection.var_columns == (2,)
    decoded = codec.decode(projection, buf, starts, lengths)
    assert decoded.n == 3 and decoded.found.tolist() == [True, False, True]
    assert decoded.event_times.tolist() == [7, 0, 8]
    assert decoded.complete == [False, False, False, False]
    values = decoded.values_dict(["a", "b", "c", "d"])
    assert list(values) == ["a", "b", "c", "d"] and values["c"] is None
    assert values["a"].tolist()[0::2] == [1.5, 2.5] and np.isnan(values["a"][1])
    assert values["b"].tolist() == [3, 0, 0] and decoded.valid(1).tolist() == [1, 0, 0]
    assert values["d"].shape == (3, 2) and np.isnan(values["d"][1:]).all()
    offsets, data, valid = decoded.column(2)
    assert offsets.tolist() == [0, 2, 2, 2] and data.tobytes() == b"ab"
    assert valid.tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="column 2 is a var column"):
        decoded.values(2)
    with pytest.raises(ValueError, match="3 names for 4 columns"):
        decoded.values_dict(["a", "b", "c"])
    with pytest.raises(TypeError, match=r"comes from kvstore\._codec\.decode"):
        codec.Decoded().values_dict([])
    only_full = codec.decode(codec.Projection(layout, [0, 0]), *packed([full]))
    assert only_full.complete == [True, True]
    with pytest.raises(ValueError, match="projection names feature 4"):
        codec.Projection(layout, [4])


def test_numpy_dict_is_values_masked_and_objects_in_one_call():
    kinds = [codec.KIND_FLOAT32, codec.KIND_INT32, codec.KIND_STRING, codec.KIND_BOOL]
    kinds += [codec.KIND_FLOAT32_VECTOR, codec.KIND_INT64_LIST, codec.KIND_INT64]
    kinds += [codec.KIND_BYTES, codec.KIND_FLOAT64]
    dims = [0, 0, 0, 0, 2, 0, 0, 0, 0]
    layout = codec.Layout(1, kinds, dims)
    full = oracle.encode_row(
        kinds, dims, 1, 7, [1.5, -3, "é", True, [1.0, 2.0], [4, -5], 2**40, b"\x00z", 0.25]
    )
    nulls = oracle.encode_row(kinds, dims, 1, 8, [None] * 9)
    names = list("abcdefghi")
    for rows in ([full, None, nulls], [full], []):
        decoded = codec.decode(codec.Projection(layout, range(9)), *packed(rows))
        got = decoded.numpy_dict(names)
        assert list(got) == names
        want = decoded.values_dict(names)
        for k in decoded.projection.masked_columns:
            want[names[k]] = decoded.masked(k)
        for k in decoded.projection.var_columns:
            want[names[k]] = decoded.objects(k)
        for k, name in enumerate(names):
            g, w = got[name], want[name]
            assert type(g) is type(w) and g.dtype == w.dtype and g.shape == w.shape, name
            if k in decoded.projection.masked_columns:
                assert g.mask.tolist() == w.mask.tolist() and g.data.tolist() == w.data.tolist()
                assert g.mask is not w.mask and g.fill_value == w.fill_value
                assert not rows or np.shares_memory(g.data, decoded.values(k))
            elif k in decoded.projection.var_columns:
                assert [v if v is None or k != 5 else v.tolist() for v in g] == [
                    v if v is None or k != 5 else v.tolist() for v in w
                ]
            else:
                assert np.array_equal(g, w, equal_nan=True)
                assert not rows or np.shares_memory(g, decoded.values(k))
    assert got["a"].shape == (0,) and got["e"].shape == (0, 2) and got["c"].shape == (0,)
    one = codec.decode(codec.Projection(layout, range(9)), *packed([full, nulls])).numpy_dict(names)
    assert one["b"].tolist() == [-3, None] and one["d"].tolist() == [True, None]
    assert one["c"].tolist() == ["é", None] and one["h"].tolist() == [b"\x00z", None]
    assert one["f"][0].tolist() == [4, -5] and one["f"][1] is None
    assert one["g"].tolist() == [2**40, None] and np.isnan(one["i"][1])
    lists = codec.decode(codec.Projection(layout, range(9)), *packed([nulls, full])).pylists()
    assert lists == [
        [None, 1.5], [None, -3], [None, "é"], [None, True], [None, [1.0, 2.0]],
        [None, [4, -5]], [None, 2**40], [None, b"\x00z"], [None, 0.25],
    ]  # fmt: skip
    assert [type(column[1]) for column in lists] == [
        float, int, str, bool, list, list, int, bytes, float
    ]  # fmt: skip
    assert codec.decode(codec.Projection(layout, [2, 0]), *packed([])).pylists() == [[], []]
    with pytest.raises(TypeError, match=r"comes from kvstore\._codec\.decode"):
        codec.Decoded().pylists()
    with pytest.raises(ValueError, match="8 names for 9 columns"):
        decoded.numpy_dict(names[:8])
    with pytest.raises(TypeError, match=r"comes from kvstore\._codec\.decode"):
        codec.Decoded().numpy_dict([])


def test_decode_fills_nan_in_every_float_kind_of_a_repeated_projection():
    kinds = [codec.KIND_FLOAT64, codec.KIND_FLOAT32_VECTOR, codec.KIND_BOOL]
    layout = codec.Layout(1, kinds, [0, 3, 0])
    row = oracle.encode_row(kinds, [0, 3, 0], 1, 5, [None, [1.0, 2.0, 3.0], True])
    decoded = codec.decode(codec.Projection(layout, [0, 1, 0, 1, 2]), *packed([None, row]))
    assert decoded.complete == [False] * 5
    for k in (0, 2):
        assert decoded.values(k).dtype == np.float64 and np.isnan(decoded.values(k)).all()
    for k in (1, 3):
        assert np.isnan(decoded.values(k)[0]).all()
        assert decoded.values(k)[1].tolist() == [1.0, 2.0, 3.0]
    assert decoded.values(1) is not decoded.values(3)
    assert decoded.values(4).tolist() == [False, True]  # bools stay False where missing


def test_decode_accepts_any_buffer():
    layout = codec.Layout(5, [codec.KIND_INT32], [0])
    row = oracle.encode_row([1], [0], 5, 3, [INT32_MIN])
    for buf in (row, bytearray(row), memoryview(row), np.frombuffer(row, np.uint8)):
        columns, _ = codec.decode_columns(layout, [0], buf, np.array([0]), np.array([len(row)]))
        assert columns[0][0].tolist() == [INT32_MIN]


def test_buffers_must_be_contiguous():
    strided = memoryview(b"abcdef")[::2]
    with pytest.raises(ValueError, match="buf must be a contiguous buffer"):
        codec.split_rows(strided, np.array([0, 1]))
    with pytest.raises(TypeError, match="bytes-like"):
        codec.xxh3_64("text")


def test_decode_rejects_bad_arguments():
    layout = codec.Layout(5, [codec.KIND_INT32], [0])
    row = oracle.encode_row([1], [0], 5, 3, [1])
    with pytest.raises(ValueError, match="projection names feature 1"):
        codec.decode_columns(layout, [1], row, np.array([0]), np.array([len(row)]))
    with pytest.raises(ValueError, match="lengths has 2 entries, expected 1"):
        codec.decode_columns(layout, [0], row, np.array([0]), np.array([len(row), 1]))
    with pytest.raises(ValueError, match="bytes \\[1, 19\\) lie outside the 18-byte buffer"):
        codec.decode_columns(layout, [0], row, np.array([1]), np.array([len(row)]))
    with pytest.raises(ValueError, match="outside"):
        codec.check_rows(layout, row, np.array([-1]), np.array([2]))


# --------------------------------------------------------------------------------------
# Corrupt rows: check_rows and decode_columns name the first bad row

# a schema with two var features, so that ends can decrease
KINDS = [codec.KIND_INT32, codec.KIND_STRING, codec.KIND_FLOAT32_VECTOR, codec.KIND_BYTES]
DIMS = [0, 0, 2, 0]
SCHEMA_ID = 4
GOOD = oracle.encode_row(KINDS, DIMS, SCHEMA_ID, 10, [1, "abc", [1.0, 2.0], b"xy"])
ENDS = oracle.layout(KINDS, DIMS).ends_start  # 26: u32 end of the string, then of the bytes


def with_u32(row: bytes, offset: int, value: int) -> bytes:
    return row[:offset] + struct.pack("<I", value) + row[offset + 4 :]


CORRUPTIONS = {
    "truncated header": (GOOD[:12], "length 12 is shorter than the 34-byte minimum"),
    "truncated fixed section": (GOOD[:20], "length 20 is shorter than the 34-byte minimum"),
    "truncated var data": (
        GOOD[:-1],
        "var data length mismatch: the var ends cover 5 bytes, the row holds 4",
    ),
    "trailing garbage": (
        GOOD + b"\x00",
        "var data length mismatch: the var ends cover 5 bytes, the row holds 6",
    ),
    "bad format byte": (b"\x07" + GOOD[1:], "format byte 0x07, expected 0x01"),
    "decreasing var ends": (
        with_u32(GOOD, ENDS, 6),
        "var ends decrease: feature 3 ends at 5, before the previous end 6",
    ),
    "wrong schema id": (with_u32(GOOD, 1, 9), "schema id 9, expected 4"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
@pytest.mark.parametrize("position", [0, 2])
def test_corrupt_rows_are_named(case, position):
    bad, reason = CORRUPTIONS[case]
    assert oracle.check_row(KINDS, DIMS, SCHEMA_ID, bad) == reason
    rows: list[bytes | None] = [GOOD, None, GOOD, GOOD]
    rows[position] = bad
    rows.append(bad)  # a second bad row after the first one
    buf, starts, lengths = packed(rows, b"\x01")
    layout = codec.Layout(SCHEMA_ID, KINDS, DIMS)

    assert codec.check_rows(layout, buf, starts, lengths) == (position, reason)
    with pytest.raises(ValueError) as raised:
        codec.decode_columns(layout, [0, 1], buf, starts, lengths)
    error = raised.value
    assert error.index == position
    if case == "wrong schema id":
        assert type(error) is codec.SchemaMismatch
        assert error.schema_id == 9
    else:
        assert type(error) is codec.CorruptRow
        assert error.reason == reason
        assert reason in str(error) and f"row {position}" in str(error)


def test_good_rows_pass_check_rows():
    layout = codec.Layout(SCHEMA_ID, KINDS, DIMS)
    buf, starts, lengths = packed([GOOD, None, GOOD], b"garbage between rows")
    assert codec.check_rows(layout, buf, starts, lengths) is None
    assert codec.check_rows(layout, b"", np.zeros(0, np.int64), np.zeros(0, np.int64)) is None


@examples
@given(batches(max_rows=4, max_features=10), st.data())
def test_check_rows_agrees_with_oracle(batch, data):
    kinds, dims, schema_id, event_times, rows, _ = batch
    assume(rows)
    encoded = oracle_rows(kinds, dims, schema_id, event_times, rows)
    for i in data.draw(st.lists(st.integers(0, len(rows) - 1), max_size=2)):
        encoded[i] = mutate(encoded[i], data.draw(mutations))
    layout = codec.Layout(schema_id, kinds, dims)
    buf, starts, lengths = packed(encoded)
    faults = [oracle.check_row(kinds, dims, schema_id, row) for row in encoded]
    first = next(((i, f) for i, f in enumerate(faults) if f is not None), None)
    assert codec.check_rows(layout, buf, starts, lengths) == first
    if first is None:
        codec.decode_columns(layout, list(range(len(kinds))), buf, starts, lengths)
    else:
        with pytest.raises((codec.CorruptRow, codec.SchemaMismatch)) as raised:
            codec.decode_columns(layout, [], buf, starts, lengths)
        assert raised.value.index == first[0]


# --------------------------------------------------------------------------------------
# Errors


def test_errors_are_value_errors_that_pickle():
    corrupt = codec.CorruptRow(3, "format byte 0x07, expected 0x01")
    assert isinstance(corrupt, ValueError)
    assert (corrupt.index, corrupt.reason) == (3, "format byte 0x07, expected 0x01")
    assert str(corrupt) == "row 3 is corrupt: format byte 0x07, expected 0x01"
    mismatch = codec.SchemaMismatch(5, 9)
    assert isinstance(mismatch, ValueError)
    assert (mismatch.index, mismatch.schema_id) == (5, 9)
    assert str(mismatch) == "row 5 was written with schema id 9"
    for error in (corrupt, mismatch, codec.SchemaMismatch(1, 2, 3)):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)


# --------------------------------------------------------------------------------------
# Keys and shards


@examples
@given(st.lists(int64s, max_size=20))
@example([INT64_MIN, -1, 0, 1, INT64_MAX])
def test_int_keys_match_oracle_and_sort_like_integers(keys):
    encoded = codec.encode_int_keys(np.array(keys, dtype=np.int64))
    assert encoded == [oracle.encode_int_key(k) for k in keys]
    assert all(type(k) is bytes and len(k) == 8 for k in encoded)
    assert sorted(encoded) == [oracle.encode_int_key(k) for k in sorted(keys)]


def test_int_key_bytes():
    assert codec.encode_int_keys(np.array([-1, 0, 1])) == [
        b"\x7f\xff\xff\xff\xff\xff\xff\xff",
        b"\x80\x00\x00\x00\x00\x00\x00\x00",
        b"\x80\x00\x00\x00\x00\x00\x00\x01",
    ]


def str_key_buffer(keys: list[str]) -> tuple[bytes, np.ndarray]:
    raw = [k.encode() for k in keys]
    offsets = np.array([0, *np.cumsum([len(r) for r in raw])], dtype=np.int64)
    return b"".join(raw), offsets


@examples
@given(st.lists(texts, max_size=10))
def test_str_keys_are_utf8(keys):
    buf, offsets = str_key_buffer(keys)
    assert codec.encode_str_keys(buf, offsets) == [oracle.encode_str_key(k) for k in keys]


def test_str_keys_are_at_most_1024_bytes():
    buf, offsets = str_key_buffer(["a" * 1024, "é" * 512])
    assert [len(k) for k in codec.encode_str_keys(buf, offsets)] == [1024, 1024]
    buf, offsets = str_key_buffer(["ok", "b" * 1025])
    with pytest.raises(ValueError, match="entry 1 is 1025 bytes"):
        codec.encode_str_keys(buf, offsets)


@examples
@given(st.lists(int64s, max_size=20), st.integers(1, 1000) | st.sampled_from([1, 2**31 - 1]))
def test_int_shards_are_xxh3_of_the_key_bytes(keys, n_shards):
    shards = codec.shard_ids_int(np.array(keys, dtype=np.int64), n_shards)
    assert shards.dtype == np.int32
    want = [xxhash.xxh3_64_intdigest(oracle.encode_int_key(k)) % n_shards for k in keys]
    assert shards.tolist() == want


@examples
@given(st.lists(texts, max_size=10), st.integers(1, 1000))
def test_str_shards_are_xxh3_of_the_utf8(keys, n_shards):
    buf, offsets = str_key_buffer(keys)
    shards = codec.shard_ids_str(buf, offsets, n_shards)
    assert shards.dtype == np.int32
    assert shards.tolist() == [xxhash.xxh3_64_intdigest(k.encode()) % n_shards for k in keys]


@examples
@given(st.binary(max_size=300))
@example(b"")
def test_xxh3_64_matches_the_xxhash_package(data):
    assert codec.xxh3_64(data) == xxhash.xxh3_64_intdigest(data)


def test_shard_count_must_be_positive():
    for n_shards in (0, -1):
        with pytest.raises(ValueError, match="n_shards"):
            codec.shard_ids_int(np.array([1]), n_shards)
        with pytest.raises(ValueError, match="n_shards"):
            codec.shard_ids_str(b"a", np.array([0, 1]), n_shards)


def test_key_offsets_are_checked():
    with pytest.raises(ValueError, match="not a range of the 3-byte buffer"):
        codec.encode_str_keys(b"abc", np.array([0, 4]))
    with pytest.raises(ValueError, match="empty"):
        codec.split_rows(b"abc", np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="\\[2, 1\\)"):
        codec.shard_ids_str(b"abc", np.array([0, 2, 1]), 4)


# --------------------------------------------------------------------------------------
# Row lists


@examples
@given(st.lists(st.none() | st.binary(max_size=20), max_size=20))
def test_join_values_and_split_rows_round_trip(values):
    block, lengths = codec.join_values(values)
    assert type(block) is bytes
    assert lengths.dtype == np.int32
    assert lengths.tolist() == [-1 if v is None else len(v) for v in values]
    assert block == b"".join(v for v in values if v is not None)
    sizes = np.maximum(lengths, 0).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    assert codec.split_rows(block, offsets) == [b"" if v is None else v for v in values]


def test_join_values_takes_only_bytes():
    with pytest.raises(TypeError, match="values\\[1\\] must be bytes or None"):
        codec.join_values([b"a", "b"])


# --------------------------------------------------------------------------------------
# A larger batch, as the client sees it


def test_large_batch_round_trip():
    rng = random.Random(7)
    kinds = [codec.KIND_FLOAT32] * 32 + [codec.KIND_FLOAT32_VECTOR, codec.KIND_STRING]
    dims = [0] * 32 + [64, 0]
    n = 1000
    layout = codec.Layout(11, kinds, dims)
    values = np.array([[rng.random() for _ in range(32)] for _ in range(n)], dtype=np.float32)
    vectors = np.arange(n * 64, dtype=np.float32).reshape(n, 64)
    names = [f"name {i}" * (i % 3) for i in range(n)]
    buf, name_offsets = str_key_buffer(names)
    columns = [(np.ascontiguousarray(values[:, f]), None) for f in range(32)]
    columns += [(vectors, None), (name_offsets, buf, None)]
    block, offsets = codec.encode_rows(layout, columns, n, np.arange(n, dtype=np.int64))
    decoded, times = codec.decode_columns(
        layout, list(range(34)), block, offsets[:-1], np.diff(offsets)
    )
    assert times.tolist() == list(range(n))
    assert all(np.array_equal(decoded[f][0], values[:, f]) for f in range(32))
    assert np.array_equal(decoded[32][0], vectors)
    assert np.array_equal(decoded[33][0], name_offsets)
    assert decoded[33][1].tobytes() == buf


@given(st.lists(st.integers(0, 6), max_size=60), st.integers(7, 9))
def test_group_by_shard_is_a_stable_counting_sort(ids, n_shards):
    shard_ids = np.asarray(ids, np.int32)
    order, counts = codec.group_by_shard(shard_ids, n_shards)
    assert order.dtype == np.int32
    assert order.tolist() == np.argsort(shard_ids, kind="stable").tolist()
    assert counts == np.bincount(shard_ids, minlength=n_shards).tolist()


@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=60), st.integers(1, 9))
def test_group_int_keys_matches_shard_ids_then_group_by_shard(ints, n_shards):
    keys = np.asarray(ints, np.int64)
    order, groups = codec.group_int_keys(keys, n_shards)
    want_order, counts = codec.group_by_shard(codec.shard_ids_int(keys, n_shards), n_shards)
    assert order.dtype == np.int32
    assert order.tolist() == want_order.tolist()
    encoded = codec.encode_int_keys(keys[want_order])
    want, pos = [], 0
    for s, count in enumerate(counts):
        if count:
            want.append((s, encoded[pos : pos + count]))
            pos += count
    assert groups == want


@given(st.lists(st.text(max_size=6), max_size=40), st.integers(1, 9))
def test_shard_groups_of_string_keys_match_their_shard_ids(names, n_shards):
    from kvstore.keys import KeyBatch

    keys = KeyBatch.from_values("string", names, "t")
    order, groups = keys.shard_groups(n_shards)
    ids = keys.shard_ids(n_shards)
    assert order.tolist() == np.argsort(ids, kind="stable").tolist()
    assert [s for s, _ in groups] == sorted(set(ids.tolist()))
    flat = [k for _, group in groups for k in group]
    assert flat == [names[i].encode() for i in order.tolist()]
    pos = 0
    for s, group in groups:
        assert group and all(ids[i] == s for i in order[pos : pos + len(group)].tolist())
        pos += len(group)


def test_response_layout_rejects_two_parts_answering_one_key():
    part = (np.ones(1, "<i4").tobytes(), b"", np.asarray([0]), 1)
    with pytest.raises(ValueError, match="part 1: key position 0 is answered twice"):
        codec.response_layout(2, [part, part])


def test_group_by_shard_takes_int32_ids_only():
    with pytest.raises(TypeError, match="int32 ndarray, got ndarray of int64"):
        codec.group_by_shard(np.array([1, 2**32 + 1]), 8)
    with pytest.raises(TypeError, match="got list"):
        codec.group_by_shard([0, 1], 8)


def test_group_by_shard_rejects_a_shard_out_of_range():
    with pytest.raises(ValueError, match=r"shard_ids\[1\] is 8, not in \[0, 8\)"):
        codec.group_by_shard(np.array([0, 8], np.int32), 8)
    with pytest.raises(ValueError, match="n_shards"):
        codec.group_by_shard(np.array([0], np.int32), 0)


def _layout_oracle(n, parts):
    """finish_get's former NumPy merge of node responses, kept as the oracle."""
    starts = np.zeros(n, np.int64)
    lengths = np.full(n, -1, np.int64)
    base = 0
    for part_lengths, order, positions, _size in parts:
        lens = np.frombuffer(part_lengths, "<i4").astype(np.int64)
        part_starts = np.zeros(len(lens), np.int64)
        if len(lens) > 1:
            np.cumsum(np.maximum(lens[:-1], 0), out=part_starts[1:])
        part_starts += base
        at = np.frombuffer(order, "<i4") if order else np.arange(len(lens))
        if positions is not None:
            at = positions[at]
        starts[at] = part_starts
        lengths[at] = lens
        base += int(np.maximum(lens, 0).sum())
    return starts, lengths


@given(st.data())
def test_response_layout_matches_the_numpy_merge(data):
    n = data.draw(st.integers(0, 30))
    nodes = data.draw(st.integers(1, 3))
    owner = np.asarray(data.draw(st.lists(st.integers(0, nodes - 1), min_size=n, max_size=n)))
    parts = []
    for node in range(nodes):
        positions = np.flatnonzero(owner == node).astype(np.int64)
        m = len(positions)
        lens = data.draw(st.lists(st.integers(-1, 50), min_size=m, max_size=m))
        order = data.draw(st.permutations(range(m))) if data.draw(st.booleans()) else None
        parts.append(
            (
                np.asarray(lens, "<i4").tobytes(),
                b"" if order is None else np.asarray(order, "<i4").tobytes(),
                None if nodes == 1 else positions,
                sum(x for x in lens if x > 0),
            )
        )
    starts, lengths = codec.response_layout(n, parts)
    want_starts, want_lengths = _layout_oracle(n, parts)
    assert lengths.tolist() == want_lengths.tolist()
    found = want_lengths >= 0
    assert starts[found].tolist() == want_starts[found].tolist()


_ONES = np.ones(2, "<i4").tobytes()


@pytest.mark.parametrize(
    ("n", "part", "message"),
    [
        (2, (b"\x01\x00\x00", b"", None, 0), "not int32s"),
        (2, (_ONES, np.zeros(1, "<i4").tobytes(), None, 2), "order has 1 entries"),
        (2, (_ONES, np.asarray([0, 5], "<i4").tobytes(), None, 2), r"order\[1\] is 5"),
        (2, (_ONES, np.asarray([1, 1], "<i4").tobytes(), None, 2), "answered twice"),
        (1, (_ONES, b"", None, 2), "2 rows for 1 keys"),
        (3, (_ONES, b"", None, 2), "2 rows for 3 keys"),
        (2, (np.ones(1, "<i4").tobytes(), b"", np.asarray([7]), 1), "position 7"),
        (2, (_ONES, b"", None, 3), "add up to 2 bytes, its values block holds 3"),
    ],
)
def test_response_layout_rejects_a_malformed_response(n, part, message):
    with pytest.raises(ValueError, match=message):
        codec.response_layout(n, [part])
