"""``kvstore consume nats|kafka``: the command that runs a stream consumer.

Also ``python -m kvstore.ingest.consume nats|kafka ...``. ``add_consume_parser``
adds the command to an argparse CLI; its handler (``run_consume``) runs a
``kvstore.ingest.consumer.StreamConsumer`` until SIGTERM / SIGINT (the batch in
hand is finished first; a second signal abandons it, and a restart resumes from the
stored position) or, with ``--stop-at-end``, until every message the broker holds
is applied.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys

from kvstore.config import DEFAULT_ADDRESS
from kvstore.errors import KvstoreError
from kvstore.ingest.consumer import ConsumeConfig, ConsumeError, Source, StreamConsumer
from kvstore.ingest.messages import FORMATS
from kvstore.shutdown import Shutdown

__all__ = ["add_consume_parser", "main", "run_consume"]

logger = logging.getLogger(__name__)

# -- the command line ------------------------------------------------------------------

ADDRESS_HELP = f"node to talk to, HOST:PORT (default: $KVSTORE_ADDRESS or {DEFAULT_ADDRESS})"


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def add_consume_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``consume nats|kafka`` to a CLI; the parsed args carry ``handler=run_consume``."""
    consume = subparsers.add_parser(
        "consume",
        help="Apply update messages from NATS JetStream or Kafka to a table, continuously.",
        description=(
            "Read update messages from a broker and apply them to a table in batches. The "
            "consumed position is stored in the same atomic write as the data, so a restart "
            "resumes exactly where the last batch ended. Malformed messages go to --dead-letter "
            "with the reason. Message formats: docs/streaming.md."
        ),
        formatter_class=_formatter,
        epilog=(
            "examples:\n"
            "  kvstore consume nats --table user_features --subject updates.users\n"
            "  kvstore consume kafka --table user_features --topic user-updates "
            "--bootstrap 127.0.0.1:9092"
        ),
    )
    brokers = consume.add_subparsers(dest="broker", metavar="BROKER", required=True)

    nats = brokers.add_parser(
        "nats",
        help="NATS JetStream",
        description="Consume a NATS JetStream stream (subject filter --subject).",
        formatter_class=_formatter,
        epilog=(
            "example:\n  kvstore consume nats --table user_features --subject updates.users "
            "--dead-letter updates.dead"
        ),
    )
    nats.add_argument("--subject", required=True, help="subject (filter) to consume, e.g. upd.>")
    nats.add_argument(
        "--stream", default=None, help="the JetStream stream (default: the one capturing --subject)"
    )
    nats.add_argument(
        "--servers",
        default="nats://127.0.0.1:4222",
        help="comma-separated server URLs (default nats://127.0.0.1:4222)",
    )
    nats.add_argument(
        "--dead-letter",
        default=None,
        metavar="SUBJECT",
        help="publish malformed messages here (default: log and skip them)",
    )
    _common(nats, consumer_help="default: the subject")

    kafka = brokers.add_parser(
        "kafka",
        help="Kafka",
        description="Consume a Kafka topic (all its partitions, or --partitions).",
        formatter_class=_formatter,
        epilog=(
            "example:\n  kvstore consume kafka --table user_features --topic user-updates "
            "--bootstrap 127.0.0.1:9092 --dead-letter user-updates-dead"
        ),
    )
    kafka.add_argument("--topic", required=True)
    kafka.add_argument(
        "--bootstrap", default="127.0.0.1:9092", help="bootstrap servers (default 127.0.0.1:9092)"
    )
    kafka.add_argument(
        "--group", default=None, help="group.id of the Kafka client (default: kvstore.TABLE)"
    )
    kafka.add_argument(
        "--partitions",
        default=None,
        help="comma-separated partitions to consume (default: all of the topic's)",
    )
    kafka.add_argument(
        "--dead-letter",
        default=None,
        metavar="TOPIC",
        help="produce malformed messages here (default: log and skip them)",
    )
    kafka.add_argument(
        "--kafka-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a librdkafka setting for the clients, e.g. security.protocol=SSL (repeatable)",
    )
    _common(kafka, consumer_help="default: the group")
    consume.set_defaults(handler=run_consume)
    return consume


