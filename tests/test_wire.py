"""The wire layer (kvstore.wire): conversions, fast-path frames, dialing, and the
module boundaries it stands for (one definition of each, the loader off the client)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kvstore import Client
from kvstore.errors import InvalidArgument, TableNotFound, UnknownFeature
from kvstore.ingest.bulk_upload import SeedNode
from kvstore.schema import TableSchema
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.wire.dial import dial_address, resolve_address
from kvstore.wire.frames import (
    REQUEST_HEADER,
    RESPONSE_HEADER,
    STATUS_OK,
    error_frame,
    read_answer,
)
from kvstore.wire.messages import (
    cluster_map_json,
    position_proto,
    schema_from_proto,
    schema_to_proto,
)

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _calls(path: Path) -> set[str]:
    """Dotted names of everything ``path`` calls (``grpc.insecure_channel`` …)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            out.add(ast.unparse(node.func))
    return out


def _assigned(path: Path) -> set[str]:
    """Names ``path`` assigns at module level."""
    tree = ast.parse(path.read_text())
    return {
        t.id
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }


def test_the_loader_does_not_import_the_client() -> None:
    # Client.load runs the loader: the loader importing the client would be a cycle.
    for path in sorted((ROOT / "ingest").glob("bulk*.py")):
        clients = {m for m in _imports(path) if m.startswith("kvstore.client")}
        assert not clients, f"{path.name} imports {clients}"


def test_channels_and_frame_headers_are_defined_once() -> None:
    sources = [*(ROOT / "kvstore").rglob("*.py"), *(ROOT / "ingest").rglob("*.py")]
    for path in sources:
        if path.parent.name == "v1" or path.parent.name == "wire":
            continue
        calls = _calls(path)
        assert "grpc.insecure_channel" not in calls, f"{path}: dial with kvstore.wire.dial"
        assert "grpc.aio.insecure_channel" not in calls, f"{path}: dial with kvstore.wire.dial"
        headers = {n for n in _assigned(path) if n.endswith("HEADER") or n == "CHANNEL_OPTIONS"}
        assert not headers, f"{path} defines {headers}: they are kvstore.wire's"


def test_dial_address_reaches_wildcard_nodes_on_the_seeds_host() -> None:
    assert dial_address("0.0.0.0:7071", "10.1.2.3:7070") == "10.1.2.3:7071"
    assert dial_address("[::]:7071", "10.1.2.3:7070") == "10.1.2.3:7071"
    assert dial_address(":7071", "[fe80::1]:7070") == "[fe80::1]:7071"
    assert dial_address("10.9.9.9:7071", "10.1.2.3:7070") == "10.9.9.9:7071"
    assert dial_address("", "10.1.2.3:7070") == ""  # listed, not registered: down


def test_resolve_address_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTORE_ADDRESS", "10.0.0.1:1")
    assert resolve_address("10.0.0.2:2") == "10.0.0.2:2"
    assert resolve_address(None) == "10.0.0.1:1"
    monkeypatch.delenv("KVSTORE_ADDRESS")
    assert resolve_address(None) == "127.0.0.1:7070"


def test_error_frames_raise_the_nodes_error_class() -> None:
    frame = error_frame(7, UnknownFeature("table 't': no feature 'x'"))
    length, request_id, status = RESPONSE_HEADER.unpack_from(frame)
    assert (request_id, len(frame)) == (7, RESPONSE_HEADER.size + length)
    assert status != STATUS_OK
    with pytest.raises(UnknownFeature, match="no feature 'x'"):
        read_answer(status, frame[RESPONSE_HEADER.size :])
    body = pb.GetResponse(schema_id=3, version=2, values=b"abc").SerializeToString()
    assert read_answer(STATUS_OK, body).values == b"abc"
    assert REQUEST_HEADER.unpack(REQUEST_HEADER.pack(5, 9)) == (5, 9)


def test_schema_and_position_conversions() -> None:
    schema = TableSchema.build(
        "t", "string", {"a": "float32[4]", "b": "int64[]"}, 3, ttl={"a": 60.0}
    )
    back = schema_from_proto(schema_to_proto(schema))
    assert back.to_json() == schema.to_json()
    bad = schema_to_proto(schema)
    bad.key_type = 99
    with pytest.raises(InvalidArgument, match="key type"):
        schema_from_proto(bad)
    assert position_proto(None) is None
    pos = position_proto(("c", "nats:s", 2, 41))
    assert (pos.consumer, pos.source, pos.partition, pos.offset) == ("c", "nats:s", 2, 41)
    with pytest.raises(InvalidArgument, match="position must be"):
        position_proto(("c", 1))


def test_the_seed_node_answers_as_the_client_does(shared_node, table_name: str) -> None:
    """The loader's control calls (SeedNode) and the client's agree on the same node."""
    with SeedNode(shared_node.address, 10) as seed, Client(shared_node.address) as client:
        with pytest.raises(TableNotFound):
            seed.describe_table(table_name)
        info = seed.create_table(table_name, key="int64", features={"x": "float32"}, shards=2)
        assert info == client.describe_table(table_name) == seed.describe_table(table_name)
        assert seed.cluster_map() == client.cluster_map()
        assert seed.cluster_map()["tables"][table_name] == [0, 0]
        seed.drop_table(table_name)
        with pytest.raises(TableNotFound):
            client.describe_table(table_name)


def test_cluster_map_json_keeps_advertised_addresses() -> None:
    cmap = pb.ClusterMap(
        epoch=4,
        nodes=[pb.NodeInfo(node_id="n1", address="0.0.0.0:7070")],
        tables=[pb.TableShards(table="t", owner=[0, 0])],
    )
    assert cluster_map_json(cmap) == {
        "epoch": 4,
        "nodes": [
            {
                "node_id": "n1",
                "address": "0.0.0.0:7070",
                "fast_address": "",
                "zone": "",
                "state": "live",  # an older node sends no state: it runs alone
            }
        ],
        "tables": {"t": [0, 0]},
        "versions": {"t": 0},
    }
