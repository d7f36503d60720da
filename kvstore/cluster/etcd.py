"""The connection to etcd, the cluster's key layout in it, and a watch that survives outages.

Only nodes talk to etcd (clients get the cluster map from a node). Every key of one
cluster lives under one prefix, so several clusters (or test runs) can share an etcd::

    /kvstore/<cluster>/nodes/<node id>   a live node's registration (JSON), attached to
                                         that node's lease: it disappears when the lease
                                         lapses (kvstore.cluster.membership)
    /kvstore/<cluster>/placement         the placement document (JSON, one key): tables,
                                         shards, replicas, epoch; changed only by
                                         compare-and-swap (kvstore.cluster.placement)
    /kvstore/<cluster>/sizes/<node id>   bytes of each shard the node holds (JSON), for
                                         balancing moves (kvstore.cluster.sizes)

etcd errors are turned into ``kvstore.errors.Unavailable`` naming the URL in one place
(``Etcd.calls``), so a node's log and an operator's terminal say which etcd is missing.

``--etcd`` may list several members (``http://a:2379,http://b:2379``): aetcd talks to
one host, so ``Etcd`` holds one client per URL and uses one at a time. ``connect``
takes the first member that answers; a call or a watch that finds its member
unreachable moves on to the next (``Etcd.fail_over``), and the retries go there. The
members share one replicated keyspace, leases included, so nothing else changes.

Stopping is bounded whatever etcd does: a watch ends on its task's cancellation even
when aetcd swallowed it (``watch_range``), and ``Etcd.close`` gives up on a client whose
close does not finish in time (kvstore.shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions

from kvstore.errors import InvalidArgument, Unavailable
from kvstore.shutdown import cancel_requested, within

__all__ = [
    "ClusterKeys",
    "Entry",
    "Etcd",
    "connect",
    "parse_url",
    "split_urls",
    "watch_range",
]

log = logging.getLogger(__name__)

# A per-call deadline: an etcd on loopback or in a LAN answers in milliseconds, so a
# call still open after this is a lost etcd, and the node must get on with serving.
CALL_TIMEOUT_S = 3
CONNECT_TIMEOUT_S = 5.0
# Closing the clients at a node's stop (s): aetcd's close tears a watch stream down
# under a lock and can wait on it forever; past this the process exit ends them.
CLOSE_TIMEOUT_S = 2.0
# Between attempts to reach a lost etcd (s): short enough that a restarted etcd is
# noticed within a lease TTL, long enough not to spin.
RETRY_INTERVAL_S = 0.5

# gRPC backs off reconnecting up to 120 s: after a long etcd outage a node would stay
# behind (not registered, not seeing new placements) long after etcd is back. Retry at
# least every second instead, as our own retries do.
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 250,
    "grpc.min_reconnect_backoff_ms": 250,
    "grpc.max_reconnect_backoff_ms": 1000,
}

#: A fault hook for tests (docs/operations.md, "Fault hooks"): with this variable set,
#: each watch, once made, waits for its task's cancellation and drops it, as aetcd's
#: watch creation does on Python 3.11 when the cancel lands as etcd answers.
FAULT_WATCH_DROPS_CANCEL = "KVSTORE_FAULT_WATCH_DROPS_CANCEL"

_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def parse_url(url: str) -> tuple[str, int]:
    """``http://host:port`` → (host, port); InvalidArgument names what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise InvalidArgument(
            f"etcd URL {url!r} is not of the form http://host:port (TLS is not supported yet)"
        )
    try:
        port = parts.port or 2379
    except ValueError:
        raise InvalidArgument(f"etcd URL {url!r} has an invalid port") from None
    return parts.hostname, port


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """``"http://a:2379,http://b:2379"`` (or a list) → the URLs, each checked with
    ``parse_url``; InvalidArgument when there is none or one is malformed."""
    parts = urls.split(",") if isinstance(urls, str) else list(urls)
    found = [u.strip() for u in parts if u.strip()]
    if not found:
        raise InvalidArgument(f"no etcd URL in {urls!r}: give http://host:port[,http://…]")
    for url in found:
        parse_url(url)
    return found


# Errors that say the member itself is unreachable or too slow (UNAVAILABLE,
# DEADLINE_EXCEEDED): another member may answer. Anything else is etcd's answer.
_MEMBER_LOST = (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError)