def _common(p: argparse.ArgumentParser, consumer_help: str) -> None:
    p.add_argument("--table", "-t", required=True, help="the table to update")
    p.add_argument("--address", "-a", default=None, help=ADDRESS_HELP)
    p.add_argument(
        "--timeout", type=float, default=10.0, help="deadline per call to the node, s (default 10)"
    )
    p.add_argument(
        "--format", choices=FORMATS, default="json", help="message format (default json)"
    )
    p.add_argument(
        "--batch", type=int, default=1000, help="messages per batch and write (default 1000)"
    )
    p.add_argument(
        "--consumer",
        default=None,
        help=f"name of the stored position ({consumer_help})",
    )
    p.add_argument(
        "--key-column", default="key", help="key column of Arrow messages (default: key)"
    )
    p.add_argument(
        "--stop-at-end",
        action="store_true",
        help="exit once every message the broker holds is applied (a backfill)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(handler=run_consume)


def run_consume(args: argparse.Namespace) -> int:
    """The handler of ``kvstore consume``: returns the exit status.

    Raises KvstoreError (ConsumeError) for what stops it at start: an unknown table,
    stream or topic, or a bad option.
    """
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.broker == "nats":
        NatsSource = _source_class("nats_source", "NatsSource", "nats-py")

        source: Source = NatsSource(
            [s.strip() for s in args.servers.split(",") if s.strip()],
            args.subject,
            stream=args.stream,
            dead_letter=args.dead_letter,
        )
        consumer = args.consumer or args.subject
    else:
        KafkaSource = _source_class("kafka_source", "KafkaSource", "confluent-kafka")

        group = args.group or f"kvstore.{args.table}"
        source = KafkaSource(
            args.bootstrap,
            args.topic,
            group=group,
            partitions=_partitions(args.partitions),
            dead_letter=args.dead_letter,
            options=_options(args.kafka_option),
            debug=args.log_level == "debug",
        )
        consumer = args.consumer or group
    config = ConsumeConfig(
        table=args.table,
        consumer=consumer,
        address=args.address,
        format=args.format,
        key_column=args.key_column,
        batch=args.batch,
        stop_at_end=args.stop_at_end,
        timeout_s=args.timeout,
    )
    return asyncio.run(_run_with_signals(StreamConsumer(config, source)))


async def _run_with_signals(consumer: StreamConsumer) -> int:
    """Run until SIGTERM/SIGINT (the batch in hand is finished); a second one abandons the
    batch. Returns the exit status: 0, or 128 + the second signal's number."""
    stopping = Shutdown(
        graceful="stopping after the current batch",
        hurry="stopping now; a restart resumes from the stored position",
    )
    with stopping.capture():
        running = asyncio.ensure_future(consumer.run())
        requested = asyncio.ensure_future(stopping.requested.wait())
        try:
            await asyncio.wait({running, requested}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            requested.cancel()
        if not running.done():
            consumer.stop()
            if not await stopping.finished_unhurried(running):
                # The write in flight is abandoned. The position rides in the batch's
                # last write, so a restart applies again what came after the stored
                # position: harmless, the newest event time wins per feature.
                running.cancel()
                await asyncio.wait({running})  # run() still closes the source
                if not running.cancelled():
                    running.result()  # an error it raised while stopping
                return 128 + stopping.received[1]
        await running
    return 0


def _source_class(module: str, name: str, package: str) -> type:
    """A broker's Source class; its client library is an optional dependency."""
    try:
        return getattr(importlib.import_module(f"kvstore.ingest.{module}"), name)
    except ModuleNotFoundError as exc:
        raise ConsumeError(
            f"{exc}: kvstore consume needs {package}; pip install 'kvstore[stream]'"
        ) from None


def _partitions(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise ConsumeError(f"--partitions {text!r}: expected comma-separated integers") from None


def _options(items: list[str]) -> dict[str, str]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConsumeError(f"--kafka-option {item!r}: expected KEY=VALUE")
        options[key.strip()] = value.strip()
    return options


def main(argv: list[str] | None = None) -> int:
    """``python -m kvstore.ingest.consume nats|kafka ...``: ``kvstore consume`` on its own."""
    parser = argparse.ArgumentParser(
        prog="kvstore-consume", description="Apply update messages from a broker to a table."
    )
    add_consume_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["consume", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.handler(args)
    except KvstoreError as exc:
        print(f"kvstore consume: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
