# Declarations of the row codec (docs/row-format.md); codec.pyx implements it.
#
# setup.py builds codec.pyx as the module kvstore._codec, so Cython does not pair
# this file with codec.pyx by name: codec.pyx cimports it explicitly, as it would a
# library's .pxd. That is why only C-level declarations live here (the layout
# struct, the row checks and the little-endian field accessors, all inline and
# nogil): an extension type declared here would be looked up in a module called
# `codec` at import time. The Layout type that owns a RowLayout is in codec.pyx.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset


cdef extern from *:
    """
    #define XXH_INLINE_ALL
    #include "xxhash.h"
    """
    uint64_t XXH3_64bits(const void* data, size_t length) nogil
    uint64_t XXH3_64bits_withSeed(const void* data, size_t length, uint64_t seed) nogil


# IEEE 754 half <-> single without branches, after Marat Dukhan's FP16 library
# (github.com/Maratyszcza/FP16, MIT): the compiler vectorises the loops over them,
# and the build needs neither F16C nor numpy's npymath. Rounding is the FPU's, to
# nearest even; NaN becomes the quiet NaN 0x7e00 with its sign; a finite value of
# magnitude >= 65520 becomes inf (encode refuses those before it gets here).
cdef extern from *:
    """
    #include <string.h>
    static inline float kv_f32_from_bits(uint32_t w) { float f; memcpy(&f, &w, 4); return f; }
    static inline uint32_t kv_f32_to_bits(float f) { uint32_t w; memcpy(&w, &f, 4); return w; }
    static inline uint16_t kv_float_to_half(float f) {
        const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
        float base = (__builtin_fabsf(f) * scale_to_inf) * scale_to_zero;
        const uint32_t w = kv_f32_to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
        uint32_t bias = shl1_w & 0xFF000000u, bits, exp_bits, mantissa_bits, nonsign, nan;
        bias = bias < 0x71000000u ? 0x71000000u : bias;   /* a max: vectorises */
        base = kv_f32_from_bits((bias >> 1) + 0x07800000u) + base;
        bits = kv_f32_to_bits(base);
        exp_bits = (bits >> 13) & 0x00007C00u;
        mantissa_bits = bits & 0x00000FFFu;
        nonsign = exp_bits + mantissa_bits;
        nan = (uint32_t)0 - (uint32_t)(shl1_w > 0xFF000000u);
        return (uint16_t)((sign >> 16) | (0x7E00u & nan) | (nonsign & ~nan));
    }
    static inline float kv_half_to_float(uint16_t h) {
        const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
        const float normalized = kv_f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
        const float denormalized = kv_f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
        /* A mask rather than ?: so that the loop vectorises (4x here). */
        const uint32_t small = (uint32_t)0 - (uint32_t)(two_w < (1u << 27));
        const uint32_t result = sign | (kv_f32_to_bits(denormalized) & small)
                                     | (kv_f32_to_bits(normalized) & ~small);
        return kv_f32_from_bits(result);
    }
    """
    uint16_t float_to_half "kv_float_to_half"(float value) nogil
    float half_to_float "kv_half_to_float"(uint16_t h) nogil


cdef enum:
    ROW_FORMAT = 1          # the format byte of format 1
    ROW_HEADER_SIZE = 13    # format u8, schema id u32, event time i64
    MAX_STR_KEY_SIZE = 1024  # bytes of UTF-8 in a string key


# Feature kinds, the numbers stored in a schema (the KIND_* module constants).
cdef enum FeatureKind:
    FEATURE_BOOL = 0
    FEATURE_INT32 = 1
    FEATURE_INT64 = 2
    FEATURE_FLOAT32 = 3
    FEATURE_FLOAT64 = 4
    FEATURE_FLOAT32_VECTOR = 5
    FEATURE_STRING = 6
    FEATURE_BYTES = 7
    FEATURE_INT64_LIST = 8
    FEATURE_FLOAT16_VECTOR = 9   # float32[N]:float16, stored as N IEEE halves
    FEATURE_INT8_VECTOR = 10     # float32[N]:int8, stored as a f32 scale and N int8 codes
    N_FEATURE_KINDS = 11


# Where each feature of one schema sits in a row. All offsets and sizes in bytes.
cdef struct RowLayout:
    uint32_t schema_id
    Py_ssize_t n_features       # F
    Py_ssize_t bitmap_size      # B = ceil(F / 8)
    Py_ssize_t fixed_size       # W
    Py_ssize_t n_var            # V
    Py_ssize_t ends_start       # 13 + B + W: the u32 var ends
    Py_ssize_t min_row_size     # 13 + B + W + 4V: where the var data starts
    uint8_t* kinds              # per feature: a FeatureKind
    Py_ssize_t* dims            # per feature: N for the float32[N] kinds (any storage), 0 otherwise
    Py_ssize_t* widths          # per feature: fixed width, 0 for var kinds
    Py_ssize_t* offsets         # per feature: absolute offset in the row, -1 for var kinds
    Py_ssize_t* var_index       # per feature: j among the var features, -1 for fixed kinds
    Py_ssize_t* var_features    # per var feature j: its feature index


