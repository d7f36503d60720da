# The client's end of the fast read path in C: a get's GetRequest written after its
# plan's serialized prefix (get_request), and an answer's GetResponse read and its rows
# decoded (decode_answer), without a protobuf object. Included by codec.pyx, after
# fast_answers.pxi (its varint helpers).

from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBUF_WRITE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.errno cimport EAGAIN, EINTR, errno


cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    int MSG_DONTWAIT


cdef extern from "<errno.h>" nogil:
    int EWOULDBLOCK


cdef extern from "Python.h":
    char* PyByteArray_AS_STRING(object)
    Py_ssize_t PyByteArray_GET_SIZE(object)


cdef class AnswerReader:
    """The receiving half of an AsyncClient connection (``kvstore/client/aio_fast.py``
    ``_Pipeline``, an asyncio BufferedProtocol built on it): the loop reads into
    ``buffer``; ``buffer_updated`` splits the response frames out of it and hands
    each answer, (status, a copy of its body), to the future waiting on its request
    id in ``waiting`` (request id -> (future, deadline, timeout); an answer nobody
    waits on is dropped). A frame is ``kvstore.wire.frames.RESPONSE_HEADER`` (u32 body
    length, u32 request id, u8 status) and the body. In C: get_buffer and
    buffer_updated run on every read of the loop; in Python they cost ~0.7 µs a 1-key
    answer, here ~0.14 µs (timeit)."""

    #: The receive buffer (a bytearray) and a memoryview of it, which the loop reads into.
    cdef public object buffer
    cdef public object view
    #: ``buffer[start:have]``: received, not handed out yet (the start of an answer).
    cdef public Py_ssize_t start
    cdef public Py_ssize_t have
    #: Bytes of the answer at ``start`` once whole (0: not known yet).
    cdef public Py_ssize_t need
    cdef public dict waiting
    #: Sizes, bytes: a new buffer's, the least room a read gets (less, and the unread
    #: bytes move to the front), the largest kept once its answer is read.
    cdef readonly Py_ssize_t receive_buffer, min_read, largest_idle

    def __init__(self, Py_ssize_t receive_buffer, Py_ssize_t min_read,
                 Py_ssize_t largest_idle):
        self.receive_buffer = receive_buffer
        self.min_read = min_read
        self.largest_idle = largest_idle
        self.buffer = bytearray(receive_buffer)
        self.view = memoryview(self.buffer)
        self.start = self.have = self.need = 0
        self.waiting = {}

    def get_buffer(self, Py_ssize_t sizehint):
        if not self.have:  # all handed out (most reads): the whole buffer, no new view
            return self.view
        if PyByteArray_GET_SIZE(self.buffer) - self.have < self.min_read:
            self.compact(self.need)
        return self.view[self.have:]

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef Py_ssize_t have = self.have + nbytes
        cdef Py_ssize_t pos = self.start, stop
        cdef object buffer = self.buffer  # held: the pointer below stays valid
        cdef const uint8_t* p = <const uint8_t*>PyByteArray_AS_STRING(buffer)
        cdef dict waiting = self.waiting
        cdef uint32_t length, request_id
        cdef uint8_t status
        self.have = have
        self.need = 0
        while have - pos >= 9:
            memcpy(&length, p + pos, 4)  # little-endian host (checked at import)
            memcpy(&request_id, p + pos + 4, 4)
            status = p[pos + 8]
            stop = pos + 9 + <Py_ssize_t>length
            if stop > have:
                self.need = stop - pos
                break
            call = waiting.pop(request_id, None)
            if call is not None:
                future = (<tuple>call)[0]
                if not future.done():
                    # The status and a copy of the body: the caller reads it as Client
                    # does (Operations.finish_frame, in C), or with protobuf.
                    future.set_result(
                        (status, PyBytes_FromStringAndSize(<const char*>p + pos + 9, length))
                    )
            pos = stop
        if pos == have:  # everything handed out: read into the buffer from its start
            self.start = self.have = self.need = 0
            if PyByteArray_GET_SIZE(buffer) > self.largest_idle:  # not kept
                self.compact(0)
        else:
            self.start = pos

    cpdef compact(self, Py_ssize_t need):
        """Move the unread bytes to the front, into a new buffer if the answer they
        begin (``need`` bytes whole) does not fit this one with min_read to spare."""
        cdef Py_ssize_t rest = self.have - self.start
        cdef Py_ssize_t size = PyByteArray_GET_SIZE(self.buffer)
        if need + self.min_read > size or size > self.largest_idle >= need + self.min_read:
            # a new bytearray: one with a memoryview of it cannot change size
            buffer = bytearray(max(need + self.min_read, self.receive_buffer))
            memcpy(PyByteArray_AS_STRING(buffer),
                   PyByteArray_AS_STRING(self.buffer) + self.start, rest)
            self.buffer, self.view = buffer, memoryview(buffer)
        elif rest:
            memmove(PyByteArray_AS_STRING(self.buffer),
                    PyByteArray_AS_STRING(self.buffer) + self.start, rest)
        self.start, self.have = 0, rest


