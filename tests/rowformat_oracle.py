"""A plain-Python reference of the row format (docs/row-format.md).

The Cython codec (ext/codec.pyx) is tested against this module, so it stays slow and
obvious: one ``struct`` call per field, one feature at a time, no numpy. Values are
Python objects: bool, int, float, str, bytes, list[float] (float32[N]) and list[int]
(int64[]); None is a null.
"""

import struct
from dataclasses import dataclass

FORMAT = 1
HEADER = struct.Struct("<BIq")  # format byte, schema id (u32), event time (i64, µs)
HEADER_SIZE = HEADER.size  # 13

BOOL, INT32, INT64, FLOAT32, FLOAT64, FLOAT32_VECTOR, STRING, BYTES, INT64_LIST = range(9)
KINDS = (BOOL, INT32, INT64, FLOAT32, FLOAT64, FLOAT32_VECTOR, STRING, BYTES, INT64_LIST)
VAR_KINDS = (STRING, BYTES, INT64_LIST)

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
    return struct.calcsize(SCALAR_FORMATS[kind])


def layout(kinds: list[int], dims: list[int]) -> RowLayout:
    dims = [dim if kind == FLOAT32_VECTOR else 0 for kind, dim in zip(kinds, dims, strict=True)]
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


def encode_value(kind: int, dim: int, value) -> bytes:
    """The bytes of one non-null value: its fixed field or its var data."""
    if kind == FLOAT32_VECTOR:
        if len(value) != dim:
            raise ValueError(f"a float32[{dim}] value has {len(value)} elements")
        return struct.pack(f"<{dim}f", *value)
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
    if kind == STRING:
        return raw.decode("utf-8")
    if kind == BYTES:
        return raw
    if kind == INT64_LIST:
        return list(struct.unpack(f"<{len(raw) // 8}q", raw))
    if kind == BOOL:
        return raw != b"\x00"  # 0 or 1 on disk; anything else still reads as true
    return struct.unpack(SCALAR_FORMATS[kind], raw)[0]


def encode_row(
    kinds: list[int], dims: list[int], schema_id: int, event_time: int, values: list
) -> bytes:
    """One row: header, null bitmap, fixed section, var ends, var data."""
    lay = layout(kinds, dims)
    bitmap = bytearray(lay.null_bitmap_size)
    fixed = b""
    ends = []
    var_data = b""
    for feature, (kind, dim, value) in enumerate(zip(kinds, lay.dims, values, strict=True)):
        if value is None:
            bitmap[feature // 8] |= 1 << (feature % 8)
        if kind in VAR_KINDS:
            if value is not None:
                var_data += encode_value(kind, dim, value)
            ends.append(len(var_data))  # a null var feature is empty
        else:
            width = lay.widths[feature]
            fixed += bytes(width) if value is None else encode_value(kind, dim, value)
    header = HEADER.pack(FORMAT, schema_id, event_time)
    var_ends = struct.pack(f"<{len(ends)}I", *ends)
    return header + bytes(bitmap) + fixed + var_ends + var_data


def check_row(kinds: list[int], dims: list[int], schema_id: int, row: bytes) -> str | None:
    """Why ``row`` is not a valid row of this schema, or None when it is.

    The order of the checks is part of the contract (the codec reports the same
    reason): the header first, then the schema id (a row of another schema is laid
    out by that schema, so its sizes mean nothing here), then the sizes.
    """
    lay = layout(kinds, dims)
    too_short = f"length {len(row)} is shorter than the {lay.min_row_size}-byte minimum"
    if len(row) < HEADER_SIZE:
        return too_short
    format_byte, row_schema_id, _ = HEADER.unpack_from(row)
    if format_byte != FORMAT:
        return f"format byte 0x{format_byte:02x}, expected 0x{FORMAT:02x}"
    if row_schema_id != schema_id:
        return f"schema id {row_schema_id}, expected {schema_id}"
    if len(row) < lay.min_row_size:
        return too_short
    ends = struct.unpack_from(f"<{lay.n_var}I", row, lay.ends_start)
    previous = 0
    for j, end in enumerate(ends):
        if end < previous:
            feature = lay.var_features[j]
            return (
                f"var ends decrease: feature {feature} ends at {end}, "
                f"before the previous end {previous}"
            )
        previous = end
    var_bytes = len(row) - lay.min_row_size
    if previous != var_bytes:
        return (
            f"var data length mismatch: the var ends cover {previous} bytes, "
            f"the row holds {var_bytes}"
        )
    return None


def decode_row(kinds: list[int], dims: list[int], schema_id: int, row: bytes) -> tuple[int, list]:
    """(event time, values) of a row; ValueError when it is not a valid row of the schema."""
    fault = check_row(kinds, dims, schema_id, row)
    if fault is not None:
        raise ValueError(fault)
    lay = layout(kinds, dims)
    _, _, event_time = HEADER.unpack_from(row)
    ends = struct.unpack_from(f"<{lay.n_var}I", row, lay.ends_start)
    var_data = row[lay.min_row_size :]
    values = []
    for feature, (kind, dim) in enumerate(zip(kinds, lay.dims, strict=True)):
        if row[HEADER_SIZE + feature // 8] >> (feature % 8) & 1:
            values.append(None)
        elif kind in VAR_KINDS:
            j = lay.var_index[feature]
            start = ends[j - 1] if j > 0 else 0
            values.append(decode_value(kind, dim, var_data[start : ends[j]]))
        else:
            offset = lay.fixed_offsets[feature]
            values.append(decode_value(kind, dim, row[offset : offset + lay.widths[feature]]))
    return event_time, values


def merge_row(
    kinds: list[int],
    dims: list[int],
    schema_id: int,
    old: bytes | None,
    new: bytes,
    present: list[bool],
) -> bytes:
    """A partial write ``new`` over the stored row ``old``: the features the write sets
    (present) come from new, the others from old; the event time is new's."""
    if old is None:
        return new
    _, old_values = decode_row(kinds, dims, schema_id, old)
    event_time, new_values = decode_row(kinds, dims, schema_id, new)
    values = [n if p else o for n, o, p in zip(new_values, old_values, present, strict=True)]
    return encode_row(kinds, dims, schema_id, event_time, values)


def encode_int_key(key: int) -> bytes:
    """8 bytes big-endian of the key with its sign bit flipped: byte order = integer order."""
    return struct.pack(">Q", (key & 0xFFFF_FFFF_FFFF_FFFF) ^ 0x8000_0000_0000_0000)


def encode_str_key(key: str) -> bytes:
    raw = key.encode("utf-8")
    if len(raw) > MAX_STR_KEY_SIZE:
        raise ValueError(f"a string key is at most {MAX_STR_KEY_SIZE} bytes, got {len(raw)}")
    return raw
