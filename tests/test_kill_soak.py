"""Issue 16's kill -9 fault, counted over kills in a row (loadtests/kill_soak.py, ``make
soak``) at a small size: 3 node processes on a real etcd, a table with 2 replicas per
shard, reader and writer processes; each round kills a node with SIGKILL, restarts it
and waits until it has caught up. No read may fail, no acknowledged row may be missing
or older on any Available replica afterwards. The counts, never a timing."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

# loadtests/ is a folder of the repository, not an installed package.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests.kill_soak import SoakSettings, render_soak, run_soak  # noqa: E402

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None, reason="etcd is not installed (make test installs it)"
)


def test_two_kills_in_a_row_fail_no_read_and_lose_no_acked_write(tmp_path: Path) -> None:
    s = SoakSettings(kills=2, readers=2, writers=2, rows=2000, shards=6, idle_s=1.0)
    res = run_soak(s, tmp_path, progress=None)
    text = render_soak(res)
    assert [r["node"] for r in res["rounds"]] == ["n1", "n2"], text
    assert res["kills"] == 2 and res["reads"] > 0 and res["acked_writes"] > 0, text
    assert res["failed_reads"] == 0, text
    # Every shard read on both its replicas: the check saw the whole table.
    check = res["check"]
    assert check["replicas_checked"] == 2 * s.shards and not check["unread_shards"], text
    assert 0 < res["acked_rows"] <= s.rows, text
    assert res["lost_rows"] == 0 and res["ok"], text
