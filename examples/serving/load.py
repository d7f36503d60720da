"""The serving example's users and items: made up, then written to kvstore and Redis.

    python examples/serving/load.py --users 10000 --items 100000 \\
        --kvstore 127.0.0.1:7070 --redis redis://127.0.0.1:6379/0

The same seed gives the same rows, so that both stores hold the same features (and a
test can compute the scores it expects). kvstore gets two tables (``app.USERS_TABLE``,
``app.ITEMS_TABLE``), Redis one packed value per user and per item (``app``'s
docstring).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.serving.app import (
    EMB_DIM,
    ITEM_FEATURES,
    ITEMS_TABLE,
    REDIS_ITEM_KEY,
    REDIS_USER_KEY,
    USER_FEATURES,
    USERS_TABLE,
)
from kvstore import Client

#: Rows per write (kvstore) or per MSET (Redis).
CHUNK = 5000


@dataclass
class Catalog:
    """Users' embeddings (n_users, EMB_DIM); items' embeddings (n_items, EMB_DIM) and
    biases (n_items,); the keys are 0..n-1."""

    user_emb: np.ndarray
    item_emb: np.ndarray
    item_bias: np.ndarray

    @classmethod
    def generate(cls, users: int, items: int, seed: int = 18) -> Catalog:
        rng = np.random.default_rng(seed)
        return cls(
            user_emb=rng.standard_normal((users, EMB_DIM), dtype=np.float32),
            item_emb=rng.standard_normal((items, EMB_DIM), dtype=np.float32),
            item_bias=rng.standard_normal(items, dtype=np.float32),
        )

    def scores(self, user: int, items: list[int]) -> list[float | None]:
        """What the app answers for ``user`` and ``items`` (None: an unknown item)."""
        known = [k for k in items if 0 <= k < len(self.item_bias)]
        emb = np.full((len(items), EMB_DIM), np.nan, np.float32)
        bias = np.full(len(items), np.nan, np.float32)
        at = [i for i, k in enumerate(items) if 0 <= k < len(self.item_bias)]
        emb[at] = self.item_emb[known]
        bias[at] = self.item_bias[known]
        out = (emb @ self.user_emb[user] + bias).tolist()
        return [None if x != x else x for x in out]


def load_kvstore(address: str, catalog: Catalog, shards: int = 8) -> None:
    """Create both tables on the node at ``address`` (if need be) and write the rows."""
    with Client(address, timeout=60.0) as client:
        client.create_table(USERS_TABLE, key="int64", features=USER_FEATURES, shards=shards)
        client.create_table(ITEMS_TABLE, key="int64", features=ITEM_FEATURES, shards=shards)
        for lo in range(0, len(catalog.user_emb), CHUNK):
            hi = min(lo + CHUNK, len(catalog.user_emb))
            client.write(USERS_TABLE, {"key": np.arange(lo, hi), "emb": catalog.user_emb[lo:hi]})
        for lo in range(0, len(catalog.item_bias), CHUNK):
            hi = min(lo + CHUNK, len(catalog.item_bias))
            client.write(
                ITEMS_TABLE,
                {
                    "key": np.arange(lo, hi),
                    "emb": catalog.item_emb[lo:hi],
                    "bias": catalog.item_bias[lo:hi],
                },
            )


def load_redis(url: str, catalog: Catalog) -> None:
    """MSET every user's and item's packed row into the Redis at ``url``."""
    import redis

    conn = redis.Redis.from_url(url, socket_timeout=60.0)
    try:
        items = np.concatenate([catalog.item_emb, catalog.item_bias[:, None]], axis=1)
        for name, rows in ((REDIS_USER_KEY, catalog.user_emb), (REDIS_ITEM_KEY, items)):
            rows = np.ascontiguousarray(rows, dtype="<f4")
            for lo in range(0, len(rows), CHUNK):
                hi = min(lo + CHUNK, len(rows))
                conn.mset({name % k: rows[k].tobytes() for k in range(lo, hi)})
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--kvstore", metavar="HOST:PORT", help="load this kvstore node")
    parser.add_argument("--redis", metavar="URL", help="load this Redis")
    args = parser.parse_args(argv)
    if not (args.kvstore or args.redis):
        parser.error("name --kvstore, --redis or both")
    catalog = Catalog.generate(args.users, args.items, args.seed)
    if args.kvstore:
        load_kvstore(args.kvstore, catalog)
    if args.redis:
        load_redis(args.redis, catalog)
    print(f"loaded {args.users} users and {args.items} items")


if __name__ == "__main__":
    main()
