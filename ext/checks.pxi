# Checks on what comes in. Python arguments become C pointers: int64 arrays, masks
# and byte buffers of the right dtype and shape, contiguous (the NumPy C-API
# constructors of the output arrays sit with them). Stored rows are checked against a
# layout (a "valid" row of docs/row-format.md), the first bad one raising CorruptRow
# or SchemaMismatch. Included by codec.pyx.

_UINT8 = np.dtype(np.uint8)
_INT64 = np.dtype(np.int64)
_INT32 = np.dtype(np.int32)


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


# Arguments: arrays in, C pointers out


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


cdef inline const int64_t* _int64_ptr(const int64_t[::1] view) noexcept nogil:
    if view.shape[0] == 0:
        return NULL
    return &view[0]


cdef int _check_projection_index(const RowLayout* c, object feature) except -1:
    if not 0 <= feature < c.n_features:
        raise ValueError(f"projection names feature {feature}, the schema has {c.n_features}")
    return 0


# Rows: the first bad row of a batch, and the error that names it


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
