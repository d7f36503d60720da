"""The row codec: rows of docs/row-format.md to and from column buffers, keys, shards.

Every per-row and per-feature loop is here, in C, without the GIL wherever it makes
no Python object; Python code hands over whole columns (numpy arrays, byte buffers)
and gets whole columns back.
codec.pxd declares the layout struct and the inline row accessors; keys.pxi holds
the key encoding, sharding and the row list helpers.
"""

import operator
import sys

import numpy as np
cimport numpy as cnp

from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from libc.stdint cimport INT32_MAX, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.math cimport NAN
from libc.string cimport memchr, memcpy, memset

cnp.import_array()

from codec cimport (
    FEATURE_BOOL,
    FEATURE_FLOAT32,
    FEATURE_FLOAT32_VECTOR,
    FEATURE_FLOAT64,
    FEATURE_INT32,
    FEATURE_INT64,
    FEATURE_INT64_LIST,
    FEATURE_STRING,
    FEATURE_BYTES,
    MAX_STR_KEY_SIZE,
    N_FEATURE_KINDS,
    ROW_BAD_FORMAT,
    ROW_ENDS_DECREASE,
    ROW_FORMAT,
    ROW_HEADER_SIZE,
    ROW_OK,
    ROW_OTHER_SCHEMA,
    ROW_OUT_OF_BUFFER,
    ROW_TOO_SHORT,
    ROW_VAR_LENGTH,
    XXH3_64bits,
    RowCheck,
    RowFault,
    RowLayout,
    check_row,
    copy_fixed,
    is_null,
    load_i64,
    set_null,
    store_i64,
    store_u32,
    store_u64_be,
    var_end,
    var_start,
    zero_fixed,
)

if sys.byteorder != "little":
    # Fixed-width columns are copied between rows and arrays byte for byte.
    raise ImportError("kvstore._codec needs a little-endian host")

FORMAT_VERSION = ROW_FORMAT
HEADER_SIZE = ROW_HEADER_SIZE

KIND_BOOL = FEATURE_BOOL
KIND_INT32 = FEATURE_INT32
KIND_INT64 = FEATURE_INT64
KIND_FLOAT32 = FEATURE_FLOAT32
KIND_FLOAT64 = FEATURE_FLOAT64
KIND_FLOAT32_VECTOR = FEATURE_FLOAT32_VECTOR
KIND_STRING = FEATURE_STRING
KIND_BYTES = FEATURE_BYTES
KIND_INT64_LIST = FEATURE_INT64_LIST

# The numpy dtype of a fixed kind's values column (bool also takes uint8 on encode).
_FIXED_DTYPES = (
    np.dtype(np.bool_),
    np.dtype(np.int32),
    np.dtype(np.int64),
    np.dtype(np.float32),
    np.dtype(np.float64),
    np.dtype(np.float32),
)
_KIND_NAMES = ("bool", "int32", "int64", "float32", "float64", "float32[N]", "string", "bytes",
               "int64[]")
_UINT8 = np.dtype(np.uint8)
_INT64 = np.dtype(np.int64)
_INT32 = np.dtype(np.int32)

cdef uint64_t MAX_VAR_BYTES = 0xFFFFFFFF   # the var ends are u32
cdef Py_ssize_t MAX_VECTOR_DIM = 1 << 28


# ---------------------------------------------------------------------------------------
# Errors


class CorruptRow(ValueError):
    """A stored row that does not follow the row format; ``index`` is its position."""

    def __init__(self, index, reason):
        super().__init__(index, reason)
        self.index = index
        self.reason = reason

    def __str__(self):
        return f"row {self.index} is corrupt: {self.reason}"


class SchemaMismatch(ValueError):
    """A row written with another schema id than the layout's; ``index`` is its position.

    ``expected``, when given, is the layout's schema id (it only makes the message
    clearer).
    """

    def __init__(self, index, schema_id, expected=None):
        if expected is None:
            super().__init__(index, schema_id)
        else:
            super().__init__(index, schema_id, expected)
        self.index = index
        self.schema_id = schema_id
        self.expected = expected

    def __str__(self):
        text = f"row {self.index} was written with schema id {self.schema_id}"
        if self.expected is not None:
            text += f", expected {self.expected}"
        return text


# ---------------------------------------------------------------------------------------
# Layout


