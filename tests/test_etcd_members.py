"""``--etcd`` with several members' URLs: the first that answers is used, an unreachable
member is left for the next, and errors name every URL tried.

Against a real etcd. The "member" that goes away mid-test is a TCP relay in front of
that etcd (real connections, closed for real): one etcd then answers under two URLs,
and closing the relay is a member lost while the keyspace lives on, as in a cluster of
several members.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from etcd_server import EtcdServer, free_port

from kvstore import Client
from kvstore.cluster.etcd import connect, split_urls, watch_range
from kvstore.errors import InvalidArgument, Unavailable
from kvstore.server.process import NodeProcess


@pytest.fixture
def cluster() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


class Relay:
    """A TCP relay on a free 127.0.0.1 port to ``port``; ``close()`` drops the listener
    and every connection, as a member that died would."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> Relay:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await self.server.wait_closed()


def test_a_list_of_urls_is_split_and_each_one_checked() -> None:
    assert split_urls("http://a:2379, http://b:2380,") == ["http://a:2379", "http://b:2380"]
    assert split_urls(["http://a:2379"]) == ["http://a:2379"]
    with pytest.raises(InvalidArgument, match="'b:2379'"):
        split_urls("http://a:2379,b:2379")
    with pytest.raises(InvalidArgument, match="no etcd URL"):
        split_urls(" , ")


def test_connect_takes_the_first_member_that_answers(etcd: EtcdServer, cluster: str) -> None:
    dead = closed_url()

    async def scenario() -> None:
        client = await connect(f"{dead},{etcd.url}", cluster, timeout_s=5.0)
        try:
            assert client.url == etcd.url
            assert client.urls == [dead, etcd.url]
            await client.client.put(client.keys.root + b"probe", b"1")
            assert (await client.get(client.keys.root + b"probe")).value == b"1"
        finally:
            await client.close()

    asyncio.run(scenario())


def test_when_no_member_answers_the_error_names_every_url_tried(cluster: str) -> None:
    first, second = closed_url(), closed_url()

    async def scenario() -> None:
        with pytest.raises(Unavailable) as caught:
            await connect([first, second], cluster, timeout_s=1.0)
        assert f"cannot reach etcd at {first} (" in str(caught.value)
        assert f", {second} (" in str(caught.value)

    asyncio.run(scenario())


def test_calls_and_watches_move_on_to_the_next_member_when_one_is_lost(
    etcd: EtcdServer, cluster: str
) -> None:
    async def scenario() -> None:
        relay = await Relay(etcd.client_port).start()
        client = await connect([relay.url, etcd.url], cluster, timeout_s=5.0)
        key = client.keys.root + b"k"
        try:
            assert client.url == relay.url
            await client.client.put(key, b"1")
            states = watch_range(client, key, prefix=False)
            assert (await anext(states))[key].value == b"1"
            await relay.close()  # the member in use is gone: connections cut, port closed
            # The watch notices, moves on, and sees a change made meanwhile.
            other = await connect(etcd.url, cluster)
            try:
                await other.client.put(key, b"2")
            finally:
                await other.close()
            state = await asyncio.wait_for(anext(states), 15)
            assert state[key].value == b"2"
            assert client.url == etcd.url
            assert (await client.get(key)).value == b"2"
            await states.aclose()
        finally:
            await client.close()

    asyncio.run(scenario())


def test_a_call_that_loses_its_member_names_it_and_the_next_call_goes_to_the_next(
    etcd: EtcdServer, cluster: str
) -> None:
    async def scenario() -> None:
        relay = await Relay(etcd.client_port).start()
        client = await connect([relay.url, etcd.url], cluster, timeout_s=5.0)
        key = client.keys.root + b"k"
        try:
            await client.client.put(key, b"1")
            lost = relay.url
            await relay.close()
            with pytest.raises(Unavailable, match=f"etcd at {lost} is unreachable"):
                await client.get(key)
            assert client.url == etcd.url
            assert (await client.get(key)).value == b"1"
        finally:
            await client.close()

    asyncio.run(scenario())


def test_a_node_given_several_urls_in_kvstore_etcd_joins_through_the_one_that_answers(
    etcd: EtcdServer, cluster: str, tmp_path: Path
) -> None:
    env = {"KVSTORE_ETCD": f"{closed_url()},{etcd.url}", "KVSTORE_CLUSTER": cluster}
    node = NodeProcess(tmp_path / "n1", "--node-id", "n1", env=env, start_timeout_s=60)
    with node, Client(node.address, timeout=30) as client:
        client.create_table("t", key="int64", features={"x": "float32"}, shards=4)
        assert client.write("t", {"key": [1, 2], "x": [0.5, 1.5]}) == 2
        assert client.get("t", [1, 2]).to_numpy()["x"].tolist() == [0.5, 1.5]
    assert f"registered in cluster '{cluster}' at etcd {etcd.url}" in node.output()


def test_a_node_whose_members_are_all_unreachable_exits_naming_each(tmp_path: Path) -> None:
    first, second = closed_url(), closed_url()
    serve = [sys.executable, "-m", "kvstore.cli", "serve", "--port", "0"]
    out = subprocess.run(
        [*serve, "--data", str(tmp_path), "--etcd", f"{first},{second}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert f"cannot reach etcd at {first} (" in out.stderr
    assert second in out.stderr
    assert "Traceback" not in out.stderr
