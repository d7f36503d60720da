# Delta rows (format 2): applying updates and deletes, compaction, merging copies
# (docs/row-format.md, "Delta rows"); included by codec.pyx. The read-time overlay of
# delta over base is overlay.pxi.
#
# A delta row is a format-1 body behind a longer header: deleted_at, a present
# bitmap and one event time per feature. Every function here builds its output rows
# the same way: per feature, a choice of source row (or none = null), then
# _assemble copies the chosen values into one new bytes object.

cdef enum:
    DELTA_FORMAT = 2
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
    const uint8_t* times     # delta rows only: F i64 feature times


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


cdef RowFault _check_delta_row(const RowLayout* c, const uint8_t* row, Py_ssize_t length,
                               RowCheck* check) noexcept nogil:
    cdef Py_ssize_t j, shift = _delta_shift(c)
    cdef Py_ssize_t min_size = c.min_row_size + shift
    cdef uint32_t end, previous = 0
    if length < DELTA_FIXED_HEADER:
        check.fault = ROW_TOO_SHORT
        check.a = length
        return ROW_TOO_SHORT
    if row[0] != DELTA_FORMAT:
        check.fault = ROW_BAD_FORMAT
        check.a = row[0]
        return ROW_BAD_FORMAT
    end = load_u32(row + 1)
    if end != c.schema_id:
        check.fault = ROW_OTHER_SCHEMA
        check.a = end
        return ROW_OTHER_SCHEMA
    if length < min_size:
        check.fault = ROW_TOO_SHORT
        check.a = length
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


cdef str _delta_reason(const RowLayout* c, const RowCheck* check):
    if check.fault == ROW_TOO_SHORT:
        return (f"delta row: length {check.a} is shorter than the "
                f"{c.min_row_size + _delta_shift(c)}-byte minimum")
    if check.fault == ROW_BAD_FORMAT:
        return f"delta row: format byte 0x{check.a:02x}, expected 0x{DELTA_FORMAT:02x}"
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
    return 0


cdef int _view_delta(const RowLayout* c, object value, Py_ssize_t index, RowView* v) except -1:
    """Points v at a stored delta row; CorruptRow/SchemaMismatch names ``index``."""
    cdef RowCheck check
    if type(value) is not bytes:
        raise TypeError(f"delta row {index} must be bytes or None, got {type(value).__name__}")
    v.row = <const uint8_t*>PyBytes_AS_STRING(value)
    v.length = PyBytes_GET_SIZE(value)
    if _check_delta_row(c, v.row, v.length, &check) != ROW_OK:
        if check.fault == ROW_OTHER_SCHEMA:
            raise SchemaMismatch(index, check.a, c.schema_id)
        raise CorruptRow(index, _delta_reason(c, &check))
    v.bitmap_at = DELTA_FIXED_HEADER
    v.shift = _delta_shift(c)
    v.event_time = load_i64(v.row + 5)
    v.deleted_at = load_i64(v.row + 13)
    v.present = v.row + DELTA_FIXED_HEADER + c.bitmap_size
    v.times = v.row + DELTA_FIXED_HEADER + 2 * c.bitmap_size
    return 0


cdef inline bint _src_null(const RowView* v, Py_ssize_t f) noexcept nogil:
    return _bit(v.row + v.bitmap_at, f)


cdef inline uint32_t _src_var_len(const RowLayout* c, const RowView* v,
                                  Py_ssize_t j) noexcept nogil:
    cdef const uint8_t* ends = v.row + c.ends_start + v.shift
    cdef uint32_t start = 0 if j == 0 else load_u32(ends + 4 * (j - 1))
    return load_u32(ends + 4 * j) - start


cdef Py_ssize_t _assembled_size(const RowLayout* c, const RowView* a, const RowView* b,
                                const uint8_t* choice, bint delta) except -1:
    """Bytes of the row _assemble_into writes for these choices; ValueError past the
    var section's limit."""
    cdef Py_ssize_t f, j
    cdef uint64_t var_bytes = 0
    cdef const RowView* src
    for j in range(c.n_var):
        f = c.var_features[j]
        if choice[f] != FROM_NONE:
            src = a if choice[f] == FROM_A else b
            if not _src_null(src, f):
                var_bytes += _src_var_len(c, src, j)
    if var_bytes > MAX_VAR_BYTES:
        raise ValueError(f"the combined row's var data exceeds {MAX_VAR_BYTES} bytes")
    return c.min_row_size + (_delta_shift(c) if delta else 0) + <Py_ssize_t>var_bytes


