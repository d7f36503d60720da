# Decoding (docs/row-format.md): the projected features of n rows into column
# buffers, for the client. Projection holds what one feature list needs, made once;
# Decoded holds a call's columns. decode runs in two passes, as encode does: sizing
# (where each row is, how many bytes each column takes, the output arrays allocated
# once) and filling (every column written without the GIL, then NaN where a float is
# missing). Decoded also hands its var columns over as Python values, built here per
# row (objects, pylist), and any column as Arrow buffers (arrow_buffers), so that a
# small answer's conversions cost per row, not per call. Included by codec.pyx.

from cpython.object cimport PyTypeObject
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF


cdef extern from "numpy/arrayobject.h":
    # Not in Cython's numpy declarations. It steals a reference to descr.
    object PyArray_NewFromDescr(PyTypeObject* subtype, cnp.dtype descr, int nd,
                                cnp.npy_intp* dims, cnp.npy_intp* strides, void* data,
                                int flags, PyObject* obj)
from cpython.unicode cimport PyUnicode_DecodeUTF8


cdef struct DecColumn:
    Py_ssize_t feature
    uint8_t kind
    Py_ssize_t width            # fixed width, 0 for var kinds
    Py_ssize_t out_width        # bytes of one row in values: width, 4N for quantized vectors
    Py_ssize_t offset           # fixed: from the start of the row
    Py_ssize_t var_j            # var: j among the var features
    uint8_t* values             # fixed: n * width bytes; var: the data
    int64_t* offsets            # var: n + 1 byte offsets into values
    uint8_t* valid              # n


cdef class Projection:
    """The features a decode fills, in order (``projection``: feature indices of ``layout``).

    Checked once and kept by callers that decode the same projection again and again
    (the client keeps one per table and feature list, with the schema it was made
    from). Repeats are allowed: each is its own column.
    """

    cdef readonly Layout layout
    #: The projected feature indices.
    cdef readonly tuple features
    #: Column positions whose to_numpy form is not the values array itself: bool and
    #: int kinds (masked), var kinds (built from offsets and data).
    cdef readonly tuple masked_columns
    cdef readonly tuple var_columns
    cdef DecColumn* cols            # the per-column constants; values/valid/offsets unset
    cdef Py_ssize_t n_cols
    cdef list dtypes                # numpy dtype of a fixed column's values, None for var
    cdef list dims                  # N of a float32[N] column, 0 for the others
    cdef Py_ssize_t* cdims          # the same, for C

    def __cinit__(self, Layout layout not None, projection):
        cdef const RowLayout* c = &layout.c
        cdef Py_ssize_t k, f
        cdef list masked = []
        cdef list var = []
        self.layout = layout
        self.features = tuple([operator.index(f) for f in projection])
        self.n_cols = len(self.features)
        for f in self.features:
            _check_projection_index(c, f)
        self.cols = <DecColumn*>PyMem_Calloc(self.n_cols + 1, sizeof(DecColumn))
        if self.cols == NULL:
            raise MemoryError()
        self.cdims = <Py_ssize_t*>PyMem_Calloc(self.n_cols + 1, sizeof(Py_ssize_t))
        if self.cdims == NULL:
            raise MemoryError()
        self.dtypes = [None] * self.n_cols
        self.dims = [0] * self.n_cols
        for k in range(self.n_cols):
            f = self.features[k]
            self.cols[k].feature = f
            self.cols[k].kind = c.kinds[f]
            self.cols[k].width = c.widths[f]
            self.cols[k].out_width = 4 * c.dims[f] if _is_vector(c.kinds[f]) else c.widths[f]
            self.cols[k].offset = c.offsets[f]
            self.cols[k].var_j = c.var_index[f]
            if c.widths[f]:
                self.dtypes[k] = _FIXED_DTYPES[c.kinds[f]]
                if _is_vector(c.kinds[f]):
                    self.dims[k] = c.dims[f]
                    self.cdims[k] = c.dims[f]
                elif c.kinds[f] not in (FEATURE_FLOAT32, FEATURE_FLOAT64):
                    masked.append(k)
            else:
                var.append(k)
        self.masked_columns = tuple(masked)
        self.var_columns = tuple(var)

    def __dealloc__(self):
        PyMem_Free(self.cols)
        PyMem_Free(self.cdims)

    def __len__(self):
        return self.n_cols

    def __reduce__(self):
        # A GetResult holds one (through its Decoded): results pickle and deep-copy.
        return (Projection, (self.layout, self.features))


