"""GetResult's conversions (to_numpy, to_arrow, to_pylist) for every dtype, against the
plain-Python reading of the same rows (rowformat_oracle.py).

Each result is built as the client builds it from a node's answer: rows encoded by the
oracle, packed into one block with missing keys (length -1), decoded by the codec with
the client's own plan of the feature list, wrapped in a GetResult.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pyarrow as pa
import pytest
import rowformat_oracle as oracle

from kvstore import _codec
from kvstore.client.core import ClientCore
from kvstore.client.result import GetResult
from kvstore.keys import KeyBatch
from kvstore.schema import TableSchema

SCHEMA = TableSchema.build(
    "every_dtype",
    "int64",
    {
        "b": "bool",
        "i32": "int32",
        "i64": "int64",
        "f32": "float32",
        "f64": "float64",
        "emb": "float32[3]",
        "s": "string",
        "by": "bytes",
        "l": "int64[]",
    },
    schema_id=7,
)
NAMES = [f.name for f in SCHEMA.features]
KINDS = [f.dtype.kind for f in SCHEMA.features]
DIMS = [f.dtype.dim for f in SCHEMA.features]
ARROW_TYPES = {
    "key": pa.int64(),
    "b": pa.bool_(),
    "i32": pa.int32(),
    "i64": pa.int64(),
    "f32": pa.float32(),
    "f64": pa.float64(),
    "emb": pa.list_(pa.float32(), 3),
    "s": pa.string(),
    "by": pa.binary(),
    "l": pa.list_(pa.int64()),
}
TEXTS = ["", "FR", "é", "日本語", "🙂🚀", "a\x00b"]


def random_value(rng: np.random.Generator, kind: int):
    """A value of ``kind`` as the oracle takes it (float32s already rounded to float32)."""
    if kind == oracle.BOOL:
        return bool(rng.integers(2))
    if kind == oracle.INT32:
        return int(rng.integers(-(2**31), 2**31))
    if kind == oracle.INT64:
        return int(rng.integers(-(2**63), 2**63 - 1))
    if kind == oracle.FLOAT32:
        return float(np.float32(rng.standard_normal()))
    if kind == oracle.FLOAT64:
        return math.nan if rng.random() < 0.05 else float(rng.standard_normal())
    if kind == oracle.FLOAT32_VECTOR:
        return [float(x) for x in rng.standard_normal(3).astype(np.float32)]
    if kind == oracle.STRING:
        return TEXTS[rng.integers(len(TEXTS))] * int(rng.integers(3))
    if kind == oracle.BYTES:
        return bytes(rng.integers(0, 256, int(rng.integers(4)), dtype=np.uint8))
    return [int(x) for x in rng.integers(-(2**63), 2**63 - 1, int(rng.integers(4)))]


def answer(n: int, seed: int, missing: float = 0.2, null: float = 0.2):
    """The oracle's rows of n keys (None for a missing key) and the block a node sends."""
    rng = np.random.default_rng(seed)
    rows: list[list | None] = []
    blobs = []
    for _ in range(n):
        if rng.random() < missing:
            rows.append(None)
            blobs.append(None)
            continue
        values = [None if rng.random() < null else random_value(rng, kind) for kind in KINDS]
        blob = oracle.encode_row(KINDS, DIMS, SCHEMA.schema_id, 1_000 + len(blobs), values)
        # The oracle's reading of the row, not the values it was made from.
        rows.append(oracle.decode_row(KINDS, DIMS, SCHEMA.schema_id, blob)[1])
        blobs.append(blob)
    starts = np.zeros(n, np.int64)
    lengths = np.full(n, -1, np.int64)
    block = bytearray(b"\xee" * 3)  # rows need not start at 0
    for i, blob in enumerate(blobs):
        if blob is not None:
            starts[i] = len(block)
            lengths[i] = len(blob)
            block += blob
    return rows, bytes(block), starts, lengths


def result_of(n: int, seed: int = 0, features=None, string_keys: bool = False, **kw):
    """(GetResult, the oracle's rows projected on ``features``, the keys)."""
    rows, block, starts, lengths = answer(n, seed, **kw)
    plan = ClientCore("127.0.0.1:1", 5.0).get_plan(SCHEMA, features)
    if string_keys:
        keys = [f"user-{i}-é" for i in range(n)]
        batch = KeyBatch.from_values("string", keys, SCHEMA.name)
    else:
        keys = list(range(100, 100 + n))
        batch = KeyBatch("int64", ints=np.asarray(keys, np.int64))
    decoded = _codec.decode(plan.projection, block, starts, lengths)
    at = [NAMES.index(name) for name in plan.feature_names]
    projected = [None if row is None else [row[j] for j in at] for row in rows]
    return GetResult(batch, plan, decoded, 3), projected, keys


