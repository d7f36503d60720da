"""``kvstore cluster status``: the cluster's nodes, tables and placement epoch.

Read from the cluster map of the node asked (any node answers it from its watch of
the placement) and from each reachable node's own ``Stats``.
"""

from __future__ import annotations

import json
from collections import Counter

import click

from kvstore.cli.connection import node_options, open_client
from kvstore.cli.output import examples, print_table
from kvstore.errors import KvstoreError
from kvstore.wire.dial import dial_address

__all__ = ["cluster"]


@click.group("cluster", short_help="The cluster: nodes, tables, placement.")
def cluster() -> None:
    """The cluster a node belongs to (docs/cluster.md)."""


@cluster.command(
    "status",
    short_help="Nodes (address, zone, state, shards held), tables and the placement epoch.",
    epilog=examples("kvstore cluster status -a 127.0.0.1:7071", "kvstore cluster status --json"),
)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
@node_options()
def status(as_json: bool, address: str, timeout: float) -> None:
    """Every node of the cluster map (id, address, zone, live or down, the shards it
    serves, uptime), every table (shards, version) and the placement epoch."""
    with open_client(address, timeout) as client:
        cmap = client.cluster_map()
        seed = client.address
    held: Counter[int] = Counter()
    for owners in cmap["tables"].values():
        held.update(owners)
    for i, node in enumerate(cmap["nodes"]):
        node["shards"] = held[i]
        node["uptime_s"] = None
        if node["state"] == "live" and node["address"]:
            try:
                with open_client(dial_address(node["address"], seed), timeout) as other:
                    node["uptime_s"] = other.stats()["uptime_s"]
            except KvstoreError as exc:
                node["error"] = str(exc)
    if as_json:
        click.echo(json.dumps(cmap, indent=1))
        return
    click.echo(f"placement epoch {cmap['epoch']}, {len(cmap['nodes'])} node(s)")
    rows: list[tuple[str, ...]] = [
        ("NODE", "ADDRESS", "FAST ADDRESS", "ZONE", "STATE", "SHARDS", "UPTIME")
    ]
    for node in cmap["nodes"]:
        up = node["uptime_s"]
        rows.append(
            (
                node["node_id"],
                node["address"] or "-",
                node["fast_address"] or "-",
                node["zone"] or "-",
                node["state"] if "error" not in node else "unreachable",
                str(node["shards"]),
                f"{up:.0f} s" if up is not None else "-",
            )
        )
    print_table(rows)
    click.echo("")
    rows = [("TABLE", "SHARDS", "VERSION", "NODES")]
    for name, owners in sorted(cmap["tables"].items()):
        rows.append(
            (name, str(len(owners)), str(cmap["versions"].get(name, 0)), str(len(set(owners))))
        )
    print_table(rows)