cdef class Layout:
    """The byte layout of one table schema: where each feature sits in a row.

    ``kinds`` holds a KIND_* per feature in schema order, ``dims`` the N of each
    float32[N] feature (ignored, and reported as 0, for the other kinds). Sizes and
    offsets are in bytes; ``fixed_offsets`` are from the start of the row.
    """

    cdef RowLayout c
    cdef void* _arrays

    def __cinit__(self):
        memset(&self.c, 0, sizeof(RowLayout))
        self._arrays = NULL

    def __dealloc__(self):
        PyMem_Free(self._arrays)

    def __init__(self, schema_id, kinds, dims):
        cdef Py_ssize_t f, n, kind, dim, width, offset, j
        if self._arrays != NULL:
            # Codec calls read the arrays without the GIL: they must never change.
            raise TypeError("a Layout is immutable")
        cdef list kind_list = [operator.index(k) for k in kinds]
        cdef list dim_list = [operator.index(d) for d in dims]
        schema_id = operator.index(schema_id)
        if not 0 <= schema_id <= 0xFFFFFFFF:
            raise ValueError(f"schema id {schema_id} does not fit in a u32")
        n = len(kind_list)
        if len(dim_list) != n:
            raise ValueError(f"dims has {len(dim_list)} entries, expected {n} (one per feature)")
        for f in range(n):
            if not 0 <= kind_list[f] < N_FEATURE_KINDS:
                raise ValueError(f"feature {f}: kind {kind_list[f]} is not a KIND_* value")
            if kind_list[f] == FEATURE_FLOAT32_VECTOR:
                if not 1 <= dim_list[f] <= MAX_VECTOR_DIM:
                    raise ValueError(
                        f"feature {f}: a float32 vector needs 1 <= dim <= {MAX_VECTOR_DIM}, "
                        f"got {dim_list[f]}"
                    )
            else:
                dim_list[f] = 0

        # One block: six Py_ssize_t arrays of n, then the n kind bytes.
        cdef char* block = <char*>PyMem_Calloc(6 * n * sizeof(Py_ssize_t) + n + 1, 1)
        if block == NULL:
            raise MemoryError()
        self._arrays = block
        cdef RowLayout* c = &self.c
        c.dims = <Py_ssize_t*>block
        c.widths = c.dims + n
        c.offsets = c.widths + n
        c.var_index = c.offsets + n
        c.var_features = c.var_index + n
        c.kinds = <uint8_t*>(c.var_features + n)

        c.schema_id = <uint32_t>schema_id
        c.n_features = n
        c.bitmap_size = (n + 7) // 8
        offset = ROW_HEADER_SIZE + c.bitmap_size
        j = 0
        for f in range(n):
            kind = kind_list[f]
            dim = dim_list[f]
            c.kinds[f] = <uint8_t>kind
            c.dims[f] = dim
            width = _fixed_width(kind, dim)
            c.widths[f] = width
            if width:
                c.offsets[f] = offset
                c.var_index[f] = -1
                offset += width
            else:
                c.offsets[f] = -1
                c.var_index[f] = j
                c.var_features[j] = f
                j += 1
        c.fixed_size = offset - ROW_HEADER_SIZE - c.bitmap_size
        c.n_var = j
        c.ends_start = offset
        c.min_row_size = offset + 4 * j

    @property
    def schema_id(self):
        return self.c.schema_id

    @property
    def n_features(self):
        return self.c.n_features

    @property
    def kinds(self):
        return [self.c.kinds[f] for f in range(self.c.n_features)]

    @property
    def dims(self):
        return [self.c.dims[f] for f in range(self.c.n_features)]

    @property
    def widths(self):
        return [self.c.widths[f] for f in range(self.c.n_features)]

    @property
    def fixed_offsets(self):
        return [self.c.offsets[f] for f in range(self.c.n_features)]

    @property
    def var_index(self):
        return [self.c.var_index[f] for f in range(self.c.n_features)]

    @property
    def null_bitmap_size(self):
        return self.c.bitmap_size

    @property
    def fixed_size(self):
        return self.c.fixed_size

    @property
    def n_var(self):
        return self.c.n_var

    @property
    def min_row_size(self):
        return self.c.min_row_size

    def __repr__(self):
        return f"Layout(schema_id={self.schema_id}, kinds={self.kinds}, dims={self.dims})"

    def __reduce__(self):
        return (Layout, (self.schema_id, self.kinds, self.dims))


cdef Py_ssize_t _fixed_width(Py_ssize_t kind, Py_ssize_t dim) noexcept:
    if kind == FEATURE_BOOL:
        return 1
    if kind == FEATURE_INT32 or kind == FEATURE_FLOAT32:
        return 4
    if kind == FEATURE_INT64 or kind == FEATURE_FLOAT64:
        return 8
    if kind == FEATURE_FLOAT32_VECTOR:
        return 4 * dim
    return 0


cdef str _feature_name(const RowLayout* c, Py_ssize_t f):
    if c.kinds[f] == FEATURE_FLOAT32_VECTOR:
        return f"feature {f} (float32[{c.dims[f]}])"
    return f"feature {f} ({_KIND_NAMES[c.kinds[f]]})"


# ---------------------------------------------------------------------------------------
# Argument checks: arrays in, C pointers out


cdef inline object _empty(Py_ssize_t n, int type_num):
    """np.empty(n, dtype) through NumPy's C API (a Python-level call costs ~0.3 µs)."""
    cdef cnp.npy_intp shape[1]
    shape[0] = n
    return cnp.PyArray_EMPTY(1, shape, type_num, 0)


cdef inline object _zeros(Py_ssize_t n, int type_num):
    cdef cnp.npy_intp shape[1]
    shape[0] = n
    return cnp.PyArray_ZEROS(1, shape, type_num, 0)