@dataclass(frozen=True)
class ClusterKeys:
    """Where one cluster's keys live in etcd (the layout in this module's docstring)."""

    cluster: str

    def __post_init__(self) -> None:
        if not _CLUSTER_NAME.match(self.cluster):
            raise InvalidArgument(
                f"cluster name {self.cluster!r} is not valid: letters, digits, '_', '.', '-', "
                "at most 64 characters"
            )

    @property
    def root(self) -> bytes:
        return f"/kvstore/{self.cluster}/".encode()

    @property
    def nodes(self) -> bytes:
        """The prefix of the live nodes' registrations."""
        return self.root + b"nodes/"

    def node(self, node_id: str) -> bytes:
        return self.nodes + node_id.encode()

    @property
    def placement(self) -> bytes:
        return self.root + b"placement"

    @property
    def sizes(self) -> bytes:
        """The prefix of the nodes' shard-size reports (kvstore.cluster.sizes)."""
        return self.root + b"sizes/"


@dataclass(frozen=True)
class Entry:
    """A key's value and its etcd revisions (mod_revision is what a CAS compares)."""

    value: bytes
    mod_revision: int
    lease: int = 0


class Etcd:
    """An open etcd client for one cluster: the members' URLs, the client of the one in
    use (``client``, ``url``) and the cluster's keys."""

    def __init__(
        self, urls: str | Sequence[str], cluster: str, call_timeout_s: float = CALL_TIMEOUT_S
    ) -> None:
        self.urls = split_urls(urls)
        self.keys = ClusterKeys(cluster)
        self._call_timeout_s = call_timeout_s
        # One client per member, made when first used and kept: a call still running on
        # a member left behind ends on its own rather than on a closed channel.
        self._clients: dict[str, aetcd.Client] = {}
        self._index = 0
        self.client = self._client_of(self.urls[0])

    @property
    def url(self) -> str:
        """The URL of the member in use."""
        return self.urls[self._index]

    def _client_of(self, url: str) -> aetcd.Client:
        if url not in self._clients:
            host, port = parse_url(url)
            # aetcd passes this timeout to every unary call; watches are streams without one.
            self._clients[url] = aetcd.Client(
                host=host, port=port, timeout=self._call_timeout_s, options=_CHANNEL_OPTIONS
            )
        return self._clients[url]

    def fail_over(self, failed: aetcd.Client) -> bool:
        """Use the next member, ``failed`` being the client a call just lost; whether
        there is another member. Several tasks that lost the same member move on once:
        a caller whose ``failed`` is no longer in use finds the move already made."""
        if len(self.urls) == 1:
            return False
        if failed is self.client:
            lost = self.url
            self._index = (self._index + 1) % len(self.urls)
            self.client = self._client_of(self.url)
            log.warning("etcd member %s is unreachable; using %s", lost, self.url)
        return True

    @contextmanager
    def calls(self, doing: str) -> Iterator[None]:
        """Turn etcd client errors raised inside into Unavailable naming the URL; after
        an unreachable member, the next call goes to the next member."""
        client = self.client
        url = self.url
        try:
            yield
        except aetcd.exceptions.ClientError as exc:
            if isinstance(exc, _MEMBER_LOST):
                self.fail_over(client)
            raise Unavailable(
                f"etcd at {url} is unreachable while {doing}: {exc or type(exc).__name__}"
            ) from exc

    async def get(self, key: bytes) -> Entry | None:
        """The entry at ``key``, None when absent; Unavailable when etcd is unreachable."""
        with self.calls(f"reading {key.decode()}"):
            got = await self.client.get(key)
        return None if got is None else Entry(got.value, got.mod_revision, got.lease)

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close every member's client, giving up (logged) after ``timeout_s`` s."""
        await within(
            f"closing the etcd client ({', '.join(self._clients)})", self._close(), timeout_s
        )

    async def _close(self) -> None:
        for client in self._clients.values():
            await client.close()


