"""The served example under load: examples/serving/app.py on kvstore against the same
app on Redis (issue 18's target: kvstore's requests/s ≥ 1.0x Redis's).

Both variants of the app run under uvicorn (uvloop, httptools), one process each,
on a socket this process binds (``ServingApp``). The example's users and items are
loaded into the benchmark's kvstore node and packed-rows Redis
(``examples/serving/load.py``). The load generator is this process: ``connections``
HTTP/1.1 keep-alive connections on one uvloop loop, each sending its next request
when the answer to the last one is in, every request a user and 100 candidate items
(the same requests for both apps). Rounds alternate the two apps, and which goes
first; requests/s, p50 and p99 are medians over the rounds.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import uvloop

from kvstore.server.process import wait_until
from loadtests.servers import stop_process

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ServingApp", "ServingSettings", "measure_serving", "render_serving", "score_request"]

#: Issue 18's target: the kvstore app's requests/s / the Redis app's.
TARGET_RATIO = 1.0
START_TIMEOUT_S = 30.0


@dataclass
class ServingSettings:
    """The example's catalog; the load: connections, candidates per request, rounds
    and seconds per round."""

    users: int = 10_000
    items: int = 100_000
    candidates: int = 100
    connections: int = 16
    rounds: int = 6
    seconds: float = 3.0
    seed: int = 18

    @classmethod
    def quick(cls) -> ServingSettings:
        return cls(users=2_000, items=20_000, rounds=4, seconds=1.5)


class ServingApp:
    """``uvicorn examples.serving.app:app`` as a subprocess, on a socket of 127.0.0.1
    bound here (port 0) and handed over (``--fd``): no port can be taken in between.
    ``env``: its settings (SERVING_BACKEND, KVSTORE_ADDRESS, REDIS_URL)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> ServingApp:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "examples.serving.app:app",
            "--app-dir",
            str(ROOT),
            "--fd",
            str(sock.fileno()),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, **self.env, "PYTHONPATH": os.pathsep.join(path)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=[sock.fileno()]
            )
        sock.close()  # the app holds its own descriptor
        try:
            wait_until(self._healthy, START_TIMEOUT_S, "the serving app to answer /healthz")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the serving app exited with {self.proc.returncode}:\n{log}")
        try:
            url = f"http://127.0.0.1:{self.port}/healthz"
            with urllib.request.urlopen(url, timeout=1) as answer:
                return answer.status == 200
        except OSError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def score_request(port: int, user: int, items: list[int]) -> tuple[int, Any]:
    """POST /score to the app on ``port`` (blocking); the status and the JSON answer."""
    body = json.dumps({"user": user, "items": items}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/score", body, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _requests(s: ServingSettings) -> list[bytes]:
    """The HTTP requests the load sends, each a user and ``candidates`` items."""
    rng = np.random.default_rng(s.seed + 1)
    out = []
    for _ in range(512):
        body = json.dumps(
            {
                "user": int(rng.integers(0, s.users)),
                "items": rng.integers(0, s.items, s.candidates).tolist(),
            }
        ).encode()
        head = (
            "POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


async def _connection_load(
    port: int, requests: list[bytes], offset: int, stop: float, latencies: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        k = offset
        while time.perf_counter() < stop:
            t0 = time.perf_counter_ns()
            writer.write(requests[k % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                status = head.split(b"\r\n", 1)[0]
                raise RuntimeError(f"the serving app answered {status!r}")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            latencies.append(time.perf_counter_ns() - t0)
            k += 7
    finally:
        writer.close()


async def _round(port: int, requests: list[bytes], connections: int, seconds: float) -> dict:
    latencies: list[int] = []
    stop = time.perf_counter() + seconds
    started = time.perf_counter()
    await asyncio.gather(
        *(_connection_load(port, requests, i, stop, latencies) for i in range(connections))
    )
    elapsed = time.perf_counter() - started
    us = np.asarray(latencies, np.int64) / 1e3
    return {
        "requests_per_s": len(us) / elapsed,
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
    }


async def _alternate(ports: dict[str, int], s: ServingSettings) -> dict[str, list[dict]]:
    requests = _requests(s)
    for port in ports.values():  # warm: connections, plans, pools
        await _round(port, requests, s.connections, 0.5)
    rounds: dict[str, list[dict]] = {name: [] for name in ports}
    for r in range(s.rounds):
        for name in list(ports)[:: 1 if r % 2 == 0 else -1]:
            rounds[name].append(await _round(ports[name], requests, s.connections, s.seconds))
    return rounds


def measure_serving(
    kvstore_address: str, redis_port: int, workdir: Path, s: ServingSettings
) -> dict[str, Any]:
    """Load the example's catalog into the node and the Redis, run both apps, load them
    in alternating rounds; requests/s, p50 and p99 (µs) per app, and the ratio."""
    if str(ROOT) not in sys.path:  # examples/ is a folder of the repository
        sys.path.insert(0, str(ROOT))
    # Imported here: the example brings FastAPI (the serving extra), which the rest of
    # the benchmark, and its report, do without.
    from examples.serving.load import Catalog, load_kvstore, load_redis

    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    catalog = Catalog.generate(s.users, s.items, s.seed)
    load_kvstore(kvstore_address, catalog)
    load_redis(redis_url, catalog)
    common = {"KVSTORE_ADDRESS": kvstore_address, "REDIS_URL": redis_url}
    with (
        ServingApp({**common, "SERVING_BACKEND": "kvstore"}, workdir / "app-kvstore.log") as kv,
        ServingApp({**common, "SERVING_BACKEND": "redis"}, workdir / "app-redis.log") as rd,
    ):
        user, items = 0, list(range(s.candidates))
        a, b = score_request(kv.port, user, items), score_request(rd.port, user, items)
        if a != b or a[0] != 200:
            raise RuntimeError(f"the two apps answer differently: {a[0]} and {b[0]}")
        rounds = uvloop.run(_alternate({"kvstore": kv.port, "redis": rd.port}, s))
    out: dict[str, Any] = {
        name: {
            key: float(np.median([r[key] for r in got]))
            for key in ("requests_per_s", "p50_us", "p99_us")
        }
        | {"round_requests_per_s": [r["requests_per_s"] for r in got]}
        for name, got in rounds.items()
    }
    out["ratio"] = out["kvstore"]["requests_per_s"] / out["redis"]["requests_per_s"]
    out["target_ratio"] = TARGET_RATIO
    out["met"] = out["ratio"] >= TARGET_RATIO
    out["connections"] = s.connections
    out["candidates"] = s.candidates
    return out


def render_serving(m: dict[str, Any]) -> str:
    """The section's table, as text."""
    lines = [
        f"the FastAPI example (examples/serving/), {m['connections']} keep-alive connections, "
        f"a user and {m['candidates']} candidate items per request, alternating rounds:",
        "",
        "| app reads from | requests/s | p50 µs | p99 µs | requests/s by round |",
        "|---|---:|---:|---:|---|",
    ]
    for name in ("kvstore", "redis"):
        c = m[name]
        rounds = ", ".join(f"{x:.0f}" for x in c["round_requests_per_s"])
        lines.append(
            f"| {name} | {c['requests_per_s']:.0f} | {c['p50_us']:.0f} | {c['p99_us']:.0f} "
            f"| {rounds} |"
        )
    verdict = "met" if m["met"] else "NOT met"
    lines.append(
        f"\nkvstore / redis requests/s: {m['ratio']:.2f}x (target >= {m['target_ratio']}x: "
        f"{verdict})"
    )
    return "\n".join(lines)
