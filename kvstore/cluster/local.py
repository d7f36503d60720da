"""``make cluster``: one etcd and N storage nodes on this machine, in one command.

``python -m kvstore.cluster.local`` starts etcd (``EtcdProcess``, data in
``<data>/etcd``), then N ``kvstore serve --etcd URL --node-id nI`` processes through
the node supervisor (``NodeProcess``, data in ``<data>/nI``, gRPC on consecutive ports
from ``--base-port``), waits until every node serves and every node's cluster map shows
them all live, and prints where they are. The
ids and directories depend only on the position, so a restart reuses the same ids and
the same data. It then watches: a node or etcd that exits is reported with the tail
of its log. SIGINT or SIGTERM (``kvstore.shutdown``) stops the nodes gracefully and in
parallel, then etcd, since the nodes use etcd until they are gone; a second signal
hurries the nodes (each gets a second SIGTERM).

The children run in their own sessions: a Ctrl-C in the terminal reaches only this
supervisor, which stops them in that order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import click
import grpc

from kvstore.cluster.etcd_process import EtcdProcess, EtcdProcessError
from kvstore.server.process import START_TIMEOUT_S, STOP_TIMEOUT_S, NodeProcess, NodeProcessError
from kvstore.shutdown import Shutdown
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc
from kvstore.wire.dial import open_channel

__all__ = ["LocalCluster", "LocalClusterConfig", "main", "run"]

log = logging.getLogger("kvstore.cluster.local")

#: How often the running cluster is checked for a child that exited (s).
WATCH_INTERVAL_S = 0.2


@dataclass
class LocalClusterConfig:
    """Where the local cluster lives and on which ports; ports of 0 are chosen free."""

    data_dir: Path = Path("var/cluster")
    nodes: int = field(default_factory=lambda: os.cpu_count() or 1)
    host: str = "127.0.0.1"
    base_port: int = 7071
    etcd_port: int = 2379
    etcd_peer_port: int = 2380
    cluster: str = "default"
    #: More ``kvstore serve`` options, given to every node.
    serve_args: tuple[str, ...] = ()

    def node_id(self, index: int) -> str:
        """The id of the ``index``-th node (from 0): n1, n2, …, stable across restarts."""
        return f"n{index + 1}"

    def node_port(self, index: int) -> int:
        """The gRPC port of the ``index``-th node; 0 (a free one) when the base is 0."""
        return self.base_port + index if self.base_port else 0


class LocalCluster:
    """etcd and the nodes of one LocalClusterConfig, as child processes."""

    def __init__(self, config: LocalClusterConfig) -> None:
        if config.nodes < 1:
            raise ValueError(f"a cluster needs at least one node, not {config.nodes}")
        self.config = config
        self.etcd = EtcdProcess(
            config.data_dir / "etcd",
            host=config.host,
            client_port=config.etcd_port,
            peer_port=config.etcd_peer_port,
            new_session=True,
        )
        self.nodes: dict[str, NodeProcess] = {}
        for index in range(config.nodes):
            node_id = config.node_id(index)
            args = ["--port", str(config.node_port(index)), "--etcd", self.etcd.url]
            args += ["--cluster", config.cluster, "--node-id", node_id, *config.serve_args]
            self.nodes[node_id] = NodeProcess(
                config.data_dir / node_id, *args, host=config.host, new_session=True
            )
        self._reported: set[str] = set()

    def start(self) -> None:
        """Start etcd, then every node at once; return when all serve and each node's map
        shows them all live. On an error, what started is left running: ``stop()`` stops
        it."""
        self.etcd.start()
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            starts = [pool.submit(node.start) for node in self.nodes.values()]
            errors = [exc for exc in (start.exception() for start in starts) if exc]
        if errors:
            raise errors[0]
        self._wait_all_live(START_TIMEOUT_S)

    def _wait_all_live(self, timeout_s: float) -> None:
        """A node serves once it joined, but its view of the others may lag by a moment:
        a client's first map (or a table created at once) would miss a node. Wait until
        every node's cluster map shows every node of this cluster live."""
        deadline = time.monotonic() + timeout_s
        for node_id, node in self.nodes.items():
            missing: set[str] = set(self.nodes)
            while True:
                try:
                    with open_channel(node.address) as channel:
                        cmap = pb_grpc.FeatureStoreStub(channel).GetClusterMap(
                            pb.GetClusterMapRequest(), timeout=2
                        )
                    missing = set(self.nodes) - {n.node_id for n in cmap.nodes if n.state == "live"}
                except grpc.RpcError:
                    pass
                if not missing:
                    break
                if time.monotonic() > deadline:
                    raise NodeProcessError(
                        f"node {node_id}'s cluster map does not show {sorted(missing)} live "
                        f"{timeout_s:.0f} s after they started serving"
                    )
                time.sleep(0.02)

    def exited(self) -> list[tuple[str, int, str]]:
        """The children that exited since the last call: (name, exit status, log tail)."""
        found = []
        children: dict[str, NodeProcess | EtcdProcess] = {"etcd": self.etcd, **self.nodes}
        for name, child in children.items():
            proc = child.proc
            if name in self._reported or proc is None or proc.poll() is None:
                continue
            self._reported.add(name)
            found.append((name, proc.returncode, child.log_tail(2000)))
        return found

    def nodes_running(self) -> int:
        return sum(node.running() for node in self.nodes.values())

    def stop_nodes(self, node_ids: list[str]) -> list[str]:
        """SIGTERM the nodes and wait for them (in parallel); the problems, one line each."""
        problems = []
        with ThreadPoolExecutor(max_workers=max(1, len(node_ids))) as pool:
            stops = {
                node_id: pool.submit(self.nodes[node_id].stop, signal.SIGTERM, STOP_TIMEOUT_S)
                for node_id in node_ids
            }
        for node_id, stop in stops.items():
            exc = stop.exception()
            if exc is not None:
                problems.append(f"node {node_id}: {exc}")
            elif stop.result() not in (0, -signal.SIGTERM):
                problems.append(f"node {node_id} exited with {stop.result()} when stopped")
        return problems

    def hurry_nodes(self) -> None:
        """A second SIGTERM to every node still running: it cuts its waits short."""
        for node in self.nodes.values():
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)

    def table(self) -> str:
        """What is running where, and how to reach it."""
        rows = [("", "address", "pid", "log")]
        rows.append(("etcd", self.etcd.url, str(self.etcd.pid), str(self.etcd.log_path)))
        for node_id, node in self.nodes.items():
            rows.append((node_id, node.address, str(node.pid), str(node.log_path)))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = ["  ".join([*(r[i].ljust(widths[i]) for i in range(3)), r[3]]) for r in rows]
        first = next(iter(self.nodes.values())).address
        lines += [
            "",
            f"cluster {self.config.cluster!r}, data in {self.config.data_dir}",
            f'connect to any node:  Client("{first}")',
            f"the cluster:          kvstore cluster status --address {first}",
            "Ctrl-C stops the nodes, then etcd.",
        ]
        return "\n".join(lines)


