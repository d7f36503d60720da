# Where each feature sits in a row of one schema (docs/row-format.md): the format
# constants, the feature kinds and their numpy dtypes, and Layout, which owns the
# RowLayout struct that the rest of the codec reads without the GIL. A float32[N]
# feature stored as float16 or int8 is a kind of its own with its own width.
# Included by codec.pyx.

FORMAT_VERSION = ROW_FORMAT
HEADER_SIZE = ROW_HEADER_SIZE

KIND_BOOL = FEATURE_BOOL
KIND_INT32 = FEATURE_INT32
KIND_INT64 = FEATURE_INT64
KIND_FLOAT32 = FEATURE_FLOAT32
KIND_FLOAT64 = FEATURE_FLOAT64
KIND_FLOAT32_VECTOR = FEATURE_FLOAT32_VECTOR
KIND_STRING = FEATURE_STRING
KIND_BYTES = FEATURE_BYTES
KIND_INT64_LIST = FEATURE_INT64_LIST
KIND_FLOAT16_VECTOR = FEATURE_FLOAT16_VECTOR
KIND_INT8_VECTOR = FEATURE_INT8_VECTOR

# The numpy dtype of a fixed kind's values column (bool also takes uint8 on encode);
# None for the var kinds. The quantized vectors are float32 columns on both sides:
# encode quantizes them, decode expands them.
_FIXED_DTYPES = (
    np.dtype(np.bool_),
    np.dtype(np.int32),
    np.dtype(np.int64),
    np.dtype(np.float32),
    np.dtype(np.float64),
    np.dtype(np.float32),
    None,
    None,
    None,
    np.dtype(np.float32),
    np.dtype(np.float32),
)
_KIND_NAMES = ("bool", "int32", "int64", "float32", "float64", "float32[N]", "string", "bytes",
               "int64[]", "float32[N]:float16", "float32[N]:int8")

# The largest float32 that rounds to a finite half: |x| >= 65520 becomes inf.
cdef float FLOAT16_OVERFLOW = 65520.0

cdef uint64_t MAX_VAR_BYTES = 0xFFFFFFFF   # the var ends are u32
cdef Py_ssize_t MAX_VECTOR_DIM = 1 << 28


