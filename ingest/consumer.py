"""The stream consumer: read update messages from a broker and apply them to a table.

Brokers plug in as a ``Source`` (``nats_source``, ``kafka_source``); the command
line is ``kvstore.ingest.consume``. A consumer reads messages in batches,
turns them into writes (``kvstore.ingest.messages``) and stores its position — the
offset of the last message of the batch in each partition — in the same atomic
RocksDB write as the data (``WriteRequest.position``). On start, and after any
failure of the broker or the node, it reads the stored positions back
(``consumer_positions``) and resumes right after them: nothing is lost, and the
little that may be applied twice (the writes of a batch before its last one) is
harmless, because per key and per feature the newest event time wins.

A malformed message goes to the dead letter (subject or topic) with the reason and
its position, before the position moves past it; consumption goes on. The broker
or the node going away is retried with exponential backoff, for ever; an unknown
table, stream or topic stops the consumer at start with an error. See
docs/streaming.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from kvstore.client.aio import AsyncClient
from kvstore.errors import (
    InvalidArgument,
    KvstoreError,
    NotFound,
    TableNotFound,
)
from kvstore.ingest.messages import FORMATS, BadMessage, Batch, Delete, Message, Upsert
from kvstore.schema import TableSchema

__all__ = [
    "BrokerUnavailable",
    "ConsumeConfig",
    "ConsumeError",
    "ConsumeStats",
    "Source",
    "StreamConsumer",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Longest text of a reason in a dead letter's header.
MAX_REASON_CHARS = 2000


class ConsumeError(KvstoreError):
    """The consumer cannot run as configured: no such table, stream or topic."""


class BrokerUnavailable(Exception):
    """The broker cannot be reached or lost the consumer's state; retried with backoff."""


class Source(Protocol):
    """A broker's messages for a consumer. ``name`` is the position's source (stream/topic)."""

    name: str

    async def connect(self) -> None:
        """Reach the broker; ConsumeError when the stream or topic does not exist."""

    async def start(self, positions: dict[int, int]) -> None:
        """Deliver from right after ``positions`` (partition → last applied offset)."""

    async def fetch(self, max_messages: int) -> list[Message]:
        """Up to ``max_messages`` in order; [] after waiting a while for none."""

    def at_end(self) -> bool:
        """True when every message the broker held has been fetched."""

    async def dead_letter(self, message: Message, headers: dict[str, str]) -> None:
        """Send ``message`` to the dead letter with ``headers`` (queued until flushed)."""

    async def flush_dead_letters(self) -> None:
        """Return once every dead letter sent is stored by the broker."""

    async def close(self) -> None:
        """Release the connection; the next session connects again."""


@dataclass
class ConsumeConfig:
    """Settings of one consumer process; times in seconds."""

    table: str
    #: Names the position stored with the data (with the table and the source).
    consumer: str
    address: str | None = None
    format: str = "json"
    #: The key column of Arrow messages.
    key_column: str = "key"
    #: Messages per batch: one fetch, then its writes (one per feature set).
    batch: int = 1000
    #: Exit once every message the broker holds is applied, instead of waiting for more.
    stop_at_end: bool = False
    #: Deadline of every call to the node.
    timeout_s: float = 10.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0
    #: How often progress is logged at INFO.
    log_every_s: float = 10.0


@dataclass
class ConsumeStats:
    messages: int = 0
    rows_written: int = 0
    keys_deleted: int = 0
    dead_letters: int = 0
    batches: int = 0
    retries: int = 0


class _Stopped(Exception):
    """``stop()`` cut a backoff sleep short: no further attempt."""


def _transient(exc: BaseException) -> bool:
    """Worth retrying: the broker or the node away, not a bad table, stream or request."""
    return isinstance(exc, (BrokerUnavailable, KvstoreError)) and not isinstance(
        exc, (ConsumeError, NotFound, InvalidArgument)
    )


