"""Stop signals: the first requests a graceful stop, the second hurries it, and the
handlers that were there before come back. Every step of a stop is bounded: a task
that dropped its cancellation is cancelled again, one that will not end is named and
left, a step that runs over its deadline is named and cut short.

Real signals sent to this process, on the asyncio loop and on uvloop (the node's).
The processes that use it are tested in test_server_lifecycle.py (the node) and
test_stream_consumers.py (``kvstore consume``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterator

import pytest
import uvloop

from kvstore.shutdown import SIGNALS, Shutdown, cancel_and_wait, cancel_requested, within

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture
def previous() -> Iterator[list[int]]:
    """A Python handler on SIGINT and SIGTERM for the test, recording what reaches it."""
    seen: list[int] = []
    saved = {sig: signal.signal(sig, lambda sig, _frame: seen.append(sig)) for sig in SIGNALS}
    yield seen
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("loop", LOOPS)
def test_first_signal_requests_the_stop_the_second_hurries_it(
    loop: str, previous: list[int]
) -> None:
    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}

    async def main() -> Shutdown:
        stopping = Shutdown(graceful="stopping", hurry="hurrying")
        with stopping.capture():
            signal.raise_signal(signal.SIGTERM)
            await asyncio.wait_for(stopping.requested.wait(), 5)
            assert not stopping.hurried.is_set()
            signal.raise_signal(signal.SIGINT)
            await asyncio.wait_for(stopping.hurried.wait(), 5)
            signal.raise_signal(signal.SIGINT)  # a third changes nothing more
            await asyncio.wait_for(_until(lambda: len(stopping.received) == 3), 5)
        return stopping

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        stopping = runner.run(main())
    assert stopping.received == [signal.SIGTERM, signal.SIGINT, signal.SIGINT]
    assert previous == []  # none reached the handlers outside

    assert {sig: signal.getsignal(sig) for sig in SIGNALS} == handlers
    signal.raise_signal(signal.SIGTERM)
    assert previous == [signal.SIGTERM]


@pytest.mark.parametrize("loop", LOOPS)
def test_finished_unhurried_waits_for_the_task_or_the_second_signal(
    loop: str, previous: list[int]
) -> None:
    async def main() -> tuple[bool, bool, bool]:
        stopping = Shutdown(graceful=None, hurry="hurrying")
        with stopping.capture():
            quick = asyncio.ensure_future(asyncio.sleep(0))
            finished = await stopping.finished_unhurried(quick)
            slow = asyncio.ensure_future(asyncio.sleep(60))
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # may arrive as one: both are pending
            await asyncio.wait_for(stopping.requested.wait(), 5)
            if not stopping.hurried.is_set():
                signal.raise_signal(signal.SIGINT)
            cut_short = not await asyncio.wait_for(stopping.finished_unhurried(slow), 5)
            left_running = not slow.done()
            slow.cancel()
        return finished, cut_short, left_running

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        assert runner.run(main()) == (True, True, True)
    assert previous == []


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def _drops_one_cancel(seen: list[bool]) -> None:
    """A task that, like aetcd's watch creation on Python 3.11, loses its first cancel."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(60)
    seen.append(cancel_requested())
    await asyncio.sleep(60)


async def _ends_only_when(allowed: asyncio.Event) -> None:
    """A task that drops every cancel until ``allowed`` is set."""
    while not allowed.is_set():
        with contextlib.suppress(asyncio.CancelledError):
            await allowed.wait()


def test_a_task_that_dropped_its_cancellation_is_cancelled_again() -> None:
    async def main() -> tuple[bool, list[bool], bool]:
        seen: list[bool] = []
        task = asyncio.create_task(_drops_one_cancel(seen))
        await asyncio.sleep(0)
        ended = await cancel_and_wait([task], 10, "the test task")
        return ended, seen, task.cancelled()

    assert asyncio.run(main()) == (True, [True], True)


def test_a_task_that_will_not_end_is_named_and_left_at_the_deadline(caplog) -> None:
    async def main() -> tuple[bool, float, bool]:
        allowed = asyncio.Event()
        task = asyncio.create_task(_ends_only_when(allowed), name="stubborn")
        await asyncio.sleep(0)
        started = asyncio.get_running_loop().time()
        ended = await cancel_and_wait([task], 1.2, "the test's tasks")
        took = asyncio.get_running_loop().time() - started
        running = not task.done()
        allowed.set()
        await task
        return ended, took, running

    with caplog.at_level(logging.WARNING, logger="kvstore.shutdown"):
        ended, took, running = asyncio.run(main())
    assert (ended, running) == (False, True)
    assert took < 10
    assert "the test's tasks: 1 task(s) did not end within 1.2 s" in caplog.text
    assert "stubborn at _ends_only_when (test_shutdown.py:" in caplog.text


def test_a_step_over_its_deadline_is_named_cut_short_and_the_stop_goes_on(caplog) -> None:
    async def main() -> tuple[bool, bool, bool, bool]:
        slow = asyncio.ensure_future(asyncio.sleep(60))
        over = await within("leaving the cluster", slow, 0.2)

        async def fails() -> None:
            raise OSError("etcd said no")

        failed = await within("revoking the lease", fails(), 5)
        quick = await within("closing", asyncio.sleep(0), 5)
        cut = asyncio.Event()
        cut.set()
        hurried = await within("draining", asyncio.sleep(60), 60, cut_short=cut)
        return over or not slow.cancelled(), failed, quick, hurried

    with caplog.at_level(logging.WARNING, logger="kvstore.shutdown"):
        assert asyncio.run(main()) == (False, False, True, False)
    assert "leaving the cluster did not finish within 0.2 s; going on without it" in caplog.text
    assert "revoking the lease failed: OSError: etcd said no" in caplog.text
    assert "draining cut short by the second signal" in caplog.text
