"""Stopping a process on SIGINT / SIGTERM in two steps: the node and ``kvstore consume``.

The first signal asks for a graceful stop: the node drains its in-flight calls within
its grace period, the consumer finishes the batch in hand. A second signal (either
one) asks to hurry: the waits are cut short, but what must be closed is still closed
(the node's databases are flushed), never skipped with ``os._exit``. While captured,
the signals land on the running event loop; the handlers that were there before are
put back on exit. The model is uvicorn's ``Server.capture_signals``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

__all__ = ["SIGNALS", "Shutdown"]

logger = logging.getLogger(__name__)

#: The signals that stop a process: Ctrl-C and what supervisors send.
SIGNALS = (signal.SIGINT, signal.SIGTERM)


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

    async def finished_unhurried(self, task: asyncio.Future) -> bool:
        """Wait for ``task``, or for the second signal: True when ``task`` is done.

        ``task`` is neither cancelled nor awaited: the caller decides how to cut it short.
        """
        hurried = asyncio.ensure_future(self.hurried.wait())
        try:
            await asyncio.wait({task, hurried}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurried.cancel()
        return task.done()