class StreamConsumer:
    """Applies a source's messages to a table, resuming from the positions stored there."""

    def __init__(self, config: ConsumeConfig, source: Source) -> None:
        if config.format not in FORMATS:
            raise ConsumeError(f"--format {config.format!r}: expected one of {', '.join(FORMATS)}")
        if config.batch < 1:
            raise ConsumeError(f"--batch must be at least 1, not {config.batch}")
        self.config = config
        self.source = source
        self.stats = ConsumeStats()
        self.schema: TableSchema | None = None
        self._stop = asyncio.Event()
        #: Failed attempts since the last applied batch: the exponent of the backoff.
        self._failures = 0
        self._started = time.monotonic()
        self._logged = (self._started, 0)

    def stop(self) -> None:
        """Finish the batch being applied, then return from ``run``."""
        self._stop.set()

    async def run(self) -> None:
        """Consume until ``stop()`` (or, with ``stop_at_end``, until caught up)."""
        try:
            await self._prepare()
            if not self._stop.is_set():
                # A new client per session: after a node restart, no channel in backoff.
                await self._retrying(self._retry_session)(self._with_client, self._session)
        except _Stopped:
            pass
        finally:
            await self.source.close()
            self._log_progress(final=True)

    def _client(self) -> AsyncClient:
        return AsyncClient(self.config.address, timeout=self.config.timeout_s)

    # -- a session: connect, read the positions, apply batches until a failure -----------

    async def _prepare(self) -> None:
        """The table's schema and the broker's stream or topic, retried while unreachable."""
        try:
            await self._retrying(self._retry_prepare)(self._with_client, self._reach)
        except _Stopped:
            raise ConsumeError("stopped before the consumer could start") from None

    async def _reach(self, client: AsyncClient) -> None:
        table = self.config.table
        try:
            if self.schema is None:
                self.schema = (await client.describe_table(table)).schema
                Batch(self.schema, self.config.format, self.config.key_column)
            await self.source.connect()
        except TableNotFound:
            raise ConsumeError(
                f"table {table!r} does not exist on node {client.address}; create it first "
                "(kvstore create-table)"
            ) from None
        except InvalidArgument as exc:
            raise ConsumeError(str(exc)) from None

    async def _with_client(self, attempt: Callable[[AsyncClient], Awaitable[T]]) -> T:
        client = self._client()
        try:
            return await attempt(client)
        finally:
            await client.close()

    # -- retries: the broker or the node away ----------------------------------------

    def _retrying(self, before_sleep: Callable[[RetryCallState], Awaitable[None]]) -> AsyncRetrying:
        """Retry transient failures for ever, with backoff, until ``stop()``."""
        return AsyncRetrying(
            retry=retry_if_exception(_transient),
            wait=self._backoff,
            sleep=self._backoff_sleep,
            before_sleep=before_sleep,
            reraise=True,
        )

    def _backoff(self, state: RetryCallState) -> float:
        """The wait before the next attempt, s: initial · 2^n, capped, times 0.5 to 1.

        n counts the failures since the last applied batch, not tenacity's attempts:
        a session that applied batches before failing starts a new outage.
        """
        cfg = self.config
        delay = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2**self._failures)
        self._failures += 1
        return delay * (0.5 + random.random() / 2)

    async def _backoff_sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        if self._stop.is_set():
            raise _Stopped

    async def _retry_prepare(self, state: RetryCallState) -> None:
        logger.warning("%s; retrying in %.2f s", _failure(state), state.upcoming_sleep)
        await self.source.close()

    async def _retry_session(self, state: RetryCallState) -> None:
        self.stats.retries += 1
        logger.warning(
            "%s; resuming from the stored position in %.2f s",
            _failure(state),
            state.upcoming_sleep,
        )
        await self.source.close()

    async def _session(self, client: AsyncClient) -> None:
        """Consume from the stored positions; returns when stopped or caught up."""
        cfg = self.config
        await self.source.connect()
        positions = await client.consumer_positions(cfg.table, cfg.consumer, self.source.name)
        await self.source.start(positions)
        logger.info(
            "consuming %s into table %r as consumer %r, from %s",
            self.source.name,
            cfg.table,
            cfg.consumer,
            ", ".join(f"partition {p} after {o}" for p, o in sorted(positions.items()))
            or "the beginning",
        )
        pending: asyncio.Task | None = None
        try:
            while True:
                if cfg.stop_at_end and pending is None and self.source.at_end():
                    logger.info("caught up with %s", self.source.name)
                    return
                if pending is None:
                    pending = asyncio.ensure_future(self.source.fetch(cfg.batch))
                messages = await self._unless_stopped(pending)
                if messages is None:
                    return
                pending = None
                if not messages:
                    continue
                # Fetch the next batch while this one is written (order is kept: one
                # batch is applied at a time).
                if not (cfg.stop_at_end and self.source.at_end()):
                    pending = asyncio.ensure_future(self.source.fetch(cfg.batch))
                await self._apply(client, messages)
                self._failures = 0
                self._log_progress()
                if self._stop.is_set():
                    return
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)

    async def _unless_stopped(self, task: asyncio.Task) -> list[Message] | None:
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        return None

    # -- a batch ---------------------------------------------------------------------

    async def _apply(self, client: AsyncClient, messages: list[Message]) -> None:
        by_partition: dict[int, list[Message]] = {}
        for message in messages:
            by_partition.setdefault(message.partition, []).append(message)
        for partition, run in by_partition.items():
            await self._apply_partition(client, partition, run)
        self.stats.messages += len(messages)
        self.stats.batches += 1

    async def _apply_partition(
        self, client: AsyncClient, partition: int, messages: list[Message]
    ) -> None:
        """Apply one partition's messages; the last write stores the position."""
        cfg = self.config
        assert self.schema is not None
        logger.debug(
            "applying %d messages of %s partition %d, offsets %d to %d",
            len(messages),
            self.source.name,
            partition,
            messages[0].offset,
            messages[-1].offset,
        )
        batch = Batch(self.schema, cfg.format, cfg.key_column)
        bad: list[tuple[Message, str]] = []
        for message in messages:
            try:
                batch.add(message)
            except BadMessage as exc:
                bad.append((message, str(exc)))
        # Dead letters are stored before the position moves past them (at least once).
        await self._dead_letters(bad)
        position = (cfg.consumer, self.source.name, partition, messages[-1].offset)
        writes = batch.plan()
        stored = False
        for i, write in enumerate(writes):
            last = i == len(writes) - 1
            rejected = await self._write(client, write, position if last else None)
            if rejected:
                owners = dict.fromkeys(owner for owner, _ in rejected)
                reasons = dict(rejected)
                await self._dead_letters([(messages[o], reasons[o]) for o in owners])
            elif last:
                stored = True
        if not stored:
            # Nothing written carried the position (every message was bad, or the
            # node refused part of the last write): store it alone.
            await client.delete(cfg.table, [], position=position)

    async def _write(
        self, client: AsyncClient, write: Upsert | Delete, position: tuple | None
    ) -> list[tuple[int, str]]:
        """Apply one write; the messages of the rows the node refuses, with the reason.

        A refused write is split in halves until the refused rows are found, so
        one bad update costs about 2·log2(rows) requests, and the rest is applied.
        """
        table = self.config.table
        try:
            if isinstance(write, Upsert):
                self.stats.rows_written += await client.write(
                    table, write.data(), event_time=write.event_times, position=position
                )
            else:
                self.stats.keys_deleted += await client.delete(
                    table, write.keys, event_time=write.event_time, position=position
                )
            return []
        except InvalidArgument as exc:
            if isinstance(write, Upsert) and write.full is not None:
                # The newest update of a key was refused: the ones it replaced count
                # again. Apply every update, in rounds of distinct keys.
                refused = []
                for part in write.rounds():
                    refused += await self._write(client, part, None)
                return refused
            if len(write) == 1:
                return [(int(write.owners[0]), f"refused by the node: {exc}")]
        half = len(write) // 2
        first = await self._write(client, write.take(np.arange(half)), None)
        return first + await self._write(client, write.take(np.arange(half, len(write))), None)

    async def _dead_letters(self, bad: list[tuple[Message, str]]) -> None:
        if not bad:
            return
        cfg = self.config
        for message, reason in bad:
            self.stats.dead_letters += 1
            logger.warning(
                "dead letter: %s partition %d offset %d: %s",
                self.source.name,
                message.partition,
                message.offset,
                reason,
            )
            headers = {
                "Kvstore-Error": _header_text(reason),
                "Kvstore-Table": cfg.table,
                "Kvstore-Consumer": cfg.consumer,
                "Kvstore-Source": self.source.name,
                "Kvstore-Subject": message.subject,
                "Kvstore-Partition": str(message.partition),
                "Kvstore-Offset": str(message.offset),
                "Kvstore-Format": cfg.format,
            }
            await self.source.dead_letter(message, headers)
        await self.source.flush_dead_letters()

    def _log_progress(self, final: bool = False) -> None:
        now = time.monotonic()
        last_at, last_count = self._logged
        if not final and now - last_at < self.config.log_every_s:
            return
        s = self.stats
        if final:
            elapsed = max(now - self._started, 1e-9)
            logger.info(
                "consumed %d messages in %.2f s (%.0f msgs/s): %d rows written, %d keys "
                "deleted, %d dead letters, %d retries",
                s.messages,
                elapsed,
                s.messages / elapsed,
                s.rows_written,
                s.keys_deleted,
                s.dead_letters,
                s.retries,
            )
        else:
            logger.info(
                "%d messages (%.0f/s), %d dead letters",
                s.messages,
                (s.messages - last_count) / (now - last_at),
                s.dead_letters,
            )
        self._logged = (now, s.messages)


def _header_text(text: str) -> str:
    """A header value: one line, bounded."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def _failure(state: RetryCallState) -> str:
    """What made an attempt fail, as the log says it."""
    assert state.outcome is not None
    exc = state.outcome.exception()
    return str(exc) or type(exc).__name__
