# Delta rows (format 2): applying updates and deletes, compaction, merging copies
# (docs/row-format.md, "Delta rows"); included by codec.pyx. The read-time overlay of
# delta over base is overlay.pxi.
#
# A delta row (format 3) holds only the features it has: deleted_at, a null and a
# present bitmap, then the event time and the value of each present feature, packed in
# feature order. Format 2, written before it, held every feature's slot (a format-1
# body behind a longer header); it is still read everywhere. The operations here read
# a format-3 row through its format-2 expansion (``_view_delta_dense``), decide per
# feature a source row (or none = absent), and ``_assemble_delta`` writes the new row
# in format 3. Reads (overlay.pxi) take either format as it is stored.

cdef extern from *:
    int __builtin_ctz(unsigned int x) nogil


cdef enum:
    DELTA_FORMAT = 3            # written
    DELTA_DENSE_FORMAT = 2      # read only: rows written before format 3
    DELTA_FIXED_HEADER = 21     # format u8, schema id u32, event time i64, deleted_at i64

DELTA_FORMAT_VERSION = DELTA_FORMAT
NO_DELETE = INT64_MIN

# Where a feature of an output row comes from.
cdef enum:
    FROM_NONE = 0   # null (format 1) / absent (delta)
    FROM_A = 1
    FROM_B = 2


cdef struct RowView:
    const uint8_t* row
    Py_ssize_t length
    Py_ssize_t bitmap_at     # offset of the null bitmap
    Py_ssize_t shift         # body offset minus format 1's (0 for a format-1 row)
    int64_t event_time
    int64_t deleted_at       # delta rows only
    const uint8_t* present   # delta rows only: the present bitmap
    const uint8_t* times     # delta rows only: F i64 feature times (sparse: P, in order)
    bint sparse              # a format-3 delta row: only present features are stored
    bint whole               # sparse, every feature present: the rest is a format-1 body
    const uint8_t* fixed     # sparse: the present fixed-width values, in feature order
    const uint8_t* ends      # the u32 var ends (sparse: of the present var features)
    const uint8_t* var_data  # where the var data starts


cdef inline Py_ssize_t _delta_header(const RowLayout* c) noexcept nogil:
    return DELTA_FIXED_HEADER + 2 * c.bitmap_size + 8 * c.n_features


cdef inline Py_ssize_t _delta_shift(const RowLayout* c) noexcept nogil:
    return _delta_header(c) - ROW_HEADER_SIZE - c.bitmap_size


cdef inline bint _bit(const uint8_t* bitmap, Py_ssize_t f) noexcept nogil:
    return (bitmap[f >> 3] >> (f & 7)) & 1


cdef inline void _set_bit(uint8_t* bitmap, Py_ssize_t f) noexcept nogil:
    bitmap[f >> 3] |= <uint8_t>(1 << (f & 7))


cdef inline int64_t _feature_time(const RowView* v, Py_ssize_t f) noexcept nogil:
    return load_i64(v.times + 8 * f)


cdef RowFault _check_dense_delta_row(const RowLayout* c, const uint8_t* row,
                                     Py_ssize_t length, RowCheck* check) noexcept nogil:
    cdef Py_ssize_t j, shift = _delta_shift(c)
    cdef Py_ssize_t min_size = c.min_row_size + shift
    cdef uint32_t end, previous = 0
    if length < min_size:
        check.fault = ROW_TOO_SHORT
        check.a = length
        check.b = min_size
        return ROW_TOO_SHORT
    for j in range(c.n_var):
        end = load_u32(row + c.ends_start + shift + 4 * j)
        if end < previous:
            check.fault = ROW_ENDS_DECREASE
            check.a = j
            check.b = end
            check.c = previous
            return ROW_ENDS_DECREASE
        previous = end
    if previous != <uint64_t>(length - min_size):
        check.fault = ROW_VAR_LENGTH
        check.a = previous
        check.b = length - min_size
        return ROW_VAR_LENGTH
    return ROW_OK


cdef inline uint8_t _last_byte_mask(const RowLayout* c) noexcept nogil:
    """The bits of a bitmap's last byte that name features (the others are padding)."""
    return <uint8_t>((1 << (c.n_features & 7)) - 1) if c.n_features & 7 else 0xFF


cdef inline uint32_t _bits_at(const RowLayout* c, const uint8_t* bitmap,
                              Py_ssize_t i) noexcept nogil:
    """Byte i of a bitmap, its padding bits cleared."""
    if i == c.bitmap_size - 1:
        return bitmap[i] & _last_byte_mask(c)
    return bitmap[i]