cdef class Decoded:
    """n rows decoded into columns by ``decode``: one block of fixed values and one of
    valid masks for all columns, and each var column's offsets and data.

    ``found`` (bool) and ``event_times`` (int64, µs; 0 where missing) have one entry
    per row; ``complete[k]`` is True when column k is valid in every row. Columns are
    read out as numpy views of the blocks, so a caller pays for the ones it asks for.
    """

    cdef readonly Projection projection
    cdef readonly Py_ssize_t n
    cdef readonly object found
    cdef readonly object event_times
    cdef readonly list complete
    cdef object fixed               # uint8 ndarray, every fixed column 64-byte aligned
    cdef object valid_block         # uint8 ndarray (columns, n)
    cdef object positions           # int64 ndarray: a fixed column's byte offset in fixed (-1: var)
    cdef list var                   # a var column's (offsets, data), None for fixed

    def _check(self):
        if self.projection is None:
            raise TypeError("a Decoded comes from kvstore._codec.decode()")

    def values(self, Py_ssize_t k):
        """Fixed column k's values: float kinds NaN, the others zero where not valid."""
        self._check()
        dtype = self.projection.dtypes[k]  # IndexError when there is no column k
        if dtype is None:
            raise ValueError(f"column {k} is a var column: see column()")
        return self._view(dtype, self.projection.dims[k], self.positions[k])

    cdef object _view(self, cnp.dtype dtype, Py_ssize_t dim, Py_ssize_t position):
        """A (n,) or (n, dim) array of ``dtype`` over ``fixed`` from byte ``position``;
        made with NumPy's C API (~0.1 µs; np.ndarray(..., buffer=) costs ~0.2)."""
        cdef cnp.npy_intp shape[2]
        shape[0] = self.n
        shape[1] = dim
        cdef char* data = cnp.PyArray_BYTES(<cnp.ndarray>self.fixed) + position
        arr = cnp.PyArray_SimpleNewFromData(2 if dim else 1, shape, dtype.type_num, data)
        cnp.set_array_base(arr, self.fixed)
        return arr

    def valid(self, Py_ssize_t k):
        """Column k's valid mask (uint8): 1 where the key was found and the value is not null."""
        self._check()
        return self.valid_block[k]

    def column(self, Py_ssize_t k):
        """Column k as (values, valid), or (offsets, data, valid) for var kinds (byte offsets)."""
        self._check()
        if self.var[k] is not None:
            offsets, data = self.var[k]
            return offsets, data, self.valid_block[k]
        return self.values(k), self.valid_block[k]

    cdef int _var_check(self, Py_ssize_t k) except -1:
        self._check()
        if not 0 <= k < self.projection.n_cols:
            raise IndexError(f"no column {k} among {self.projection.n_cols}")
        if self.var[k] is None:
            raise ValueError(f"column {k} is a fixed column: see values()")
        return 0

    def objects(self, Py_ssize_t k):
        """Var column k as a NumPy object array, one entry per row: a str (string), bytes
        (bytes) or read-only int64 array (int64[], a view of the decoded data); None
        where not valid. Built in C, so its cost is per row (~0.1 µs), not per call."""
        self._var_check(k)
        return self._objects(k)

    def pylist(self, Py_ssize_t k):
        """Var column k as a list: str, bytes or a list of ints per row; None where not
        valid (what Arrow's ``to_pylist`` gives, without an Arrow array)."""
        self._var_check(k)
        return self._pylist(k)

    cdef list _pylist(self, Py_ssize_t k):
        """``pylist(k)`` for a var column k, unchecked."""
        offsets, data = self.var[k]
        cdef uint8_t kind = self.projection.cols[k].kind
        cdef Py_ssize_t n = self.n, i
        cdef list out = [None] * n
        cdef const int64_t* off = _int64_data(offsets)
        cdef const char* base = cnp.PyArray_BYTES(<cnp.ndarray>data)
        cdef const uint8_t* valid = (
            <const uint8_t*>cnp.PyArray_BYTES(<cnp.ndarray>self.valid_block) + k * n
        )
        for i in range(n):
            if valid[i]:
                out[i] = _var_value(kind, base + off[i], off[i + 1] - off[i], data, True)
        return out

    def pylists(self):
        """Every column as a list of Python values, in column order, what
        ``GetResult.to_pylist`` puts in its rows: fixed columns as ``values(k).tolist()``
        (a list per row for float32[N]) and var columns as ``pylist(k)``, None where not
        valid. One call, so that a small answer pays no Python loop over its columns."""
        self._check()
        cdef Projection p = self.projection
        cdef const int64_t* positions = _int64_data(self.positions)
        cdef Py_ssize_t n = self.n, k, i
        cdef list out = [None] * p.n_cols
        cdef list values
        cdef const uint8_t* valid
        for k in range(p.n_cols):
            if p.cols[k].width == 0:
                out[k] = self._pylist(k)
                continue
            values = self._view(<cnp.dtype>p.dtypes[k], p.cdims[k], positions[k]).tolist()
            if not self.complete[k]:
                valid = <const uint8_t*>cnp.PyArray_BYTES(<cnp.ndarray>self.valid_block) + k * n
                for i in range(n):
                    if not valid[i]:
                        values[i] = None
            out[k] = values
        return out

    def arrow_buffers(self, Py_ssize_t k):
        """Column k as the buffers of an Arrow array: (validity, offsets, values).

        validity: the valid mask as a bitmap (bytes, LSB first), None when every row
        is valid. offsets: None for fixed columns; int32, n + 1 entries, in bytes for
        string and bytes, in elements for int64[]. values: the fixed values (NumPy,
        bool packed as a bitmap) or the var data. OverflowError past 2**31 - 1 bytes or
        elements of one column (Arrow's string and list types count in int32).
        """
        self._check()
        if not 0 <= k < self.projection.n_cols:
            raise IndexError(f"no column {k} among {self.projection.n_cols}")
        cdef DecColumn* col = &self.projection.cols[k]
        cdef Py_ssize_t n = self.n, i
        cdef const uint8_t* valid = (
            <const uint8_t*>cnp.PyArray_BYTES(<cnp.ndarray>self.valid_block) + k * n
        )
        validity = None if self.complete[k] else _bitmap(valid, n)
        if col.width:
            values = self.values(k)
            if col.kind == FEATURE_BOOL:
                values = _bitmap(<const uint8_t*>cnp.PyArray_BYTES(<cnp.ndarray>values), n)
            return validity, None, values
        offsets, data = self.var[k]
        cdef const int64_t* off = _int64_data(offsets)
        cdef int shift = 3 if col.kind == FEATURE_INT64_LIST else 0
        if (off[n] >> shift) > INT32_MAX:
            raise OverflowError(
                f"column {k} holds {off[n] >> shift} bytes or elements: more than an "
                "Arrow array with int32 offsets can"
            )
        offsets32 = _empty(n + 1, cnp.NPY_INT32)
        cdef int32_t* o32 = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>offsets32)
        for i in range(n + 1):
            o32[i] = <int32_t>(off[i] >> shift)
        return validity, offsets32, data

    def masked(self, Py_ssize_t k):
        """Fixed column k as a ``numpy.ma.MaskedArray``: ``values(k)``, masked where not
        valid (a mask of its own). Made with NumPy's C API, so that MaskedArray's Python
        finalizer runs once, without a source array: less than half the cost of
        ``values(k).view(MaskedArray)`` and a mask set afterwards (~7 µs a column)."""
        self._check()
        if not 0 <= k < self.projection.n_cols:
            raise IndexError(f"no column {k} among {self.projection.n_cols}")
        if self.projection.cols[k].width == 0:
            raise ValueError(f"column {k} is a var column: see objects()")
        return self._masked(k)

    cdef object _masked(self, Py_ssize_t k):
        """``masked(k)`` for a fixed column k, unchecked."""
        global _masked_array_type
        cdef Projection p = self.projection
        if _masked_array_type is None:
            from numpy.ma import MaskedArray
            _masked_array_type = MaskedArray
        cdef cnp.npy_intp shape[2]
        cdef Py_ssize_t n = self.n, i
        shape[0] = n
        shape[1] = p.cdims[k]
        dtype = p.dtypes[k]
        Py_INCREF(dtype)  # PyArray_NewFromDescr steals a reference to it
        arr = PyArray_NewFromDescr(
            <PyTypeObject*>_masked_array_type, <cnp.dtype>dtype, 2 if shape[1] else 1, shape,
            NULL, cnp.PyArray_BYTES(<cnp.ndarray>self.fixed) + _int64_data(self.positions)[k],
            cnp.NPY_ARRAY_CARRAY, NULL,
        )
        cnp.set_array_base(arr, self.fixed)
        mask = _empty(n, cnp.NPY_BOOL)
        cdef uint8_t* out = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>mask)
        cdef const uint8_t* valid = (
            <const uint8_t*>cnp.PyArray_BYTES(<cnp.ndarray>self.valid_block) + k * n
        )
        for i in range(n):
            out[i] = not valid[i]
        arr._mask = mask
        return arr

    cdef object _objects(self, Py_ssize_t k):
        """``objects(k)`` for a var column k, unchecked."""
        offsets, data = self.var[k]
        cdef uint8_t kind = self.projection.cols[k].kind
        cdef cnp.npy_intp n = self.n
        cdef Py_ssize_t i
        out = cnp.PyArray_EMPTY(1, &n, cnp.NPY_OBJECT, 0)  # NumPy fills it with None
        cdef PyObject** slots = <PyObject**>cnp.PyArray_DATA(<cnp.ndarray>out)
        cdef const int64_t* off = _int64_data(offsets)
        cdef const char* base = cnp.PyArray_BYTES(<cnp.ndarray>data)
        cdef const uint8_t* valid = (
            <const uint8_t*>cnp.PyArray_BYTES(<cnp.ndarray>self.valid_block) + k * n
        )
        for i in range(n):
            if valid[i]:
                value = _var_value(kind, base + off[i], off[i + 1] - off[i], data, False)
                Py_INCREF(value)
                Py_XDECREF(slots[i])
                slots[i] = <PyObject*>value
        return out

    def numpy_dict(self, names):
        """{names[k]: column k in NumPy} in column order, what ``GetResult.to_numpy``
        hands back: ``values(k)`` for float kinds, ``masked(k)`` for bool and int kinds,
        ``objects(k)`` for var kinds. One call, so that a small answer pays no Python
        loop over its columns (~0.3 µs a column, plus NumPy's ~1 µs finalizer for each
        masked one)."""
        cdef dict out = {}
        cdef Py_ssize_t k
        self._check()
        cdef Projection p = self.projection
        cdef list keys = names if type(names) is list else list(names)
        cdef const int64_t* positions = _int64_data(self.positions)
        if len(keys) != p.n_cols:
            raise ValueError(f"{len(keys)} names for {p.n_cols} columns")
        # Keys go in first in column order, so that a repeated name keeps its first
        # place and its last column, as values_dict and a dict update give.
        for k in range(p.n_cols):
            if p.cols[k].width == 0:
                value = self._objects(k)
            elif not (_is_vector(p.cols[k].kind) or p.cols[k].kind == FEATURE_FLOAT32
                      or p.cols[k].kind == FEATURE_FLOAT64):
                value = self._masked(k)  # masked_columns' rule (Projection.__cinit__)
            else:
                value = self._view(<cnp.dtype>p.dtypes[k], p.cdims[k], positions[k])
            out[keys[k]] = value
        return out

    def values_dict(self, names):
        """{names[k]: values(k)} in column order; None for var columns (see column())."""
        cdef dict out = {}
        cdef Py_ssize_t k
        self._check()
        cdef Projection p = self.projection
        cdef list keys = names if type(names) is list else list(names)
        cdef const int64_t* positions = _int64_data(self.positions)
        if len(keys) != p.n_cols:
            raise ValueError(f"{len(keys)} names for {p.n_cols} columns")
        for k in range(p.n_cols):
            if p.cols[k].width == 0:
                out[keys[k]] = None
            else:
                out[keys[k]] = self._view(<cnp.dtype>p.dtypes[k], p.cdims[k], positions[k])
        return out


