"""The ``kvstore`` command against a real node: every subcommand, its input formats, its errors.

Each test runs the command as a user would (``python -m kvstore.cli …`` in a subprocess)
and reads only what it prints and its exit status.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import kvstore

from kvstore import Client
from kvstore.config import NodeConfig, node_settings

COMMANDS = [
    "serve",
    "status",
    "tables",
    "describe",
    "create-table",
    "drop",
    "get",
    "write",
    "delete",
    "load",
    "versions",
    "rollback",
    "consume",
]

# One feature of every dtype, as ``--feature NAME:DTYPE`` takes them.
FEATURES = {
    "ctr": "float32",
    "age": "int32",
    "clicks": "int64",
    "score": "float64",
    "premium": "bool",
    "country": "string",
    "blob": "bytes",
    "emb": "float32[4]",
    "items": "int64[]",
}

ROW_1 = {
    "key": 1,
    "ctr": 0.1,
    "age": 31,
    "clicks": 2**40,
    "score": 1 / 3,
    "premium": True,
    "country": "FRé",
    "blob": base64.b64encode(b"\x00\x01\xff").decode(),
    "emb": [1.5, -2.0, 0.25, 4.0],
    "items": [7, 8, 9],
}
ROW_2 = {"key": 2, "age": 44, "country": "JP", "items": []}


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must have succeeded."""
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def address(shared_node) -> str:
    return shared_node.address


