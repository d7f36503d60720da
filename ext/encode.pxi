# Encoding (docs/row-format.md): n rows from one column per feature, in two passes
# without the GIL once the columns are bound: the row sizes, then the rows. A float32
# vector stored as float16 or int8 is quantized here, row by row, while it is copied.
# Included by codec.pyx.


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


cdef Py_ssize_t _unquantizable(const EncColumn* col, Py_ssize_t n, Py_ssize_t dim,
                               bint half, Py_ssize_t* element) noexcept nogil:
    """The first non-null row holding a value the storage cannot hold, or -1: for
    float16 a finite value that would round to inf, for int8 a NaN or an inf."""
    cdef Py_ssize_t i, j
    cdef const float* x
    cdef float v
    for i in range(n):
        if _enc_null(col, i):
            continue
        x = <const float*>(col.values) + i * dim
        for j in range(dim):
            v = x[j]
            if (half and isfinite(v) and fabsf(v) >= FLOAT16_OVERFLOW) or (
                not half and not isfinite(v)
            ):
                element[0] = j
                return i
    return -1


cdef int _check_quantizable(const RowLayout* c, Py_ssize_t f, const EncColumn* col,
                            Py_ssize_t n) except -1:
    cdef Py_ssize_t dim = c.dims[f], element = 0, row
    cdef bint half = c.kinds[f] == FEATURE_FLOAT16_VECTOR
    with nogil:
        row = _unquantizable(col, n, dim, half, &element)
    if row < 0:
        return 0
    value = (<const float*>(col.values))[row * dim + element]
    if half:
        raise ValueError(
            f"{_feature_name(c, f)}, row {row}: element {element} is {value!r}, beyond "
            f"float16's range (|x| < 65520); store this feature as float32[{dim}] or scale it"
        )
    raise ValueError(
        f"{_feature_name(c, f)}, row {row}: element {element} is {value!r}; int8 storage "
        f"holds finite values only (a null row is fine)"
    )


cdef void _quantize_half(const float* x, Py_ssize_t dim, uint8_t* dst) noexcept nogil:
    cdef Py_ssize_t j
    cdef uint16_t h
    for j in range(dim):
        h = float_to_half(x[j])
        memcpy(dst + 2 * j, &h, 2)


cdef double ROUND_MAGIC = 6755399441055744.0   # 1.5 * 2^52


