# The fast read path's answers in C: a GetRequest parsed and its response frame built
# without a protobuf object, from the hot-row cache (HotRows.answer_frame, when every
# key is cached) or from the table's shards (answer_read / answer_request, a table's
# small gets read from RocksDB, delta overlaid on base); HotTable and ReadTable, what
# a table's requests are checked against. Included by codec.pyx, after hot_rows.pxi;
# the client's end is fast_client.pxi.

from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport INT64_MAX
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


cdef class ReadTable:
    """What the fast read path needs to answer a table's gets from its shards in C
    (``answer_read``): the node's Table, TableEntry and schema, the version read, its
    base shards and snapshot time, the delta shards, and the request limits.

    ``fetch`` (``Reads.fetch``, or None): what reads the shards of a get of at least
    ``parallel_keys`` keys, on several threads (rocksdict's MultiGets release the GIL).

    An answer is given only while the node still has that table object, its entry still
    has that schema and current version, and ``table.base(version)`` is still that shard
    list (a load, rollback, drop or shard replaced makes the request take the full path,
    after which the node builds a new ReadTable). Delta writes need nothing: each read
    reads the delta shards.
    """
    cdef readonly object table
    cdef object entry
    cdef object schema
    cdef readonly int64_t version
    cdef object base
    cdef list delta
    cdef int64_t snapshot_time
    cdef Layout layout
    cdef object ttl_us
    cdef uint32_t schema_id
    cdef object feature_names
    cdef object stats
    cdef Py_ssize_t max_keys
    cdef object fetch
    cdef Py_ssize_t parallel_keys

    def __init__(self, table, entry, schema, int64_t version, base, list delta not None,
                 int64_t snapshot_time, Layout layout not None, ttl_us, uint32_t schema_id,
                 feature_names, stats, Py_ssize_t max_keys, fetch=None,
                 Py_ssize_t parallel_keys=INT64_MAX):
        if base is not None and len(base) != len(delta):
            raise ValueError(f"{len(base)} base shards for {len(delta)} delta shards")
        if not delta:
            raise ValueError("a table without shards")
        self.table = table
        self.entry = entry
        self.schema = schema
        self.version = version
        self.base = base
        self.delta = delta
        self.snapshot_time = snapshot_time
        self.layout = layout
        self.ttl_us = ttl_us
        self.schema_id = schema_id
        self.feature_names = frozenset(n.encode() for n in feature_names)
        self.stats = stats
        self.max_keys = max_keys
        self.fetch = fetch
        self.parallel_keys = parallel_keys

    def holds(self, tables):
        """Whether this is still what ``tables`` (the node's, by name) reads by default."""
        return self._holds(tables.get(self.schema.name))

    cdef bint _holds(self, table) except -1:
        if table is not self.table:
            return False
        entry = self.entry
        if entry.schema is not self.schema or entry.current != self.version:
            return False
        return self.version == 0 or table.base(self.version) is self.base


cdef struct _Request:
    uint64_t version
    uint64_t count
    Py_ssize_t name_at
    Py_ssize_t name_len
    Py_ssize_t ints_at


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


