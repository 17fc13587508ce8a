"""HealthMonitor: probe every key and tool server on an interval, through their breakers.

Before each probe the breaker is consulted: an open key is not contacted until its breaker would
admit a trial (the skip is counted as a ``probe_skipped`` rejection), and every probe's outcome
moves the same breaker as real traffic. A key that recovers is therefore closed again within its
open timeout plus one interval, without waiting for user traffic to find out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from types import TracebackType
from typing import Protocol, Self

import anyio
from anyio.abc import TaskGroup

from keypool import Clock, ConfigError, MonotonicClock

from ._health import HealthReport

__all__ = ["Checkable", "HealthMonitor"]

log = logging.getLogger("keypool.monitor")


class Checkable(Protocol):
    """Anything with ``await health_check()`` (pooled clients, ``MCPClient``)."""

    async def health_check(self) -> HealthReport: ...


class HealthMonitor:
    """Runs rounds of health checks in the background while its ``async with`` block is open.

    ``clock`` times the interval (inject a fake one in tests). A target whose check raises is
    logged and tried again next round; the monitor never dies of one bad target.
    """

    def __init__(
        self, targets: Iterable[Checkable], *, interval: float = 15.0, clock: Clock | None = None
    ) -> None:
        if interval <= 0:
            raise ConfigError(f"interval: must be > 0 seconds (got {interval})")
        self.targets = list(targets)
        self.interval = interval
        self.clock = clock or MonotonicClock()
        self.rounds = 0
        self.last: list[HealthReport] = []
        self.errors = 0
        self._group: TaskGroup | None = None

    @property
    def skipped(self) -> int:
        """Probes skipped in the last round because a breaker refused them."""
        return sum(r.skipped for r in self.last)

    async def run_once(self) -> list[HealthReport]:
        """One round over every target; returns their reports."""
        reports = []
        for target in self.targets:
            try:
                reports.append(await target.health_check())
            except Exception:
                self.errors += 1
                log.exception("health check of %r failed", target)
        self.rounds += 1
        self.last = reports
        return reports

    async def run(self) -> None:
        """Rounds forever, ``interval`` apart (until cancelled)."""
        while True:
            await self.run_once()
            await self.clock.sleep(self.interval)

    async def __aenter__(self) -> Self:
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._group.start_soon(self.run)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._group is not None
        group, self._group = self._group, None
        group.cancel_scope.cancel()
        if isinstance(exc, Exception):  # the caller's own error propagates as is, not in a group
            et = exc = tb = None
        await group.__aexit__(et, exc, tb)
