"""Where shards go: pure functions from a placement (and shard sizes) to a new placement.

* ``place_table``: a new table's shards, each on the node with the fewest replicas (then
  the fewest bytes, then the fewest shards of that table): counts stay within one of
  each other and a table spreads over the nodes. Its replicas are Available at once
  (an empty shard has nothing to copy).
* ``plan_moves``: the moves that bring the replicas onto a set of nodes, balanced by
  count, moving only what must move: the replicas of nodes that leave the set, then,
  while one node holds two or more replicas more than another, one replica from the
  fullest to the emptiest. Bytes held decide which replica moves and where: the one
  that best evens the two nodes' bytes.
* ``join`` / ``drain``: a node enters or leaves the set; its moves are applied as
  Leaving (source) and Initializing (target) replicas. ``finish_move`` makes the
  target Available and drops the Leaving source once its data has been copied.
  Draining the last node that could hold a shard is refused. ``restart_move`` bumps a
  move's attempt (its source gave a hand-over up), so a finish of the earlier attempt
  is refused.

Replicas (docs/cluster.md, "Replicas"): ``catch_up`` makes a returning node's replicas
of tables with several replicas Initializing, each copying from an Available peer that
is live (or re-points a catch-up whose peer went); ``re_replicate`` replaces the
replicas of a node gone past the grace period by new Initializing ones on other
nodes. Such an Initializing replica names an *Available* source (a move's names a
Leaving one): it is filled without a seal, and its finish leaves the source in place.

Everything is deterministic: the same input gives the same placement on every node.
Sizes are bytes per (table, shard) as the nodes report them; a missing size is 0.
Only Available and Initializing replicas count as a node's load (Leaving ones go).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace

from kvstore.cluster.placement import Placement, Replica, ShardState, TablePlacement
from kvstore.errors import InvalidArgument
from kvstore.schema import TableSchema

__all__ = [
    "Move",
    "catch_up",
    "drain",
    "finish_move",
    "join",
    "moving_to",
    "place_table",
    "plan_moves",
    "re_replicate",
    "restart_move",
]

Sizes = Mapping[tuple[str, int], int]


@dataclass(frozen=True, order=True)
class Move:
    """Copy shard ``shard`` of ``table`` from node ``source`` to node ``target``."""

    table: str
    shard: int
    source: str
    target: str


class _Loads:
    """Replica count, bytes and per-table count of each node, updated as moves are planned."""

    def __init__(self, placement: Placement, nodes: Iterable[str], sizes: Sizes) -> None:
        self.sizes = sizes
        self.count: dict[str, int] = {node: 0 for node in nodes}
        self.bytes: dict[str, int] = dict.fromkeys(self.count, 0)
        self.per_table: dict[tuple[str, str], int] = defaultdict(int)
        self.holds: set[tuple[str, str, int]] = set()
        for name, table in placement.tables.items():
            for shard, replicas in enumerate(table.shards):
                for replica in replicas:
                    if replica.state != ShardState.LEAVING:
                        self.add(replica.node, name, shard)

    def size(self, table: str, shard: int) -> int:
        return self.sizes.get((table, shard), 0)

    def add(self, node: str, table: str, shard: int, sign: int = 1) -> None:
        if sign > 0:
            self.holds.add((node, table, shard))
        else:
            self.holds.discard((node, table, shard))
        if node in self.count:
            self.count[node] += sign
            self.bytes[node] += sign * self.size(table, shard)
        self.per_table[node, table] += sign

    def emptiest(self, table: str, shard: int, among: Iterable[str]) -> str | None:
        """The node that should take a replica of (table, shard): fewest replicas, then
        bytes, then shards of that table; None when every node already holds one."""
        free = [n for n in among if (n, table, shard) not in self.holds]
        if not free:
            return None
        return min(free, key=lambda n: (self.count[n], self.bytes[n], self.per_table[n, table], n))


def place_table(
    placement: Placement,
    schema: TableSchema,
    replicas: int = 1,
    write_quorum: int = 0,
    zones: Mapping[str, str] | None = None,
) -> Placement:
    """``placement`` with ``schema``'s table added, its shards spread over the nodes:
    ``replicas`` of each on distinct nodes, and in distinct ``zones`` (node id → zone)
    as long as a zone without one is left; ``write_quorum`` 0 means a majority."""
    if replicas < 1:
        raise InvalidArgument(f"a table has at least 1 replica, not {replicas}")
    if not 0 <= write_quorum <= replicas:
        raise InvalidArgument(
            f"the write quorum of a table with {replicas} replicas is between 1 and "
            f"{replicas} (0: a majority), not {write_quorum}"
        )
    if not placement.nodes:
        raise InvalidArgument(
            f"cannot place table {schema.name!r}: no node has joined the cluster yet"
        )
    if replicas > len(placement.nodes):
        raise InvalidArgument(
            f"cannot place table {schema.name!r} with {replicas} replicas on "
            f"{len(placement.nodes)} nodes"
        )
    loads = _Loads(placement, placement.nodes, {})
    shards = []
    for shard in range(schema.shards):
        holders: list[Replica] = []
        for _ in range(replicas):
            used = {(zones or {}).get(r.node, "") for r in holders}
            spread = [n for n in placement.nodes if not zones or zones.get(n, "") not in used]
            node = loads.emptiest(schema.name, shard, spread) or loads.emptiest(
                schema.name, shard, placement.nodes
            )
            assert node is not None  # replicas <= nodes: a node without this shard remains
            loads.add(node, schema.name, shard)
            holders.append(Replica(node, ShardState.AVAILABLE))
        shards.append(tuple(holders))
    return placement.with_table(
        TablePlacement(
            schema.to_json(),
            0,
            tuple(shards),
            replicas=replicas,
            write_quorum=write_quorum,
        )
    )


def plan_moves(placement: Placement, nodes: Iterable[str], sizes: Sizes) -> list[Move]:
    """The moves that bring every replica onto ``nodes``, balanced (see the module doc).

    Raises InvalidArgument when a replica on a node outside ``nodes`` has nowhere to go.
    """
    targets = sorted(set(nodes))
    loads = _Loads(placement, targets, sizes)
    moves: list[Move] = []

    # Replicas of the nodes that leave: they must move. Largest first, so the last,
    # small ones even out the bytes.
    leaving = []
    for name, table in sorted(placement.tables.items()):
        for shard, replicas in enumerate(table.shards):
            for replica in replicas:
                if replica.node in loads.count or replica.state == ShardState.LEAVING:
                    continue
                if replica.state == ShardState.INITIALIZING:
                    raise InvalidArgument(
                        f"table {name!r} shard {shard} is still moving to node "
                        f"{replica.node!r}; drain that node once the move has finished"
                    )
                leaving.append((-loads.size(name, shard), name, shard, replica.node))
    for _, name, shard, source in sorted(leaving):
        target = loads.emptiest(name, shard, targets)
        if target is None:
            raise InvalidArgument(
                f"cannot drain node {source!r}: it is the last node that can hold table "
                f"{name!r} shard {shard} (no other node of the cluster is left to take it); "
                "add a node before draining this one"
            )
        loads.add(source, name, shard, -1)
        loads.add(target, name, shard)
        moves.append(Move(name, shard, source, target))

    # Then even the counts out, fullest to emptiest, one replica at a time.
    moved = {(m.table, m.shard) for m in moves}
    while len(targets) > 1:
        full = max(targets, key=lambda n: (loads.count[n], loads.bytes[n], n))
        empty = min(targets, key=lambda n: (loads.count[n], loads.bytes[n], n))
        if loads.count[full] - loads.count[empty] <= 1:
            break
        # The size that would leave both nodes at the mean bytes once their counts reach
        # the mean too (aiming at the end state: evening out at each step overshoots).
        mean_count = sum(loads.count.values()) / len(targets)
        mean_bytes = sum(loads.bytes.values()) / len(targets)
        needs = max(1.0, round(mean_count - loads.count[empty]))
        spare = max(1.0, round(loads.count[full] - mean_count))
        wanted = (
            (mean_bytes - loads.bytes[empty]) / needs + (loads.bytes[full] - mean_bytes) / spare
        ) / 2
        candidates = [
            (name, shard)
            for name, shard, replica in placement.replicas_on(full)
            if replica.state == ShardState.AVAILABLE
            and (name, shard) not in moved
            and (empty, name, shard) not in loads.holds
        ]
        if not candidates:
            break  # only with replicas > 1: every shard here is on the emptiest node too
        name, shard = min(
            candidates,
            key=lambda c: (
                # the size that best evens the bytes; then the table this node holds
                # most of, relative to the other (spreads a table's shards)
                abs(loads.size(*c) - wanted),
                loads.per_table[empty, c[0]] - loads.per_table[full, c[0]],
                c,
            ),
        )
        loads.add(full, name, shard, -1)
        loads.add(empty, name, shard)
        moved.add((name, shard))
        moves.append(Move(name, shard, full, empty))
    return moves


def _apply(placement: Placement, moves: list[Move]) -> Placement:
    tables = dict(placement.tables)
    for move in moves:
        table = tables[move.table]
        stays = [
            Replica(r.node, ShardState.LEAVING) if r.node == move.source else r
            for r in table.shards[move.shard]
        ]
        replicas = (*stays, Replica(move.target, ShardState.INITIALIZING, source=move.source))
        tables[move.table] = table.with_shard(move.shard, replicas)
    return replace(placement, tables=tables)


def join(placement: Placement, node: str, sizes: Sizes) -> Placement:
    """``placement`` with ``node`` taking shards: the moves that rebalance onto it applied."""
    if node in placement.nodes:
        return placement
    nodes = (*placement.nodes, node)
    return replace(_apply(placement, plan_moves(placement, nodes, sizes)), nodes=nodes)


def drain(placement: Placement, node: str, sizes: Sizes) -> Placement:
    """``placement`` with ``node``'s replicas moving to the other nodes; InvalidArgument
    when ``node`` is unknown or is the last node that can hold one of its shards."""
    if node not in placement.nodes:
        raise InvalidArgument(
            f"node {node!r} is not one of the cluster's nodes ({', '.join(placement.nodes)})"
        )
    nodes = tuple(n for n in placement.nodes if n != node)
    return replace(_apply(placement, plan_moves(placement, nodes, sizes)), nodes=nodes)


def finish_move(placement: Placement, table: str, shard: int, node: str) -> Placement:
    """The Initializing replica of (table, shard) on ``node`` made Available, and the
    Leaving replica it was copied from dropped: the move's data has been copied."""
    placed = placement.table(table)
    replicas = placed.shards[shard]
    moving = [r for r in replicas if r.node == node and r.state == ShardState.INITIALIZING]
    if not moving:
        raise InvalidArgument(f"table {table!r} shard {shard} is not moving to node {node!r}")
    source = moving[0].source
    done = tuple(
        Replica(r.node, ShardState.AVAILABLE) if r.node == node else r
        for r in replicas
        if not (r.node == source and r.state == ShardState.LEAVING)
    )
    return placement.with_table(placed.with_shard(shard, done))


