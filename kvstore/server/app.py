"""Serving a node: startup, main loop, graceful shutdown (after uvicorn's server.py).

SIGTERM or SIGINT: health goes NOT_SERVING, new calls are refused, in-flight calls get
``shutdown_grace_s`` to finish, then the databases close. A second signal cancels the
calls still in flight instead of waiting out the grace period; the databases are closed
(flushed) all the same (``kvstore.shutdown``). Every step after the first signal has a
deadline, whatever etcd does (down, just back, hanging): a step that runs over is logged
by name and cut short, so the node exits within LEAVE_TIMEOUT_S + the grace period + a
few seconds, and still closes its databases.

With ``--etcd`` the node joins a cluster once it has opened its tables and bound its
ports, before it turns SERVING (``kvstore.cluster.agent``), and leaves it first when
it stops. Until the join has applied the placement the node refuses every read and
write with StaleMap (epoch 0). etcd unreachable at start, the node id held by another
live node, or a data directory of another cluster: the node does not start, with a
one-line error naming the etcd URL, the holder or both clusters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvstore.config import NodeConfig
from kvstore.errors import InvalidArgument
from kvstore.server.fast import FastServer
from kvstore.server.loads import LoadStaging
from kvstore.server.node import Node
from kvstore.server.servicer import FeatureStoreServicer
from kvstore.shutdown import Shutdown, cancel_and_wait, within
from kvstore.v1 import feature_store_pb2 as pb
from kvstore.v1 import feature_store_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from kvstore.cluster.agent import ClusterAgent

logger = logging.getLogger(__name__)

__all__ = ["NodeServer", "serve"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureStore"].full_name

#: How long leaving the cluster may take at a stop (s): the tasks end, then one etcd
#: call revokes the lease (3 s deadline). Past it the lease lapses on its own (its TTL).
LEAVE_TIMEOUT_S = 6.0
#: How long any other step of a stop may take, or overrun the grace period (s).
STEP_TIMEOUT_S = 3.0


class NodeServer:
    """One storage node process: the gRPC server around a Node."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.node = Node(config)
        self.loads = LoadStaging(self.node)
        self._housekeeping: asyncio.Task | None = None
        self._fast: FastServer | None = None
        self.fast_port: int | None = None
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        # The node's part in a cluster (--etcd); None when it runs alone.
        self.agent: ClusterAgent | None = None
        #: Set when the node stops because its cluster agent failed (exit 1).
        self.failed = False
        self._health = health.aio.HealthServicer()
        # shutdown() says it in its own words, with the grace period.
        self.stopping = Shutdown(
            graceful=None, hurry="cancelling the calls in flight, then closing the databases"
        )

    async def startup(self) -> None:
        cfg = self.config
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_request_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ]
        )
        # Bind before opening any database, so a taken port costs nothing to undo.
        try:
            self.port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        except RuntimeError as exc:
            raise OSError(
                f"cannot listen on {cfg.host}:{cfg.port}: the address is in use or not "
                f"available ({exc}); pick another --port or --host"
            ) from None
        if self.port == 0:
            raise OSError(f"cannot listen on {cfg.host}:{cfg.port}: the address is in use")
        if cfg.etcd and cfg.demo:
            # The placement decides a cluster node's tables: a local demo table would be
            # dropped at once (create demo_users through a client instead).
            logger.warning("--demo is ignored in a cluster (--etcd)")
            cfg.demo = False
        self.node.open()
        self.loads.open()
        if cfg.etcd:
            # Until the join applies the placement a cluster node may serve nothing: an
            # empty view refuses every key with StaleMap at epoch 0 (the fast read path
            # answers from here on, before the join).
            from kvstore.server.cluster_view import ClusterView

            self.node.view = ClusterView(cfg.node_id or "(joining)")
        address = cfg.advertise_address or f"{cfg.host}:{self.port}"
        fast_address = ""
        if cfg.fast_port >= 0:
            try:
                self._fast = FastServer(self.node)
                await self._fast.start(cfg.host, cfg.fast_port)
            except OSError as exc:
                self.node.close()
                raise OSError(
                    f"cannot listen on {cfg.host}:{cfg.fast_port} for the fast read path "
                    f"({exc}); pick another --fast-port, or -1 to turn it off"
                ) from None
            self.fast_port = self._fast.port
            fast_address = f"{address.rpartition(':')[0]}:{self.fast_port}"
        if cfg.etcd:
            try:
                self.agent = await self._join(address, fast_address)
            except BaseException:
                if self._fast is not None:
                    self._fast.close()
                self.node.close()
                raise
        pb_grpc.add_FeatureStoreServicer_to_server(
            FeatureStoreServicer(self.node, self.loads, address, fast_address, self.agent),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        await server.start()
        self._server = server
        self._housekeeping = asyncio.create_task(self._expire_loads())
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if cfg.port_file is not None:
            tmp = f"{cfg.port_file}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{self.port}\n")
            os.replace(tmp, cfg.port_file)
        logger.info(
            "kvstore node serving on %s:%d (fast read path: %s), data in %s (%d tables)",
            cfg.host,
            self.port,
            fast_address or "off",
            cfg.data_dir,
            len(self.node.tables),
        )

    async def _join(self, address: str, fast_address: str) -> ClusterAgent:
        # Imported here: a node without etcd does not load the etcd client at all.
        from kvstore.cluster.agent import ClusterAgent
        from kvstore.cluster.membership import NodeInfo, stable_node_id

        cfg = self.config
        if not (cfg.data_dir / "node-id").exists() and self.node.tables:
            # A cluster node drops the tables its placement does not have: tables kept
            # from running alone would be lost on joining. Refuse rather than drop them.
            raise InvalidArgument(
                f"data directory {cfg.data_dir} holds {len(self.node.tables)} table(s) of a "
                f"node that ran alone ({', '.join(sorted(self.node.tables))}); a node joining "
                "a cluster must start empty: give it another --data"
            )
        node_id = stable_node_id(cfg.data_dir, cfg.node_id or None)
        cfg.node_id = node_id
        me = NodeInfo(
            node_id,
            address,
            fast_address,
            zone=cfg.zone,
            data_dir=str(cfg.data_dir),
        )
        agent = ClusterAgent(
            self.node,
            cfg.etcd,
            cfg.cluster,
            me,
            on_failure=self._cluster_lost,
            replica_grace_s=cfg.replica_grace_s,
        )
        await agent.start()
        return agent

    def _cluster_lost(self) -> None:
        # The agent stopped following the placement: stop (exit 1, see serve) rather
        # than serve on with a view that no longer changes.
        self.failed = True
        self.stopping.requested.set()

    async def _expire_loads(self) -> None:
        interval = min(1.0, self.config.load_lease_s / 4)
        while True:
            await asyncio.sleep(interval)
            self.loads.expire()

    async def main_loop(self) -> None:
        await self.stopping.requested.wait()

    async def shutdown(self) -> None:
        grace = self.config.shutdown_grace_s
        logger.info("shutting down: draining in-flight calls (grace %.1f s)", grace)
        # Local and quick, but bounded like every step; a second signal does not skip it.
        await within(
            "turning health NOT_SERVING", self._health.enter_graceful_shutdown(), STEP_TIMEOUT_S
        )
        if self.agent is not None:
            # Leave the live set first: nothing new is placed on a node going away. A
            # second signal cuts it short (the lease then lapses within its TTL).
            await self.stopping.step("leaving the cluster", self.agent.stop(), LEAVE_TIMEOUT_S)
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self._fast is not None:
            self._fast.close()
        if self._server is not None:
            draining = asyncio.ensure_future(self._server.stop(grace))
            if not await self.stopping.finished_unhurried(draining, grace + STEP_TIMEOUT_S):
                # grpc.aio: a stop without grace, while one is waiting, cancels every call.
                await within(
                    "cancelling the calls in flight", self._server.stop(None), STEP_TIMEOUT_S
                )
            await within("draining the calls in flight", draining, STEP_TIMEOUT_S)
        for load_id in list(self.loads.loads):
            self.loads.abort(load_id)
        self.node.close()
        # asyncio.run cancels what is left once and waits for it without a limit: a task
        # that swallowed that cancel would keep the process alive. Cancel here, bounded.
        left = asyncio.all_tasks() - {asyncio.current_task()}
        await cancel_and_wait(left, STEP_TIMEOUT_S, "the tasks left at the stop")
        logger.info("stopped; databases closed")

    async def run(self) -> None:
        with self.stopping.capture():
            await self.startup()
            await self.main_loop()
            await self.shutdown()


def serve(config: NodeConfig) -> None:
    """Run a node until SIGTERM/SIGINT, on uvloop.

    Raises SystemExit(1) when a second signal cut the stop short (calls in flight were
    cancelled; the databases were closed all the same), or when the node stopped
    because it could no longer follow its cluster.
    """
    config.load()
    server = NodeServer(config)
    if sys.version_info >= (3, 12):  # pragma: no cover - uvloop.run is the modern spelling
        uvloop.run(server.run())
    else:
        uvloop.install()
        asyncio.run(server.run())
    if server.stopping.hurried.is_set() or server.failed:
        raise SystemExit(1)
