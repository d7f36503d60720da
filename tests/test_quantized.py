"""Lossy embeddings: ``float32[N]:float16`` and ``float32[N]:int8`` (docs/row-format.md).

The codec is checked against tests/rowformat_oracle.py byte for byte, the documented
error bounds are checked as properties, and the refusals (float16 overflow, NaN and
inf in int8) name the feature and row. Then the whole path through real processes:
online writes and partial updates, a bulk load read back through a node, and the
``kvstore`` command creating and describing such a table.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rowformat_oracle as oracle
from helpers import kvstore
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore import Client, InvalidArgument, _codec
from kvstore import columns as kv_columns
from kvstore.ingest.bulk import LoadError, load
from kvstore.schema import DType, TableSchema

F16, I8 = oracle.FLOAT16_VECTOR, oracle.INT8_VECTOR
HALF_MAX = 65504.0
HALF_MIN_NORMAL = 2.0**-14
FLOAT32_MIN_NORMAL = 2.0**-126

# Finite float32s a float16 feature accepts (|x| < 65520), and the edges worth hitting.
half_edges = st.sampled_from(
    [
        0.0,
        -0.0,
        HALF_MAX,
        -HALF_MAX,
        65519.0,
        65519.99609375,
        HALF_MIN_NORMAL,
        2.0**-24,
        2.0**-25,
        2.0**-26,
        1.0 + 2.0**-11,
        1.0 + 3 * 2.0**-11,
        math.nan,
        -math.nan,
        math.inf,
        -math.inf,
    ]
)
half_inputs = st.floats(-65519.99609375, 65519.99609375, width=32) | half_edges
int8_inputs = (
    st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.floats(-1.0, 1.0, width=32)
    | st.sampled_from([0.0, -0.0, 1e-45, -3.4028235e38, 3.4028235e38])
)
dims = st.sampled_from([1, 2, 3, 7, 64]) | st.integers(1, 9)


def vectors(kind: int, dim: int) -> st.SearchStrategy:
    return st.lists(half_inputs if kind == F16 else int8_inputs, min_size=dim, max_size=dim)


@st.composite
def batches(draw):
    """(kinds, dims, rows): a schema mixing quantized vectors with a float32[N] and a
    string, and rows of values for it (None = null)."""
    kinds = draw(
        st.lists(
            st.sampled_from([F16, I8, oracle.FLOAT32_VECTOR, oracle.STRING]), min_size=1, max_size=5
        )
    )
    ds = [draw(dims) if kind in oracle.VECTOR_KINDS else 0 for kind in kinds]
    rows = []
    for _ in range(draw(st.integers(0, 6))):
        row = []
        for kind, dim in zip(kinds, ds, strict=True):
            if draw(st.integers(0, 4)) == 0:
                row.append(None)
            elif kind == oracle.STRING:
                row.append(draw(st.text(max_size=5)))
            elif kind == oracle.FLOAT32_VECTOR:
                row.append(draw(st.lists(st.floats(width=32), min_size=dim, max_size=dim)))
            else:
                row.append(draw(vectors(kind, dim)))
        rows.append(row)
    return kinds, ds, rows


def codec_columns(kinds: list[int], ds: list[int], rows: list[list]) -> list:
    """The codec's input columns for rows of values (None = null)."""
    n = len(rows)
    columns = []
    for f, (kind, dim) in enumerate(zip(kinds, ds, strict=True)):
        valid = np.array([row[f] is not None for row in rows], np.uint8)
        if kind == oracle.STRING:
            data = [b"" if row[f] is None else row[f].encode() for row in rows]
            offsets = np.cumsum([0] + [len(b) for b in data]).astype(np.int64)
            columns.append((offsets, np.frombuffer(b"".join(data), np.uint8), valid))
        else:
            values = np.array(
                [[0.0] * dim if row[f] is None else row[f] for row in rows], np.float32
            ).reshape(n, dim)
            columns.append((values, valid))
    return columns


def encode(kinds: list[int], ds: list[int], rows: list[list], schema_id: int = 3) -> tuple:
    layout = _codec.Layout(schema_id, kinds, ds)
    times = np.arange(len(rows), dtype=np.int64) + 100
    return layout, *_codec.encode_rows(layout, codec_columns(kinds, ds, rows), len(rows), times)


def same_floats(a, b) -> bool:
    """Bitwise float32 equality (NaN == NaN, -0.0 != 0.0)."""
    return np.asarray(a, np.float32).tobytes() == np.asarray(b, np.float32).tobytes()


# -- the codec against the oracle -------------------------------------------------------


