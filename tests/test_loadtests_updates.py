"""Redis's reads under updates (loadtests/updates.py), the peer beside kvstore's: the
HSET pipelines, the measurement's fields and its printout, and `python -m
loadtests.updates`, against a real redis-server. Short windows; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from test_bench_harness import needs_redis, redis_server  # noqa: F401 (the fixture)

# loadtests/ is a folder of the repository, not an installed package.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests import report, updates  # noqa: E402
from loadtests.redis_client import connect  # noqa: E402
from loadtests.systems import EMB_FIELD, Chunk, RedisHashSystem, redis_key  # noqa: E402

ROWS = 3000
SEED = 5


def _load(server) -> Chunk:
    chunk = Chunk.generate(SEED, 0, ROWS)
    system = RedisHashSystem(server)
    try:
        system.load(chunk)
    finally:
        system.close()
    return chunk


@needs_redis
def test_hset_pipelines_keep_at_most_the_window_in_flight_and_update_4_fields(
    redis_server,  # noqa: F811
) -> None:
    chunk = _load(redis_server)
    batches = updates._redis_commands(SEED, ROWS, 1)[:5]
    pipes = updates._RedisPipelines(redis_server.port, 2)
    try:
        for b in batches:
            pipes.send(b)
            assert len(pipes.in_flight) <= 2
        pipes.flush()
        assert pipes.rows_acked == 5 * updates.BATCH_ROWS
    finally:
        pipes.close()
    # the last batch's values are in the hashes: 4 fields changed, the others left alone
    last = updates._batches(SEED, ROWS, 1)[4]
    conn = connect(redis_server.port)
    try:
        for i, key in enumerate(last["key"][:50].tolist()):
            row = conn.hgetall(redis_key(key))
            for name in updates.UPDATE_FEATURES:
                assert np.frombuffer(row[name.encode()], np.float32)[0] == last[name][i]
            assert row[b"f04"] == chunk.floats[4, key].tobytes()
            assert row[EMB_FIELD] == chunk.emb[key].tobytes()
    finally:
        conn.close()


def _check_fields(r: dict) -> None:
    top, idle, busy, upd = r["max_stream"], r["no_updates"], r["under_updates"], r["updates"]
    assert top["rows"] == top["rows_sent"] > 0 and top["rows_per_s"] > 0
    assert r["update_rate_target_rows_per_s"] == top["rows_per_s"] / 2
    assert upd["rows"] == upd["rows_sent"] > 0
    # paced: the busy window's producer sends no faster than half the maximum (one
    # batch of slack: the first batch is due at once)
    assert upd["rows_sent"] <= r["update_rate_target_rows_per_s"] * upd["seconds"] + 1000
    for w in (idle, busy):
        assert w["count"] > 10 and 0 < w["p50_ms"] <= w["p99_ms"]
        assert 0 <= w["redis_main_thread_running"] <= 1.1
        assert 0 <= w["redis_main_thread_waiting_for_a_core"] <= 1.1
        assert 0 < w["reader_running"] <= 1.1 and 0 <= w["reader_waiting_for_a_core"] <= 1.1
        assert w["machine_busy_cores"] > 0
    assert r["p99_ratio"] == busy["p99_ms"] / idle["p99_ms"]
    assert r["read_batch"] == 100 and r["target_p99_ratio"] == 1.5


@needs_redis
def test_redis_reads_under_updates_reports_sane_fields_and_prints_beside_kvstore(
    redis_server,  # noqa: F811
) -> None:
    _load(redis_server)
    r = updates.measure_redis_reads_under_updates(
        redis_server.port, redis_server.pid, ROWS, SEED, 0.5, 0.5, 4
    )
    _check_fields(r)
    assert r["max_stream"]["max_in_flight"] == 4
    # the section's table shows it beside kvstore's line
    kv = {"p50_ms": 0.1, "p99_ms": 0.2, "machine_busy_cores": 1.0}
    section = {
        "features": updates.UPDATE_FEATURES,
        "batch_rows": updates.BATCH_ROWS,
        "freshness": {
            "updates": 1,
            **{k: 1.0 for k in ("p50_ms", "p99_ms", "write_ack_p50_ms", "poll_rtt_p50_ms")},
            "target_p99_ms": 10.0,
        },
        "unary": {"rows_per_s": 1.0, "node_cpu_cores": 1.0},
        "stream": {
            "rows_per_s": 1.0,
            "node_cpu_cores": 1.0,
            "max_in_flight": 16,
            "target_rows_per_s": 1.0,
        },
        "reads_under_updates": {
            "read_batch": 100,
            "no_updates": kv,
            "under_updates": {**kv, "p99_ms": 0.8, "machine_busy_cores": 1.5},
            "updates": {"rows_per_s": 1.0},
            "p99_ratio": 4.0,
            "target_p99_ratio": 1.5,
        },
        "redis_reads_under_updates": r,
    }
    text = report.render_updates(section)
    assert f"({r['p99_ratio']:.2f}x the p99; kvstore 4.00x)" in text
    assert "kvstore's windows 1.00 -> 1.50, Redis's" in text


@needs_redis
def test_the_cli_runs_redis_s_part_alone_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "updates.json"
    cmd = [sys.executable, "-m", "loadtests.updates", "--redis-only", "--rows", str(ROWS)]
    cmd += ["--rate-window", "0.3", "--read-window", "0.3", "--max-in-flight", "4"]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Redis 100-key reads (HGETALL)" in proc.stdout
    result = json.loads(out.read_text())
    _check_fields(result["redis_reads_under_updates"])
    assert result["settings"]["rows"] == ROWS


@needs_redis
def test_the_cli_runs_the_section_with_redis_beside_kvstore(tmp_path: Path) -> None:
    out = tmp_path / "updates.json"
    cmd = [sys.executable, "-m", "loadtests.updates", "--rows", str(ROWS)]
    cmd += ["--freshness-updates", "5", "--rate-window", "0.3", "--read-window", "0.3"]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    kv, rr = result["reads_under_updates"], result["redis_reads_under_updates"]
    assert kv["no_updates"]["count"] > 0 and kv["under_updates"]["count"] > 0
    _check_fields(rr)
    assert f"{rr['p99_ratio']:.2f}x (kvstore {kv['p99_ratio']:.2f}x)" in proc.stdout
    assert rr["kvstore_p99_ratio"] == kv["p99_ratio"]
