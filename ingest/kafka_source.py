"""Kafka as a stream consumer's source (confluent-kafka / librdkafka).

The consumer ``assign``s the topic's partitions itself (all, or ``--partitions``),
each at the offset after the one stored in the table — no group rebalancing and no
committed offsets: the table remembers where the consumer is. Scale out by running
one process per set of partitions. A message's offset is its Kafka offset.

librdkafka reconnects to brokers by itself (with exponential backoff); while they
are down a fetch just returns nothing, and the consumer logs the client's errors.
"""

from __future__ import annotations

import asyncio
import logging
import time

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from kvstore.ingest.consumer import BrokerUnavailable, ConsumeError
from kvstore.ingest.messages import Message

__all__ = ["KafkaSource"]

logger = logging.getLogger(__name__)
#: librdkafka's own log lines (connection failures...); shown with --log-level debug.
client_logger = logging.getLogger(__name__ + ".librdkafka")

#: Seconds between two warnings about the same client error.
ERROR_LOG_INTERVAL_S = 10.0


class KafkaSource:
    """Messages of a Kafka topic; dead letters produced to another topic."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        group: str,
        partitions: list[int] | None = None,
        dead_letter: str | None = None,
        options: dict[str, str] | None = None,
        idle_timeout_s: float = 1.0,
        request_timeout_s: float = 10.0,
        debug: bool = False,
    ) -> None:
        if dead_letter == topic:
            raise ConsumeError(f"the dead-letter topic cannot be the consumed topic {topic!r}")
        self.bootstrap = bootstrap
        self.name = topic
        self.group = group
        self.wanted = partitions
        self.dead_letter_topic = dead_letter
        self.options = dict(options or {})
        self.idle_timeout_s = idle_timeout_s
        self.request_timeout_s = request_timeout_s
        self.partitions: list[int] = []
        self._consumer: Consumer | None = None
        self._polling: asyncio.Future | None = None
        self._producer: Producer | None = None
        self._at_end: dict[int, bool] = {}
        self._delivery_errors: list[str] = []
        self._last_logged: dict[str, float] = {}
        client_logger.setLevel(logging.DEBUG if debug else logging.CRITICAL)

    @property
    def where(self) -> str:
        return f"Kafka {self.bootstrap}"

    def _config(self) -> dict:
        return {
            "bootstrap.servers": self.bootstrap,
            "error_cb": self._on_error,
            "logger": client_logger,
            **self.options,
        }

    async def connect(self) -> None:
        if self._consumer is not None:
            return
        consumer = Consumer(
            {
                **self._config(),
                "group.id": self.group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
            }
        )
        try:
            meta = await asyncio.to_thread(
                consumer.list_topics, self.name, timeout=self.request_timeout_s
            )
        except KafkaException as exc:
            consumer.close()
            raise BrokerUnavailable(f"{self.where}: cannot read metadata ({exc})") from None
        topic = meta.topics.get(self.name)
        error = topic.error if topic is not None else None
        unknown = error is not None and error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
        if topic is None or unknown:
            consumer.close()
            raise ConsumeError(f"{self.where}: no topic {self.name!r}; create it first")
        if error is not None:
            consumer.close()
            raise BrokerUnavailable(f"{self.where}: topic {self.name!r}: {error.str()}")
        available = sorted(topic.partitions)
        if self.wanted is not None:
            missing = [p for p in self.wanted if p not in topic.partitions]
            if missing:
                consumer.close()
                raise ConsumeError(
                    f"{self.where}: topic {self.name!r} has no partition {missing[0]}; its "
                    f"partitions are 0 to {len(available) - 1}"
                )
            available = list(self.wanted)
        self.partitions = available
        self._consumer = consumer
        if self.dead_letter_topic and self._producer is None:
            self._producer = Producer(
                {**self._config(), "enable.idempotence": True, "linger.ms": 5}
            )

    async def start(self, positions: dict[int, int]) -> None:
        assert self._consumer is not None
        assignment = []
        self._at_end = {}
        for p in self.partitions:
            try:
                low, high = await asyncio.to_thread(
                    self._consumer.get_watermark_offsets,
                    TopicPartition(self.name, p),
                    timeout=self.request_timeout_s,
                )
            except KafkaException as exc:
                raise BrokerUnavailable(
                    f"{self.where}: cannot read the offsets of {self.name}[{p}] ({exc})"
                ) from None
            last = positions.get(p)
            if last is None:
                offset = OFFSET_BEGINNING
                self._at_end[p] = high <= low
            else:
                offset = last + 1
                if offset < low:
                    logger.warning(
                        "%s[%d] starts at offset %d: %d messages after the stored position %d "
                        "were removed (retention) before they were consumed",
                        self.name,
                        p,
                        low,
                        low - offset,
                        last,
                    )
                self._at_end[p] = offset >= high
            assignment.append(TopicPartition(self.name, p, offset))
        self._consumer.assign(assignment)

    async def fetch(self, max_messages: int) -> list[Message]:
        if self._consumer is None:
            raise BrokerUnavailable(f"{self.where}: not connected")
        loop = asyncio.get_running_loop()
        self._polling = loop.run_in_executor(None, self._poll, self._consumer, max_messages)
        # Shielded: a cancelled fetch leaves the poll to finish, and close() waits for
        # it (librdkafka must not close a consumer another thread is polling).
        return await asyncio.shield(self._polling)

    def _poll(self, consumer: Consumer, max_messages: int) -> list[Message]:
        # poll waits for the first message; consume(timeout=0) then takes what is there,
        # so a batch never waits to fill up.
        first = consumer.poll(self.idle_timeout_s)
        if first is None:
            return []
        raw = [first]
        if max_messages > 1:
            raw += consumer.consume(max_messages - 1, timeout=0)
        out = []
        # confluent-kafka's stub types Message for every use (Optional getters, headers
        # as a producer takes them): a consumed message without error has a partition,
        # offset and topic, and its headers are a list of (str, bytes | None).
        for m in raw:
            error = m.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self._at_end[m.partition()] = True  # type: ignore[index]
                    continue
                if error.fatal():
                    raise BrokerUnavailable(f"{self.where}: {error.str()}")
                self._warn(f"{self.where}: {error.str()}")
                continue
            self._at_end[m.partition()] = False  # type: ignore[index]
            kind, ms = m.timestamp()
            when = time.time_ns() // 1000 if kind == TIMESTAMP_NOT_AVAILABLE else ms * 1000
            pairs: list[tuple[str, bytes | None]] = m.headers() or []  # type: ignore[assignment]
            headers = {k: (v or b"").decode("utf-8", "replace") for k, v in pairs}
            value = m.value() or b""
            out.append(
                Message(value, m.partition(), m.offset(), when, m.topic(), m.key(), headers)  # type: ignore[arg-type]
            )
        return out

    def at_end(self) -> bool:
        return bool(self._at_end) and all(self._at_end.values())

    async def dead_letter(self, message: Message, headers: dict[str, str]) -> None:
        topic = self.dead_letter_topic
        if self._producer is None or topic is None:  # the producer exists for the topic
            return
        merged = {**message.headers, **headers}
        try:
            self._producer.produce(
                topic,
                value=message.payload,
                key=message.key,
                headers=list(merged.items()),
                on_delivery=self._on_delivery,
            )
        except (KafkaException, BufferError) as exc:
            raise BrokerUnavailable(f"{self.where}: cannot produce a dead letter ({exc})") from None

    async def flush_dead_letters(self) -> None:
        if self._producer is None:
            return
        left = await asyncio.to_thread(self._producer.flush, self.request_timeout_s)
        errors, self._delivery_errors = self._delivery_errors, []
        if left or errors:
            raise BrokerUnavailable(
                f"{self.where}: dead letters to {self.dead_letter_topic!r} were not stored "
                f"({left} pending{', ' + errors[0] if errors else ''})"
            )

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        if self._polling is not None:
            await asyncio.wait([self._polling])
            if not self._polling.cancelled():
                self._polling.exception()  # retrieved: a failed poll is no news here
            self._polling = None
        await asyncio.to_thread(consumer.close)

    def _on_delivery(self, error: KafkaError | None, _message: object) -> None:
        if error is not None:
            self._delivery_errors.append(error.str())

    def _on_error(self, error: KafkaError) -> None:
        self._warn(f"{self.where}: {error.str()}")

    def _warn(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last_logged.get(text, -1e9) >= ERROR_LOG_INTERVAL_S:
            self._last_logged[text] = now
            logger.warning("%s (the client retries by itself)", text)