@pytest.fixture
def run(address: str, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run("get", "t", "1")``: the command against the shared node, in the test's tmp dir."""

    def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return kvstore(*args, address=address, stdin=stdin, cwd=tmp_path)

    return _run


@pytest.fixture
def table(client: Client, table_name: str) -> Iterator[str]:
    """A table with every dtype, made through the Python API (the CLI reads it)."""
    client.create_table(table_name, key="int64", features=FEATURES, shards=4)
    yield table_name
    if table_name in {t.schema.name for t in client.list_tables()}:
        client.drop_table(table_name)


# -- help ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_exits_0_and_shows_an_example(command: str | None) -> None:
    args = ["--help"] if command is None else [command, "--help"]
    out = ok(kvstore(*args, address=None))
    assert "example" in out.lower(), out
    example_lines = [line for line in out.splitlines() if line.strip().startswith("kvstore ")]
    if command is None:
        assert example_lines, f"no example command line in:\n{out}"
        for name in COMMANDS:
            assert name in out, f"top-level help does not list {name!r}:\n{out}"
    else:
        assert any(line.split()[1] == command for line in example_lines), (
            f"no 'kvstore {command} …' example in:\n{out}"
        )


def _option_entries(help_text: str) -> dict[str, str]:
    """``--flag`` → its help entry with whitespace collapsed (click wraps entries)."""
    entries: dict[str, str] = {}
    flag = None
    for line in help_text.splitlines():
        stripped = line.strip()
        if line.startswith("  -") and not line.startswith("   "):
            flag = stripped.split()[0].rstrip(",")
            if flag == "-h":
                flag = "--help"
            entries[flag] = stripped
        elif flag and stripped:
            entries[flag] += " " + stripped
        elif not stripped:
            flag = None
    return entries


def test_serve_help_lists_every_setting_with_its_variable() -> None:
    entries = _option_entries(ok(kvstore("serve", "--help", address=None)))
    for setting in node_settings():
        assert setting.flag in entries, f"{setting.flag} ({setting.name}) missing from help"
        assert f"env var: {setting.env}" in entries[setting.flag], entries[setting.flag]
    assert "env var: KVSTORE_LOG_LEVEL" in entries["--log-level"]
    assert set(entries) == {s.flag for s in node_settings()} | {"--log-level", "--help"}


# The spellings scripts, the Makefile and the docs use; and one setting that had none.
@pytest.mark.parametrize(
    ("name", "flag", "env"),
    [
        ("data_dir", "--data", "KVSTORE_DATA"),
        ("port", "--port", "KVSTORE_PORT"),
        ("block_cache_bytes", "--block-cache-mb", "KVSTORE_BLOCK_CACHE_BYTES"),
        ("row_cache_bytes", "--row-cache-mb", "KVSTORE_ROW_CACHE_BYTES"),
        ("max_request_bytes", "--max-request-mb", "KVSTORE_MAX_REQUEST_BYTES"),
        ("base_format", "--base-format", "KVSTORE_BASE_FORMAT"),
        ("advertise_address", "--advertise-address", "KVSTORE_ADVERTISE_ADDRESS"),
    ],
)
def test_settings_keep_their_flag_and_variable(name: str, flag: str, env: str) -> None:
    (setting,) = [s for s in node_settings() if s.name == name]
    assert (setting.flag, setting.env) == (flag, env)


def test_every_field_is_a_setting_with_its_own_flag_and_variable() -> None:
    settings = node_settings()
    assert [s.name for s in settings] == list(NodeConfig.__dataclass_fields__)
    assert len({s.flag for s in settings}) == len({s.env for s in settings}) == len(settings)
    assert all(s.doc and s.env.startswith("KVSTORE_") for s in settings)


OPERATIONS_DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def _doc_row(setting) -> str:
    """The row of docs/operations.md's settings table that ``setting`` makes."""
    flag = f"`{setting.flag}`" + (f" ({setting.flag_unit_name})" if setting.flag_unit_name else "")
    env = f"`{setting.env}`" + (" (bytes)" if setting.flag_unit != 1 else "")
    if setting.shown_default is not None:
        default = setting.shown_default
    elif setting.type is bool:
        default = "on" if setting.default else "off"
    elif setting.default is None or setting.default == "":
        default = "none"
    elif setting.type is float:
        default = f"{setting.default:g}"
    else:
        default = str(
            setting.default // setting.flag_unit if setting.flag_unit != 1 else setting.default
        )
    meaning = setting.doc.replace("<", "\\<")  # Markdown would take <cluster> for a tag
    return f"| {flag} | {env} | `{default}` | {meaning} |"


def test_operations_doc_lists_every_setting_as_declared() -> None:
    # The table is made from the declarations: a setting added, renamed, re-defaulted or
    # re-documented in kvstore/config.py fails here until the doc shows it.
    lines = OPERATIONS_DOC.read_text().splitlines()
    documented = [line for line in lines if line.startswith("| `--")]
    expected = [_doc_row(s) for s in node_settings()]
    assert documented == expected, (
        "docs/operations.md's settings table differs from kvstore.config.node_settings(); "
        "its rows should be:\n" + "\n".join(expected)
    )


_SAMPLES = {int: ("7", 7), float: ("2.5", 2.5), bool: ("yes", True), str: ("abc", "abc")}


@pytest.mark.parametrize("setting", node_settings(), ids=lambda s: s.env)
def test_from_env_reads_each_variable(setting, monkeypatch: pytest.MonkeyPatch) -> None:
    text, value = _SAMPLES.get(setting.type, ("/srv/x", Path("/srv/x")))
    monkeypatch.setenv(setting.env, text)
    assert getattr(NodeConfig.from_env(), setting.name) == value
    # An override that is not None wins over the variable.
    assert getattr(NodeConfig.from_env(**{setting.name: "over"}), setting.name) == "over"


def test_from_env_names_a_variable_it_cannot_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTORE_PORT", "seventy")
    with pytest.raises(ValueError, match=r"^KVSTORE_PORT: 'seventy' is not an integer$"):
        NodeConfig.from_env()
    monkeypatch.setenv("KVSTORE_PORT", "")  # empty is unset, as for kvstore serve
    assert NodeConfig.from_env().port == NodeConfig().port


def _status(address: str) -> dict:
    return json.loads(ok(kvstore("status", "--json", address=address)))


def test_serve_takes_settings_from_variables_and_flags_win(
    start_node, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The row cache's capacity shows in status: bytes in the variable, MiB in the flag.
    monkeypatch.setenv("KVSTORE_ROW_CACHE_BYTES", str(2 << 20))
    from_variable = start_node()
    from_flag = start_node("--row-cache-mb", "3")
    assert _status(from_variable.address)["row_cache_capacity_bytes"] == 2 << 20
    assert _status(from_flag.address)["row_cache_capacity_bytes"] == 3 << 20


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("serve", "--port", "abc"), {}, "Invalid value for '--port'"),
        (("serve",), {"KVSTORE_PORT": "abc"}, "'abc' is not an integer"),
        (("serve", "--base-format", "cuckoo"), {}, "'cuckoo' is not one of plain, block"),
        (("serve", "--no-such-flag"), {}, "No such option '--no-such-flag'"),
        (("get", "t"), {}, "Missing argument 'KEY...'"),
        (("no-such-command",), {}, "No such command 'no-such-command'"),
    ],
)
def test_a_usage_error_exits_2_with_a_message(
    args: tuple[str, ...], env: dict[str, str], message: str, tmp_path: Path
) -> None:
    proc = kvstore(*args, address=None, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "var").exists()  # no node started