def moving_to(
    placement: Placement, table: str, shard: int, source: str, node: str = ""
) -> Replica | None:
    """The Initializing replica of (table, shard) copying from ``source`` (on ``node``,
    when given: with replicas, several may copy from one source), if any."""
    placed = placement.tables.get(table)
    if placed is None or not 0 <= shard < len(placed.shards):
        return None
    return next(
        (
            r
            for r in placed.shards[shard]
            if r.state == ShardState.INITIALIZING
            and r.source == source
            and (not node or r.node == node)
        ),
        None,
    )


def restart_move(placement: Placement, table: str, shard: int, source: str) -> Placement:
    """The move of (table, shard) from ``source`` with its attempt bumped; ``placement``
    unchanged if no such move is in flight (it finished, or never was)."""
    moving = moving_to(placement, table, shard, source)
    if moving is None:
        return placement
    placed = placement.table(table)
    replicas = tuple(
        replace(r, attempt=r.attempt + 1) if r == moving else r for r in placed.shards[shard]
    )
    return placement.with_table(placed.with_shard(shard, replicas))


def _live_peer(replicas: tuple[Replica, ...], node: str, live: Collection[str]) -> str:
    """An Available replica's node other than ``node`` that is live ("" if none)."""
    return next(
        (
            r.node
            for r in replicas
            if r.node != node and r.node in live and r.state == ShardState.AVAILABLE
        ),
        "",
    )