def test_layout_widths_and_kind_constants() -> None:
    assert (_codec.KIND_FLOAT16_VECTOR, _codec.KIND_INT8_VECTOR) == (F16, I8)
    layout = _codec.Layout(1, [F16, I8, oracle.FLOAT32_VECTOR], [64, 64, 64])
    assert layout.widths == [128, 68, 256]  # 2N; a float32 scale and N codes; 4N
    assert layout.dims == [64, 64, 64]
    assert layout.widths == list(oracle.layout([F16, I8, 5], [64, 64, 64]).widths)
    with pytest.raises(ValueError, match="dim"):
        _codec.Layout(1, [I8], [0])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_encode_and_decode_match_the_oracle(batch) -> None:
    kinds, ds, rows = batch
    layout, block, offsets = encode(kinds, ds, rows)
    for i, row in enumerate(rows):
        want = oracle.encode_row(kinds, ds, 3, 100 + i, row)
        assert block[offsets[i] : offsets[i + 1]] == want, i
    columns, times = _codec.decode_columns(
        layout, list(range(len(kinds))), block, offsets[:-1].copy(), np.diff(offsets)
    )
    assert list(times) == [100 + i for i in range(len(rows))]
    for i, row in enumerate(rows):
        _, want_values = oracle.decode_row(kinds, ds, 3, bytes(block[offsets[i] : offsets[i + 1]]))
        for f, kind in enumerate(kinds):
            if kind == oracle.STRING:
                continue
            values, valid = columns[f]
            assert values.dtype == np.float32 and values.shape == (len(rows), ds[f])
            assert bool(valid[i]) == (row[f] is not None)
            if row[f] is None:
                assert np.isnan(values[i]).all()  # a null vector reads as NaN, like float32[N]
            else:
                assert same_floats(values[i], want_values[f]), (f, i)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.data())
def test_delta_apply_and_overlay_match_the_oracle(batch, data) -> None:
    """Partial updates of quantized features move their stored bytes like any fixed
    field: the delta and the read-time overlay agree with the oracle."""
    kinds, ds, rows = batch
    layout = _codec.Layout(3, kinds, ds)
    base = oracle.encode_row(kinds, ds, 3, 50, rows[0]) if rows else None
    got_delta = want_delta = None
    for i, row in enumerate(rows[1:]):
        update = oracle.encode_row(kinds, ds, 3, data.draw(st.integers(0, 200)), row)
        present = data.draw(st.lists(st.booleans(), min_size=len(kinds), max_size=len(kinds)))
        (got_delta,) = _codec.delta_apply(
            layout, [got_delta], update, np.array([0, len(update)]), np.array(present, bool)
        )
        want_delta = oracle.delta_apply(kinds, ds, 3, want_delta, update, present)
        assert got_delta == want_delta, i
    snapshot = data.draw(st.integers(0, 100))
    (got,) = _codec.overlay(layout, [base], [got_delta], snapshot, 1_000, None)
    assert got == oracle.overlay(kinds, ds, 3, base, want_delta, snapshot, 1_000)


@settings(max_examples=300, deadline=None)
@given(dims.flatmap(lambda d: vectors(F16, d)))
def test_float16_relative_error_is_at_most_2_to_the_minus_11(x: list[float]) -> None:
    x32 = np.array(x, np.float32)
    (y,) = round_trip(F16, x32)
    for a, b in zip(x32.astype(np.float64), y.astype(np.float64), strict=True):
        if math.isnan(a):
            assert math.isnan(b)
        elif math.isinf(a):
            assert b == a  # inf is a value a half holds
        elif abs(a) >= HALF_MIN_NORMAL:
            assert abs(b - a) <= 2.0**-11 * abs(a), (a, b)
        else:
            assert abs(b - a) <= 2.0**-25, (a, b)  # subnormal halves: half their spacing


@settings(max_examples=300, deadline=None)
@given(dims.flatmap(lambda d: vectors(I8, d)))
def test_int8_absolute_error_is_at_most_half_the_scale(x: list[float]) -> None:
    x32 = np.array(x, np.float32)
    (y,) = round_trip(I8, x32)
    top = float(np.abs(x32.astype(np.float64)).max())
    scale, _ = oracle.quantize_int8([float(v) for v in x32])
    for a, b in zip(x32.astype(np.float64), y.astype(np.float64), strict=True):
        if scale >= FLOAT32_MIN_NORMAL:
            # s/2 against q*s; the float32 the client gets adds half an ulp of it.
            assert abs(b - a) <= scale / 2 + 2.0**-24 * abs(b), (a, b, scale)
        else:
            assert abs(b - a) <= top, (a, b)  # a scale below float32's normals


