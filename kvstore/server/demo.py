"""The demo table: a small deterministic table so a newcomer has something to query
(``NodeConfig.demo``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from kvstore.columns import encode_rows
from kvstore.schema import TableSchema
from kvstore.server.writes import run_steps

if TYPE_CHECKING:
    from kvstore.server.node import Node

logger = logging.getLogger(__name__)

__all__ = ["DEMO_FEATURES", "DEMO_ROWS", "DEMO_TABLE", "demo_rows", "load_demo"]

DEMO_TABLE = "demo_users"
DEMO_ROWS = 1000
#: Six features of six kinds: what a newcomer sees, and what make bench's mixed-dtype
#: step (loadtests/mixed.py) reads.
DEMO_FEATURES = {
    "age": "int32",
    "ctr_7d": "float32",
    "country": "string",
    "is_premium": "bool",
    "emb": "float32[8]",
    "recent_items": "int64[]",
}
_COUNTRIES = ["FR", "JP", "US", "BR", "IN", "DE", "NG", "KR"]


def demo_rows(keys: np.ndarray, rng: np.random.Generator) -> dict:
    """Columns of the demo table for ``keys`` (int64), values drawn from ``rng``."""
    n = len(keys)
    listed = keys.tolist()
    return {
        "key": keys,
        "age": rng.integers(18, 80, n).astype(np.int32),
        "ctr_7d": rng.random(n, dtype=np.float32),
        "country": [_COUNTRIES[k % len(_COUNTRIES)] for k in listed],
        "is_premium": rng.random(n) < 0.2,
        "emb": rng.standard_normal((n, 8)).astype(np.float32),
        "recent_items": [list(range(k % 4)) for k in listed],
    }


def load_demo(node: Node) -> None:
    """Create the demo table on ``node`` and write its DEMO_ROWS rows."""
    schema = TableSchema.build(DEMO_TABLE, "int64", DEMO_FEATURES, shards=4)
    table = node.create_table(schema)
    data = demo_rows(np.arange(DEMO_ROWS, dtype=np.int64), np.random.default_rng(42))
    encoded = encode_rows(table.schema, data)
    run_steps(
        node.write_steps(
            DEMO_TABLE, table.schema.schema_id, encoded.keys, encoded.rows, encoded.offsets, []
        )
    )
    logger.info("loaded the demo table %r with %d rows", DEMO_TABLE, DEMO_ROWS)
