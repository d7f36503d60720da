"""``kvstore get | write | delete``: rows of a table, by key, online (not bulk loads)."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import click

from kvstore.cli.connection import node_options, open_client
from kvstore.cli.output import examples, jsonable
from kvstore.cli.readers import batches, parse_keys, read_csv, read_jsonl
from kvstore.errors import KvstoreError

__all__ = ["delete", "get", "write"]

_NEGATIVE = re.compile(r"-\d+")


class KeysCommand(click.Command):
    """A command taking keys, where ``-5`` is a key (an int64 may be negative), not an option.

    Options are moved in front of a ``--`` and everything else after it, in its order.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args or not any(_NEGATIVE.fullmatch(a) for a in args):
            return super().parse_args(ctx, args)
        takes_value = {
            name: not p.is_flag
            for p in self.get_params(ctx)
            if isinstance(p, click.Option)
            for name in p.opts + p.secondary_opts
        }
        options: list[str] = []
        positional: list[str] = []
        tokens = iter(args)
        for token in tokens:
            if not token.startswith("-") or _NEGATIVE.fullmatch(token):
                positional.append(token)
                continue
            options.append(token)
            value = next(tokens, None) if takes_value.get(token) else None
            if value is not None:  # "--features a,b"; "--features=a,b" is one token
                options.append(value)
        return super().parse_args(ctx, [*options, "--", *positional])


@click.command(
    "get",
    cls=KeysCommand,
    short_help="Look up keys; prints one JSON object per key.",
    epilog=examples("kvstore get demo_users 42 43 --features age,ctr_7d"),
)
@click.argument("table")
@click.argument("keys", nargs=-1, required=True, metavar="KEY...")
@click.option("--features", default=None, help="comma-separated feature names (default: all)")
@node_options()
def get(
    table: str,
    keys: tuple[str, ...],
    features: str | None,
    address: str,
    timeout: float,
) -> None:
    """Look up keys; prints one JSON object per key (found: false for a missing key)."""
    names = [f.strip() for f in features.split(",")] if features else None
    with open_client(address, timeout) as client:
        info = client.describe_table(table)
        typed = parse_keys(keys, info.schema.key_type)
        result = client.get(table, typed, names)
    dtypes = {f.name: f.dtype.name for f in info.schema.features}
    for key, row, found in zip(typed, result.to_pylist(), result.found.tolist(), strict=True):
        out: dict[str, Any] = {"key": key, "found": found}
        if row is not None:
            out.update({k: jsonable(v, dtypes[k]) for k, v in row.items() if k != "key"})
        click.echo(json.dumps(out, ensure_ascii=False))


@click.command(
    "write",
    short_help="Upsert rows from JSON lines or CSV.",
    epilog=examples('kvstore write user_features rows.jsonl   # {"key": 1, "ctr_7d": 0.1}'),
)
@click.argument("table")
@click.argument("file", required=False, default="-")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv"]),
    default=None,
    help="input format (default: by file extension, else jsonl)",
)
@click.option("--key-column", default="key", show_default=True, help="the column holding the key")
@click.option("--batch-size", type=int, default=5000, show_default=True, help="rows per request")
@node_options()
def write(
    table: str,
    file: str,
    fmt: str | None,
    key_column: str,
    batch_size: int,
    address: str,
    timeout: float,
) -> None:
    """Upsert rows from JSON lines or CSV (FILE, or - for stdin, the default).

    Features left out of the input keep their stored values. Bytes values are base64
    (as 'get' prints them); in CSV, list and embedding values are JSON arrays.
    """
    fmt = fmt or ("csv" if file.endswith(".csv") else "jsonl")
    total = 0
    with open_client(address, timeout) as client:
        schema = client.describe_table(table).schema
        stream = sys.stdin if file == "-" else open(file, encoding="utf-8")  # noqa: SIM115
        try:
            rows = (
                read_csv(stream, schema, key_column) if fmt == "csv" else read_jsonl(stream, schema)
            )
            for first_line, batch in batches(rows, batch_size):
                try:
                    total += client.write(table, batch, key_column=key_column)
                except KvstoreError as exc:
                    raise type(exc)(
                        f"{exc} (input rows are counted from line {first_line} of {file}; "
                        f"{total} rows before it were written)"
                    ) from None
        finally:
            if stream is not sys.stdin:
                stream.close()
    click.echo(json.dumps({"table": table, "rows_written": total}))


@click.command(
    "delete",
    cls=KeysCommand,
    short_help="Delete keys (missing keys are fine).",
    epilog=examples("kvstore delete demo_users 42 43"),
)
@click.argument("table")
@click.argument("keys", nargs=-1, required=True, metavar="KEY...")
@node_options()
def delete(table: str, keys: tuple[str, ...], address: str, timeout: float) -> None:
    """Delete keys (missing keys are fine)."""
    with open_client(address, timeout) as client:
        info = client.describe_table(table)
        n = client.delete(table, parse_keys(keys, info.schema.key_type))
    click.echo(json.dumps({"table": table, "keys_deleted": n}))
