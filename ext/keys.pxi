# Keys and shards (docs/row-format.md, "Keys"): the stored bytes of int64 and string
# keys, their xxh3 shard ids, keys grouped by shard; and the row lists that a node and
# a client pass around (join_values, split_rows, response_layout).
# Included by codec.pyx.


cdef uint64_t SIGN_BIT = (<uint64_t>1) << 63


cdef inline void _int_key(uint8_t* out, int64_t key) noexcept nogil:
    # Flipping the sign bit makes the big-endian bytes sort like the integers.
    store_u64_be(out, (<uint64_t>key) ^ SIGN_BIT)


cdef int32_t _shard_count(object n_shards) except -1:
    n = operator.index(n_shards)
    if not 1 <= n <= INT32_MAX:
        raise ValueError(f"n_shards is {n}, expected 1 <= n_shards <= {INT32_MAX}")
    return <int32_t>n


cdef Py_ssize_t _bad_range(const int64_t* offsets, Py_ssize_t n, int64_t buf_len,
                           int64_t max_size) noexcept nogil:
    """The first i where [offsets[i], offsets[i+1]) is not a range of the buffer (or longer
    than max_size bytes, when max_size >= 0), or -1."""
    cdef Py_ssize_t i
    cdef int64_t a, b
    for i in range(n):
        a = offsets[i]
        b = offsets[i + 1]
        if a < 0 or b < a or b > buf_len or (max_size >= 0 and b - a > max_size):
            return i
    return -1


cdef object _range_offsets(object offsets, Py_ssize_t buf_len, str what, int64_t max_size=-1):
    """offsets (n + 1,) as an int64 ndarray, each [offsets[i], offsets[i+1]) in the buffer."""
    offsets = _int64_array(offsets, -1, what)
    cdef const int64_t[::1] view = offsets
    cdef Py_ssize_t n = view.shape[0] - 1
    cdef Py_ssize_t bad
    if n < 0:
        raise ValueError(f"{what} is empty, expected n + 1 entries")
    with nogil:
        bad = _bad_range(&view[0], n, buf_len, max_size)
    if bad >= 0:
        a = view[bad]
        b = view[bad + 1]
        if 0 <= a <= b <= buf_len:
            raise ValueError(f"{what}: entry {bad} is {b - a} bytes, longer than {max_size}")
        raise ValueError(
            f"{what}: [{a}, {b}) of entry {bad} is not a range of the {buf_len}-byte buffer"
        )
    return offsets


def encode_int_keys(keys):
    """The stored form of int64 keys: 8 bytes big-endian of (key ^ 2**63) as a u64."""
    cdef const int64_t[::1] view = _int64_array(keys, -1, "keys")
    cdef Py_ssize_t i, n = view.shape[0]
    cdef uint8_t key[8]
    cdef list out = [None] * n
    for i in range(n):
        _int_key(key, view[i])
        out[i] = PyBytes_FromStringAndSize(<char*>key, 8)
    return out


def encode_str_keys(buf, offsets):
    """The stored form of string keys: key i is buf[offsets[i] : offsets[i + 1]] (UTF-8).

    Raises ValueError for a key longer than 1024 bytes.
    """
    buffer = _byte_buffer(buf, "buf")
    cdef const uint8_t[::1] data = buffer
    offsets = _range_offsets(offsets, data.shape[0], "offsets", MAX_STR_KEY_SIZE)
    cdef const int64_t[::1] view = offsets
    cdef const char* base = <const char*>_bytes_ptr(data)
    cdef Py_ssize_t i, n = view.shape[0] - 1
    cdef list out = [None] * n
    for i in range(n):
        out[i] = PyBytes_FromStringAndSize(base + view[i], view[i + 1] - view[i])
    return out


cdef void _int_shard_ids(const int64_t* keys, Py_ssize_t n, int32_t shards,
                         int32_t* ids) noexcept nogil:
    """ids[i] = the shard of int64 key i: xxh3_64(its 8-byte stored form) % shards."""
    cdef Py_ssize_t i
    cdef uint8_t key[8]
    for i in range(n):
        _int_key(key, keys[i])
        ids[i] = <int32_t>(XXH3_64bits(key, 8) % <uint64_t>shards)


cdef void _sort_by_shard(const int32_t* ids, Py_ssize_t n, int32_t shards, int32_t* order,
                         int64_t* start) noexcept nogil:
    """A stable counting sort of positions 0..n-1 by ids[i] (each in [0, shards)) into
    ``order``. ``start`` (shards + 1 zeros) ends holding each shard's end in ``order``."""
    cdef Py_ssize_t i
    cdef int32_t s
    for i in range(n):
        start[ids[i] + 1] += 1
    for s in range(shards):
        start[s + 1] += start[s]
    for i in range(n):
        s = ids[i]
        order[start[s]] = <int32_t>i
        start[s] += 1