cdef inline void _sparse_sizes(const RowLayout* c, const uint8_t* present, Py_ssize_t* n_present,
                               Py_ssize_t* fixed_bytes, Py_ssize_t* n_var) noexcept nogil:
    """P, the bytes of the present fixed values and the present var features' count."""
    cdef Py_ssize_t i, f, p = 0, w = 0, v = 0
    cdef uint32_t bits
    for i in range(c.bitmap_size):
        if _bits_at(c, present, i) != (_last_byte_mask(c) if i == c.bitmap_size - 1 else 0xFF):
            break
    else:  # every feature present (a row written whole): the schema's own sizes
        n_present[0] = c.n_features
        fixed_bytes[0] = c.fixed_size
        n_var[0] = c.n_var
        return
    for i in range(c.bitmap_size):
        bits = _bits_at(c, present, i)
        while bits:
            f = 8 * i + __builtin_ctz(bits)
            bits &= bits - 1
            p += 1
            if c.widths[f]:
                w += c.widths[f]
            else:
                v += 1
    n_present[0] = p
    fixed_bytes[0] = w
    n_var[0] = v


cdef RowFault _check_sparse_delta_row(const RowLayout* c, const uint8_t* row, Py_ssize_t length,
                                      RowCheck* check) noexcept nogil:
    cdef Py_ssize_t j, k, p, w, v, min_size = DELTA_FIXED_HEADER + 2 * c.bitmap_size
    cdef const uint8_t* present = row + DELTA_FIXED_HEADER + c.bitmap_size
    cdef uint32_t end, previous = 0
    if length < min_size:
        check.fault = ROW_TOO_SHORT
        check.a = length
        check.b = min_size
        return ROW_TOO_SHORT
    _sparse_sizes(c, present, &p, &w, &v)
    min_size += 8 * p + w + 4 * v
    if length < min_size:
        check.fault = ROW_TOO_SHORT
        check.a = length
        check.b = min_size
        return ROW_TOO_SHORT
    k = 0
    for j in range(c.n_var if v else 0):
        if not _bit(present, c.var_features[j]):
            continue
        end = load_u32(row + min_size - 4 * v + 4 * k)
        k += 1
        if end < previous:
            check.fault = ROW_ENDS_DECREASE
            check.a = j
            check.b = end
            check.c = previous
            return ROW_ENDS_DECREASE
        previous = end
    if previous != <uint64_t>(length - min_size):
        check.fault = ROW_VAR_LENGTH
        check.a = previous
        check.b = length - min_size
        return ROW_VAR_LENGTH
    check.a = p  # for _view_delta
    check.b = w
    check.c = v
    return ROW_OK


cdef RowFault _check_delta_row(const RowLayout* c, const uint8_t* row, Py_ssize_t length,
                               RowCheck* check) noexcept nogil:
    """Whether a stored delta row (format 3, or 2 as written before) is valid; on a fault,
    fills check (a too-short row's minimum in check.b). A valid format-3 row leaves its
    P, bytes of present fixed values and present var features in check.a, .b and .c."""
    cdef uint32_t schema_id
    if length < DELTA_FIXED_HEADER:
        check.fault = ROW_TOO_SHORT
        check.a = length
        check.b = DELTA_FIXED_HEADER + 2 * c.bitmap_size
        return ROW_TOO_SHORT
    if row[0] != DELTA_FORMAT and row[0] != DELTA_DENSE_FORMAT:
        check.fault = ROW_BAD_FORMAT
        check.a = row[0]
        return ROW_BAD_FORMAT
    schema_id = load_u32(row + 1)
    if schema_id != c.schema_id:
        check.fault = ROW_OTHER_SCHEMA
        check.a = schema_id
        return ROW_OTHER_SCHEMA
    if row[0] == DELTA_FORMAT:
        return _check_sparse_delta_row(c, row, length, check)
    return _check_dense_delta_row(c, row, length, check)


cdef str _delta_reason(const RowLayout* c, const RowCheck* check):
    if check.fault == ROW_TOO_SHORT:
        return f"delta row: length {check.a} is shorter than the {check.b}-byte minimum"
    if check.fault == ROW_BAD_FORMAT:
        return (f"delta row: format byte 0x{check.a:02x}, expected 0x{DELTA_FORMAT:02x} "
                f"(or 0x{DELTA_DENSE_FORMAT:02x})")
    return "delta row: " + _fault_reason(c, check)