cdef bint _parse_request(const uint8_t* p, Py_ssize_t n, _Request* r,
                         list features) except -1:
    """Reads the GetRequest p[:n] into ``r`` and ``features`` (the names, as bytes);
    False for anything but a request of a table name, a version, known field kinds
    each once (features repeated), and int64 keys (count and packed ints only). The
    full path answers what this refuses, errors included."""
    cdef Py_ssize_t i = 0, end, keys_at = -1, keys_len = 0, ints_len = 0
    cdef uint64_t tag, v, field_no, wire
    cdef bint seen_version = False, seen_count = False
    r.version = 0
    r.count = 0
    r.name_at = -1
    r.name_len = 0
    r.ints_at = -1
    while i < n:
        i = _varint(p, n, i, &tag)
        if i < 0:
            return False
        field_no = tag >> 3
        wire = tag & 7
        if wire == 0:
            i = _varint(p, n, i, &v)
            if i < 0 or field_no != 4 or seen_version:
                return False
            r.version = v
            seen_version = True
        elif wire == 2:
            i = _varint(p, n, i, &v)
            if i < 0 or v > <uint64_t>(n - i):
                return False
            if field_no == 1 and r.name_at < 0:
                r.name_at, r.name_len = i, <Py_ssize_t>v
            elif field_no == 2 and keys_at < 0:
                keys_at, keys_len = i, <Py_ssize_t>v
            elif field_no == 3:
                features.append(PyBytes_FromStringAndSize(<const char*>p + i, <Py_ssize_t>v))
            else:
                return False
            i += <Py_ssize_t>v
        else:
            return False
    if r.name_at < 0 or keys_at < 0:
        return False
    # The Keys message: count and the packed int64s, nothing else.
    i = keys_at
    end = keys_at + keys_len
    while i < end:
        i = _varint(p, end, i, &tag)
        if i < 0:
            return False
        if tag == (1 << 3):
            i = _varint(p, end, i, &v)
            if i < 0 or seen_count:
                return False
            r.count = v
            seen_count = True
        elif tag == ((2 << 3) | 2) and r.ints_at < 0:
            i = _varint(p, end, i, &v)
            if i < 0 or v > <uint64_t>(end - i):
                return False
            r.ints_at, ints_len = i, <Py_ssize_t>v
            i += ints_len
        else:
            return False
    return r.ints_at >= 0 and r.count != 0 and <uint64_t>ints_len == 8 * r.count


cdef inline int64_t _now_us() noexcept nogil:
    """now_us() of kvstore.clock: the time overlay checks TTLs against (µs)."""
    cdef timespec clock
    clock_gettime(CLOCK_REALTIME, &clock)
    return <int64_t>clock.tv_sec * 1000000 + clock.tv_nsec // 1000


cdef object _request_name(const uint8_t* p, const _Request* r):
    """The table the request names, or None for a name that is not UTF-8 (the full path
    answers it, InvalidArgument, and the connection is kept)."""
    try:
        return PyUnicode_DecodeUTF8(<const char*>p + r.name_at, r.name_len, "strict")
    except UnicodeDecodeError:
        return None


cdef object _response_frame(list rows, Py_ssize_t m, Py_ssize_t total, uint32_t schema_id,
                            int64_t version, uint32_t request_id):
    """The response frame (``kvstore.wire.frames``) of a GetResponse holding ``rows``
    (``total`` bytes; None = missing) in request order: schema_id (1), version (2),
    values (3), lengths (4); order (5) left out, as the rows are in request order.
    None when the lengths would not fit the frame's u32 and the rows' i32 fields: the
    full path answers (with its error)."""
    if total > INT32_MAX - 4 * m - 64:
        return None
    cdef uint8_t head[40]
    cdef Py_ssize_t h = 0, k
    head[h] = (1 << 3)
    h += 1
    h += _put_varint(head + h, schema_id)
    if version:
        head[h] = (2 << 3)
        h += 1
        h += _put_varint(head + h, <uint64_t>version)
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
    return frame


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
    cdef _Request r
    cdef list features = []
    if not _parse_request(p, data.shape[0] - offset, &r, features):
        return None
    name = _request_name(p, &r)
    if name is None:
        return None
    cdef PyObject* found = PyDict_GetItem(cache.published, name)
    if found == NULL:
        return None
    cdef HotTable t = <HotTable>found
    cdef PyObject* held = PyDict_GetItem(tables, name)
    if held == NULL or <object>held is not t.table or not t.int_keys:
        return None
    if t.entry.current != t.version or (r.version != 0 and r.version != <uint64_t>t.version):
        return None
    if r.count > <uint64_t>t.max_keys:
        return None
    for feature in features:
        if feature not in t.feature_names:
            return None
    # Every key's entry, or None at the first one not cached.
    cdef int64_t now_us = _now_us()
    cdef Py_ssize_t k, m = <Py_ssize_t>r.count
    cdef const char* prefix = PyBytes_AS_STRING(t.prefix)
    cdef Py_ssize_t lp = PyBytes_GET_SIZE(t.prefix)
    cdef uint8_t stored[8]
    cdef int64_t key
    cdef Py_ssize_t total = 0
    cdef list rows = [None] * m
    for k in range(m):
        memcpy(&key, p + r.ints_at + 8 * k, 8)
        _int_key(stored, key)
        e = cache._get(prefix, lp, <const char*>stored, 8, now_us)
        if e is None:
            return None
        row = (<_HotEntry>e).row
        rows[k] = row
        if row is not None:
            total += PyBytes_GET_SIZE(row)
    cache._tally(m, m)
    frame = _response_frame(rows, m, total, t.schema_id, t.version, request_id)
    if frame is not None:
        t.stats.keys_read += m
    return frame


