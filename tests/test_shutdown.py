"""Stop signals: the first requests a graceful stop, the second hurries it, and the
handlers that were there before come back.

Real signals sent to this process, on the asyncio loop and on uvloop (the node's).
The processes that use it are tested in test_server_lifecycle.py (the node) and
test_stream_consumers.py (``kvstore consume``).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator

import pytest
import uvloop

from kvstore.shutdown import SIGNALS, Shutdown

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