# -- tables --------------------------------------------------------------------------


def test_create_table_with_features_prints_the_schema(run, client: Client, table_name: str) -> None:
    args = ["create-table", table_name, "--key", "int64", "--shards", "4"]
    for name, dtype in FEATURES.items():
        args += ["--feature", f"{name}:{dtype}"]
    info = json.loads(ok(run(*args)))
    try:
        assert info["name"] == table_name
        assert info["key"] == "int64"
        assert info["shards"] == 4
        assert info["features"] == FEATURES  # every dtype, in the order given
        schema = client.describe_table(table_name).schema
        assert {f.name: f.dtype.name for f in schema.features} == FEATURES
        # The same definition again is a no-op, not an error.
        assert json.loads(ok(run(*args)))["features"] == FEATURES
    finally:
        client.drop_table(table_name)


def test_tables_lists_each_table_as_a_human_table_and_as_json(run, table: str) -> None:
    lines = ok(run("tables")).splitlines()
    assert lines[0].split()[:4] == ["TABLE", "KEY", "SHARDS", "FEATURES"]
    (row,) = [line.split() for line in lines[1:] if line.split()[0] == table]
    assert row[1:4] == ["int64", "4", str(len(FEATURES))]

    listed = json.loads(ok(run("tables", "--json")))
    (entry,) = [t for t in listed if t["name"] == table]
    assert entry["key"] == "int64"
    assert entry["shards"] == 4
    assert entry["features"] == FEATURES
    assert isinstance(entry["version"], int)


def test_describe_prints_schema_version_and_size_as_json(run, table: str) -> None:
    info = json.loads(ok(run("describe", table)))
    assert info["name"] == table
    assert info["key"] == "int64"
    assert info["shards"] == 4
    assert info["features"] == FEATURES
    assert isinstance(info["version"], int)
    assert {"rows_estimate", "disk_bytes"} <= set(info)


def test_address_can_come_from_the_environment(address: str, table: str, tmp_path: Path) -> None:
    out = ok(
        kvstore("tables", "--json", address=None, cwd=tmp_path, env={"KVSTORE_ADDRESS": address})
    )
    assert table in [t["name"] for t in json.loads(out)]


# -- write ---------------------------------------------------------------------------


def test_write_from_a_json_lines_file(run, table: str, tmp_path: Path) -> None:
    rows = [{k: v for k, v in ROW_1.items() if k != "blob"}, ROW_2]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert json.loads(ok(run("write", table, "rows.jsonl"))) == {"table": table, "rows_written": 2}

    got = json_lines(ok(run("get", table, "1", "2")))
    assert got[0] == {"found": True, "blob": None, **rows[0]}
    unset = {name: None for name in FEATURES if name not in ROW_2}
    assert got[1] == {"found": True, **unset, **ROW_2}


def test_write_jsonl_takes_back_what_get_prints(run, table: str) -> None:
    # bytes print as base64 (JSON has no bytes); a JSON-lines write must read them the same way.
    ok(run("write", table, "-", "--format", "csv", stdin=_csv([ROW_1])))
    printed = ok(run("get", table, "1"))
    (row,) = json_lines(printed)
    assert row["blob"] == ROW_1["blob"]

    row.pop("found")
    ok(run("write", table, "-", stdin=json.dumps(row) + "\n"))
    assert ok(run("get", table, "1")) == printed


