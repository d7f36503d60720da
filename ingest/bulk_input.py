"""The input of a bulk load: files, a list of files or a (hive-)partitioned directory.

Opened with ``pyarrow.dataset`` (so any filesystem ``pyarrow.fs`` knows: local paths,
``s3://``, ``gs://``, ``hdfs://`` …) and read one file at a time in record batches of
a bounded size, so that every error can name its file and a row number counted
across the whole input, and memory stays bounded whatever the input's size.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kvstore.errors import InvalidArgument

__all__ = ["BulkInput", "InputFile", "LoadError"]

_FORMATS = {"parquet": "parquet", "ipc": "ipc", "arrow": "ipc", "feather": "ipc"}
_EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".parq": "parquet",
    ".arrow": "ipc",
    ".ipc": "ipc",
    ".feather": "ipc",
}
# Arrow errors that mean "this file is not what it claims to be".
_READ_ERRORS = (OSError, pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)


class LoadError(InvalidArgument):
    """The input of a bulk load is wrong; the message names file, column, row or key."""


@dataclass(slots=True)
class InputFile:
    """One file of the input. ``first_row``: the input row number of its first row."""

    path: str
    fragment: ds.FileFragment
    schema: pa.Schema  # its own columns, plus the hive partition fields
    rows: int
    size: int  # bytes
    first_row: int = 0


class BulkInput:
    """The files of a load's input, with their schemas, row counts and sizes.

    Opening reads only metadata (footers); ``batches`` reads the data.
    """

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike], fmt: str | None):
        self.description = _describe(source)
        paths = [os.fspath(source)] if isinstance(source, (str, os.PathLike)) else source
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise LoadError("the input is empty: no file was given")
        filesystem, resolved = _filesystem(paths)
        self.format = _format(fmt, filesystem, resolved, self.description)
        self.filesystem = filesystem
        self.partition_fields: list[pa.Field] = []
        self.files: list[InputFile] = []
        first = 0
        for dataset in self._datasets(resolved):
            partitioning = getattr(dataset, "partitioning", None)
            fields = list(partitioning.schema) if partitioning is not None else []
            known = {f.name for f in self.partition_fields}
            self.partition_fields += [f for f in fields if f.name not in known]
            sizes = {
                info.path: info.size or 0 for info in filesystem.get_file_info(list(dataset.files))
            }
            for fragment in dataset.get_fragments():
                try:
                    physical = fragment.physical_schema
                    rows = fragment.count_rows()
                except _READ_ERRORS as exc:
                    raise LoadError(
                        f"file {fragment.path}: not a readable {self.format} file, it may be "
                        f"truncated or corrupt ({_short(exc)})"
                    ) from None
                extra = [f for f in fields if f.name not in physical.names]
                schema = pa.schema(list(physical) + extra) if extra else physical
                size = sizes.get(fragment.path, 0)
                self.files.append(InputFile(fragment.path, fragment, schema, rows, size, first))
                first += rows
        self.rows = first
        self.bytes = sum(f.size for f in self.files)
        self._starts = [f.first_row for f in self.files]

    def _datasets(self, paths: list[str]) -> Iterator[ds.FileSystemDataset]:
        """A hive-partitioned dataset per directory, one dataset per run of plain files."""
        infos = self.filesystem.get_file_info(paths)
        group: list[str] = []
        for path, info in zip(paths, infos, strict=True):
            if info.type != pafs.FileType.Directory:
                group.append(path)
                continue
            if group:
                yield self._open(group)
                group = []
            yield self._open(path, partitioning="hive")
        if group:
            yield self._open(group)

    def _open(self, paths: str | list[str], partitioning: str | None = None) -> ds.Dataset:
        try:
            return ds.dataset(
                paths, format=self.format, filesystem=self.filesystem, partitioning=partitioning
            )
        except FileNotFoundError as exc:
            raise LoadError(f"{self.description}: not found ({_short(exc)})") from None
        except _READ_ERRORS as exc:
            raise LoadError(
                f"{self.description}: cannot be read as {self.format} ({_short(exc)})"
            ) from None

    @property
    def partition_names(self) -> list[str]:
        return [f.name for f in self.partition_fields]

    def locate(self, row: int) -> str:
        """Input row ``row`` as a person finds it: "row 12 (file a.parquet, row 2)"."""
        i = bisect.bisect_right(self._starts, row) - 1
        if 0 <= i < len(self.files):
            f = self.files[i]
            return f"row {row} (file {f.path}, row {row - f.first_row})"
        return f"row {row}"

    def batches(
        self, columns: list[str], batch_rows: int
    ) -> Iterator[tuple[InputFile, int, pa.RecordBatch]]:
        """(file, input row of the batch's first row, batch) over every file, in order.

        Batches hold ``columns`` (those the file has, hive partition fields included)
        and at most ``batch_rows`` rows.
        """
        for f in self.files:
            if not f.rows:
                continue
            row = f.first_row
            try:
                for batch in self._file_batches(f, columns, batch_rows):
                    if batch.num_rows:
                        yield f, row, batch
                        row += batch.num_rows
            except _READ_ERRORS as exc:
                raise LoadError(
                    f"file {f.path}: reading failed after {row - f.first_row} rows; the file "
                    f"may be truncated or corrupt ({_short(exc)})"
                ) from None

    def _file_batches(
        self, f: InputFile, columns: list[str], batch_rows: int
    ) -> Iterator[pa.RecordBatch]:
        # Pull readers, one batch at a time: pyarrow.dataset's scanner decodes ahead
        # without bound while its consumer is busy (788 MB ahead after a 2 s pause,
        # measured), and Parquet pre-buffering reads whole row groups ahead.
        partition = ds.get_partition_keys(f.fragment.partition_expression)
        own = [c for c in columns if c in f.schema.names and c not in partition]
        constants = [c for c in columns if c in partition and c in f.schema.names]
        with self.filesystem.open_input_file(f.path) as stream:
            if self.format == "parquet":
                reader = pq.ParquetFile(stream, pre_buffer=False)
                batches = reader.iter_batches(batch_size=batch_rows, columns=own)
            else:
                batches = _ipc_batches(pa.ipc.open_file(stream), own, batch_rows)
            for batch in batches:
                for name in constants:
                    value = pa.scalar(partition[name], f.schema.field(name).type)
                    batch = batch.append_column(name, pa.repeat(value, batch.num_rows))
                yield batch


def _ipc_batches(
    reader: pa.ipc.RecordBatchFileReader, columns: list[str], batch_rows: int
) -> Iterator[pa.RecordBatch]:
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i).select(columns)
        for start in range(0, batch.num_rows, batch_rows):
            yield batch.slice(start, batch_rows)


def _describe(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"input {os.fspath(source)!r}"
    items = [os.fspath(s) for s in source]  # type: ignore[attr-defined]
    if len(items) == 1:
        return f"input {items[0]!r}"
    return f"input of {len(items)} files ({items[0]!r}, …)"


def _filesystem(paths: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem of the paths (all on one) and the paths as it names them."""
    if "://" not in paths[0]:
        return pafs.LocalFileSystem(), [os.path.abspath(p) for p in paths]
    try:
        filesystem, first = pafs.FileSystem.from_uri(paths[0])
    except _READ_ERRORS as exc:
        raise LoadError(f"input {paths[0]!r}: cannot open ({_short(exc)})") from None
    resolved = [first]
    for p in paths[1:]:
        try:
            other, path = pafs.FileSystem.from_uri(p)
        except _READ_ERRORS as exc:
            raise LoadError(f"input {p!r}: cannot open ({_short(exc)})") from None
        if other.type_name != filesystem.type_name:
            raise LoadError(f"input {p!r}: every file of one load must be on the same filesystem")
        resolved.append(path)
    return filesystem, resolved


def _format(fmt: str | None, filesystem: pafs.FileSystem, paths: list[str], what: str) -> str:
    if fmt is not None:
        try:
            return _FORMATS[fmt.lower()]
        except KeyError:
            raise LoadError(
                f"format {fmt!r} is not supported; use 'parquet' or 'ipc' (also 'arrow')"
            ) from None
    names = []
    for path in paths:
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise LoadError(f"input {path!r}: not found")
        if info.type == pafs.FileType.Directory:
            found = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
            names += [
                i.path
                for i in found
                if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_"))
            ]
        else:
            names.append(path)
    kinds = {_EXTENSIONS.get(os.path.splitext(n)[1].lower()) for n in names}
    if not names:
        raise LoadError(f"{what}: the input is empty (no file)")
    if None in kinds or len(kinds) != 1:
        raise LoadError(
            f"{what}: cannot tell the format from the file names (.parquet, .arrow, .ipc, "
            ".feather); pass format='parquet' or format='ipc'"
        )
    return kinds.pop()  # type: ignore[return-value]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
