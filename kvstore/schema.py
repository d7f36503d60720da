"""Table schemas: the key type, the typed features, and how they map to Arrow and the codec.

A feature's dtype is written as text everywhere a person sees it (the CLI, JSON,
the wire): ``bool``, ``int32``, ``int64``, ``float32``, ``float64``, ``string``,
``bytes``, ``float32[N]`` (a fixed-size embedding of N floats) and ``int64[]`` (a
variable-length list of integers).

An embedding may be stored lossily to save memory: ``float32[N]:float16`` (IEEE half,
2N bytes) or ``float32[N]:int8`` (a float32 scale per row and N one-byte codes). The
suffix names the storage only: such a feature is written and read as float32[N]
like any other (docs/row-format.md gives the encodings and their error bounds).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa

from kvstore import _codec
from kvstore.errors import InvalidArgument, UnknownFeature

__all__ = ["DType", "Feature", "KeyType", "TableSchema"]

MAX_FEATURES = 4096
#: The longest TTL, s (about 290,000 years): TTLs are int64 µs in the codec, and a
#: longer, infinite or NaN one would fail every read of the table.
MAX_TTL_S = 9.2e12
MAX_SHARDS = 4096
MAX_STRING_KEY_BYTES = 1024
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")
_VECTOR = re.compile(r"^float32\[(\d+)\](?::(float16|int8))?$")

# The codec kind of a float32[N] feature per storage ("" = float32 itself).
_VECTOR_KINDS = {
    "": _codec.KIND_FLOAT32_VECTOR,
    "float16": _codec.KIND_FLOAT16_VECTOR,
    "int8": _codec.KIND_INT8_VECTOR,
}

KeyType = str  # "int64" or "string"
KEY_TYPES = ("int64", "string")

_SCALARS: dict[str, tuple[int, pa.DataType, np.dtype | None]] = {
    "bool": (_codec.KIND_BOOL, pa.bool_(), np.dtype(np.bool_)),
    "int32": (_codec.KIND_INT32, pa.int32(), np.dtype(np.int32)),
    "int64": (_codec.KIND_INT64, pa.int64(), np.dtype(np.int64)),
    "float32": (_codec.KIND_FLOAT32, pa.float32(), np.dtype(np.float32)),
    "float64": (_codec.KIND_FLOAT64, pa.float64(), np.dtype(np.float64)),
    "string": (_codec.KIND_STRING, pa.string(), None),
    "bytes": (_codec.KIND_BYTES, pa.binary(), None),
    "int64[]": (_codec.KIND_INT64_LIST, pa.list_(pa.int64()), None),
}


@dataclass(frozen=True, slots=True)
class DType:
    """A feature's type: ``kind`` is the codec's KIND_* of the values a user writes and
    reads, ``dim`` the length of a float32[N], ``storage`` how a float32[N] is stored
    ("" as float32, "float16" or "int8": lossy, see ``codec_kind``)."""

    name: str
    kind: int
    dim: int = 0
    storage: str = ""

    @classmethod
    def parse(cls, text: str) -> DType:
        """Parse ``"float32"``, ``"float32[64]"``, ``"float32[64]:int8"``, ``"int64[]"`` …;
        InvalidArgument otherwise."""
        text = text.strip()
        if text in _SCALARS:
            return cls(text, _SCALARS[text][0])
        m = _VECTOR.match(text)
        if m:
            dim = int(m.group(1))
            if not 1 <= dim <= 65536:
                raise InvalidArgument(f"dtype {text!r}: the dimension must be 1 to 65536")
            return cls(text, _codec.KIND_FLOAT32_VECTOR, dim, m.group(2) or "")
        raise InvalidArgument(
            f"unknown dtype {text!r}; expected one of bool, int32, int64, float32, float64, "
            "string, bytes, float32[N], float32[N]:float16, float32[N]:int8, int64[]"
        )

    @property
    def codec_kind(self) -> int:
        """The KIND_* of the stored bytes: ``kind`` except for a float16/int8 float32[N]."""
        if self.kind == _codec.KIND_FLOAT32_VECTOR:
            return _VECTOR_KINDS[self.storage]
        return self.kind

    @property
    def arrow_type(self) -> pa.DataType:
        if self.kind == _codec.KIND_FLOAT32_VECTOR:
            return pa.list_(pa.float32(), self.dim)
        return _SCALARS[self.name][1]

    @property
    def numpy_dtype(self) -> np.dtype | None:
        """The NumPy dtype of one element; None for strings, bytes and lists."""
        if self.kind == _codec.KIND_FLOAT32_VECTOR:
            return np.dtype(np.float32)
        return _SCALARS[self.name][2]

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Feature:
    """One typed feature of a table; a value older than ``ttl_s`` seconds (by its event
    time) reads as null (0 = kept forever)."""

    name: str
    dtype: DType
    ttl_s: float = 0.0


@dataclass(frozen=True)
class TableSchema:
    """A table: its name, key type, ordered features, shard count and schema id.

    ``schema_id`` is 0 until the node assigns one.
    """

    name: str
    key_type: KeyType
    features: tuple[Feature, ...]
    shards: int = 8
    schema_id: int = 0
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._index.update({f.name: i for i, f in enumerate(self.features)})

    @classmethod
    def build(
        cls,
        name: str,
        key: KeyType,
        features: dict[str, str] | list[tuple[str, str]],
        shards: int = 8,
        schema_id: int = 0,
        ttl: dict[str, float] | None = None,
    ) -> TableSchema:
        """Validate and build a schema from plain values; InvalidArgument names what is wrong.

        ``ttl`` maps feature names to a time to live in seconds.
        """
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidArgument(
                f"table name {name!r} is not valid: use letters, digits, '_', '.', '-', "
                "starting with a letter or '_', at most 128 characters"
            )
        if key not in KEY_TYPES:
            raise InvalidArgument(f"table {name!r}: key type {key!r} must be 'int64' or 'string'")
        items = list(features.items()) if isinstance(features, dict) else list(features)
        if not items:
            raise InvalidArgument(f"table {name!r}: a table needs at least one feature")
        if len(items) > MAX_FEATURES:
            raise InvalidArgument(f"table {name!r}: {len(items)} features, at most {MAX_FEATURES}")
        if not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
            raise InvalidArgument(f"table {name!r}: shards must be 1 to {MAX_SHARDS}, not {shards}")
        seen: set[str] = set()
        out = []
        for fname, dtype in items:
            if not isinstance(fname, str) or not _NAME.match(fname):
                raise InvalidArgument(f"table {name!r}: feature name {fname!r} is not valid")
            if fname == "key":
                raise InvalidArgument(f"table {name!r}: 'key' is reserved for the key column")
            if fname in seen:
                raise InvalidArgument(f"table {name!r}: feature {fname!r} is listed twice")
            seen.add(fname)
            try:
                parsed = DType.parse(dtype)
            except InvalidArgument as exc:
                raise InvalidArgument(f"table {name!r}, feature {fname!r}: {exc}") from None
            out.append(Feature(fname, parsed))
        for fname, seconds in (ttl or {}).items():
            if fname not in seen:
                raise UnknownFeature(f"table {name!r}: a TTL for {fname!r}, which is not a feature")
            if not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_TTL_S:
                raise InvalidArgument(
                    f"table {name!r}, feature {fname!r}: the TTL must be a number of seconds "
                    f"from 0 to {MAX_TTL_S:.4g} (0: none), not {seconds!r}"
                )
            i = [f.name for f in out].index(fname)
            out[i] = Feature(fname, out[i].dtype, float(seconds))
        return cls(name, key, tuple(out), shards, schema_id)

    def with_id(self, schema_id: int) -> TableSchema:
        return TableSchema(self.name, self.key_type, self.features, self.shards, schema_id)

    def same_definition(self, other: TableSchema) -> bool:
        """Same key type, features and shards (the schema id aside)."""
        return (self.key_type, self.features, self.shards) == (
            other.key_type,
            other.features,
            other.shards,
        )

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def index_of(self, feature: str) -> int:
        """Position of a feature; UnknownFeature lists the table's features otherwise."""
        try:
            return self._index[feature]
        except KeyError:
            raise UnknownFeature(
                f"table {self.name!r} has no feature {feature!r}; its features are: "
                + ", ".join(self.feature_names)
            ) from None

    def projection(self, features: list[str] | None) -> list[int]:
        """Feature positions for a list of names (None or empty = all features)."""
        if not features:
            return list(range(len(self.features)))
        return [self.index_of(f) for f in features]

    @cached_property
    def layout(self) -> _codec.Layout:
        """The codec's byte layout of this schema."""
        return _codec.Layout(
            self.schema_id,
            [f.dtype.codec_kind for f in self.features],
            [f.dtype.dim for f in self.features],
        )

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "key": self.key_type,
            "shards": self.shards,
            "schema_id": self.schema_id,
            "features": {f.name: f.dtype.name for f in self.features},
            "ttl_s": {f.name: f.ttl_s for f in self.features if f.ttl_s},
        }

    @classmethod
    def from_json(cls, data: dict) -> TableSchema:
        return cls.build(
            data["name"],
            data["key"],
            data["features"],
            data["shards"],
            data.get("schema_id", 0),
            data.get("ttl_s"),
        )

    @cached_property
    def ttl_us(self) -> np.ndarray | None:
        """TTL of every feature in µs (0 = none), or None when no feature has one."""
        if not any(f.ttl_s for f in self.features):
            return None
        return np.array([int(f.ttl_s * 1e6) for f in self.features], dtype=np.int64)
