"""make bench's cluster step (loadtests/cluster_bench.py) end to end at a tiny size: a
lone node and a 2-node cluster on a real etcd, the same rows bulk-loaded into both,
client processes against each; and its replica step (loadtests/replica_bench.py) on 3
nodes. The results' shape and their sums, never their timings."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

# loadtests/ is a folder of the repository, not an installed package.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests import bench, cluster_bench  # noqa: E402
from loadtests.cluster_bench import ClusterSettings, measure_cluster, render_cluster  # noqa: E402
from loadtests.replica_bench import ReplicaSettings, measure_replicas, render_replicas  # noqa: E402
from loadtests.shard_moves import MoveSettings  # noqa: E402

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None, reason="etcd is not installed (make test installs it)"
)


def test_the_cluster_step_measures_one_node_against_two_on_the_same_rows(
    tmp_path: Path,
) -> None:
    s = ClusterSettings(
        nodes=2,
        rows=3000,
        shards=4,
        clients=3,
        rounds=2,
        warmup_s=0.05,
        window_s=0.2,
        pool_keys=500,
        moves=MoveSettings(readers=2, idle_s=0.5),
    )
    res = measure_cluster(s, tmp_path)
    assert set(res["throughput"]) == {"kvstore-1", "kvstore-2"}
    assert res["load_s"]["kvstore-1"] > 0 and res["load_s"]["kvstore-2"] > 0
    for system, cells in res["throughput"].items():
        assert set(cells) == {"3x1", "3x100"}, system
        for key, cell in cells.items():
            assert len(cell["rounds"]) == 2
            for run in cell["rounds"]:
                assert run["clients"] == 3 and run["calls"] > 0
                assert run["keys_per_s"] == pytest.approx(run["batches_per_s"] * cell["batch_size"])
                # CPU per call is the cores over the rate.
                assert run["node_cpu_us_per_call"] == pytest.approx(
                    run["server_cpu_cores"] / run["batches_per_s"] * 1e6
                )
            # The nodes did the serving: their CPU was counted (all N of them).
            assert cell["server_cpu_cores"] > 0, (system, key)
    c = res["ceilings"]["3x100"]
    lone, many = res["throughput"]["kvstore-1"]["3x100"], res["throughput"]["kvstore-2"]["3x100"]
    assert c["measured_ratio"] == pytest.approx(many["batches_per_s"] / lone["batches_per_s"])
    assert c["cores"] >= 1 and c["shared_ratio"] > 0 and c["clients_elsewhere_ratio"] > 0
    assert res["scale"]["met"] == (res["scale"]["ratio"] >= cluster_bench.TARGET_SCALE)
    mv = res["moves"]
    assert mv["finished"], mv
    assert mv["idle_calls"] > 0 and mv["move_calls"] > 0
    assert 0 < mv["move_s"] <= mv["join_s"]
    assert mv["p99_ratio"] == pytest.approx(mv["move_p99_ms"] / mv["idle_p99_ms"])
    assert mv["failed_reads"] == 0, mv["failures_sample"]
    text = render_cluster(res)
    assert "| 100 | 2 |" in text and "| 100 | 1 |" in text
    assert "reads while a shard moves" in text


def test_make_bench_runs_the_cluster_step_unless_told_not_to() -> None:
    assert bench.parse_args(["--quick"]).cluster.nodes >= 1
    assert bench.parse_args(["--quick"]).cluster.rows == 100_000
    assert bench.parse_args(["--quick", "--cluster-nodes", "3"]).cluster.nodes == 3
    assert bench.parse_args(["--cluster-nodes", "0"]).cluster.nodes == 0


def test_the_replica_step_reads_through_a_kill_and_a_sigstop_and_writes_with_r_1_2_3(
    tmp_path: Path,
) -> None:
    """make bench's replica step (loadtests/replica_bench.py) at a tiny size: every phase
    read, every R written, the targets' ratios those of the figures; never a timing."""
    s = ReplicaSettings(
        readers=2, rows=2000, window_s=0.6, write_batch=200, shards=4, down_s=0.6, update_rate=2000
    )
    res = measure_replicas(s, tmp_path)
    for phase in ("idle", "kill", "sigstop_hedged", "sigstop_unhedged"):
        r = res[phase]
        assert r["reads"] > 0, phase
        assert 0 < r["p50_ms"] <= r["p99_ms"], phase
    assert set(res["write_rows_per_s"]) == {1, 2, 3}
    assert all(rate > 0 for rate in res["write_rows_per_s"].values())
    t = res["targets"]
    assert t["kill_p99_ratio"] == pytest.approx(res["kill"]["p99_ms"] / res["idle"]["p99_ms"])
    assert t["r2_write_ratio"] == pytest.approx(
        res["write_rows_per_s"][2] / res["write_rows_per_s"][1]
    )
    c = res["catch_up"]
    assert c["down_s"] >= s.down_s and c["offered_rows_per_s"] > 0
    assert 0 < c["serving_s"] <= c["caught_up_s"]
    text = render_replicas(res)
    assert "sigstop_unhedged" in text and "R=2" in text and "caught up in" in text