# Python values and Arrow buffers of a decoded column

#: numpy.ma.MaskedArray, imported on first use (the node never needs numpy.ma).
_masked_array_type = None


cdef object _var_value(uint8_t kind, const char* p, Py_ssize_t size, object data,
                       bint as_list):
    """One var value: a str, bytes, or for int64[] a list of ints (as_list) or a
    read-only int64 array over ``data``, the column's data array, starting at p."""
    cdef Py_ssize_t j, count
    cdef cnp.npy_intp shape[1]
    if kind == FEATURE_STRING:
        return PyUnicode_DecodeUTF8(p, size, NULL)
    if kind == FEATURE_BYTES:
        return PyBytes_FromStringAndSize(p, size)
    count = size >> 3
    if as_list:
        return [load_i64(<const uint8_t*>p + 8 * j) for j in range(count)]
    shape[0] = count
    arr = cnp.PyArray_SimpleNewFromData(1, shape, cnp.NPY_INT64, <void*>p)
    cnp.set_array_base(arr, data)
    cnp.PyArray_CLEARFLAGS(<cnp.ndarray>arr, cnp.NPY_ARRAY_WRITEABLE)
    return arr


cdef bytes _bitmap(const uint8_t* flags, Py_ssize_t n):
    """n bytes of 0/1 as an Arrow bitmap (bit i of byte i // 8, LSB first)."""
    cdef Py_ssize_t i, size = (n + 7) >> 3
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef uint8_t* bits = <uint8_t*>PyBytes_AS_STRING(out)
    memset(bits, 0, size)
    for i in range(n):
        if flags[i]:
            bits[i >> 3] |= <uint8_t>(1 << (i & 7))
    return out


