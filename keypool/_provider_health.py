"""The provider's own breaker: endpoint failures across keys seen as one outage.

A 503 or a timeout is almost always the server's, not the key's. Each key keeps the runbook's
breaker, but a provider whose keys share one endpoint also has this view: consecutive endpoint
failures (5xx, 408, timeouts, resets, broken streams) across its keys, with no success in between,
open it once there are ``failure_threshold`` of them from more than half of its keys (at most
``failure_threshold`` different keys; the one key, for a provider with a single key). While it is
open no key of the provider is tried; when its timeout passes, at most ``half_open_max_calls``
trial calls run for the provider as a whole, and ``success_threshold`` successes close it again.
Failures that a few keys show while their siblings succeed never get that far: any success resets
the count, and a run on fewer keys does not open it, so they stay those keys'.

It is a :class:`~keypool.CircuitBreaker` with the provider's breaker settings, fed only endpoint
failures and successes; key-scope outcomes (429, 401/403, 402) and caller errors move nothing.
The pool holds the lock around every call here.
"""

from __future__ import annotations

from collections.abc import Callable

from ._breaker import BreakerState, CircuitBreaker, OpenReason, Permit
from ._config import BreakerConfig
from ._outcome import OutcomeKind

__all__ = ["ProviderHealth"]


class ProviderHealth:
    """One provider's view of its endpoint (see the module docstring)."""

    __slots__ = ("_closed", "breaker", "enabled", "failing_keys")

    def __init__(
        self, config: BreakerConfig, *, clock: Callable[[], float], rng: Callable[[], float], enabled: bool
    ) -> None:
        self.breaker = CircuitBreaker(config, clock=clock, rng=rng)
        self.enabled = enabled  # off for providers whose keys are separate endpoints (MCP replicas)
        self.failing_keys: set[str] = set()
        self._closed: Permit | None = None  # the permit of a plainly closed provider, reused

    def admit(self) -> Permit | None:
        """A permit for one call to the provider, or ``None`` while it is out (or its trials are
        all taken)."""
        if not self.enabled:
            return _ALWAYS
        b = self.breaker
        if b.plainly_closed():  # the common case, kept cheap: one permit serves every call
            closed = self._closed
            if closed is None or closed.generation != b.generation:
                closed = self._closed = Permit(b.generation, trial=False)
            return closed
        return b.try_acquire()

    def record(self, permit: Permit, kind: OutcomeKind, key_id: str, live_keys: int) -> bool:
        """Feed one call's outcome; ``True`` if the provider's state changed."""
        if permit is _ALWAYS:
            return False
        b = self.breaker
        before = b.state()
        if kind is OutcomeKind.SUCCESS:
            if not (b.failure_count or permit.trial or self.failing_keys):
                return False  # a healthy provider's success costs nothing more
            self.failing_keys.clear()
            b.record_success(permit)
        elif kind is OutcomeKind.FAILURE:
            self.failing_keys.add(key_id)
            need = _keys_needed(live_keys, b.config.failure_threshold)
            closed = before is BreakerState.CLOSED
            if closed and b.failure_count + 1 >= b.config.failure_threshold and len(self.failing_keys) < need:
                b.release(permit)  # one key failing alone: that key's breaker answers for it
            else:
                b.record_failure(permit)
        elif permit.trial:
            b.release(permit)  # a trial that decided nothing gives its slot back
        else:
            return False
        return b.state() is not before

    def update_config(self, config: BreakerConfig) -> None:
        self.breaker.update_config(config)

    def reset(self) -> None:
        self.failing_keys.clear()
        self.breaker.reset()

    @property
    def state(self) -> BreakerState:
        return self.breaker.state() if self.enabled else BreakerState.CLOSED

    def admits_at(self, now: float) -> float | None:
        return self.breaker.admits_at(now) if self.enabled else now

    def trial_slots_full(self, now: float) -> bool:
        return self.enabled and self.breaker.trial_slots_full(now)

    def trial_ready(self, now: float) -> bool:
        """Half-open with a trial slot free: a call now would be one of the provider's trials."""
        b = self.breaker
        return self.enabled and b.state(now) is BreakerState.HALF_OPEN and b.can_admit(now)

    @property
    def open_reason(self) -> OpenReason | None:
        return self.breaker.snapshot().open_reason


def _keys_needed(live_keys: int, threshold: int) -> int:
    """How many different keys a run of endpoint failures must span to be the provider's: more
    than half of them, and no more than ``failure_threshold`` (so a large pool is still seen as
    out after about that many failures). A few dead keys failing side by side under concurrent
    calls, while their siblings' successes are still on the way, then stay those keys'."""
    return max(1, min(live_keys // 2 + 1, threshold))


_ALWAYS = Permit(generation=-1, trial=False)  # the permit of a provider without this view