cdef void _quantize_int8(const float* x, Py_ssize_t dim, uint8_t* dst) noexcept nogil:
    """Scale s = max|x| / 127 as f32 (rounded toward zero), then code
    q = round-half-even(x / s) per element, in double so that |x - q s| <= s / 2 holds
    for the stored s (docs/row-format.md)."""
    cdef Py_ssize_t j
    cdef float top = 0, a, scale
    cdef double q, ds
    cdef int8_t* codes = <int8_t*>(dst + 4)
    for j in range(dim):
        a = fabsf(x[j])
        if a > top:
            top = a
    scale = <float>(<double>top / 127.0)
    if <double>scale > <double>top / 127.0:
        # Rounded toward zero, so that 127 s <= max|x|: rounded up, the scale of a row
        # holding FLT_MAX would decode it as inf.
        scale = nextafterf(scale, 0)
    memcpy(dst, &scale, 4)
    if scale == 0:
        memset(codes, 0, dim)     # a zero vector (or one below the smallest scale)
        return
    ds = scale
    for j in range(dim):
        q = <double>x[j] / ds
        # Clipped, then rounded half to even by adding and taking away 1.5 * 2^52 (the
        # FPU rounds the sum): the same as rint() then clipping, without a libm call
        # per element (rint is a call unless the build targets SSE4.1).
        if q > 127:
            q = 127
        elif q < -127:
            q = -127
        codes[j] = <int8_t>((q + ROUND_MAGIC) - ROUND_MAGIC)


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
            raise ValueError(
                f"{name}: expected None or (values, valid), got {type(column).__name__}"
            )
        values, valid = column
        if not isinstance(values, np.ndarray):
            raise ValueError(f"{name}: values must be an ndarray, got {type(values).__name__}")
        dtype = _FIXED_DTYPES[kind]
        if values.dtype != dtype and not (kind == FEATURE_BOOL and values.dtype == _UINT8):
            raise ValueError(f"{name}: values has dtype {values.dtype}, expected {dtype}")
        if _is_vector(kind):
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
    if kind == FEATURE_FLOAT16_VECTOR or kind == FEATURE_INT8_VECTOR:
        _check_quantizable(c, f, col, n)
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
                       const uint8_t* nulls, const Py_ssize_t* visit, Py_ssize_t n_visit,
                       uint8_t* out) noexcept nogil:
    """``nulls``: the null bitmap of the absent features, copied into every row; with
    any absent fixed-width feature (a partial update), ``visit`` lists the features
    left (and every var one: its end is stored) and each row's fixed section is zeroed
    in one memset, so an absent feature costs nothing per row."""
    cdef Py_ssize_t i, k, f, width
    cdef int64_t length
    cdef uint32_t end
    cdef uint8_t* row
    cdef uint8_t* dst
    cdef const EncColumn* col
    cdef bint null
    cdef bint zeroed = n_visit < c.n_features
    for i in range(n):
        row = out + row_offsets[i]
        row[0] = ROW_FORMAT
        store_u32(row + 1, c.schema_id)
        store_i64(row + 5, event_times[i])
        memcpy(row + ROW_HEADER_SIZE, nulls, c.bitmap_size)
        if zeroed:
            memset(row + ROW_HEADER_SIZE + c.bitmap_size, 0, c.fixed_size)
        end = 0
        for k in range(n_visit):
            f = visit[k]
            col = &cols[f]
            null = _enc_null(col, i)
            if null:
                set_null(row, f)
            width = c.widths[f]
            if width:
                dst = row + c.offsets[f]
                if null:
                    if not zeroed:
                        zero_fixed(dst, width)
                elif c.kinds[f] == FEATURE_BOOL:
                    dst[0] = col.values[i] != 0
                elif c.kinds[f] == FEATURE_FLOAT16_VECTOR:
                    _quantize_half(<const float*>(col.values) + i * c.dims[f], c.dims[f], dst)
                elif c.kinds[f] == FEATURE_INT8_VECTOR:
                    _quantize_int8(<const float*>(col.values) + i * c.dims[f], c.dims[f], dst)
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
    valid None means every row is valid. Vector kinds take (n_rows, N) float32 values
    whatever their storage; float16 refuses finite values of magnitude >= 65520 and
    int8 refuses NaN and inf (ValueError naming the feature, row and element).
    event_times are µs since the epoch.
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
    cdef Py_ssize_t n_visit = 0
    cdef Py_ssize_t* visit
    cdef uint8_t* nulls
    cols = <EncColumn*>PyMem_Calloc(c.n_features + 1, sizeof(EncColumn))
    visit = <Py_ssize_t*>PyMem_Calloc(c.n_features + 1, sizeof(Py_ssize_t))
    nulls = <uint8_t*>PyMem_Calloc(c.bitmap_size + 1, 1)
    if cols == NULL or visit == NULL or nulls == NULL:
        PyMem_Free(cols)
        PyMem_Free(visit)
        PyMem_Free(nulls)
        raise MemoryError()
    try:
        for f in range(c.n_features):
            _bind_encode_column(c, f, columns[f], n_rows, &cols[f], keep)
            if cols[f].absent:
                nulls[f >> 3] |= <uint8_t>(1 << (f & 7))
            if not (cols[f].absent and c.widths[f]):
                visit[n_visit] = f
                n_visit += 1
        with nogil:
            bad = _encode_sizes(c, cols, n_rows, &offsets_view[0])
        if bad >= 0:
            raise ValueError(f"row {bad}: its var data exceeds {MAX_VAR_BYTES} bytes")
        block = PyBytes_FromStringAndSize(NULL, offsets_view[n_rows])
        out = <uint8_t*>PyBytes_AS_STRING(block)
        with nogil:
            _encode_fill(c, cols, n_rows, _int64_ptr(times), &offsets_view[0], nulls, visit,
                         n_visit, out)
    finally:
        PyMem_Free(cols)
        PyMem_Free(visit)
        PyMem_Free(nulls)
    return block, row_offsets


# The node's side of a write (kvstore/server/writes.py): a request's rows handed to
# delta_apply a step at a time, each step's rows gathered into one block, and the
# request's event times and repeated keys found, without a Python object per row.

import os as _os

# Seeded per process: keys chosen to collide cannot build long probe runs on purpose.
cdef uint64_t _repeat_seed = int.from_bytes(_os.urandom(8), "little")


