"""The Python clients: Client (blocking) and AsyncClient (asyncio), and GetResult."""

from kvstore.client.aio import AsyncClient
from kvstore.client.core import DEFAULT_TIMEOUT_S
from kvstore.client.health import HedgePolicy
from kvstore.client.result import GetResult
from kvstore.client.sync import Client
from kvstore.wire.messages import TableInfo, VersionInfo

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "AsyncClient",
    "Client",
    "GetResult",
    "HedgePolicy",
    "TableInfo",
    "VersionInfo",
]
