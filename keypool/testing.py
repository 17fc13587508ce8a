"""Helpers for testing code that uses keypool: a fake clock, a fault-injecting OpenAI-compatible
upstream (an ASGI app), and a server that runs any ASGI app on a loopback port (needs uvicorn, the
``testing`` extra).
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._fake_upstream import FakeUpstream, Fault, KeyCounters
from ._loopback import DropConnection, LoopbackServer, serve_asgi

if TYPE_CHECKING:
    from ._waiting import Waiter

__all__ = [
    "DropConnection",
    "FakeClock",
    "FakeUpstream",
    "Fault",
    "KeyCounters",
    "LoopbackServer",
    "serve_asgi",
]


class FakeClock:
    """A manual clock: time moves only when told to, and sleeping advances it instantly.

    Pass it to :class:`~keypool.KeyPool` so breaker timeouts and Retry-After waits run in no real
    time. A caller the pool queues behind busy keys waits until another task frees a key, or until
    the clock is advanced past its deadline (:meth:`advance`, or anyone's :meth:`sleep`); a caller
    waiting only for a timed recovery jumps to it, as a sleep does. Thread-safe.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.slept: list[float] = []

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock cannot go back")
        with self._lock:
            self._now += seconds
            due = []
            while self._timers and self._timers[0][0] <= self._now:
                due.append(heapq.heappop(self._timers)[2])
        for wake in due:
            wake()

    async def sleep(self, seconds: float) -> None:
        import anyio

        self.slept.append(seconds)
        self.advance(seconds)
        await anyio.lowlevel.checkpoint()

    def sleep_sync(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)

    def _jump_to(self, target: float) -> None:
        """Sleep until ``target``: callers waiting for the same instant move time there once."""
        step = target - self._now
        if step > 0:
            self.slept.append(step)
            self.advance(step)

    def _at(self, timeout: float | None, wake: Callable[[], None]) -> None:
        if timeout is None:
            return
        with self._lock:
            self._seq += 1
            heapq.heappush(self._timers, (self._now + timeout, self._seq, wake))

    async def wait_event(self, waiter: Waiter, timeout: float | None, timer: bool) -> None:
        """How the pool waits on this clock (see :func:`keypool._waiting.wait_async`)."""
        import anyio

        if timer:  # nothing is busy: only time changes anything, so time jumps there
            target = None if timeout is None else self._now + timeout
            await anyio.lowlevel.checkpoint()
            if not waiter.woken() and target is not None:
                self._jump_to(target)
            return
        self._at(timeout, waiter.wake)
        await waiter._wait_async(None)

    def wait_event_sync(self, waiter: Waiter, timeout: float | None, timer: bool) -> None:
        if timer:
            if not waiter.woken() and timeout is not None:
                self._jump_to(self._now + timeout)
            return
        self._at(timeout, waiter.wake)
        waiter._wait_sync(None)

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now})"
