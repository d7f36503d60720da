# The fast read path's answers from the hot-row cache (HotRows.answer_frame): a
# GetRequest parsed and its response frame built in C, when every key is cached for
# the table's current version; HotTable, what a table's requests are checked against.
# Included by codec.pyx, after hot_rows.pxi.

from cpython.unicode cimport PyUnicode_DecodeUTF8
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec


cdef class HotTable:
    """What the fast read path needs to answer a table's requests from the cache: the
    cache's prefix of the table's current version and how to check a request.

    ``table`` and ``entry`` are the node's Table and its TableEntry: an answer is given
    only while the node still has that table object and ``entry.current`` is still
    ``version`` (a load, rollback or drop makes the next request take the full path,
    which publishes the new state).
    """
    cdef readonly object table
    cdef object entry
    cdef readonly int64_t version
    cdef readonly bytes prefix
    cdef uint32_t schema_id
    cdef bint int_keys
    cdef object feature_names
    cdef object stats
    cdef Py_ssize_t max_keys

    def __init__(self, table, entry, int64_t version, bytes prefix, uint32_t schema_id,
                 bint int_keys, feature_names, stats, Py_ssize_t max_keys):
        self.table = table
        self.entry = entry
        self.version = version
        self.prefix = prefix
        self.schema_id = schema_id
        self.int_keys = int_keys
        self.feature_names = frozenset(n.encode() for n in feature_names)
        self.stats = stats
        self.max_keys = max_keys


cdef inline Py_ssize_t _varint(const uint8_t* p, Py_ssize_t n, Py_ssize_t i,
                               uint64_t* out) noexcept nogil:
    """Reads a protobuf varint at p[i]; the index after it, or -1 if malformed."""
    cdef uint64_t v = 0
    cdef int shift = 0
    while i < n and shift < 64:
        v |= (<uint64_t>(p[i] & 0x7F)) << shift
        if not p[i] & 0x80:
            out[0] = v
            return i + 1
        i += 1
        shift += 7
    return -1


cdef inline Py_ssize_t _put_varint(uint8_t* p, uint64_t v) noexcept nogil:
    cdef Py_ssize_t i = 0
    while v >= 0x80:
        p[i] = <uint8_t>(v | 0x80)
        v >>= 7
        i += 1
    p[i] = <uint8_t>v
    return i + 1


