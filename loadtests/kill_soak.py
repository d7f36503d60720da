"""``python -m loadtests.kill_soak``: issue 16's kill -9 fault, counted over many kills in a row.

Three node processes on a real etcd (``loadtests.servers.running_cluster``) and a
table with 2 replicas per shard, its rows written. Then ``readers`` reader processes
look up ``batch`` random existing keys back to back and ``writers`` writer processes
write batches of their own keys, while K rounds run one after the other: kill -9 a node
(round robin over the three), keep the load running ``down_s`` s, restart it (same data
directory, same node id), and wait until the map shows it live and every replica
Available again (it caught up) before the next round.

What counts:

* a **failed read**: a Get that raised, missed a row, or answered a wrong ``score``
  (written once at the start, ``key / 2``, never again); the first texts are kept.
* an **acked write**: each writer owns the keys ``k % writers == index`` (no other
  writer touches them) and sets their ``clicks`` to a version that only grows; it keeps
  each key's last acknowledged version and sends them back at the end.
* a **lost acked row**: afterwards every acked row is read from every Available
  replica of its shard directly (one node at a time, gRPC Get to that node alone); a
  replica that misses it or holds an older version loses it.

Figures, for information (no target is checked here): the p99 of reads started in
each kill's window (from the SIGKILL to the map showing the node caught up) against
the p99 of an idle window before the first kill. The exit status is 1 when a read
failed or an acked row was lost, 2 when the soak could not run to the end.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from kvstore import Client
from kvstore.keys import KeyBatch
from kvstore.server.process import NodeProcess, wait_until
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire.dial import open_channel
from loadtests.servers import replicas_available, running_cluster
from loadtests.shard_moves import cluster_map

__all__ = ["SoakSettings", "check_acked_rows", "main", "measure_soak", "render_soak", "run_soak"]

TABLE = "kill_soak"
FEATURES = {"score": "float32", "clicks": "int64"}
NODES = 3
REPLICAS = 2
#: A client call's deadline (s): a read that needs longer is a failed read.
TIMEOUT_S = 5.0
#: How long a restarted node may take to be live and caught up (s).
RECOVER_TIMEOUT_S = 120.0
#: How long a client process may take to start, or to send its figures once stopped (s).
PROCESS_TIMEOUT_S = 120.0
#: Error texts kept per reader or writer process.
KEEP_ERRORS = 5


@dataclass
class SoakSettings:
    """What the soak runs. Times in seconds, sizes in rows/keys."""

    kills: int = 10
    readers: int = 8
    writers: int = 2
    rows: int = 20_000
    shards: int = 12
    #: Keys per read, and per write.
    batch: int = 100
    write_batch: int = 16
    #: The idle window before the first kill, and how long each killed node stays down:
    #: past its lease (5 s), so that the cluster sees it gone and writes to its shards
    #: are acknowledged by the peer alone, the path a quick restart never takes.
    idle_s: float = 3.0
    down_s: float = 6.0
    seed: int = 20261207


# -- the client processes -----------------------------------------------------------


def _wrong_answer(result: Any, keys: np.ndarray) -> str:
    """What is wrong with a read's answer ("" when nothing)."""
    if not result.found.all():
        missing = keys[~np.asarray(result.found)]
        return f"{len(missing)} of {len(keys)} rows not found, e.g. key {int(missing[0])}"
    score = result.to_numpy()["score"]
    bad = score != keys.astype(np.float32) / 2
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        return f"key {int(keys[i])}: score {float(score[i])}, not {keys[i] / 2}"
    return ""


def _reader(
    index: int, address: str, s: SoakSettings, counts: Any, go: Any, stop: Any, conn: Any
) -> None:
    """A reader process: lookups back to back from ``go`` to ``stop``; ``counts[2 *
    index]`` and ``[2 * index + 1]`` follow its reads and failed reads as it goes; sends
    each good read's start (time.monotonic_ns, one clock for every process) and latency
    in ns, and the first error texts."""
    rng = np.random.default_rng([s.seed, 1, index])
    starts: list[int] = []
    latencies: list[int] = []
    errors: list[str] = []
    failed = 0
    with Client(address, timeout=TIMEOUT_S) as client:
        client.get(TABLE, [0])  # the schema and the map, before the clock starts
        conn.send("ready")
        go.wait(PROCESS_TIMEOUT_S)
        while not stop.is_set():
            keys = rng.integers(0, s.rows, s.batch, dtype=np.int64)
            t0 = time.monotonic_ns()
            try:
                problem = _wrong_answer(client.get(TABLE, keys), keys)
            except Exception as exc:  # a failed read is what this counts
                problem = f"{type(exc).__name__}: {exc}"
            t1 = time.monotonic_ns()
            if problem:
                failed += 1
                counts[2 * index + 1] = failed
                if len(errors) < KEEP_ERRORS:
                    errors.append(f"reader {index} at {t0}: {problem[:400]}")
                continue
            starts.append(t0)
            latencies.append(t1 - t0)
            counts[2 * index] = len(starts)
    timings = {"starts_ns": np.asarray(starts), "latencies_ns": np.asarray(latencies)}
    conn.send({"reads": len(starts) + failed, "failed": failed, "errors": errors, **timings})