cdef int _view_base(const RowLayout* c, object value, Py_ssize_t index, RowView* v) except -1:
    """Points v at a stored format-1 row; CorruptRow/SchemaMismatch names ``index``."""
    cdef RowCheck check
    if type(value) is not bytes:
        raise TypeError(f"row {index} must be bytes or None, got {type(value).__name__}")
    v.row = <const uint8_t*>PyBytes_AS_STRING(value)
    v.length = PyBytes_GET_SIZE(value)
    if check_row(c, v.row, v.length, &check) != ROW_OK:
        check.index = index
        if check.fault == ROW_OTHER_SCHEMA:
            raise SchemaMismatch(index, check.a, c.schema_id)
        raise CorruptRow(index, "base row: " + _fault_reason(c, &check))
    v.bitmap_at = ROW_HEADER_SIZE
    v.shift = 0
    v.event_time = load_i64(v.row + 5)
    v.deleted_at = INT64_MIN
    v.present = NULL
    v.times = NULL
    v.sparse = False
    v.whole = False
    v.fixed = NULL
    v.ends = v.row + c.ends_start
    v.var_data = v.row + c.min_row_size
    return 0


cdef inline bint _a_var_is_null(const RowLayout* c, const uint8_t* bitmap) noexcept nogil:
    """Whether a variable-width feature is null in ``bitmap``: a null one may still hold
    bytes in a stored row (valid, if not what the writers write), so such a row cannot be
    copied whole into an answer sized for its non-null values."""
    cdef Py_ssize_t j
    for j in range(c.n_var):
        if _bit(bitmap, c.var_features[j]):
            return True
    return False


cdef int _view_delta(const RowLayout* c, object value, Py_ssize_t index, RowView* v) except -1:
    """Points v at a stored delta row; CorruptRow/SchemaMismatch names ``index``."""
    cdef RowCheck check
    cdef Py_ssize_t p, w, n_var
    if type(value) is not bytes:
        raise TypeError(f"delta row {index} must be bytes or None, got {type(value).__name__}")
    v.row = <const uint8_t*>PyBytes_AS_STRING(value)
    v.length = PyBytes_GET_SIZE(value)
    if _check_delta_row(c, v.row, v.length, &check) != ROW_OK:
        if check.fault == ROW_OTHER_SCHEMA:
            raise SchemaMismatch(index, check.a, c.schema_id)
        raise CorruptRow(index, _delta_reason(c, &check))
    v.bitmap_at = DELTA_FIXED_HEADER
    v.event_time = load_i64(v.row + 5)
    v.deleted_at = load_i64(v.row + 13)
    v.present = v.row + DELTA_FIXED_HEADER + c.bitmap_size
    v.times = v.row + DELTA_FIXED_HEADER + 2 * c.bitmap_size
    v.sparse = v.row[0] == DELTA_FORMAT
    if v.sparse:
        p, w, n_var = check.a, check.b, check.c  # _check_sparse_delta_row's sizes
        v.whole = p == c.n_features and not _a_var_is_null(c, v.row + DELTA_FIXED_HEADER)
        v.shift = 0  # no fixed offsets: values are found by walking the present features
        v.fixed = v.times + 8 * p
        v.ends = v.fixed + w
        v.var_data = v.ends + 4 * n_var
    else:
        v.whole = False
        v.shift = _delta_shift(c)
        v.fixed = NULL
        v.ends = v.row + c.ends_start + v.shift
        v.var_data = v.row + c.min_row_size + v.shift
    return 0


cdef object _densify(const RowLayout* c, const RowView* v):
    """The format-2 row of the same content as the sparse delta row ``v``."""
    cdef Py_ssize_t f, j, k = 0, at = 0, slot = 0, shift = _delta_shift(c)
    cdef uint64_t var_bytes = 0
    cdef uint32_t start, end = 0, length
    var_bytes = <uint64_t>(v.row + v.length - v.var_data)
    out = PyBytes_FromStringAndSize(NULL, c.min_row_size + shift + <Py_ssize_t>var_bytes)
    cdef uint8_t* row = <uint8_t*>PyBytes_AS_STRING(out)
    memset(row, 0, c.min_row_size + shift)
    memcpy(row, v.row, DELTA_FIXED_HEADER + 2 * c.bitmap_size)
    row[0] = DELTA_DENSE_FORMAT
    for f in range(c.n_features):
        if not _bit(v.present, f):
            continue
        memcpy(row + DELTA_FIXED_HEADER + 2 * c.bitmap_size + 8 * f, v.times + 8 * k, 8)
        k += 1
        if c.widths[f]:
            memcpy(row + c.offsets[f] + shift, v.fixed + at, c.widths[f])
            at += c.widths[f]
    for j in range(c.n_var):
        if _bit(v.present, c.var_features[j]):
            start = 0 if slot == 0 else load_u32(v.ends + 4 * (slot - 1))
            length = load_u32(v.ends + 4 * slot) - start
            slot += 1
            if length:
                memcpy(row + c.min_row_size + shift + end, v.var_data + start, length)
            end += length
        store_u32(row + c.ends_start + shift + 4 * j, end)
    return out


