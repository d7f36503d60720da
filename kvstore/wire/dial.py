"""Reaching a node: which address to dial, and the one set of gRPC channel options.

The blocking client, the asyncio client and the bulk loader's uploads open their
channels here, so message-size limits and keepalive are the same everywhere.
"""

from __future__ import annotations

import os

import grpc

from kvstore.config import DEFAULT_ADDRESS

__all__ = [
    "CHANNEL_OPTIONS",
    "dial_address",
    "open_aio_channel",
    "open_channel",
    "resolve_address",
]

#: Options of every channel to a node: no client-side message size limit (the node
#: enforces its own, ``max_request_bytes``), a keepalive ping every 30 s.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.keepalive_time_ms", 30_000),
]

_WILDCARD_HOSTS = ("", "0.0.0.0", "[::]", "::")


def resolve_address(address: str | None) -> str:
    """``address``, else $KVSTORE_ADDRESS, else 127.0.0.1:7070 (host:port)."""
    return address or os.environ.get("KVSTORE_ADDRESS") or DEFAULT_ADDRESS


def dial_address(advertised: str, seed: str) -> str:
    """How to reach a node the cluster map lists (host:port): a node bound to a
    wildcard address advertises it, so dial it on the host the ``seed`` was reached at.
    A node the map lists without an address (not registered: down) stays "" (routes skip
    it), never the seed's host with no port (gRPC then dials port 443)."""
    if not advertised:
        return ""
    host, _, port = advertised.rpartition(":")
    if host in _WILDCARD_HOSTS:
        return f"{seed.rpartition(':')[0]}:{port}"
    return advertised


def open_channel(address: str) -> grpc.Channel:
    """A blocking gRPC channel to ``address`` (host:port); connects lazily."""
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def open_aio_channel(address: str) -> grpc.aio.Channel:
    """An asyncio gRPC channel to ``address`` (host:port); connects lazily.

    With a subchannel of its own: gRPC otherwise shares one per address across the
    process's channels, and a channel opened to replace one that met a stopped node
    (AsyncClient does) would inherit its reconnect backoff (1 s, growing to 2 min),
    failing every call meanwhile even once the node is back.
    """
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    return grpc.aio.insecure_channel(address, options=options)
