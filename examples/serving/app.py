"""A model server on FastAPI: score a user's candidate items from features in kvstore.

    POST /score  {"user": 7, "items": [3, 5, 11, ...]}
    →            {"user": 7, "scores": [0.42, null, -1.3, ...]}

Per request the app fetches the user's features and the candidate items' features
(two gets on one ``AsyncClient``, both in flight at once: they are pipelined on the
node's fast read path) and scores each item as ``dot(user.emb, item.emb) +
item.bias``. An item with no features scores ``null``; an unknown user is a 404.

``SERVING_BACKEND=redis`` serves the same from Redis instead, read with
``redis.asyncio`` on the hiredis parser, the rows packed as kvstore's benchmark packs
them (``loadtests/systems.py``): one string value per key holding the row's float32s
as raw little-endian bytes (``emb``, then ``bias`` for an item), the user's read with
GET and the items' with MGET, both in one pipelined round trip.

Settings (environment): ``SERVING_BACKEND`` (``kvstore``, the default, or ``redis``),
``KVSTORE_ADDRESS`` (host:port of a node, default 127.0.0.1:7070), ``REDIS_URL``
(default redis://127.0.0.1:6379/0), ``SERVING_TIMEOUT_S`` (deadline of each fetch,
default 1). Run from the repository root, once ``examples/serving/load.py`` has
loaded the tables:

    uvicorn examples.serving.app:app --port 8000
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from kvstore import AsyncClient

#: Width of the user and item embeddings (float32).
EMB_DIM = 64
USERS_TABLE = "serving_users"
ITEMS_TABLE = "serving_items"
USER_FEATURES = {"emb": f"float32[{EMB_DIM}]"}
ITEM_FEATURES = {"emb": f"float32[{EMB_DIM}]", "bias": "float32"}
#: The Redis key of a user's and of an item's packed row (``% key``).
REDIS_USER_KEY = b"u:%d"
REDIS_ITEM_KEY = b"i:%d"
#: Most candidates one request may score.
MAX_ITEMS = 1000

_MISSING_ITEM = np.full(EMB_DIM + 1, np.nan, np.float32).tobytes()


@dataclass(frozen=True)
class Settings:
    """The app's settings, from the environment (see the module's docstring)."""

    backend: str = "kvstore"
    kvstore_address: str = "127.0.0.1:7070"
    redis_url: str = "redis://127.0.0.1:6379/0"
    timeout_s: float = 1.0

    @classmethod
    def from_env(cls) -> Settings:
        backend = os.environ.get("SERVING_BACKEND", cls.backend)
        if backend not in ("kvstore", "redis"):
            raise ValueError(f"SERVING_BACKEND must be 'kvstore' or 'redis', not {backend!r}")
        return cls(
            backend=backend,
            kvstore_address=os.environ.get("KVSTORE_ADDRESS", cls.kvstore_address),
            redis_url=os.environ.get("REDIS_URL", cls.redis_url),
            timeout_s=float(os.environ.get("SERVING_TIMEOUT_S", cls.timeout_s)),
        )


#: A user's embedding (None: no such user), the items' embeddings (n, EMB_DIM) and
#: biases (n,), NaN for an item with no features.
Fetched = tuple[np.ndarray | None, np.ndarray, np.ndarray]


class KvstoreFeatures:
    """Features from kvstore: one AsyncClient, shared by every request."""

    def __init__(self, s: Settings) -> None:
        self.client = AsyncClient(s.kvstore_address, timeout=s.timeout_s)

    async def fetch(self, user: int, items: list[int]) -> Fetched:
        # Both gets in flight at once: the items' as a task, the user's awaited here.
        candidates = asyncio.ensure_future(self.client.get(ITEMS_TABLE, items, ["emb", "bias"]))
        try:
            found = await self.client.get(USERS_TABLE, [user], ["emb"])
        except BaseException:
            candidates.cancel()
            raise
        rows = await candidates
        if not found.found[0]:
            return None, np.empty(0), np.empty(0)
        columns = rows.to_numpy()  # NaN where an item is missing
        return found.to_numpy()["emb"][0], columns["emb"], columns["bias"]

    async def close(self) -> None:
        await self.client.close()


class RedisFeatures:
    """Features from Redis, packed rows (see the module's docstring)."""

    def __init__(self, s: Settings) -> None:
        import redis.asyncio  # only the Redis variant needs it

        self.redis = redis.asyncio.Redis.from_url(s.redis_url, socket_timeout=s.timeout_s)

    async def fetch(self, user: int, items: list[int]) -> Fetched:
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(REDIS_USER_KEY % user)
        if items:  # MGET of no keys is an error
            pipe.mget([REDIS_ITEM_KEY % k for k in items])
        packed_user, *rest = await pipe.execute()
        packed_items = rest[0] if rest else []
        if packed_user is None:
            return None, np.empty(0), np.empty(0)
        if None in packed_items:
            packed_items = [_MISSING_ITEM if v is None else v for v in packed_items]
        rows = np.frombuffer(b"".join(packed_items), np.float32).reshape(-1, EMB_DIM + 1)
        return np.frombuffer(packed_user, np.float32), rows[:, :EMB_DIM], rows[:, EMB_DIM]

    async def close(self) -> None:
        await self.redis.aclose()


def score(user_emb: np.ndarray, item_emb: np.ndarray, bias: np.ndarray) -> list[float | None]:
    """dot(user, item) + bias per item, float32; None for an item with no features."""
    scores = (item_emb @ user_emb + bias).tolist()
    if any(math.isnan(x) for x in scores):
        return [None if math.isnan(x) else x for x in scores]
    return scores


class ScoreRequest(BaseModel):
    user: int
    items: Annotated[list[int], Field(max_length=MAX_ITEMS)]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    s = Settings.from_env()
    features = KvstoreFeatures(s) if s.backend == "kvstore" else RedisFeatures(s)
    app.state.features = features
    app.state.backend = s.backend
    try:
        yield
    finally:
        await features.close()


app = FastAPI(title="kvstore serving example", lifespan=lifespan)


@app.post("/score")
async def score_items(request: ScoreRequest) -> Any:
    """A score per candidate item, in request order (null: the item has no features)."""
    user_emb, item_emb, bias = await app.state.features.fetch(request.user, request.items)
    if user_emb is None:
        raise HTTPException(status_code=404, detail=f"no user {request.user}")
    # JSONResponse directly: FastAPI's encoder would walk the list value by value.
    return JSONResponse({"user": request.user, "scores": score(user_emb, item_emb, bias)})


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 once the app serves; which backend it reads."""
    return {"status": "ok", "backend": app.state.backend}