cdef object _int64_array(object obj, Py_ssize_t n, str what):
    """obj as a C-contiguous int64 ndarray of shape (n,) (any n when n < 0).

    Any integer dtype that int64 holds exactly is accepted and converted.
    """
    if (
        cnp.PyArray_Check(obj)
        and cnp.PyArray_TYPE(<cnp.ndarray>obj) == cnp.NPY_INT64
        and cnp.PyArray_NDIM(<cnp.ndarray>obj) == 1
        and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>obj)
        and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>obj)
        and (n < 0 or cnp.PyArray_DIMS(<cnp.ndarray>obj)[0] == n)
    ):
        return obj  # already what is asked for: no checks through Python
    if not isinstance(obj, np.ndarray):
        raise ValueError(f"{what} must be an int64 ndarray, got {type(obj).__name__}")
    if obj.ndim != 1:
        raise ValueError(f"{what} has shape {obj.shape}, expected a 1-d array")
    if n >= 0 and obj.shape[0] != n:
        raise ValueError(f"{what} has {obj.shape[0]} entries, expected {n}")
    if obj.dtype != _INT64 and (obj.dtype.kind not in "iu" or not np.can_cast(obj.dtype, _INT64)):
        raise ValueError(f"{what} has dtype {obj.dtype}, expected int64")
    return np.ascontiguousarray(obj, dtype=_INT64)


cdef object _mask_array(object obj, Py_ssize_t n, str what):
    """A valid/present mask (bool or uint8, nonzero = set) as a contiguous uint8 ndarray."""
    if not isinstance(obj, np.ndarray):
        raise ValueError(f"{what} must be a uint8 or bool ndarray, got {type(obj).__name__}")
    if obj.dtype != _UINT8 and obj.dtype != _FIXED_DTYPES[0]:
        raise ValueError(f"{what} has dtype {obj.dtype}, expected uint8 or bool")
    if obj.ndim != 1 or obj.shape[0] != n:
        raise ValueError(f"{what} has shape {obj.shape}, expected ({n},)")
    return np.ascontiguousarray(obj).view(_UINT8)


cdef object _byte_buffer(object obj, str what):
    """obj as a C-contiguous 1-d buffer of bytes: bytes, bytearray, memoryview, ndarray."""
    if isinstance(obj, np.ndarray):
        return np.ascontiguousarray(obj).reshape(-1).view(_UINT8)
    if isinstance(obj, (bytes, bytearray)):
        return obj
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"{what} must be a bytes-like object, got {type(obj).__name__}") from None
    if not view.c_contiguous:
        raise ValueError(f"{what} must be a contiguous buffer")
    return view.cast("B")


cdef inline bytes _as_bytes(object obj, str what):
    """obj as bytes: itself when it is bytes (what protobuf fields and sockets give:
    read in place, with no typed memoryview to take, ~70 ns each), else a copy."""
    if PyBytes_CheckExact(obj):
        return <bytes>obj
    return bytes(_byte_buffer(obj, what))


cdef inline int64_t* _int64_data(object array) noexcept:
    """The data of an int64 ndarray from ``_int64_array``, ``_empty`` or ``_zeros``."""
    return <int64_t*>cnp.PyArray_DATA(<cnp.ndarray>array)


cdef inline const uint8_t* _bytes_ptr(const uint8_t[::1] view) noexcept nogil:
    if view.shape[0] == 0:
        return <const uint8_t*>""
    return &view[0]


cdef inline uint8_t* _out_ptr(uint8_t[::1] view) noexcept nogil:
    if view.shape[0] == 0:
        return NULL
    return &view[0]


cdef inline const int64_t* _int64_ptr(const int64_t[::1] view) noexcept nogil:
    if view.shape[0] == 0:
        return NULL
    return &view[0]


cdef int _check_projection_index(const RowLayout* c, object feature) except -1:
    if not 0 <= feature < c.n_features:
        raise ValueError(f"projection names feature {feature}, the schema has {c.n_features}")
    return 0


# ---------------------------------------------------------------------------------------
# Row checks


cdef bint _check_batch(const RowLayout* layout, const uint8_t* buf, Py_ssize_t buf_len,
                       const int64_t* starts, const int64_t* lengths, Py_ssize_t n,
                       RowCheck* check) noexcept nogil:
    """Checks rows buf[starts[i] : starts[i] + lengths[i]] (a negative length: no row).

    Returns True at the first bad row, with check filled, its index included.
    """
    cdef Py_ssize_t i
    cdef int64_t start, length
    for i in range(n):
        length = lengths[i]
        if length < 0:
            continue
        start = starts[i]
        if start < 0 or length > buf_len or start > buf_len - length:
            check.fault = ROW_OUT_OF_BUFFER
            check.index = i
            check.a = start
            check.b = length
            check.c = buf_len
            return True
        if check_row(layout, buf + start, <Py_ssize_t>length, check) != ROW_OK:
            check.index = i
            return True
    return False


cdef str _fault_reason(const RowLayout* layout, const RowCheck* check):
    cdef RowFault fault = check.fault
    if fault == ROW_TOO_SHORT:
        return f"length {check.a} is shorter than the {layout.min_row_size}-byte minimum"
    if fault == ROW_BAD_FORMAT:
        return f"format byte 0x{check.a:02x}, expected 0x{ROW_FORMAT:02x}"
    if fault == ROW_OTHER_SCHEMA:
        return f"schema id {check.a}, expected {layout.schema_id}"
    if fault == ROW_ENDS_DECREASE:
        return (
            f"var ends decrease: feature {layout.var_features[check.a]} ends at {check.b}, "
            f"before the previous end {check.c}"
        )
    if fault == ROW_VAR_LENGTH:
        return (
            f"var data length mismatch: the var ends cover {check.a} bytes, "
            f"the row holds {check.b}"
        )
    if fault == ROW_OUT_OF_BUFFER:
        return f"bytes [{check.a}, {check.a + check.b}) lie outside the {check.c}-byte buffer"
    return "no fault"


