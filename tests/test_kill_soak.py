"""Issue 16's kill -9 fault, counted over kills in a row (loadtests/kill_soak.py, ``make
soak``) at a small size: 3 node processes on a real etcd, a table with 2 replicas per
shard, reader and writer processes; each round kills a node with SIGKILL, restarts it
and waits until it has caught up. No read may fail, no acknowledged row may be missing
or older on any Available replica afterwards. The counts, never a timing."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

# loadtests/ is a folder of the repository, not an installed package.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvstore import Client  # noqa: E402
from loadtests.kill_soak import (  # noqa: E402
    TABLE,
    SoakSettings,
    _create_table,
    _wrong_answer,
    check_acked_rows,
    render_soak,
    run_soak,
)
from loadtests.servers import running_cluster  # noqa: E402

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


def test_the_soak_s_checks_find_a_row_older_than_acked_and_a_wrong_answer(
    tmp_path: Path,
) -> None:
    """What the soak's verdict rests on can fail: every row is written with clicks 0, so
    a check that they were acked at version 0 finds none lost, at version 1 all of them
    (on both replicas of every shard); a read answer with a wrong score or a missing key
    is named."""
    s = SoakSettings(rows=200, shards=4)
    keys = np.arange(s.rows, dtype=np.int64)
    with running_cluster(tmp_path, 3) as cluster:
        address = next(iter(cluster.nodes.values())).address
        _create_table(address, s)
        held = check_acked_rows(address, TABLE, keys, np.zeros(s.rows, np.int64))
        assert held["lost_rows"] == 0 and held["replicas_checked"] == 2 * s.shards, held
        ahead = check_acked_rows(address, TABLE, keys, np.ones(s.rows, np.int64))
        assert ahead["lost_rows"] == s.rows, ahead
        with Client(address, timeout=30) as client:
            assert _wrong_answer(client.get(TABLE, keys[:10]), keys[:10]) == ""
            assert "score" in _wrong_answer(client.get(TABLE, keys[:10]), keys[1:11])
            missing = np.array([1, 10**9], np.int64)
            assert "not found" in _wrong_answer(client.get(TABLE, missing), missing)