async def run(config: LocalClusterConfig) -> int:
    """Start the cluster, print the table, keep it up until SIGINT / SIGTERM; the exit
    status: 0 after a clean stop, 1 if a child failed to start or to stop, or every
    node exited."""
    shutdown = Shutdown(
        "stopping the nodes, then etcd", "hurrying the nodes (a second SIGTERM each)"
    )
    cluster = LocalCluster(config)
    with shutdown.capture():
        status = 0
        try:
            status = await _start(cluster, shutdown)
            if status == 0 and not shutdown.requested.is_set():
                print(cluster.table(), flush=True)
                status = await _watch(cluster, shutdown)
        finally:
            status = max(status, await _stop(cluster, shutdown))
    return status


async def _start(cluster: LocalCluster, shutdown: Shutdown) -> int:
    starting = asyncio.ensure_future(asyncio.to_thread(cluster.start))
    requested = asyncio.ensure_future(shutdown.requested.wait())
    await asyncio.wait({starting, requested}, return_when=asyncio.FIRST_COMPLETED)
    requested.cancel()
    if not starting.done():
        # A child that is starting cannot be interrupted cleanly: stop once it serves.
        log.info("waiting for the nodes that are starting, to stop them")
    try:
        await starting
    except (EtcdProcessError, NodeProcessError, OSError) as exc:
        log.error("the cluster did not start: %s", exc)
        return 1
    return 0


async def _watch(cluster: LocalCluster, shutdown: Shutdown) -> int:
    """Report every child that exits, until a stop is requested or no node is left."""
    while True:
        try:
            await asyncio.wait_for(shutdown.requested.wait(), WATCH_INTERVAL_S)
            return 0
        except TimeoutError:
            pass
        for name, status, tail in cluster.exited():
            log.error("%s exited with status %s; the end of its log:\n%s", name, status, tail)
        if cluster.nodes_running() == 0:
            log.error("every node has exited: stopping etcd")
            return 1


async def _stop(cluster: LocalCluster, shutdown: Shutdown) -> int:
    running = [node_id for node_id, node in cluster.nodes.items() if node.running()]
    stopping = asyncio.ensure_future(asyncio.to_thread(cluster.stop_nodes, running))
    if not await shutdown.finished_unhurried(stopping):
        cluster.hurry_nodes()
    problems = await stopping
    for problem in problems:
        log.error("%s", problem)
    cluster.etcd.stop()
    if running:
        log.info("stopped %d node(s) and etcd", len(running))
    return 1 if problems else 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--nodes",
    "-n",
    type=click.IntRange(min=1),
    default=os.cpu_count() or 1,
    show_default="the number of CPUs",
    help="node processes to start (one per core is the production layout)",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("var/cluster"),
    show_default=True,
    help="etcd's data in DATA/etcd, node nI's in DATA/nI, logs beside them; reused on restart",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option(
    "--base-port",
    type=click.IntRange(min=0, max=65535),
    default=7071,
    show_default=True,
    help="gRPC port of n1; nI listens on BASE_PORT+I-1; 0 = a free port each",
)
@click.option(
    "--etcd-port",
    type=click.IntRange(min=0, max=65535),
    default=2379,
    show_default=True,
    help="etcd's client port; 0 = a free one",
)
@click.option(
    "--etcd-peer-port",
    type=click.IntRange(min=0, max=65535),
    default=2380,
    show_default=True,
    help="etcd's peer port; 0 = a free one",
)
@click.option("--cluster", default="default", show_default=True, help="the cluster's name in etcd")
@click.argument("serve_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- SERVE_OPTIONS]")
def main(
    nodes: int,
    data_dir: Path,
    host: str,
    base_port: int,
    etcd_port: int,
    etcd_peer_port: int,
    cluster: str,
    serve_args: tuple[str, ...],
) -> None:
    """Run etcd and NODES storage nodes on this machine until Ctrl-C.

    SERVE_OPTIONS after -- go to every node (kvstore serve options, e.g. --block-cache-mb 64).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = LocalClusterConfig(
        data_dir=data_dir,
        nodes=nodes,
        host=host,
        base_port=base_port,
        etcd_port=etcd_port,
        etcd_peer_port=etcd_peer_port,
        cluster=cluster,
        serve_args=serve_args,
    )
    sys.exit(asyncio.run(run(config)))


if __name__ == "__main__":
    main()