# Sizing


cdef void _row_pointers(const uint8_t* buf, const int64_t* starts, const int64_t* lengths,
                        Py_ssize_t n, const uint8_t** rows, int64_t* event_times) noexcept nogil:
    """Where each row starts (NULL: missing) and its event time (0: missing)."""
    cdef Py_ssize_t i
    for i in range(n):
        if lengths[i] < 0:
            rows[i] = NULL
            event_times[i] = 0
        else:
            rows[i] = buf + starts[i]
            event_times[i] = load_i64(rows[i] + 5)


cdef void _decode_var_sizes(const RowLayout* c, const uint8_t** rows, Py_ssize_t n,
                            DecColumn* col) noexcept nogil:
    """The n + 1 offsets of a var column: the sizes of its values, missing and null empty."""
    cdef Py_ssize_t i
    cdef const uint8_t* row
    cdef int64_t size
    col.offsets[0] = 0
    for i in range(n):
        row = rows[i]
        size = 0
        if row != NULL and not is_null(row, col.feature):
            size = var_end(c, row, col.var_j) - var_start(c, row, col.var_j)
        col.offsets[i + 1] = col.offsets[i] + size


cdef int _decode_size(Decoded d, const RowLayout* c, DecColumn* cols, const uint8_t** rows,
                      const uint8_t* buf, const int64_t* starts,
                      const int64_t* lengths) except -1:
    """The sizing pass of ``decode``: row pointers, ``found`` and event times; each fixed
    column's place in one block and each var column's offsets; then d's arrays, each
    allocated once at its size, and cols pointed at them."""
    cdef Py_ssize_t n = d.n
    cdef Py_ssize_t n_cols = d.projection.n_cols
    cdef Py_ssize_t k, i
    cdef Py_ssize_t fixed_bytes = 0
    cdef uint8_t* fixed_base
    cdef uint8_t* valid_base
    cdef DecColumn* col
    cdef cnp.npy_intp shape[2]
    d.positions = _empty(n_cols, cnp.NPY_INT64)
    cdef int64_t* positions = _int64_data(d.positions)
    d.var = [None] * n_cols
    cdef list var_offsets = [None] * n_cols
    d.event_times = _empty(n, cnp.NPY_INT64)
    cdef int64_t* times = _int64_data(d.event_times)
    d.found = _empty(n, cnp.NPY_BOOL)
    cdef uint8_t* found = <uint8_t*>cnp.PyArray_BYTES(<cnp.ndarray>d.found)
    with nogil:
        _row_pointers(buf, starts, lengths, n, rows, times if n else NULL)
        for i in range(n):
            found[i] = rows[i] != NULL
    for k in range(n_cols):
        col = &cols[k]
        if col.width:
            positions[k] = fixed_bytes
            fixed_bytes += (n * col.out_width + 63) & ~63   # each column 64-byte aligned
        else:
            positions[k] = -1
            offsets = _empty(n + 1, cnp.NPY_INT64)
            col.offsets = _int64_data(offsets)
            var_offsets[k] = offsets
    # The valid masks of all columns share one allocation, and so do the fixed
    # values: two numpy allocations per call rather than two per column, which
    # dominate a call with many projected features. Each column is a view.
    shape[0] = n_cols
    shape[1] = n
    d.valid_block = cnp.PyArray_EMPTY(2, shape, cnp.NPY_UINT8, 0)
    valid_base = <uint8_t*>cnp.PyArray_BYTES(<cnp.ndarray>d.valid_block) if n else NULL
    d.fixed = _empty(fixed_bytes, cnp.NPY_UINT8)
    fixed_base = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>d.fixed)
    for k in range(n_cols):
        cols[k].valid = valid_base + k * n if n else NULL
        if cols[k].width:
            cols[k].values = fixed_base + positions[k] if n else NULL
    for k in range(n_cols):
        col = &cols[k]
        if col.width == 0:
            with nogil:
                _decode_var_sizes(c, rows, n, col)
            data_array = _empty(col.offsets[n], cnp.NPY_UINT8)
            col.values = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>data_array)
            d.var[k] = (var_offsets[k], data_array)
    return 0