cdef int _raise_fault(const RowLayout* layout, const RowCheck* check) except -1:
    if check.fault == ROW_OUT_OF_BUFFER:
        raise ValueError(f"row {check.index}: {_fault_reason(layout, check)}")
    if check.fault == ROW_OTHER_SCHEMA:
        raise SchemaMismatch(check.index, check.a, layout.schema_id)
    raise CorruptRow(check.index, _fault_reason(layout, check))


def check_rows(Layout layout not None, buf, starts, lengths):
    """The first row that is not valid under ``layout``, as (index, reason), or None.

    Row i is ``buf[starts[i] : starts[i] + lengths[i]]`` (bytes); a negative length
    is a missing key and is fine. A row with another schema id is reported as bad.
    Raises ValueError when a row lies outside ``buf``.
    """
    cdef const RowLayout* c = &layout.c
    cdef const uint8_t[::1] data = _byte_buffer(buf, "buf")
    cdef const int64_t[::1] st = _int64_array(starts, -1, "starts")
    cdef Py_ssize_t n = st.shape[0]
    cdef const int64_t[::1] ln = _int64_array(lengths, n, "lengths")
    cdef RowCheck check
    cdef bint bad
    with nogil:
        bad = _check_batch(c, _bytes_ptr(data), data.shape[0], _int64_ptr(st), _int64_ptr(ln), n,
                           &check)
    if not bad:
        return None
    if check.fault == ROW_OUT_OF_BUFFER:
        _raise_fault(c, &check)
    return (check.index, _fault_reason(c, &check))


# ---------------------------------------------------------------------------------------
# Encoding


cdef struct EncColumn:
    bint absent                 # the feature is null in every row
    const uint8_t* values       # fixed: row i at values + i * width; var: the data
    const uint8_t* valid        # NULL: every row is valid
    const int64_t* offsets      # var: n + 1 byte offsets into values


cdef inline bint _enc_null(const EncColumn* col, Py_ssize_t i) noexcept nogil:
    return col.absent or (col.valid != NULL and col.valid[i] == 0)


cdef Py_ssize_t _bad_var_range(const int64_t* offsets, const uint8_t* valid, Py_ssize_t n,
                               int64_t data_len, bint whole_int64s) noexcept nogil:
    """The first non-null row whose [offsets[i], offsets[i+1]) is not a range of the data."""
    cdef Py_ssize_t i
    cdef int64_t a, b
    for i in range(n):
        if valid != NULL and valid[i] == 0:
            continue
        a = offsets[i]
        b = offsets[i + 1]
        if a < 0 or b < a or b > data_len or (whole_int64s and ((a | b) & 7)):
            return i
    return -1


cdef int _bind_encode_column(const RowLayout* c, Py_ssize_t f, object column, Py_ssize_t n,
                             EncColumn* col, list keep) except -1:
    """Checks column f of encode_rows and points col at its buffers (kept alive in keep)."""
    cdef Py_ssize_t kind = c.kinds[f]
    cdef const uint8_t[::1] raw
    cdef const uint8_t[::1] valid_view
    cdef const int64_t[::1] offsets_view
    cdef Py_ssize_t bad
    if column is None:
        col.absent = True
        return 0
    name = _feature_name(c, f)
    if c.widths[f]:
        if not isinstance(column, tuple) or len(column) != 2:
            raise ValueError(f"{name}: expected None or (values, valid), got {type(column).__name__}")
        values, valid = column
        if not isinstance(values, np.ndarray):
            raise ValueError(f"{name}: values must be an ndarray, got {type(values).__name__}")
        dtype = _FIXED_DTYPES[kind]
        if values.dtype != dtype and not (kind == FEATURE_BOOL and values.dtype == _UINT8):
            raise ValueError(f"{name}: values has dtype {values.dtype}, expected {dtype}")
        if kind == FEATURE_FLOAT32_VECTOR:
            if values.ndim != 2 or values.shape[0] != n or values.shape[1] != c.dims[f]:
                raise ValueError(
                    f"{name}: values has shape {values.shape}, expected ({n}, {c.dims[f]})"
                )
        elif values.ndim != 1:
            raise ValueError(f"{name}: values has shape {values.shape}, expected ({n},)")
        elif values.shape[0] != n:
            raise ValueError(f"{name}: values has {values.shape[0]} rows, expected {n}")
        buffer = _byte_buffer(values, name)
        raw = buffer
        keep.append(buffer)
        col.values = _bytes_ptr(raw)
    else:
        if not isinstance(column, tuple) or len(column) != 3:
            raise ValueError(
                f"{name}: expected None or (offsets, data, valid), got {type(column).__name__}"
            )
        offsets, data, valid = column
        offsets = _int64_array(offsets, n + 1, f"{name}: offsets")
        offsets_view = offsets
        keep.append(offsets)
        col.offsets = &offsets_view[0]
        buffer = _byte_buffer(data, f"{name}: data")
        raw = buffer
        keep.append(buffer)
        col.values = _bytes_ptr(raw)
    if valid is not None:
        valid = _mask_array(valid, n, f"{name}: valid")
        valid_view = valid
        keep.append(valid)
        col.valid = _bytes_ptr(valid_view)
    if not c.widths[f]:
        bad = _bad_var_range(col.offsets, col.valid, n, raw.shape[0], kind == FEATURE_INT64_LIST)
        if bad >= 0:
            a = col.offsets[bad]
            b = col.offsets[bad + 1]
            if 0 <= a <= b <= raw.shape[0]:
                raise ValueError(
                    f"{name}: offsets [{a}, {b}) of row {bad} are not multiples of 8 "
                    f"(int64[] data holds 8-byte elements)"
                )
            raise ValueError(
                f"{name}: offsets [{a}, {b}) of row {bad} are not a range of the "
                f"{raw.shape[0]}-byte data"
            )
    return 0


