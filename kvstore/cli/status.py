"""``kvstore status``: a node's health, caches and per-table activity and freshness."""

from __future__ import annotations

import json

import click

from kvstore.cli.connection import node_options, open_client
from kvstore.cli.output import examples, print_table

__all__ = ["status"]

MiB = 1 << 20


@click.command(
    "status",
    short_help="Node health and per-table activity and freshness.",
    epilog=examples("kvstore status --json"),
)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@node_options()
def status(as_json: bool, address: str, timeout: float) -> None:
    """Node health and per-table activity and freshness: rows updated, the age of the
    newest applied event, update lag p50/p99 (event time to readable)."""
    with open_client(address, timeout) as client:
        stats = client.stats()
    stats["address"] = client.address
    if as_json:
        click.echo(json.dumps(stats, indent=1))
        return
    click.echo(f"node {client.address}: serving, up {stats['uptime_s']:.0f} s")
    row_cache = (
        f"{stats['row_cache_bytes'] / MiB:.1f} of {stats['row_cache_capacity_bytes'] / MiB:.0f} MiB"
        if stats["row_cache_capacity_bytes"]
        else "off"
    )
    click.echo(
        f"block cache {stats['block_cache_bytes'] / MiB:.1f} MiB in use; row cache {row_cache}"
    )
    rows = [
        ("TABLE", "VERSION", "UPDATED", "DELETED", "READ", "NEWEST EVENT AGE", "LAG P50", "LAG P99")
    ]
    for name, t in stats["tables"].items():
        age = f"{t['newest_event_age_us'] / 1e6:.3f} s" if t["newest_event_time_us"] else "-"
        rows.append(
            (
                name,
                str(t["version"]),
                str(t["rows_updated"]),
                str(t["keys_deleted"]),
                str(t["keys_read"]),
                age,
                f"{t['lag_p50_us'] / 1e3:.2f} ms" if t["lag_samples"] else "-",
                f"{t['lag_p99_us'] / 1e3:.2f} ms" if t["lag_samples"] else "-",
            )
        )
    print_table(rows)
