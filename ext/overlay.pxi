# The read-time overlay of delta over base (docs/row-format.md, "Reading"): a key's
# answer from its base row and delta row, per key (overlay) or straight into a
# response's block (overlay_join); included by codec.pyx.

cdef extern from *:
    void __builtin_prefetch(const void* address) nogil


cdef inline void _prefetch_rows(list rows, Py_ssize_t n):
    """Asks for every cache line of the bytes in ``rows`` (None skipped) at once."""
    cdef Py_ssize_t i, at, length
    cdef const char* p
    for i in range(n):
        value = rows[i]
        if type(value) is bytes:
            p = PyBytes_AS_STRING(value)
            length = PyBytes_GET_SIZE(value)
            for at in range(0, length, 64):
                __builtin_prefetch(p + at)


cdef inline bint _expired(int64_t t, int64_t now_us, int64_t ttl) noexcept nogil:
    """Whether a value of event time t is older than now_us - ttl (µs), for ttl > 0.

    When now_us - ttl would be below INT64_MIN, nothing is older than it: checking that
    first keeps the subtraction from overflowing.
    """
    return ttl > 0 and now_us >= INT64_MIN + ttl and t < now_us - ttl


cdef object _ttl_array(object ttl_us, Py_ssize_t n_features):
    if ttl_us is None:
        return None
    ttl = _int64_array(ttl_us, n_features, "ttl_us")
    if not ttl.any():
        return None
    return ttl


cdef inline int64_t _ttl_end(int64_t t, int64_t ttl) noexcept nogil:
    """The last µs at which a value of event time t is not yet expired (ttl > 0):
    t + ttl, saturating at INT64_MAX."""
    if t > INT64_MAX - ttl:
        return INT64_MAX
    return t + ttl


cdef inline void _window(int64_t* valid, const int64_t* ttls, Py_ssize_t n_features,
                         const uint8_t* choice, const int64_t* times, int64_t t_all,
                         const uint8_t* was_chosen) noexcept nogil:
    """Narrows [valid[0], valid[1]] (µs) to the times at which the features TTL keeps
    and drops stay the same: a kept feature expires after _ttl_end, a dropped one
    came back before _ttl_end + 1 (only a clock set back reaches that)."""
    cdef Py_ssize_t f
    cdef int64_t t, end
    for f in range(n_features):
        if ttls[f] <= 0:
            continue
        if was_chosen != NULL and was_chosen[f] == FROM_NONE:
            continue  # not in the answer for another reason than TTL: time-independent
        t = times[f] if times != NULL else t_all
        end = _ttl_end(t, ttls[f])
        if choice[f] != FROM_NONE:
            if end < valid[1]:
                valid[1] = end
        elif end + 1 > valid[0]:
            # No overflow: TTL dropped it, so t + ttl < now_us <= INT64_MAX (unsaturated).
            valid[0] = end + 1


# What _overlay_row says a key's answer is.
cdef enum:
    OUT_NONE = 0        # missing
    OUT_BASE = 1        # the stored base row, as is
    OUT_ASSEMBLED = 2   # _assemble(base, delta, choice, event_time)


cdef int _overlay_row(const RowLayout* c, object b, object d, Py_ssize_t i,
                      int64_t snapshot_time, int64_t now_us, const int64_t* ttls,
                      int64_t* valid, RowView* base, RowView* delta, uint8_t* choice,
                      uint8_t* chosen, int64_t* times, int64_t* event_time_out) except -1:
    """The answer of key i (``overlay``'s rules) from its base row b and delta row d
    (None: absent): OUT_NONE, OUT_BASE, or OUT_ASSEMBLED with ``choice`` (F sources,
    FROM_A = base, FROM_B = delta) and the row's event time in ``event_time_out``.
    ``valid``: NULL, or the 2 int64 of the row's window (µs), narrowed by its TTLs.
    ``chosen`` and ``times``: F bytes and F int64 of scratch."""
    cdef Py_ssize_t f, byte, k
    cdef uint32_t bits
    cdef bint base_counts, any_delta, expired
    cdef int64_t t, tb, event_time
    base.row = NULL  # until a base row is viewed
    if d is None:
        if b is None:
            return OUT_NONE
        _view_base(c, b, i, base)
        if ttls == NULL:
            return OUT_BASE
        expired = False
        for f in range(c.n_features):
            if _expired(base.event_time, now_us, ttls[f]):
                choice[f] = FROM_NONE
                expired = True
            else:
                choice[f] = FROM_A
        if valid != NULL:
            _window(valid, ttls, c.n_features, choice, NULL, base.event_time, NULL)
        if not expired:
            return OUT_BASE
        delta[0] = base[0]
        event_time_out[0] = base.event_time
        return OUT_ASSEMBLED
    _view_delta(c, d, i, delta)
    base_counts = False
    if b is not None:
        _view_base(c, b, i, base)
        # Only a delete after the snapshot hides the base: the version already holds
        # the earlier ones, and compaction drops them from the delta.
        base_counts = (base.event_time > delta.deleted_at
                       or delta.deleted_at <= snapshot_time)
    tb = base.event_time if base_counts else INT64_MIN
    any_delta = False
    event_time = tb
    memset(choice, FROM_A if base_counts else FROM_NONE, c.n_features)
    if ttls != NULL:
        for f in range(c.n_features):
            times[f] = tb
    # Only the features the delta holds can come from it: walk its present bitmap (a
    # sparse row's times are stored in that order, a format-2 row's at 8 f).
    k = 0
    for byte in range(c.bitmap_size):
        bits = _bits_at(c, delta.present, byte)
        while bits:
            f = 8 * byte + __builtin_ctz(bits)
            bits &= bits - 1
            t = load_i64(delta.times + 8 * (k if delta.sparse else f))
            k += 1
            if t > snapshot_time and t > tb:
                choice[f] = FROM_B
                times[f] = t
                any_delta = True
                if t > event_time:
                    event_time = t
    if not any_delta and not base_counts:
        return OUT_NONE
    expired = False
    if ttls != NULL:
        if valid != NULL:
            memcpy(chosen, choice, c.n_features)
        for f in range(c.n_features):
            if choice[f] != FROM_NONE and _expired(times[f], now_us, ttls[f]):
                choice[f] = FROM_NONE
                expired = True
        if valid != NULL:
            _window(valid, ttls, c.n_features, choice, times, 0, chosen)
    if not any_delta and not expired:
        return OUT_BASE  # the delta holds nothing newer: the base row as stored
    event_time_out[0] = event_time
    return OUT_ASSEMBLED


