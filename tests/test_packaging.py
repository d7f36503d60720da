"""What a user gets from ``pip install kvstore``: one package, ``kvstore``, and nothing else.

Installs the repository's tracked files, non-editable, into an empty target directory
(the editable install of the dev venv would hide a missing package-dir mapping, a
missing stub or protobuf code that is only generated in the working tree).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# About 15 s (the Cython build); deselect with -m "not slow".
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``pip install --target`` of a copy of the tracked files; returns the target."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "src"
    # Tracked files, plus new ones not yet committed; never what .gitignore names
    # (compiled extensions, generated C and protobuf code, build/).
    git = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
    )
    if git.returncode != 0:
        pytest.skip(f"not a git checkout: {git.stderr.decode().strip()}")
    listed = git.stdout.decode()
    for name in filter(None, listed.split("\0")):
        path = ROOT / name
        if path.is_file():  # a tracked file someone deleted in the working tree is skipped
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, source / name)

    target = base / "site-packages"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-cache-dir",
            "--target",
            str(target),
            str(source),
        ],
        cwd=base,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    return target


def test_only_kvstore_lands_at_the_top_of_site_packages(installed: Path) -> None:
    top = sorted(p.name for p in installed.iterdir())
    extra = [
        name
        for name in top
        if name not in ("kvstore", "bin")
        and not (name.startswith("kvstore-") and name.endswith(".dist-info"))
    ]
    assert extra == [], f"top-level entries besides kvstore: {extra} (all: {top})"
    assert "kvstore" in top
    assert [n for n in top if n.endswith(".dist-info")], top


def test_the_package_holds_the_compiled_codec_its_stub_ingest_and_the_protobuf_code(
    installed: Path,
) -> None:
    pkg = installed / "kvstore"
    assert list(pkg.glob("_codec*.so")), sorted(p.name for p in pkg.iterdir())
    for name in (
        "_codec.pyi",
        "py.typed",
        "ingest/__init__.py",
        "v1/feature_store_pb2.py",
        "v1/feature_store_pb2_grpc.py",
    ):
        assert (pkg / name).is_file(), f"kvstore/{name} is not installed"


def test_the_installed_package_imports_from_outside_the_repo(
    installed: Path, tmp_path: Path
) -> None:
    code = (
        "import sys\n"
        "import kvstore, kvstore.ingest, kvstore._codec, kvstore.v1.feature_store_pb2_grpc\n"
        "import kvstore.ingest.bulk, kvstore.server.app\n"
        "for name, m in sorted(sys.modules.items()):\n"
        "    if name.split('.')[0] == 'kvstore' and getattr(m, '__file__', None):\n"
        "        print(m.__file__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(installed)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    # From the install, not from the repository's editable install.
    for file in proc.stdout.split():
        assert Path(file).is_relative_to(installed), proc.stdout
