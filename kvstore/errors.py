"""The errors a kvstore user can see, and their one mapping to gRPC status codes.

Every error names the thing it is about (table, feature, key, row, limit) in its
message. The node raises these; ``kvstore.server.servicer`` turns them into a gRPC
status in one place, and ``kvstore.client`` turns a status back into the same class
in one place (``from_rpc_error``), so a user catches ``kvstore.UnknownFeature`` whether
the check ran in the client or in the node.
"""

from __future__ import annotations

import errno

import grpc

__all__ = [
    "AlreadyExists",
    "CorruptValue",
    "DeadlineExceeded",
    "InvalidArgument",
    "KvstoreError",
    "LoadConflict",
    "NotFound",
    "RequestTooLarge",
    "SchemaChanged",
    "StaleMap",
    "StorageFull",
    "TableNotFound",
    "Unavailable",
    "UnknownFeature",
    "error_metadata",
    "is_disk_full",
]

# The trailing-metadata key carrying the exact error class across the wire.
ERROR_TYPE_KEY = "kvstore-error"
# The trailing-metadata key carrying a StaleMap's epoch (decimal).
ERROR_EPOCH_KEY = "kvstore-epoch"


class KvstoreError(Exception):
    """Base class of every error kvstore raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(KvstoreError):
    """The request itself is wrong: a bad key, value, dtype, name or size."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class UnknownFeature(InvalidArgument):
    """A feature name the table does not have."""


class RequestTooLarge(InvalidArgument):
    """A request over a configured limit (keys per request or bytes per message)."""


class NotFound(KvstoreError):
    code = grpc.StatusCode.NOT_FOUND


class TableNotFound(NotFound):
    """No table of that name on the node."""


class AlreadyExists(KvstoreError):
    """A table of that name exists with another schema."""

    code = grpc.StatusCode.ALREADY_EXISTS


class SchemaChanged(KvstoreError):
    """The client encoded rows with a schema that is no longer the table's."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class StaleMap(KvstoreError):
    """The node asked does not hold (or no longer holds) a shard the request names: the
    caller's cluster map is older than the node's. The client refreshes its map from any
    node and retries once. ``epoch`` is the node's placement epoch (0 if not known)."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, epoch: int = 0) -> None:
        super().__init__(message)
        self.epoch = epoch


class LoadConflict(KvstoreError):
    """Another bulk load of the table is in progress, or the load is no longer open."""

    code = grpc.StatusCode.ABORTED


class StorageFull(KvstoreError):
    """The node's disk is full; nothing was changed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a full disk: an OSError(ENOSPC) (Python, pyarrow) or the plain
    Exception rocksdict raises with RocksDB's IO error message."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return type(exc) is Exception and "No space left on device" in str(exc)


class CorruptValue(KvstoreError):
    """A stored value that does not decode; the message names table, shard and key."""

    code = grpc.StatusCode.DATA_LOSS


class Unavailable(KvstoreError):
    """The node cannot be reached, or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(KvstoreError):
    """The call did not finish within its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_NAME: dict[str, type[KvstoreError]] = {
    cls.__name__: cls
    for cls in (
        InvalidArgument,
        UnknownFeature,
        RequestTooLarge,
        NotFound,
        TableNotFound,
        AlreadyExists,
        SchemaChanged,
        StaleMap,
        LoadConflict,
        StorageFull,
        CorruptValue,
        Unavailable,
        DeadlineExceeded,
        KvstoreError,
    )
}

_BY_CODE: dict[grpc.StatusCode, type[KvstoreError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: SchemaChanged,
    grpc.StatusCode.DATA_LOSS: CorruptValue,
    grpc.StatusCode.ABORTED: LoadConflict,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def error_metadata(exc: KvstoreError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata a node sends with ``exc``: its class, and a StaleMap's epoch."""
    if isinstance(exc, StaleMap):
        return ((ERROR_TYPE_KEY, "StaleMap"), (ERROR_EPOCH_KEY, str(exc.epoch)))
    return ((ERROR_TYPE_KEY, type(exc).__name__),)


def error_from_name(name: str, message: str, epoch: int = 0) -> KvstoreError:
    """The error of class ``name`` (as sent by a node), KvstoreError if unknown;
    ``epoch`` is a StaleMap's."""
    cls = _BY_NAME.get(name, KvstoreError)
    if cls is StaleMap:
        return StaleMap(message, epoch)
    return cls(message)


def from_rpc_error(exc: grpc.RpcError, address: str, timeout_s: float | None) -> KvstoreError:
    """The kvstore error for a failed call to the node at ``address``."""
    code = exc.code()
    details = exc.details() or ""
    name = None
    epoch = 0
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_TYPE_KEY:
            name = value
        elif key == ERROR_EPOCH_KEY and value.isdigit():
            epoch = int(value)
    if name in _BY_NAME:
        return error_from_name(name, details, epoch)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in details:
        return RequestTooLarge(
            f"the request is larger than node {address} accepts (its max_request_bytes "
            f"limit): {details}; send fewer keys or rows per call"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"node {address} is unavailable: {details}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return KvstoreError(
            f"node {address} does not offer this call ({details}); is it an older kvstore?"
        )
    if code == grpc.StatusCode.CANCELLED:
        # The client never cancels its own calls, so the node did: it is shutting down
        # (gRPC cancels calls it received but had not yet handed to a handler).
        return Unavailable(f"node {address} cancelled the call (shutting down?): {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(
            f"node {address} did not answer within the deadline of {timeout_s} s"
        )
    return _BY_CODE.get(code, KvstoreError)(f"node {address}: {code.name}: {details}")
