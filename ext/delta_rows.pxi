# A delta shard's rows in memory: an open-addressing hash table of stored key -> stored
# value (kvstore.storage.delta_memory); included by codec.pyx.
#
# Why not a dict: py-spy put a dict's lookups at 14% of a 100-key read of base+delta
# rows (loadtests.tiers, in-process), most of it cache misses on the stored key objects
# that each hit compares. Here an 8-byte key (every int64 key) lives in its slot: a hit
# is the slot's hash and 8 bytes, with no key object at all; other keys keep their bytes
# object and are compared only on a full 64-bit hash match. The slots of a whole batch
# are asked for (prefetched) before any is probed.

import os

from cpython.ref cimport Py_DECREF
from libc.string cimport memcmp

cdef struct DeltaSlot:
    uint64_t hash
    uint64_t head       # an 8-byte key's bytes (key NULL); 0 otherwise
    PyObject* key       # NULL: the 8 bytes in head are the key
    PyObject* value     # NULL: an empty slot

cdef enum:
    DELTA_ROWS_MIN_SLOTS = 16


# The slots' hash is seeded per process: a shard's keys all share the low bits of their
# unseeded XXH3 (the shard is XXH3 % shards), which would crowd them into a fraction of
# the slots, and a seed keeps chosen keys from building long probe runs on purpose.
cdef uint64_t _delta_seed = int.from_bytes(os.urandom(8), "little")


cdef inline uint64_t _delta_hash(const char* p, Py_ssize_t n) noexcept nogil:
    return XXH3_64bits_withSeed(p, <size_t>n, _delta_seed)


