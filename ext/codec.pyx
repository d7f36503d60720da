"""The row codec: rows of docs/row-format.md to and from column buffers, keys, shards.

Every per-row and per-feature loop is here, in C, without the GIL wherever it makes
no Python object; Python code hands over whole columns (numpy arrays, byte buffers)
and gets whole columns back.

Laid out as asyncpg lays out its protocol: codec.pxd declares the layout struct and
the inline row accessors, this file imports what the module needs and includes one
.pxi per concern, in an order where each uses only what comes before it.
"""

import operator
import sys

import numpy as np
cimport numpy as cnp

from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from libc.stdint cimport (
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    int8_t,
    int32_t,
    int64_t,
    uint8_t,
    uint16_t,
    uint32_t,
    uint64_t,
)
from libc.math cimport NAN, fabsf, isfinite, nextafterf
from libc.string cimport memchr, memcpy, memmove, memset

cnp.import_array()

from codec cimport (
    FEATURE_BOOL,
    FEATURE_FLOAT32,
    FEATURE_FLOAT16_VECTOR,
    FEATURE_FLOAT32_VECTOR,
    FEATURE_FLOAT64,
    FEATURE_INT8_VECTOR,
    FEATURE_INT32,
    FEATURE_INT64,
    FEATURE_INT64_LIST,
    FEATURE_STRING,
    FEATURE_BYTES,
    MAX_STR_KEY_SIZE,
    N_FEATURE_KINDS,
    ROW_BAD_FORMAT,
    ROW_ENDS_DECREASE,
    ROW_FORMAT,
    ROW_HEADER_SIZE,
    ROW_OK,
    ROW_OTHER_SCHEMA,
    ROW_OUT_OF_BUFFER,
    ROW_TOO_SHORT,
    ROW_VAR_LENGTH,
    XXH3_64bits,
    XXH3_64bits_withSeed,
    RowCheck,
    RowFault,
    RowLayout,
    check_row,
    copy_fixed,
    float_to_half,
    half_to_float,
    is_null,
    load_i64,
    load_u32,
    set_null,
    store_i64,
    store_u32,
    store_u64_be,
    var_end,
    var_start,
    zero_fixed,
)

if sys.byteorder != "little":
    # Fixed-width columns are copied between rows and arrays byte for byte.
    raise ImportError("kvstore._codec needs a little-endian host")

# One file per concern; each uses only what the files above it define. (No comment
# after an include: cython-lint reads the last word of the line as the file name.)

# Format constants, feature kinds, Layout.
include "layout.pxi"
# Arguments to C pointers; row checks and the errors a bad row raises.
include "checks.pxi"
# Columns to rows: encode_rows.
include "encode.pxi"
# Rows to columns: Projection, Decoded, decode (sizing, then filling).
include "decode.pxi"
# Stored keys and shards; row lists and where each row of a response is.
include "keys.pxi"
# Delta rows: updates, deletes, compaction, merging copies.
include "delta.pxi"
# The read-time overlay of delta over base, per key or into a response's block.
include "overlay.pxi"
# A delta shard's rows in memory: a hash table of stored keys and values.
include "delta_rows.pxi"
# The hot-row cache.
include "hot_rows.pxi"
# The fast read path's answers, in C: from the cache or from the shards.
include "fast_answers.pxi"
# The fast read path's client end, in C: the request written, the answer read.
include "fast_client.pxi"
