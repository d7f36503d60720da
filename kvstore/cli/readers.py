"""Typed readers of what a user types or pipes in: keys, JSON lines and CSV rows.

Each reader turns text into the Python values ``Client.write`` / ``Client.get`` take,
checked against the table's schema, and names the line and column of the first value
it cannot read (``ValueError``), so a bad file never reaches the node half-parsed.
"""

from __future__ import annotations

import base64
import csv
import json
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from kvstore.schema import TableSchema

__all__ = ["batches", "parse_keys", "read_csv", "read_jsonl"]


def parse_keys(raw: Iterable[str], key_type: str) -> list:
    """Keys typed on the command line, as the table's key type (int64 or string)."""
    if key_type == "string":
        return list(raw)
    keys = []
    for text in raw:
        try:
            keys.append(int(text))
        except ValueError:
            raise ValueError(
                f"key {text!r} is not an integer, and the table's keys are int64"
            ) from None
    return keys


def read_jsonl(stream: TextIO, schema: TableSchema) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each JSON object of ``stream``; blank lines are skipped.

    Bytes features travel as base64 text, as ``kvstore get`` prints them.
    """
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


def read_csv(stream: TextIO, schema: TableSchema, key_column: str) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each CSV record, each cell typed by its feature's dtype.

    An empty cell is null; bool is true/false/1/0/yes/no; bytes are base64; lists and
    embeddings are JSON arrays. The line number is the file's line where the record
    starts (a quoted cell may span lines).
    """
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


def batches(rows: Iterable[tuple[int, dict]], size: int) -> Iterator[tuple[int, list[dict]]]:
    """Rows in lists of at most ``size``, each with the line number of its first row."""
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