def round_trip(kind: int, *rows: np.ndarray) -> np.ndarray:
    dim = len(rows[0])
    layout, block, offsets = encode([kind], [dim], [[list(map(float, r))] for r in rows])
    (column,), _ = _codec.decode_columns(layout, [0], block, offsets[:-1].copy(), np.diff(offsets))
    return column[0]


def test_int8_examples_zero_vector_and_codes() -> None:
    layout, block, offsets = encode([I8], [4], [[[0.0, -0.0, 0.0, 0.0]], [[1.0, -0.5, 0.25, 0.0]]])
    zero_row, row = bytes(block[: offsets[1]]), bytes(block[offsets[1] :])
    body = layout.fixed_offsets[0]
    assert zero_row[body:] == bytes(8)  # s = 0 and every code 0
    scale, *codes = struct.unpack("<f4b", row[body:])
    assert scale == oracle.quantize_int8([1.0])[0] and 0 <= 1 / 127 - scale < 2**-30
    assert codes == [127, -64, 32, 0]
    assert round_trip(I8, np.zeros(3, np.float32)).tolist() == [[0.0, 0.0, 0.0]]


def test_float16_rounds_to_nearest_even_and_keeps_nan_and_inf() -> None:
    x = np.array(
        [1 + 2**-11, 1 + 3 * 2**-11, 65519.0, math.inf, -math.inf, math.nan, 2**-25], np.float32
    )
    (y,) = round_trip(F16, x)
    assert y[:3].tolist() == [1.0, 1 + 2**-9, HALF_MAX]  # ties to even; 65519 rounds down
    assert y[3] == math.inf and y[4] == -math.inf and math.isnan(y[5])
    assert y[6] == 0.0  # half of the smallest subnormal: a tie, to even (zero)


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        (F16, 65520.0, "65520.0, beyond float16's range"),
        (F16, -1e30, "beyond float16's range"),
        (I8, math.nan, "nan; int8 storage holds finite values only"),
        (I8, -math.inf, "-inf; int8 storage"),
    ],
)
def test_codec_refuses_what_the_storage_cannot_hold(kind: int, value: float, message) -> None:
    rows = [[[1.0, 2.0]], [None], [[0.5, value]]]
    with pytest.raises(ValueError, match=r"feature 0 \(float32\[2\]:\w+\), row 2: element 1 is "):
        encode([kind], [2], rows)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        encode([kind], [2], rows)
    # The same value in a null row is not stored, so it is not refused.
    columns = codec_columns([kind], [2], [[[value, 0.0]]])
    columns[0] = (columns[0][0], np.zeros(1, np.uint8))
    _codec.encode_rows(_codec.Layout(1, [kind], [2]), columns, 1, np.zeros(1, np.int64))


# -- the schema, the write path and the loader -----------------------------------------


def test_dtype_spelling() -> None:
    half, i8 = DType.parse("float32[64]:float16"), DType.parse(" float32[8]:int8 ")
    assert (half.kind, half.dim, half.storage, half.codec_kind) == (5, 64, "float16", F16)
    assert (i8.name, i8.codec_kind, str(i8)) == ("float32[8]:int8", I8, "float32[8]:int8")
    assert half.arrow_type == pa.list_(pa.float32(), 64)  # written and read as float32[N]
    assert half.numpy_dtype == np.float32
    assert DType.parse("float32[64]").codec_kind == oracle.FLOAT32_VECTOR
    for bad in ("float32[64]:int4", "float16[64]", "float32[64]:", "float32:int8"):
        with pytest.raises(InvalidArgument, match="float32\\[N\\]:int8"):
            DType.parse(bad)
    schema = TableSchema.build("t", "int64", {"a": "float32[4]", "b": "float32[4]:int8"})
    assert schema.layout.kinds == [oracle.FLOAT32_VECTOR, I8]
    assert TableSchema.from_json(schema.to_json()) == schema
    assert not schema.same_definition(
        TableSchema.build("t", "int64", {"a": "float32[4]", "b": "float32[4]:float16"})
    )


def test_write_path_names_table_column_and_row(client: Client, table_name: str) -> None:
    client.create_table(table_name, key="int64", features={"e": "float32[2]:float16"}, shards=2)
    try:
        emb = np.array([[1.0, 2.0], [3.0, 7e4]], np.float32)
        with pytest.raises(InvalidArgument) as info:
            client.write(table_name, {"key": [1, 2], "e": emb})
        assert f"table {table_name!r}, column 'e' (float32[2]:float16), row 1: element 1" in str(
            info.value
        )
        assert not client.get(table_name, [1, 2]).found.any()  # nothing written
    finally:
        client.drop_table(table_name)