def gather_rows(buf, offsets, positions):
    """The rows at ``positions`` of a block, back to back: (bytes, offsets).

    Row i of the block is ``buf[offsets[i] : offsets[i + 1]]`` (int64 offsets, n + 1
    entries); ``positions`` (an int32 or int64 ndarray) picks rows in any order. Returns
    the picked rows as one bytes object and their k + 1 int64 offsets. Raises
    ValueError for a position outside [0, n) or a row outside ``buf``.
    """
    cdef const uint8_t[::1] data = _byte_buffer(buf, "buf")
    offsets = _int64_array(offsets, -1, "offsets")
    cdef const int64_t* off = _int64_data(offsets)
    cdef Py_ssize_t n = cnp.PyArray_DIMS(<cnp.ndarray>offsets)[0] - 1
    if n < 0:
        raise ValueError("offsets is empty, expected n + 1 entries")
    cdef const int32_t[::1] pos32
    cdef const int64_t* pos64 = NULL
    cdef Py_ssize_t k
    if isinstance(positions, np.ndarray) and positions.dtype == _INT32:
        pos32 = np.ascontiguousarray(positions)
        k = pos32.shape[0]
    else:
        positions = _int64_array(positions, -1, "positions")
        pos64 = _int64_data(positions)
        k = cnp.PyArray_DIMS(<cnp.ndarray>positions)[0]
    cdef Py_ssize_t i, p
    cdef int64_t a, b, total = 0
    out_offsets = _empty(k + 1, cnp.NPY_INT64)
    cdef int64_t* out_off = _int64_data(out_offsets)
    out_off[0] = 0
    for i in range(k):
        p = pos64[i] if pos64 != NULL else pos32[i]
        if p < 0 or p >= n:
            raise ValueError(f"positions[{i}] is {p}, not in [0, {n})")
        a = off[p]
        b = off[p + 1]
        if a < 0 or b < a or b > data.shape[0]:
            raise ValueError(f"offsets: [{a}, {b}) of row {p} is not a range of the buffer")
        total += b - a
        out_off[i + 1] = total
    block = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t* out = <uint8_t*>PyBytes_AS_STRING(block)
    cdef const uint8_t* base = _bytes_ptr(data)
    for i in range(k):
        p = pos64[i] if pos64 != NULL else pos32[i]
        memcpy(out + out_off[i], base + off[p], <size_t>(out_off[i + 1] - out_off[i]))
    return block, out_offsets


def row_event_times(buf, offsets):
    """The header event time (µs) of each row of a block: an int64 array of n.

    Row i is ``buf[offsets[i] : offsets[i + 1]]`` (int64 offsets, n + 1 entries); its
    event time is the little-endian int64 at byte 5 (docs/row-format.md). Raises
    ValueError for a row outside ``buf`` or shorter than the header.
    """
    cdef const uint8_t[::1] data = _byte_buffer(buf, "buf")
    offsets = _int64_array(offsets, -1, "offsets")
    cdef const int64_t* off = _int64_data(offsets)
    cdef Py_ssize_t i, n = cnp.PyArray_DIMS(<cnp.ndarray>offsets)[0] - 1
    if n < 0:
        raise ValueError("offsets is empty, expected n + 1 entries")
    times = _empty(n, cnp.NPY_INT64)
    cdef int64_t* out = _int64_data(times)
    cdef const uint8_t* base = _bytes_ptr(data)
    cdef int64_t a, b
    for i in range(n):
        a = off[i]
        b = off[i + 1]
        if a < 0 or b > data.shape[0] or b - a < ROW_HEADER_SIZE:
            raise ValueError(f"row {i}: [{a}, {b}) is not a row of the buffer")
        out[i] = load_i64(base + a + 5)
    return times


def key_repeats(keys):
    """For int64 keys: None when no key repeats (the common case), else an int32 array
    saying, for each position, how many times its key came before it."""
    keys = _int64_array(keys, -1, "keys")
    cdef const int64_t* k = _int64_data(keys)
    cdef Py_ssize_t n = cnp.PyArray_DIMS(<cnp.ndarray>keys)[0]
    if n < 2:
        return None
    cdef Py_ssize_t size = 16, i, j
    while size < 2 * n:
        size *= 2
    cdef size_t mask = <size_t>(size - 1)
    # A slot: the key, and (its count so far) + 1; 0 = empty.
    cdef int64_t* slot_keys = <int64_t*>PyMem_Malloc(size * sizeof(int64_t))
    cdef int32_t* slot_counts = <int32_t*>PyMem_Calloc(size, sizeof(int32_t))
    cdef int32_t* before = <int32_t*>PyMem_Malloc(n * sizeof(int32_t))
    cdef bint repeated = False
    cdef int64_t key
    try:
        if slot_keys == NULL or slot_counts == NULL or before == NULL:
            raise MemoryError()
        with nogil:
            for i in range(n):
                key = k[i]
                j = <Py_ssize_t>(XXH3_64bits_withSeed(&key, 8, _repeat_seed) & mask)
                while slot_counts[j] and slot_keys[j] != key:
                    j = <Py_ssize_t>((j + 1) & mask)
                if slot_counts[j]:
                    repeated = True
                else:
                    slot_keys[j] = key
                before[i] = slot_counts[j]
                slot_counts[j] += 1
        if not repeated:
            return None
        out = _empty(n, cnp.NPY_INT32)
        memcpy(cnp.PyArray_DATA(<cnp.ndarray>out), before, n * sizeof(int32_t))
        return out
    finally:
        PyMem_Free(slot_keys)
        PyMem_Free(slot_counts)
        PyMem_Free(before)
