# The node's hot-row cache (kvstore/server/hot_rows.py owns the policy): the answer a
# read gave for a key of a table version, kept so that the next read of the key skips
# RocksDB, the overlay and every Python object per row (HotRows: entries, LRU, the
# filters that keep a miss cheap). Included by codec.pyx.

cimport cython
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from libc.string cimport memcmp
from collections import OrderedDict

#: Bytes an entry costs besides its key's and its row's bytes (the OrderedDict's slot
#: and link, the entry object, the two bytes objects' headers). Measured with
#: tracemalloc: 100k entries of 16-byte keys (prefix + int64) took 210 B each besides
#: the rows, whose bytes objects (33 B of header each) they keep alive: 227 B.
HOT_ENTRY_BYTES = 224

cdef Py_ssize_t _ENTRY_BYTES = HOT_ENTRY_BYTES

#: The cache is cold (``HotRows.cold``) while fewer than 1 in HOT_COLD_RATIO of the
#: last HOT_WINDOW_KEYS keys looked up were cached. The break-even, measured A/B: a miss
#: adds ~2 µs of CPU to a 1-key get, a hit takes ~25 µs off it.
HOT_COLD_RATIO = 16
HOT_WINDOW_KEYS = 4096


@cython.freelist(64)
@cython.no_gc
cdef class _HotEntry:
    """One cached answer: the row (None = missing) and the µs between which it holds.
    Not tracked by the GC: it refers to bytes or None only, so it is in no cycle, and
    a full cache would otherwise make every full collection walk its entries."""
    cdef object row
    cdef int64_t valid_from
    cdef int64_t valid_until
    cdef Py_ssize_t size
    cdef uint64_t hash


#: Keys and prefixes longer than this are hashed as "maybe cached" (bytes).
cdef enum:
    _HASHED_BYTES = 8 + MAX_STR_KEY_SIZE


cdef inline uint64_t _hot_hash(const char* prefix, Py_ssize_t prefix_len,
                               const char* key, Py_ssize_t key_len) noexcept nogil:
    """xxh3 of prefix + key; 0 (no filter) when they are longer than _HASHED_BYTES."""
    cdef char buf[_HASHED_BYTES]
    if prefix_len + key_len > _HASHED_BYTES:
        return 0
    memcpy(buf, prefix, prefix_len)
    memcpy(buf + prefix_len, key, key_len)
    return XXH3_64bits(buf, <size_t>(prefix_len + key_len)) | 1


cdef inline bytes _hot_key(const char* prefix, Py_ssize_t prefix_len,
                           const char* key, Py_ssize_t key_len):
    out = PyBytes_FromStringAndSize(NULL, prefix_len + key_len)
    cdef char* p = PyBytes_AS_STRING(out)
    memcpy(p, prefix, prefix_len)
    memcpy(p + prefix_len, key, key_len)
    return out