def answer_read(dict published not None, body, uint32_t request_id, dict tables not None,
                Py_ssize_t offset=0):
    """The fast read path's response frame (``kvstore.wire.frames``) to the GetRequest
    ``body[offset:]``, read from the shards in C, or None (the full path answers it).

    ``published``: ReadTable by table name; ``tables``: the node's tables by name. The
    request is answered here only when the full path would answer it with the same
    rows: its table's ReadTable still ``holds`` (same table object, schema, current
    version and base shards), int64 keys, at most the ReadTable's key limit, known
    features, the current version or no version asked. Keys are grouped by shard
    (xxh3, as ``group_int_keys``), each group read with one MultiGet of the delta
    shard (skipped while it is empty) and one of the base shard, its keys in key order
    (``_sort_key_runs``), and ``overlay`` gives
    each key's row (delta over base, TTLs against now), put back in request order.
    Anything that raises (RocksDB's errors, a corrupt row) gives None: the full path
    then reads again and reports it, with the key it is about.
    """
    if not PyBytes_CheckExact(body):
        body = bytes(body)
    if offset < 0 or offset > PyBytes_GET_SIZE(body):
        raise ValueError(f"offset {offset} is outside the {len(body)}-byte body")
    return _answer_read(published, <bytes>body, request_id, tables, offset)


def answer_request(dict published not None, data, dict tables not None,
                   Py_ssize_t max_request_bytes):
    """``answer_read`` of ``data`` when it is exactly one whole request frame (``u32``
    body length, ``u32`` request id, a body of at most ``max_request_bytes``), the
    common read of a fast-path connection; else None."""
    if not PyBytes_CheckExact(data):
        return None
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    if n < 8:
        return None
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(data)
    cdef uint32_t length = load_u32(p)
    if <Py_ssize_t>length != n - 8 or <Py_ssize_t>length > max_request_bytes:
        return None
    return _answer_read(published, <bytes>data, load_u32(p + 4), tables, 8)


cdef list _stored_int_keys(const int64_t* keys, const int32_t* order, Py_ssize_t g):
    """The stored form (``_int_key``) of keys[order[0]], ..., keys[order[g - 1]]."""
    cdef list group = [None] * g
    cdef uint8_t stored[8]
    cdef Py_ssize_t k
    for k in range(g):
        _int_key(stored, keys[order[k]])
        group[k] = PyBytes_FromStringAndSize(<char*>stored, 8)
    return group


cdef Py_ssize_t _place(ReadTable t, base_rows, delta_rows, int64_t now_us, list rows,
                       const int32_t* order, Py_ssize_t g) except -1:
    """``overlay`` of one shard's g keys (delta over base, TTLs against now), each
    answer put at its request position ``order[k]`` of ``rows``; their bytes."""
    answers = overlay(t.layout, base_rows, delta_rows, t.snapshot_time, now_us, t.ttl_us)
    cdef Py_ssize_t k, total = 0
    for k in range(g):
        row = answers[k]
        if row is not None:
            rows[order[k]] = row
            total += PyBytes_GET_SIZE(row)
    return total