cdef object _view_delta_dense(const RowLayout* c, object value, Py_ssize_t index, RowView* v):
    """_view_delta through a format-2 row: the stored one, or the expansion of a format-3
    one, which the caller keeps (the returned object) while it reads ``v``."""
    _view_delta(c, value, index, v)
    if not v.sparse:
        return value
    dense = _densify(c, v)
    _view_delta(c, dense, index, v)
    return dense


cdef inline bint _src_null(const RowView* v, Py_ssize_t f) noexcept nogil:
    return _bit(v.row + v.bitmap_at, f)


cdef inline uint32_t _slot_start(const RowView* v, Py_ssize_t slot) noexcept nogil:
    return 0 if slot == 0 else load_u32(v.ends + 4 * (slot - 1))


cdef inline Py_ssize_t _var_slot(const RowLayout* c, const RowView* v, Py_ssize_t j,
                                 Py_ssize_t* taken) noexcept nogil:
    """The slot of var feature j among v's var ends: j, or in a sparse row the number of
    its present var features before j (``taken``: those seen so far, so call it for
    every j in order); -1 where v has no row or a sparse row lacks the feature."""
    if v.row == NULL:
        return -1
    if not v.sparse:
        return j
    if not _bit(v.present, c.var_features[j]):
        return -1
    taken[0] += 1
    return taken[0] - 1


cdef inline const uint8_t* _fixed_at(const RowLayout* c, const RowView* v, Py_ssize_t f,
                                     Py_ssize_t* taken) noexcept nogil:
    """Where fixed-width feature f's value is in v (``taken``: the bytes of a sparse row's
    values passed so far, so call it for every fixed f in order); NULL where v has no
    row or a sparse row lacks the feature."""
    cdef const uint8_t* p
    if v.row == NULL:
        return NULL
    if not v.sparse:
        return v.row + c.offsets[f] + v.shift
    if not _bit(v.present, f):
        return NULL
    p = v.fixed + taken[0]
    taken[0] += c.widths[f]
    return p


cdef Py_ssize_t _assembled_size(const RowLayout* c, const RowView* a, const RowView* b,
                                const uint8_t* choice, bint delta) except -1:
    """Bytes of the row _assemble writes for these choices (a format-1 row, or a format-3
    delta row when ``delta``); ValueError past the var section's limit."""
    cdef Py_ssize_t f, j, slot, sa, sb, taken_a = 0, taken_b = 0
    cdef Py_ssize_t n_present = 0, fixed_bytes = 0, n_var = 0
    cdef uint64_t var_bytes = 0
    cdef const RowView* src
    for j in range(c.n_var):
        f = c.var_features[j]
        sa = _var_slot(c, a, j, &taken_a)
        sb = _var_slot(c, b, j, &taken_b)
        if choice[f] != FROM_NONE:
            src, slot = (a, sa) if choice[f] == FROM_A else (b, sb)
            if not _src_null(src, f):
                var_bytes += load_u32(src.ends + 4 * slot) - _slot_start(src, slot)
    if var_bytes > MAX_VAR_BYTES:
        raise ValueError(f"the combined row's var data exceeds {MAX_VAR_BYTES} bytes")
    if not delta:
        return c.min_row_size + <Py_ssize_t>var_bytes
    for f in range(c.n_features):
        if choice[f] != FROM_NONE:
            n_present += 1
            if c.widths[f]:
                fixed_bytes += c.widths[f]
            else:
                n_var += 1
    return (DELTA_FIXED_HEADER + 2 * c.bitmap_size + 8 * n_present + fixed_bytes + 4 * n_var
            + <Py_ssize_t>var_bytes)


cdef inline void _assemble_var(const RowLayout* c, const RowView* a, const RowView* b,
                               const uint8_t* choice, uint8_t* ends, uint8_t* data,
                               bint every) noexcept nogil:
    """The var ends (at ``ends``) and data (at ``data``) of an assembled row: an end per
    var feature (``every``, format 1) or per chosen one (a format-3 delta row)."""
    cdef Py_ssize_t f, j, k = 0, slot, sa, sb, taken_a = 0, taken_b = 0
    cdef const RowView* src
    cdef uint32_t length, end = 0, start
    for j in range(c.n_var):
        f = c.var_features[j]
        sa = _var_slot(c, a, j, &taken_a)
        sb = _var_slot(c, b, j, &taken_b)
        if choice[f] != FROM_NONE:
            src, slot = (a, sa) if choice[f] == FROM_A else (b, sb)
            if not _src_null(src, f):
                start = _slot_start(src, slot)
                length = load_u32(src.ends + 4 * slot) - start
                if length:
                    memcpy(data + end, src.var_data + start, length)
                end += length
        elif not every:
            continue
        store_u32(ends + 4 * k, end)
        k += 1