# Why a row is not valid (docs/row-format.md, "valid"); RowCheck.a/b/c hold the numbers
# the reason text names.
cdef enum RowFault:
    ROW_OK = 0
    ROW_TOO_SHORT           # a = length
    ROW_BAD_FORMAT          # a = format byte
    ROW_OTHER_SCHEMA        # a = the row's schema id
    ROW_ENDS_DECREASE       # a = var feature j, b = its end, c = the previous end
    ROW_VAR_LENGTH          # a = last var end, b = bytes of var data in the row
    ROW_OUT_OF_BUFFER       # a = start, b = length: a caller error, not a corrupt row


cdef struct RowCheck:
    RowFault fault
    Py_ssize_t index
    int64_t a
    int64_t b
    int64_t c


# The host is little-endian (codec.pyx refuses to import otherwise), so a field
# access is an unaligned load or store.

cdef inline uint32_t load_u32(const uint8_t* p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline int64_t load_i64(const uint8_t* p) noexcept nogil:
    cdef int64_t v
    memcpy(&v, p, 8)
    return v


cdef inline void store_u32(uint8_t* p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)


cdef inline void store_i64(uint8_t* p, int64_t v) noexcept nogil:
    memcpy(p, &v, 8)


cdef inline void store_u64_be(uint8_t* p, uint64_t v) noexcept nogil:
    cdef int k
    for k in range(8):
        p[k] = <uint8_t>(v >> (56 - 8 * k))


cdef inline bint is_null(const uint8_t* row, Py_ssize_t feature) noexcept nogil:
    return (row[ROW_HEADER_SIZE + (feature >> 3)] >> (feature & 7)) & 1


cdef inline void set_null(uint8_t* row, Py_ssize_t feature) noexcept nogil:
    row[ROW_HEADER_SIZE + (feature >> 3)] |= <uint8_t>(1 << (feature & 7))


cdef inline uint32_t var_end(const RowLayout* layout, const uint8_t* row,
                             Py_ssize_t j) noexcept nogil:
    return load_u32(row + layout.ends_start + 4 * j)


cdef inline uint32_t var_start(const RowLayout* layout, const uint8_t* row,
                               Py_ssize_t j) noexcept nogil:
    if j == 0:
        return 0
    return load_u32(row + layout.ends_start + 4 * (j - 1))


cdef inline void copy_fixed(uint8_t* dst, const uint8_t* src, Py_ssize_t width) noexcept nogil:
    # Constant sizes let the compiler turn the common widths into one load/store.
    if width == 4:
        memcpy(dst, src, 4)
    elif width == 8:
        memcpy(dst, src, 8)
    elif width == 1:
        dst[0] = src[0]
    else:
        memcpy(dst, src, width)


cdef inline void zero_fixed(uint8_t* dst, Py_ssize_t width) noexcept nogil:
    if width == 4:
        memset(dst, 0, 4)
    elif width == 8:
        memset(dst, 0, 8)
    else:
        memset(dst, 0, width)


cdef inline RowFault check_row(const RowLayout* layout, const uint8_t* row, Py_ssize_t length,
                               RowCheck* check) noexcept nogil:
    """Whether the row follows the format under this layout; on a fault, fills check.

    The schema id is compared before the sizes: a row written with another schema
    is laid out by that schema, so measuring it against this one would call a
    sound row corrupt.
    """
    cdef Py_ssize_t j
    cdef uint32_t end, previous = 0
    if length < ROW_HEADER_SIZE:
        check.fault = ROW_TOO_SHORT
        check.a = length
        return ROW_TOO_SHORT
    if row[0] != ROW_FORMAT:
        check.fault = ROW_BAD_FORMAT
        check.a = row[0]
        return ROW_BAD_FORMAT
    end = load_u32(row + 1)
    if end != layout.schema_id:
        check.fault = ROW_OTHER_SCHEMA
        check.a = end
        return ROW_OTHER_SCHEMA
    if length < layout.min_row_size:
        check.fault = ROW_TOO_SHORT
        check.a = length
        return ROW_TOO_SHORT
    for j in range(layout.n_var):
        end = load_u32(row + layout.ends_start + 4 * j)
        if end < previous:
            check.fault = ROW_ENDS_DECREASE
            check.a = j
            check.b = end
            check.c = previous
            return ROW_ENDS_DECREASE
        previous = end
    if previous != <uint64_t>(length - layout.min_row_size):
        check.fault = ROW_VAR_LENGTH
        check.a = previous
        check.b = length - layout.min_row_size
        return ROW_VAR_LENGTH
    return ROW_OK
