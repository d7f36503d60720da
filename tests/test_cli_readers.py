"""The ``kvstore`` command's typed readers: keys, JSON lines and CSV rows, checked against a
table's schema, each bad value named by its line and column. No node is involved."""

from __future__ import annotations

import base64
import io
import json

import pytest

from kvstore.cli.readers import batches, parse_keys, read_csv, read_jsonl
from kvstore.schema import TableSchema

FEATURES = {
    "ctr": "float32",
    "age": "int32",
    "clicks": "int64",
    "score": "float64",
    "premium": "bool",
    "country": "string",
    "blob": "bytes",
    "emb": "float32[2]",
    "items": "int64[]",
}
SCHEMA = TableSchema.build("t", "int64", FEATURES)
STRING_KEYS = TableSchema.build("s", "string", {"v": "int64"})


def rows(reader) -> list[tuple[int, dict]]:
    return list(reader)


# -- keys ----------------------------------------------------------------------------


def test_keys_of_an_int64_table_are_integers_negative_ones_too() -> None:
    assert parse_keys(["1", "-5", "007"], "int64") == [1, -5, 7]


def test_keys_of_a_string_table_stay_as_typed() -> None:
    assert parse_keys(["007", "a b", "-5"], "string") == ["007", "a b", "-5"]


def test_a_key_that_is_not_an_integer_is_named() -> None:
    with pytest.raises(ValueError, match=r"key 'abc' is not an integer.*int64"):
        parse_keys(["1", "abc"], "int64")


# -- JSON lines ----------------------------------------------------------------------


def test_jsonl_rows_come_with_their_line_numbers_and_blank_lines_are_skipped() -> None:
    text = '{"key": 1, "age": 3}\n\n  \n{"key": 2, "country": "FRé"}\n'
    assert rows(read_jsonl(io.StringIO(text), SCHEMA)) == [
        (1, {"key": 1, "age": 3}),
        (4, {"key": 2, "country": "FRé"}),
    ]


def test_jsonl_bytes_are_base64_and_other_features_pass_through() -> None:
    blob = base64.b64encode(b"\x00\xff").decode()
    row = {"key": 1, "blob": blob, "emb": [0.5, 1.0], "items": [], "premium": None}
    ((_, got),) = rows(read_jsonl(io.StringIO(json.dumps(row)), SCHEMA))
    assert got == {**row, "blob": b"\x00\xff"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"key": 1}\n{"key": \n', r"^line 2: not valid JSON"),
        ('{"key": 1}\n[1, 2]\n', r"^line 2: expected a JSON object, got list"),
        ('{"key": 1, "blob": "no base64!"}\n', r"^line 1, column 'blob' \(bytes\): .*not base64"),
    ],
)
def test_jsonl_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rows(read_jsonl(io.StringIO(text), SCHEMA))


# -- CSV -----------------------------------------------------------------------------


def test_csv_cells_are_typed_by_their_feature() -> None:
    blob = base64.b64encode(b"\x01\x02").decode()
    text = (
        "key,ctr,age,clicks,score,premium,country,blob,emb,items\n"
        f'7,0.5,31,1099511627776,0.25,yes,JP,{blob},"[1.5, -2]","[7, 8]"\n'
    )
    assert rows(read_csv(io.StringIO(text), SCHEMA, "key")) == [
        (
            2,
            {
                "key": 7,
                "ctr": 0.5,
                "age": 31,
                "clicks": 2**40,
                "score": 0.25,
                "premium": True,
                "country": "JP",
                "blob": b"\x01\x02",
                "emb": [1.5, -2],
                "items": [7, 8],
            },
        )
    ]


@pytest.mark.parametrize(
    ("cell", "value"), [("true", True), ("1", True), ("No", False), ("0", False)]
)
def test_csv_bools(cell: str, value: bool) -> None:
    text = f"key,premium\n1,{cell}\n"
    assert rows(read_csv(io.StringIO(text), SCHEMA, "key")) == [(2, {"key": 1, "premium": value})]


def test_csv_empty_cells_are_null_and_unknown_columns_stay_text_for_the_client_to_name() -> None:
    text = "key,age,colour\n1,,red\n"
    assert rows(read_csv(io.StringIO(text), SCHEMA, "key")) == [
        (2, {"key": 1, "age": None, "colour": "red"})
    ]


def test_csv_key_column_and_key_type() -> None:
    text = "user_id,v\n007,1\n"
    assert rows(read_csv(io.StringIO(text), STRING_KEYS, "user_id")) == [
        (2, {"user_id": "007", "v": 1})
    ]
    assert rows(read_csv(io.StringIO("id,age\n007,1\n"), SCHEMA, "id")) == [
        (2, {"id": 7, "age": 1})
    ]


def test_csv_line_numbers_are_the_files_even_across_a_quoted_newline() -> None:
    text = 'key,country,age\n1,"two\nlines",31\n2,JP,32\n'
    got = rows(read_csv(io.StringIO(text), SCHEMA, "key"))
    assert [line for line, _ in got] == [2, 4]
    assert got[0][1]["country"] == "two\nlines"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("key,age\n1,31\n2,forty\n", r"^line 3, column 'age' \(int32\): "),
        ("key,premium\n1,maybe\n", r"^line 2, column 'premium' \(bool\): 'maybe' is not a bool"),
        ('key,emb\n1,"[1, 2,"\n', r"^line 2, column 'emb' \(float32\[2\]\): "),
        ("key,blob\n1,***\n", r"^line 2, column 'blob' \(bytes\): "),
        ("key,age\nx,1\n", r"^line 2, column 'key' \(key\): "),
        ("key,age\n1,2,3\n", r"^line 2: more fields than header columns"),
    ],
)
def test_csv_errors_name_line_and_column(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rows(read_csv(io.StringIO(text), SCHEMA, "key"))


# -- batches -------------------------------------------------------------------------


def test_batches_hold_at_most_size_rows_and_the_line_of_their_first() -> None:
    numbered = [(line, {"key": line}) for line in (1, 2, 4, 5, 9)]
    assert [(first, [r["key"] for r in b]) for first, b in batches(numbered, 2)] == [
        (1, [1, 2]),
        (4, [4, 5]),
        (9, [9]),
    ]
    assert list(batches([], 2)) == []