cdef inline bint _all_from(const uint8_t* choice, Py_ssize_t n, uint8_t source) noexcept nogil:
    cdef Py_ssize_t f
    for f in range(n):
        if choice[f] != source:
            return False
    return True


cdef void _assemble_row_into(const RowLayout* c, const RowView* a, const RowView* b,
                             const uint8_t* choice, int64_t event_time,
                             uint8_t* row) noexcept nogil:
    """Writes at ``row`` (_assembled_size bytes) the format-1 row taking feature f from a
    (choice FROM_A; a format-1 row), b (FROM_B; a delta row of either format, or a
    format-1 row) or nowhere (FROM_NONE: null). A delta row's features are walked by
    its present bitmap, as a sparse row stores them."""
    cdef Py_ssize_t i, f, width, taken = 0
    cdef uint32_t bits
    cdef const uint8_t* p
    cdef const RowView* src
    cdef uint8_t* bitmap = row + ROW_HEADER_SIZE
    if b.row != NULL and b.whole and _all_from(choice, c.n_features, FROM_B):
        # A row written whole, read whole (an online-written key): its values, var ends
        # and var data are the answer's body as they are stored.
        row[0] = ROW_FORMAT
        store_u32(row + 1, c.schema_id)
        store_i64(row + 5, event_time)
        memcpy(bitmap, b.row + b.bitmap_at, c.bitmap_size)
        if c.n_features & 7:  # padding bits: 0, as assembled
            bitmap[c.bitmap_size - 1] &= _last_byte_mask(c)
        memcpy(row + ROW_HEADER_SIZE + c.bitmap_size, b.fixed, b.row + b.length - b.fixed)
        for i in range(c.bitmap_size):  # a null's bytes: 0, as assembled
            bits = bitmap[i]
            while bits:
                f = 8 * i + __builtin_ctz(bits)
                bits &= bits - 1
                if c.widths[f]:
                    zero_fixed(row + c.offsets[f], c.widths[f])
        return
    memset(row, 0, c.min_row_size)
    row[0] = ROW_FORMAT
    store_u32(row + 1, c.schema_id)
    store_i64(row + 5, event_time)
    for f in range(c.n_features):
        if choice[f] == FROM_NONE:
            _set_bit(bitmap, f)
        elif choice[f] == FROM_A or (choice[f] == FROM_B and b.present == NULL):
            src = a if choice[f] == FROM_A else b
            if _src_null(src, f):
                _set_bit(bitmap, f)
            elif c.widths[f]:
                copy_fixed(row + c.offsets[f], src.row + c.offsets[f] + src.shift, c.widths[f])
    for i in range(c.bitmap_size if b.row != NULL and b.present != NULL else 0):
        bits = _bits_at(c, b.present, i)
        while bits:
            f = 8 * i + __builtin_ctz(bits)
            bits &= bits - 1
            width = c.widths[f]
            p = NULL
            if width:
                p = _fixed_at(c, b, f, &taken)
            if choice[f] != FROM_B:
                continue
            if _src_null(b, f):
                _set_bit(bitmap, f)
            elif width:
                copy_fixed(row + c.offsets[f], p, width)
    _assemble_var(c, a, b, choice, row + c.ends_start, row + c.min_row_size, True)


cdef void _assemble_delta_into(const RowLayout* c, const RowView* a, const RowView* b,
                               const uint8_t* choice, int64_t event_time, int64_t deleted_at,
                               const int64_t* times, uint8_t* row) noexcept nogil:
    """Writes at ``row`` (_assembled_size bytes) the format-3 delta row holding feature f
    from a (choice FROM_A) or b (FROM_B) at time times[f], absent where FROM_NONE."""
    cdef Py_ssize_t f, width, k = 0, at = 0, n_present = 0, fixed_bytes = 0, n_var = 0
    cdef Py_ssize_t taken_a = 0, taken_b = 0
    cdef const uint8_t* pa
    cdef const uint8_t* pb
    cdef uint8_t* nulls = row + DELTA_FIXED_HEADER
    cdef uint8_t* present = nulls + c.bitmap_size
    cdef uint8_t* times_out = present + c.bitmap_size
    for f in range(c.n_features):
        if choice[f] != FROM_NONE:
            n_present += 1
            if c.widths[f]:
                fixed_bytes += c.widths[f]
            else:
                n_var += 1
    cdef uint8_t* fixed = times_out + 8 * n_present
    memset(row, 0, DELTA_FIXED_HEADER + 2 * c.bitmap_size)
    row[0] = DELTA_FORMAT
    store_u32(row + 1, c.schema_id)
    store_i64(row + 5, event_time)
    store_i64(row + 13, deleted_at)
    for f in range(c.n_features):
        width = c.widths[f]
        pa = pb = NULL
        if width:
            pa = _fixed_at(c, a, f, &taken_a)
            pb = _fixed_at(c, b, f, &taken_b)
        if choice[f] == FROM_NONE:
            continue
        _set_bit(present, f)
        store_i64(times_out + 8 * k, times[f])
        k += 1
        if _src_null(a if choice[f] == FROM_A else b, f):
            _set_bit(nulls, f)
            if width:
                zero_fixed(fixed + at, width)
        elif width:
            copy_fixed(fixed + at, pa if choice[f] == FROM_A else pb, width)
        at += width
    _assemble_var(c, a, b, choice, fixed + fixed_bytes, fixed + fixed_bytes + 4 * n_var, False)