# Filling


cdef inline void _decode_fixed_width(const uint8_t** rows, Py_ssize_t n, DecColumn* col,
                                     Py_ssize_t width) noexcept nogil:
    # Inlined with a constant width for the common sizes, so that each copy is a
    # single load and store.
    cdef Py_ssize_t i, offset = col.offset
    cdef Py_ssize_t null_byte = ROW_HEADER_SIZE + (col.feature >> 3)
    cdef uint8_t null_bit = <uint8_t>(1 << (col.feature & 7))
    cdef const uint8_t* row
    cdef uint8_t* dst = col.values
    cdef uint8_t* valid = col.valid
    for i in range(n):
        row = rows[i]
        if row != NULL and not (row[null_byte] & null_bit):
            valid[i] = 1
            memcpy(dst + i * width, row + offset, width)
        else:
            valid[i] = 0
            memset(dst + i * width, 0, width)


cdef void _decode_quantized(const uint8_t** rows, Py_ssize_t n, DecColumn* col,
                            Py_ssize_t dim) noexcept nogil:
    """A float16 or int8 vector column expanded to float32 (zero where not valid)."""
    cdef Py_ssize_t i, j
    cdef Py_ssize_t null_byte = ROW_HEADER_SIZE + (col.feature >> 3)
    cdef uint8_t null_bit = <uint8_t>(1 << (col.feature & 7))
    cdef const uint8_t* src
    cdef const int8_t* codes
    cdef float* dst
    cdef float scale
    cdef uint16_t h
    for i in range(n):
        dst = <float*>(col.values) + i * dim
        if rows[i] == NULL or (rows[i][null_byte] & null_bit):
            col.valid[i] = 0
            memset(dst, 0, 4 * dim)
            continue
        col.valid[i] = 1
        src = rows[i] + col.offset
        if col.kind == FEATURE_FLOAT16_VECTOR:
            for j in range(dim):
                memcpy(&h, src + 2 * j, 2)
                dst[j] = half_to_float(h)
        else:
            memcpy(&scale, src, 4)
            codes = <const int8_t*>(src + 4)
            for j in range(dim):
                dst[j] = <float>codes[j] * scale