cdef inline uint64_t _key_head(const char* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


cdef class DeltaRows:
    """Stored key (bytes) -> stored value (bytes) of one delta shard, as a dict would map
    them; ``get_many`` answers a batch as a MultiGet does."""

    cdef DeltaSlot* slots
    cdef Py_ssize_t mask    # slots - 1 (a power of two)
    cdef Py_ssize_t count

    def __cinit__(self):
        self.slots = <DeltaSlot*>PyMem_Calloc(DELTA_ROWS_MIN_SLOTS, sizeof(DeltaSlot))
        if self.slots == NULL:
            raise MemoryError()
        self.mask = DELTA_ROWS_MIN_SLOTS - 1
        self.count = 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.slots == NULL:
            return
        for i in range(self.mask + 1):
            if self.slots[i].value != NULL:
                Py_XDECREF(self.slots[i].key)
                Py_DECREF(<object>self.slots[i].value)
        PyMem_Free(self.slots)

    def __len__(self):
        return self.count

    cdef inline Py_ssize_t _find(self, uint64_t h, const char* p, Py_ssize_t n) noexcept:
        """The slot of key p[:n] with hash h, or the empty slot where it would go."""
        cdef Py_ssize_t i = <Py_ssize_t>(h & <uint64_t>self.mask)
        cdef DeltaSlot* s
        cdef uint64_t head = _key_head(p) if n == 8 else 0
        while True:
            s = &self.slots[i]
            if s.value == NULL:
                return i
            if s.hash == h:
                if s.key == NULL:
                    if n == 8 and s.head == head:
                        return i
                elif (PyBytes_GET_SIZE(<object>s.key) == n
                      and memcmp(PyBytes_AS_STRING(<object>s.key), p, n) == 0):
                    return i
            i = (i + 1) & self.mask

    cdef int _grow(self) except -1:
        cdef Py_ssize_t old_size = self.mask + 1, size = 2 * old_size, i, j
        cdef DeltaSlot* old = self.slots
        cdef DeltaSlot* new = <DeltaSlot*>PyMem_Calloc(size, sizeof(DeltaSlot))
        if new == NULL:
            raise MemoryError()
        for i in range(old_size):
            if old[i].value != NULL:
                j = <Py_ssize_t>(old[i].hash & <uint64_t>(size - 1))
                while new[j].value != NULL:
                    j = (j + 1) & (size - 1)
                new[j] = old[i]
        self.slots = new
        self.mask = size - 1
        PyMem_Free(old)
        return 0

    cdef object _set(self, object key, object value):
        """Maps key to value; the value it replaces, or None."""
        if type(key) is not bytes or type(value) is not bytes:
            raise TypeError("delta rows map bytes keys to bytes values")
        cdef const char* p = PyBytes_AS_STRING(key)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
        cdef uint64_t h = _delta_hash(p, n)
        if 2 * (self.count + 1) > self.mask + 1:  # at most half full: short probes
            self._grow()  # first: a grow that fails (MemoryError) changes nothing
        cdef Py_ssize_t i = self._find(h, p, n)
        cdef DeltaSlot* s = &self.slots[i]
        if s.value != NULL:
            old = <object>s.value
            Py_DECREF(old)  # the table's reference; ``old`` holds one
            Py_INCREF(value)
            s.value = <PyObject*>value
            return old
        Py_INCREF(value)
        s.value = <PyObject*>value
        s.hash = h
        if n == 8:
            s.head = _key_head(p)
            s.key = NULL
        else:
            s.head = 0
            Py_INCREF(key)
            s.key = <PyObject*>key
        self.count += 1
        return None

    cdef object _pop(self, object key):
        """Removes key; its value, or None. Later slots of the run move back (no
        tombstones), so probes stay as short as the table's load."""
        if type(key) is not bytes:
            raise TypeError("delta rows map bytes keys to bytes values")
        cdef const char* p = PyBytes_AS_STRING(key)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
        cdef Py_ssize_t i = self._find(_delta_hash(p, n), p, n), j, home
        cdef DeltaSlot* s = &self.slots[i]
        if s.value == NULL:
            return None
        old = <object>s.value
        Py_DECREF(old)
        Py_XDECREF(s.key)
        self.count -= 1
        j = i
        while True:
            j = (j + 1) & self.mask
            if self.slots[j].value == NULL:
                break
            home = <Py_ssize_t>(self.slots[j].hash & <uint64_t>self.mask)
            # Slot j may move to the hole i unless its home lies cyclically in (i, j].
            if (j > i and (home <= i or home > j)) or (j < i and (home <= i and home > j)):
                self.slots[i] = self.slots[j]
                i = j
        memset(&self.slots[i], 0, sizeof(DeltaSlot))
        return old

    def get(self, bytes key not None):
        """The value of ``key``, or None."""
        cdef const char* p = PyBytes_AS_STRING(key)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
        cdef DeltaSlot* s = &self.slots[self._find(_delta_hash(p, n), p, n)]
        return None if s.value == NULL else <object>s.value

    def get_many(self, list keys not None):
        """The values of ``keys`` (bytes), None where absent: a MultiGet's answer."""
        cdef Py_ssize_t i, n = len(keys)
        cdef PyObject* value
        # One allocation: n hashes, then n found values (NULL: absent).
        cdef uint64_t* hashes = <uint64_t*>PyMem_Malloc((2 * n + 1) * sizeof(uint64_t))
        if hashes == NULL:
            raise MemoryError()
        cdef PyObject** found = <PyObject**>(hashes + n)
        cdef list out = [None] * n
        try:
            for i in range(n):
                key = keys[i]
                if type(key) is not bytes:
                    raise TypeError(f"key {i} must be bytes, got {type(key).__name__}")
                hashes[i] = _delta_hash(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
                # Every slot asked for first: the misses overlap instead of queueing.
                __builtin_prefetch(&self.slots[hashes[i] & <uint64_t>self.mask])
            for i in range(n):
                key = keys[i]
                value = self.slots[
                    self._find(hashes[i], PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
                ].value
                found[i] = value
                if value != NULL:
                    __builtin_prefetch(value)  # its reference count, written below
            for i in range(n):
                if found[i] != NULL:
                    out[i] = <object>found[i]
        finally:
            PyMem_Free(hashes)
        return out

    def apply(self, list puts not None, deletes, Py_ssize_t overhead):
        """Puts (key, value) pairs in order, then removes ``deletes`` (as a WriteBatch).
        Returns the change in counted bytes: values' lengths plus ``overhead`` a key."""
        cdef Py_ssize_t change = 0
        for pair in puts:
            key, value = pair
            old = self._set(key, value)
            if old is None:
                change += PyBytes_GET_SIZE(value) + overhead
            else:
                change += PyBytes_GET_SIZE(value) - PyBytes_GET_SIZE(old)
        for key in deletes:
            old = self._pop(key)
            if old is not None:
                change -= PyBytes_GET_SIZE(old) + overhead
        return change

    def values(self):
        """Every stored value (no order)."""
        cdef Py_ssize_t i
        return [<object>self.slots[i].value for i in range(self.mask + 1)
                if self.slots[i].value != NULL]

    def items(self):
        """Every (key, value) pair (no order)."""
        cdef Py_ssize_t i
        cdef DeltaSlot* s
        out = []
        for i in range(self.mask + 1):
            s = &self.slots[i]
            if s.value == NULL:
                continue
            if s.key == NULL:
                key = PyBytes_FromStringAndSize(<const char*>&s.head, 8)
            else:
                key = <object>s.key
            out.append((key, <object>s.value))
        return out