cdef void _combine_into(const RowLayout* c, const RowView* base, const RowView* b,
                        const uint8_t* choice, int64_t event_time, uint8_t* row) noexcept nogil:
    """What _assemble_row_into(c, base, b, choice, event_time, row) writes, for ``base``
    a checked format-1 row and ``b`` a delta row: the base's header, bitmap and fixed
    section copied whole, then only the features not taken from it rewritten: its nulls'
    bytes zeroed, the absent ones (a TTL, a delete) nulled, and the delta's walked by
    its present bitmap (most of a row read with a partial update comes from its base)."""
    cdef Py_ssize_t i, f, width, taken = 0
    cdef uint32_t bits
    cdef const uint8_t* p
    cdef uint8_t* bitmap = row + ROW_HEADER_SIZE
    memcpy(row, base.row, c.ends_start)
    store_i64(row + 5, event_time)
    if c.n_features & 7:  # padding bits of the bitmap's last byte: 0, as assembled
        bitmap[c.bitmap_size - 1] &= _last_byte_mask(c)
    for i in range(c.bitmap_size):  # a null's bytes: 0, as assembled
        bits = bitmap[i]
        while bits:
            f = 8 * i + __builtin_ctz(bits)
            bits &= bits - 1
            if c.widths[f]:
                zero_fixed(row + c.offsets[f], c.widths[f])
    if memchr(choice, FROM_NONE, c.n_features) != NULL:
        for f in range(c.n_features):
            if choice[f] == FROM_NONE:
                _set_bit(bitmap, f)
                if c.widths[f]:
                    zero_fixed(row + c.offsets[f], c.widths[f])
    for i in range(c.bitmap_size if b.present != NULL else 0):  # NULL: no delta row
        bits = _bits_at(c, b.present, i)
        while bits:
            f = 8 * i + __builtin_ctz(bits)
            bits &= bits - 1
            width = c.widths[f]
            p = NULL
            if width:
                p = _fixed_at(c, b, f, &taken)
            if choice[f] != FROM_B:
                continue
            if _src_null(b, f):
                _set_bit(bitmap, f)
                if width:
                    zero_fixed(row + c.offsets[f], width)
                continue
            bitmap[f >> 3] &= <uint8_t>~(1 << (f & 7))
            if width:
                copy_fixed(row + c.offsets[f], p, width)
    if c.n_var:
        _assemble_var(c, base, b, choice, row + c.ends_start, row + c.min_row_size, True)


cdef object _assemble(const RowLayout* c, const RowView* a, const RowView* b,
                      const uint8_t* choice, bint delta, int64_t event_time,
                      int64_t deleted_at, const int64_t* times):
    """A new bytes object: _assemble_row_into, or _assemble_delta_into when ``delta``."""
    out = PyBytes_FromStringAndSize(NULL, _assembled_size(c, a, b, choice, delta))
    if delta:
        _assemble_delta_into(c, a, b, choice, event_time, deleted_at, times,
                             <uint8_t*>PyBytes_AS_STRING(out))
    else:
        _assemble_row_into(c, a, b, choice, event_time, <uint8_t*>PyBytes_AS_STRING(out))
    return out


cdef class _Scratch:
    """Per-call buffers of F choices (and the choices before TTL) and F times."""
    cdef uint8_t* choice
    cdef uint8_t* chosen
    cdef int64_t* times

    def __cinit__(self, Py_ssize_t n_features):
        self.choice = <uint8_t*>PyMem_Calloc(n_features + 1, 1)
        self.chosen = <uint8_t*>PyMem_Calloc(n_features + 1, 1)
        self.times = <int64_t*>PyMem_Calloc(n_features + 1, sizeof(int64_t))
        if self.choice == NULL or self.chosen == NULL or self.times == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.choice)
        PyMem_Free(self.chosen)
        PyMem_Free(self.times)