cdef struct _KeyAt:
    int64_t key
    int32_t at


cdef void _sort_key_runs(const int64_t* keys, int32_t* order, const int64_t* ends,
                         int32_t shards, _KeyAt* pairs, _KeyAt* spare) noexcept nogil:
    """Each shard's run of ``order`` (``_sort_by_shard``'s; ``ends`` its ends) sorted by
    key, ascending: the stored keys' byte order (``_int_key``), which RocksDB's
    MultiGet sorts a batch by first. A sorted batch reads ~12% faster (a 1000-key get
    of the benchmark's table over 8 shards: 539 -> 473 us of MultiGets, in one
    process). ``pairs`` and ``spare`` hold at least as many entries as ``order``."""
    cdef Py_ssize_t i = 0, k
    cdef int32_t s
    for s in range(shards):
        if ends[s] - i > 1:
            for k in range(i, ends[s]):
                pairs[k].key = keys[order[k]]
                pairs[k].at = order[k]
            _merge_sort(pairs + i, spare + i, ends[s] - i)
            for k in range(i, ends[s]):
                order[k] = pairs[k].at
        i = ends[s]


cdef void _merge_sort(_KeyAt* a, _KeyAt* spare, Py_ssize_t n) noexcept nogil:
    """a[:n] sorted by key, stably, in O(n log n) whatever the keys (they come off the
    network): insertion sorts of runs of 16, then merges, bottom up. Not libc's qsort:
    with it (a comparator call a comparison) 1000-key gets were slower, p50 635 against
    605 us, every one of 8 rounds (``loadtests.ab --rows 200000 --batch-sizes 100,1000
    --rounds 8``, alternating)."""
    cdef Py_ssize_t i, j, k, lo, mid, hi, width = 16
    cdef _KeyAt x
    cdef _KeyAt* src = a
    cdef _KeyAt* dst = spare
    cdef _KeyAt* swap
    lo = 0
    while lo < n:
        hi = min(lo + 16, n)
        for i in range(lo + 1, hi):
            x = a[i]
            j = i
            while j > lo and a[j - 1].key > x.key:
                a[j] = a[j - 1]
                j -= 1
            a[j] = x
        lo = hi
    while width < n:
        lo = 0
        while lo < n:
            mid = min(lo + width, n)
            hi = min(lo + 2 * width, n)
            i = lo
            j = mid
            k = lo
            while i < mid and j < hi:
                if src[j].key < src[i].key:
                    dst[k] = src[j]
                    j += 1
                else:
                    dst[k] = src[i]
                    i += 1
                k += 1
            while i < mid:
                dst[k] = src[i]
                i += 1
                k += 1
            while j < hi:
                dst[k] = src[j]
                j += 1
                k += 1
            lo = hi
        swap = src
        src = dst
        dst = swap
        width *= 2
    if src != a:
        memcpy(a, src, n * sizeof(_KeyAt))


def shard_ids_int(keys, n_shards):
    """The shard of each int64 key: xxh3_64(its 8-byte stored form) % n_shards (int32)."""
    cdef int32_t shards = _shard_count(n_shards)
    keys = _int64_array(keys, -1, "keys")
    cdef Py_ssize_t n = cnp.PyArray_DIMS(<cnp.ndarray>keys)[0]
    cdef const int64_t* view = _int64_data(keys)
    out = _empty(n, cnp.NPY_INT32)
    cdef int32_t* ids = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>out)
    if n:
        with nogil:
            _int_shard_ids(view, n, shards, ids)
    return out


def group_int_keys(keys, n_shards):
    """int64 keys grouped by shard, in one pass: (order, groups).

    ``groups``: one (shard, [stored key bytes]) per shard that has keys, in shard order;
    ``order``: the int32 request positions of the keys in that order (the stable sort
    by shard, as ``group_by_shard(shard_ids_int(keys, n), n)`` gives).
    """
    cdef int32_t shards = _shard_count(n_shards)
    keys = _int64_array(keys, -1, "keys")
    cdef const int64_t* view = _int64_data(keys)
    cdef Py_ssize_t i, k, n = cnp.PyArray_DIMS(<cnp.ndarray>keys)[0]
    cdef int32_t s
    order = _empty(n, cnp.NPY_INT32)
    cdef int32_t* out = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>order)
    cdef uint8_t key[8]
    cdef int32_t* ids = <int32_t*>PyMem_Malloc((n + 1) * sizeof(int32_t))
    cdef int64_t* start = <int64_t*>PyMem_Calloc(<size_t>shards + 1, sizeof(int64_t))
    cdef list groups = []
    cdef list group
    try:
        if ids == NULL or start == NULL:
            raise MemoryError()
        if n:
            with nogil:
                _int_shard_ids(view, n, shards, ids)
                _sort_by_shard(ids, n, shards, out, start)
        i = 0  # start[s] is now the end of shard s's run in order
        for s in range(shards):
            if start[s] == i:
                continue
            group = [None] * (start[s] - i)
            for k in range(start[s] - i):
                _int_key(key, view[out[i + k]])
                group[k] = PyBytes_FromStringAndSize(<char*>key, 8)
            groups.append((s, group))
            i = start[s]
    finally:
        PyMem_Free(ids)
        PyMem_Free(start)
    return order, groups


