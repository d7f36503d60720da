"""`make bench`'s peer and floors: Redis read through redis-py on hiredis (and never
silently without it), the uvloop echo server, and a few latency rounds alternating the
floors with Redis against a real redis-server. No timing is asserted."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

# loadtests/ is a folder of the repository, not an installed package.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests import bench, floors, redis_client, report  # noqa: E402
from loadtests.floors import EchoFloor, EchoReader, EchoServer, PingFloor  # noqa: E402
from loadtests.machine import machine_info  # noqa: E402
from loadtests.servers import RedisServer  # noqa: E402
from loadtests.systems import Chunk, KeyPool, RedisHashSystem, RedisPackedSystem  # noqa: E402

needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (make test and make bench install it)",
)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory):
    with EchoServer(tmp_path_factory.mktemp("echo")) as server:
        yield server


# -- the client Redis is read with ----------------------------------------------------


def test_the_dev_extra_pins_redis_and_hiredis_to_what_is_installed() -> None:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "dev"
    ]
    pins = {}
    for spec in dev:
        m = re.fullmatch(r"([a-z-]+)(\[[a-z,]+\])?==([\w.]+)", spec)
        if m:
            pins[m[1]] = m[3]
    assert set(pins) >= {"redis", "hiredis"}, dev
    assert pins["redis"] == version("redis")
    assert pins["hiredis"] == version("hiredis")


@needs_redis
def test_every_redis_connection_of_the_bench_parses_with_hiredis(redis_server) -> None:
    conn = redis_client.connect(redis_server.port)
    try:
        assert redis_client.parser_name(conn) == "_HiredisParser"
        versions = redis_client.client_versions(conn)
    finally:
        conn.close()
    assert versions == {
        "redis_py": version("redis"),
        "hiredis": version("hiredis"),
        "redis_py_parser": "_HiredisParser",
    }
    for system in (RedisPackedSystem(redis_server), RedisHashSystem(redis_server)):
        reader = system.reader()
        try:
            assert redis_client.parser_name(reader._conn) == "_HiredisParser"
            assert redis_client.parser_name(system._conn) == "_HiredisParser"
        finally:
            reader.close()
            system.close()
    ping = PingFloor(redis_server).reader()
    try:
        assert redis_client.parser_name(ping.conn) == "_HiredisParser"
        assert ping.lookup(None, None) is True
    finally:
        ping.close()


def _without_hiredis(code: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``code`` in a Python where ``import hiredis`` fails, as if it were not installed."""
    prelude = "import sys; sys.modules['hiredis'] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@needs_redis
