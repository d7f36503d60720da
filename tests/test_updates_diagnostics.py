"""The reads-under-updates measurement's diagnostics (loadtests/updates.py): the share of
a window the node's main thread and the reader ran and waited for a core, read from the
kernel."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# loadtests/ is a folder of the repository, not an installed package.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import multiprocessing as mp  # noqa: E402

import pytest  # noqa: E402

from loadtests.updates import _main_thread_times, _this_thread_times, _Window  # noqa: E402


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


def _spin_on(cpu: int, seconds: float) -> None:
    os.sched_setaffinity(0, {cpu})
    _spin(seconds)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_the_readers_waiting_share_shows_a_process_that_takes_its_core() -> None:
    # The reader (this thread) and a spinning process on one core: the reader runs
    # about half the window and waits for the core the other half.
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        window = _Window(os.getpid())
        _spin(0.3)
        alone = window.end()
        hog = mp.get_context("fork").Process(target=_spin_on, args=(cpu, 1.5))
        hog.start()
        time.sleep(0.1)
        window = _Window(os.getpid())
        _spin(0.6)
        shared = window.end()
        hog.join()
    finally:
        os.sched_setaffinity(0, before)
    assert alone["reader_running"] + alone["reader_waiting_for_a_core"] > 0.8
    assert shared["reader_waiting_for_a_core"] > 0.25
    assert shared["reader_waiting_for_a_core"] > alone["reader_waiting_for_a_core"] + 0.15
    run, wait = _this_thread_times()
    assert run > 0.5 and wait > 0.1
