"""The one configuration object of a storage node, each setting declared once.

A ``NodeConfig`` field carries its default, its doc and, where they differ from what
its name gives, its flag and ``KVSTORE_*`` variable. ``kvstore serve`` builds its
options from these declarations (``node_settings()``) and ``NodeConfig.from_env()``
reads the same variables with the same parser, so a flag, its variable and its doc
cannot drift apart. The CLI and the environment only fill the object.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "BASE_FORMATS",
    "BASE_READS",
    "DEFAULT_ADDRESS",
    "ENV_PREFIX",
    "ENV_SETTINGS",
    "NodeConfig",
    "NodeSetting",
    "node_settings",
]

DEFAULT_ADDRESS = "127.0.0.1:7070"
MiB = 1 << 20
ENV_PREFIX = "KVSTORE_"

#: Table formats of a bulk version's base shards (kvstore.storage.shard.base_options).
BASE_FORMATS = ("plain", "block", "zstd")
#: How a node reads its bulk versions' files (NodeConfig.base_reads).
BASE_READS = ("mmap", "pread", "direct")

# The spellings click's BOOL accepts, so a variable means the same to both readers.
_BOOLS = {
    **dict.fromkeys(("1", "true", "t", "yes", "y", "on"), True),
    **dict.fromkeys(("0", "false", "f", "no", "n", "off"), False),
}


@dataclass(frozen=True)
class NodeSetting:
    """How one NodeConfig field is set from outside: flag, variable, type, doc, default."""

    name: str
    type: type
    default: Any
    doc: str
    #: The command-line flag, e.g. ``--data``.
    flag: str
    #: The environment variable, e.g. ``KVSTORE_DATA``; its value is in the field's unit.
    env: str
    #: The flag's value times this is the field's value (MiB for ``--block-cache-mb``).
    flag_unit: int = 1
    #: The flag's unit as help names it, e.g. "MiB".
    flag_unit_name: str = ""
    #: The values the flag accepts (the variable's are checked by ``NodeConfig.load``).
    choices: tuple[str, ...] = ()
    #: The default as help shows it, when it is computed or derived.
    shown_default: str | None = None

    def parse(self, text: str) -> Any:
        """The value of the variable's text, in the field's type and unit."""
        if self.type is bool:
            try:
                return _BOOLS[text.strip().lower()]
            except KeyError:
                raise ValueError(f"{text!r} is not true or false") from None
        try:
            return self.type(text)
        except ValueError:
            what = {int: "an integer", float: "a number"}.get(self.type, self.type.__name__)
            raise ValueError(f"{text!r} is not {what}") from None


def _setting(
    default: Any,
    doc: str,
    *,
    flag: str | None = None,
    env: str | None = None,
    flag_unit: int = 1,
    flag_unit_name: str = "",
    choices: tuple[str, ...] = (),
    shown_default: str | None = None,
) -> Any:
    """A field's default plus its declaration; ``flag``/``env`` only where the name's differ."""
    return field(
        default=default,
        metadata={
            "setting": dict(
                doc=doc,
                flag=flag,
                env=env,
                flag_unit=flag_unit,
                flag_unit_name=flag_unit_name,
                choices=choices,
                shown_default=shown_default,
            )
        },
    )


@dataclass
class NodeConfig:
    """Settings of one storage node; the defaults work on a laptop.

    Sizes are in bytes, times in seconds.
    """

    host: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(
        7070, "gRPC port; 0 picks a free one (tests; the bound port goes to --port-file)"
    )
    fast_port: int = _setting(
        0,
        "port of the fast read path (Get over plain TCP, docs/fast-path.md); 0 = any free "
        "one (clients find it in the cluster map), -1 = off",
    )
    data_dir: Path = _setting(  # noqa: RUF009 - it returns a dataclasses.field
        Path("var/kvstore"),
        "data directory: the catalog and the delta shards (hot path)",
        flag="--data",
        env="KVSTORE_DATA",
    )
    cold_dir: Path | None = _setting(  # noqa: RUF009 - it returns a dataclasses.field
        None,
        "where bulk versions (the base) live, written once then only read: put it on "
        "cheap QLC flash",
        shown_default="<data>/cold",
    )
    block_cache_bytes: int = _setting(
        256 * MiB,
        "one RocksDB LRU block cache shared by every shard of every table",
        flag="--block-cache-mb",
        flag_unit=MiB,
        flag_unit_name="MiB",
    )
    bloom_bits_per_key: float = _setting(10.0, "bloom filter bits per key of every shard")
    # Off by default: it paid off for zipfian keys (100-key p50 8-18% lower with 64 MiB on
    # 1M rows) but every miss pays an insert and an eviction, which made uniform keys
    # 24-29% slower (docs/operations.md).
    row_cache_bytes: int = _setting(
        0,
        "RocksDB row cache in front of the bulk versions, 0 = off; worth it when a few "
        "keys get most lookups",
        flag="--row-cache-mb",
        flag_unit=MiB,
        flag_unit_name="MiB",
    )
    base_format: str = _setting(
        "plain",
        "table format of new bulk versions: plain = RocksDB PlainTable, hashed keys, "
        "uncompressed, the fastest lookups; block = LZ4-compressed blocks with checksums, "
        "smaller on disk when rows compress, slower lookups; zstd = blocks compressed with "
        "zstd and a dictionary trained per file, the smallest when rows compress, the slowest "
        "lookups. Kept versions keep theirs",
        choices=BASE_FORMATS,
    )
    # mmap by default: reading rows in place is the fastest when the files fit in RAM
    # (PlainTable, 100-key MultiGets of rows in the page cache ~2.2 us a key against ~5 with
    # pread). A node whose RAM cannot hold its files (loadtests/memcap.py) does better
    # with pread: the index and filter in its own memory, no page faults, and a miss
    # reads only its pages (docs/operations.md, "A base larger than the node's RAM").
    base_reads: str = _setting(
        "mmap",
        "how bulk versions are read: mmap = through a memory map (rows read in place, "
        "the fastest when the files fit in RAM); pread = by system calls through the "
        "page cache, without readahead, the index and filter held in the node's memory "
        "(for a base larger than RAM); direct = O_DIRECT reads that bypass the page cache",
        choices=BASE_READS,
    )
    verify_base_checksums: bool = _setting(
        False,
        "verify RocksDB's block checksum on every read of a block-format bulk version "
        "(~18% more CPU a lookup; the files are checked with crc32 when uploaded, and "
        "plain-format files have no block checksums)",
    )
    read_threads: int = _setting(
        max(0, min(3, len(os.sched_getaffinity(0)) - 1)),
        "threads besides the event loop's that read part of a large Get's shards (the "
        "MultiGets release the GIL); 0 = none",
        shown_default="CPUs - 1, at most 3",
    )
    parallel_read_keys: int = _setting(
        256, "a Get of at least this many keys is read on several threads"
    )
    # Off by default, as the row cache: measured A/B (docs/benchmarks.md), 64 MiB served
    # repeated keys in 0.41-0.49x the time, but with keys spread over a table ten times
    # its size (the benchmark's) cost 1-key p50 1.06-1.11x and c32 throughput 0.86-0.90x.
    hot_rows_bytes: int = _setting(
        0,
        "the node's hot-row cache: recent answers of small gets by table version and "
        "key, served without RocksDB or a Python object per row; worth it when keys "
        "repeat (64 MiB holds ~100k rows of 400 B); 0 = off (docs/serving.md)",
        flag="--hot-rows-mb",
        flag_unit=MiB,
        flag_unit_name="MiB",
    )
    delta_memory_bytes: int = _setting(
        64 * MiB,
        "a table's delta rows also kept in memory while they total at most this (split "
        "over its shards; a shard past its share reads from RocksDB alone): reads of "
        "online-written rows skip the delta's RocksDB lookups; 0 = off",
        flag="--delta-memory-mb",
        flag_unit=MiB,
        flag_unit_name="MiB",
    )
    max_keys_per_request: int = _setting(
        100_000, "a Get, Write or Delete naming more keys is refused (RequestTooLarge)"
    )
    max_request_bytes: int = _setting(
        64 * MiB,
        "gRPC's limit on one incoming message; larger ones are refused before parsing",
        flag="--max-request-mb",
        flag_unit=MiB,
        flag_unit_name="MiB",
    )
    keep_versions: int = _setting(
        2, "bulk versions kept besides the current one, for rollback and pinned reads"
    )
    load_lease_s: float = _setting(
        60.0, "a bulk load with no upload for this long (seconds) is aborted, its files removed"
    )
    max_clock_skew_s: float = _setting(
        300.0, "writes whose event time is further ahead of the node's clock are refused (s)"
    )
    sync_writes: bool = _setting(
        False,
        "fsync the WAL before acknowledging a write (survives power loss; without it a "
        "write survives a crash or kill -9)",
    )
    shutdown_grace_s: float = _setting(
        5.0, "seconds in-flight calls get to finish on SIGTERM/SIGINT before they are cancelled"
    )
    advertise_address: str | None = _setting(
        None, "the address clients dial for this node", shown_default="HOST:PORT as bound"
    )
    node_id: str = _setting(
        "", "this node's name in the cluster", shown_default="HOSTNAME:DATA_DIR"
    )
    etcd: str = _setting(
        "",
        "the etcd URL (http://HOST:PORT) of the cluster to join, or its members' URLs "
        "separated by commas (the first that answers is used, the next on a failure); "
        "empty = run alone, holding every shard (docs/cluster.md)",
        shown_default="none: one node alone",
    )
    cluster: str = _setting(
        "default", "the cluster's name: its keys in etcd live under /kvstore/<cluster>/"
    )
    zone: str = _setting(
        "", "this node's failure domain (rack, zone): replicas of a shard go to distinct zones"
    )
    replica_grace_s: float = _setting(
        30.0,
        "a node whose lease has been gone this long (s) has its replicas copied to other "
        'nodes; back sooner, it catches up instead (docs/cluster.md, "Replicas")',
    )
    demo: bool = _setting(False, "create and fill the demo_users table on first start")
    port_file: Path | None = _setting(  # noqa: RUF009 - it returns a dataclasses.field
        None, "write the bound port to this file once serving (finds port 0 from a parent)"
    )

    @classmethod
    def from_env(cls, **overrides: object) -> NodeConfig:
        """Defaults, then ``KVSTORE_*`` environment variables, then ``overrides`` (not None).

        An empty variable counts as unset, as it does for ``kvstore serve``.
        """
        cfg = cls()
        for setting in node_settings():
            text = os.environ.get(setting.env)
            if text:
                try:
                    setattr(cfg, setting.name, setting.parse(text))
                except ValueError as exc:
                    raise ValueError(f"{setting.env}: {exc}") from None
        for attr, value in overrides.items():
            if value is not None:
                setattr(cfg, attr, value)
        return cfg

    def load(self) -> None:
        """Derive what follows from the settings: absolute paths, the node id."""
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.cold_dir = Path(self.cold_dir or self.data_dir / "cold").expanduser().resolve()
        if not self.node_id and not self.etcd:  # in a cluster: the data dir's stable id
            self.node_id = f"{socket.gethostname()}:{self.data_dir}"
        if self.max_keys_per_request < 1:
            raise ValueError("max_keys_per_request must be at least 1")
        if self.keep_versions < 0:
            raise ValueError("keep_versions must be at least 0")
        if self.base_format not in BASE_FORMATS:
            raise ValueError(
                f"base_format {self.base_format!r} is not one of {', '.join(BASE_FORMATS)}"
            )
        if self.base_reads not in BASE_READS:
            raise ValueError(
                f"base_reads {self.base_reads!r} is not one of {', '.join(BASE_READS)}"
            )
        if self.verify_base_checksums and self.base_format == "plain":
            raise ValueError(
                "verify_base_checksums checks the block checksums of block-format versions; "
                f"new versions would be in the {self.base_format!r} format, which has none: "
                "add --base-format block (KVSTORE_BASE_FORMAT=block)"
            )
        if self.row_cache_bytes < 0:
            raise ValueError("row_cache_bytes must be at least 0")
        if self.hot_rows_bytes < 0:
            raise ValueError("hot_rows_bytes must be at least 0")
        if self.delta_memory_bytes < 0:
            raise ValueError("delta_memory_bytes must be at least 0")
        if self.read_threads < 0:
            raise ValueError("read_threads must be at least 0")
        if self.parallel_read_keys < 1:
            raise ValueError("parallel_read_keys must be at least 1")
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be at least 1024")


@cache
def node_settings() -> tuple[NodeSetting, ...]:
    """Every NodeConfig field's declaration, in field order, flag and variable derived."""
    hints = typing.get_type_hints(NodeConfig)
    out = []
    for f in dataclasses.fields(NodeConfig):
        declared = dict(f.metadata["setting"])
        out.append(
            NodeSetting(
                name=f.name,
                type=_base_type(hints[f.name]),
                default=f.default,
                flag=declared.pop("flag") or "--" + f.name.replace("_", "-"),
                env=declared.pop("env") or ENV_PREFIX + f.name.upper(),
                **declared,
            )
        )
    return tuple(out)


def _base_type(hint: Any) -> type:
    """``Path | None`` → ``Path``: None only ever means "derive it"."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


#: The node's settings in the environment: variable → (NodeConfig field, type).
ENV_SETTINGS: dict[str, tuple[str, type]] = {s.env: (s.name, s.type) for s in node_settings()}