def test_without_hiredis_a_connection_is_refused_and_the_bench_stops_with_a_message(
    redis_server, tmp_path: Path
) -> None:
    proc = _without_hiredis(
        "import redis.utils\n"
        "assert not redis.utils.HIREDIS_AVAILABLE\n"  # redis-py itself would fall back
        "from loadtests.redis_client import HiredisMissing, connect\n"
        "try:\n"
        f"    connect({redis_server.port})\n"
        "except HiredisMissing as exc:\n"
        "    print('refused:', exc)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "refused: hiredis does not import" in proc.stdout
    assert "pure Python" in proc.stdout

    proc = _without_hiredis(
        "from loadtests import bench\n"
        f"sys.exit(bench.main(['--quick', '--out', {str(tmp_path / 'out')!r}]))\n"
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: hiredis does not import" in proc.stderr
    assert "starting" not in proc.stdout  # stopped before any server started
    assert not (tmp_path / "out").exists()


# -- the echo floor -------------------------------------------------------------------


def test_the_echo_server_runs_on_uvloop_and_answers_what_it_was_sent(echo_server) -> None:
    assert echo_server.loop.startswith("uvloop")
    reader = EchoReader(echo_server.port)
    try:
        rng = np.random.default_rng(1)
        for size in (0, 1, 8, 1000, 60_000):
            body = rng.bytes(size)
            assert reader.echo(body) == body
        assert reader.lookup(None, None) == bytes(floors.FRAME_BYTES - floors.HEADER.size)
    finally:
        reader.close()
    # a frame sent in pieces on a raw socket comes back whole, byte for byte
    with socket.create_connection(("127.0.0.1", echo_server.port), timeout=30) as sock:
        sent = b"\x05\x00\x00\x00\x07\x00\x00\x00hello"
        sock.sendall(sent[:3])
        sock.sendall(sent[3:])
        got = b""
        while len(got) < len(sent):
            chunk = sock.recv(4096)
            assert chunk, "the echo server closed the connection"
            got += chunk
        assert got == sent


def test_the_echo_server_stops_when_its_block_ends(tmp_path: Path) -> None:
    with EchoServer(tmp_path) as server:
        pid, port = server.pid, server.port
        reader = EchoReader(port)
        assert reader.echo(b"x") == b"x"
        reader.close()
    assert server.proc is not None and server.proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


# -- a few rounds: floors alternating with Redis --------------------------------------


@needs_redis
def test_latency_rounds_measure_the_floors_beside_redis(redis_server, echo_server) -> None:
    rows = 2000
    packed = RedisPackedSystem(redis_server)
    packed.load(Chunk.generate(7, 0, rows))
    s = bench.Settings.quick_settings(
        rows=rows, latency_rounds=3, latency_cell_samples=30, warmup_lookups=5
    )
    rng = np.random.default_rng(3)
    pools = {b: KeyPool.draw(rng, rows, b, 500) for b in (1, 10)}
    floor_systems = [EchoFloor(echo_server), PingFloor(redis_server)]
    try:
        lat = bench.measure_latency([packed], pools, s, floor_systems)
        machine = machine_info(redis_server.version(), packed._conn)
    finally:
        packed.close()

    assert set(lat) == {"redis-packed", "floors", "floor_ratios", "other_cpu_cores_per_round"}
    assert set(lat["redis-packed"]) == {"1", "10"}
    assert set(lat["floors"]) == {"uvloop-echo", "redis-ping"}
    for f in lat["floors"].values():
        # every batch size's cell of every round: 2 x 3 x 30 samples at most, each round
        assert 0 < f["count"] <= 2 * 3 * 30
        assert len(f["round_p50_ms"]) == 3
        assert f["what"]
        assert 0 < f["p50_ms"] <= f["p99_ms"] <= f["max_ms"]
    for b, cell in lat["redis-packed"].items():
        assert len(cell["round_p50_ms"]) == 3
        ratio = lat["floor_ratios"]["redis-packed"][b]
        assert ratio["floor"] == "redis-ping"
        assert ratio["p50"] == cell["p50_ms"] / lat["floors"]["redis-ping"]["p50_ms"]
        assert ratio["p99"] == cell["p99_ms"] / lat["floors"]["redis-ping"]["p99_ms"]
    assert "kvstore" not in lat["floor_ratios"]  # no kvstore in this run: no ratio made up
    assert len(lat["other_cpu_cores_per_round"]) == 3

    assert machine["redis_py_parser"] == "_HiredisParser"
    assert machine["hiredis"] == version("hiredis")
    assert machine["uvloop"] == version("uvloop")
    assert machine["redis_server"] == redis_server.version()
    text = report.render_floors(lat)
    assert re.search(r"\| +uvloop-echo \|", text) and re.search(r"\| +redis-ping \|", text)
    assert re.search(r"\| +redis-packed p50 \| +/ redis-ping \|", text)
    line = report.versions_line(machine)
    for key in ("redis_py", "hiredis", "redis_server", "uvloop", "grpcio"):
        assert machine[key] in line


def test_the_mixed_dtype_step_reads_the_demo_features_and_reports_both_gets(start_node) -> None:
    """make bench's mixed-dtype step (loadtests/mixed.py) against a real node: both kinds
    of get measured, the ratio reported against its target (no timing asserted)."""
    from kvstore.server.demo import DEMO_FEATURES
    from loadtests.mixed import MixedSettings, measure_mixed_dtypes

    node = start_node()
    res = measure_mixed_dtypes(
        node.address, MixedSettings(rows=500, rounds=2, samples=20, warmup=5)
    )
    assert res["features"]["mixed"] == list(DEMO_FEATURES.values())
    assert res["features"]["float_only"] == ["float32"]
    for kind in ("mixed", "float_only"):
        assert res[kind]["count"] == 2 * 20
        assert len(res[kind]["round_p50_us"]) == 2
    assert res["ratio_p50"] == pytest.approx(res["mixed"]["p50_us"] / res["float_only"]["p50_us"])
    assert res["met"] == (res["ratio_p50"] <= res["target_ratio"])


def test_the_bench_runs_the_node_with_its_default_hot_row_cache_unless_told() -> None:
    """``--hot-rows-mb`` sets the node's hot-row cache (docs/benchmarks.md: with uniform
    keys its hit rate is about its share of the rows); by default the node's own."""
    assert bench.parse_args([]).hot_rows_mb is None
    assert bench.parse_args(["--hot-rows-mb", "0"]).hot_rows_mb == 0
    assert bench.parse_args(["--quick", "--hot-rows-mb", "8"]).hot_rows_mb == 8