def shard_ids_str(buf, offsets, n_shards):
    """The shard of each string key buf[offsets[i] : offsets[i + 1]]: xxh3_64(UTF-8) % n (int32)."""
    cdef int32_t shards = _shard_count(n_shards)
    buffer = _byte_buffer(buf, "buf")
    cdef const uint8_t[::1] data = buffer
    offsets = _range_offsets(offsets, data.shape[0], "offsets")
    cdef const int64_t[::1] view = offsets
    cdef const uint8_t* base = _bytes_ptr(data)
    cdef Py_ssize_t i, n = view.shape[0] - 1
    out = _empty(n, cnp.NPY_INT32)
    cdef int32_t[::1] ids = out
    with nogil:
        for i in range(n):
            ids[i] = <int32_t>(
                XXH3_64bits(base + view[i], <size_t>(view[i + 1] - view[i])) % <uint64_t>shards
            )
    return out


def xxh3_64(data):
    """XXH3 64-bit hash (seed 0) of a bytes-like object, as an unsigned int."""
    buffer = _byte_buffer(data, "data")
    cdef const uint8_t[::1] view = buffer
    return XXH3_64bits(_bytes_ptr(view), <size_t>view.shape[0])


def join_values(list values):
    """Concatenates byte strings into one bytes object; a None has length -1 (int32 lengths)."""
    cdef Py_ssize_t i, size, n = len(values)
    cdef Py_ssize_t total = 0
    lengths = _empty(n, cnp.NPY_INT32)
    cdef int32_t* lengths_view = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>lengths)
    for i in range(n):
        value = values[i]
        if value is None:
            lengths_view[i] = -1
            continue
        if type(value) is not bytes:
            raise TypeError(f"values[{i}] must be bytes or None, got {type(value).__name__}")
        size = PyBytes_GET_SIZE(value)
        if size > INT32_MAX:
            raise ValueError(f"values[{i}] is {size} bytes, more than an int32 length holds")
        lengths_view[i] = <int32_t>size
        total += size
    block = PyBytes_FromStringAndSize(NULL, total)
    cdef char* out = PyBytes_AS_STRING(block)
    # No Python code runs between the two passes, so values cannot change under us.
    for i in range(n):
        if lengths_view[i] > 0:
            memcpy(out, PyBytes_AS_STRING(values[i]), lengths_view[i])
            out += lengths_view[i]
    return block, lengths


def split_rows(buf, offsets):
    """Slices buf into bytes objects: row i is buf[offsets[i] : offsets[i + 1]]."""
    buffer = _byte_buffer(buf, "buf")
    cdef const uint8_t[::1] data = buffer
    offsets = _range_offsets(offsets, data.shape[0], "offsets")
    cdef const int64_t[::1] view = offsets
    cdef const char* base = <const char*>_bytes_ptr(data)
    cdef Py_ssize_t i, n = view.shape[0] - 1
    cdef list out = [None] * n
    for i in range(n):
        out[i] = PyBytes_FromStringAndSize(base + view[i], view[i + 1] - view[i])
    return out


