"""Checks of one JSON value against a feature's dtype, for the stream consumer's messages.

Each check returns (problem or None, the value to write). Done per value in Python
because a bad value must be pinned to its message, before messages are grouped
(``ingest/messages.py``); the formats are specified in docs/streaming.md.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from kvstore import _codec
from kvstore.schema import DType

__all__ = ["INT32", "INT64", "is_int", "json_type", "value_check"]

INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(lo: int, hi: int, dtype: str) -> Callable[[Any], tuple[str | None, Any]]:
    def check(value: Any) -> tuple[str | None, Any]:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not is_int(value):
            return "expected an integer", value
        if not lo <= value <= hi:
            return f"out of range for {dtype}", value
        return None, value

    return check


def _float(value: Any) -> tuple[str | None, Any]:
    if not _is_number(value):
        return "expected a number", value
    return None, float(value)  # Arrow refuses ints a float32 cannot hold exactly


def _bool(value: Any) -> tuple[str | None, Any]:
    return (None if isinstance(value, bool) else "expected true or false"), value


def _string(value: Any) -> tuple[str | None, Any]:
    return (None if isinstance(value, str) else "expected a string"), value


def _bytes(value: Any) -> tuple[str | None, Any]:
    if not isinstance(value, str):
        return "expected a base64 string", value
    try:
        return None, base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return "expected a base64 string", value


def _embedding(dim: int) -> Callable[[Any], tuple[str | None, Any]]:
    def check(value: Any) -> tuple[str | None, Any]:
        if not isinstance(value, list) or not all(_is_number(v) for v in value):
            return f"expected a list of {dim} numbers", value
        if len(value) != dim:
            return f"expected {dim} numbers, got {len(value)}", value
        return None, [float(v) for v in value]

    return check


def _int_list(value: Any) -> tuple[str | None, Any]:
    if not isinstance(value, list) or not all(is_int(v) for v in value):
        return "expected a list of integers", value
    if not all(INT64[0] <= v <= INT64[1] for v in value):
        return "a list element out of range for int64", value
    return None, value


def value_check(dtype: DType) -> Callable[[Any], tuple[str | None, Any]]:
    kind = dtype.kind
    if kind == _codec.KIND_BOOL:
        return _bool
    if kind == _codec.KIND_INT32:
        return _integer(*INT32, "int32")
    if kind == _codec.KIND_INT64:
        return _integer(*INT64, "int64")
    if kind in (_codec.KIND_FLOAT32, _codec.KIND_FLOAT64):
        return _float
    if kind == _codec.KIND_STRING:
        return _string
    if kind == _codec.KIND_BYTES:
        return _bytes
    if kind == _codec.KIND_FLOAT32_VECTOR:
        return _embedding(dtype.dim)
    return _int_list


def json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"
