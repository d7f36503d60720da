"""How the ``kvstore`` commands print: text tables, sizes, UTC times, JSON values, examples."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click
import numpy as np

__all__ = ["examples", "info_json", "jsonable", "print_table", "size", "utc"]


def examples(*lines: str) -> str:
    """A help epilog listing example command lines, kept unwrapped (click's ``\\b``)."""
    title = "example:" if len(lines) == 1 else "examples:"
    return "\b\n" + title + "\n" + "\n".join(f"  {line}" for line in lines)


def info_json(info: Any) -> dict:
    """A TableInfo as JSON: the schema plus version, rows_estimate and disk_bytes."""
    out = info.schema.to_json()
    out.update(version=info.version, rows_estimate=info.rows_estimate, disk_bytes=info.disk_bytes)
    return out


def print_table(rows: Sequence[tuple[str, ...]]) -> None:
    """Print rows (the first one the header) in columns padded to their widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def utc(us: int) -> str:
    """µs since the epoch as ``YYYY-MM-DD HH:MM:SS`` (UTC)."""
    return datetime.fromtimestamp(us / 1e6, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def size(n: int) -> str:
    """A size in bytes as people read it: ``512 B``, ``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def jsonable(value: Any, dtype: str) -> Any:
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