def same(got, want) -> bool:
    """Equal, NaN equal to NaN, element by element in lists."""
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(same, got, want))
    if isinstance(want, float) and math.isnan(want):
        return isinstance(got, float) and math.isnan(got)
    return type(got) is type(want) and got == want


SIZES = [0, 1, 1000]


@pytest.mark.parametrize("string_keys", [False, True])
@pytest.mark.parametrize("n", SIZES)
def test_to_pylist_is_the_oracles_reading(n, string_keys):
    res, rows, keys = result_of(n, seed=n, string_keys=string_keys)
    got = res.to_pylist()
    assert len(got) == n
    for key, row, out in zip(keys, rows, got, strict=True):
        if row is None:
            assert out is None
            continue
        assert list(out) == ["key", *NAMES]
        assert out["key"] == key
        for name, want in zip(NAMES, row, strict=True):
            assert same(out[name], want), (name, out[name], want)
    # Where both are defined, the same as Arrow's own reading of to_arrow().
    via_arrow = res.to_arrow().to_pylist()
    for out, arrow_row in zip(got, via_arrow, strict=True):
        if out is not None:
            assert all(same(out[k], arrow_row[k]) for k in out)


@pytest.mark.parametrize("n", SIZES)
def test_to_numpy_is_the_oracles_reading(n):
    res, rows, _ = result_of(n, seed=10 + n)
    cols = res.to_numpy()
    assert list(cols) == NAMES
    for j, (name, kind) in enumerate(zip(NAMES, KINDS, strict=True)):
        col = cols[name]
        want = [None if row is None else row[j] for row in rows]
        assert len(col) == n
        if kind in (oracle.FLOAT32, oracle.FLOAT64, oracle.FLOAT32_VECTOR):
            assert type(col) is np.ndarray
            assert col.dtype == (np.float64 if kind == oracle.FLOAT64 else np.float32)
            assert col.shape == ((n, 3) if kind == oracle.FLOAT32_VECTOR else (n,))
            for value, w in zip(col.tolist(), want, strict=True):
                nan = [math.nan] * 3 if kind == oracle.FLOAT32_VECTOR else math.nan
                assert same(value, nan if w is None else w), (name, value, w)
        elif kind in (oracle.BOOL, oracle.INT32, oracle.INT64):
            assert type(col) is np.ma.MaskedArray
            dtype = {oracle.BOOL: np.bool_, oracle.INT32: np.int32, oracle.INT64: np.int64}
            assert col.dtype == dtype[kind] and col.mask.dtype == np.bool_
            assert col.mask.shape == (n,)
            assert col.mask.tolist() == [w is None for w in want]
            assert col.data.tolist() == [0 if w is None else w for w in want]
            fill = True if kind == oracle.BOOL else 7
            assert col.filled(fill).tolist() == [fill if w is None else w for w in want]
        else:
            assert type(col) is np.ndarray and col.dtype == object and col.shape == (n,)
            for value, w in zip(col, want, strict=True):
                if w is None:
                    assert value is None
                elif kind == oracle.INT64_LIST:
                    assert type(value) is np.ndarray and value.dtype == np.int64
                    assert not value.flags.writeable
                    assert value.tolist() == w
                else:
                    assert type(value) is type(w) and value == w


@pytest.mark.parametrize("n", SIZES)
def test_to_arrow_types_and_values(n):
    res, rows, keys = result_of(n, seed=20 + n)
    table = res.to_arrow()
    table.validate(full=True)
    assert table.schema == pa.schema(ARROW_TYPES.items())
    assert table.num_rows == n
    assert table.column("key").to_pylist() == keys
    for j, name in enumerate(NAMES):
        want = [None if row is None else row[j] for row in rows]
        got = table.column(name).to_pylist()
        assert all(map(same, got, want)), name
        assert table.column(name).null_count == want.count(None)
    # Strings, bytes and lists are Arrow arrays of their own types, not objects.
    assert isinstance(table.column("s").chunk(0), pa.StringArray)
    assert isinstance(table.column("by").chunk(0), pa.BinaryArray)
    assert isinstance(table.column("l").chunk(0), pa.ListArray)
    assert isinstance(table.column("emb").chunk(0), pa.FixedSizeListArray)


