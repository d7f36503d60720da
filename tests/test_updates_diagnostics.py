"""The reads-under-updates measurement's diagnostics (loadtests/updates.py): the share of
a window the node's main thread ran and waited for a core, read from the kernel."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# loadtests/ is a folder of the repository, not an installed package.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests.updates import _main_thread_times, _Window  # noqa: E402


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_the_main_threads_running_share_follows_what_it_does() -> None:
    run0, wait0 = _main_thread_times(os.getpid())
    window = _Window(os.getpid())
    _spin(0.3)
    busy = window.end()
    window = _Window(os.getpid())
    time.sleep(0.3)
    idle = window.end()
    run1, wait1 = _main_thread_times(os.getpid())
    assert run1 > run0 and wait1 >= wait0
    # Spinning, the thread runs or waits for a core the whole window; asleep, neither.
    assert busy["node_main_thread_running"] + busy["node_main_thread_waiting_for_a_core"] > 0.8
    assert idle["node_main_thread_running"] < 0.2
    assert busy["machine_busy_cores"] > 0.5


def test_a_process_without_schedstat_reads_as_zero() -> None:
    assert _main_thread_times(2**22 + 12345) == (0.0, 0.0)
