"""The cluster's coordination on etcd: membership (leases) and placement (CAS, epoch).

Only nodes use this package; clients get the cluster map from a node. See
docs/cluster.md. ``local`` (with ``etcd_process``) runs etcd and N nodes on one
machine: ``make cluster``.
"""
