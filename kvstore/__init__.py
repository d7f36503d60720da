"""kvstore: a low-latency key-value store for machine-learning features.

from kvstore import Client
client = Client("127.0.0.1:7070")
result = client.get("user_features", keys=[1, 2, 3], features=["ctr_7d", "emb"])
result.to_numpy()
"""

from kvstore.client import (
    DEFAULT_TIMEOUT_S,
    AsyncClient,
    Client,
    GetResult,
    TableInfo,
    VersionInfo,
)
from kvstore.errors import (
    AlreadyExists,
    CorruptValue,
    DeadlineExceeded,
    InvalidArgument,
    KvstoreError,
    LoadConflict,
    NotFound,
    RequestTooLarge,
    SchemaChanged,
    StaleMap,
    StorageFull,
    TableNotFound,
    Unavailable,
    UnknownFeature,
)
from kvstore.schema import DType, Feature, TableSchema

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "AlreadyExists",
    "AsyncClient",
    "Client",
    "CorruptValue",
    "DType",
    "DeadlineExceeded",
    "Feature",
    "GetResult",
    "InvalidArgument",
    "KvstoreError",
    "LoadConflict",
    "NotFound",
    "RequestTooLarge",
    "SchemaChanged",
    "StaleMap",
    "StorageFull",
    "TableInfo",
    "TableNotFound",
    "TableSchema",
    "Unavailable",
    "UnknownFeature",
    "VersionInfo",
]
