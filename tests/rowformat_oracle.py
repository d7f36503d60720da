"""A plain-Python reference of the row format (docs/row-format.md).

The Cython codec (ext/codec.pyx) is tested against this module, so it stays slow and
obvious: one ``struct`` call per field, one feature at a time, no numpy. Values are
Python objects: bool, int, float, str, bytes, list[float] (float32[N], stored as
float32, float16 or int8) and list[int] (int64[]); None is a null.

Delta rows (format 3, and format 2 as read) and the operations on them (apply, delete,
overlay, compact) work on a feature's stored bytes (a "cell": its fixed field or its var
data, None for a null) rather than on values, because the codec copies those bytes as
they are: a sloppy row's true bool 0x80 stays 0x80, while the bytes of a null become zero.
Event times, snapshot times and TTLs are int64 microseconds.
"""

import math
import struct
from dataclasses import dataclass

FORMAT = 1
HEADER = struct.Struct("<BIq")  # format byte, schema id (u32), event time (i64, µs)
HEADER_SIZE = HEADER.size  # 13

BOOL, INT32, INT64, FLOAT32, FLOAT64, FLOAT32_VECTOR, STRING, BYTES, INT64_LIST = range(9)
KINDS = (BOOL, INT32, INT64, FLOAT32, FLOAT64, FLOAT32_VECTOR, STRING, BYTES, INT64_LIST)
VAR_KINDS = (STRING, BYTES, INT64_LIST)
# float32[N] stored lossily (kinds 9 and 10). Kept out of KINDS, which the shared
# strategies draw from with any float32 (these refuse some): tests/test_quantized.py
# draws them itself.
FLOAT16_VECTOR, INT8_VECTOR = 9, 10
QUANTIZED_KINDS = (FLOAT16_VECTOR, INT8_VECTOR)
VECTOR_KINDS = (FLOAT32_VECTOR, *QUANTIZED_KINDS)
ALL_KINDS = (*KINDS, *QUANTIZED_KINDS)
FLOAT16_OVERFLOW = 65520.0  # a finite |x| at or above this rounds to inf as a half

# struct format of one value of a fixed kind other than float32[N]
SCALAR_FORMATS = {BOOL: "<?", INT32: "<i", INT64: "<q", FLOAT32: "<f", FLOAT64: "<d"}

MAX_STR_KEY_SIZE = 1024


@dataclass(frozen=True)
class RowLayout:
    """Where each feature of a schema sits in a row; offsets and sizes in bytes."""

    kinds: tuple[int, ...]
    dims: tuple[int, ...]
    widths: tuple[int, ...]  # 0 for variable-width kinds
    fixed_offsets: tuple[int, ...]  # from the start of the row, -1 for variable-width kinds
    var_index: tuple[int, ...]  # j among the variable-width features, -1 for fixed kinds
    var_features: tuple[int, ...]  # the feature index of var feature j
    null_bitmap_size: int  # B
    fixed_size: int  # W
    min_row_size: int  # 13 + B + W + 4V

    @property
    def n_var(self) -> int:
        return len(self.var_features)

    @property
    def ends_start(self) -> int:
        return self.min_row_size - 4 * self.n_var


def fixed_width(kind: int, dim: int) -> int:
    """Bytes of a fixed-width kind in the fixed section; 0 for a variable-width kind."""
    if kind in VAR_KINDS:
        return 0
    if kind == FLOAT32_VECTOR:
        return 4 * dim
    if kind == FLOAT16_VECTOR:
        return 2 * dim
    if kind == INT8_VECTOR:
        return 4 + dim
    return struct.calcsize(SCALAR_FORMATS[kind])


