"""Helpers for testing code that uses keypool: a fake clock, a fault-injecting OpenAI-compatible
upstream (an ASGI app), and a server that runs any ASGI app on a loopback port (needs uvicorn, the
``testing`` extra).
"""

from __future__ import annotations

import threading

from ._fake_upstream import FakeUpstream, Fault, KeyCounters
from ._loopback import DropConnection, LoopbackServer, serve_asgi

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
