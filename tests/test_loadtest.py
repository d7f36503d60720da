"""`make loadtest`: YCSB-style key popularity, and a short real Locust run against a node."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

# loadtests/ is a folder of the repository, not an installed package.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests import loadtest  # noqa: E402
from loadtests.loadtest import KeyChooser, ZipfianGenerator  # noqa: E402

THETA = 0.99


# -- key popularity -------------------------------------------------------------------


@pytest.mark.parametrize("items", [1, 2, 3, 10, 1000, 100_003])
def test_zipfian_ranks_stay_in_range(items: int) -> None:
    ranks = ZipfianGenerator(items, THETA).ranks(np.random.default_rng(1), 200_000)
    assert ranks.dtype == np.int64
    assert ranks.min() >= 0
    assert ranks.max() <= items - 1
    if items == 1:
        assert not ranks.any()


def test_zipfian_rank_0_is_the_most_frequent_and_frequencies_follow_theta() -> None:
    items, draws = 1000, 2_000_000
    zipf = ZipfianGenerator(items, THETA)
    counts = np.bincount(zipf.ranks(np.random.default_rng(2), draws), minlength=items)
    freq = counts / draws
    exact = zipf.probability(np.arange(items))

    assert np.argmax(counts) == 0
    assert counts[0] > counts[1] > counts[2] > counts[3] > counts[10] > counts[100]
    # Gray et al.: ranks 0 and 1 exact (13% and 6.5% of draws at theta 0.99) ...
    assert freq[0] == pytest.approx(exact[0], rel=0.02)
    assert freq[1] == pytest.approx(exact[1], rel=0.03)
    assert exact[0] == pytest.approx(1 / sum(1 / i**THETA for i in range(1, items + 1)))
    # ... the others approximate, within about 20%, and the head's mass close.
    assert np.all(np.abs(freq / exact - 1) < 0.25)
    assert freq[:10].sum() == pytest.approx(exact[:10].sum(), rel=0.06)
    assert freq[:100].sum() == pytest.approx(exact[:100].sum(), rel=0.03)
    # log frequency against log rank: a line of slope -theta
    slope = np.polyfit(np.log(np.arange(1, items + 1)), np.log(freq), 1)[0]
    assert slope == pytest.approx(-THETA, abs=0.05)


def test_zipfian_rejects_a_theta_outside_0_1() -> None:
    with pytest.raises(ValueError, match="theta"):
        ZipfianGenerator(10, 1.0)
    with pytest.raises(ValueError, match="items"):
        ZipfianGenerator(0)


@pytest.mark.parametrize("rows", [1, 7, 1000, 100_000])
def test_zipfian_keys_are_a_scrambled_bijection_of_the_ranks(rows: int) -> None:
    chooser = KeyChooser(rows, "zipfian")
    keys = chooser.key_of_rank(np.arange(rows, dtype=np.int64))
    assert np.array_equal(np.sort(keys), np.arange(rows))
    if rows >= 1000:  # the ten hottest keys are far apart, not neighbours in a shard
        hottest = np.sort(keys[:10])
        assert np.diff(hottest).min() > rows // 100
    drawn = chooser.draw(np.random.default_rng(3), 50_000)
    assert drawn.min() >= 0
    assert drawn.max() < rows


def test_uniform_keys_cover_the_key_space_evenly() -> None:
    rows = 10_000
    drawn = KeyChooser(rows, "uniform").draw(np.random.default_rng(4), 200_000)
    assert drawn.min() >= 0
    assert drawn.max() < rows
    per_tenth = np.bincount(drawn * 10 // rows, minlength=10) / len(drawn)
    assert np.allclose(per_tenth, 0.1, atol=0.01)


def test_batches_have_the_batch_size() -> None:
    batches = KeyChooser(500, "zipfian").batches(np.random.default_rng(5), 1000)
    for _ in range(20):
        batch = next(batches)
        assert batch.shape == (1000,)
        assert batch.max() < 500


# -- a real run -----------------------------------------------------------------------


def test_short_workload_b_run_reads_and_updates_without_failures(tmp_path: Path) -> None:
    settings = loadtest.Settings(
        workload="B",
        distribution="zipfian",
        batch_size=10,
        users=2,
        time="5s",
        rows=2000,
        out_dir=tmp_path / "locust",
        quiet=True,
    )
    result = loadtest.run(settings)
    log = (tmp_path / "locust" / "B-zipfian-b10-u2.log").read_text(errors="replace")

    assert result.exit_code == 0, log[-4000:]
    assert Path(f"{result.csv_prefix}_stats.csv").is_file()
    assert result.html_path.is_file()
    assert result.exceptions == [], result.exceptions
    reads, updates = result.row("get[10]"), result.row("update[10]")
    assert int(reads["Request Count"]) > 0
    assert int(updates["Request Count"]) > 0
    assert int(reads["Request Count"]) > int(updates["Request Count"])  # 95% / 5%
    for row in result.stats:
        assert int(row["Failure Count"]) == 0, row
    # the CSV holds the whole run (Locust alone would miss up to its last second)
    exact = json.loads(result.latency_path.read_text())
    assert exact["get[10]"]["count"] == int(reads["Request Count"])
    assert 0 < exact["get[10]"]["p50_ms"] <= exact["get[10]"]["p99_ms"]


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="workload"):
        loadtest.Settings(workload="D").check()
    with pytest.raises(ValueError, match="run time"):
        loadtest.Settings(time="1 minute").check()
    assert loadtest.parse_duration("1h2m3s") == 3723
    assert loadtest.parse_duration("90") == 90


def test_the_ram_capped_run_stays_under_its_cap_and_reads_from_disk(tmp_path: Path) -> None:
    """loadtests/memcap.py: the node's memory cgroup holds it to the cap, so lookups of
    a table larger than the cap fault pages in from disk (needs root and cgroups)."""
    from loadtests import memcap

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make bench installs it)")
    try:
        res = memcap.measure(rows=20_000, batch_sizes=[10, 100], rounds=2, samples=20, seed=1)
    except memcap.CgroupUnavailable as exc:
        pytest.skip(str(exc))
    capped = res["kvstore_capped_memory"]
    # The rows get a third of what Redis spends on them: less than their files' size.
    allowance = res["cap_bytes"] - res["kvstore_started_bytes"]
    assert 0 < allowance < res["kvstore_file_bytes"]
    assert capped["cgroup_usage_bytes"] <= res["cap_bytes"]
    if res["peak_counts_from_cap"]:
        assert capped["cgroup_max_usage_bytes"] <= res["cap_bytes"]
    # By default the capped node runs the settings for a base larger than RAM: in the
    # plain format, its files read by pread and its row cache 3/4 of what the cap leaves
    # for rows; and it is warmed with every row's worth.
    env = res["capped_env"]
    assert env == memcap.cold_env("plain", allowance)
    assert {k: env[k] for k in memcap.COLD_ENV} == memcap.COLD_ENV
    assert env["KVSTORE_BASE_READS"] == "pread"
    row_cache = int(env["KVSTORE_ROW_CACHE_BYTES"])
    assert row_cache == max(
        0,
        min(
            int(allowance * memcap.PLAIN_ROW_CACHE_SHARE), allowance - memcap.PLAIN_SERVING_HEADROOM
        ),
    )
    uniform, zipfian = res["latency"]["uniform"], res["latency"]["zipfian"]
    # Read by pread, the misses are disk reads (read_bytes), not page faults.
    assert uniform["kvstore capped"]["100"]["disk_pages_per_lookup"] > 1
    for lat in (uniform, zipfian):
        assert lat["capped_warmed"]["keys"] == 20_000
        assert lat["kvstore"]["100"]["count"] == lat["kvstore capped"]["100"]["count"] == 40
    text = memcap.render(res)
    assert "| uniform | 100 |" in text and "| zipfian | 100 |" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dist", "zipf"], "--dist takes zipfian and/or uniform"),
        (["--capped-env", "KVSTORE_READ_THREAD=7"], "KVSTORE_READ_THREAD is not a node setting"),
        (["--capped-env", "READ_THREADS=7"], "'READ_THREADS=7' is not KVSTORE_NAME=VALUE"),
        (["--warm-keys", "-1"], "--warm-keys must be at least 0"),
    ],
)
def test_the_ram_capped_run_refuses_bad_options_before_loading(argv, message, capsys) -> None:
    from loadtests import memcap

    with pytest.raises(SystemExit) as exc:
        memcap.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_ab_settings_are_parsed_and_named() -> None:
    from loadtests.ab import parse_env

    assert parse_env("") == {}
    assert parse_env("PYTHONPATH=/tmp/pkgs,KVSTORE_READ_THREADS=0") == {
        "PYTHONPATH": "/tmp/pkgs",
        "KVSTORE_READ_THREADS": "0",
    }
    assert parse_env("KVSTORE_READ_THREADS=0, KVSTORE_ROW_CACHE_BYTES=4") == {
        "KVSTORE_READ_THREADS": "0",
        "KVSTORE_ROW_CACHE_BYTES": "4",
    }
    with pytest.raises(ValueError, match="'ROW_CACHE=4' is not KVSTORE_NAME=VALUE"):
        parse_env("ROW_CACHE=4")
    with pytest.raises(ValueError, match="KVSTORE_ROW_CACH_BYTES is not a node setting"):
        parse_env("KVSTORE_ROW_CACH_BYTES=4")


def test_ab_runs_two_nodes_each_with_its_own_settings() -> None:
    from loadtests.ab import run

    res = run(
        rows=3000,
        batch_sizes=[10],
        env_a={"KVSTORE_BASE_FORMAT": "block"},
        env_b={"KVSTORE_ROW_CACHE_BYTES": str(4 << 20)},
        rounds=2,
        samples=20,
    )
    # A's format differs from B's (the default, plain): each side loaded the file itself.
    assert res["base_formats"] == {"a": "block", "b": "plain"}
    assert res["caches"]["a"]["row_cache_capacity_bytes"] == 0
    assert res["caches"]["b"]["row_cache_capacity_bytes"] == 4 << 20
    assert res["caches"]["b"]["row_cache_bytes"] > 0  # B's reads went through its cache
    for node in ("a", "b"):
        cell = res["latency"]["10"][node]
        assert cell["count"] == 40 and len(cell["round_p50_ms"]) == 2
        assert 0 < cell["p50_ms"] <= cell["p99_ms"]