cdef object _answer_read(dict published, bytes body, uint32_t request_id, dict tables,
                         Py_ssize_t offset):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(body) + offset
    cdef _Request r
    cdef list features = []
    if not _parse_request(p, n - offset, &r, features):
        return None
    name = _request_name(p, &r)
    if name is None:
        return None
    cdef PyObject* found = PyDict_GetItem(published, name)
    if found == NULL:
        return None
    cdef ReadTable t = <ReadTable>found
    cdef PyObject* held = PyDict_GetItem(tables, name)
    if held == NULL:
        return None
    try:
        if not t._holds(<object>held):
            return None
    except Exception:
        return None  # a base that cannot be opened: the full path reports it
    if r.version != 0 and r.version != <uint64_t>t.version:
        return None
    if r.count > <uint64_t>t.max_keys:
        return None
    for feature in features:
        if feature not in t.feature_names:
            return None
    cdef Py_ssize_t m = <Py_ssize_t>r.count
    cdef int32_t shards = <int32_t>len(t.delta)
    cdef int32_t* ids = <int32_t*>PyMem_Malloc(2 * m * sizeof(int32_t))
    cdef int64_t* start = <int64_t*>PyMem_Calloc(<size_t>shards + 1, sizeof(int64_t))
    cdef int32_t* order
    cdef int64_t* keys = <int64_t*>PyMem_Malloc(m * sizeof(int64_t))
    cdef _KeyAt* pairs = <_KeyAt*>PyMem_Malloc(2 * m * sizeof(_KeyAt))
    cdef list rows = [None] * m
    cdef Py_ssize_t i, k, g, total = 0
    cdef int32_t s
    cdef int64_t now_us = _now_us()
    try:
        if ids == NULL or start == NULL or keys == NULL or pairs == NULL:
            raise MemoryError()
        order = ids + m
        memcpy(keys, p + r.ints_at, 8 * m)
        _int_shard_ids(keys, m, shards, ids)
        _sort_by_shard(ids, m, shards, order, start)
        _sort_key_runs(keys, order, start, shards, pairs, pairs + m)
        base = t.base
        try:
            if m >= t.parallel_keys and t.fetch is not None:
                # A large get: every shard's keys first, then their MultiGets spread
                # over the read threads (``Reads.fetch``; it returns once all are read).
                groups = []
                i = 0  # start[s] is now the end of shard s's run in order
                for s in range(shards):
                    if start[s] == i:
                        continue
                    groups.append((s, _stored_int_keys(keys, order + i, start[s] - i)))
                    i = start[s]
                fetched = t.fetch(groups, t.delta, base, m)
                i = 0
                for k in range(len(groups)):
                    s = groups[k][0]
                    delta_rows, base_rows = fetched[k]
                    total += _place(t, base_rows, delta_rows, now_us, rows, order + i,
                                    start[s] - i)
                    i = start[s]
            else:
                i = 0
                for s in range(shards):
                    if start[s] == i:
                        continue
                    g = start[s] - i
                    group = _stored_int_keys(keys, order + i, g)
                    nones = [None] * g
                    delta = t.delta[s]
                    delta_rows = nones if delta.empty else delta.multi_get(group)
                    if base is None:
                        base_rows = nones
                    else:
                        shard = base[s]
                        base_rows = nones if shard.empty else shard.multi_get(group)
                    total += _place(t, base_rows, delta_rows, now_us, rows, order + i, g)
                    i = start[s]
        except Exception:
            return None
    finally:
        PyMem_Free(ids)
        PyMem_Free(start)
        PyMem_Free(keys)
        PyMem_Free(pairs)
    frame = _response_frame(rows, m, total, t.schema_id, t.version, request_id)
    if frame is not None:
        t.stats.keys_read += m
    return frame