def delta_apply(Layout layout not None, list old_rows, new_buf, new_offsets, present):
    """Applies updates to delta rows, newest event time wins per feature.

    Update i is the format-1 row ``new_buf[new_offsets[i] : new_offsets[i + 1]]``; its
    header event time is the update's time. ``present[f]`` = 1 when the updates set
    feature f. ``old_rows[i]`` is the stored delta row of the key, or None. Returns
    the new delta rows. Keys must be distinct within one call (apply repeats in a
    later call). A key without a delta row is one with no feature and no delete, so an
    update at INT64_MIN, which is never newer than deleted_at, changes nothing. The row's
    event time moves to the update's only when the update sets a feature. A bad stored
    row raises CorruptRow/SchemaMismatch naming its index, a bad update ValueError.
    """
    cdef const RowLayout* c = &layout.c
    cdef Py_ssize_t n = len(old_rows)
    cdef const uint8_t[::1] data = _byte_buffer(new_buf, "new_buf")
    cdef const int64_t[::1] offsets = _int64_array(new_offsets, n + 1, "new_offsets")
    present = _mask_array(present, c.n_features, "present")
    cdef const uint8_t[::1] present_view = present
    cdef const uint8_t* sets = _bytes_ptr(present_view)
    cdef _Scratch scratch = _Scratch(c.n_features)
    cdef RowView upd, old
    cdef RowCheck check
    cdef Py_ssize_t i, f
    cdef int64_t a, b, t, t_old, deleted_at, event_time
    cdef bint has_old, newer, took
    cdef list out = [None] * n
    for i in range(n):
        a = offsets[i]
        b = offsets[i + 1]
        if a < 0 or b < a or b > data.shape[0]:
            raise ValueError(f"update {i}: bytes [{a}, {b}) are not a range of new_buf")
        upd.row = _bytes_ptr(data) + a
        upd.length = b - a
        if check_row(c, upd.row, upd.length, &check) != ROW_OK:
            raise ValueError(f"update {i}: {_fault_reason(c, &check)}")
        upd.bitmap_at = ROW_HEADER_SIZE
        upd.shift = 0
        upd.sparse = False
        upd.ends = upd.row + c.ends_start
        upd.var_data = upd.row + c.min_row_size
        t = load_i64(upd.row + 5)
        value = old_rows[i]
        has_old = value is not None
        if has_old:
            held = _view_delta_dense(c, value, i, &old)
            deleted_at = old.deleted_at
            event_time = old.event_time
        else:
            old.row = NULL
            # The same rules as for a stored row with nothing in it, so that the order
            # in which a key's first updates arrive cannot matter, even at INT64_MIN.
            deleted_at = INT64_MIN
            event_time = INT64_MIN
        newer = t > deleted_at
        took = False
        for f in range(c.n_features):
            if has_old and _bit(old.present, f):
                t_old = _feature_time(&old, f)
                # Equal times: the later-applied update wins, so a redelivery is a no-op.
                if newer and sets[f] and t >= t_old:
                    scratch.choice[f] = FROM_B
                    scratch.times[f] = t
                    took = True
                else:
                    scratch.choice[f] = FROM_A
                    scratch.times[f] = t_old
            elif newer and sets[f]:
                scratch.choice[f] = FROM_B
                scratch.times[f] = t
                took = True
            else:
                scratch.choice[f] = FROM_NONE
        if took and t > event_time:
            event_time = t
        out[i] = _assemble(c, &old, &upd, scratch.choice, True, event_time, deleted_at,
                           scratch.times)
    return out


def delta_delete(Layout layout not None, list old_rows, times):
    """Tombstones: key i deleted at ``times[i]`` (µs). Returns the new delta rows."""
    cdef const RowLayout* c = &layout.c
    cdef Py_ssize_t n = len(old_rows)
    cdef const int64_t[::1] when = _int64_array(times, n, "times")
    cdef _Scratch scratch = _Scratch(c.n_features)
    cdef RowView old
    cdef Py_ssize_t i, f
    cdef int64_t t, deleted_at, event_time
    cdef list out = [None] * n
    for i in range(n):
        t = when[i]
        value = old_rows[i]
        if value is None:
            memset(scratch.choice, FROM_NONE, c.n_features)
            old.row = NULL
            out[i] = _assemble(c, &old, &old, scratch.choice, True, t, t, scratch.times)
            continue
        held = _view_delta_dense(c, value, i, &old)
        deleted_at = old.deleted_at if old.deleted_at > t else t
        event_time = old.event_time if old.event_time > t else t
        for f in range(c.n_features):
            if _bit(old.present, f) and _feature_time(&old, f) > deleted_at:
                scratch.choice[f] = FROM_A
                scratch.times[f] = _feature_time(&old, f)
            else:
                scratch.choice[f] = FROM_NONE
        out[i] = _assemble(c, &old, &old, scratch.choice, True, event_time, deleted_at,
                           scratch.times)
    return out


