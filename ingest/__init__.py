"""kvstore.ingest: getting data in, in bulk and as streams.

* ``kvstore.ingest.bulk``: Arrow / Parquet snapshots → a sorted RocksDB database per
  shard → a new table version, swapped in atomically (``kvstore load``).
* ``kvstore.ingest.consumer``: stream consumers (NATS JetStream, Kafka) that apply
  updates in batches and store their position with the data; ``kvstore.ingest.consume``
  is their command (``kvstore consume``).

Installed as ``kvstore.ingest`` (a setuptools package-dir mapping).
"""
