"""Stopping a process on SIGINT / SIGTERM in two steps: the node and ``kvstore consume``.

The first signal asks for a graceful stop: the node drains its in-flight calls within
its grace period, the consumer finishes the batch in hand. A second signal (either
one) asks to hurry: the waits are cut short, but what must be closed is still closed
(the node's databases are flushed), never skipped with ``os._exit``. While captured,
the signals land on the running event loop; the handlers that were there before are
put back on exit. The model is uvicorn's ``Server.capture_signals``.

Every step of a stop is bounded, whatever the services it waits on do (an etcd down,
just back or hanging): ``within`` gives a step a deadline and logs the step that ran
over, ``cancel_and_wait`` ends tasks and cancels again a task that went on after its
cancellation, and ``cancel_requested`` lets a retry loop see a cancellation that a
library swallowed. On Python 3.11 ``asyncio.wait_for`` drops a cancellation that lands
as the awaited work completes (CPython gh-86296); aetcd creates every watch that way,
so a node stopping while a watch was being made went on watching, and its stop waited
for that task forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Awaitable, Collection, Iterator
from typing import Any

__all__ = ["SIGNALS", "Shutdown", "cancel_and_wait", "cancel_requested", "within"]

logger = logging.getLogger(__name__)

#: The signals that stop a process: Ctrl-C and what supervisors send.
SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: How long a cancelled task may take to end before it is cancelled again (s): longer
#: than a cleanup that awaits (a watch cancelled on etcd), short enough that a lost
#: cancellation costs a fraction of a step's deadline.
RECANCEL_AFTER_S = 0.5
#: How long a step that ran over its deadline may take to end once cancelled (s).
CANCEL_TIMEOUT_S = 1.0


class Shutdown:
    """The stop requests of one process: ``requested`` on the first signal, ``hurried``
    on the second.

    ``graceful`` and ``hurry`` are logged when each step begins (after the signal's
    name); ``graceful=None`` logs nothing, for a caller that says it in its own words.
    """

    def __init__(self, graceful: str | None, hurry: str) -> None:
        self.requested = asyncio.Event()
        self.hurried = asyncio.Event()
        #: Every signal received, in order.
        self.received: list[signal.Signals] = []
        self._graceful = graceful
        self._hurry = hurry

    def handle(self, sig: int) -> None:
        """A signal arrived: the first requests the stop, the next ones hurry it."""
        sig = signal.Signals(sig)
        self.received.append(sig)
        if not self.requested.is_set():
            if self._graceful is not None:
                logger.info("%s: %s", sig.name, self._graceful)
            self.requested.set()
        elif not self.hurried.is_set():
            logger.warning("second signal (%s): %s", sig.name, self._hurry)
            self.hurried.set()

    @contextlib.contextmanager
    def capture(self) -> Iterator[Shutdown]:
        """Route SIGINT and SIGTERM to ``handle`` while inside; restore the previous handlers.

        Call from a coroutine on the running loop. Off the main thread (where signals
        cannot be caught) it captures nothing, like uvicorn.
        """
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        loop = asyncio.get_running_loop()
        # The loop's own handlers wake it at once (its wakeup fd); getsignal keeps what
        # was there, because remove_signal_handler would put back the default instead.
        previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self.handle, sig)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                if handler is not None:  # None: installed outside Python, nothing to restore
                    signal.signal(sig, handler)

    async def finished_unhurried(
        self, task: asyncio.Future, timeout_s: float | None = None
    ) -> bool:
        """Wait for ``task``, or for the second signal, or ``timeout_s`` s (None: no
        limit): True when ``task`` is done.

        ``task`` is neither cancelled nor awaited: the caller decides how to cut it short.
        """
        hurried = asyncio.ensure_future(self.hurried.wait())
        try:
            await asyncio.wait(
                {task, hurried}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            hurried.cancel()
        return task.done()

    async def step(self, what: str, work: Awaitable[object], timeout_s: float) -> bool:
        """``within(what, work, timeout_s)``, cut short by the second signal too."""
        return await within(what, work, timeout_s, cut_short=self.hurried)


def cancel_requested() -> bool:
    """Whether the running task has been asked to cancel and has not ended: true after a
    library swallowed the CancelledError (the request count stays up, CPython keeps it
    for ``Task.cancelling``), so a loop that checks it ends as it was asked to."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def cancel_and_wait(tasks: Collection[asyncio.Future], timeout_s: float, what: str) -> bool:
    """Cancel ``tasks`` and wait at most ``timeout_s`` s for them to end; True when all did.

    A task still running after RECANCEL_AFTER_S s is cancelled again: its cancellation
    may have been swallowed (this module's docstring), and the next one reaches it where
    it waits now. Tasks still running at the deadline are logged (``what``, and where
    each one waits) and left behind; errors of the tasks that ended are not raised.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_AFTER_S, left))
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: asyncio does not log it as never retrieved
    if pending:
        logger.warning(
            "%s: %d task(s) did not end within %g s of being cancelled; left running: %s",
            what,
            len(pending),
            timeout_s,
            "; ".join(_where(task) for task in pending),
        )
        return False
    return True


async def within(
    what: str,
    work: Awaitable[object],
    timeout_s: float,
    cut_short: asyncio.Event | None = None,
) -> bool:
    """Await ``work`` (one step of a stop) for at most ``timeout_s`` s, or until
    ``cut_short`` is set; True when it finished.

    A step that runs over is logged naming ``what`` and cancelled (``cancel_and_wait``,
    CANCEL_TIMEOUT_S s); a step that fails is logged with its error. Either way the
    caller goes on: what comes after it (the databases closed) must still happen.
    """
    task = asyncio.ensure_future(work)
    waits: set[asyncio.Future] = {task}
    if cut_short is not None:
        waits.add(asyncio.ensure_future(cut_short.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        for waiting in waits - {task}:
            waiting.cancel()
    if not task.done():
        if cut_short is not None and cut_short.is_set():
            logger.warning("stopping: %s cut short by the second signal", what)
        else:
            logger.warning(
                "stopping: %s did not finish within %g s; going on without it", what, timeout_s
            )
        await cancel_and_wait([task], CANCEL_TIMEOUT_S, what)
        return False
    if task.cancelled():
        logger.warning("stopping: %s was cancelled", what)
        return False
    error = task.exception()
    if error is not None:
        logger.error("stopping: %s failed: %s: %s", what, type(error).__name__, error)
        return False
    return True


def _where(task: asyncio.Future) -> str:
    """A task's name and the coroutines it waits in, outermost first, for a log line."""
    if not isinstance(task, asyncio.Task):
        return repr(task)
    frames = []
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            code = frame.f_code
            frames.append(
                f"{code.co_name} ({code.co_filename.rpartition('/')[2]}:{frame.f_lineno})"
            )
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return f"{task.get_name()} at {' > '.join(frames) or '?'}"
