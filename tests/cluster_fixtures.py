"""Node processes of one test cluster on a real etcd, and the table the cluster tests use.

Shared by the cluster test modules (tests/test_cluster_*.py): each starts its own etcd
(tests/etcd_server.py) and nodes through ``Cluster``, and checks answers against
``rows``.
"""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
from etcd_server import EtcdServer

from kvstore.server.process import NodeProcess
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire.dial import open_channel

FEATURES = {"score": "float32", "clicks": "int64"}
KEYS = np.arange(1_000, dtype=np.int64)
SHARDS = 12
START_TIMEOUT_S = 60.0


def feature_rows(keys: np.ndarray) -> dict:
    return {"key": keys, "score": keys.astype(np.float32) / 2, "clicks": keys * 3}


def start_node(
    data_dir: Path,
    url: str,
    cluster: str,
    node_id: str,
    *extra: str,
    env: dict[str, str] | None = None,
) -> NodeProcess:
    log = data_dir.parent / f"{data_dir.name}-{uuid.uuid4().hex[:6]}.log"
    args = ("--etcd", url, "--cluster", cluster, "--node-id", node_id, *extra)
    node = NodeProcess(data_dir, *args, env=env, log_path=log, start_timeout_s=START_TIMEOUT_S)
    return node.start()


class Cluster:
    """An etcd and node processes n0, n1, … in one work directory; stopped at the end."""

    def __init__(self, workdir: Path, etcd: EtcdServer) -> None:
        self.workdir = workdir
        self.etcd = etcd
        self.name = f"t-{uuid.uuid4().hex[:8]}"
        self.nodes: dict[str, NodeProcess] = {}

    def start(self, node_id: str, *extra: str, env: dict[str, str] | None = None) -> NodeProcess:
        node = start_node(
            self.workdir / node_id, self.etcd.url, self.name, node_id, *extra, env=env
        )
        self.nodes[node_id] = node
        return node

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.running():
                node.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {i}:\n{n.log_tail()}" for i, n in self.nodes.items())

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Stop every node; on a failure, print their logs first (pytest shows them)."""
        if kind is not None:
            print(self.logs())
        self.stop()


class Placed(NamedTuple):
    """One replica of a shard, as the cluster map shows it."""

    node: str
    address: str
    state: str


def cluster_map(address: str, timeout_s: float = 10.0) -> pb.ClusterMap:
    """The node at ``address``'s GetClusterMap answer (the message: every replica)."""
    with open_channel(address) as channel:
        stub = pb_grpc.FeatureStoreStub(channel)
        return stub.GetClusterMap(pb.GetClusterMapRequest(), timeout=timeout_s)


def placed_replicas(cmap: pb.ClusterMap, table: str) -> list[list[Placed]]:
    """Per shard of ``table``, each replica with its node, address and state."""
    (shards,) = [t for t in cmap.tables if t.table == table]
    nodes = cmap.nodes
    return [
        [
            Placed(nodes[i].node_id, nodes[i].address, state)
            for i, state in zip(r.node, r.state, strict=True)
        ]
        for r in shards.replicas
    ]


def settled_counts(address: str, table: str) -> Counter | None:
    """Shards per node once every shard has one Available replica (None while a move
    or a catch-up is in flight)."""
    replicas = placed_replicas(cluster_map(address), table)
    if any(len(r) != 1 or r[0].state != "Available" for r in replicas):
        return None
    return Counter(r[0].node for r in replicas)


def check_all(result, keys: np.ndarray) -> None:
    assert result.found.all()
    columns = result.to_numpy()
    np.testing.assert_array_equal(columns["clicks"], keys * 3)
    np.testing.assert_array_equal(columns["score"], keys.astype(np.float32) / 2)