cdef void _assemble_into(const RowLayout* c, const RowView* a, const RowView* b,
                         const uint8_t* choice, bint delta, int64_t event_time,
                         int64_t deleted_at, const int64_t* times, uint8_t* row) noexcept nogil:
    """Writes at ``row`` (_assembled_size bytes) the row (format 1, or a delta row when
    ``delta``) taking feature f from a (choice FROM_A), b (FROM_B) or nowhere
    (FROM_NONE: null / absent)."""
    cdef Py_ssize_t f, width
    cdef Py_ssize_t shift = _delta_shift(c) if delta else 0
    cdef Py_ssize_t bitmap_at = DELTA_FIXED_HEADER if delta else ROW_HEADER_SIZE
    cdef const RowView* src
    cdef uint8_t* present = NULL
    memset(row, 0, c.min_row_size + shift)
    row[0] = DELTA_FORMAT if delta else ROW_FORMAT
    store_u32(row + 1, c.schema_id)
    store_i64(row + 5, event_time)
    if delta:
        store_i64(row + 13, deleted_at)
        present = row + DELTA_FIXED_HEADER + c.bitmap_size
    for f in range(c.n_features):
        if choice[f] == FROM_NONE:
            if not delta:
                _set_bit(row + bitmap_at, f)
            continue
        src = a if choice[f] == FROM_A else b
        if delta:
            _set_bit(present, f)
            store_i64(row + DELTA_FIXED_HEADER + 2 * c.bitmap_size + 8 * f, times[f])
        if _src_null(src, f):
            _set_bit(row + bitmap_at, f)
            continue
        width = c.widths[f]
        if width:
            copy_fixed(row + c.offsets[f] + shift, src.row + c.offsets[f] + src.shift, width)
    _assemble_var(c, a, b, choice, shift, row)


cdef inline void _assemble_var(const RowLayout* c, const RowView* a, const RowView* b,
                               const uint8_t* choice, Py_ssize_t shift,
                               uint8_t* row) noexcept nogil:
    """The var ends and data of an assembled row (body shifted by ``shift`` bytes)."""
    cdef Py_ssize_t f, j
    cdef const RowView* src
    cdef uint32_t length, end = 0, start
    for j in range(c.n_var):
        f = c.var_features[j]
        if choice[f] != FROM_NONE:
            src = a if choice[f] == FROM_A else b
            if not _src_null(src, f):
                length = _src_var_len(c, src, j)
                start = 0 if j == 0 else load_u32(src.row + c.ends_start + src.shift + 4 * (j - 1))
                if length:
                    memcpy(row + c.min_row_size + shift + end,
                           src.row + c.min_row_size + src.shift + start, length)
                end += length
        store_u32(row + c.ends_start + shift + 4 * j, end)


cdef void _combine_into(const RowLayout* c, const RowView* base, const RowView* b,
                        const uint8_t* choice, int64_t event_time, uint8_t* row) noexcept nogil:
    """What _assemble_into(c, base, b, choice, False, event_time, 0, NULL, row) writes,
    for ``base`` a checked format-1 row: its header, bitmap and fixed section copied
    whole, then only the features not taken from it rewritten (most of a row read
    with a partial update comes from its base)."""
    cdef Py_ssize_t f, width
    cdef uint8_t* bitmap = row + ROW_HEADER_SIZE
    memcpy(row, base.row, c.ends_start)
    store_i64(row + 5, event_time)
    if c.n_features & 7:  # padding bits of the bitmap's last byte: 0, as assembled
        bitmap[c.bitmap_size - 1] &= <uint8_t>((1 << (c.n_features & 7)) - 1)
    for f in range(c.n_features):
        width = c.widths[f]
        if choice[f] == FROM_A:
            if width and _bit(bitmap, f):
                zero_fixed(row + c.offsets[f], width)  # a null's bytes: 0, as assembled
            continue
        if choice[f] == FROM_NONE or _src_null(b, f):
            _set_bit(bitmap, f)
            if width:
                zero_fixed(row + c.offsets[f], width)
            continue
        bitmap[f >> 3] &= <uint8_t>~(1 << (f & 7))
        if width:
            copy_fixed(row + c.offsets[f], b.row + c.offsets[f] + b.shift, width)
    _assemble_var(c, base, b, choice, 0, row)


cdef object _assemble(const RowLayout* c, const RowView* a, const RowView* b,
                      const uint8_t* choice, bint delta, int64_t event_time,
                      int64_t deleted_at, const int64_t* times):
    """_assemble_into a new bytes object."""
    out = PyBytes_FromStringAndSize(NULL, _assembled_size(c, a, b, choice, delta))
    _assemble_into(c, a, b, choice, delta, event_time, deleted_at, times,
                   <uint8_t*>PyBytes_AS_STRING(out))
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
        t = load_i64(upd.row + 5)
        value = old_rows[i]
        has_old = value is not None
        if has_old:
            _view_delta(c, value, i, &old)
            deleted_at = old.deleted_at
            event_time = old.event_time
        else:
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
        _view_delta(c, value, i, &old)
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
        _view_delta(c, value, i, &row)
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
    _view_delta(c, row, 0, &v)
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
        _view_delta(c, incoming_rows[i], i, &new)
        value = stored_rows[i]
        if value is None:
            old = new
            old.deleted_at = INT64_MIN
            old.event_time = INT64_MIN
            old.present = NULL
        else:
            _view_delta(c, value, i, &old)
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
