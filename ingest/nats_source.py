"""NATS JetStream as a stream consumer's source (nats-py).

Every session opens an ephemeral pull consumer that starts right after the position
stored in the table (``DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last + 1``)
and never acknowledges (``AckPolicy.NONE``): the table, not the broker, remembers
where the consumer is, so a restart or a new session can never skip or replay
anything the table does not know about. A message's offset is its stream sequence;
NATS has one partition (0).

Fetches ask for at most ``num_pending`` messages (which the server holds, so they
come back at once); when nothing is pending, a fetch of one message waits up to
``idle_timeout_s`` for the next. A server that goes away closes the connection and
ends the session (BrokerUnavailable); the consumer retries with backoff and resumes
from the stored position.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from kvstore.ingest.consumer import BrokerUnavailable, ConsumeError
from kvstore.ingest.messages import Message

__all__ = ["NatsSource"]

logger = logging.getLogger(__name__)

#: Seconds an ephemeral consumer outlives its client (a killed consumer's is then removed).
INACTIVE_THRESHOLD_S = 30.0


class NatsSource:
    """Messages of ``subject`` in a JetStream stream; dead letters published to a subject."""

    def __init__(
        self,
        servers: list[str],
        subject: str,
        *,
        stream: str | None = None,
        dead_letter: str | None = None,
        idle_timeout_s: float = 1.0,
        fetch_timeout_s: float = 5.0,
        connect_timeout_s: float = 2.0,
    ) -> None:
        if dead_letter is not None and subject_matches(subject, dead_letter):
            raise ConsumeError(
                f"the dead-letter subject {dead_letter!r} is consumed by --subject {subject!r}: "
                "dead letters would come back as input; use a subject outside it"
            )
        self.servers = servers
        self.subject = subject
        self.name = stream or ""
        self.dead_letter_subject = dead_letter
        self.idle_timeout_s = idle_timeout_s
        self.fetch_timeout_s = fetch_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._nc: nats.NATS | None = None
        self._js: JetStreamContext | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._pending = 0
        self._dead_letter_stored = False

    @property
    def where(self) -> str:
        return f"NATS {','.join(self.servers)}"

    async def connect(self) -> None:
        if self._nc is not None and self._nc.is_connected:
            return
        await self.close()
        try:
            self._nc = await nats.connect(
                servers=self.servers,
                allow_reconnect=False,
                connect_timeout=self.connect_timeout_s,
                # Each server is tried twice, then NoServersError: our own backoff retries
                # (0 would mean "for ever" inside nats.connect).
                max_reconnect_attempts=1,
                reconnect_time_wait=0.05,
                error_cb=self._on_error,
                name="kvstore-consume",
            )
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            self._nc = None
            raise BrokerUnavailable(f"{self.where}: cannot connect ({_text(exc)})") from None
        self._js = self._nc.jetstream()
        try:
            if self.name:
                await self._js.stream_info(self.name)
            else:
                self.name = await self._js.find_stream_name_by_subject(self.subject)
        except nats.js.errors.NotFoundError:
            what = f"stream {self.name!r}" if self.name else f"stream capturing {self.subject!r}"
            raise ConsumeError(
                f"{self.where}: no JetStream {what}; create it first (nats stream add)"
            ) from None
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(
                f"{self.where}: JetStream is not answering ({_text(exc)})"
            ) from None
        self._dead_letter_stored = False
        if self.dead_letter_subject:
            try:
                await self._js.find_stream_name_by_subject(self.dead_letter_subject)
                self._dead_letter_stored = True
            except nats.js.errors.NotFoundError:
                logger.warning(
                    "no JetStream stream captures the dead-letter subject %r: dead letters are "
                    "published without being stored (only current subscribers see them)",
                    self.dead_letter_subject,
                )

    async def start(self, positions: dict[int, int]) -> None:
        assert self._js is not None
        last = positions.get(0)
        try:
            info = await self._js.stream_info(self.name)
            if last is None:
                config = api.ConsumerConfig(
                    deliver_policy=api.DeliverPolicy.ALL,
                    ack_policy=api.AckPolicy.NONE,
                    inactive_threshold=INACTIVE_THRESHOLD_S,
                )
            else:
                self._check_position(last, info.state.first_seq, info.state.last_seq)
                config = api.ConsumerConfig(
                    deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=last + 1,
                    ack_policy=api.AckPolicy.NONE,
                    inactive_threshold=INACTIVE_THRESHOLD_S,
                )
            self._sub = await self._js.pull_subscribe(self.subject, stream=self.name, config=config)
            # nats-py's ConsumerInfo fields default to None; the server always sends it.
            self._pending = (await self._sub.consumer_info()).num_pending  # type: ignore[assignment]
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(
                f"{self.where}: cannot open a consumer ({_text(exc)})"
            ) from None

    def _check_position(self, last: int, first_seq: int, last_seq: int) -> None:
        if last > last_seq:
            logger.warning(
                "stream %r ends at sequence %d but the stored position is %d: was the stream "
                "recreated? Messages up to sequence %d will be skipped",
                self.name,
                last_seq,
                last,
                last,
            )
        elif last + 1 < first_seq:
            logger.warning(
                "stream %r starts at sequence %d: %d messages after the stored position %d were "
                "removed (retention) before they were consumed",
                self.name,
                first_seq,
                first_seq - last - 1,
                last,
            )

    async def fetch(self, max_messages: int) -> list[Message]:
        if self._sub is None or self._nc is None:
            raise BrokerUnavailable(f"{self.where}: not connected")
        if self._pending > 0:
            batch, timeout = min(max_messages, self._pending), self.fetch_timeout_s
        else:
            batch, timeout = 1, self.idle_timeout_s
        try:
            msgs = await self._sub.fetch(batch, timeout=timeout)
        except TimeoutError:
            await self._check_alive()
            return []
        except (nats.errors.Error, OSError) as exc:
            raise BrokerUnavailable(f"{self.where}: fetch failed ({_text(exc)})") from None
        out = []
        for m in msgs:
            meta = m.metadata
            out.append(
                Message(
                    m.data,
                    0,
                    meta.sequence.stream,
                    round(meta.timestamp.timestamp() * 1e6),
                    m.subject,
                    None,
                    dict(m.headers or {}),
                )
            )
        if msgs:
            self._pending = msgs[-1].metadata.num_pending
        return out

    async def _check_alive(self) -> None:
        """After a fetch found nothing: is the connection, and our consumer, still there?"""
        if self._nc is None or not self._nc.is_connected:
            raise BrokerUnavailable(f"{self.where}: the connection was lost")
        assert self._sub is not None  # fetch checked it before it fetched
        try:
            info = await self._sub.consumer_info()
        except nats.js.errors.NotFoundError:
            raise BrokerUnavailable(f"{self.where}: the server dropped our consumer") from None
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"{self.where}: not answering ({_text(exc)})") from None
        self._pending = info.num_pending  # type: ignore[assignment]  # always sent, as above

    def at_end(self) -> bool:
        return self._sub is not None and self._pending == 0

    async def dead_letter(self, message: Message, headers: dict[str, str]) -> None:
        if not self.dead_letter_subject:
            return
        assert self._nc is not None and self._js is not None
        # Keep the producer's headers, but not NATS's own (Nats-Msg-Id would deduplicate).
        merged = {k: v for k, v in message.headers.items() if not k.lower().startswith("nats-")}
        merged.update(headers)
        try:
            if self._dead_letter_stored:
                await self._js.publish(self.dead_letter_subject, message.payload, headers=merged)
            else:
                await self._nc.publish(self.dead_letter_subject, message.payload, headers=merged)
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(
                f"{self.where}: cannot publish a dead letter to {self.dead_letter_subject!r} "
                f"({_text(exc)})"
            ) from None

    async def flush_dead_letters(self) -> None:
        if self.dead_letter_subject and not self._dead_letter_stored and self._nc is not None:
            try:
                # nats-py annotates int but waits with asyncio.wait_for: seconds, any float
                await self._nc.flush(timeout=self.fetch_timeout_s)  # type: ignore[arg-type]
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                raise BrokerUnavailable(f"{self.where}: flush failed ({_text(exc)})") from None

    async def close(self) -> None:
        nc, sub = self._nc, self._sub
        self._nc = self._js = self._sub = None
        self._pending = 0
        if nc is None:
            return
        if sub is not None and nc.is_connected:
            try:  # tidy: the server would drop the ephemeral consumer after a while anyway
                await asyncio.wait_for(sub.unsubscribe(), 1.0)
                await asyncio.wait_for(
                    nc.jetstream().delete_consumer(self.name, sub._consumer), 1.0
                )
            except (nats.errors.Error, OSError, TimeoutError, AttributeError):
                pass
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            await asyncio.wait_for(nc.close(), 2.0)

    async def _on_error(self, exc: Exception) -> None:
        logger.debug("NATS client: %s", _text(exc))


def subject_matches(pattern: str, subject: str) -> bool:
    """True when the NATS subject filter ``pattern`` (``*``, ``>``) covers ``subject``."""
    p_tokens = pattern.split(".")
    s_tokens = subject.split(".")
    for i, token in enumerate(p_tokens):
        if token == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens) or (token != "*" and token != s_tokens[i]):
            return False
    return len(p_tokens) == len(s_tokens)


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