def test_online_writes_and_partial_updates(client: Client, table_name: str) -> None:
    features = {"h": "float32[3]:float16", "q": "float32[3]:int8", "n": "int64"}
    client.create_table(table_name, key="int64", features=features, shards=2)
    try:
        h = np.array([[0.1, -2.5, 1000.0], [1.0, 2.0, 3.0]], np.float32)
        q = np.array([[0.3, -1.27, 0.0], [0.0, 0.0, 0.0]], np.float32)
        client.write(table_name, {"key": [1, 2], "h": h, "q": q, "n": [5, 6]}, event_time=1_000)
        got = client.get(table_name, [1, 2, 3]).to_numpy()
        assert got["h"].dtype == np.float32 and got["h"].shape == (3, 3)
        assert np.array_equal(got["h"][:2], h.astype(np.float16).astype(np.float32))
        assert np.allclose(got["q"][0], q[0], atol=1.27 / 127 / 2 + 1e-7)
        assert got["q"][1].tolist() == [0.0, 0.0, 0.0]
        assert np.isnan(got["h"][2]).all() and np.isnan(got["q"][2]).all()  # missing key
        arrow = client.get(table_name, [1, 3]).to_arrow()
        assert arrow.schema.field("q").type == pa.list_(pa.float32(), 3)
        assert arrow.column("h").to_pylist()[1] is None

        # A partial update of one quantized feature leaves the other features alone;
        # an older one is ignored (last writer wins per feature).
        client.update(
            table_name,
            {"key": [1], "q": np.array([[2.0, 0.0, -1.0]], np.float32)},
            event_time=2_000,
        )
        client.update(
            table_name, {"key": [1], "h": np.array([[9.0, 9.0, 9.0]], np.float32)}, event_time=500
        )
        got = client.get(table_name, [1]).to_numpy()
        assert got["q"][0].tolist() == oracle.dequantize_int8(*oracle.quantize_int8([2, 0, -1]))
        assert got["q"][0][0] == 2.0 and abs(got["q"][0][2] + 1) <= 1 / 127  # s = 2/127
        assert np.array_equal(got["h"][0], h[0].astype(np.float16).astype(np.float32))
        assert got["n"][0] == 5
        client.update(table_name, {"key": [1], "h": [None]}, event_time=3_000)
        got = client.get(table_name, [1]).to_numpy()
        assert np.isnan(got["h"][0]).all() and got["q"][0].tolist()[0] == 2.0
    finally:
        client.drop_table(table_name)


def test_bulk_load_of_a_quantized_table_reads_back_through_a_node(
    client: Client, table_name: str, tmp_path: Path
) -> None:
    features = {"h": "float32[8]:float16", "q": "float32[8]:int8", "f": "float32[8]"}
    client.create_table(table_name, key="int64", features=features, shards=4)
    try:
        rng = np.random.default_rng(7)
        n = 300
        emb = rng.normal(size=(n, 8)).astype(np.float32)
        flat = pa.array(emb.ravel())
        # The three shapes a file may hold: fixed-size lists of float32 and of float64,
        # and plain lists of float32 (quantized in the loader's encode path).
        pq.write_table(
            pa.table(
                {
                    "key": pa.array(np.arange(n), pa.int64()),
                    "h": pa.FixedSizeListArray.from_arrays(flat, 8),
                    "q": pa.FixedSizeListArray.from_arrays(flat.cast(pa.float64()), 8),
                    "f": pa.ListArray.from_arrays(pa.array(np.arange(0, 8 * n + 1, 8)), flat),
                }
            ),
            tmp_path / "v1.parquet",
        )
        summary = load(client.address, table_name, str(tmp_path / "v1.parquet"), progress=False)
        assert summary.rows == n
        got = client.get(table_name, list(range(n))).to_numpy()
        assert np.array_equal(got["f"], emb)
        assert np.array_equal(got["h"], emb.astype(np.float16).astype(np.float32))
        scale = np.abs(emb).max(axis=1, keepdims=True) / 127
        assert (np.abs(got["q"] - emb) <= scale / 2 + 2.0**-24 * np.abs(emb) + 1e-12).all()
        assert (np.abs(got["q"] - emb) > 0).any()  # it is quantized, not stored as float32

        # A value float16 cannot hold fails the load, naming the file's row.
        bad = emb.copy()
        bad[123, 4] = 1e6
        pq.write_table(
            pa.table(
                {
                    "key": pa.array(np.arange(n), pa.int64()),
                    "h": pa.FixedSizeListArray.from_arrays(pa.array(bad.ravel()), 8),
                    "q": pa.FixedSizeListArray.from_arrays(flat, 8),
                    "f": pa.FixedSizeListArray.from_arrays(flat, 8),
                }
            ),
            tmp_path / "bad.parquet",
        )
        with pytest.raises(LoadError, match=r"row 123 .*element 4 is 1000000.0, beyond float16"):
            load(client.address, table_name, str(tmp_path / "bad.parquet"), progress=False)
        assert client.get(table_name, [123]).version == summary.version
    finally:
        client.drop_table(table_name)