def group_by_shard(shard_ids, n_shards):
    """A stable counting sort of keys by shard: (order, counts).

    ``order`` (int32) lists the key positions shard by shard, in request order within a
    shard; ``counts`` (a list of n_shards ints) says how many keys each shard got. It is
    ``argsort(shard_ids, kind="stable")`` and ``bincount`` in one pass, without NumPy's
    per-call overhead, which dominated small batches.
    """
    cdef int32_t shards = _shard_count(n_shards)
    if not isinstance(shard_ids, np.ndarray) or shard_ids.dtype != _INT32:
        got = type(shard_ids).__name__
        if isinstance(shard_ids, np.ndarray):
            got += f" of {shard_ids.dtype}"
        raise TypeError(f"shard_ids must be an int32 ndarray, got {got}")
    ids_array = np.ascontiguousarray(shard_ids)
    cdef const int32_t[::1] ids = ids_array
    cdef Py_ssize_t i, n = ids.shape[0]
    cdef int32_t s
    order = _empty(n, cnp.NPY_INT32)
    cdef int32_t[::1] out = order
    cdef Py_ssize_t bad = -1
    cdef int64_t* start = <int64_t*>PyMem_Calloc(shards + 1, sizeof(int64_t))
    if start == NULL:
        raise MemoryError()
    try:
        with nogil:
            for i in range(n):
                s = ids[i]
                if s < 0 or s >= shards:
                    bad = i
                    break
            if bad < 0 and n:
                _sort_by_shard(&ids[0], n, shards, &out[0], start)
        if bad >= 0:
            raise ValueError(f"shard_ids[{bad}] is {ids[bad]}, not in [0, {shards})")
        # start[s] is now the end of shard s: counts are the differences.
        counts = [start[0]] + [start[s] - start[s - 1] for s in range(1, shards)]
    finally:
        PyMem_Free(start)
    return order, counts


def response_layout(Py_ssize_t n, list parts):
    """Where each of n requested keys' row is in the joined response blocks.

    ``parts``: one (lengths, order, positions, values_size) per node response, in the
    order their blocks are joined: ``lengths`` the response's int32 little-endian row
    lengths (-1 = missing) as bytes, ``order`` its int32 little-endian permutation
    (empty: rows in the order sent), ``positions`` the request positions of the keys
    sent to that node (an int64 array, or None when that node got all n keys in order),
    ``values_size`` the bytes of its values block. Returns (starts, lengths), both int64
    of length n: a row's offset in the joined block and its length (-1 = missing).

    A response that does not fit its request raises ValueError naming the part: too
    many or too few rows, an order that is not a permutation, a position answered
    twice, or lengths that do not add up to the values block.
    """
    starts = _zeros(n, cnp.NPY_INT64)
    lengths = _empty(n, cnp.NPY_INT64)
    seen_array = _zeros(n, cnp.NPY_UINT8)
    cdef int64_t* st = _int64_data(starts)
    cdef int64_t* ln = _int64_data(lengths)
    cdef uint8_t* seen = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>seen_array)
    cdef int64_t base = 0
    cdef int64_t part_bytes, size
    cdef Py_ssize_t i, m, j, at, order_size
    for i in range(n):
        ln[i] = -1
    cdef int32_t length
    cdef bytes lens_bytes, order_bytes
    cdef const uint8_t* lens
    cdef const uint8_t* order
    cdef const int64_t* pos
    for k, part in enumerate(parts):
        part_lengths, part_order, positions, values_size = part
        size = values_size
        lens_bytes = _as_bytes(part_lengths, "lengths")
        order_bytes = _as_bytes(part_order, "order")
        m = PyBytes_GET_SIZE(lens_bytes) // 4
        if PyBytes_GET_SIZE(lens_bytes) != 4 * m:
            raise ValueError(f"part {k}: lengths is {len(lens_bytes)} bytes, not int32s")
        order_size = PyBytes_GET_SIZE(order_bytes)
        if order_size not in (0, 4 * m):
            raise ValueError(f"part {k}: order has {order_size // 4} entries, expected {m}")
        pos = NULL
        if positions is not None:
            positions = _int64_array(positions, m, f"part {k}: positions")
            pos = _int64_data(positions)
        elif m != n:
            raise ValueError(f"part {k}: {m} rows for {n} keys")
        lens = <const uint8_t*>PyBytes_AS_STRING(lens_bytes)
        order = <const uint8_t*>PyBytes_AS_STRING(order_bytes) if order_size else NULL
        part_bytes = 0
        for i in range(m):
            j = <int32_t>load_u32(order + 4 * i) if order != NULL else i
            if j < 0 or j >= m:
                raise ValueError(f"part {k}: order[{i}] is {j}, not in [0, {m})")
            at = pos[j] if pos != NULL else j
            if at < 0 or at >= n:
                raise ValueError(f"part {k}: position {at} is not in [0, {n})")
            if seen[at]:
                raise ValueError(f"part {k}: key position {at} is answered twice")
            seen[at] = 1
            length = <int32_t>load_u32(lens + 4 * i)
            st[at] = base + part_bytes
            ln[at] = length
            if length > 0:
                part_bytes += length
        if part_bytes != size:
            raise ValueError(
                f"part {k}: its row lengths add up to {part_bytes} bytes, its values block "
                f"holds {size}"
            )
        base += part_bytes
    return starts, lengths
