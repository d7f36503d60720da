"""A move's change log on the source (kvstore.server.transfer.ChangeLog): every applied
batch in order, forgotten once the target has taken it, dropped past its byte cap (the
move then starts over rather than losing a change). The target (ShardReceiver) writes
the files it is sent inside its staging directory only."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.config import NodeConfig
from kvstore.errors import InvalidArgument, Unavailable
from kvstore.schema import TableSchema
from kvstore.server import transfer
from kvstore.server.node import Node
from kvstore.server.transfer import ChangeLog, ShardReceiver
from kvstore.v1 import feature_store_pb2 as pb


def test_changes_come_in_order_and_those_taken_are_forgotten() -> None:
    log = ChangeLog("t", 3, "n2")
    log.record([(b"k1", b"v1")], [])
    log.record([], [b"k1"])
    log.record([(b"k2", b"v2")], [b"k3"])
    assert [seq for seq, _, _ in log.since(0, None)] == [1, 2, 3]
    assert log.since(2, None) == [(3, [(b"k2", b"v2")], [b"k3"])]
    assert [seq for seq, _, _ in log.entries] == [3]  # 1 and 2 were taken
    assert log.seq == 3


def test_an_answer_is_bounded_in_bytes_but_a_sealed_one_takes_all() -> None:
    log = ChangeLog("t", 0, "n2")
    for i in range(10):
        log.record([(b"k%d" % i, b"x" * 100)], [])
    assert len(log.since(0, 250)) == 3
    assert len(log.since(0, None)) == 10


def test_a_log_past_its_cap_is_dropped_and_the_move_starts_over(monkeypatch) -> None:
    monkeypatch.setattr(transfer, "CHANGE_LOG_BYTES", 1_000)
    log = ChangeLog("t", 0, "n2")
    for i in range(20):
        log.record([(b"k%d" % i, b"x" * 100)], [])
    assert log.overflowed and not log.entries
    with pytest.raises(Unavailable, match="overflowed"):
        log.since(0, None)


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ".."])
def test_a_copied_file_name_that_would_leave_the_staging_directory_is_refused(
    tmp_path: Path, name: str
) -> None:
    config = NodeConfig(data_dir=tmp_path / "data")
    config.load()
    node = Node(config)
    node.open()
    try:
        node.create_table(TableSchema.build("t", "int64", {"x": "int64"}, shards=2))
        receiver = ShardReceiver(node, "t", 1)
        chunk = pb.CopyShardChunk(version=1, file_name=name, data=b"x", last=True)
        with pytest.raises(InvalidArgument, match="is not allowed"):
            receiver.take(chunk)
        assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == b"x"]
        receiver.take(pb.CopyShardChunk(version=1, file_name="000007.sst", data=b"x"))
        assert (receiver.staging / "v000001" / "000007.sst").read_bytes() == b"x"
        receiver.discard()
    finally:
        node.close()
