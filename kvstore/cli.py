"""The ``kvstore`` command: a thin layer over NodeConfig (serve) and Client (the rest)."""

from __future__ import annotations

import argparse
import base64
import csv
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from kvstore.client.core import resolve_address
from kvstore.config import BASE_FORMATS, DEFAULT_ADDRESS, NodeConfig
from kvstore.errors import KvstoreError

__all__ = ["main"]

ADDRESS_HELP = f"node to talk to, HOST:PORT (default: $KVSTORE_ADDRESS or {DEFAULT_ADDRESS})"


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstore",
        formatter_class=_formatter,
        description="kvstore: a low-latency key-value store for machine-learning features.",
        epilog=(
            "examples:\n"
            "  kvstore serve --data ./var/kvstore --demo      start a node on 127.0.0.1:7070\n"
            "  kvstore tables                                  list the tables\n"
            "  kvstore get demo_users 42 43 --features age,ctr_7d\n"
            "\n'kvstore COMMAND --help' explains each command."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=f"example:\n  {example}",
            formatter_class=_formatter,
        )
        p.set_defaults(handler=globals()[f"_cmd_{name.replace('-', '_')}"])
        return p

    def with_address(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--address", "-a", default=None, help=ADDRESS_HELP)
        p.add_argument(
            "--timeout", type=float, default=None, help="deadline per call, seconds (default 5)"
        )
        return p

    p = command(
        "serve",
        "Run a storage node in the foreground until Ctrl-C or SIGTERM.",
        "kvstore serve --host 127.0.0.1 --port 7071 --data /tmp/kv2",
    )
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=None, help="port to listen on, 0 = any free one (default 7070)"
    )
    p.add_argument(
        "--fast-port",
        type=int,
        default=None,
        help="port of the fast read path (Get over plain TCP); 0 = any free one (the "
        "default; clients find it in the cluster map), -1 = off",
    )
    p.add_argument("--data", type=Path, default=None, help="data directory (default ./var/kvstore)")
    p.add_argument(
        "--cold-dir",
        type=Path,
        default=None,
        help="where bulk versions live, written once then only read: put it on cheap "
        "QLC flash (default <data>/cold)",
    )
    p.add_argument(
        "--keep-versions",
        type=int,
        default=None,
        help="bulk versions kept besides the current one, for rollback (default 2)",
    )
    p.add_argument(
        "--sync-writes",
        action="store_true",
        help="fsync the WAL before acknowledging a write (survives power loss; default: "
        "survives a crash or kill -9)",
    )
    p.add_argument(
        "--max-clock-skew-s",
        type=float,
        default=None,
        help="refuse writes whose event time is further ahead of the node's clock (default 300)",
    )
    p.add_argument("--demo", action="store_true", help="create the demo_users table on first start")
    p.add_argument(
        "--block-cache-mb",
        type=int,
        default=None,
        help="shared RocksDB block cache, MiB (default 256)",
    )
    p.add_argument(
        "--row-cache-mb",
        type=int,
        default=None,
        help="RocksDB row cache for hot rows of the bulk versions, MiB (default 0 = off; "
        "worth it when a few keys get most lookups)",
    )
    p.add_argument(
        "--base-format",
        choices=BASE_FORMATS,
        default=None,
        help="table format of new bulk versions: plain = RocksDB PlainTable, hashed keys, "
        "uncompressed, the fastest lookups (the default); block = LZ4-compressed blocks "
        "with checksums, smaller on disk when rows compress, slower lookups. Kept versions "
        "keep the format they were loaded with",
    )
    p.add_argument(
        "--verify-base-checksums",
        action="store_true",
        help="verify RocksDB's block checksum on every read of a block-format bulk version "
        "(~18%% more CPU a lookup; default: the files are checked with crc32 when they are "
        "uploaded; plain-format files have no block checksums)",
    )
    p.add_argument(
        "--read-threads",
        type=int,
        default=None,
        help="threads that read part of a large Get's shards beside the event loop "
        "(default: CPUs - 1, at most 3; 0 = none)",
    )
    p.add_argument(
        "--parallel-read-keys",
        type=int,
        default=None,
        help="a Get of at least this many keys is read on several threads (default 256)",
    )
    p.add_argument(
        "--max-keys-per-request",
        type=int,
        default=None,
        help="refuse larger batches (default 100000)",
    )
    p.add_argument(
        "--max-request-mb", type=int, default=None, help="refuse larger messages, MiB (default 64)"
    )
    p.add_argument(
        "--port-file",
        type=Path,
        default=None,
        help="write the bound port to this file once serving",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    p = with_address(command("tables", "List the tables on a node.", "kvstore tables"))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = with_address(
        command(
            "describe",
            "Show a table's schema, version and size as JSON.",
            "kvstore describe demo_users",
        )
    )
    p.add_argument("table")

    p = with_address(
        command(
            "create-table",
            "Create a table. Creating the same definition again is a no-op.",
            "kvstore create-table user_features --key int64 --shards 8 "
            "--feature ctr_7d:float32 --feature emb:float32[64] --feature country:string",
        )
    )
    p.add_argument("table")
    p.add_argument(
        "--key", default="int64", choices=["int64", "string"], help="key type (default int64)"
    )
    p.add_argument("--shards", type=int, default=8, help="number of shards (default 8)")
    p.add_argument(
        "--feature",
        "-f",
        action="append",
        default=[],
        metavar="NAME:DTYPE",
        help="a feature (repeat the option); dtypes: bool int32 int64 float32 float64 "
        "string bytes float32[N] int64[]",
    )

    p.add_argument(
        "--ttl",
        action="append",
        default=[],
        metavar="NAME=SECONDS",
        help="a time to live for a feature: older values read as null (repeat the option)",
    )

    p = with_address(
        command(
            "get",
            "Look up keys; prints one JSON object per key (found: false for a missing key).",
            "kvstore get demo_users 42 43 --features age,ctr_7d",
        )
    )
    p.add_argument("table")
    p.add_argument("keys", nargs="+", metavar="KEY")
    p.add_argument("--features", default=None, help="comma-separated feature names (default: all)")

    p = with_address(
        command(
            "write",
            "Upsert rows from JSON lines or CSV (a file, or - for stdin). Features left out of "
            "the input keep their stored values. Bytes values are base64 (as 'get' prints "
            "them); in CSV, list and embedding values are JSON arrays.",
            'kvstore write user_features rows.jsonl   # {"key": 1, "ctr_7d": 0.1}',
        )
    )
    p.add_argument("table")
    p.add_argument("file", nargs="?", default="-", help="input file (default: stdin)")
    p.add_argument(
        "--format",
        choices=["jsonl", "csv"],
        default=None,
        help="default: by file extension, else jsonl",
    )
    p.add_argument("--key-column", default="key", help="the column holding the key (default: key)")
    p.add_argument("--batch-size", type=int, default=5000, help="rows per request (default 5000)")

    p = with_address(
        command("delete", "Delete keys (missing keys are fine).", "kvstore delete demo_users 42 43")
    )
    p.add_argument("table")
    p.add_argument("keys", nargs="+", metavar="KEY")

    p = with_address(
        command("drop", "Delete a table and all its data.", "kvstore drop user_features")
    )
    p.add_argument("table")

    p = with_address(
        command(
            "load",
            "Bulk-load Parquet or Arrow IPC files (one, many, or a hive-partitioned directory; "
            "a local path or any URI pyarrow.fs opens) as a new version of a table, swapped "
            "in atomically; the previous version is kept for rollback. Prints a JSON summary.",
            "kvstore load user_features ./snapshots/2026-11-23/ --key-column user_id "
            "--label 2026-11-23",
        )
    )
    p.add_argument("table")
    p.add_argument("source", nargs="+", help="files or directories to load")
    p.add_argument("--key-column", default="key", help="the column holding the key (default: key)")
    p.add_argument("--label", default="", help="a label for the version, e.g. the snapshot date")
    p.add_argument(
        "--create", action="store_true", help="create the table from the input schema if missing"
    )
    p.add_argument(
        "--shards", type=int, default=8, help="shards of a table made by --create (default 8)"
    )
    p.add_argument(
        "--dedupe",
        choices=["first", "last"],
        default=None,
        help="keep the first or last row of a duplicated key (default: duplicates are an error)",
    )
    p.add_argument(
        "--snapshot-time",
        type=int,
        default=None,
        help="snapshot event time, µs since the epoch (default: newest event time in the "
        "input, else now)",
    )
    p.add_argument(
        "--event-time-column",
        default=None,
        help="per-row event times, µs (default: 'event_time' if present)",
    )
    p.add_argument(
        "--format", choices=["parquet", "ipc"], default=None, help="default: by file extension"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--memory-mb",
        type=int,
        default=1024,
        help="memory budget of the loader, MiB (default 1024)",
    )

    p = with_address(
        command(
            "status",
            "Node health and per-table activity and freshness: rows updated, the age of the "
            "newest applied event, update lag p50/p99 (event time to readable).",
            "kvstore status --json",
        )
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = with_address(
        command(
            "versions", "List the kept bulk versions of a table.", "kvstore versions user_features"
        )
    )
    p.add_argument("table")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = with_address(
        command(
            "rollback",
            "Make a kept version current again (the one before the current by default).",
            "kvstore rollback user_features --to 7",
        )
    )
    p.add_argument("table")
    p.add_argument(
        "--to", type=int, default=0, metavar="VERSION", help="the version to make current"
    )

    from kvstore.ingest.consume import add_consume_parser  # consume nats | kafka

    add_consume_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvstore`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except KvstoreError as exc:
        print(f"kvstore {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"kvstore {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# -- commands ------------------------------------------------------------------------


def _client(args: argparse.Namespace):
    from kvstore.client import DEFAULT_TIMEOUT_S, Client

    return Client(args.address, timeout=args.timeout or DEFAULT_TIMEOUT_S)


def _cmd_serve(args: argparse.Namespace) -> int:
    from kvstore.server.app import serve

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = NodeConfig.from_env(
        host=args.host,
        port=args.port,
        fast_port=args.fast_port,
        data_dir=args.data,
        cold_dir=args.cold_dir,
        keep_versions=args.keep_versions,
        sync_writes=args.sync_writes or None,
        max_clock_skew_s=args.max_clock_skew_s,
        demo=args.demo or None,
        block_cache_bytes=args.block_cache_mb and args.block_cache_mb << 20,
        row_cache_bytes=None if args.row_cache_mb is None else args.row_cache_mb << 20,
        verify_base_checksums=args.verify_base_checksums or None,
        base_format=args.base_format,
        read_threads=args.read_threads,
        parallel_read_keys=args.parallel_read_keys,
        max_keys_per_request=args.max_keys_per_request,
        max_request_bytes=args.max_request_mb and args.max_request_mb << 20,
        port_file=args.port_file,
    )
    serve(config)
    return 0


def _cmd_tables(args: argparse.Namespace) -> int:
    with _client(args) as client:
        tables = client.list_tables()
    if args.json:
        print(json.dumps([_info_json(t) for t in tables], indent=1))
        return 0
    if not tables:
        print("no tables")
        return 0
    rows = [("TABLE", "KEY", "SHARDS", "FEATURES", "VERSION", "ROWS~", "DISK")]
    for t in tables:
        rows.append(
            (
                t.schema.name,
                t.schema.key_type,
                str(t.schema.shards),
                str(len(t.schema.features)),
                str(t.version),
                str(t.rows_estimate),
                _size(t.disk_bytes),
            )
        )
    _print_table(rows)
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(_info_json(client.describe_table(args.table)), indent=1))
    return 0


def _cmd_create_table(args: argparse.Namespace) -> int:
    features: dict[str, str] = {}
    for spec in args.feature:
        for item in spec.split(","):
            name, sep, dtype = item.partition(":")
            if not sep:
                raise ValueError(f"--feature {item!r}: expected NAME:DTYPE, e.g. ctr_7d:float32")
            features[name.strip()] = dtype.strip()
    ttl: dict[str, float] = {}
    for spec in args.ttl:
        name, sep, seconds = spec.partition("=")
        try:
            ttl[name.strip()] = float(seconds)
        except ValueError:
            raise ValueError(f"--ttl {spec!r}: expected NAME=SECONDS, e.g. ctr_7d=86400") from None
        if not sep:
            raise ValueError(f"--ttl {spec!r}: expected NAME=SECONDS, e.g. ctr_7d=86400")
    with _client(args) as client:
        info = client.create_table(
            args.table, key=args.key, features=features, shards=args.shards, ttl=ttl
        )
    print(json.dumps(_info_json(info), indent=1))
    return 0


def _cmd_get(args: argparse.Namespace) -> int:
    features = [f.strip() for f in args.features.split(",")] if args.features else None
    with _client(args) as client:
        info = client.describe_table(args.table)
        keys = _parse_keys(args.keys, info.schema.key_type)
        result = client.get(args.table, keys, features)
    dtypes = {f.name: f.dtype.name for f in info.schema.features}
    for key, row, found in zip(keys, result.to_pylist(), result.found.tolist(), strict=True):
        out: dict[str, Any] = {"key": key, "found": found}
        if row is not None:
            out.update({k: _jsonable(v, dtypes[k]) for k, v in row.items() if k != "key"})
        print(json.dumps(out, ensure_ascii=False))
    return 0


def _cmd_write(args: argparse.Namespace) -> int:
    fmt = args.format or ("csv" if str(args.file).endswith(".csv") else "jsonl")
    total = 0
    with _client(args) as client:
        schema = client.describe_table(args.table).schema
        stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
        try:
            reader = (
                _read_csv(stream, schema, args.key_column)
                if fmt == "csv"
                else _read_jsonl(stream, schema)
            )
            for first_line, rows in _batches(reader, args.batch_size):
                try:
                    total += client.write(args.table, rows, key_column=args.key_column)
                except KvstoreError as exc:
                    raise type(exc)(
                        f"{exc} (input rows are counted from line {first_line} of {args.file}; "
                        f"{total} rows before it were written)"
                    ) from None
        finally:
            if stream is not sys.stdin:
                stream.close()
    print(json.dumps({"table": args.table, "rows_written": total}))
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.describe_table(args.table)
        n = client.delete(args.table, _parse_keys(args.keys, info.schema.key_type))
    print(json.dumps({"table": args.table, "keys_deleted": n}))
    return 0


def _cmd_drop(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.drop_table(args.table)
    print(json.dumps({"table": args.table, "dropped": True}))
    return 0


def _cmd_load(args: argparse.Namespace) -> int:
    from kvstore.ingest.bulk import load

    summary = load(
        args.address or resolve_address(None),
        args.table,
        args.source if len(args.source) > 1 else args.source[0],
        key_column=args.key_column,
        label=args.label,
        create=args.create,
        shards=args.shards,
        dedupe=args.dedupe,
        snapshot_time_us=args.snapshot_time,
        event_time_column=args.event_time_column,
        format=args.format,
        progress=False if args.no_progress else None,
        memory_budget_bytes=args.memory_mb << 20,
        timeout=args.timeout or 600.0,
    )
    print(json.dumps(summary.to_json()))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stats = client.stats()
    stats["address"] = client.address
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0
    print(f"node {client.address}: serving, up {stats['uptime_s']:.0f} s")
    mib = 2**20
    row_cache = (
        f"{stats['row_cache_bytes'] / mib:.1f} of {stats['row_cache_capacity_bytes'] / mib:.0f} MiB"
        if stats["row_cache_capacity_bytes"]
        else "off"
    )
    print(f"block cache {stats['block_cache_bytes'] / mib:.1f} MiB in use; row cache {row_cache}")
    rows = [
        ("TABLE", "VERSION", "UPDATED", "DELETED", "READ", "NEWEST EVENT AGE", "LAG P50", "LAG P99")
    ]
    for name, t in stats["tables"].items():
        age = f"{t['newest_event_age_us'] / 1e6:.3f} s" if t["newest_event_time_us"] else "-"
        rows.append(
            (
                name,
                str(t["version"]),
                str(t["rows_updated"]),
                str(t["keys_deleted"]),
                str(t["keys_read"]),
                age,
                f"{t['lag_p50_us'] / 1e3:.2f} ms" if t["lag_samples"] else "-",
                f"{t['lag_p99_us'] / 1e3:.2f} ms" if t["lag_samples"] else "-",
            )
        )
    _print_table(rows)
    return 0


def _cmd_versions(args: argparse.Namespace) -> int:
    with _client(args) as client:
        versions = client.versions(args.table)
    if args.json:
        print(json.dumps([v.to_json() for v in versions], indent=1))
        return 0
    if not versions:
        print(f"table {args.table!r} has no bulk version yet (only online writes)")
        return 0
    rows = [("", "VERSION", "LABEL", "ROWS", "SIZE", "FORMAT", "SNAPSHOT (UTC)", "CREATED (UTC)")]
    for v in versions:
        rows.append(
            (
                "*" if v.current else "",
                str(v.version),
                v.label or "-",
                str(v.rows),
                _size(v.bytes),
                v.format,
                _utc(v.snapshot_time_us),
                _utc(v.created_at_us),
            )
        )
    _print_table(rows)
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    with _client(args) as client:
        version = client.rollback(args.table, args.to)
    print(json.dumps({"table": args.table, "current": version.to_json()}))
    return 0


# -- helpers of the commands ---------------------------------------------------------


def _info_json(info: Any) -> dict:
    out = info.schema.to_json()
    out.update(version=info.version, rows_estimate=info.rows_estimate, disk_bytes=info.disk_bytes)
    return out


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _utc(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _parse_keys(raw: list[str], key_type: str) -> list:
    if key_type == "string":
        return raw
    keys = []
    for text in raw:
        try:
            keys.append(int(text))
        except ValueError:
            raise ValueError(
                f"key {text!r} is not an integer, and the table's keys are int64"
            ) from None
    return keys


def _jsonable(value: Any, dtype: str) -> Any:
    """A value as JSON shows it: bytes as base64, NaN as null, float32 in its shortest form."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if dtype.startswith("float32"):
        if isinstance(value, list):
            return [_float32(v) for v in value]
        return _float32(value)
    if isinstance(value, float) and value != value:
        return None
    return value


def _float32(value: float | None) -> float | None:
    # 0.1 stored as float32 reads back as 0.10000000149011612; print what was written.
    if value is None or value != value:
        return None
    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


def _read_jsonl(stream: TextIO, schema: Any) -> Iterator[tuple[int, dict]]:
    # bytes features travel as base64 text, as `kvstore get` prints them.
    binary = [f.name for f in schema.features if f.dtype.name == "bytes"]
    for line_no, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"line {line_no}: expected a JSON object, got {type(row).__name__}")
        for name in binary:
            value = row.get(name)
            if isinstance(value, str):
                try:
                    row[name] = base64.b64decode(value, validate=True)
                except ValueError:
                    raise ValueError(
                        f"line {line_no}, column {name!r} (bytes): {value[:40]!r} is not base64"
                    ) from None
        yield line_no, row


def _read_csv(stream: TextIO, schema: Any, key_column: str) -> Iterator[tuple[int, dict]]:
    dtypes = {f.name: f.dtype.name for f in schema.features}
    reader = csv.DictReader(stream)
    reader.fieldnames  # noqa: B018 - reads the header, so line_num counts from it
    while True:
        line_no = reader.line_num + 1  # where the next record starts in the file
        try:
            raw = next(reader)
        except StopIteration:
            return
        row: dict[str, Any] = {}
        for name, text in raw.items():
            if name is None:
                raise ValueError(f"line {line_no}: more fields than header columns")
            dtype = "key" if name == key_column else dtypes.get(name)
            row[name] = _csv_value(text, dtype, schema.key_type, name, line_no)
        yield line_no, row


def _csv_value(text: str | None, dtype: str | None, key_type: str, name: str, line_no: int) -> Any:
    if text is None or text == "":
        return None
    try:
        if dtype is None:  # an unknown column: the client names it
            return text
        if dtype == "key":
            return int(text) if key_type == "int64" else text
        if dtype == "bool":
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError(f"{text!r} is not a bool")
        if dtype in ("int32", "int64"):
            return int(text)
        if dtype in ("float32", "float64"):
            return float(text)
        if dtype == "bytes":
            return base64.b64decode(text, validate=True)
        if dtype == "string":
            return text
        return json.loads(text)  # float32[N], int64[]
    except (ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"line {line_no}, column {name!r} ({dtype or 'key'}): {exc}") from None


def _batches(rows: Iterator[tuple[int, dict]], size: int) -> Iterator[tuple[int, list[dict]]]:
    batch: list[dict] = []
    first = 0
    for line_no, row in rows:
        if not batch:
            first = line_no
        batch.append(row)
        if len(batch) >= size:
            yield first, batch
            batch = []
    if batch:
        yield first, batch


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