def overlay(Layout layout not None, list base_rows, list delta_rows, int64_t snapshot_time,
            int64_t now_us, ttl_us=None, valid_us=None, Py_ssize_t valid_at=0):
    """The rows a read returns: delta over base (docs/row-format.md, "Reading").

    ``base_rows[i]``: the key's format-1 row in the version read (None if absent);
    ``delta_rows[i]``: its delta row (None if absent); ``snapshot_time``: the
    version's snapshot time in µs (NO_DELETE, i.e. INT64_MIN, without a version);
    ``ttl_us``: None or an int64 array of F TTLs in µs (0 or less = none), applied
    against ``now_us`` (µs). Returns format-1
    rows or None (missing); a base row the read changes nothing in (no newer delta
    feature, nothing expired) is returned as is. A delete hides the base row only when
    it is newer than ``snapshot_time``: a version holds every delete up to its snapshot
    time, and compaction drops those (a read must not change when it does).
    Raises CorruptRow/SchemaMismatch naming the key's index.

    ``valid_us``: None, or a writable int64 ndarray that receives, for row i, the times (µs,
    inclusive) between which a read at another ``now_us`` returns the same: at
    ``[2 (valid_at + i)]`` from, at the next index until (INT64_MIN and INT64_MAX when
    no TTL bounds it). The node's hot-row cache keeps an answer that long.
    """
    cdef const RowLayout* c = &layout.c
    cdef Py_ssize_t n = len(base_rows)
    if len(delta_rows) != n:
        raise ValueError(f"{len(delta_rows)} delta rows for {n} base rows")
    ttl = _ttl_array(ttl_us, c.n_features)
    cdef const int64_t* ttls = NULL
    if ttl is not None:
        ttls = _int64_data(ttl)
    cdef int64_t* valid = NULL
    cdef Py_ssize_t k
    if valid_us is not None:
        # An output: a converted copy would take the windows and drop them unseen.
        if not (
            cnp.PyArray_Check(valid_us)
            and cnp.PyArray_TYPE(<cnp.ndarray>valid_us) == cnp.NPY_INT64
            and cnp.PyArray_NDIM(<cnp.ndarray>valid_us) == 1
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>valid_us)
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>valid_us)
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>valid_us)
        ):
            raise ValueError("valid_us must be a writable, contiguous 1-d int64 ndarray")
        if valid_at < 0 or valid_us.shape[0] < 2 * (valid_at + n):
            raise ValueError(
                f"valid_us has {valid_us.shape[0]} entries, {2 * (valid_at + n)} needed"
            )
        valid = _int64_data(valid_us) + 2 * valid_at
        for k in range(n):
            valid[2 * k] = INT64_MIN
            valid[2 * k + 1] = INT64_MAX
    # Delta rows (from the shard's dict, kvstore.storage.delta_memory) are mostly not in
    # the CPU's caches: asked for all at once, their lines arrive in parallel rather
    # than one miss after another in the loop below.
    _prefetch_rows(delta_rows, n)
    # Only rows the delta or a TTL changes need scratch space: made for the first one.
    cdef _Scratch scratch = None
    cdef RowView base, delta
    cdef Py_ssize_t i
    cdef int64_t event_time
    cdef int kind
    cdef list out = [None] * n
    for i in range(n):
        b = base_rows[i]
        d = delta_rows[i]
        if d is None and (b is None or ttls == NULL):
            if b is not None:
                _view_base(c, b, i, &base)
                out[i] = b
            continue
        if scratch is None:
            scratch = _Scratch(c.n_features)
        kind = _overlay_row(c, b, d, i, snapshot_time, now_us, ttls,
                            valid + 2 * i if valid != NULL else NULL, &base, &delta,
                            scratch.choice, scratch.chosen, scratch.times, &event_time)
        if kind == OUT_BASE:
            out[i] = b
        elif kind == OUT_ASSEMBLED:
            out[i] = _assemble(c, &base, &delta, scratch.choice, False, event_time, 0, NULL)
    return out


