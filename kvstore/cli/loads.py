"""``kvstore load | versions | rollback``: bulk versions of a table, loaded and swapped."""

from __future__ import annotations

import json

import click

from kvstore.cli.connection import node_options, open_client
from kvstore.cli.output import examples, print_table, size, utc

__all__ = ["load", "rollback", "versions"]

LOAD_TIMEOUT_S = 600.0


@click.command(
    "load",
    short_help="Bulk-load Parquet or Arrow IPC files as a new version of a table.",
    epilog=examples(
        "kvstore load user_features ./snapshots/2026-11-23/ --key-column user_id --label 2026-11-23"
    ),
)
@click.argument("table")
@click.argument("source", nargs=-1, required=True, metavar="SOURCE...")
@click.option("--key-column", default="key", show_default=True, help="the column holding the key")
@click.option("--label", default="", help="a label for the version, e.g. the snapshot date")
@click.option("--create", is_flag=True, help="create the table from the input schema if missing")
@click.option(
    "--shards", type=int, default=8, show_default=True, help="shards of a table made by --create"
)
@click.option(
    "--dedupe",
    type=click.Choice(["first", "last"]),
    default=None,
    help="keep the first or last row of a duplicated key (default: duplicates are an error)",
)
@click.option(
    "--snapshot-time",
    type=int,
    default=None,
    help="snapshot event time, µs since the epoch (default: newest event time in the "
    "input, else now)",
)
@click.option(
    "--event-time-column",
    default=None,
    help="per-row event times, µs (default: 'event_time' if present)",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["parquet", "ipc"]),
    default=None,
    help="input format (default: by file extension)",
)
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option(
    "--memory-mb",
    type=int,
    default=1024,
    show_default=True,
    help="memory budget of the loader, MiB",
)
@node_options(timeout_default_s=LOAD_TIMEOUT_S)
def load(
    table: str,
    source: tuple[str, ...],
    key_column: str,
    label: str,
    create: bool,
    shards: int,
    dedupe: str | None,
    snapshot_time: int | None,
    event_time_column: str | None,
    fmt: str | None,
    no_progress: bool,
    memory_mb: int,
    address: str,
    timeout: float,
) -> None:
    """Bulk-load Parquet or Arrow IPC files as a new version of a table.

    SOURCE is one file, many, or a hive-partitioned directory: a local path or any URI
    pyarrow.fs opens. The version is swapped in atomically; the previous version is kept
    for rollback. Prints a JSON summary.
    """
    from kvstore.ingest.bulk import load as bulk_load

    summary = bulk_load(
        address,
        table,
        source if len(source) > 1 else source[0],
        key_column=key_column,
        label=label,
        create=create,
        shards=shards,
        dedupe=dedupe,
        snapshot_time_us=snapshot_time,
        event_time_column=event_time_column,
        format=fmt,
        progress=False if no_progress else None,
        memory_budget_bytes=memory_mb << 20,
        timeout=timeout or LOAD_TIMEOUT_S,
    )
    click.echo(json.dumps(summary.to_json()))


@click.command(
    "versions",
    short_help="List the kept bulk versions of a table.",
    epilog=examples("kvstore versions user_features"),
)
@click.argument("table")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@node_options()
def versions(table: str, as_json: bool, address: str, timeout: float) -> None:
    """List the kept bulk versions of a table (* marks the current one)."""
    with open_client(address, timeout) as client:
        kept = client.versions(table)
    if as_json:
        click.echo(json.dumps([v.to_json() for v in kept], indent=1))
        return
    if not kept:
        click.echo(f"table {table!r} has no bulk version yet (only online writes)")
        return
    rows = [("", "VERSION", "LABEL", "ROWS", "SIZE", "FORMAT", "SNAPSHOT (UTC)", "CREATED (UTC)")]
    for v in kept:
        rows.append(
            (
                "*" if v.current else "",
                str(v.version),
                v.label or "-",
                str(v.rows),
                size(v.bytes),
                v.format,
                utc(v.snapshot_time_us),
                utc(v.created_at_us),
            )
        )
    print_table(rows)


@click.command(
    "rollback",
    short_help="Make a kept version current again.",
    epilog=examples("kvstore rollback user_features --to 7"),
)
@click.argument("table")
@click.option(
    "--to",
    "to_version",
    type=int,
    default=0,
    metavar="VERSION",
    help="the version to make current (default: the one before the current)",
)
@node_options()
def rollback(table: str, to_version: int, address: str, timeout: float) -> None:
    """Make a kept version current again (the one before the current by default)."""
    with open_client(address, timeout) as client:
        version = client.rollback(table, to_version)
    click.echo(json.dumps({"table": table, "current": version.to_json()}))