def test_cli_create_table_and_describe(client: Client, table_name: str, tmp_path: Path) -> None:
    args = ["create-table", table_name, "--key", "int64", "--shards", "2"]
    args += ["--feature", "emb:float32[16]:int8", "--feature", "half:float32[4]:float16"]
    created = kvstore(*args, address=client.address, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    want = {"emb": "float32[16]:int8", "half": "float32[4]:float16"}
    try:
        assert json.loads(created.stdout)["features"] == want
        described = kvstore("describe", table_name, address=client.address, cwd=tmp_path)
        assert described.returncode == 0, described.stderr
        assert json.loads(described.stdout)["features"] == want
        schema = client.describe_table(table_name).schema
        assert [f.dtype.codec_kind for f in schema.features] == [I8, F16]
        bad = kvstore(
            "create-table",
            "t_bad",
            "--feature",
            "e:float32[4]:int4",
            address=client.address,
            cwd=tmp_path,
        )
        assert bad.returncode != 0 and "float32[N]:int8" in bad.stderr
    finally:
        client.drop_table(table_name)


@pytest.mark.parametrize("storage", ["", ":float16", ":int8"])
def test_null_vectors_are_nulls_and_null_elements_are_refused(storage: str) -> None:
    schema = TableSchema.build("t", "int64", {"e": f"float32[2]{storage}"}, schema_id=1)
    for values in ([None], [None, [1.0, 2.0]]):  # a whole null value, alone or not
        rows = kv_columns.encode_rows(schema, {"key": list(range(len(values))), "e": values})
        cells = [
            oracle.row_cells(schema.layout.kinds, [2], 1, rows.rows[a:b])[1][0]
            for a, b in zip(rows.offsets[:-1], rows.offsets[1:], strict=True)
        ]
        assert [c is None for c in cells] == [v is None for v in values]
    with pytest.raises(InvalidArgument, match="row 1: a null element inside the value"):
        kv_columns.encode_rows(schema, {"key": [1, 2], "e": [None, [1.0, None]]})


def test_every_half_decodes_as_numpy_does() -> None:
    halves = np.arange(1 << 16, dtype=np.uint16)
    layout = _codec.Layout(1, [F16], [1 << 16])
    row = oracle.HEADER.pack(1, 1, 5) + b"\x00" + halves.tobytes()
    (column,), _ = _codec.decode_columns(layout, [0], row, np.array([0]), np.array([len(row)]))
    got, want = column[0][0], halves.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert got[~nan].tobytes() == want[~nan].tobytes()


def test_float32s_encode_to_the_halves_numpy_rounds_to() -> None:
    rng = np.random.default_rng(17)
    bits = np.concatenate(
        [
            rng.integers(0, 1 << 32, 400_000, dtype=np.uint64).astype(np.uint32),
            np.arange(0x33000000, 0x33800000, 97, dtype=np.uint32),  # around half's smallest
            np.arange(0x387FC000, 0x38804000, dtype=np.uint32),  # subnormal/normal boundary
            np.arange(0x477FE000, 0x477FF000, dtype=np.uint32),
        ]  # up to 65520
    )
    x = bits.view(np.float32)
    x = x[~(np.isfinite(x) & (np.abs(x) >= 65520))]
    x = x[: len(x) // 64 * 64].reshape(-1, 64)
    layout = _codec.Layout(1, [F16], [64])
    block, _ = _codec.encode_rows(layout, [(x, None)], len(x), np.zeros(len(x), np.int64))
    rows = np.frombuffer(block, np.uint8).reshape(len(x), -1)
    got = rows[:, layout.fixed_offsets[0] :].copy().view(np.uint16).reshape(x.shape)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want[~nan])
    assert np.array_equal(got[nan], np.where(np.signbit(x[nan]), 0xFE00, 0x7E00))
