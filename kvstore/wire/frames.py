"""The fast read path's framing (docs/fast-path.md), shared by client and node.

A request frame is ``u32 body length, u32 request id`` then a protobuf GetRequest; a
response frame is ``u32 body length, u32 request id, u8 status`` then a GetResponse
(status ``STATUS_OK``) or a FastError (``STATUS_ERROR``). Little-endian, no padding.
"""

from __future__ import annotations

import struct

from google.protobuf.message import DecodeError

from kvstore.errors import KvstoreError, StaleMap, error_from_name
from kvstore.v1 import feature_store_pb2 as pb

__all__ = [
    "REQUEST_HEADER",
    "RESPONSE_HEADER",
    "STATUS_ERROR",
    "STATUS_OK",
    "error_frame",
    "read_answer",
]

REQUEST_HEADER = struct.Struct("<II")  # body length, request id
RESPONSE_HEADER = struct.Struct("<IIB")  # body length, request id, status
STATUS_OK = 0
STATUS_ERROR = 1


def error_frame(request_id: int, exc: KvstoreError) -> bytes:
    """The response frame that reports ``exc`` (its class name, message, and a
    StaleMap's epoch)."""
    epoch = exc.epoch if isinstance(exc, StaleMap) else 0
    error = pb.FastError(type=type(exc).__name__, message=str(exc), epoch=epoch)
    body = error.SerializeToString()
    return RESPONSE_HEADER.pack(len(body), request_id, STATUS_ERROR) + body


def read_answer(status: int, body: bytes) -> pb.GetResponse:
    """The GetResponse of an answer's body; the node's error, raised as its KvstoreError."""
    try:
        if status != STATUS_OK:
            error = pb.FastError.FromString(body)
        else:
            return pb.GetResponse.FromString(body)
    except DecodeError:
        raise KvstoreError(f"a malformed fast-path answer (status {status})") from None
    raise error_from_name(error.type, error.message, error.epoch)
