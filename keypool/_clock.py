"""Time as the pool sees it: a monotonic clock and a matching sleep, injectable for tests."""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

import anyio

__all__ = ["Clock", "MonotonicClock"]


@runtime_checkable
class Clock(Protocol):
    """A monotonic time source (seconds) with sleeps that follow it.

    Breakers only read :meth:`now`; the pool sleeps through :meth:`sleep` / :meth:`sleep_sync` when
    it waits for a key to recover, so a fake clock makes waiting instantaneous and deterministic.
    """

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    def sleep_sync(self, seconds: float) -> None: ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` and real sleeps."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)

    def sleep_sync(self, seconds: float) -> None:
        time.sleep(seconds)

    def __repr__(self) -> str:
        return "MonotonicClock()"
