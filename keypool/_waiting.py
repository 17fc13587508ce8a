"""Callers waiting for a key: a first-come, first-served queue per provider, like a connection pool.

When no key can take a call, the pool tells two cases apart (see :func:`plan`):

* *busy*: some key frees up when a call in flight ends (its ``max_concurrency``, the failing-key
  limit, probation, or half-open with every trial slot taken). The caller joins the provider's
  queue and is handed a lease, in arrival order, the moment one frees up, inside its deadline.
* *down*: nothing serves until a timer (open timeout, Retry-After, a recheck) or an operator
  changes something. The caller waits only if the soonest recovery falls within ``max_wait`` and
  its deadline, and is refused at once otherwise, with the reason and when to retry.

The queue is served under the pool's lock by direct hand-off: whoever frees a slot (a recorded
outcome, a reset, a timer noticed) gives the lease to the first waiter that can take it and wakes
it, so a woken waiter never has to race newcomers for its key. A waiter is woken thread-safely
from whichever thread or event loop freed the slot.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ._policy import SHORTEST_FIRST_BACKOFF

if TYPE_CHECKING:
    from ._clock import Clock
    from ._keys import KeyState, ProviderState
    from ._lease import Lease

__all__ = ["Plan", "Waiter", "plan", "wait_async", "wait_sync"]


class Waiter:
    """One caller in a provider's queue: the keys it will not take, and the lease it was handed."""

    __slots__ = ("_event", "_native", "_run_soon", "_thread", "exclude", "gone", "lease", "queued", "sync")

    def __init__(self, exclude: frozenset[str], *, sync: bool) -> None:
        self.exclude = exclude
        self.sync = sync
        self.lease: Lease | None = None
        self.queued = False  # in the provider's queue (its place is kept while it waits again)
        self.gone = False  # left the queue (served, refused, timed out or cancelled)
        self._thread = threading.get_ident()
        self._event: threading.Event | anyio.Event | None = None
        self._run_soon: Callable[..., Any] | None = None
        self._native: object = None
        if not sync:
            token = anyio.lowlevel.current_token()
            self._run_soon = token.backend_class.run_sync_soon
            self._native = token.native_token

    def arm(self) -> None:
        """A fresh signal for the next wait (under the pool's lock, by the waiter's own thread)."""
        self._event = threading.Event() if self.sync else anyio.Event()

    def wake(self) -> None:
        """Wake the waiter from any thread; idempotent."""
        event = self._event
        if event is None or event.is_set():
            return
        if isinstance(event, threading.Event) or threading.get_ident() == self._thread:
            event.set()
        elif self._run_soon is not None:  # another thread: set it on the waiter's own event loop
            self._run_soon(event.set, (), self._native)

    def woken(self) -> bool:
        return self._event is not None and self._event.is_set()

    async def _wait_async(self, timeout: float | None) -> None:
        event = self._event
        assert isinstance(event, anyio.Event)
        with anyio.move_on_after(timeout):
            await event.wait()

    def _wait_sync(self, timeout: float | None) -> None:
        event = self._event
        assert isinstance(event, threading.Event)
        event.wait(timeout)


async def wait_async(clock: Clock, waiter: Waiter, timeout: float | None, *, timer: bool) -> None:
    """Wait until the waiter is woken or ``timeout`` seconds pass on ``clock``.

    ``timer`` says the wait is for a timed recovery alone (nothing is busy): a clock that runs
    time by hand (``keypool.testing.FakeClock``) then jumps to it, as its ``sleep`` does; a busy
    wait ends only when woken or when that clock is advanced past the timeout.
    """
    hook = getattr(clock, "wait_event", None)
    if hook is not None:
        await hook(waiter, timeout, timer)
        return
    await waiter._wait_async(timeout)


def wait_sync(clock: Clock, waiter: Waiter, timeout: float | None, *, timer: bool) -> None:
    """:func:`wait_async` for threads."""
    hook = getattr(clock, "wait_event_sync", None)
    if hook is not None:
        hook(waiter, timeout, timer)
        return
    waiter._wait_sync(timeout)


@dataclass(frozen=True, slots=True)
class Plan:
    """What a caller that found no key should do: wait until ``until`` or be refused.

    ``timer`` is true when the wait is for a timed recovery only (no key is merely busy).
    A refusal carries ``reason`` (why no key can serve) and ``retry_after`` (seconds, or ``None``
    when no key comes back by itself).
    """

    wait: bool
    until: float | None = None
    timer: bool = False
    reason: str = ""
    retry_after: float | None = None