def overlay_join(Layout layout not None, list fetched, int64_t snapshot_time, int64_t now_us,
                 ttl_us=None):
    """``overlay`` of every (delta rows, base rows) pair of ``fetched`` (one per shard
    group, as ``Reads.fetch`` returns them), then ``join_values`` of the answers, in one
    pass: a combined row is written straight into the block, never made a bytes
    object of its own. Returns (block, int32 lengths, -1 = missing), the same as
    ``join_values`` of the concatenated ``overlay`` answers. Errors as ``overlay``'s,
    with the index of the key across all the groups.
    """
    cdef const RowLayout* c = &layout.c
    cdef Py_ssize_t n = 0, g, i, k, at, m, F = c.n_features
    for pair in fetched:
        delta_rows, base_rows = pair
        if len(delta_rows) != len(base_rows):
            raise ValueError(f"{len(delta_rows)} delta rows for {len(base_rows)} base rows")
        n += len(base_rows)
    ttl = _ttl_array(ttl_us, F)
    cdef const int64_t* ttls = NULL
    if ttl is not None:
        ttls = _int64_data(ttl)
    # Per key: its two views, what its answer is, and (assembled) its F choices.
    cdef RowView* views = <RowView*>PyMem_Malloc((2 * n + 1) * sizeof(RowView))
    cdef uint8_t* kinds = <uint8_t*>PyMem_Malloc(n * (F + 1) + 1)
    cdef int64_t* times = <int64_t*>PyMem_Malloc((n + F + 1) * sizeof(int64_t))
    cdef uint8_t* chosen = <uint8_t*>PyMem_Malloc(F + 1)
    if views == NULL or kinds == NULL or times == NULL or chosen == NULL:
        PyMem_Free(views)
        PyMem_Free(kinds)
        PyMem_Free(times)
        PyMem_Free(chosen)
        raise MemoryError()
    cdef uint8_t* choices = kinds + n
    cdef int64_t* event_times = times + F
    cdef Py_ssize_t total = 0, size
    cdef int kind
    cdef char* out
    cdef int32_t* lengths_view
    try:
        k = 0
        for pair in fetched:
            delta_rows, base_rows = pair
            m = len(base_rows)
            _prefetch_rows(delta_rows, m)
            for i in range(m):
                b = base_rows[i]
                d = delta_rows[i]
                views[2 * k].row = NULL  # stays NULL without a base row
                if d is None and (b is None or ttls == NULL):
                    if b is None:
                        kind = OUT_NONE
                    else:
                        _view_base(c, b, k, &views[2 * k])
                        kind = OUT_BASE
                else:
                    kind = _overlay_row(c, b, d, k, snapshot_time, now_us, ttls, NULL,
                                        &views[2 * k], &views[2 * k + 1], choices + F * k,
                                        chosen, times, &event_times[k])
                kinds[k] = kind
                if kind == OUT_BASE:
                    size = views[2 * k].length
                elif kind == OUT_ASSEMBLED:
                    size = _assembled_size(c, &views[2 * k], &views[2 * k + 1],
                                           choices + F * k, False)
                else:
                    size = 0
                if size > INT32_MAX:
                    raise ValueError(f"row {k} is {size} bytes, more than an int32 length holds")
                total += size
                k += 1
        block = PyBytes_FromStringAndSize(NULL, total)
        out = PyBytes_AS_STRING(block)
        lengths = _empty(n, cnp.NPY_INT32)
        lengths_view = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>lengths)
        # No Python code ran since the views were taken: the rows they point into live.
        at = 0
        for k in range(n):
            if kinds[k] == OUT_NONE:
                lengths_view[k] = -1
                continue
            if kinds[k] == OUT_BASE:
                size = views[2 * k].length
                memcpy(out + at, views[2 * k].row, size)
            else:
                size = _assembled_size(c, &views[2 * k], &views[2 * k + 1],
                                       choices + F * k, False)
                if views[2 * k].row != NULL:  # a base row: the template of the answer
                    _combine_into(c, &views[2 * k], &views[2 * k + 1], choices + F * k,
                                  event_times[k], <uint8_t*>out + at)
                else:
                    _assemble_row_into(c, &views[2 * k], &views[2 * k + 1], choices + F * k,
                                       event_times[k], <uint8_t*>out + at)
            lengths_view[k] = <int32_t>size
            at += size
    finally:
        PyMem_Free(views)
        PyMem_Free(kinds)
        PyMem_Free(times)
        PyMem_Free(chosen)
    return block, lengths