cdef class HotRows:
    """Answers of reads by (prefix, stored key), least recently used first out, at most
    ``capacity`` bytes (keys, rows and ``HOT_ENTRY_BYTES`` each). A prefix stands for one
    table version as the node holds it (``kvstore.server.hot_rows``).

    Two arrays of the keys' xxh3 keep a miss cheap, since with keys drawn from a table
    larger than the cache most lookups miss (measured: a miss cost ~0.7 µs of CPU a key
    when it made a key object, probed the dict and cached the answer):

    * ``present``: a count of cached entries per hash bucket; a key whose bucket is 0
      is not cached, and is known to be without a Python object;
    * the doorkeeper (after TinyLFU's): once the cache is full,
      ``store_groups(admit=True)`` caches a key only the second time it misses within a
      window of about 2 entries per bucket; the first time it sets the key's bit. A key
      read once (most keys, when they are drawn uniformly from a large table) then
      evicts nothing.
    """
    cdef readonly Py_ssize_t capacity
    cdef readonly Py_ssize_t used
    cdef readonly long long hits
    cdef readonly long long misses
    cdef readonly long long evictions
    cdef readonly long long discarded
    cdef readonly long long refused
    cdef object _entries
    cdef object _move_to_end
    cdef object _popitem
    #: True while fewer than 1 in HOT_COLD_RATIO keys looked up were cached (over the
    #: last HOT_WINDOW_KEYS): reads then go past the cache but for 1 in 16 (``use``).
    cdef readonly bint cold
    cdef Py_ssize_t _window_keys
    cdef Py_ssize_t _window_hits
    cdef Py_ssize_t _passed
    cdef uint8_t* _present
    cdef uint8_t* _door
    cdef uint64_t _mask
    cdef Py_ssize_t _door_sets
    cdef Py_ssize_t _door_limit
    #: Table name (str) → HotTable, for the fast read path.
    cdef readonly dict published

    def __cinit__(self, Py_ssize_t capacity):
        if capacity <= 0:
            raise ValueError(f"capacity is {capacity} bytes, expected > 0")
        # About 4 buckets per entry of a small row, 4 Ki to 16 Mi buckets (1 byte each,
        # and as many doorkeeper bits).
        cdef uint64_t buckets = 4096
        while buckets < <uint64_t>(4 * capacity // (_ENTRY_BYTES + 64)) and buckets < (1 << 24):
            buckets <<= 1
        self._mask = buckets - 1
        self._present = <uint8_t*>PyMem_Calloc(buckets, 1)
        self._door = <uint8_t*>PyMem_Calloc(buckets // 8 + 1, 1)
        if self._present == NULL or self._door == NULL:
            raise MemoryError()
        self._door_limit = <Py_ssize_t>(buckets // 2)

    def __dealloc__(self):
        PyMem_Free(self._present)
        PyMem_Free(self._door)

    def __init__(self, Py_ssize_t capacity):
        """``capacity``: bytes (> 0)."""
        self.capacity = capacity
        self._entries = OrderedDict()
        self._move_to_end = self._entries.move_to_end
        self._popitem = self._entries.popitem
        self.published = {}

    def __len__(self):
        return len(self._entries)

    def use(self):
        """Whether a read should go through the cache: always while it is not ``cold``,
        else one read in 16, which keeps admitting keys and measuring the hit rate.
        (When keys are spread over a table much larger than the cache, nearly every
        lookup misses, and a miss's bookkeeping is pure cost.)"""
        if not self.cold:
            return True
        self._passed += 1
        return (self._passed & 15) == 0

    cdef inline void _tally(self, Py_ssize_t keys, Py_ssize_t hits) noexcept:
        self.hits += hits
        self.misses += keys - hits
        self._window_keys += keys
        self._window_hits += hits
        # A cold cache sees 1 read in 16: its window is 16 times shorter, so it notices
        # as soon as a warm one would that its keys have begun to hit.
        if self._window_keys >= (HOT_WINDOW_KEYS // 16 if self.cold else HOT_WINDOW_KEYS):
            self.cold = self._window_hits * HOT_COLD_RATIO < self._window_keys
            self._window_keys = 0
            self._window_hits = 0

    cdef inline bint _maybe(self, uint64_t h) noexcept:
        return h == 0 or self._present[h & self._mask] != 0

    cdef inline void _count(self, uint64_t h, int step) noexcept:
        if h == 0:
            return
        cdef uint8_t* c = &self._present[h & self._mask]
        if c[0] == 255:
            return  # saturated: stays "maybe" for good
        c[0] += step

    cdef inline bint _admit(self, uint64_t h) noexcept:
        """The doorkeeper: True the second time within a window it sees h."""
        cdef uint64_t bit = (h >> 20) & self._mask
        if self._door[bit >> 3] & (1 << (bit & 7)):
            return True
        self._door[bit >> 3] |= 1 << (bit & 7)
        self._door_sets += 1
        if self._door_sets >= self._door_limit:
            memset(self._door, 0, (self._mask + 1) // 8 + 1)
            self._door_sets = 0
        return False

    cdef inline object _get(self, const char* prefix, Py_ssize_t lp, const char* key,
                            Py_ssize_t lk, int64_t now_us):
        """The entry of prefix + key if cached and holding at now_us (marked recently
        used), else None; an entry that no longer holds is dropped."""
        if not self._maybe(_hot_hash(prefix, lp, key, lk)):
            return None
        full = _hot_key(prefix, lp, key, lk)
        cdef PyObject* found = PyDict_GetItem(self._entries, full)
        if found == NULL:
            return None
        cdef _HotEntry e = <_HotEntry>found
        if e.valid_from <= now_us <= e.valid_until:
            self._move_to_end(full)
            return e
        self._drop(full, e)
        return None

    cdef inline int _drop(self, bytes full, _HotEntry e) except -1:
        del self._entries[full]
        self.used -= e.size
        self._count(e.hash, -1)
        return 0

    def lookup_groups(self, bytes prefix not None, list groups not None, int64_t now_us):
        """A read's keys by shard, ``groups`` of (shard, keys), looked up at once:
        (rows, missed, positions). ``rows``: every key's cached row in group order (None
        where missing or not cached); ``missed``: (shard, keys not cached) of each group
        with any; ``positions``: where in ``rows`` each of those keys goes, in order."""
        cdef const char* p = PyBytes_AS_STRING(prefix)
        cdef Py_ssize_t lp = PyBytes_GET_SIZE(prefix)
        cdef list rows = []
        cdef list missed = []
        cdef list positions = []
        cdef list keys, miss_keys
        cdef bytes key
        cdef Py_ssize_t i, n, at = 0
        for group in groups:
            keys = <list?>group[1]
            n = len(keys)
            miss_keys = None
            for i in range(n):
                key = <bytes?>keys[i]
                e = self._get(p, lp, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), now_us)
                if e is None:
                    rows.append(None)
                    positions.append(at + i)
                    if miss_keys is None:
                        miss_keys = []
                    miss_keys.append(key)
                else:
                    rows.append((<_HotEntry>e).row)
            if miss_keys is not None:
                # A whole group missing (the common case of a miss) keeps its own list.
                missed.append((group[0], keys if len(miss_keys) == n else miss_keys))
            at += n
        self._tally(at, at - len(positions))
        return rows, missed, positions

    def store_groups(self, bytes prefix not None, list missed not None, list answers not None,
                     valid_us, list rows not None, list positions not None, bint admit=False):
        """``lookup_groups``' misses answered: ``answers[j]`` (a row or None; flat, in
        ``missed`` order) put in ``rows[positions[j]]`` and cached for its key between
        ``valid_us[2j]`` and ``valid_us[2j + 1]`` (µs, as ``overlay`` gives them).
        ``admit``: when an entry would have to go for it, only keys the doorkeeper has
        seen miss before. Least recently used entries go to make room; a row larger
        than the whole cache is not kept."""
        cdef Py_ssize_t j = 0, n
        valid_us = _int64_array(valid_us, 2 * len(answers), "valid_us")
        if len(answers) != len(positions):
            raise ValueError(f"{len(answers)} answers for {len(positions)} positions")
        for group in missed:
            keys = <list?>group[1]
            n = len(keys)
            if j + n > len(answers):
                raise ValueError("more missed keys than answers")
            self._store(prefix, keys, answers, j, valid_us, rows, positions, admit)
            j += n
        if j != len(answers):
            raise ValueError("fewer missed keys than answers")

    cdef int _store(self, bytes prefix, list keys, list answers, Py_ssize_t first,
                    valid_us, list rows, list positions, bint admit) except -1:
        """Caches keys[j] → answers[first + j]; valid_us (checked by the caller) holds
        its window at 2 (first + j)."""
        cdef Py_ssize_t j, n = len(keys)
        cdef const int64_t* valid = _int64_data(valid_us) + 2 * first
        cdef const char* p = PyBytes_AS_STRING(prefix)
        cdef Py_ssize_t lp = PyBytes_GET_SIZE(prefix)
        cdef bytes key, full
        cdef _HotEntry e
        cdef PyObject* old
        cdef uint64_t h
        cdef Py_ssize_t size
        for j in range(n):
            row = answers[first + j]
            rows[<Py_ssize_t>positions[first + j]] = row
            if row is not None and type(row) is not bytes:
                raise TypeError(f"answers[{first + j}] must be bytes or None")
            key = <bytes?>keys[j]
            h = _hot_hash(p, lp, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
            size = lp + PyBytes_GET_SIZE(key) + _ENTRY_BYTES
            if row is not None:
                size += PyBytes_GET_SIZE(row)
            if size > self.capacity:
                continue
            # While there is room, every key is cached; once an entry must go for it, only
            # a key the doorkeeper has seen miss before.
            if admit and self.used + size > self.capacity and not self._admit(h):
                self.refused += 1
                continue
            full = _hot_key(p, lp, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
            e = _HotEntry.__new__(_HotEntry)
            e.row = row
            e.valid_from = valid[2 * j]
            e.valid_until = valid[2 * j + 1]
            e.hash = h
            e.size = size
            old = PyDict_GetItem(self._entries, full)
            if old != NULL:
                self._drop(full, <_HotEntry>old)
            self._entries[full] = e
            self.used += e.size
            self._count(h, 1)
            while self.used > self.capacity:
                gone_key, gone = self._popitem(False)
                self.used -= (<_HotEntry>gone).size
                self._count((<_HotEntry>gone).hash, -1)
                self.evictions += 1
        return 0

    def discard(self, list prefixes not None, puts, deletes):
        """Forgets the keys of a delta write under every prefix in ``prefixes``:
        ``puts`` (key, row) pairs and ``deletes`` keys, as ``Shard.write`` takes them."""
        if not self._entries:
            return
        cdef bytes prefix
        for prefix in prefixes:
            for item in puts:
                self._discard_one(prefix, <bytes?>item[0])
            for key in deletes:
                self._discard_one(prefix, <bytes?>key)

    cdef int _discard_one(self, bytes prefix, bytes key) except -1:
        cdef const char* p = PyBytes_AS_STRING(prefix)
        cdef Py_ssize_t lp = PyBytes_GET_SIZE(prefix)
        cdef const char* k = PyBytes_AS_STRING(key)
        cdef Py_ssize_t lk = PyBytes_GET_SIZE(key)
        if not self._maybe(_hot_hash(p, lp, k, lk)):
            return 0
        full = _hot_key(p, lp, k, lk)
        cdef PyObject* found = PyDict_GetItem(self._entries, full)
        if found != NULL:
            self._drop(full, <_HotEntry>found)
            self.discarded += 1
        return 0

    def discard_prefixes(self, prefixes):
        """Forgets every entry under the given prefixes (a set of bytes): a dropped table."""
        cdef Py_ssize_t lp
        gone = []
        for full in self._entries:
            for prefix in prefixes:
                lp = PyBytes_GET_SIZE(prefix)
                if PyBytes_GET_SIZE(full) >= lp and memcmp(
                    PyBytes_AS_STRING(full), PyBytes_AS_STRING(prefix), lp
                ) == 0:
                    gone.append(full)
                    break
        for full in gone:
            self._drop(full, <_HotEntry>self._entries[full])
        self.discarded += len(gone)

    def answer_frame(self, body, uint32_t request_id, dict tables not None,
                     Py_ssize_t offset=0):
        """The fast read path's response frame to the GetRequest ``body[offset:]`` when
        all its keys are cached, else None (``_answer_frame``, ext/fast_answers.pxi)."""
        return _answer_frame(self, body, request_id, tables, offset)