def busy_count(prov: ProviderState, exclude: frozenset[str]) -> int:
    """Keys a caller excluding ``exclude`` could get once a call in flight ends (O(excluded))."""
    tiers = prov.serving_tiers()
    count = sum(t.busy for t in tiers)
    for key_id in exclude:
        key = prov.keys.get(key_id)
        if key is not None and key.busy and key.tier in tiers:
            count -= 1
    return count


def soonest_timer(prov: ProviderState, exclude: frozenset[str]) -> tuple[float, KeyState] | None:
    """The soonest live timed wake-up of a serving key not in ``exclude``.

    A best-first walk of the heap's array visits only the entries that come before the answer
    (stale ones, excluded keys), so a refusal never scans the whole heap.
    """
    prov.next_wake()  # drop stale entries at the top
    heap = prov.heap
    if not heap:
        return None
    tiers = prov.serving_tiers()
    frontier: list[tuple[float, int, int]] = [(heap[0][0], heap[0][1], 0)]
    while frontier:
        at, _, index = heapq.heappop(frontier)
        key = heap[index][2]
        if at == key.scheduled_at and key.id not in exclude and not key.removed and key.tier in tiers:
            return at, key
        for child in (2 * index + 1, 2 * index + 2):
            if child < len(heap):
                heapq.heappush(frontier, (heap[child][0], heap[child][1], child))
    return None


def _down_reason(prov: ProviderState) -> str:
    """Why a provider with no timed recovery cannot serve: its most common quarantine, if any."""
    kinds: dict[str, int] = {}
    for tier in prov.serving_tiers():
        for kind, n in tier.quarantine_kinds.items():
            kinds[kind] = kinds.get(kind, 0) + n
    kinds = {k: n for k, n in kinds.items() if n > 0}
    if not kinds:
        return "no_keys"
    return max(sorted(kinds), key=lambda k: kinds[k])


def plan(
    prov: ProviderState,
    now: float,
    exclude: frozenset[str],
    deadline: float | None,
    max_wait: float,
    contested: bool = False,
) -> Plan:
    """Busy or down, and what follows for the caller (no key could be leased just now)."""
    health = prov.health
    if health.enabled and not health.breaker.can_admit(now):
        # The provider itself is out: its trial calls are all running (busy), or its own timer
        # decides when any key is tried again (down).
        if health.trial_slots_full(now):
            return _busy(now, deadline, health.admits_at(now))
        at = health.admits_at(now)
        assert at is not None  # a provider's breaker is never quarantined
        return _timed(now, at, deadline, max_wait, "open")
    timer = soonest_timer(prov, exclude)
    busy = contested or busy_count(prov, exclude) > 0
    if busy:
        return _busy(now, deadline, None if timer is None else timer[0])
    if timer is not None:
        at, key = timer
        reason = key.refusal_kind(now)
        if reason == "throttled" and key.breaker.throttle_guessed:
            # A 429 without Retry-After: its end is only default_retry_after, a guess. The plain
            # client would retry after its first backoff; waiting longer is never better.
            max_wait = min(max_wait, SHORTEST_FIRST_BACKOFF)
        return _timed(now, at, deadline, max_wait, reason)
    return Plan(False, reason=_down_reason(prov), retry_after=None)


def _busy(now: float, deadline: float | None, timer: float | None) -> Plan:
    """Wait in the queue until a key is handed over, the deadline, or ``timer`` (if sooner)."""
    if deadline is not None and now >= deadline:
        return Plan(False, reason="busy", retry_after=0.0 if timer is None else max(0.0, timer - now))
    until = deadline
    if timer is not None and (until is None or timer < until):
        until = timer
    return Plan(True, until=until, timer=False)


def _timed(now: float, at: float, deadline: float | None, max_wait: float, reason: str) -> Plan:
    """Down until ``at``: wait for it if it is within ``max_wait`` and the deadline, else refuse."""
    wait = max(0.0, at - now)
    if wait <= max_wait and (deadline is None or at <= deadline):
        return Plan(True, until=at, timer=True)
    return Plan(False, reason=reason, retry_after=wait)