cdef Py_ssize_t _encode_sizes(const RowLayout* c, const EncColumn* cols, Py_ssize_t n,
                              int64_t* row_offsets) noexcept nogil:
    """Fills the n + 1 row offsets; returns the first row whose var data is too long, or -1."""
    cdef Py_ssize_t i, j
    cdef const EncColumn* col
    cdef uint64_t var_bytes
    row_offsets[0] = 0
    for i in range(n):
        var_bytes = 0
        for j in range(c.n_var):
            col = &cols[c.var_features[j]]
            if not _enc_null(col, i):
                var_bytes += <uint64_t>(col.offsets[i + 1] - col.offsets[i])
        if var_bytes > MAX_VAR_BYTES:
            return i
        row_offsets[i + 1] = row_offsets[i] + c.min_row_size + <int64_t>var_bytes
    return -1


cdef void _encode_fill(const RowLayout* c, const EncColumn* cols, Py_ssize_t n,
                       const int64_t* event_times, const int64_t* row_offsets,
                       uint8_t* out) noexcept nogil:
    cdef Py_ssize_t i, f, width
    cdef int64_t length
    cdef uint32_t end
    cdef uint8_t* row
    cdef uint8_t* dst
    cdef const EncColumn* col
    cdef bint null
    for i in range(n):
        row = out + row_offsets[i]
        row[0] = ROW_FORMAT
        store_u32(row + 1, c.schema_id)
        store_i64(row + 5, event_times[i])
        memset(row + ROW_HEADER_SIZE, 0, c.bitmap_size)
        end = 0
        for f in range(c.n_features):
            col = &cols[f]
            null = _enc_null(col, i)
            if null:
                set_null(row, f)
            width = c.widths[f]
            if width:
                dst = row + c.offsets[f]
                if null:
                    zero_fixed(dst, width)
                elif c.kinds[f] == FEATURE_BOOL:
                    dst[0] = col.values[i] != 0
                else:
                    copy_fixed(dst, col.values + i * width, width)
            else:
                if not null:
                    length = col.offsets[i + 1] - col.offsets[i]
                    if length:
                        memcpy(row + c.min_row_size + end, col.values + col.offsets[i],
                               <size_t>length)
                    end += <uint32_t>length
                store_u32(row + c.ends_start + 4 * c.var_index[f], end)


def encode_rows(Layout layout not None, columns, Py_ssize_t n_rows, event_times):
    """Encodes n_rows rows from columns (one entry per feature, schema order).

    A column is None (the feature is null in every row), (values, valid) for a fixed
    kind or (offsets, data, valid) for a variable-width kind, offsets in bytes;
    valid None means every row is valid. event_times are µs since the epoch.
    Returns the rows back to back and their n_rows + 1 byte offsets (int64).
    """
    cdef const RowLayout* c = &layout.c
    cdef Py_ssize_t f, bad
    cdef list keep = []
    cdef EncColumn* cols
    cdef uint8_t* out
    if n_rows < 0:
        raise ValueError(f"n_rows is {n_rows}, expected >= 0")
    columns = list(columns)
    if len(columns) != c.n_features:
        raise ValueError(
            f"columns has {len(columns)} entries, expected {c.n_features} (one per feature)"
        )
    cdef const int64_t[::1] times = _int64_array(event_times, n_rows, "event_times")
    row_offsets = np.empty(n_rows + 1, dtype=_INT64)
    cdef int64_t[::1] offsets_view = row_offsets
    cols = <EncColumn*>PyMem_Calloc(c.n_features + 1, sizeof(EncColumn))
    if cols == NULL:
        raise MemoryError()
    try:
        for f in range(c.n_features):
            _bind_encode_column(c, f, columns[f], n_rows, &cols[f], keep)
        with nogil:
            bad = _encode_sizes(c, cols, n_rows, &offsets_view[0])
        if bad >= 0:
            raise ValueError(f"row {bad}: its var data exceeds {MAX_VAR_BYTES} bytes")
        block = PyBytes_FromStringAndSize(NULL, offsets_view[n_rows])
        out = <uint8_t*>PyBytes_AS_STRING(block)
        with nogil:
            _encode_fill(c, cols, n_rows, _int64_ptr(times), &offsets_view[0], out)
    finally:
        PyMem_Free(cols)
    return block, row_offsets


# ---------------------------------------------------------------------------------------
# Decoding


cdef struct DecColumn:
    Py_ssize_t feature
    uint8_t kind
    Py_ssize_t width            # fixed width, 0 for var kinds
    Py_ssize_t offset           # fixed: from the start of the row
    Py_ssize_t var_j            # var: j among the var features
    uint8_t* values             # fixed: n * width bytes; var: the data
    int64_t* offsets            # var: n + 1 byte offsets into values
    uint8_t* valid              # n