def test_to_arrow_is_built_on_the_decoded_buffers():
    res, _, _ = result_of(50, seed=3, null=0.3)
    table = res.to_arrow()
    decoded = res._decoded
    for name in ("s", "by", "l", "f64", "i32"):
        k = NAMES.index(name)
        column = decoded.column(k)
        arr = table.column(name).chunk(0)
        values = arr.values if name == "l" else arr
        where = column[1] if len(column) == 3 else column[0]
        # The data buffer is the decoded column's memory, not a copy.
        assert values.buffers()[-1].address == where.ctypes.data, name


def test_all_missing_and_all_null_answers():
    res, rows, _ = result_of(5, seed=4, missing=1.0)
    assert rows == [None] * 5
    assert res.to_pylist() == [None] * 5
    table = res.to_arrow()
    assert all(table.column(name).null_count == 5 for name in NAMES)
    cols = res.to_numpy()
    assert cols["i64"].mask.all() and cols["b"].mask.all()
    assert cols["s"].tolist() == [None] * 5 and cols["l"].tolist() == [None] * 5
    assert np.isnan(cols["emb"]).all()

    res, rows, keys = result_of(4, seed=5, missing=0.0, null=1.0)
    assert res.to_pylist() == [{"key": key, **dict.fromkeys(NAMES)} for key in keys]
    assert res.to_numpy()["by"].tolist() == [None] * 4


def test_projection_order_and_repeated_calls():
    res, rows, _ = result_of(30, seed=6, features=["l", "f32", "s", "i32"])
    assert res.to_arrow().column_names == ["key", "l", "f32", "s", "i32"]
    first, again = res.to_numpy(), res.to_numpy()
    assert list(first) == ["l", "f32", "s", "i32"]
    for name in first:
        assert first[name] is not again[name]
    assert first["s"].tolist() == again["s"].tolist()
    assert np.array_equal(first["f32"], again["f32"], equal_nan=True)
    assert [None if v is None else v.tolist() for v in first["l"]] == [
        None if row is None else row[0] for row in rows
    ]
    # Masks are the result's own: changing one does not change the next call's.
    first["i32"].mask[:] = True
    assert res.to_numpy()["i32"].mask.tolist() == [row is None or row[3] is None for row in rows]


def test_var_values_need_a_var_column():
    res, _, _ = result_of(3, seed=7)
    decoded = res._decoded
    with pytest.raises(ValueError, match="fixed column"):
        decoded.objects(NAMES.index("i32"))
    with pytest.raises(IndexError):
        decoded.pylist(len(NAMES))
    with pytest.raises(IndexError):
        decoded.arrow_buffers(-1)
    validity, offsets, data = decoded.arrow_buffers(NAMES.index("l"))
    assert offsets.dtype == np.int32 and len(offsets) == 4
    assert offsets[-1] * 8 == len(data)
    valid = decoded.valid(NAMES.index("l")).tolist()
    assert 0 in valid  # this seed's rows hold a null: a validity bitmap to check
    assert [validity[0] >> i & 1 for i in range(3)] == valid


def test_rows_of_builds_dicts_and_checks_shapes():
    assert _codec.rows_of(["key", "x"], [[1, 2], ["a", None]], np.array([True, False])) == [
        {"key": 1, "x": "a"},
        None,
    ]
    assert _codec.rows_of(["key"], [[]], []) == []
    with pytest.raises(ValueError, match="names for"):
        _codec.rows_of(["key"], [[1], [2]], [True])
    with pytest.raises(ValueError, match="values for"):
        _codec.rows_of(["key", "x"], [[1], [2, 3]], [True])


def test_bool_values_other_than_one_read_as_true():
    # A sloppy writer's true byte 0x80: the codec normalises it, in every conversion.
    row = bytearray(
        oracle.encode_row(KINDS, DIMS, SCHEMA.schema_id, 1, [True] + [None] * (len(KINDS) - 1))
    )
    offset = oracle.layout(KINDS, DIMS).fixed_offsets[0]
    row[offset] = 0x80
    plan = ClientCore("127.0.0.1:1", 5.0).get_plan(SCHEMA, ["b"])
    decoded = _codec.decode(
        plan.projection, bytes(row), np.zeros(1, np.int64), np.array([len(row)], np.int64)
    )
    res = GetResult(KeyBatch("int64", ints=np.array([1], np.int64)), plan, decoded, 1)
    assert res.to_numpy()["b"].tolist() == [True]
    assert res.to_arrow().column("b").to_pylist() == [True]
    assert res.to_pylist() == [{"key": 1, "b": True}]
    assert struct.unpack_from("<B", row, offset) == (0x80,)