def delta_compact(Layout layout not None, list rows, int64_t snapshot_time):
    """Drops what a version with ``snapshot_time`` (µs) makes obsolete from delta rows.

    Returns, per row: the same object when nothing changes, a smaller delta row, or
    None when nothing is left (the key's delta entry can be deleted).
    """
    cdef const RowLayout* c = &layout.c
    cdef Py_ssize_t n = len(rows)
    cdef _Scratch scratch = _Scratch(c.n_features)
    cdef RowView row
    cdef Py_ssize_t i, f
    cdef bint changed, kept
    cdef int64_t t, event_time
    cdef list out = [None] * n
    for i in range(n):
        value = rows[i]
        if value is None:
            continue
        held = _view_delta_dense(c, value, i, &row)
        changed = False
        kept = False
        event_time = row.deleted_at
        for f in range(c.n_features):
            scratch.choice[f] = FROM_NONE
            if _bit(row.present, f):
                t = _feature_time(&row, f)
                if t > snapshot_time:
                    scratch.choice[f] = FROM_A
                    scratch.times[f] = t
                    kept = True
                    if t > event_time:
                        event_time = t
                else:
                    changed = True
        if not kept and row.deleted_at <= snapshot_time:
            continue
        if not changed:
            out[i] = value
            continue
        out[i] = _assemble(c, &row, &row, scratch.choice, True, event_time, row.deleted_at,
                           scratch.times)
    return out


def delta_info(Layout layout not None, bytes row):
    """(event_time, deleted_at, {feature index: time}) of a delta row, for tests and tools."""
    cdef const RowLayout* c = &layout.c
    cdef RowView v
    held = _view_delta_dense(c, row, 0, &v)
    times = {f: _feature_time(&v, f) for f in range(c.n_features) if _bit(v.present, f)}
    return v.event_time, v.deleted_at, times


def delta_merge_rows(Layout layout not None, list stored_rows, list incoming_rows):
    """Merges delta rows of the same keys from another copy: per feature the newest
    event time wins (equal times: the incoming row), deletes as the newer of the two.

    ``stored_rows[i]`` is this copy's delta row of key i or None; ``incoming_rows[i]``
    the other copy's (a replica's or a move source's change). The result is the row
    both copies would hold had each applied every write and delete of the other, so
    merging converges whatever the order and however often a row is merged again.
    A bad row raises CorruptRow/SchemaMismatch naming its index.
    """
    cdef const RowLayout* c = &layout.c
    cdef Py_ssize_t n = len(stored_rows)
    if len(incoming_rows) != n:
        raise ValueError(f"{n} stored rows but {len(incoming_rows)} incoming ones")
    cdef _Scratch scratch = _Scratch(c.n_features)
    cdef RowView old, new
    cdef Py_ssize_t i, f
    cdef int64_t t_old, t_new, deleted_at, event_time
    cdef bint in_old, in_new
    cdef list out = [None] * n
    for i in range(n):
        held_new = _view_delta_dense(c, incoming_rows[i], i, &new)
        value = stored_rows[i]
        if value is None:
            old = new
            old.deleted_at = INT64_MIN
            old.event_time = INT64_MIN
            old.present = NULL
        else:
            held = _view_delta_dense(c, value, i, &old)
        deleted_at = old.deleted_at if old.deleted_at > new.deleted_at else new.deleted_at
        event_time = old.event_time if old.event_time > new.event_time else new.event_time
        for f in range(c.n_features):
            t_old = _feature_time(&old, f) if old.present != NULL and _bit(old.present, f) else 0
            t_new = _feature_time(&new, f) if _bit(new.present, f) else 0
            in_old = old.present != NULL and _bit(old.present, f) and t_old > deleted_at
            in_new = _bit(new.present, f) and t_new > deleted_at
            if in_new and (not in_old or t_new >= t_old):
                scratch.choice[f] = FROM_B
                scratch.times[f] = t_new
            elif in_old:
                scratch.choice[f] = FROM_A
                scratch.times[f] = t_old
            else:
                scratch.choice[f] = FROM_NONE
        out[i] = _assemble(c, &old, &new, scratch.choice, True, event_time, deleted_at,
                           scratch.times)
    return out