cdef void _decode_var_sizes(const RowLayout* c, const uint8_t** rows, Py_ssize_t n,
                            DecColumn* col) noexcept nogil:
    """The n + 1 offsets of a var column: the sizes of its values, missing and null empty."""
    cdef Py_ssize_t i
    cdef const uint8_t* row
    cdef int64_t size
    col.offsets[0] = 0
    for i in range(n):
        row = rows[i]
        size = 0
        if row != NULL and not is_null(row, col.feature):
            size = var_end(c, row, col.var_j) - var_start(c, row, col.var_j)
        col.offsets[i + 1] = col.offsets[i] + size


cdef inline void _decode_fixed_width(const uint8_t** rows, Py_ssize_t n, DecColumn* col,
                                     Py_ssize_t width) noexcept nogil:
    # Inlined with a constant width for the common sizes, so that each copy is a
    # single load and store.
    cdef Py_ssize_t i, offset = col.offset
    cdef Py_ssize_t null_byte = ROW_HEADER_SIZE + (col.feature >> 3)
    cdef uint8_t null_bit = <uint8_t>(1 << (col.feature & 7))
    cdef const uint8_t* row
    cdef uint8_t* dst = col.values
    cdef uint8_t* valid = col.valid
    for i in range(n):
        row = rows[i]
        if row != NULL and not (row[null_byte] & null_bit):
            valid[i] = 1
            memcpy(dst + i * width, row + offset, width)
        else:
            valid[i] = 0
            memset(dst + i * width, 0, width)


cdef void _decode_fixed(const uint8_t** rows, Py_ssize_t n, DecColumn* col) noexcept nogil:
    """A fixed column: values (zero where missing or null) and its valid mask."""
    cdef Py_ssize_t i
    cdef Py_ssize_t null_byte = ROW_HEADER_SIZE + (col.feature >> 3)
    cdef uint8_t null_bit = <uint8_t>(1 << (col.feature & 7))
    cdef const uint8_t* row
    cdef bint ok
    if col.kind == FEATURE_BOOL:
        for i in range(n):
            row = rows[i]
            ok = row != NULL and not (row[null_byte] & null_bit)
            col.valid[i] = ok
            col.values[i] = ok and row[col.offset] != 0   # numpy bools must be 0 or 1
    elif col.width == 4:
        _decode_fixed_width(rows, n, col, 4)
    elif col.width == 8:
        _decode_fixed_width(rows, n, col, 8)
    else:
        _decode_fixed_width(rows, n, col, col.width)


cdef void _decode_var(const RowLayout* c, const uint8_t** rows, Py_ssize_t n,
                      DecColumn* col) noexcept nogil:
    """A var column, its offsets already known: the data and the valid mask."""
    cdef Py_ssize_t i
    cdef const uint8_t* row
    cdef uint32_t start, end
    for i in range(n):
        row = rows[i]
        if row == NULL or is_null(row, col.feature):
            col.valid[i] = 0
            continue
        col.valid[i] = 1
        start = var_start(c, row, col.var_j)
        end = var_end(c, row, col.var_j)
        if end > start:
            memcpy(col.values + col.offsets[i], row + c.min_row_size + start, end - start)


cdef void _row_pointers(const uint8_t* buf, const int64_t* starts, const int64_t* lengths,
                        Py_ssize_t n, const uint8_t** rows, int64_t* event_times) noexcept nogil:
    """Where each row starts (NULL: missing) and its event time (0: missing)."""
    cdef Py_ssize_t i
    for i in range(n):
        if lengths[i] < 0:
            rows[i] = NULL
            event_times[i] = 0
        else:
            rows[i] = buf + starts[i]
            event_times[i] = load_i64(rows[i] + 5)


cdef void _fill_nan(DecColumn* col, Py_ssize_t n, Py_ssize_t dim) noexcept nogil:
    """NaN in every value of a float column's rows that are missing or null."""
    cdef Py_ssize_t i, j
    cdef float* f32
    cdef double* f64
    for i in range(n):
        if col.valid[i]:
            continue
        if col.kind == FEATURE_FLOAT64:
            f64 = <double*>(col.values + 8 * i)
            f64[0] = NAN
        else:
            f32 = <float*>(col.values + 4 * i * dim)
            for j in range(dim):
                f32[j] = NAN


