"""Shard sizes in bytes, as each node reports them in etcd, so moves balance by bytes.

A node writes the bytes of every shard it holds (its delta plus the current version's
base of that shard, ``Table.shard_bytes``) under ``/kvstore/<cluster>/sizes/<node id>``,
at start and every ``REPORT_EVERY_S``. The report is not on the node's lease: the shards
of a node that is down or being drained must still be weighed. Sizes stay out of the
placement document, since they change all the time and must not bump its epoch.

``kvstore.cluster.assignment``'s ``join`` and ``drain`` take these sizes
(``read_sizes``): a shard reported by several nodes (a move in flight, replicas) weighs
the largest report, and a shard nobody reported weighs 0 (balanced by count only).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import aetcd.utils

from kvstore.cluster.etcd import Etcd
from kvstore.cluster.placement import Placement

__all__ = ["REPORT_EVERY_S", "read_sizes", "report_sizes"]

log = logging.getLogger(__name__)

#: How often a node reports its shard sizes (s): moves are rare, sizes drift slowly.
REPORT_EVERY_S = 30.0


async def report_sizes(etcd: Etcd, node_id: str, sizes: Mapping[str, Mapping[int, int]]) -> None:
    """Write ``node_id``'s sizes: table → shard → bytes. Unavailable if etcd is lost."""
    doc = {
        table: {str(shard): size for shard, size in by_shard.items()}
        for table, by_shard in sizes.items()
    }
    key = etcd.keys.sizes + node_id.encode()
    with etcd.calls(f"writing {key.decode()}"):
        await etcd.client.put(key, json.dumps(doc, sort_keys=True).encode())


async def read_sizes(etcd: Etcd, placement: Placement) -> dict[tuple[str, int], int]:
    """(table, shard) → bytes from every node's last report, for the tables of
    ``placement`` (the largest report of a shard). Unavailable if etcd is lost."""
    prefix = etcd.keys.sizes
    with etcd.calls(f"reading {prefix.decode()}"):
        got = await etcd.client.get_range(prefix, aetcd.utils.prefix_range_end(prefix))
    sizes: dict[tuple[str, int], int] = {}
    for kv in got:
        try:
            doc = json.loads(kv.value)
        except ValueError:
            log.warning("shard sizes at %s are not JSON; ignored", kv.key.decode(errors="replace"))
            continue
        for table, by_shard in doc.items():
            if table not in placement.tables:
                continue  # dropped since
            for shard, size in by_shard.items():
                where = (table, int(shard))
                sizes[where] = max(sizes.get(where, 0), int(size))
    return sizes
