"""``kvstore consume nats|kafka``: the stream consumer's own command line, mounted here.

The options of ``consume`` are declared once, in ``kvstore.ingest.consume`` (which also
runs alone as ``python -m kvstore.ingest.consume``); this command hands its arguments,
``--help`` included, to that parser unchanged.
"""

from __future__ import annotations

import argparse

import click

__all__ = ["consume"]


@click.command(
    "consume",
    short_help="Apply update messages from NATS JetStream or Kafka to a table, continuously.",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def consume(args: tuple[str, ...]) -> int:
    """Apply update messages from NATS JetStream or Kafka to a table, continuously."""
    from kvstore.ingest.consume import add_consume_parser

    parser = argparse.ArgumentParser(prog="kvstore")
    add_consume_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["consume", *args])  # exits 2 with usage on a bad option
    return parsed.handler(parsed)
