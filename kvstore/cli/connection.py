"""The options of every command that talks to a node (``--address``, ``--timeout``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import click

from kvstore.config import DEFAULT_ADDRESS

if TYPE_CHECKING:
    from kvstore.client import Client

__all__ = ["ADDRESS_HELP", "node_options", "open_client"]

ADDRESS_HELP = "node to talk to, HOST:PORT"

F = TypeVar("F", bound=Callable)


def node_options(timeout_default_s: float = 5.0) -> Callable[[F], F]:
    """Add ``--address/-a`` (or $KVSTORE_ADDRESS, as the Client reads it) and ``--timeout``."""

    def add(command: F) -> F:
        command = click.option(
            "--timeout",
            type=float,
            default=timeout_default_s,
            show_default=True,
            help="deadline per call, seconds",
        )(command)
        return click.option(
            "--address",
            "-a",
            default=DEFAULT_ADDRESS,
            show_default=True,
            envvar="KVSTORE_ADDRESS",
            show_envvar=True,
            help=ADDRESS_HELP,
        )(command)

    return add


def open_client(address: str, timeout: float) -> Client:
    """A Client of ``address`` (HOST:PORT) with a deadline of ``timeout`` s per call."""
    from kvstore.client import DEFAULT_TIMEOUT_S, Client

    return Client(address, timeout=timeout or DEFAULT_TIMEOUT_S)
