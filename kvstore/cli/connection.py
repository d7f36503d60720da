"""The options of every command that talks to a node (``--address``, ``--timeout``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import click

from kvstore.config import DEFAULT_ADDRESS

if TYPE_CHECKING:
    from kvstore.client import Client

__all__ = ["ADDRESS_HELP", "node_options", "open_client"]

ADDRESS_HELP = f"node to talk to, HOST:PORT (default: $KVSTORE_ADDRESS or {DEFAULT_ADDRESS})"

F = TypeVar("F", bound=Callable)


def node_options(timeout_default_s: float = 5.0) -> Callable[[F], F]:
    """Add ``--address/-a`` and ``--timeout`` (seconds) to a command."""

    def add(command: F) -> F:
        # No click default: the client resolves $KVSTORE_ADDRESS itself, as the API does.
        command = click.option(
            "--timeout",
            type=float,
            default=None,
            help=f"deadline per call, seconds (default {timeout_default_s:g})",
        )(command)
        return click.option("--address", "-a", default=None, help=ADDRESS_HELP)(command)

    return add


def open_client(address: str | None, timeout: float | None) -> Client:
    """A Client of ``address`` (None: $KVSTORE_ADDRESS, then the default), ``timeout`` s."""
    from kvstore.client import DEFAULT_TIMEOUT_S, Client

    return Client(address, timeout=timeout or DEFAULT_TIMEOUT_S)