def _writer(index: int, address: str, s: SoakSettings, go: Any, stop: Any, conn: Any) -> None:
    """A writer process: from ``go`` to ``stop``, writes ``clicks`` = a growing version to
    ``write_batch`` random keys of its own; sends each key's last acked version."""
    rng = np.random.default_rng([s.seed, 2, index])
    own = np.arange(index, s.rows, s.writers, dtype=np.int64)
    acked = np.zeros(len(own), np.int64)  # 0: never acknowledged
    acked_writes = failed = 0
    errors: list[str] = []
    version = 0
    with Client(address, timeout=TIMEOUT_S) as client:
        client.describe_table(TABLE)
        conn.send("ready")
        go.wait(PROCESS_TIMEOUT_S)
        while not stop.is_set():
            version += 1
            picked = rng.choice(len(own), min(s.write_batch, len(own)), replace=False)
            try:
                client.write(TABLE, {"key": own[picked], "clicks": np.full(len(picked), version)})
            except Exception as exc:  # not acknowledged: nothing was promised
                failed += 1
                if len(errors) < KEEP_ERRORS:
                    errors.append(f"writer {index}: {type(exc).__name__}: {str(exc)[:400]}")
                continue
            acked[picked] = version
            acked_writes += 1
    done = acked > 0
    figures = {"acked_writes": acked_writes, "failed_writes": failed, "errors": errors}
    conn.send({**figures, "keys": own[done], "versions": acked[done]})


class _Load:
    """The reader and writer processes (spawned), started together, stopped together."""

    def __init__(self, addresses: list[str], s: SoakSettings) -> None:
        ctx = mp.get_context("spawn")
        self.go, self.stop = ctx.Event(), ctx.Event()
        #: Reads and failed reads of each reader so far (each slot has one writer).
        self.counts = ctx.Array("q", 2 * s.readers, lock=False)
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        for kind, count in (("reader", s.readers), ("writer", s.writers)):
            for i in range(count):
                parent, child = ctx.Pipe()
                # Seeds spread over the nodes: a client whose seed is killed must follow
                # the map to the others.
                address = addresses[i % len(addresses)]
                if kind == "reader":
                    args = (i, address, s, self.counts, self.go, self.stop, child)
                    target = _reader
                else:
                    args = (i, address, s, self.go, self.stop, child)
                    target = _writer
                proc = ctx.Process(target=target, args=args, daemon=True, name=f"soak-{kind}-{i}")
                self.conns.append(parent)
                self.procs.append(proc)

    def start(self) -> None:
        for proc in self.procs:
            proc.start()
        for proc, conn in zip(self.procs, self.conns, strict=True):
            if not conn.poll(PROCESS_TIMEOUT_S):
                raise TimeoutError(f"{proc.name} did not start")
            conn.recv()
        self.go.set()

    def so_far(self) -> tuple[int, int]:
        """(reads, failed reads) of all readers so far."""
        counts = list(self.counts)
        return sum(counts[0::2]) + sum(counts[1::2]), sum(counts[1::2])

    def finish(self) -> list[dict]:
        """Stop the load; each process's figures (readers first)."""
        self.stop.set()
        results = []
        for proc, conn in zip(self.procs, self.conns, strict=True):
            if not conn.poll(PROCESS_TIMEOUT_S):
                raise TimeoutError(f"{proc.name} did not send its figures")
            results.append(conn.recv())
        self.close()
        return results

    def close(self) -> None:
        self.stop.set()
        for proc in self.procs:
            if proc.pid is None:
                continue
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()


# -- the check of the acked rows ----------------------------------------------------