cdef object _answer_frame(HotRows cache, body, uint32_t request_id, dict tables,
                          Py_ssize_t offset):
    """The fast read path's response frame (``kvstore.wire.frames``) to a GetRequest
    ``body[offset:]`` whose keys are all cached for the table's current version, or None
    (the request then takes the full path, which also answers every error).

    Only requests the full path would answer with these rows come here: a table
    published and still ``tables[name]`` at its published version, int64 keys,
    known features, no field twice, at most the node's key limit.
    """
    cdef const uint8_t[::1] data = _byte_buffer(body, "body")
    if offset < 0 or offset > data.shape[0]:
        raise ValueError(f"offset {offset} is outside the {data.shape[0]}-byte body")
    cdef const uint8_t* p = _bytes_ptr(data) + offset
    cdef Py_ssize_t n = data.shape[0] - offset
    cdef Py_ssize_t i = 0, end
    cdef uint64_t tag, v, field_no, wire, version = 0, count = 0
    cdef Py_ssize_t name_at = -1, name_len = 0, keys_at = -1, keys_len = 0
    cdef Py_ssize_t ints_at = -1, ints_len = 0
    cdef bint seen_version = False, seen_count = False
    cdef list features = []
    cdef timespec clock
    clock_gettime(CLOCK_REALTIME, &clock)
    # now_us() of kvstore.clock, the time overlay's TTLs were checked against.
    cdef int64_t now_us = <int64_t>clock.tv_sec * 1000000 + clock.tv_nsec // 1000
    while i < n:
        i = _varint(p, n, i, &tag)
        if i < 0:
            return None
        field_no = tag >> 3
        wire = tag & 7
        if wire == 0:
            i = _varint(p, n, i, &v)
            if i < 0 or field_no != 4 or seen_version:
                return None
            version = v
            seen_version = True
        elif wire == 2:
            i = _varint(p, n, i, &v)
            if i < 0 or v > <uint64_t>(n - i):
                return None
            if field_no == 1 and name_at < 0:
                name_at, name_len = i, <Py_ssize_t>v
            elif field_no == 2 and keys_at < 0:
                keys_at, keys_len = i, <Py_ssize_t>v
            elif field_no == 3:
                features.append(PyBytes_FromStringAndSize(<const char*>p + i, <Py_ssize_t>v))
            else:
                return None
            i += <Py_ssize_t>v
        else:
            return None
    if name_at < 0 or keys_at < 0:
        return None
    # The Keys message: count and the packed int64s, nothing else.
    i = keys_at
    end = keys_at + keys_len
    while i < end:
        i = _varint(p, end, i, &tag)
        if i < 0:
            return None
        if tag == (1 << 3):
            i = _varint(p, end, i, &v)
            if i < 0 or seen_count:
                return None
            count = v
            seen_count = True
        elif tag == ((2 << 3) | 2) and ints_at < 0:
            i = _varint(p, end, i, &v)
            if i < 0 or v > <uint64_t>(end - i):
                return None
            ints_at, ints_len = i, <Py_ssize_t>v
            i += ints_len
        else:
            return None
    if ints_at < 0 or count == 0 or <uint64_t>ints_len != 8 * count:
        return None
    try:
        name = PyUnicode_DecodeUTF8(<const char*>p + name_at, name_len, "strict")
    except UnicodeDecodeError:
        return None  # the full path answers it (InvalidArgument), the connection kept
    cdef PyObject* found = PyDict_GetItem(cache.published, name)
    if found == NULL:
        return None
    cdef HotTable t = <HotTable>found
    found = PyDict_GetItem(tables, name)
    if found == NULL or <object>found is not t.table or not t.int_keys:
        return None
    if t.entry.current != t.version or (version != 0 and version != <uint64_t>t.version):
        return None
    if <Py_ssize_t>count > t.max_keys:
        return None
    for feature in features:
        if feature not in t.feature_names:
            return None
    # Every key's entry, or None at the first one not cached.
    cdef Py_ssize_t k, m = <Py_ssize_t>count
    cdef const char* prefix = PyBytes_AS_STRING(t.prefix)
    cdef Py_ssize_t lp = PyBytes_GET_SIZE(t.prefix)
    cdef uint8_t stored[8]
    cdef int64_t key
    cdef Py_ssize_t total = 0
    cdef list rows = [None] * m
    for k in range(m):
        memcpy(&key, p + ints_at + 8 * k, 8)
        _int_key(stored, key)
        e = cache._get(prefix, lp, <const char*>stored, 8, now_us)
        if e is None:
            return None
        row = (<_HotEntry>e).row
        rows[k] = row
        if row is not None:
            total += PyBytes_GET_SIZE(row)
    cache._tally(m, m)
    # GetResponse: schema_id (1), version (2), values (3), lengths (4); order (5) is
    # left out: the rows are in request order.
    cdef uint8_t head[40]
    cdef Py_ssize_t h = 0
    head[h] = (1 << 3)
    h += 1
    h += _put_varint(head + h, t.schema_id)
    if t.version:
        head[h] = (2 << 3)
        h += 1
        h += _put_varint(head + h, <uint64_t>t.version)
    head[h] = (3 << 3) | 2
    h += 1
    h += _put_varint(head + h, <uint64_t>total)
    cdef uint8_t tail_head[12]
    cdef Py_ssize_t th = 0
    tail_head[th] = (4 << 3) | 2
    th += 1
    th += _put_varint(tail_head + th, <uint64_t>(4 * m))
    cdef Py_ssize_t body_len = h + total + th + 4 * m
    cdef Py_ssize_t frame_head = 9
    frame = PyBytes_FromStringAndSize(NULL, frame_head + body_len)
    cdef uint8_t* out = <uint8_t*>PyBytes_AS_STRING(frame)
    store_u32(out, <uint32_t>body_len)
    store_u32(out + 4, request_id)
    out[8] = 0  # STATUS_OK
    out += frame_head
    memcpy(out, head, h)
    out += h
    for k in range(m):
        row = rows[k]
        if row is not None:
            memcpy(out, PyBytes_AS_STRING(row), PyBytes_GET_SIZE(row))
            out += PyBytes_GET_SIZE(row)
    memcpy(out, tail_head, th)
    out += th
    cdef int32_t length
    for k in range(m):
        row = rows[k]
        length = -1 if row is None else <int32_t>PyBytes_GET_SIZE(row)
        memcpy(out + 4 * k, &length, 4)
    t.stats.keys_read += m
    return frame
