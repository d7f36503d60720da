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

__all__ = ["DEMO_ROWS", "DEMO_TABLE", "load_demo"]

DEMO_TABLE = "demo_users"
DEMO_ROWS = 1000


def load_demo(node: Node) -> None:
    """Create the demo table on ``node`` and write its DEMO_ROWS rows."""
    schema = TableSchema.build(
        DEMO_TABLE,
        "int64",
        {
            "age": "int32",
            "ctr_7d": "float32",
            "country": "string",
            "is_premium": "bool",
            "emb": "float32[8]",
            "recent_items": "int64[]",
        },
        shards=4,
    )
    table = node.create_table(schema)
    rng = np.random.default_rng(42)
    keys = np.arange(DEMO_ROWS, dtype=np.int64)
    countries = ["FR", "JP", "US", "BR", "IN", "DE", "NG", "KR"]
    data = {
        "key": keys,
        "age": rng.integers(18, 80, DEMO_ROWS).astype(np.int32),
        "ctr_7d": rng.random(DEMO_ROWS, dtype=np.float32),
        "country": [countries[i % len(countries)] for i in range(DEMO_ROWS)],
        "is_premium": rng.random(DEMO_ROWS) < 0.2,
        "emb": rng.standard_normal((DEMO_ROWS, 8)).astype(np.float32),
        "recent_items": [list(range(k % 4)) for k in range(DEMO_ROWS)],
    }
    encoded = encode_rows(table.schema, data)
    run_steps(
        node.write_steps(
            DEMO_TABLE, table.schema.schema_id, encoded.keys, encoded.rows, encoded.offsets, []
        )
    )
    logger.info("loaded the demo table %r with %d rows", DEMO_TABLE, DEMO_ROWS)
