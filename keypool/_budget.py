"""One attempt budget and one deadline shared by every request made inside a ``with`` block.

A caller that fails over between providers (or makes several calls for one user request) opens a
:func:`request_budget`; every :class:`~keypool.KeyPoolTransport` request inside it draws attempts
from it and stops at its deadline, and it records which provider and key finally served. It lives
in a context variable, so it follows the task (or thread) that opened it and nothing else.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from ._clock import Clock, MonotonicClock
from ._errors import ConfigError

__all__ = ["RequestBudget", "current_budget", "request_budget"]


@dataclass
class RequestBudget:
    """Attempts left, the deadline (on ``clock``), and what was tried and what served."""

    attempts_left: int
    deadline: float | None
    clock: Clock
    tried: list[tuple[str, str]] = field(default_factory=list)
    served_by: tuple[str, str] | None = None
    fallback: bool = False  # the caller has another route: a failing provider is left at once
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def attempts_used(self) -> int:
        return len(self.tried)

    def remaining_time(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.clock.now()

    def exhausted(self) -> bool:
        left = self.remaining_time()
        return self.attempts_left <= 0 or (left is not None and left <= 0)

    def take(self, provider: str, key_id: str) -> bool:
        """Spend one attempt on ``key_id`` if one is left; atomic, so concurrent requests inside
        one budget never spend more than it holds."""
        with self._lock:
            if self.attempts_left <= 0:
                return False
            self.attempts_left -= 1
            self.tried.append((provider, key_id))
            return True


_current: ContextVar[RequestBudget | None] = ContextVar("keypool_request_budget", default=None)


def current_budget() -> RequestBudget | None:
    """The budget of the enclosing :func:`request_budget` block, if any."""
    return _current.get()


@contextmanager
def request_budget(
    *, attempts: int, timeout: float | None = None, clock: Clock | None = None, fallback: bool = False
) -> Iterator[RequestBudget]:
    """Share ``attempts`` and one deadline ``timeout`` seconds from now across the block's requests.

    ``fallback=True`` says the caller has another route to try: a request then leaves a provider
    that times out or fails twice in a row at once instead of retrying it key after key.
    """
    if attempts < 1:
        raise ConfigError(f"attempts: must be >= 1 (got {attempts})")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"timeout: must be > 0 seconds (got {timeout})")
    source = clock or MonotonicClock()
    budget = RequestBudget(
        attempts_left=attempts,
        deadline=None if timeout is None else source.now() + timeout,
        clock=source,
        fallback=fallback,
    )
    token = _current.set(budget)
    try:
        yield budget
    finally:
        _current.reset(token)