def _csv(rows: list[dict]) -> str:
    """Rows as CSV, the way ``write --help`` asks: lists as JSON arrays, bytes as base64."""
    header = ["key", *FEATURES]
    lines = [",".join(header)]
    for row in rows:
        cells = []
        for name in header:
            value = row.get(name)
            if value is None:
                cells.append("")
            elif isinstance(value, list):
                cells.append('"' + json.dumps(value).replace('"', '""') + '"')
            elif isinstance(value, bool):
                cells.append("true" if value else "false")
            else:
                cells.append(str(value))
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def test_write_from_a_csv_file(run, table: str, tmp_path: Path) -> None:
    (tmp_path / "rows.csv").write_text(_csv([ROW_1, ROW_2]), encoding="utf-8")
    assert json.loads(ok(run("write", table, "rows.csv"))) == {"table": table, "rows_written": 2}

    got = json_lines(ok(run("get", table, "1", "2")))
    assert got[0] == {"found": True, **ROW_1}
    unset = {name: None for name in FEATURES if name not in ROW_2}
    assert got[1] == {"found": True, **unset, **ROW_2}


def test_write_csv_with_another_key_column(run, table: str) -> None:
    csv_text = "user_id,age\n5,50\n6,60\n"
    out = ok(run("write", table, "-", "--format", "csv", "--key-column", "user_id", stdin=csv_text))
    assert json.loads(out)["rows_written"] == 2
    got = json_lines(ok(run("get", table, "5", "6", "--features", "age")))
    assert got == [
        {"key": 5, "found": True, "age": 50},
        {"key": 6, "found": True, "age": 60},
    ]


def test_write_from_stdin(run, table: str) -> None:
    stdin = '{"key": 10, "age": 1}\n{"key": 11, "age": 2, "country": "BR"}\n'
    assert json.loads(ok(run("write", table, "-", stdin=stdin)))["rows_written"] == 2
    got = json_lines(ok(run("get", table, "10", "11", "--features", "age,country")))
    assert got == [
        {"key": 10, "found": True, "age": 1, "country": None},
        {"key": 11, "found": True, "age": 2, "country": "BR"},
    ]


def test_write_keeps_the_features_a_row_leaves_out(run, table: str) -> None:
    ok(run("write", table, "-", stdin='{"key": 20, "age": 20, "country": "DE"}\n'))
    ok(run("write", table, "-", stdin='{"key": 20, "age": 21}\n'))
    got = json_lines(ok(run("get", table, "20", "--features", "age,country")))
    assert got == [{"key": 20, "found": True, "age": 21, "country": "DE"}]


# -- get, delete, drop ---------------------------------------------------------------


def test_get_prints_one_object_per_key_in_request_order(run, table: str, client: Client) -> None:
    client.write(table, {"key": [1, 2, 3], "age": [10, 20, 30], "ctr": [0.5, 0.25, 0.125]})
    got = json_lines(ok(run("get", table, "3", "99", "1", "3")))
    assert [g["key"] for g in got] == [3, 99, 1, 3]
    assert [g["found"] for g in got] == [True, False, True, True]
    assert got[1] == {"key": 99, "found": False}
    assert set(got[0]) == {"key", "found", *FEATURES}
    assert got[0]["age"] == 30 and got[0]["ctr"] == 0.125
    assert got[2]["age"] == 10
    assert got[3] == got[0]  # a repeated key is answered at each of its positions

    projected = json_lines(ok(run("get", table, "2", "99", "--features", "ctr,age")))
    assert projected == [
        {"key": 2, "found": True, "ctr": 0.25, "age": 20},
        {"key": 99, "found": False},
    ]


def test_get_on_a_string_key_table(run, client: Client, table_name: str) -> None:
    client.create_table(table_name, key="string", features={"v": "int64"}, shards=2)
    try:
        client.write(table_name, {"key": ["007", "a b"], "v": [7, 8]})
        got = json_lines(ok(run("get", table_name, "007", "7", "a b")))
        assert got == [
            {"key": "007", "found": True, "v": 7},
            {"key": "7", "found": False},
            {"key": "a b", "found": True, "v": 8},
        ]
    finally:
        client.drop_table(table_name)


