"""What a clustered node serves: reads need an Available or Leaving replica of the
key's shard on the node, writes a replica in any state; anything else is StaleMap
with the node's epoch, and the map's owner of a shard is its first Available, else
Leaving, replica."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from kvstore.cluster.placement import Placement, Replica, ShardState, TablePlacement
from kvstore.errors import StaleMap
from kvstore.keys import KeyBatch
from kvstore.server.cluster_view import ClusterView, shard_owners

AVAILABLE, FILLING, LEAVING = ShardState.AVAILABLE, ShardState.INITIALIZING, ShardState.LEAVING


def _placement() -> Placement:
    schema = {"name": "t", "key": "int64", "shards": 4, "schema_id": 1, "features": {}}
    shards = (
        (Replica("me", AVAILABLE),),
        (Replica("me", LEAVING), Replica("other", FILLING, "me")),
        (Replica("other", LEAVING), Replica("me", FILLING, "other")),
        (Replica("other", AVAILABLE),),
    )
    return Placement(
        epoch=9, nodes=("me", "other"), tables={"t": TablePlacement(schema, 0, shards)}
    )


def _keys_of_shard(shard: int) -> KeyBatch:
    candidates = np.arange(1000, dtype=np.int64)
    ids = KeyBatch.from_values("int64", candidates, "t").shard_ids(4)
    return KeyBatch.from_values("int64", candidates[ids == shard][:3], "t")


@pytest.mark.parametrize(
    ("shard", "reads", "writes"),
    [(0, True, True), (1, True, True), (2, False, True), (3, False, False)],
)
def test_reads_need_available_or_leaving_and_writes_any_replica(shard, reads, writes) -> None:
    view = ClusterView("me")
    view.apply(_placement())
    keys = _keys_of_shard(shard)
    for writing, allowed in ((False, reads), (True, writes)):
        if allowed:
            view.check("t", keys, writing)
        else:
            with pytest.raises(StaleMap, match=f"shard {shard} of table 't'") as caught:
                view.check("t", keys, writing)
            assert caught.value.epoch == 9


def test_a_batch_with_one_key_elsewhere_is_refused_whole() -> None:
    view = ClusterView("me")
    view.apply(_placement())
    mixed = np.concatenate([_keys_of_shard(0).ints, _keys_of_shard(3).ints])
    with pytest.raises(StaleMap, match="shard 3"):
        view.check("t", KeyBatch.from_values("int64", mixed, "t"), writing=True)
    view.check("t", KeyBatch.from_values("int64", np.empty(0, np.int64), "t"), writing=False)


def test_an_unknown_table_or_no_placement_yet_is_stale() -> None:
    view = ClusterView("me")
    with pytest.raises(StaleMap, match="epoch 0") as caught:
        view.check("t", _keys_of_shard(0), writing=False)
    assert caught.value.epoch == 0
    view.apply(_placement())
    with pytest.raises(StaleMap, match="no shard of table 'u'"):
        view.check("u", _keys_of_shard(0), writing=False)


def test_the_owner_of_a_shard_is_its_first_available_else_leaving_replica() -> None:
    assert shard_owners(_placement(), "t") == ["me", "me", "other", "other"]


def test_a_sealed_shard_makes_its_writes_wait_until_the_seal_ends() -> None:
    async def scenario() -> None:
        view = ClusterView("me")
        view.apply(_placement())
        view.seal("t", 1)
        assert view.sealed_wait("t", _keys_of_shard(0)) is None  # another shard: no wait
        assert view.sealed_wait("t", KeyBatch.from_values("int64", [], "t")) is None
        waiting = view.sealed_wait("t", _keys_of_shard(1))
        assert waiting is not None and not waiting.done()
        view.unseal("t", 1)
        await asyncio.wait_for(waiting, 1)
        assert view.sealed_wait("t", _keys_of_shard(1)) is None

    asyncio.run(scenario())


def test_a_write_being_applied_is_counted_until_it_ends() -> None:
    view = ClusterView("me")
    view.apply(_placement())
    token = view.begin_write("t")
    assert view.writing["t"] == {token}
    view.end_write("t", token)
    assert not view.writing["t"]