cdef class Layout:
    """The byte layout of one table schema: where each feature sits in a row.

    ``kinds`` holds a KIND_* per feature in schema order, ``dims`` the N of each
    float32[N] feature, stored as float32, float16 or int8 (ignored, and reported as
    0, for the other kinds). Sizes and
    offsets are in bytes; ``fixed_offsets`` are from the start of the row.
    """

    cdef RowLayout c
    cdef void* _arrays

    def __cinit__(self):
        memset(&self.c, 0, sizeof(RowLayout))
        self._arrays = NULL

    def __dealloc__(self):
        PyMem_Free(self._arrays)

    def __init__(self, schema_id, kinds, dims):
        cdef Py_ssize_t f, n, kind, dim, width, offset, j
        if self._arrays != NULL:
            # Codec calls read the arrays without the GIL: they must never change.
            raise TypeError("a Layout is immutable")
        cdef list kind_list = [operator.index(k) for k in kinds]
        cdef list dim_list = [operator.index(d) for d in dims]
        schema_id = operator.index(schema_id)
        if not 0 <= schema_id <= 0xFFFFFFFF:
            raise ValueError(f"schema id {schema_id} does not fit in a u32")
        n = len(kind_list)
        if len(dim_list) != n:
            raise ValueError(f"dims has {len(dim_list)} entries, expected {n} (one per feature)")
        for f in range(n):
            if not 0 <= kind_list[f] < N_FEATURE_KINDS:
                raise ValueError(f"feature {f}: kind {kind_list[f]} is not a KIND_* value")
            if _is_vector(kind_list[f]):
                if not 1 <= dim_list[f] <= MAX_VECTOR_DIM:
                    raise ValueError(
                        f"feature {f}: a float32 vector needs 1 <= dim <= {MAX_VECTOR_DIM}, "
                        f"got {dim_list[f]}"
                    )
            else:
                dim_list[f] = 0

        # One block: six Py_ssize_t arrays of n, then the n kind bytes.
        cdef char* block = <char*>PyMem_Calloc(6 * n * sizeof(Py_ssize_t) + n + 1, 1)
        if block == NULL:
            raise MemoryError()
        self._arrays = block
        cdef RowLayout* c = &self.c
        c.dims = <Py_ssize_t*>block
        c.widths = c.dims + n
        c.offsets = c.widths + n
        c.var_index = c.offsets + n
        c.var_features = c.var_index + n
        c.kinds = <uint8_t*>(c.var_features + n)

        c.schema_id = <uint32_t>schema_id
        c.n_features = n
        c.bitmap_size = (n + 7) // 8
        offset = ROW_HEADER_SIZE + c.bitmap_size
        j = 0
        for f in range(n):
            kind = kind_list[f]
            dim = dim_list[f]
            c.kinds[f] = <uint8_t>kind
            c.dims[f] = dim
            width = _fixed_width(kind, dim)
            c.widths[f] = width
            if width:
                c.offsets[f] = offset
                c.var_index[f] = -1
                offset += width
            else:
                c.offsets[f] = -1
                c.var_index[f] = j
                c.var_features[j] = f
                j += 1
        c.fixed_size = offset - ROW_HEADER_SIZE - c.bitmap_size
        c.n_var = j
        c.ends_start = offset
        c.min_row_size = offset + 4 * j

    @property
    def schema_id(self):
        return self.c.schema_id

    @property
    def n_features(self):
        return self.c.n_features

    @property
    def kinds(self):
        return [self.c.kinds[f] for f in range(self.c.n_features)]

    @property
    def dims(self):
        return [self.c.dims[f] for f in range(self.c.n_features)]

    @property
    def widths(self):
        return [self.c.widths[f] for f in range(self.c.n_features)]

    @property
    def fixed_offsets(self):
        return [self.c.offsets[f] for f in range(self.c.n_features)]

    @property
    def var_index(self):
        return [self.c.var_index[f] for f in range(self.c.n_features)]

    @property
    def null_bitmap_size(self):
        return self.c.bitmap_size

    @property
    def fixed_size(self):
        return self.c.fixed_size

    @property
    def n_var(self):
        return self.c.n_var

    @property
    def min_row_size(self):
        return self.c.min_row_size

    def __repr__(self):
        return f"Layout(schema_id={self.schema_id}, kinds={self.kinds}, dims={self.dims})"

    def __reduce__(self):
        return (Layout, (self.schema_id, self.kinds, self.dims))


cdef Py_ssize_t _fixed_width(Py_ssize_t kind, Py_ssize_t dim) noexcept:
    if kind == FEATURE_BOOL:
        return 1
    if kind == FEATURE_INT32 or kind == FEATURE_FLOAT32:
        return 4
    if kind == FEATURE_INT64 or kind == FEATURE_FLOAT64:
        return 8
    if kind == FEATURE_FLOAT32_VECTOR:
        return 4 * dim
    if kind == FEATURE_FLOAT16_VECTOR:
        return 2 * dim
    if kind == FEATURE_INT8_VECTOR:
        return 4 + dim      # the f32 scale, then one code per element
    return 0


cdef inline bint _is_vector(Py_ssize_t kind) noexcept nogil:
    """A float32[N] feature, whatever its storage: an (n, N) float32 column."""
    return (kind == FEATURE_FLOAT32_VECTOR or kind == FEATURE_FLOAT16_VECTOR
            or kind == FEATURE_INT8_VECTOR)


cdef str _feature_name(const RowLayout* c, Py_ssize_t f):
    if c.kinds[f] == FEATURE_FLOAT32_VECTOR:
        return f"feature {f} (float32[{c.dims[f]}])"
    if c.kinds[f] == FEATURE_FLOAT16_VECTOR:
        return f"feature {f} (float32[{c.dims[f]}]:float16)"
    if c.kinds[f] == FEATURE_INT8_VECTOR:
        return f"feature {f} (float32[{c.dims[f]}]:int8)"
    return f"feature {f} ({_KIND_NAMES[c.kinds[f]]})"