def layout(kinds: list[int], dims: list[int]) -> RowLayout:
    dims = [dim if kind in VECTOR_KINDS else 0 for kind, dim in zip(kinds, dims, strict=True)]
    bitmap_size = (len(kinds) + 7) // 8
    widths = [fixed_width(kind, dim) for kind, dim in zip(kinds, dims, strict=True)]
    offsets, var_index, var_features = [], [], []
    offset = HEADER_SIZE + bitmap_size
    for feature, (kind, width) in enumerate(zip(kinds, widths, strict=True)):
        if kind in VAR_KINDS:
            offsets.append(-1)
            var_index.append(len(var_features))
            var_features.append(feature)
        else:
            offsets.append(offset)
            var_index.append(-1)
            offset += width
    return RowLayout(
        kinds=tuple(kinds),
        dims=tuple(dims),
        widths=tuple(widths),
        fixed_offsets=tuple(offsets),
        var_index=tuple(var_index),
        var_features=tuple(var_features),
        null_bitmap_size=bitmap_size,
        fixed_size=sum(widths),
        min_row_size=offset + 4 * len(var_features),
    )


def float32(x: float) -> float:
    """x rounded to the nearest float32 (ties to even)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def encode_half(x: float) -> bytes:
    """One IEEE half, rounded to nearest even (struct's "e"); NaN as 0x7e00 with its sign.

    ValueError for a finite value that would round to inf: the codec refuses it."""
    if math.isnan(x):
        return struct.pack("<H", 0xFE00 if math.copysign(1.0, x) < 0 else 0x7E00)
    if math.isfinite(x) and abs(x) >= FLOAT16_OVERFLOW:
        raise ValueError(f"{x!r} is beyond float16's range")
    return struct.pack("<e", x)


def quantize_int8(values: list[float]) -> tuple[float, list[int]]:
    """(scale, codes): s = max|x| / 127 as a float32 rounded toward zero,
    q = round-half-even(x / s)
    clipped to [-127, 127]; a zero vector (or one whose scale underflows) is s = 0, q = 0.

    ValueError for NaN or inf: the codec refuses them."""
    if not all(math.isfinite(x) for x in values):
        raise ValueError("int8 storage holds finite values only")
    exact = max(abs(x) for x in values) / 127
    scale = float32(exact)
    if scale > exact:  # toward zero, so that 127 s <= max|x| (FLT_MAX stays finite)
        scale = struct.unpack(
            "<f", struct.pack("<I", struct.unpack("<I", struct.pack("<f", scale))[0] - 1)
        )[0]
    if scale == 0:
        return 0.0, [0] * len(values)
    return scale, [max(-127, min(127, round(x / scale))) for x in values]


def dequantize_int8(scale: float, codes: list[int]) -> list[float]:
    """float32(q * s): the product is exact in a double, then rounded once."""
    return [float32(q * scale) for q in codes]


def encode_value(kind: int, dim: int, value) -> bytes:
    """The bytes of one non-null value: its fixed field or its var data."""
    if kind in VECTOR_KINDS and len(value) != dim:
        raise ValueError(f"a float32[{dim}] value has {len(value)} elements")
    if kind == FLOAT32_VECTOR:
        return struct.pack(f"<{dim}f", *value)
    if kind == FLOAT16_VECTOR:
        return b"".join(encode_half(float32(x)) for x in value)
    if kind == INT8_VECTOR:
        scale, codes = quantize_int8([float32(x) for x in value])
        return struct.pack(f"<f{dim}b", scale, *codes)
    if kind == STRING:
        return value.encode("utf-8")
    if kind == BYTES:
        return bytes(value)
    if kind == INT64_LIST:
        return struct.pack(f"<{len(value)}q", *value)
    return struct.pack(SCALAR_FORMATS[kind], value)


def decode_value(kind: int, dim: int, raw: bytes):
    if kind == FLOAT32_VECTOR:
        return list(struct.unpack(f"<{dim}f", raw))
    if kind == FLOAT16_VECTOR:
        return list(struct.unpack(f"<{dim}e", raw))
    if kind == INT8_VECTOR:
        scale, *codes = struct.unpack(f"<f{dim}b", raw)
        return dequantize_int8(scale, codes)
    if kind == STRING:
        return raw.decode("utf-8")
    if kind == BYTES:
        return raw
    if kind == INT64_LIST:
        return list(struct.unpack(f"<{len(raw) // 8}q", raw))
    if kind == BOOL:
        return raw != b"\x00"  # 0 or 1 on disk; anything else still reads as true
    return struct.unpack(SCALAR_FORMATS[kind], raw)[0]


def encode_sections(lay: RowLayout, cells: list[bytes | None]) -> tuple[bytes, bytes, bytes]:
    """(null bitmap, fixed section, var ends + var data) of a row body.

    ``cells[f]`` holds feature f's stored bytes (its fixed field or its var data), None
    for a null: zero bytes in the fixed section, empty in the var data.
    """
    bitmap = bytearray(lay.null_bitmap_size)
    fixed = b""
    ends = []
    var_data = b""
    for feature, cell in enumerate(cells):
        if cell is None:
            bitmap[feature // 8] |= 1 << (feature % 8)
        if lay.kinds[feature] in VAR_KINDS:
            if cell is not None:
                var_data += cell
            ends.append(len(var_data))
        else:
            width = lay.widths[feature]
            fixed += bytes(width) if cell is None else cell
    return bytes(bitmap), fixed, struct.pack(f"<{len(ends)}I", *ends) + var_data


def encode_cells(lay: RowLayout, schema_id: int, event_time: int, cells: list) -> bytes:
    """A row from each feature's stored bytes (None = null)."""
    bitmap, fixed, var = encode_sections(lay, cells)
    return HEADER.pack(FORMAT, schema_id, event_time) + bitmap + fixed + var


def encode_row(
    kinds: list[int], dims: list[int], schema_id: int, event_time: int, values: list
) -> bytes:
    """One row: header, null bitmap, fixed section, var ends, var data."""
    lay = layout(kinds, dims)
    cells = [
        None if value is None else encode_value(kind, dim, value)
        for kind, dim, value in zip(kinds, lay.dims, values, strict=True)
    ]
    return encode_cells(lay, schema_id, event_time, cells)


def _fault(
    lay: RowLayout, schema_id: int, row: bytes, format_byte: int, header_size: int, shift: int
) -> str | None:
    """Why ``row`` is not a valid row of its format (format 1: shift 0; a delta row: the
    ``shift`` bytes of its longer header move the body), or None."""
    min_size = lay.min_row_size + shift
    too_short = f"length {len(row)} is shorter than the {min_size}-byte minimum"
    if len(row) < header_size:
        return too_short
    row_format, row_schema_id = struct.unpack_from("<BI", row)
    if row_format != format_byte:
        return f"format byte 0x{row_format:02x}, expected 0x{format_byte:02x}"
    if row_schema_id != schema_id:
        return f"schema id {row_schema_id}, expected {schema_id}"
    if len(row) < min_size:
        return too_short
    ends = struct.unpack_from(f"<{lay.n_var}I", row, lay.ends_start + shift)
    previous = 0
    for j, end in enumerate(ends):
        if end < previous:
            feature = lay.var_features[j]
            return (
                f"var ends decrease: feature {feature} ends at {end}, "
                f"before the previous end {previous}"
            )
        previous = end
    var_bytes = len(row) - min_size
    if previous != var_bytes:
        return (
            f"var data length mismatch: the var ends cover {previous} bytes, "
            f"the row holds {var_bytes}"
        )
    return None


def check_row(kinds: list[int], dims: list[int], schema_id: int, row: bytes) -> str | None:
    """Why ``row`` is not a valid row of this schema, or None when it is.

    The order of the checks is part of the contract (the codec reports the same
    reason): the header first, then the schema id (a row of another schema is laid
    out by that schema, so its sizes mean nothing here), then the sizes.
    """
    return _fault(layout(kinds, dims), schema_id, row, FORMAT, HEADER_SIZE, 0)


def _cells(lay: RowLayout, row: bytes, shift: int) -> list[bytes | None]:
    """The stored bytes of every feature of a valid row (None where the null bit is set)."""
    ends = struct.unpack_from(f"<{lay.n_var}I", row, lay.ends_start + shift)
    var_data = row[lay.min_row_size + shift :]
    bitmap_at = HEADER_SIZE if shift == 0 else DELTA_HEADER.size
    cells: list[bytes | None] = []
    for feature, kind in enumerate(lay.kinds):
        if row[bitmap_at + feature // 8] >> (feature % 8) & 1:
            cells.append(None)
        elif kind in VAR_KINDS:
            j = lay.var_index[feature]
            start = ends[j - 1] if j > 0 else 0
            cells.append(var_data[start : ends[j]])
        else:
            offset = lay.fixed_offsets[feature] + shift
            cells.append(row[offset : offset + lay.widths[feature]])
    return cells


def row_cells(
    kinds: list[int], dims: list[int], schema_id: int, row: bytes
) -> tuple[int, list[bytes | None]]:
    """(event time, the stored bytes of every feature) of a row; ValueError when invalid."""
    fault = check_row(kinds, dims, schema_id, row)
    if fault is not None:
        raise ValueError(fault)
    _, _, event_time = HEADER.unpack_from(row)
    return event_time, _cells(layout(kinds, dims), row, 0)


def decode_row(kinds: list[int], dims: list[int], schema_id: int, row: bytes) -> tuple[int, list]:
    """(event time, values) of a row; ValueError when it is not a valid row of the schema."""
    event_time, cells = row_cells(kinds, dims, schema_id, row)
    values = [
        None if cell is None else decode_value(kind, dim, cell)
        for kind, dim, cell in zip(kinds, layout(kinds, dims).dims, cells, strict=True)
    ]
    return event_time, values


# --------------------------------------------------------------------------------------
# Delta rows (format 3; format 2 read) and reads of delta over base (docs/row-format.md,
# "Delta rows")

DELTA_FORMAT = 3  # written: only the present features are stored
DELTA_DENSE_FORMAT = 2  # written before format 3, still read: every feature has its slot
# format byte, schema id (u32), event time, deleted_at (i64, µs)
DELTA_HEADER = struct.Struct("<BIqq")
NO_DELETE = -(2**63)  # deleted_at of a key never deleted; the snapshot time without a version


def delta_header_size(lay: RowLayout) -> int:
    """Format 2: 21 + 2B + 8F: the fixed header, the null and present bitmaps, the times."""
    return DELTA_HEADER.size + 2 * lay.null_bitmap_size + 8 * len(lay.kinds)


def delta_shift(lay: RowLayout) -> int:
    """How much further into a format-2 delta row than into a format-1 row its body starts."""
    return delta_header_size(lay) - HEADER_SIZE - lay.null_bitmap_size


@dataclass
class DeltaRow:
    """A delta row, decoded. ``times[f]`` is feature f's event time (µs), None when the
    delta does not hold f (absent); ``cells[f]`` its stored bytes, None when null or absent."""

    event_time: int
    deleted_at: int
    times: list[int | None]
    cells: list[bytes | None]

    @classmethod
    def empty(cls, n_features: int) -> "DeltaRow":
        """What a key without a stored delta row has: nothing, and no delete."""
        return cls(NO_DELETE, NO_DELETE, [None] * n_features, [None] * n_features)


def _bitmap(lay: RowLayout, bits: list[bool]) -> bytes:
    out = bytearray(lay.null_bitmap_size)
    for feature, bit in enumerate(bits):
        if bit:
            out[feature // 8] |= 1 << (feature % 8)
    return bytes(out)


def encode_delta(lay: RowLayout, schema_id: int, delta: DeltaRow) -> bytes:
    """A format-3 delta row: header, null bitmap (present features only), present bitmap,
    then per present feature in order its time, its fixed value (zero bytes when null),
    the var ends of the present var features and their data."""
    present = [t is not None for t in delta.times]
    nulls = [p and cell is None for p, cell in zip(present, delta.cells, strict=True)]
    times = [t for t in delta.times if t is not None]
    fixed = b""
    ends = []
    var_data = b""
    for feature, (p, cell) in enumerate(zip(present, delta.cells, strict=True)):
        if not p:
            continue
        if lay.kinds[feature] in VAR_KINDS:
            var_data += cell or b""
            ends.append(len(var_data))
        else:
            fixed += bytes(lay.widths[feature]) if cell is None else cell
    header = DELTA_HEADER.pack(DELTA_FORMAT, schema_id, delta.event_time, delta.deleted_at)
    return (
        header
        + _bitmap(lay, nulls)
        + _bitmap(lay, present)
        + struct.pack(f"<{len(times)}q", *times)
        + fixed
        + struct.pack(f"<{len(ends)}I", *ends)
        + var_data
    )


def encode_dense_delta(lay: RowLayout, schema_id: int, delta: DeltaRow) -> bytes:
    """A format-2 delta row (as written before format 3): an absent feature has no null or
    present bit, time 0, zero or empty bytes."""
    present = bytearray(lay.null_bitmap_size)
    for feature, t in enumerate(delta.times):
        if t is not None:
            present[feature // 8] |= 1 << (feature % 8)
    cells = [None if t is None else cell for t, cell in zip(delta.times, delta.cells, strict=True)]
    bitmap, fixed, var = encode_sections(lay, cells)
    # encode_sections marks absent features null: only present ones may have the bit
    bitmap = bytes(n & p for n, p in zip(bitmap, present, strict=True))
    times = struct.pack(f"<{len(delta.times)}q", *(0 if t is None else t for t in delta.times))
    header = DELTA_HEADER.pack(DELTA_DENSE_FORMAT, schema_id, delta.event_time, delta.deleted_at)
    return header + bitmap + bytes(present) + times + fixed + var


def encode_delta_row(
    kinds: list[int],
    dims: list[int],
    schema_id: int,
    event_time: int,
    deleted_at: int,
    times: list[int | None],
    values: list,
    dense: bool = False,
) -> bytes:
    """A delta row from values; ``times[f]`` None = feature f absent (its value ignored).
    ``dense``: in format 2, as written before format 3."""
    lay = layout(kinds, dims)
    cells = [
        None if value is None or t is None else encode_value(kind, dim, value)
        for kind, dim, t, value in zip(kinds, lay.dims, times, values, strict=True)
    ]
    encode = encode_dense_delta if dense else encode_delta
    return encode(lay, schema_id, DeltaRow(event_time, deleted_at, list(times), cells))


def _present(lay: RowLayout, row: bytes) -> list[bool]:
    """The present bitmap of a delta row (either format), its padding bits ignored."""
    at = DELTA_HEADER.size + lay.null_bitmap_size
    return [bool(row[at + f // 8] >> (f % 8) & 1) for f in range(len(lay.kinds))]


def _sparse_fault(lay: RowLayout, row: bytes) -> str | None:
    """Why a format-3 row (format byte and schema id checked) is not valid, or None."""
    min_size = DELTA_HEADER.size + 2 * lay.null_bitmap_size
    if len(row) >= min_size:
        present = _present(lay, row)
        var = [f for f in lay.var_features if present[f]]
        fixed = sum(lay.widths[f] for f in range(len(lay.kinds)) if present[f])
        min_size += 8 * sum(present) + fixed + 4 * len(var)
    if len(row) < min_size:
        return f"length {len(row)} is shorter than the {min_size}-byte minimum"
    ends = struct.unpack_from(f"<{len(var)}I", row, min_size - 4 * len(var))
    previous = 0
    for feature, end in zip(var, ends, strict=True):
        if end < previous:
            return (
                f"var ends decrease: feature {feature} ends at {end}, "
                f"before the previous end {previous}"
            )
        previous = end
    if previous != len(row) - min_size:
        return (
            f"var data length mismatch: the var ends cover {previous} bytes, "
            f"the row holds {len(row) - min_size}"
        )
    return None


def check_delta_row(kinds: list[int], dims: list[int], schema_id: int, row: bytes) -> str | None:
    """Why ``row`` is not a valid delta row (format 3, or format 2) of this schema, or None:
    the header, the format byte, the schema id, then the sizes (nothing more: the
    bitmaps and times can hold anything)."""
    lay = layout(kinds, dims)
    if len(row) < DELTA_HEADER.size:
        smallest = DELTA_HEADER.size + 2 * lay.null_bitmap_size
        return f"length {len(row)} is shorter than the {smallest}-byte minimum"
    row_format, row_schema_id = struct.unpack_from("<BI", row)
    if row_format not in (DELTA_FORMAT, DELTA_DENSE_FORMAT):
        return (
            f"format byte 0x{row_format:02x}, expected 0x{DELTA_FORMAT:02x} "
            f"(or 0x{DELTA_DENSE_FORMAT:02x})"
        )
    if row_schema_id != schema_id:
        return f"schema id {row_schema_id}, expected {schema_id}"
    if row_format == DELTA_FORMAT:
        return _sparse_fault(lay, row)
    return _fault(lay, schema_id, row, DELTA_DENSE_FORMAT, DELTA_HEADER.size, delta_shift(lay))


def delta_cells(kinds: list[int], dims: list[int], schema_id: int, row: bytes) -> DeltaRow:
    """A delta row (either format) decoded to stored bytes; what an absent feature's bits
    and bytes hold is ignored. ValueError when the row is not valid."""
    fault = check_delta_row(kinds, dims, schema_id, row)
    if fault is not None:
        raise ValueError(fault)
    lay = layout(kinds, dims)
    _, _, event_time, deleted_at = DELTA_HEADER.unpack_from(row)
    n = len(kinds)
    present = _present(lay, row)
    times_at = DELTA_HEADER.size + 2 * lay.null_bitmap_size
    if row[0] == DELTA_DENSE_FORMAT:
        stored_times = struct.unpack_from(f"<{n}q", row, times_at)
        times = [t if p else None for p, t in zip(present, stored_times, strict=True)]
        cells = [
            cell if t is not None else None
            for t, cell in zip(times, _cells(lay, row, delta_shift(lay)), strict=True)
        ]
        return DeltaRow(event_time, deleted_at, times, cells)
    packed = iter(struct.unpack_from(f"<{sum(present)}q", row, times_at))
    times = [next(packed) if p else None for p in present]
    at = times_at + 8 * sum(present)
    fixed: dict[int, bytes] = {}
    for f in range(n):
        if present[f] and lay.kinds[f] not in VAR_KINDS:
            fixed[f] = row[at : at + lay.widths[f]]
            at += lay.widths[f]
    var = [f for f in lay.var_features if present[f]]
    ends = struct.unpack_from(f"<{len(var)}I", row, at)
    var_data = row[at + 4 * len(var) :]
    start = 0
    for f, end in zip(var, ends, strict=True):
        fixed[f] = var_data[start:end]
        start = end
    nulls_at = DELTA_HEADER.size
    cells = [
        None if not present[f] or row[nulls_at + f // 8] >> (f % 8) & 1 else fixed[f]
        for f in range(n)
    ]
    return DeltaRow(event_time, deleted_at, times, cells)


def decode_delta_row(
    kinds: list[int], dims: list[int], schema_id: int, row: bytes
) -> tuple[int, int, list[int | None], list]:
    """(event time, deleted_at, times, values) of a delta row; absent features are None in
    both lists. ValueError when the row is not valid."""
    delta = delta_cells(kinds, dims, schema_id, row)
    values = [
        None if cell is None else decode_value(kind, dim, cell)
        for kind, dim, cell in zip(kinds, layout(kinds, dims).dims, delta.cells, strict=True)
    ]
    return delta.event_time, delta.deleted_at, delta.times, values


class StoredRowError(ValueError):
    """A stored row the codec refuses: as CorruptRow with ``reason`` ("base row: ..." or
    "delta row: ..."), or as SchemaMismatch when ``schema_id`` (the row's) is set."""

    def __init__(self, reason: str, schema_id: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.schema_id = schema_id


def _stored(row: bytes, fault: str | None, what: str) -> None:
    if fault is None:
        return
    if fault.startswith("schema id "):
        raise StoredRowError(f"{what} row: {fault}", struct.unpack_from("<I", row, 1)[0])
    raise StoredRowError(f"{what} row: {fault}")


def stored_base(
    kinds: list[int], dims: list[int], schema_id: int, row: bytes
) -> tuple[int, list[bytes | None]]:
    """row_cells of a stored base row; StoredRowError when it is not valid."""
    _stored(row, check_row(kinds, dims, schema_id, row), "base")
    return row_cells(kinds, dims, schema_id, row)


def stored_delta(kinds: list[int], dims: list[int], schema_id: int, row: bytes | None) -> DeltaRow:
    """delta_cells of a stored delta row (DeltaRow.empty for None); StoredRowError when bad."""
    if row is None:
        return DeltaRow.empty(len(kinds))
    _stored(row, check_delta_row(kinds, dims, schema_id, row), "delta")
    return delta_cells(kinds, dims, schema_id, row)


def delta_apply(
    kinds: list[int],
    dims: list[int],
    schema_id: int,
    old: bytes | None,
    update: bytes,
    present: list[bool],
) -> bytes:
    """The key's delta row after the update (docs/row-format.md, "Applying an update").

    ``update`` is a format-1 row whose event time t is the update's, ``present[f]`` says
    whether it sets feature f. A feature takes the update's value when it is absent or
    t >= its time (equal times: the later-applied wins); nothing changes when
    t <= deleted_at. A key without a delta row is one with nothing and no delete, so
    an update at the smallest int64 is always ignored. The row's event time moves to t
    only when the update sets something.
    """
    fault = check_row(kinds, dims, schema_id, update)
    if fault is not None:
        raise ValueError(f"update: {fault}")
    delta = stored_delta(kinds, dims, schema_id, old)
    t, cells = row_cells(kinds, dims, schema_id, update)
    changed = False
    if t > delta.deleted_at:
        for f, sets in enumerate(present):
            if sets and (delta.times[f] is None or t >= delta.times[f]):
                delta.times[f] = t
                delta.cells[f] = cells[f]
                changed = True
    if changed:
        delta.event_time = max(delta.event_time, t)
    return encode_delta(layout(kinds, dims), schema_id, delta)


def delta_delete(
    kinds: list[int], dims: list[int], schema_id: int, old: bytes | None, t: int
) -> bytes:
    """The key's delta row after a delete at ``t`` (µs): deleted_at = max(deleted_at, t), and
    every feature no newer than deleted_at goes."""
    delta = stored_delta(kinds, dims, schema_id, old)
    delta.deleted_at = max(delta.deleted_at, t)
    delta.event_time = max(delta.event_time, t)
    for f, time in enumerate(delta.times):
        if time is not None and time <= delta.deleted_at:
            delta.times[f] = None
            delta.cells[f] = None
    return encode_delta(layout(kinds, dims), schema_id, delta)


def delta_merge(
    kinds: list[int], dims: list[int], schema_id: int, stored: bytes | None, incoming: bytes
) -> bytes:
    """The key's delta row with another copy's merged in: the newer delete; per feature
    the newer time among those newer than it (equal times: the incoming one)."""
    a = stored_delta(kinds, dims, schema_id, stored)
    b = stored_delta(kinds, dims, schema_id, incoming)
    deleted_at = max(a.deleted_at, b.deleted_at)
    times: list[int | None] = []
    cells: list = []
    for ta, ca, tb, cb in zip(a.times, a.cells, b.times, b.cells, strict=True):
        a_live = ta is not None and ta > deleted_at
        b_live = tb is not None and tb > deleted_at
        if b_live and (not a_live or tb >= ta):
            times.append(tb)
            cells.append(cb)
        elif a_live:
            times.append(ta)
            cells.append(ca)
        else:
            times.append(None)
            cells.append(None)
    event_time = max(a.event_time, b.event_time)
    return encode_delta(
        layout(kinds, dims), schema_id, DeltaRow(event_time, deleted_at, times, cells)
    )


def expired(time: int, now: int, ttl: int) -> bool:
    """Whether a value of event time ``time`` reads as null at ``now`` under ``ttl`` (µs)."""
    return ttl > 0 and time < now - ttl


def overlay(
    kinds: list[int],
    dims: list[int],
    schema_id: int,
    base: bytes | None,
    delta: bytes | None,
    snapshot_time: int,
    now: int,
    ttl: list[int] | None = None,
) -> bytes | None:
    """What a read of the key returns (docs/row-format.md, "Reading"): a format-1 row,
    None (missing), or ``base`` itself when the read changes nothing in it.

    ``snapshot_time`` T is the version's (NO_DELETE without one); a delete hides a base
    row no newer than it only when it is newer than T, since a version holds every
    delete up to its snapshot time (as compaction assumes when it drops them).
    """
    n = len(kinds)
    ttl = ttl or [0] * n
    d = stored_delta(kinds, dims, schema_id, delta)
    base_counts = False
    if base is not None:
        tb, base_cells = stored_base(kinds, dims, schema_id, base)
        base_counts = tb > d.deleted_at or d.deleted_at <= snapshot_time
    # per feature: (event time, stored bytes) of the part that provides it, or None
    parts: list[tuple[int, bytes | None] | None] = [None] * n
    used_times = []
    if base_counts:
        parts = [(tb, cell) for cell in base_cells]
        used_times.append(tb)
    from_delta = False
    for f, t in enumerate(d.times):
        if t is not None and t > snapshot_time and (not base_counts or t > tb):
            parts[f] = (t, d.cells[f])
            used_times.append(t)
            from_delta = True
    if not used_times:
        return None
    live = [
        None if part is None or expired(part[0], now, ttl[f]) else part
        for f, part in enumerate(parts)
    ]
    if not from_delta and live == parts:
        return base
    cells = [None if part is None else part[1] for part in live]
    return encode_cells(layout(kinds, dims), schema_id, max(used_times), cells)


def delta_compact(
    kinds: list[int], dims: list[int], schema_id: int, row: bytes | None, snapshot_time: int
) -> bytes | None:
    """The key's delta row once a version with ``snapshot_time`` (µs) is current: features
    no newer than it go; None when nothing is left and no delete is newer than it;
    ``row`` itself when nothing goes. The event time is then the newest left."""
    if row is None:
        return None
    delta = stored_delta(kinds, dims, schema_id, row)
    kept = [t is not None and t > snapshot_time for t in delta.times]
    if not any(kept) and delta.deleted_at <= snapshot_time:
        return None
    if kept == [t is not None for t in delta.times]:
        return row
    times = [t if keep else None for t, keep in zip(delta.times, kept, strict=True)]
    cells = [c if keep else None for c, keep in zip(delta.cells, kept, strict=True)]
    event_time = max([delta.deleted_at] + [t for t in times if t is not None])
    return encode_delta(
        layout(kinds, dims), schema_id, DeltaRow(event_time, delta.deleted_at, times, cells)
    )


def delta_info(
    kinds: list[int], dims: list[int], schema_id: int, row: bytes
) -> tuple[int, int, dict[int, int]]:
    """(event time, deleted_at, {feature: time} of the present features) of a delta row."""
    delta = stored_delta(kinds, dims, schema_id, row)
    times = {f: t for f, t in enumerate(delta.times) if t is not None}
    return delta.event_time, delta.deleted_at, times


# --------------------------------------------------------------------------------------
# Keys


def encode_int_key(key: int) -> bytes:
    """8 bytes big-endian of the key with its sign bit flipped: byte order = integer order."""
    return struct.pack(">Q", (key & 0xFFFF_FFFF_FFFF_FFFF) ^ 0x8000_0000_0000_0000)


def encode_str_key(key: str) -> bytes:
    raw = key.encode("utf-8")
    if len(raw) > MAX_STR_KEY_SIZE:
        raise ValueError(f"a string key is at most {MAX_STR_KEY_SIZE} bytes, got {len(raw)}")
    return raw