def test_negative_keys_are_keys_not_options(run, table: str, client: Client) -> None:
    client.write(table, {"key": [-5, 5], "age": [50, 5]})
    got = json_lines(ok(run("get", table, "-5", "--features", "age", "5", "-6")))
    assert got == [
        {"key": -5, "found": True, "age": 50},
        {"key": 5, "found": True, "age": 5},
        {"key": -6, "found": False},
    ]
    assert json.loads(ok(run("delete", table, "-5")))["keys_deleted"] == 1
    assert json_lines(ok(run("get", table, "-5")))[0]["found"] is False


def test_delete_removes_the_keys_and_only_them(run, table: str, client: Client) -> None:
    client.write(table, {"key": [1, 2, 3], "age": [10, 20, 30]})
    out = json.loads(ok(run("delete", table, "1", "3", "404")))
    assert out == {"table": table, "keys_deleted": 3}
    got = json_lines(ok(run("get", table, "1", "2", "3", "--features", "age")))
    assert [(g["key"], g["found"]) for g in got] == [(1, False), (2, True), (3, False)]
    assert got[1]["age"] == 20


def test_drop_deletes_the_table(run, table: str, client: Client) -> None:
    client.write(table, {"key": [1], "age": [10]})
    assert json.loads(ok(run("drop", table))) == {"table": table, "dropped": True}
    assert table not in [t["name"] for t in json.loads(ok(run("tables", "--json")))]
    assert table not in {t.schema.name for t in client.list_tables()}


# -- errors --------------------------------------------------------------------------


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound by this test but not listening: a connection to it is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def _error_line(proc: subprocess.CompletedProcess[str], command: str) -> str:
    assert proc.returncode == 1, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line message, got:\n{proc.stderr}"
    assert lines[0].startswith(f"kvstore {command}: error: "), lines[0]
    return lines[0]


def test_error_unknown_table(run) -> None:
    for args in (["get", "no_such_table", "1"], ["describe", "no_such_table"]):
        assert "'no_such_table'" in _error_line(run(*args), args[0])
    assert "'no_such_table'" in _error_line(
        run("write", "no_such_table", "-", stdin="{}\n"), "write"
    )


def test_error_unknown_feature(run, table: str) -> None:
    line = _error_line(run("get", table, "1", "--features", "age,no_such_feature"), "get")
    assert "'no_such_feature'" in line
    line = _error_line(run("write", table, "-", stdin='{"key": 1, "colour": "red"}\n'), "write")
    assert "'colour'" in line


def test_error_bad_json_line_names_the_line(run, table: str) -> None:
    stdin = '{"key": 1, "age": 1}\n\n{"key": 2, "age": \n{"key": 3}\n'
    line = _error_line(run("write", table, "-", stdin=stdin), "write")
    assert "line 3" in line


def test_error_csv_cell_of_the_wrong_type_names_line_and_column(run, table: str) -> None:
    csv_text = "key,age,ctr\n1,31,0.5\n2,forty,0.5\n"
    line = _error_line(run("write", table, "-", "--format", "csv", stdin=csv_text), "write")
    assert "line 3" in line and "'age'" in line, line

    csv_text = 'key,emb\n1,"[1, 2, 3, 4]"\n2,"[1, 2,"\n'
    line = _error_line(run("write", table, "-", "--format", "csv", stdin=csv_text), "write")
    assert "line 3" in line and "'emb'" in line, line


def test_error_csv_line_counts_the_lines_of_the_file(run, table: str) -> None:
    # A quoted cell may hold a newline; the line named is still the file's line.
    csv_text = 'key,country,age\n1,"two\nlines",31\n2,JP,forty\n'
    line = _error_line(run("write", table, "-", "--format", "csv", stdin=csv_text), "write")
    assert "line 4" in line and "'age'" in line, line


def test_error_non_integer_key_for_an_int64_table(run, table: str) -> None:
    for command in ("get", "delete"):
        line = _error_line(run(command, table, "1", "abc"), command)
        assert "'abc'" in line and "int64" in line, line
    line = _error_line(run("write", table, "-", stdin='{"key": "abc", "age": 1}\n'), "write")
    assert "'abc'" in line, line


def test_error_unreachable_address_names_it(closed_port: int, tmp_path: Path) -> None:
    address = f"127.0.0.1:{closed_port}"
    proc = kvstore("tables", "--timeout", "3", address=address, cwd=tmp_path)
    assert address in _error_line(proc, "tables")