def catch_up(
    placement: Placement, node: str, live: Collection[str], returning: bool = True
) -> Placement:
    """``placement`` with ``node``'s replicas that may have missed writes made to catch
    up (when ``returning``: the node starts, or registers again after its lease
    lapsed): each Available replica of a table with several replicas, whose shard has
    an Available replica on another live node, becomes Initializing from that peer (it
    takes writes, serves no reads). Always: a catch-up already placed whose peer is not
    live any more copies from another live Available peer, or, with none left, is
    Available again (this node's copy is then the best there is)."""
    tables = dict(placement.tables)
    for name, table in placement.tables.items():
        if table.replicas < 2:
            continue
        for shard, replicas in enumerate(table.shards):
            mine = next((r for r in replicas if r.node == node), None)
            if mine is None or mine.state == ShardState.LEAVING:
                continue
            if mine.state == ShardState.INITIALIZING:
                source = next((r for r in replicas if r.node == mine.source), None)
                if source is None or source.state != ShardState.AVAILABLE:
                    continue  # a move's target (its source is Leaving): the move goes on
                if mine.source in live:
                    continue
            elif not returning:
                continue
            peer = _live_peer(replicas, node, live)
            if peer:
                changed = Replica(node, ShardState.INITIALIZING, source=peer)
            elif mine.state == ShardState.INITIALIZING:
                changed = Replica(node, ShardState.AVAILABLE)
            else:
                continue
            if changed == mine:
                continue
            table = table.with_shard(
                shard, tuple(changed if r.node == node else r for r in replicas)
            )
        tables[name] = table
    return replace(placement, tables=tables)