def _get_from(address: str, request: pb.GetRequest) -> pb.GetResponse:
    """One Get answered by the node at ``address`` alone (no routing, no failover)."""
    with open_channel(address) as channel:
        return pb_grpc.FeatureStoreStub(channel).Get(request, timeout=TIMEOUT_S)


def check_acked_rows(seed: str, table: str, keys: np.ndarray, versions: np.ndarray) -> dict:
    """Read each acked row (``keys``, int64) from every Available replica of its shard,
    per node over gRPC Get to that node alone, through the node at ``seed``'s map.

    Returns ``replicas_checked`` (shard replicas read), ``not_available`` (replicas
    skipped, not Available), ``lost_rows`` (rows some replica misses or holds at a
    version below ``versions``), ``unread_shards`` (shards with acked rows and no
    Available replica: their rows count as lost) and the first ``lost`` examples.
    """
    cmap = cluster_map(seed)
    entry = next(t for t in cmap.tables if t.table == table)
    shard_of = KeyBatch.from_values("int64", keys, table).shard_ids(len(entry.replicas))
    lost = np.zeros(len(keys), bool)
    examples: list[str] = []
    checked = skipped = 0
    unread: list[int] = []
    with Client(seed, timeout=TIMEOUT_S) as client:
        client.describe_table(table)
        # The client's own decoding of one node's answer, as tests/test_client_replicas.py
        # checks replicas: the same code every read goes through.
        ops = client._ops
        plan = ops.get_plan(ops.schemas[table], ["clicks"])
        for shard, replicas in enumerate(entry.replicas):
            mask = shard_of == shard
            if not mask.any():
                continue
            batch = KeyBatch.from_values("int64", keys[mask], table)
            request = pb.GetRequest(table=table, keys=batch.to_proto(), features=["clicks"])
            read = 0
            for node, state in zip(replicas.node, replicas.state, strict=True):
                if state != "Available":
                    skipped += 1
                    continue
                address = cmap.nodes[node].address
                result = ops.finish_one(table, plan, batch, address, _get_from(address, request))
                found = np.asarray(result.found)
                clicks = np.where(found, result.to_numpy()["clicks"], 0)
                bad = ~found | (clicks < versions[mask])
                if bad.any() and len(examples) < KEEP_ERRORS:
                    i = int(np.flatnonzero(bad)[0])
                    got = int(clicks[i]) if found[i] else "no row"
                    examples.append(
                        f"shard {shard} on {cmap.nodes[node].node_id} ({address}): key "
                        f"{int(keys[mask][i])} acked at version {int(versions[mask][i])}, "
                        f"holds {got} ({int(bad.sum())} rows of the shard so)"
                    )
                lost[np.flatnonzero(mask)[bad]] = True
                checked += 1
                read += 1
            if not read:
                unread.append(shard)
                lost[mask] = True
    return {
        "replicas_checked": checked,
        "not_available": skipped,
        "unread_shards": unread,
        "lost_rows": int(lost.sum()),
        "lost": examples,
    }


# -- the soak -----------------------------------------------------------------------


def _p99_ms(starts: np.ndarray, latencies: np.ndarray, t0: int, t1: int) -> tuple[int, float]:
    """(reads, p99 in ms) of the good reads started in [t0, t1) ns; NaN without one."""
    inside = (starts >= t0) & (starts < t1)
    if not inside.any():
        return 0, float("nan")
    return int(inside.sum()), float(np.percentile(latencies[inside], 99) / 1e6)


def _say(progress: TextIO | None, line: str) -> None:
    if progress is not None:
        print(line, file=progress, flush=True)


def _caught_up(nodes: dict[str, NodeProcess], node_id: str, after_epoch: int) -> None:
    """Wait until ``node_id``'s map and another running node's show it live and every
    replica Available in an epoch above ``after_epoch`` (the restarted node marks its
    replicas to catch up in a new epoch before it serves); ``RECOVER_TIMEOUT_S`` at most."""

    def available() -> bool:
        peer = next(n for i, n in nodes.items() if i != node_id and n.running())
        return all(
            replicas_available(n.address, node_id, TABLE, after_epoch)
            for n in (nodes[node_id], peer)
        )

    wait_until(available, RECOVER_TIMEOUT_S, f"{node_id} to be live and caught up")