cdef void _decode_fixed(const uint8_t** rows, Py_ssize_t n, DecColumn* col) noexcept nogil:
    """A fixed column: values (zero where missing or null) and its valid mask."""
    cdef Py_ssize_t i
    cdef Py_ssize_t null_byte = ROW_HEADER_SIZE + (col.feature >> 3)
    cdef uint8_t null_bit = <uint8_t>(1 << (col.feature & 7))
    cdef const uint8_t* row
    cdef bint ok
    if col.kind == FEATURE_BOOL:
        for i in range(n):
            row = rows[i]
            ok = row != NULL and not (row[null_byte] & null_bit)
            col.valid[i] = ok
            col.values[i] = ok and row[col.offset] != 0   # numpy bools must be 0 or 1
    elif col.kind == FEATURE_FLOAT16_VECTOR or col.kind == FEATURE_INT8_VECTOR:
        _decode_quantized(rows, n, col, col.out_width // 4)
    elif col.width == 4:
        _decode_fixed_width(rows, n, col, 4)
    elif col.width == 8:
        _decode_fixed_width(rows, n, col, 8)
    else:
        _decode_fixed_width(rows, n, col, col.width)


cdef void _decode_var(const RowLayout* c, const uint8_t** rows, Py_ssize_t n,
                      DecColumn* col) noexcept nogil:
    """A var column, its offsets already known: the data and the valid mask."""
    cdef Py_ssize_t i
    cdef const uint8_t* row
    cdef uint32_t start, end
    for i in range(n):
        row = rows[i]
        if row == NULL or is_null(row, col.feature):
            col.valid[i] = 0
            continue
        col.valid[i] = 1
        start = var_start(c, row, col.var_j)
        end = var_end(c, row, col.var_j)
        if end > start:
            memcpy(col.values + col.offsets[i], row + c.min_row_size + start, end - start)


cdef void _fill_nan(DecColumn* col, Py_ssize_t n, Py_ssize_t dim) noexcept nogil:
    """NaN in every value of a float column's rows that are missing or null."""
    cdef Py_ssize_t i, j
    cdef float* f32
    cdef double* f64
    for i in range(n):
        if col.valid[i]:
            continue
        if col.kind == FEATURE_FLOAT64:
            f64 = <double*>(col.values + 8 * i)
            f64[0] = NAN
        else:
            f32 = <float*>(col.values + 4 * i * dim)
            for j in range(dim):
                f32[j] = NAN


cdef int _decode_fill(Decoded d, const RowLayout* c, DecColumn* cols,
                      const uint8_t** rows) except -1:
    """The filling pass of ``decode``: every column's values and valid mask into the
    arrays that sizing made, ``complete``, and NaN in the floats that are not valid."""
    cdef Py_ssize_t n = d.n
    cdef Py_ssize_t n_cols = d.projection.n_cols
    cdef Py_ssize_t k
    cdef DecColumn* col
    # Column by column: each loop is short and specialised, and writes one
    # output sequentially.
    with nogil:
        for k in range(n_cols):
            if cols[k].width:
                _decode_fixed(rows, n, &cols[k])
            else:
                _decode_var(c, rows, n, &cols[k])
    d.complete = [None] * n_cols
    for k in range(n_cols):
        col = &cols[k]
        whole = n == 0 or memchr(col.valid, 0, n) == NULL
        d.complete[k] = whole
        if not whole and (col.kind == FEATURE_FLOAT32 or col.kind == FEATURE_FLOAT64
                          or _is_vector(col.kind)):
            _fill_nan(col, n, c.dims[col.feature] if _is_vector(col.kind) else 1)
    return 0


def decode(Projection projection not None, buf, starts, lengths):
    """Decodes the projected features of n rows into a ``Decoded``.

    Row i is ``buf[starts[i] : starts[i] + lengths[i]]`` (bytes); a negative length
    is a missing key: every feature invalid, event time 0. Every present row is
    checked first (CorruptRow, SchemaMismatch name the first bad one).
    """
    cdef Projection p = projection
    cdef const RowLayout* c = &p.layout.c
    cdef bytes data = _as_bytes(buf, "buf")
    starts = _int64_array(starts, -1, "starts")
    cdef Py_ssize_t n = cnp.PyArray_DIMS(<cnp.ndarray>starts)[0]
    lengths = _int64_array(lengths, n, "lengths")
    cdef const uint8_t* base = <const uint8_t*>PyBytes_AS_STRING(data)
    cdef const int64_t* starts_ptr = _int64_data(starts)
    cdef const int64_t* lengths_ptr = _int64_data(lengths)
    cdef Py_ssize_t data_size = PyBytes_GET_SIZE(data)
    cdef RowCheck check
    cdef bint bad
    with nogil:
        bad = _check_batch(c, base, data_size, starts_ptr, lengths_ptr, n, &check)
    if bad:
        _raise_fault(c, &check)

    cdef Decoded d = Decoded.__new__(Decoded)
    d.projection = p
    d.n = n
    # The column structs of this call: the projection's constants plus this call's buffers.
    cdef DecColumn* cols = <DecColumn*>PyMem_Malloc((p.n_cols + 1) * sizeof(DecColumn))
    cdef const uint8_t** rows = <const uint8_t**>PyMem_Malloc((n + 1) * sizeof(uint8_t*))
    if cols == NULL or rows == NULL:
        PyMem_Free(cols)
        PyMem_Free(rows)
        raise MemoryError()
    try:
        memcpy(cols, p.cols, p.n_cols * sizeof(DecColumn))
        _decode_size(d, c, cols, rows, base, starts_ptr, lengths_ptr)
        _decode_fill(d, c, cols, rows)
    finally:
        PyMem_Free(cols)
        PyMem_Free(rows)
    return d


def rows_of(names, columns, found):
    """One dict per row, ``{names[c]: columns[c][i], ...}``, or None where ``found[i]``
    is false: ``GetResult.to_pylist``'s rows, built in C (~30 ns per value).

    names and columns are lists of the same length (a later repeat of a name wins),
    each column a list of n values; found has n entries.
    """
    cdef list keys = list(names)
    cdef list cols = list(columns)
    cdef Py_ssize_t n_cols = len(keys), c, i
    if len(cols) != n_cols:
        raise ValueError(f"{n_cols} names for {len(cols)} columns")
    cdef list hits = [bool(x) for x in found]
    cdef Py_ssize_t n = len(hits)
    for c in range(n_cols):
        if type(cols[c]) is not list:
            cols[c] = list(cols[c])
        if len(<list>cols[c]) != n:
            raise ValueError(f"column {c} has {len(<list>cols[c])} values for {n} rows")
    cdef list out = [None] * n
    cdef dict row
    for i in range(n):
        if hits[i]:
            row = {}
            for c in range(n_cols):
                row[keys[c]] = (<list>cols[c])[i]
            out[i] = row
    return out


def decode_columns(Layout layout not None, projection, buf, starts, lengths):
    """Decodes the projected features of n rows into columns (see ``decode``), every
    column at once: the form the codec's tests compare with their oracle.

    Returns one column per projected feature, (values, valid) or (offsets, data,
    valid) with byte offsets, and the event times (µs since the epoch, int64).
    Values of float kinds are NaN where missing or null, other fixed kinds zero.
    """
    cdef Decoded d = decode(Projection(layout, projection), buf, starts, lengths)
    return [d.column(k) for k in range(d.projection.n_cols)], d.event_times
