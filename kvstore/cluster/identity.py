"""Which cluster a data directory belongs to: its name and uuid, kept beside ``node-id``.

A cluster node drops the local tables its placement has dropped. A placement from
another cluster (a ``--cluster`` typo) or from another etcd (wiped, or a fresh one)
has none of the node's tables, and applying it would destroy them all. So at its first
join a node records ``<data>/cluster`` (JSON: the cluster name and the uuid that etcd's
placement got when it was first written) and from then on refuses to start against
a cluster whose name or uuid differs, naming both.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from kvstore.errors import InvalidArgument

__all__ = ["ClusterIdentity", "check_identity", "read_identity", "record_identity"]

FILE_NAME = "cluster"


@dataclass(frozen=True)
class ClusterIdentity:
    """A cluster's name (``--cluster``) and the uuid of its placement in etcd."""

    name: str
    uuid: str


def read_identity(data_dir: Path) -> ClusterIdentity | None:
    """The identity recorded in ``data_dir`` (None before its first join)."""
    path = Path(data_dir) / FILE_NAME
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return ClusterIdentity(doc["name"], doc["uuid"])


def record_identity(data_dir: Path, identity: ClusterIdentity) -> None:
    """Write ``identity`` into ``data_dir`` atomically (a crash leaves none or all of it)."""
    path = Path(data_dir) / FILE_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"name": identity.name, "uuid": identity.uuid}) + "\n")
    os.replace(tmp, path)


def check_identity(data_dir: Path, kept: ClusterIdentity | None, found: ClusterIdentity) -> None:
    """InvalidArgument naming both when ``data_dir`` belongs to a cluster other than
    ``found`` (the name started with, and the uuid of the placement in etcd, "" when
    etcd has no placement for that name)."""
    if kept is None or kept == found:
        return
    if kept.name != found.name:
        why = f"was started with --cluster {found.name!r}"
    elif not found.uuid:
        why = "finds no placement for it in etcd (a wiped or another etcd?)"
    else:
        why = f"finds cluster uuid {found.uuid} in etcd (a wiped, restored or another etcd?)"
    raise InvalidArgument(
        f"data directory {data_dir} belongs to cluster {kept.name!r} (uuid {kept.uuid}) but "
        f"the node {why}: refusing to start rather than drop its tables; start it with "
        f"--cluster {kept.name} against that cluster's etcd, or give it another --data"
    )