cdef class Projection:
    """The features a decode fills, in order (``projection``: feature indices of ``layout``).

    Checked once and kept by callers that decode the same projection again and again
    (the client keeps one per table and feature list, with the schema it was made
    from). Repeats are allowed: each is its own column.
    """

    cdef readonly Layout layout
    #: The projected feature indices.
    cdef readonly tuple features
    #: Column positions whose to_numpy form is not the values array itself: bool and
    #: int kinds (masked), var kinds (built from offsets and data).
    cdef readonly tuple masked_columns
    cdef readonly tuple var_columns
    cdef DecColumn* cols            # the per-column constants; values/valid/offsets unset
    cdef Py_ssize_t n_cols
    cdef list dtypes                # numpy dtype of a fixed column's values, None for var
    cdef list dims                  # N of a float32[N] column, 0 for the others
    cdef Py_ssize_t* cdims          # the same, for C

    def __cinit__(self, Layout layout not None, projection):
        cdef const RowLayout* c = &layout.c
        cdef Py_ssize_t k, f
        cdef list masked = []
        cdef list var = []
        self.layout = layout
        self.features = tuple([operator.index(f) for f in projection])
        self.n_cols = len(self.features)
        for f in self.features:
            _check_projection_index(c, f)
        self.cols = <DecColumn*>PyMem_Calloc(self.n_cols + 1, sizeof(DecColumn))
        if self.cols == NULL:
            raise MemoryError()
        self.cdims = <Py_ssize_t*>PyMem_Calloc(self.n_cols + 1, sizeof(Py_ssize_t))
        if self.cdims == NULL:
            raise MemoryError()
        self.dtypes = [None] * self.n_cols
        self.dims = [0] * self.n_cols
        for k in range(self.n_cols):
            f = self.features[k]
            self.cols[k].feature = f
            self.cols[k].kind = c.kinds[f]
            self.cols[k].width = c.widths[f]
            self.cols[k].offset = c.offsets[f]
            self.cols[k].var_j = c.var_index[f]
            if c.widths[f]:
                self.dtypes[k] = _FIXED_DTYPES[c.kinds[f]]
                if c.kinds[f] == FEATURE_FLOAT32_VECTOR:
                    self.dims[k] = c.dims[f]
                    self.cdims[k] = c.dims[f]
                elif c.kinds[f] not in (FEATURE_FLOAT32, FEATURE_FLOAT64):
                    masked.append(k)
            else:
                var.append(k)
        self.masked_columns = tuple(masked)
        self.var_columns = tuple(var)

    def __dealloc__(self):
        PyMem_Free(self.cols)
        PyMem_Free(self.cdims)

    def __len__(self):
        return self.n_cols

    def __reduce__(self):
        # A GetResult holds one (through its Decoded): results pickle and deep-copy.
        return (Projection, (self.layout, self.features))


cdef class Decoded:
    """n rows decoded into columns by ``decode``: one block of fixed values and one of
    valid masks for all columns, and each var column's offsets and data.

    ``found`` (bool) and ``event_times`` (int64, µs; 0 where missing) have one entry
    per row; ``complete[k]`` is True when column k is valid in every row. Columns are
    read out as numpy views of the blocks, so a caller pays for the ones it asks for.
    """

    cdef readonly Projection projection
    cdef readonly Py_ssize_t n
    cdef readonly object found
    cdef readonly object event_times
    cdef readonly list complete
    cdef object fixed               # uint8 ndarray, every fixed column 64-byte aligned
    cdef object valid_block         # uint8 ndarray (columns, n)
    cdef object positions           # int64 ndarray: a fixed column's byte offset in fixed (-1: var)
    cdef list var                   # a var column's (offsets, data), None for fixed

    def _check(self):
        if self.projection is None:
            raise TypeError("a Decoded comes from kvstore._codec.decode()")

    def values(self, Py_ssize_t k):
        """Fixed column k's values: float kinds NaN, the others zero where not valid."""
        self._check()
        dtype = self.projection.dtypes[k]  # IndexError when there is no column k
        if dtype is None:
            raise ValueError(f"column {k} is a var column: see column()")
        return self._view(dtype, self.projection.dims[k], self.positions[k])

    cdef object _view(self, cnp.dtype dtype, Py_ssize_t dim, Py_ssize_t position):
        """A (n,) or (n, dim) array of ``dtype`` over ``fixed`` from byte ``position``;
        made with NumPy's C API (~0.1 µs; np.ndarray(..., buffer=) costs ~0.2)."""
        cdef cnp.npy_intp shape[2]
        shape[0] = self.n
        shape[1] = dim
        cdef char* data = cnp.PyArray_BYTES(<cnp.ndarray>self.fixed) + position
        arr = cnp.PyArray_SimpleNewFromData(2 if dim else 1, shape, dtype.type_num, data)
        cnp.set_array_base(arr, self.fixed)
        return arr

    def valid(self, Py_ssize_t k):
        """Column k's valid mask (uint8): 1 where the key was found and the value is not null."""
        self._check()
        return self.valid_block[k]

    def column(self, Py_ssize_t k):
        """Column k as (values, valid), or (offsets, data, valid) for var kinds (byte offsets)."""
        self._check()
        if self.var[k] is not None:
            offsets, data = self.var[k]
            return offsets, data, self.valid_block[k]
        return self.values(k), self.valid_block[k]

    def values_dict(self, names):
        """{names[k]: values(k)} in column order; None for var columns (see column())."""
        cdef dict out = {}
        cdef Py_ssize_t k
        self._check()
        cdef Projection p = self.projection
        cdef list keys = names if type(names) is list else list(names)
        cdef const int64_t* positions = _int64_data(self.positions)
        if len(keys) != p.n_cols:
            raise ValueError(f"{len(keys)} names for {p.n_cols} columns")
        for k in range(p.n_cols):
            if p.cols[k].width == 0:
                out[keys[k]] = None
            else:
                out[keys[k]] = self._view(<cnp.dtype>p.dtypes[k], p.cdims[k], positions[k])
        return out


