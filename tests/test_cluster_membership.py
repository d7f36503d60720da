"""Membership: nodes register under a lease in a real etcd, and leave when it lapses.

Each test uses its own cluster name (its own key prefix) in a shared etcd; the tests
that kill etcd start their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from etcd_server import EtcdServer, free_port

from kvstore.cluster.etcd import Etcd, connect, parse_url
from kvstore.cluster.membership import Membership, NodeInfo, stable_node_id, watch_nodes
from kvstore.errors import AlreadyExists, InvalidArgument, Unavailable

TTL_S = 2

# A node's registration in a process of its own, so that the test can SIGKILL it.
_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from kvstore.cluster.etcd import connect
    from kvstore.cluster.membership import Membership, NodeInfo

    async def main(url, cluster, node_id, address, data_dir, ttl):
        etcd = await connect(url, cluster)
        me = NodeInfo(node_id, address, data_dir=data_dir)
        await Membership(etcd, me, ttl_s=int(ttl)).start()
        print("registered", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main(*sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory) -> EtcdServer:
    server = EtcdServer(tmp_path_factory.mktemp("etcd")).start()
    yield server
    server.stop()


@pytest.fixture
def cluster() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


class ChildNode:
    """A process registered as node ``node_id``; ``kill()`` is a SIGKILL."""

    def __init__(self, url: str, cluster: str, node_id: str, data_dir: str, ttl_s: int = TTL_S):
        self.address = f"127.0.0.1:{free_port()}"
        args = [url, cluster, node_id, self.address, data_dir, str(ttl_s)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        line = self.proc.stdout.readline()
        if line.strip() != "registered":
            self.proc.kill()
            raise AssertionError(
                f"the child node did not register: {line}{self.proc.stdout.read()}"
            )

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


async def _wait_nodes(etcd: Etcd, condition, timeout_s: float) -> dict[str, NodeInfo]:
    async with asyncio.timeout(timeout_s), contextlib.aclosing(watch_nodes(etcd)) as watch:
        async for nodes in watch:
            if condition(nodes):
                return nodes
    raise AssertionError("unreachable")


def test_a_registered_node_is_live_and_a_clean_stop_removes_it_at_once(etcd_server, cluster):
    async def scenario():
        etcd = await connect(etcd_server.url, cluster)
        me = NodeInfo("n1", "127.0.0.1:7001", "127.0.0.1:7002", zone="z1", data_dir="/d/n1")
        member = Membership(etcd, me, ttl_s=TTL_S)
        await member.start()
        nodes = await member.wait_for(lambda nodes: "n1" in nodes, timeout_s=5)
        assert nodes["n1"] == me
        await member.stop()
        # Revoked, not left to lapse: the key is gone when stop() returns.
        assert await etcd.get(etcd.keys.node("n1")) is None
        await etcd.close()

    asyncio.run(scenario())


def test_the_keep_alive_holds_the_registration_past_its_ttl(etcd_server, cluster):
    async def scenario():
        etcd = await connect(etcd_server.url, cluster)
        member = Membership(etcd, NodeInfo("n1", "127.0.0.1:7001"), ttl_s=TTL_S)
        await member.start()
        # Observed for 2.5 TTLs: the key must never go (a time window, not a sync point).
        end = time.monotonic() + 2.5 * TTL_S
        while time.monotonic() < end:
            assert await etcd.get(etcd.keys.node("n1")) is not None
            await asyncio.sleep(0.2)
        await member.stop()
        await etcd.close()

    asyncio.run(scenario())


def test_a_killed_node_leaves_the_live_set_when_its_lease_lapses(etcd_server, cluster):
    child = ChildNode(etcd_server.url, cluster, "n7", "/d/n7")

    async def scenario():
        etcd = await connect(etcd_server.url, cluster)
        nodes = await _wait_nodes(etcd, lambda nodes: "n7" in nodes, timeout_s=5)
        assert nodes["n7"].address == child.address
        assert nodes["n7"].pid == child.proc.pid
        child.kill()
        t0 = time.monotonic()
        await _wait_nodes(etcd, lambda nodes: "n7" not in nodes, timeout_s=TTL_S + 5)
        # It went because the lease lapsed, not sooner (nobody revoked it).
        assert time.monotonic() - t0 > TTL_S / 2
        await etcd.close()

    try:
        asyncio.run(scenario())
    finally:
        child.kill()


def test_a_second_node_with_the_same_id_refuses_naming_the_holder(etcd_server, cluster):
    child = ChildNode(etcd_server.url, cluster, "n1", "/data/first", ttl_s=10)

    async def scenario():
        etcd = await connect(etcd_server.url, cluster)
        twin = Membership(etcd, NodeInfo("n1", "127.0.0.1:9999", data_dir="/data/second"))
        with pytest.raises(AlreadyExists) as err:
            await twin.start()
        message = str(err.value)
        assert "'n1'" in message and child.address in message and "/data/first" in message
        # The holder's registration is untouched, and the refused lease was given back.
        entry = await etcd.get(etcd.keys.node("n1"))
        assert NodeInfo.from_json(entry.value).address == child.address
        assert twin.lease_id is None
        await etcd.close()

    try:
        asyncio.run(scenario())
    finally:
        child.kill()


def test_the_same_node_restarting_after_kill_9_takes_over_its_registration(etcd_server, cluster):
    # A long TTL: the old lease is still alive when the node comes back.
    child = ChildNode(etcd_server.url, cluster, "n1", "/data/n1", ttl_s=30)
    child.kill()

    async def scenario():
        etcd = await connect(etcd_server.url, cluster)
        old = await etcd.get(etcd.keys.node("n1"))
        assert old is not None and NodeInfo.from_json(old.value).pid == child.proc.pid
        again = Membership(etcd, NodeInfo("n1", "127.0.0.1:7005", data_dir="/data/n1"), ttl_s=TTL_S)
        await again.start()
        entry = await etcd.get(etcd.keys.node("n1"))
        info = NodeInfo.from_json(entry.value)
        assert (info.address, info.pid) == ("127.0.0.1:7005", again.me.pid)
        assert entry.lease == again.lease_id != old.lease
        # The previous run's lease is revoked (TTL -1: not found), not left to run out.
        assert (await etcd.client.get_lease_info(old.lease)).TTL == -1
        await again.stop()
        await etcd.close()

    asyncio.run(scenario())


def test_an_unreachable_etcd_is_a_clear_error_naming_its_url():
    url = f"http://127.0.0.1:{free_port()}"

    async def scenario():
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match=f"etcd at {url}"):
            await connect(url, "c1", timeout_s=1.0)
        assert time.monotonic() - t0 < 5

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "url", ["127.0.0.1:2379", "https://h:2379", "http://h:notaport", "http://h/x"]
)
def test_a_malformed_etcd_url_is_refused(url):
    with pytest.raises(InvalidArgument, match="etcd URL"):
        parse_url(url)


def test_a_node_id_with_a_slash_is_refused():
    with pytest.raises(InvalidArgument, match="node id"):
        NodeInfo("a/b", "127.0.0.1:1")


def test_a_data_directory_keeps_its_node_id_across_restarts(tmp_path: Path):
    generated = stable_node_id(tmp_path / "a")
    assert generated and stable_node_id(tmp_path / "a") == generated
    assert stable_node_id(tmp_path / "b", "n2") == "n2"
    assert stable_node_id(tmp_path / "b") == "n2" == stable_node_id(tmp_path / "b", "n2")
    with pytest.raises(InvalidArgument, match=r"belongs to node 'n2', not 'n3'"):
        stable_node_id(tmp_path / "b", "n3")


def test_etcd_lost_and_restarted_empty_the_node_keeps_its_view_and_registers_again(tmp_path: Path):
    server = EtcdServer(tmp_path).start()

    async def scenario():
        etcd = await connect(server.url, "c1")
        member = Membership(etcd, NodeInfo("n1", "127.0.0.1:7001"), ttl_s=TTL_S)
        other = Membership(etcd, NodeInfo("n2", "127.0.0.1:7002"), ttl_s=TTL_S)
        await member.start()
        await other.start()
        await member.wait_for(lambda nodes: set(nodes) == {"n1", "n2"}, timeout_s=5)

        server.kill()
        # Longer than a TTL without etcd: the node keeps serving with its last view.
        t_end = time.monotonic() + 1.5 * TTL_S
        while time.monotonic() < t_end:
            assert set(member.nodes) == {"n1", "n2"}
            await asyncio.sleep(0.2)

        # etcd comes back with nothing (restored from nothing): both register again.
        server.wipe()
        await asyncio.to_thread(server.start)
        fresh = await connect(server.url, "c1")
        await _wait_nodes(fresh, lambda nodes: set(nodes) == {"n1", "n2"}, timeout_s=10)
        assert (await fresh.get(fresh.keys.node("n1"))).lease == member.lease_id
        # The other node's watch came back with etcd: it sees n1 leave.
        await member.stop()
        await other.wait_for(lambda nodes: set(nodes) == {"n2"}, timeout_s=5)
        await other.stop()
        await etcd.close()
        await fresh.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
