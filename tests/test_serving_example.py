"""The served example (examples/serving/): the FastAPI app under uvicorn answers, from a
real node, the scores computed from the rows it was loaded with, and its Redis
variant answers the same from a real redis-server; make bench's serving step runs."""

from __future__ import annotations

import shutil
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

# examples/ and loadtests/ are folders of the repository, not installed packages.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.serving.app import MAX_ITEMS  # noqa: E402
from examples.serving.load import Catalog, load_kvstore, load_redis  # noqa: E402
from loadtests.servers import RedisServer  # noqa: E402
from loadtests.serving import (  # noqa: E402
    ServingApp,
    ServingSettings,
    measure_serving,
    render_serving,
    score_request,
)

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (make test installs it)",
)

USERS, ITEMS = 40, 600
catalog = Catalog.generate(USERS, ITEMS, seed=7)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def apps(shared_node, redis_server, tmp_path_factory: pytest.TempPathFactory):
    """Both variants of the app, on the module's node and Redis, loaded with ``catalog``."""
    workdir = tmp_path_factory.mktemp("apps")
    redis_url = f"redis://127.0.0.1:{redis_server.port}/0"
    load_kvstore(shared_node.address, catalog)
    load_redis(redis_url, catalog)
    common = {"KVSTORE_ADDRESS": shared_node.address, "REDIS_URL": redis_url}
    with (
        ServingApp({**common, "SERVING_BACKEND": "kvstore"}, workdir / "kvstore.log") as kv,
        ServingApp({**common, "SERVING_BACKEND": "redis"}, workdir / "redis.log") as rd,
    ):
        yield {"kvstore": kv, "redis": rd}


def check_scores(got: list, user: int, items: list[int]) -> None:
    expect = catalog.scores(user, items)
    assert len(got) == len(expect)
    for g, e in zip(got, expect, strict=True):
        if e is None:
            assert g is None
        else:
            assert g == pytest.approx(e, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("backend", ["kvstore", "redis"])
def test_the_app_scores_each_candidate_from_the_loaded_rows(apps, backend: str) -> None:
    port = apps[backend].port
    rng = np.random.default_rng(1)
    for _ in range(5):
        user = int(rng.integers(0, USERS))
        items = rng.integers(0, ITEMS, 100).tolist()
        status, answer = score_request(port, user, items)
        assert status == 200
        assert answer["user"] == user
        check_scores(answer["scores"], user, items)
    # unknown items score null, a repeated item scores at each place, no items is fine
    items = [3, ITEMS + 5, 3, -1, ITEMS - 1]
    status, answer = score_request(port, 2, items)
    assert status == 200
    check_scores(answer["scores"], 2, items)
    assert answer["scores"][1] is None and answer["scores"][0] == answer["scores"][2]
    assert score_request(port, 2, []) == (200, {"user": 2, "scores": []})


@pytest.mark.parametrize("backend", ["kvstore", "redis"])
def test_an_unknown_user_is_404_and_too_many_items_422(apps, backend: str) -> None:
    port = apps[backend].port
    status, answer = score_request(port, USERS + 1, [1, 2])
    assert status == 404
    assert answer["detail"] == f"no user {USERS + 1}"
    status, _ = score_request(port, 1, list(range(MAX_ITEMS + 1)))
    assert status == 422


def test_concurrent_requests_each_get_their_own_scores(apps) -> None:
    """32 requests at once: the app's gets share one pipelined connection to the node."""
    rng = np.random.default_rng(2)
    asks = [(int(rng.integers(0, USERS)), rng.integers(0, ITEMS, 50).tolist()) for _ in range(96)]
    port = apps["kvstore"].port
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda ask: score_request(port, *ask), asks))
    for (user, items), (status, answer) in zip(asks, answers, strict=True):
        assert status == 200
        assert answer["user"] == user
        check_scores(answer["scores"], user, items)


def test_the_serving_extra_pins_what_is_installed() -> None:
    """pyproject's `serving` extra pins FastAPI, uvicorn and httptools exactly, to the
    versions installed (make build installs the extra)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    pins = dict(req.split("==") for req in extras["serving"])
    assert set(pins) == {"fastapi", "uvicorn", "httptools"}
    for name, pinned in pins.items():
        assert version(name) == pinned


def test_the_bench_step_measures_both_apps(shared_node, redis_server, tmp_path: Path) -> None:
    """make bench's serving step (loadtests/serving.py), short: both apps loaded, their
    rates and latencies reported, the ratio the rates'. No timing is asserted."""
    # the catalog the apps above read (seed 7): the step loads it again, changing nothing
    s = ServingSettings(users=USERS, items=ITEMS, rounds=2, seconds=0.3, connections=4, seed=7)
    m = measure_serving(shared_node.address, redis_server.port, tmp_path, s)
    for name in ("kvstore", "redis"):
        assert m[name]["requests_per_s"] > 0
        assert len(m[name]["round_requests_per_s"]) == 2
        assert 0 < m[name]["p50_us"] <= m[name]["p99_us"]
    assert m["ratio"] == pytest.approx(
        m["kvstore"]["requests_per_s"] / m["redis"]["requests_per_s"]
    )
    assert "kvstore / redis requests/s" in render_serving(m)