def take_answer(int fd, buffer, uint32_t request_id):
    """One read of what the socket ``fd`` holds now, without waiting, into ``buffer``
    (writable, from its start): the fast-path answer to ``request_id`` as (status, a
    copy of its body) when the read is that one whole response frame and nothing else;
    else the bytes read (0: the node closed the connection; -1: nothing there yet).
    OSError for a failed read. (AsyncClient's look for a small get's answer: the same
    read as Python's ``recv_into``, without an exception when nothing is there.)"""
    cdef Py_buffer view
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
    cdef ssize_t got = recv(fd, view.buf, <size_t>view.len, MSG_DONTWAIT)
    cdef int err = errno
    cdef const uint8_t* p = <const uint8_t*>view.buf
    cdef uint32_t length, answered
    try:
        if got < 0:
            if err == EAGAIN or err == EWOULDBLOCK or err == EINTR:
                return -1
            raise OSError(err, os.strerror(err))
        if got >= 9:
            memcpy(&length, p, 4)  # little-endian host (checked at import)
            memcpy(&answered, p + 4, 4)
            if answered == request_id and got == 9 + <ssize_t>length:
                return p[8], PyBytes_FromStringAndSize(<const char*>p + 9, length)
        return got
    finally:
        PyBuffer_Release(&view)


def unfilled_bytes(Py_ssize_t size):
    """(a new bytes object of ``size`` bytes, not yet filled; a writable memoryview of
    them): a large answer's body received straight into the bytes the decode reads,
    without a zeroed bytearray and its copy to bytes (400 KB each for 1000 rows of the
    benchmark's table). The view does not keep the bytes alive; fill it before the
    bytes is handed on (bytes are immutable once shared), and drop it after."""
    if size < 0:
        raise ValueError(f"a size of {size} bytes")
    out = PyBytes_FromStringAndSize(NULL, size)
    return out, PyMemoryView_FromMemory(PyBytes_AS_STRING(out), size, PyBUF_WRITE)


def get_request(bytes prefix not None, keys, uint64_t version):
    """The serialized GetRequest of int64 ``keys`` (a non-empty int64 array) at
    ``version``: ``prefix`` (a serialized GetRequest of the table and features) followed
    by what protobuf would write for ``keys=Keys(count, int64_le)`` and ``version`` (left
    out when 0); protobuf merges concatenated messages."""
    keys = _int64_array(keys, -1, "keys")
    cdef Py_ssize_t n = cnp.PyArray_DIMS(<cnp.ndarray>keys)[0]
    if n == 0:
        raise ValueError("get_request needs at least one key")
    cdef uint8_t head[32]
    cdef uint8_t inner[24]
    cdef Py_ssize_t h = 0, k = 0
    inner[k] = (1 << 3)  # Keys.count
    k += 1
    k += _put_varint(inner + k, <uint64_t>n)
    inner[k] = (2 << 3) | 2  # Keys.int64_le
    k += 1
    k += _put_varint(inner + k, <uint64_t>(8 * n))
    head[h] = (2 << 3) | 2  # GetRequest.keys
    h += 1
    h += _put_varint(head + h, <uint64_t>(k + 8 * n))
    cdef uint8_t tail[12]
    cdef Py_ssize_t t = 0
    if version:
        tail[t] = (4 << 3)  # GetRequest.version
        t += 1
        t += _put_varint(tail + t, version)
    cdef Py_ssize_t lp = PyBytes_GET_SIZE(prefix)
    out = PyBytes_FromStringAndSize(NULL, lp + h + k + 8 * n + t)
    cdef uint8_t* o = <uint8_t*>PyBytes_AS_STRING(out)
    memcpy(o, PyBytes_AS_STRING(prefix), lp)
    o += lp
    memcpy(o, head, h)
    o += h
    memcpy(o, inner, k)
    o += k
    memcpy(o, _int64_data(keys), 8 * n)  # little-endian host (checked at import)
    o += 8 * n
    memcpy(o, tail, t)
    return out


def decode_answer(Projection projection not None, body, Py_ssize_t n):
    """A fast-path answer's GetResponse ``body`` to the get of ``n`` keys, read without a
    protobuf object: (schema_id, version, Decoded), the Decoded None when the rows are of
    another schema than ``projection``'s (the caller raises SchemaMismatch).

    None when the body holds anything but the five fields of a GetResponse, each once
    (the caller then reads it with protobuf). A body whose rows do not fit the request
    raises ValueError (``response_layout``'s), a bad row CorruptRow (``decode``'s).
    """
    cdef bytes data = _as_bytes(body, "body")
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data), i = 0
    cdef uint64_t tag, v, field_no, wire, schema_id = 0, version = 0
    cdef Py_ssize_t at[6]
    cdef Py_ssize_t length[6]
    cdef uint8_t seen = 0
    for k in range(6):
        at[k] = 0
        length[k] = 0
    while i < size:
        i = _varint(p, size, i, &tag)
        if i < 0:
            return None
        field_no = tag >> 3
        wire = tag & 7
        if field_no < 1 or field_no > 5 or seen & (1 << field_no):
            return None
        seen |= 1 << field_no
        if field_no <= 2:
            if wire != 0:
                return None
            i = _varint(p, size, i, &v)
            if i < 0:
                return None
            if field_no == 1:
                if v > 0xFFFFFFFF:
                    return None
                schema_id = v
            else:
                version = v
        else:
            if wire != 2:
                return None
            i = _varint(p, size, i, &v)
            if i < 0 or v > <uint64_t>(size - i):
                return None
            at[field_no] = i
            length[field_no] = <Py_ssize_t>v
            i += <Py_ssize_t>v
    if schema_id != projection.layout.c.schema_id:
        return schema_id, version, None
    lengths_part = PyBytes_FromStringAndSize(<const char*>p + at[4], length[4])
    order_part = PyBytes_FromStringAndSize(<const char*>p + at[5], length[5])
    starts, lengths = response_layout(n, [(lengths_part, order_part, None, length[3])])
    cdef int64_t* st = _int64_data(starts)
    for k in range(n):
        st[k] += at[3]
    return schema_id, version, decode(projection, data, starts, lengths)
