"""``kvstore cluster status`` and ``kvstore drain``: the cluster's nodes, tables (with
their replicas: how many are Available) and placement epoch; moving a node's shards
away.

Status is read from the cluster map of the node asked (any node answers it from its
watch of the placement) and from each reachable node's own ``Stats``. ``drain`` asks
any node to change the placement (DrainNode), then follows the cluster map until the
drained node holds no replica.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import click
import grpc

from kvstore.cli.connection import node_options, open_client
from kvstore.cli.output import examples, print_table
from kvstore.errors import DeadlineExceeded, KvstoreError, from_rpc_error
from kvstore.wire.dial import dial_address, open_channel
from kvstore.wire.messages import cluster_map_json

__all__ = ["cluster", "drain"]


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
    serves, the shards moving to it and away from it, uptime), every table (shards,
    version) and the placement epoch."""
    from kvstore.v1 import feature_store_pb2_grpc as pb_grpc

    with open_channel(address) as channel:
        raw = _cluster_map(pb_grpc.FeatureStoreStub(channel), address, timeout)
    cmap = cluster_map_json(raw)
    moving, replication = _moving(raw)
    held: Counter[int] = Counter()
    for owners in cmap["tables"].values():
        held.update(owners)
    for i, node in enumerate(cmap["nodes"]):
        node["shards"] = held[i]
        node["moving_in"], node["moving_out"] = moving.get(node["node_id"], (0, 0))
        node["uptime_s"] = None
        if node["state"] == "live" and node["address"]:
            try:
                with open_client(dial_address(node["address"], address), timeout) as other:
                    node["uptime_s"] = other.stats()["uptime_s"]
            except KvstoreError as exc:
                node["error"] = str(exc)
    if as_json:
        click.echo(json.dumps(cmap, indent=1))
        return
    click.echo(f"placement epoch {cmap['epoch']}, {len(cmap['nodes'])} node(s)")
    rows: list[tuple[str, ...]] = [
        ("NODE", "ADDRESS", "FAST ADDRESS", "ZONE", "STATE", "SHARDS", "MOVING", "UPTIME")
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
                f"+{node['moving_in']} -{node['moving_out']}"
                if node["moving_in"] or node["moving_out"]
                else "-",
                f"{up:.0f} s" if up is not None else "-",
            )
        )
    print_table(rows)
    click.echo("")
    rows = [("TABLE", "SHARDS", "VERSION", "NODES", "REPLICAS", "AVAILABLE")]
    for name, owners in sorted(cmap["tables"].items()):
        count, quorum, available, placed = replication.get(name, (1, 1, 0, 0))
        rows.append(
            (
                name,
                str(len(owners)),
                str(cmap["versions"].get(name, 0)),
                str(len(set(owners))),
                f"{count} (quorum {quorum})",
                f"{available}/{placed}",
            )
        )
    print_table(rows)


@click.command(
    "drain",
    short_help="Move a node's shards to the other nodes; then it may stop.",
    epilog=examples("kvstore drain n2 -a 127.0.0.1:7071", "kvstore drain n2 --no-wait"),
)
@click.argument("node_id")
@click.option("--no-wait", is_flag=True, help="return once the moves are placed, not done")
@click.option(
    "--wait-timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="give up waiting for the moves after this many seconds",
)
@node_options(timeout_default_s=15.0)
def drain(node_id: str, no_wait: bool, wait_timeout: float, address: str, timeout: float) -> None:
    """Move every shard of node NODE_ID to the other nodes (reads and writes go on), wait
    until it holds none, and say it may stop. Refused: an unknown node, or the last node
    that can hold a shard (add a node first)."""
    from kvstore.v1 import feature_store_pb2 as pb
    from kvstore.v1 import feature_store_pb2_grpc as pb_grpc

    with open_channel(address) as channel:
        stub = pb_grpc.FeatureStoreStub(channel)
        try:
            answer = stub.DrainNode(pb.DrainNodeRequest(node_id=node_id), timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, address, timeout) from None
        click.echo(
            f"node {node_id}: {answer.moving} shard replica(s) moving away "
            f"(placement epoch {answer.epoch})"
        )
        if no_wait:
            return
        deadline = time.monotonic() + wait_timeout
        last = -1
        while True:
            cmap = _cluster_map(stub, address, timeout)
            left = _replicas_on(cmap, node_id)
            if left != last:
                click.echo(f"node {node_id}: {left} shard replica(s) left (epoch {cmap.epoch})")
                last = left
            if not left:
                break
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"node {node_id} still holds {left} shard replica(s) after "
                    f"{wait_timeout:g} s; the moves go on (kvstore cluster status)"
                )
            time.sleep(0.2)  # a progress poll of the map, not a synchronisation
    click.echo(f"node {node_id} holds no shard: it may stop")


def _cluster_map(stub, address: str, timeout: float):
    """The cluster map (the proto) as node ``address`` has it."""
    from kvstore.v1 import feature_store_pb2 as pb

    try:
        return stub.GetClusterMap(pb.GetClusterMapRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc, address, timeout) from None


def _moving(
    cmap,
) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int, int, int]]]:
    """Node id → (shards moving to it or catching up there, shards moving away from it),
    from the map's replica states (Initializing, Leaving); and table → (replicas per
    shard, write quorum, Available replicas, replicas placed)."""
    ids = [n.node_id for n in cmap.nodes]
    moves: dict[str, tuple[int, int]] = {}
    replication: dict[str, tuple[int, int, int, int]] = {}
    for table in cmap.tables:
        states = [state for replicas in table.replicas for state in replicas.state]
        replication[table.table] = (
            table.replica_count or 1,
            table.write_quorum or 1,
            states.count("Available"),
            len(states),
        )
        for replicas in table.replicas:
            for index, state in zip(replicas.node, replicas.state, strict=True):
                into, away = moves.get(ids[index], (0, 0))
                moves[ids[index]] = (
                    into + (state == "Initializing"),
                    away + (state == "Leaving"),
                )
    return moves, replication


def _replicas_on(cmap, node_id: str) -> int:
    """Replicas (any state) the map gives ``node_id``."""
    index = next((i for i, n in enumerate(cmap.nodes) if n.node_id == node_id), None)
    if index is None:
        return 0
    return sum(
        list(replicas.node).count(index) for table in cmap.tables for replicas in table.replicas
    )
