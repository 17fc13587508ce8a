"""Helpers for testing code that uses keypool: a fake clock, and (with the ``testing`` extra) a
fault-injecting OpenAI-compatible upstream served on loopback.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["FakeClock"]


class FakeClock:
    """A manual clock: time moves only when told to, and sleeping advances it instantly.

    Pass it to :class:`~keypool.KeyPool` so breaker timeouts and Retry-After waits run in no real
    time. Thread-safe.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self.slept: list[float] = []

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock cannot go back")
        with self._lock:
            self._now += seconds

    async def sleep(self, seconds: float) -> None:
        import anyio

        self.slept.append(seconds)
        self.advance(seconds)
        await anyio.lowlevel.checkpoint()

    def sleep_sync(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now})"


def __getattr__(name: str) -> Any:
    # The upstream needs starlette/uvicorn (the ``testing`` extra): import it only when asked.
    if name in {"FakeUpstream", "Fault", "KeyCounters"}:
        from . import _fake_upstream

        return getattr(_fake_upstream, name)
    if name in {"LoopbackServer"}:
        from . import _loopback

        return getattr(_loopback, name)
    raise AttributeError(name)
