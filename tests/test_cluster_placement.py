"""Placement: shards spread over nodes by count and bytes, changed in etcd only by CAS.

The assignment functions are plain unit tests; the store's tests run a real etcd (one
per module, one cluster name per test).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import replace

import pytest
from etcd_server import EtcdServer

from kvstore.cluster.assignment import Move, drain, finish_move, join, place_table, plan_moves
from kvstore.cluster.etcd import connect
from kvstore.cluster.placement import (
    Placement,
    PlacementStore,
    Replica,
    ShardState,
    watch_placement,
)
from kvstore.errors import AlreadyExists, InvalidArgument, TableNotFound, Unavailable
from kvstore.schema import TableSchema


def _schema(name: str, shards: int = 8, dtype: str = "float32") -> TableSchema:
    return TableSchema.build(name, "int64", {"x": dtype}, shards=shards)


def _finish_all(placement: Placement) -> Placement:
    for name, table in placement.tables.items():
        for shard, replicas in enumerate(table.shards):
            for replica in replicas:
                if replica.state == ShardState.INITIALIZING:
                    placement = finish_move(placement, name, shard, replica.node)
    return placement


def _counts(placement: Placement) -> dict[str, int]:
    return {node: len(placement.replicas_on(node)) for node in placement.nodes}


def _bytes(placement: Placement, sizes) -> dict[str, int]:
    return {
        node: sum(sizes.get((t, s), 0) for t, s, _ in placement.replicas_on(node))
        for node in placement.nodes
    }


def _holders(placement: Placement) -> dict[tuple[str, int], str]:
    return {
        (name, shard): replicas[0].node
        for name, table in placement.tables.items()
        for shard, replicas in enumerate(table.shards)
    }


# --- assignment: pure functions -----------------------------------------------------------


def test_a_new_table_spreads_its_shards_evenly_and_is_available_at_once():
    placement = Placement(nodes=("n1", "n2", "n3"))
    placement = place_table(placement, _schema("a", shards=8))
    placement = place_table(placement, _schema("b", shards=4))
    assert _counts(placement) == {"n1": 4, "n2": 4, "n3": 4}
    # Each table on its own is spread too (3/3/2 and 2/1/1, not all on one node).
    per_node_a = [
        sum(1 for t, _, _ in placement.replicas_on(n) if t == "a") for n in ["n1", "n2", "n3"]
    ]
    assert sorted(per_node_a) == [2, 3, 3]
    for table in placement.tables.values():
        for replicas in table.shards:
            assert len(replicas) == 1 and replicas[0].state == ShardState.AVAILABLE
    # Deterministic: every node computes the same placement.
    again = place_table(
        place_table(Placement(nodes=("n1", "n2", "n3")), _schema("a")), _schema("b", 4)
    )
    assert again == placement


def test_a_table_needs_a_node():
    with pytest.raises(InvalidArgument, match="no node has joined"):
        place_table(Placement(), _schema("a"))


def test_joining_moves_only_what_must_move_and_balances_counts():
    placement = Placement(nodes=("n1", "n2"))
    placement = place_table(placement, _schema("a", shards=12))
    before = _holders(placement)
    joined = join(placement, "n3", sizes={})
    # 12 replicas on 3 nodes: the newcomer takes 4, and those are the only moves.
    moving = [
        (name, shard, replicas)
        for name, table in joined.tables.items()
        for shard, replicas in enumerate(table.shards)
        if len(replicas) > 1
    ]
    assert len(moving) == 4
    for name, shard, replicas in moving:
        source = before[name, shard]
        assert replicas == (
            Replica(source, ShardState.LEAVING),
            Replica("n3", ShardState.INITIALIZING, source=source),
        )
    done = _finish_all(joined)
    assert _counts(done) == {"n1": 4, "n2": 4, "n3": 4}
    after = _holders(done)
    assert sum(before[k] != after[k] for k in before) == 4
    # Joining a node already there changes nothing.
    assert join(done, "n2", sizes={}) == done


def test_joining_moves_the_shards_that_even_out_the_bytes():
    placement = Placement(nodes=("n1", "n2"))
    placement = place_table(placement, _schema("a", shards=8))
    holders = _holders(placement)
    # n1's shards are two big ones and two tiny ones; n2's all tiny.
    big = [k for k, node in sorted(holders.items()) if node == "n1"][:2]
    sizes = {k: (1000 if k in big else 1) for k in holders}
    done = _finish_all(join(placement, "n3", sizes))
    assert _counts(done) in ({"n1": 3, "n2": 3, "n3": 2}, {"n1": 2, "n2": 3, "n3": 3})
    by_node = _bytes(done, sizes)
    # One big shard moved to the newcomer: 1000-ish on n1 and n3, not 2000 on n1.
    assert by_node["n3"] >= 1000 and by_node["n1"] < 2000


@pytest.mark.parametrize("seed", range(40))
def test_growing_a_cluster_keeps_counts_within_one_and_bytes_within_about_a_shard(seed):
    rng = random.Random(seed)
    placement = Placement(nodes=("n1",))
    sizes = {}
    for t in range(rng.randint(1, 4)):
        schema = _schema(f"t{t}", shards=rng.choice([4, 8, 16, 32]))
        placement = place_table(placement, schema)
        sizes.update({(schema.name, s): rng.randint(1, 1000) for s in range(schema.shards)})
    total_moves = 0
    for i in range(2, rng.randint(2, 6) + 1):
        before = _holders(placement)
        placement = _finish_all(join(placement, f"n{i}", sizes))
        after = _holders(placement)
        moved = sum(before[k] != after[k] for k in before)
        # Minimal by count: the newcomer's share, and nothing between old nodes.
        assert moved == len(placement.replicas_on(f"n{i}"))
        assert all(after[k] == f"n{i}" for k in before if before[k] != after[k])
        total_moves += moved
    counts = _counts(placement).values()
    assert max(counts) - min(counts) <= 1
    by_node = _bytes(placement, sizes).values()
    # Bounded by the sizes of a shard or two (the heuristic's measured worst: 1.42x).
    assert max(by_node) - min(by_node) <= 1.5 * max(sizes.values())


def test_draining_moves_the_nodes_shards_to_the_others_evenly():
    placement = place_table(Placement(nodes=("n1", "n2", "n3")), _schema("a", shards=9))
    before = _holders(placement)
    drained = drain(placement, "n2", sizes={})
    assert drained.nodes == ("n1", "n3")
    # n2's replicas are Leaving (still served until the copies are done).
    assert all(r.state == ShardState.LEAVING for _, _, r in drained.replicas_on("n2"))
    done = _finish_all(drained)
    assert done.replicas_on("n2") == []
    assert _counts(done) in ({"n1": 5, "n3": 4}, {"n1": 4, "n3": 5})
    after = _holders(done)
    assert {k for k in before if before[k] != after[k]} == {k for k in before if before[k] == "n2"}


def test_a_node_opens_and_closes_the_shards_that_a_move_adds_and_removes():
    placement = place_table(Placement(nodes=("n1",)), _schema("a", shards=4))
    assert placement.held_by("n1") == {("a", s) for s in range(4)}
    joined = join(placement, "n2", sizes={})
    # During the moves both hold the moving shards: n1 keeps serving them.
    assert joined.held_by("n1") == placement.held_by("n1")
    to_open = joined.held_by("n2") - placement.held_by("n2")
    assert len(to_open) == 2
    done = _finish_all(joined)
    assert placement.held_by("n1") - done.held_by("n1") == to_open  # n1 closes them
    assert done.held_by("n2") == to_open


def test_draining_the_last_node_holding_a_shard_is_refused():
    placement = place_table(Placement(nodes=("n1",)), _schema("a", shards=2))
    with pytest.raises(InvalidArgument, match=r"cannot drain node 'n1'.*last node.*table 'a'"):
        drain(placement, "n1", sizes={})
    with pytest.raises(InvalidArgument, match="not one of the cluster's nodes"):
        drain(placement, "n9", sizes={})
    # A node holding nothing can go even when it is the last.
    assert drain(Placement(nodes=("n1",)), "n1", sizes={}).nodes == ()


def test_a_move_in_flight_must_finish_before_its_target_is_drained():
    placement = place_table(Placement(nodes=("n1",)), _schema("a", shards=2))
    joined = join(placement, "n2", sizes={})
    with pytest.raises(InvalidArgument, match="still moving to node 'n2'"):
        drain(joined, "n2", sizes={})
    with pytest.raises(InvalidArgument, match="is not moving to node 'n1'"):
        finish_move(joined, "a", 0, "n1")


def test_plan_moves_is_deterministic():
    placement = place_table(Placement(nodes=("n1", "n2")), _schema("a", shards=16))
    sizes = {("a", s): (s * 37) % 11 for s in range(16)}
    first = plan_moves(placement, ["n1", "n2", "n3", "n4"], sizes)
    assert first == plan_moves(placement, ["n4", "n3", "n2", "n1"], sizes)
    assert len(first) == 8 and all(isinstance(m, Move) for m in first)


def test_the_placement_document_round_trips_through_json():
    placement = join(place_table(Placement(nodes=("n1",)), _schema("a", 4)), "n2", sizes={})
    placement = replace(placement, epoch=12, last_schema_id=3)
    assert Placement.from_json(placement.to_json()) == placement
    with pytest.raises(TableNotFound, match="'zzz'"):
        placement.table("zzz")


# --- the store in etcd --------------------------------------------------------------------


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory) -> EtcdServer:
    server = EtcdServer(tmp_path_factory.mktemp("etcd")).start()
    yield server
    server.stop()


@pytest.fixture
def cluster() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def test_concurrent_updates_all_apply_once_with_strictly_increasing_epochs(etcd_server, cluster):
    writers = 24

    async def scenario():
        # Several connections, as several nodes would have.
        etcds = [await connect(etcd_server.url, cluster) for _ in range(4)]
        stores = [PlacementStore(etcd) for etcd in etcds]
        seen: list[int] = []

        async def watcher():
            async for placement in watch_placement(etcds[0]):
                seen.append(placement.epoch)
                if len(placement.nodes) == writers:
                    return

        watching = asyncio.create_task(watcher())

        async def add_node(i: int) -> int:
            node = f"n{i:02d}"
            placed = await stores[i % len(stores)].update(
                lambda p: replace(p, nodes=(*p.nodes, node))
            )
            return placed.epoch

        epochs = await asyncio.gather(*(add_node(i) for i in range(writers)))
        assert sorted(epochs) == list(range(1, writers + 1))
        final, _ = await stores[0].read()
        assert final.epoch == writers
        assert sorted(final.nodes) == [f"n{i:02d}" for i in range(writers)]  # each exactly once
        await asyncio.wait_for(watching, 10)
        assert seen == sorted(set(seen)) and seen[-1] == writers
        # A change that changes nothing writes nothing and keeps the epoch.
        assert (await stores[1].update(lambda p: p)).epoch == writers
        for etcd in etcds:
            await etcd.close()

    asyncio.run(scenario())


def test_concurrent_creates_of_one_table_with_different_schemas_have_one_winner(
    etcd_server, cluster
):
    async def scenario():
        etcds = [await connect(etcd_server.url, cluster) for _ in range(2)]
        stores = [PlacementStore(etcd) for etcd in etcds]
        await stores[0].update(lambda p: replace(p, nodes=("n1", "n2")))
        a = _schema("users", dtype="float32")
        b = _schema("users", dtype="int64")
        results = await asyncio.gather(
            stores[0].create_table(a), stores[1].create_table(b), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, Exception)]
        assert len(errors) == 1 and isinstance(errors[0], AlreadyExists), results
        assert "'users' already exists" in str(errors[0])
        winner = next(r for r in results if not isinstance(r, Exception))
        placement, _ = await stores[0].read()
        assert placement.tables["users"] == winner
        assert placement.tables["users"].schema["schema_id"] == 1
        assert _counts(placement) == {"n1": 4, "n2": 4}

        # The same definition twice (also at once) is no error and one table.
        c = _schema("items", shards=4)
        both = await asyncio.gather(stores[0].create_table(c), stores[1].create_table(c))
        assert both[0] == both[1] and both[0].schema["schema_id"] == 2
        placement, _ = await stores[0].read()
        assert sorted(placement.tables) == ["items", "users"] and placement.last_schema_id == 2
        for etcd in etcds:
            await etcd.close()

    asyncio.run(scenario())


def test_join_and_drain_through_the_store(etcd_server, cluster):
    async def scenario():
        etcd = await connect(etcd_server.url, cluster)
        store = PlacementStore(etcd)
        await store.update(lambda p: replace(p, nodes=("n1",)))
        await store.create_table(_schema("a", shards=4))
        joined = await store.update(lambda p: join(p, "n2", sizes={}))
        assert joined.nodes == ("n1", "n2")
        done = await store.update(_finish_all)
        assert _counts(done) == {"n1": 2, "n2": 2}
        await store.update(lambda p: drain(p, "n2", sizes={}))
        done = await store.update(_finish_all)
        assert _counts(done) == {"n1": 4}
        epoch = done.epoch
        with pytest.raises(InvalidArgument, match="last node"):
            await store.update(lambda p: drain(p, "n1", sizes={}))
        # A refused change writes nothing.
        assert (await store.read())[0].epoch == epoch
        await etcd.close()

    asyncio.run(scenario())


def test_etcd_lost_placement_changes_wait_and_the_watch_keeps_the_last_map(tmp_path):
    server = EtcdServer(tmp_path).start()

    async def scenario():
        etcd = await connect(server.url, "c1")
        store = PlacementStore(etcd)
        await store.update(lambda p: replace(p, nodes=("n1",)))
        seen: list[Placement] = []
        first = asyncio.Event()

        async def watcher():
            async for placement in watch_placement(etcd):
                seen.append(placement)
                first.set()

        watching = asyncio.create_task(watcher())
        await asyncio.wait_for(first.wait(), 5)

        server.kill()
        with pytest.raises(Unavailable, match=f"etcd at {server.url}"):
            await store.update(lambda p: replace(p, nodes=(*p.nodes, "n2")), deadline_s=1.0)
        # An update started while etcd is away waits for it and then applies.
        pending = asyncio.create_task(
            store.update(lambda p: replace(p, nodes=(*p.nodes, "n3")), deadline_s=30.0)
        )
        await asyncio.to_thread(server.start)
        placed = await asyncio.wait_for(pending, 30)
        assert placed.nodes == ("n1", "n3") and placed.epoch == 2
        async with asyncio.timeout(10):
            while seen[-1].epoch != 2:
                await asyncio.sleep(0.05)
        assert [p.epoch for p in seen] == [1, 2]
        watching.cancel()
        await etcd.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
