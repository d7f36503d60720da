"""Writes in flight take turns on the event loop: at most one write step a pass.

The servicer's ``_drive`` runs a write's steps (kvstore.server.writes); these drive it
with step generators on a real event loop and count the loop's passes with a task that
yields once a pass, so "two steps in one pass" (what a read arriving meanwhile waits
for) is observed, not inferred from timings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import uvloop

from kvstore.server.servicer import _drive


class _Passes:
    """Counts the event loop's passes: a task that adds one and yields, again and again."""

    def __init__(self) -> None:
        self.count = 0
        self._stop = False
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> _Passes:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)
        return self

    async def _run(self) -> None:
        while not self._stop:
            self.count += 1
            await asyncio.sleep(0)

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        assert self._task is not None
        await self._task


def _run(main: Any) -> Any:
    """``main()`` on uvloop, the node's loop."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def test_writes_in_flight_run_one_step_a_pass_of_the_loop_in_turn() -> None:
    ran: list[tuple[str, int]] = []

    async def main() -> list[int]:
        async with _Passes() as passes:

            def steps(name: str, n: int) -> Generator[None, None, int]:
                for _ in range(n):
                    ran.append((name, passes.count))
                    yield
                return n

            turn = asyncio.Lock()
            return await asyncio.gather(*(_drive(steps(w, 6), turn) for w in "abc"))

    assert _run(main) == [6, 6, 6]
    at = [p for _, p in ran]
    assert len(set(at)) == len(at), f"two write steps in one pass of the loop: {ran}"
    # Turns go round: each write's steps interleave with the others', in order.
    assert [w for w, _ in ran[:6]] == list("abcabc")


def test_a_write_waiting_for_a_sealed_shard_lets_the_others_take_their_turns() -> None:
    # Write a waits for a future that only write b's second step resolves: had a kept
    # the turn while it waited, b could never run (the wait_for would time out).
    async def main() -> list[int]:
        sealed = asyncio.get_running_loop().create_future()
        order = []

        def a() -> Generator[Any, None, int]:
            yield sealed
            order.append("a")
            yield
            return 1

        def b() -> Generator[None, None, int]:
            yield
            sealed.set_result(None)
            order.append("b")
            yield
            return 2

        turn = asyncio.Lock()
        got = await asyncio.wait_for(asyncio.gather(_drive(a(), turn), _drive(b(), turn)), 5)
        assert order == ["b", "a"]
        return got

    assert _run(main) == [1, 2]