def _create_table(address: str, s: SoakSettings) -> None:
    """The table, with 2 replicas per shard on the 3 nodes (all live: running_cluster
    waits for that), every row written."""
    with Client(address, timeout=60) as client:
        client.create_table(TABLE, features=FEATURES, shards=s.shards, replicas=REPLICAS)
        entry = next(t for t in cluster_map(address).tables if t.table == TABLE)
        placed = sorted({len(r.node) for r in entry.replicas})
        if placed != [REPLICAS]:
            raise RuntimeError(f"the nodes placed {placed} replicas per shard, not {REPLICAS}")
        for part in np.array_split(np.arange(s.rows, dtype=np.int64), max(1, s.rows // 5000)):
            rows = {"key": part, "score": part.astype(np.float32) / 2, "clicks": part * 0}
            client.write(TABLE, rows)


def run_soak(s: SoakSettings, workdir: Path, progress: TextIO | None = sys.stderr) -> dict:
    """The whole soak (see the module docstring) under ``workdir``: every count and
    figure, a line per kill on ``progress``. Raises when the cluster does not start or a
    node does not come back within ``RECOVER_TIMEOUT_S``."""
    out: dict[str, Any] = {"settings": asdict(s), "workdir": str(workdir), "rounds": []}
    with running_cluster(workdir, NODES) as cluster:
        ids = list(cluster.nodes)
        addresses = [n.address for n in cluster.nodes.values()]
        _create_table(addresses[0], s)
        _say(progress, f"soak: {NODES} nodes, R={REPLICAS}, {s.rows:,} rows; logs in {workdir}")
        load = _Load(addresses, s)
        try:
            load.start()
            idle = (time.monotonic_ns(), 0)
            time.sleep(s.idle_s)  # the idle window: a duration of the load, not a sync
            idle = (idle[0], time.monotonic_ns())
            for k in range(s.kills):
                node_id = ids[k % NODES]
                node = cluster.nodes[node_id]
                peer = cluster.nodes[ids[(k + 1) % NODES]]
                epoch = cluster_map(peer.address).epoch
                reads0, failed0 = load.so_far()
                killed = time.monotonic_ns()
                node.kill()
                time.sleep(s.down_s)  # the load runs on a node short: a duration
                restarting = time.monotonic_ns()
                node.start()  # the same data directory and node id
                started = time.monotonic_ns()
                _caught_up(cluster.nodes, node_id, epoch)
                back = time.monotonic_ns()
                reads1, failed1 = load.so_far()
                out["rounds"].append(
                    {
                        "node": node_id,
                        "window_ns": (killed, back),
                        "down_s": (restarting - killed) / 1e9,
                        "restart_s": (started - restarting) / 1e9,
                        "catch_up_s": (back - started) / 1e9,
                        "reads": reads1 - reads0,
                        "failed_reads": failed1 - failed0,
                    }
                )
                _say(
                    progress,
                    f"kill {k + 1}/{s.kills}: {node_id} down {(restarting - killed) / 1e9:.1f} "
                    f"s, serving {(started - restarting) / 1e9:.1f} s after its restart, "
                    f"caught up {(back - started) / 1e9:.1f} s later; reads in the window "
                    f"{reads1 - reads0:,}, failed {failed1 - failed0} (in all {failed1})",
                )
            results = load.finish()
        finally:
            load.close()
        readers, writers = results[: s.readers], results[s.readers :]
        keys = np.concatenate([w["keys"] for w in writers])
        versions = np.concatenate([w["versions"] for w in writers])
        _say(progress, f"checking {len(keys):,} acked rows on every Available replica")
        seed = cluster.nodes[ids[0]].address  # a restarted node listens on a new port
        out["check"] = check_acked_rows(seed, TABLE, keys, versions)
    starts = np.concatenate([r["starts_ns"] for r in readers])
    latencies = np.concatenate([r["latencies_ns"] for r in readers])
    out["idle_reads"], out["idle_p99_ms"] = _p99_ms(starts, latencies, *idle)
    for r in out["rounds"]:
        _, r["p99_ms"] = _p99_ms(starts, latencies, *r["window_ns"])
    out.update(
        kills=len(out["rounds"]),
        reads=sum(r["reads"] for r in readers),
        failed_reads=sum(r["failed"] for r in readers),
        read_errors=[e for r in readers for e in r["errors"]],
        acked_writes=sum(w["acked_writes"] for w in writers),
        failed_writes=sum(w["failed_writes"] for w in writers),
        write_errors=[e for w in writers for e in w["errors"]],
        acked_rows=len(keys),
        lost_rows=out["check"]["lost_rows"],
    )
    out["ok"] = out["failed_reads"] == 0 and out["lost_rows"] == 0
    return out


def measure_soak(s: SoakSettings, workdir: Path) -> dict:
    """``run_soak`` as a step of ``make bench``: {"skipped": why} without etcd, {"error":
    what} when the soak could not finish (the rest of the bench goes on)."""
    if shutil.which("etcd") is None:
        return {"skipped": "etcd is not installed"}
    try:
        return run_soak(s, workdir)
    except (RuntimeError, TimeoutError) as exc:
        return {"error": f"{exc}"[:2000], "workdir": str(workdir)}


def render_soak(res: dict) -> str:
    """The soak's counts and figures as text."""
    if "skipped" in res:
        return f"kill -9 soak: skipped ({res['skipped']})"
    if "error" in res:
        return f"kill -9 soak: did not finish ({res['error']}); node logs in {res['workdir']}"
    s = res["settings"]
    c = res["check"]
    lines = [
        f"kill -9 soak: {NODES} nodes, R={REPLICAS}, {s['readers']} reader and {s['writers']} "
        f"writer processes, {s['rows']:,} rows in {s['shards']} shards, each node down "
        f"{s['down_s']:g} s",
        f"  kills {res['kills']}, reads {res['reads']:,}, failed reads {res['failed_reads']}",
        f"  acked writes {res['acked_writes']:,} ({res['acked_rows']:,} rows, checked on "
        f"{c['replicas_checked']} shard replicas), acked rows lost {res['lost_rows']}; "
        f"writes not acked {res['failed_writes']:,} (nothing promised)",
        f"  read p99 (100-key gets, information only): idle {res['idle_p99_ms']:.2f} ms;"
        " per kill, from the SIGKILL to caught up:",
    ]
    idle = res["idle_p99_ms"]
    for k, r in enumerate(res["rounds"], 1):
        lines.append(
            f"    {k:>2} {r['node']}: p99 {r['p99_ms']:.2f} ms ({r['p99_ms'] / idle:.1f}x idle), "
            f"{r['reads']:,} reads, {r['failed_reads']} failed; back in "
            f"{r['restart_s'] + r['catch_up_s']:.1f} s"
        )
    if res["read_errors"]:
        lines.append("  failed reads, the first: " + "; ".join(res["read_errors"][:KEEP_ERRORS]))
    if c["lost"] or c["unread_shards"]:
        lines.append(f"  lost: {'; '.join(c['lost'])} unread shards {c['unread_shards']}")
    lines.append("  PASS" if res["ok"] else f"  FAIL (node logs in {res['workdir']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the soak, print its counts; 0 when no read failed and no acked row was lost."""
    d = SoakSettings()
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.kill_soak",
        description=(
            "Issue 16's kill -9 fault, counted: 3 nodes on a real etcd, a table with 2 "
            "replicas per shard, reader and writer processes; each round kills a node "
            "with SIGKILL (round robin), keeps the load running, restarts it and waits "
            "until it has caught up. Counts failed reads and acked writes lost (each "
            "acked row read afterwards from every replica). Exit status 1 when a read "
            "failed or an acked write was lost, 2 when the soak could not finish. "
            "Progress lines on stderr. About 10-15 s a kill on 2 cores."
        ),
    )
    for name, kind, what in (
        ("kills", int, "rounds, each kills one node"),
        ("readers", int, "reader processes"),
        ("writers", int, "writer processes"),
        ("rows", int, "rows in the table"),
        ("shards", int, "shards of the table"),
        ("down-s", float, "seconds each killed node stays down (past its 5 s lease)"),
        ("idle-s", float, "seconds of load before the first kill (the idle p99)"),
    ):
        default = getattr(d, name.replace("-", "_"))
        parser.add_argument(f"--{name}", type=kind, default=default, help=f"{what} ({default})")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="data and node logs (default: a temporary directory, kept when the soak fails)",
    )
    args = parser.parse_args(argv)
    if args.kills < 1 or args.readers < 1 or args.writers < 1 or args.rows < args.writers:
        parser.error("--kills, --readers and --writers must be >= 1, --rows >= --writers")
    given = ("kills", "readers", "writers", "rows", "shards", "down_s", "idle_s")
    s = SoakSettings(**{name: getattr(args, name) for name in given})
    if shutil.which("etcd") is None:
        print("error: etcd is not installed (apt-get install etcd-server)", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kill-soak-"))
    keep = args.workdir is not None
    try:
        res = run_soak(s, workdir)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: the soak did not finish: {exc}\nnode logs in {workdir}", file=sys.stderr)
        return 2
    print(render_soak(res))
    if res["ok"] and not keep:
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
