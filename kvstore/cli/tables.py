"""``kvstore tables | describe | create-table | drop``: a node's tables and their schemas."""

from __future__ import annotations

import json

import click

from kvstore.cli.connection import node_options, open_client
from kvstore.cli.output import examples, info_json, print_table, size

__all__ = ["create_table", "describe", "drop", "tables"]


@click.command("tables", short_help="List the tables on a node.", epilog=examples("kvstore tables"))
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@node_options()
def tables(as_json: bool, address: str, timeout: float) -> None:
    """List the tables on a node."""
    with open_client(address, timeout) as client:
        infos = client.list_tables()
    if as_json:
        click.echo(json.dumps([info_json(t) for t in infos], indent=1))
        return
    if not infos:
        click.echo("no tables")
        return
    rows = [("TABLE", "KEY", "SHARDS", "FEATURES", "VERSION", "ROWS~", "DISK")]
    for t in infos:
        rows.append(
            (
                t.schema.name,
                t.schema.key_type,
                str(t.schema.shards),
                str(len(t.schema.features)),
                str(t.version),
                str(t.rows_estimate),
                size(t.disk_bytes),
            )
        )
    print_table(rows)


@click.command(
    "describe",
    short_help="Show a table's schema, version and size as JSON.",
    epilog=examples("kvstore describe demo_users"),
)
@click.argument("table")
@node_options()
def describe(table: str, address: str, timeout: float) -> None:
    """Show a table's schema, version and size as JSON."""
    with open_client(address, timeout) as client:
        click.echo(json.dumps(info_json(client.describe_table(table)), indent=1))


@click.command(
    "create-table",
    short_help="Create a table.",
    epilog=examples(
        "kvstore create-table user_features --key int64 --shards 8 "
        "--feature ctr_7d:float32 --feature emb:float32[64] --feature country:string"
    ),
)
@click.argument("table")
@click.option(
    "--key",
    type=click.Choice(["int64", "string"]),
    default="int64",
    show_default=True,
    help="key type",
)
@click.option("--shards", type=int, default=8, show_default=True, help="number of shards")
@click.option(
    "--feature",
    "-f",
    "feature_specs",
    multiple=True,
    metavar="NAME:DTYPE",
    help="a feature (repeat the option, or separate with commas); dtypes: bool int32 int64 "
    "float32 float64 string bytes float32[N] float32[N]:float16 float32[N]:int8 int64[]",
)
@click.option(
    "--ttl",
    "ttl_specs",
    multiple=True,
    metavar="NAME=SECONDS",
    help="a time to live for a feature: older values read as null (repeat the option)",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="copies of each shard, on distinct nodes (a cluster: kvstore serve --etcd)",
)
@click.option(
    "--write-quorum",
    type=click.IntRange(min=0),
    default=0,
    help="replicas a write must reach before it is acknowledged  [default: a majority]",
)
@node_options()
def create_table(
    table: str,
    key: str,
    shards: int,
    feature_specs: tuple[str, ...],
    ttl_specs: tuple[str, ...],
    replicas: int,
    write_quorum: int,
    address: str,
    timeout: float,
) -> None:
    """Create a table. Creating the same definition again is a no-op."""
    features: dict[str, str] = {}
    for spec in feature_specs:
        for item in spec.split(","):
            name, sep, dtype = item.partition(":")
            if not sep:
                raise ValueError(f"--feature {item!r}: expected NAME:DTYPE, e.g. ctr_7d:float32")
            features[name.strip()] = dtype.strip()
    ttl: dict[str, float] = {}
    for spec in ttl_specs:
        name, sep, seconds = spec.partition("=")
        try:
            ttl[name.strip()] = float(seconds)
        except ValueError:
            raise ValueError(f"--ttl {spec!r}: expected NAME=SECONDS, e.g. ctr_7d=86400") from None
        if not sep:
            raise ValueError(f"--ttl {spec!r}: expected NAME=SECONDS, e.g. ctr_7d=86400")
    with open_client(address, timeout) as client:
        # Passed only when set: Client.create_table takes them from issue 16 on.
        placement = {"replicas": replicas} if replicas != 1 else {}
        if write_quorum:
            placement["write_quorum"] = write_quorum
        info = client.create_table(
            table, key=key, features=features, shards=shards, ttl=ttl, **placement
        )
    click.echo(json.dumps(info_json(info), indent=1))


@click.command(
    "drop",
    short_help="Delete a table and all its data.",
    epilog=examples("kvstore drop user_features"),
)
@click.argument("table")
@node_options()
def drop(table: str, address: str, timeout: float) -> None:
    """Delete a table and all its data."""
    with open_client(address, timeout) as client:
        client.drop_table(table)
    click.echo(json.dumps({"table": table, "dropped": True}))
