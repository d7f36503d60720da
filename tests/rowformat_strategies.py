"""Hypothesis strategies of format-1 rows and their values, and the ways a row is damaged
or written sloppily, shared by test_codec.py and test_delta_codec.py (the row format is
docs/row-format.md; rowformat_oracle.py is its plain-Python reference)."""

import math
import struct

import numpy as np
import rowformat_oracle as oracle
from hypothesis import strategies as st

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


int32s = st.integers(INT32_MIN, INT32_MAX) | st.sampled_from([INT32_MIN, INT32_MAX, 0, -1])
int64s = st.integers(INT64_MIN, INT64_MAX) | st.sampled_from([INT64_MIN, INT64_MAX, 0, -1])
special_floats = st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, -0.0, 0.0])
float32s = st.floats(width=32) | special_floats
float64s = st.floats() | special_floats | st.just(5e-324)
texts = st.text(max_size=8) | st.sampled_from(["", "é", "日本語のテキスト", "🙂🚀", "a\x00b"])


def value_strategy(kind: int, dim: int) -> st.SearchStrategy:
    return {
        oracle.BOOL: st.booleans(),
        oracle.INT32: int32s,
        oracle.INT64: int64s,
        oracle.FLOAT32: float32s,
        oracle.FLOAT64: float64s,
        oracle.FLOAT32_VECTOR: st.lists(float32s, min_size=dim, max_size=dim),
        oracle.STRING: texts,
        oracle.BYTES: st.binary(max_size=8),
        oracle.INT64_LIST: st.lists(int64s, max_size=4),
    }[kind]


features = st.tuples(
    st.sampled_from(oracle.KINDS), st.sampled_from([1, 1, 2, 3, 7, 64]) | st.integers(1, 9)
)
schema_ids = st.integers(0, 2**32 - 1)


@st.composite
def schemas(draw, max_features: int = 12):
    """(kinds, dims, schema_id); dims is 0 for kinds other than float32[N]."""
    pairs = draw(st.lists(features, max_size=max_features))
    kinds = [kind for kind, _ in pairs]
    dims = [dim if kind == oracle.FLOAT32_VECTOR else 0 for kind, dim in pairs]
    return kinds, dims, draw(schema_ids)


def same_value(kind: int, a, b) -> bool:
    """Equality, bitwise for floats (NaN == NaN, -0.0 != 0.0)."""
    if a is None or b is None:
        return a is None and b is None
    if kind in (oracle.FLOAT32, oracle.FLOAT32_VECTOR):
        a, b = np.atleast_1d(np.float32(a)), np.atleast_1d(np.float32(b))
        return a.tobytes() == b.tobytes() if len(a) == len(b) else False
    if kind == oracle.FLOAT64:
        return struct.pack("<d", a) == struct.pack("<d", b)
    return a == b and type(a) is type(b)


def dirty(kinds: list[int], dims: list[int], row: bytes) -> bytes:
    """A row as a sloppy writer might store it, still valid: the fixed bytes of null
    features are not zero and true bools are not 1. Decoding must not care."""
    lay = oracle.layout(kinds, dims)
    out = bytearray(row)
    for f, kind in enumerate(kinds):
        offset, width = lay.fixed_offsets[f], lay.widths[f]
        if kind in oracle.VAR_KINDS:
            continue
        if row[oracle.HEADER_SIZE + f // 8] >> (f % 8) & 1:
            out[offset : offset + width] = b"\xab" * width
        elif kind == oracle.BOOL and row[offset]:
            out[offset] = 0x80
    _, schema_id, _ = oracle.HEADER.unpack_from(row)
    assert oracle.check_row(kinds, dims, schema_id, bytes(out)) is None
    return bytes(out)


mutations = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 200)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("set byte"), st.integers(0, 200), st.integers(0, 255)),
    st.tuples(st.just("set u32"), st.integers(0, 200), st.sampled_from([0, 1, 3, 8, 2**32 - 1])),
)


def mutate(row: bytes, mutation) -> bytes:
    if mutation[0] == "truncate":
        return row[: mutation[1] % (len(row) + 1)]
    if mutation[0] == "append":
        return row + mutation[1]
    if not row:
        return row
    offset = mutation[1] % len(row)
    if mutation[0] == "set byte":
        return row[:offset] + bytes([mutation[2]]) + row[offset + 1 :]
    return (row[:offset] + struct.pack("<I", mutation[2]) + row[offset + 4 :])[: len(row)]