def decode(Projection projection not None, buf, starts, lengths):
    """Decodes the projected features of n rows into a ``Decoded``.

    Row i is ``buf[starts[i] : starts[i] + lengths[i]]`` (bytes); a negative length
    is a missing key: every feature invalid, event time 0. Every present row is
    checked first (CorruptRow, SchemaMismatch name the first bad one).
    """
    cdef Projection p = projection
    cdef const RowLayout* c = &p.layout.c
    cdef bytes data = _as_bytes(buf, "buf")
    starts = _int64_array(starts, -1, "starts")
    cdef Py_ssize_t n = cnp.PyArray_DIMS(<cnp.ndarray>starts)[0]
    lengths = _int64_array(lengths, n, "lengths")
    cdef const uint8_t* base = <const uint8_t*>PyBytes_AS_STRING(data)
    cdef const int64_t* starts_ptr = _int64_data(starts)
    cdef const int64_t* lengths_ptr = _int64_data(lengths)
    cdef Py_ssize_t data_size = PyBytes_GET_SIZE(data)
    cdef RowCheck check
    cdef bint bad
    with nogil:
        bad = _check_batch(c, base, data_size, starts_ptr, lengths_ptr, n, &check)
    if bad:
        _raise_fault(c, &check)

    cdef Py_ssize_t n_cols = p.n_cols
    cdef Py_ssize_t k, i
    cdef Py_ssize_t fixed_bytes = 0
    cdef uint8_t* fixed_base
    cdef uint8_t* valid_base
    cdef uint8_t* found_ptr
    cdef DecColumn* col
    cdef cnp.npy_intp shape[2]
    cdef Decoded d = Decoded.__new__(Decoded)
    d.projection = p
    d.n = n
    d.positions = _empty(n_cols, cnp.NPY_INT64)
    cdef int64_t* positions = _int64_data(d.positions)
    d.var = [None] * n_cols
    cdef list var_offsets = [None] * n_cols
    d.event_times = _empty(n, cnp.NPY_INT64)
    cdef int64_t* times = _int64_data(d.event_times)
    d.found = _empty(n, cnp.NPY_BOOL)
    found_ptr = <uint8_t*>cnp.PyArray_BYTES(<cnp.ndarray>d.found)
    # The column structs of this call: the projection's constants plus this call's buffers.
    cdef DecColumn* cols = <DecColumn*>PyMem_Malloc((n_cols + 1) * sizeof(DecColumn))
    cdef const uint8_t** rows = <const uint8_t**>PyMem_Malloc((n + 1) * sizeof(uint8_t*))
    if cols == NULL or rows == NULL:
        PyMem_Free(cols)
        PyMem_Free(rows)
        raise MemoryError()
    try:
        memcpy(cols, p.cols, n_cols * sizeof(DecColumn))
        with nogil:
            _row_pointers(base, starts_ptr, lengths_ptr, n, rows, times if n else NULL)
            for i in range(n):
                found_ptr[i] = rows[i] != NULL
        for k in range(n_cols):
            col = &cols[k]
            if col.width:
                positions[k] = fixed_bytes
                fixed_bytes += (n * col.width + 63) & ~63   # each column 64-byte aligned
            else:
                positions[k] = -1
                offsets = _empty(n + 1, cnp.NPY_INT64)
                col.offsets = _int64_data(offsets)
                var_offsets[k] = offsets
        # The valid masks of all columns share one allocation, and so do the fixed
        # values: two numpy allocations per call rather than two per column, which
        # dominate a call with many projected features. Each column is a view.
        shape[0] = n_cols
        shape[1] = n
        d.valid_block = cnp.PyArray_EMPTY(2, shape, cnp.NPY_UINT8, 0)
        valid_base = <uint8_t*>cnp.PyArray_BYTES(<cnp.ndarray>d.valid_block) if n else NULL
        d.fixed = _empty(fixed_bytes, cnp.NPY_UINT8)
        fixed_base = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>d.fixed)
        for k in range(n_cols):
            cols[k].valid = valid_base + k * n if n else NULL
            if cols[k].width:
                cols[k].values = fixed_base + positions[k] if n else NULL
        for k in range(n_cols):
            col = &cols[k]
            if col.width == 0:
                with nogil:
                    _decode_var_sizes(c, rows, n, col)
                data_array = _empty(col.offsets[n], cnp.NPY_UINT8)
                col.values = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>data_array)
                d.var[k] = (var_offsets[k], data_array)
        # Column by column: each loop is short and specialised, and writes one
        # output sequentially.
        with nogil:
            for k in range(n_cols):
                if cols[k].width:
                    _decode_fixed(rows, n, &cols[k])
                else:
                    _decode_var(c, rows, n, &cols[k])
        d.complete = [None] * n_cols
        for k in range(n_cols):
            col = &cols[k]
            whole = n == 0 or memchr(col.valid, 0, n) == NULL
            d.complete[k] = whole
            if not whole and col.kind in (FEATURE_FLOAT32, FEATURE_FLOAT64,
                                          FEATURE_FLOAT32_VECTOR):
                _fill_nan(col, n, c.dims[col.feature] if col.kind == FEATURE_FLOAT32_VECTOR
                          else 1)
    finally:
        PyMem_Free(cols)
        PyMem_Free(rows)
    return d


def decode_columns(Layout layout not None, projection, buf, starts, lengths):
    """Decodes the projected features of n rows into columns (see ``decode``), every
    column at once: the form the codec's tests compare with their oracle.

    Returns one column per projected feature, (values, valid) or (offsets, data,
    valid) with byte offsets, and the event times (µs since the epoch, int64).
    Values of float kinds are NaN where missing or null, other fixed kinds zero.
    """
    cdef Decoded d = decode(Projection(layout, projection), buf, starts, lengths)
    return [d.column(k) for k in range(d.projection.n_cols)], d.event_times


include "keys.pxi"
include "delta.pxi"