async def connect(
    urls: str | Sequence[str], cluster: str, timeout_s: float = CONNECT_TIMEOUT_S
) -> Etcd:
    """An Etcd whose member in use has answered a status call within ``timeout_s`` s.

    ``urls``: one URL or several (a comma-separated string or a list), tried in turn
    until one answers (an etcd still starting is waited for until then). Raises
    Unavailable naming every URL tried, with why each failed, when none did.
    """
    etcd = Etcd(urls, cluster, call_timeout_s=min(CALL_TIMEOUT_S, timeout_s))
    deadline = time.monotonic() + timeout_s
    why: dict[str, str] = {}
    while True:
        client = etcd.client
        try:
            await client.status()
            return etcd
        except aetcd.exceptions.ClientError as exc:
            why[etcd.url] = str(exc) or type(exc).__name__
            if time.monotonic() + RETRY_INTERVAL_S > deadline:
                await etcd.close()
                tried = ", ".join(f"{url} ({reason})" for url, reason in why.items())
                raise Unavailable(
                    f"cannot reach etcd at {tried} within {timeout_s:g} s; "
                    "is it running, and is --etcd right?"
                ) from None
            etcd.fail_over(client)
            if etcd.url == etcd.urls[0]:  # every member tried once: wait before the next round
                await asyncio.sleep(RETRY_INTERVAL_S)


async def watch_range(etcd: Etcd, key: bytes, prefix: bool) -> AsyncIterator[dict[bytes, Entry]]:
    """Yield the keys at ``key`` (or under it, when ``prefix``) now, then after every change.

    Each item is the whole state of the range. When etcd is lost the generator logs
    it, yields nothing until etcd answers again, then reads the range anew and yields
    it if it changed: a consumer keeps serving with the last state meanwhile. It
    returns when ``etcd`` is closed.
    """
    # [key, key + NUL) is the one key: one range read gives the state and its revision.
    range_end = aetcd.utils.prefix_range_end(key) if prefix else key + b"\0"
    last: dict[bytes, Entry] | None = None
    lost = False
    drops_cancel = bool(os.environ.get(FAULT_WATCH_DROPS_CANCEL))
    while True:
        # aetcd creates a watch under asyncio.wait_for, which on Python 3.11 drops a
        # cancellation landing as etcd answers (kvstore.shutdown): this task would go on
        # watching, and the node's stop would wait for it forever. End as asked instead.
        if cancel_requested():
            raise asyncio.CancelledError
        client = etcd.client
        try:
            got = await client.get_range(key, range_end)
            state = {kv.key: Entry(kv.value, kv.mod_revision, kv.lease) for kv in got}
            revision = got.header.revision
            if lost:
                log.warning("etcd at %s is reachable again; watching %s", etcd.url, key.decode())
                lost = False
            if state != last:
                last = dict(state)
                yield dict(state)
            # From the revision read: no change between the read and the watch is missed.
            watch = await client.watch(key, range_end=range_end, start_revision=revision + 1)
            if drops_cancel:
                drops_cancel = False
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()  # until the stop cancels this task
            try:
                if cancel_requested():
                    raise asyncio.CancelledError
                async for event in watch:
                    if event.kind == "PUT":
                        state[event.kv.key] = Entry(
                            event.kv.value, event.kv.mod_revision, event.kv.lease
                        )
                    else:
                        state.pop(event.kv.key, None)
                    if state != last:
                        last = dict(state)
                        yield dict(state)
            finally:
                await _cancel_quietly(watch)
            # A watch ends without an error only when this client was closed: stop too
            # (going round again would open a new connection behind the owner's back).
            return
        except aetcd.exceptions.ClientError as exc:
            if not lost:
                log.warning(
                    "etcd at %s is unreachable (%s); keeping the last view of %s, retrying",
                    etcd.url,
                    exc or type(exc).__name__,
                    key.decode(),
                )
                lost = True
            if isinstance(exc, _MEMBER_LOST):
                etcd.fail_over(client)
            await asyncio.sleep(RETRY_INTERVAL_S)


async def _cancel_quietly(watch: aetcd.rtypes.Watch) -> None:
    # After an outage the stream is already gone with the etcd that served it; after
    # the client was closed aetcd's cancel finds no watcher (AttributeError).
    with contextlib.suppress(aetcd.exceptions.ClientError, TimeoutError, AttributeError):
        async with asyncio.timeout(CALL_TIMEOUT_S):  # not wait_for: it can drop a cancel
            await watch.cancel()