def re_replicate(
    placement: Placement, dead: str, live: Collection[str], zones: Mapping[str, str]
) -> Placement:
    """``placement`` with the replicas of node ``dead`` (gone past the grace period)
    replaced: each Available or Initializing one whose shard has an Available replica
    on a live node is dropped, and a new Initializing replica copying from that peer
    goes to the live node with the fewest replicas that holds none of the shard
    (another zone than the shard's other replicas where one is left). A replica with no
    live Available peer stays (its data is only there). ``dead`` leaves the nodes that
    take shards once it holds nothing (it joins again when it comes back)."""
    targets = sorted(n for n in placement.nodes if n in live and n != dead)
    loads = _Loads(placement, targets, {})
    tables = dict(placement.tables)
    for name, table in sorted(placement.tables.items()):
        for shard, replicas in enumerate(table.shards):
            gone = next((r for r in replicas if r.node == dead), None)
            if gone is None or gone.state == ShardState.LEAVING:
                continue
            peer = _live_peer(replicas, dead, live)
            if not peer:
                continue
            used = {zones.get(r.node, "") for r in replicas if r.node != dead}
            spread = [n for n in targets if zones.get(n, "") not in used]
            target = loads.emptiest(name, shard, spread) or loads.emptiest(name, shard, targets)
            if target is None:
                continue  # no node left to take it: it catches up when it is back
            loads.add(target, name, shard)
            kept = tuple(r for r in replicas if r.node != dead)
            kept = (*kept, Replica(target, ShardState.INITIALIZING, source=peer))
            table = table.with_shard(shard, kept)
        tables[name] = table
    changed = replace(placement, tables=tables)
    if not changed.replicas_on(dead):
        changed = replace(changed, nodes=tuple(n for n in changed.nodes if n != dead))
    return changed
