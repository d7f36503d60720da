"""The source is formatted and lint-clean (after asyncpg's tests/test__sourcecode.py).

Runs the same ruff, cython-lint and mypy as ``make lint`` (ruff and mypy with the
settings in pyproject.toml, cython-lint with ext/.cython-lint.toml), checks with mypy's
stubtest that kvstore/_codec.pyi describes the compiled module, and that ext/ is laid
out as ext/codec.pyx says: every .pxi included by it, each opening with a comment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RUFF = BIN / "ruff"
CYTHON_LINT = BIN / "cython-lint"

# What stubtest must not ask the stub for: the machinery Cython adds to a module (its
# doctest dict, the pickling helpers of cdef classes), not part of the codec's API.
# stubtest fails on an entry that matches nothing, so the list cannot go stale.
STUBTEST_ALLOWLIST = """\
kvstore\\._codec\\.__test__
kvstore\\._codec\\.(\\w+\\.)?__reduce_cython__
kvstore\\._codec\\.(\\w+\\.)?__setstate_cython__
"""


def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    if not RUFF.exists():
        pytest.fail(f"ruff is not installed next to {sys.executable} (pip install -e '.[test]')")
    return subprocess.run(
        [str(RUFF), *args, "--no-cache", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ruff_format() -> None:
    proc = _ruff("format", "--check")
    if proc.returncode != 0:
        pytest.fail(f"ruff format --check found unformatted files:\n{proc.stdout}{proc.stderr}")


def test_ruff_check() -> None:
    proc = _ruff("check", "--output-format", "concise")
    if proc.returncode != 0:
        pytest.fail(f"ruff check found problems:\n{proc.stdout}{proc.stderr}")


def test_cython_lint() -> None:
    if not CYTHON_LINT.exists():
        pytest.fail(
            f"cython-lint is not installed next to {sys.executable} (pip install -e '.[test]')"
        )
    # cython-lint runs pycodestyle by name: the one in this environment.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [str(CYTHON_LINT), "ext"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        pytest.fail(f"cython-lint found problems:\n{proc.stdout}{proc.stderr}")


def test_every_pxi_is_included_and_says_what_it_holds() -> None:
    pyx = (ROOT / "ext" / "codec.pyx").read_text()
    included = set(re.findall(r'^include "([^"]+)"$', pyx, re.MULTILINE))
    pxis = {path.name for path in (ROOT / "ext").glob("*.pxi")}
    assert pxis, "ext/ has no .pxi files"
    assert included == pxis, f"ext/codec.pyx includes {sorted(included)}, ext/ has {sorted(pxis)}"
    for name in sorted(pxis):
        first = (ROOT / "ext" / name).read_text().splitlines()[0]
        assert first.startswith("# "), f"ext/{name} must open with a comment saying what it holds"


def test_codec_stub_matches_the_module(tmp_path: Path) -> None:
    """kvstore/_codec.pyi names every public name of kvstore._codec, with its signature."""
    try:
        import mypy.stubtest  # noqa: F401
    except ImportError:
        pytest.fail(f"mypy is not installed for {sys.executable} (pip install -e '.[test]')")
    # Only the stub is under test: mypy reads the package's other modules silently (their
    # typing is test_mypy's business), and its cache stays out of the tree.
    config = tmp_path / "mypy.ini"
    config.write_text(
        "[mypy]\nignore_missing_imports = True\nfollow_imports = silent\n"
        f"cache_dir = {tmp_path / 'cache'}\n"
    )
    allowlist = tmp_path / "allowlist.txt"
    allowlist.write_text(STUBTEST_ALLOWLIST)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy.stubtest",
            "kvstore._codec",
            "--mypy-config-file",
            str(config),
            "--allowlist",
            str(allowlist),
            "--concise",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(f"kvstore/_codec.pyi differs from kvstore._codec:\n{proc.stdout}{proc.stderr}")


def _link_tree(root: Path) -> Path:
    """A kvstore/ whose entries link to the real ones, with ingest/ linked in as kvstore/ingest."""
    package = root / "kvstore"
    package.mkdir(parents=True)
    for entry in (ROOT / "kvstore").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "ingest").symlink_to(ROOT / "ingest")
    return root


def test_mypy(tmp_path: Path) -> None:
    """mypy (settings in pyproject.toml) finds no type error in kvstore/ and ingest/."""
    try:
        import mypy.api  # noqa: F401
    except ImportError:
        pytest.fail(f"mypy is not installed for {sys.executable} (pip install -e '.[test]')")
    # ingest/ installs as kvstore.ingest through a package-dir mapping, which the editable
    # install serves with an import hook: mypy runs no import hooks (it reads files), so it
    # is given a tree laid out as the installed package is. Errors name the real files.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "-p",
            "kvstore",
        ],
        cwd=_link_tree(tmp_path / "tree"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        report = re.sub(r"^kvstore/ingest/", "ingest/", proc.stdout, flags=re.MULTILINE)
        pytest.fail(f"mypy found type errors:\n{report}{proc.stderr}")


def test_the_architecture_page_names_every_module() -> None:
    """docs/architecture.md's code map lists each module of kvstore/, ingest/ and ext/, so
    a module added without a line there fails here."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    modules = [
        *(p for p in (ROOT / "kvstore").rglob("*.py") if p.parent.name != "v1"),
        *(ROOT / "ingest").glob("*.py"),
        *(ROOT / "ext").glob("*.pxi"),
    ]
    missing = sorted(
        str(p.relative_to(ROOT))
        for p in modules
        if p.name != "__init__.py" and not re.search(rf"\b{re.escape(p.name)}\b", page)
    )
    assert not missing, f"docs/architecture.md does not name: {', '.join(missing)}"
