"""CircuitBreaker: a pure state machine per key, driven by an injected clock.

It does no I/O, never awaits and holds no lock: the pool serialises access to it and never holds
its own lock across a call to the network. Transitions are lazy: OPEN becomes HALF_OPEN when its
deadline passes, computed from the clock whenever the breaker is touched, and :meth:`state` is a
pure read. Transitions are recorded with the instant they really happened, even when they are only
noticed later, and handed out by :meth:`drain_transitions`.

Outcomes carry the :class:`Permit` that admitted the call. A permit from an earlier *generation*
(the breaker changed state since the call started) no longer moves the state: a late failure of a
call that started before a trip cannot re-open a breaker that has since begun to probe.
"""

from __future__ import annotations

import enum
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._config import BreakerConfig

__all__ = [
    "BreakerSnapshot",
    "BreakerState",
    "CircuitBreaker",
    "OpenReason",
    "Permit",
    "Transition",
]


class BreakerState(enum.IntEnum):
    """A breaker's state; the value is the ``circuit_breaker_state`` metric (0, 1, 2)."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2

    @property
    def label(self) -> str:
        """The lower-case name used in stats, metric labels and the admin API."""
        return self.name.lower()


class OpenReason(enum.StrEnum):
    """Why a key is out of service (snapshots report none once the breaker is closed again)."""

    FAILURES = "failures"  # failure_threshold consecutive failures
    TRIAL_FAILED = "trial_failed"  # a half-open trial failed
    THROTTLED = "throttled"  # 429: out until the Retry-After instant
    REJECTED = "rejected"  # 401/403: quarantined
    QUOTA = "quota"  # 402 / insufficient balance: quarantined
    MANUAL = "manual"  # an operator took it out


QUARANTINE_REASONS = frozenset({OpenReason.REJECTED, OpenReason.QUOTA, OpenReason.MANUAL})


@dataclass(frozen=True, slots=True)
class Permit:
    """The right to make one call; hand it back with exactly one outcome."""

    generation: int
    trial: bool
    token: int = 0


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of a breaker's effective state, stamped with when it happened."""

    old: BreakerState
    new: BreakerState
    at: float
    reason: str


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """Everything observable about a breaker at one instant (a pure read)."""

    state: BreakerState
    failure_count: int
    success_count: int
    trials_in_flight: int
    open_reason: OpenReason | None
    quarantined: bool
    throttled_until: float | None
    next_transition_at: float | None
    admits_at: float | None
    since: float
    trips: int
    total_successes: int
    total_failures: int


_tokens = itertools.count(1)


class CircuitBreaker:
    """One key's breaker with the runbook's semantics.

    CLOSED: calls flow; ``failure_threshold`` consecutive failures open it.
    OPEN: no calls until ``timeout`` (grown by ``backoff_multiplier`` per consecutive trip, capped
    by ``max_timeout``, plus jitter) has passed, then HALF_OPEN.
    HALF_OPEN: at most ``half_open_max_calls`` trials at once; ``success_threshold`` successes
    close it, any failure opens it again. A trial that never reports back frees its slot after
    ``probe_timeout``.
    Quarantine (rejected or exhausted keys) is OPEN with no automatic way back but :meth:`reset`,
    unless a re-verification is scheduled (:meth:`schedule_recheck`, for a provider-wide incident
    rather than a verdict on one key): from that instant the key is HALF_OPEN for one trial; its
    success closes the breaker, a refusal keeps the quarantine and schedules the next recheck.
    Throttling (429) lays OPEN over the state until the Retry-After instant; a later throttle may
    extend that instant, never shorten it.
    """

    __slots__ = (
        "_clock",
        "_config",
        "_failures",
        "_generation",
        "_open_reason",
        "_open_until",
        "_pending",
        "_quarantined",
        "_random",
        "_recheck_at",
        "_recheck_delay",
        "_recheck_streak",
        "_reported",
        "_reported_since",
        "_since",
        "_state",
        "_streak",
        "_successes",
        "_throttle_guessed",
        "_throttled_until",
        "_time_in",
        "_total_failures",
        "_total_successes",
        "_trials",
        "_trips",
    )

    def __init__(
        self,
        config: BreakerConfig | None = None,
        *,
        clock: Callable[[], float],
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._config = config or BreakerConfig()
        self._clock = clock
        self._random = rng
        now = clock()
        self._state = BreakerState.CLOSED
        self._since = now
        self._open_until = 0.0
        self._open_reason: OpenReason | None = None
        self._quarantined = False
        self._recheck_at = 0.0  # a quarantined key re-verified by one trial from here (0: never)
        self._recheck_delay = 0.0  # the first wait of the current recheck schedule
        self._recheck_streak = 0  # rechecks in a row that found the key still refused
        self._throttled_until = 0.0
        self._throttle_guessed = False  # the throttle's end is default_retry_after, not a header's
        self._failures = 0
        self._successes = 0
        self._trials: dict[int, float] = {}
        self._generation = 0
        self._streak = 0  # consecutive trips without a close in between
        self._trips = 0
        self._total_failures = 0
        self._total_successes = 0
        self._reported = BreakerState.CLOSED
        self._reported_since = now
        self._time_in = [0.0, 0.0, 0.0]
        self._pending: list[Transition] = []

    # ------------------------------------------------------------------ pure reads

    @property
    def config(self) -> BreakerConfig:
        return self._config

    @property
    def generation(self) -> int:
        """Bumped by every change of state: a permit from an older generation moves nothing."""
        return self._generation

    @property
    def failure_count(self) -> int:
        """Consecutive failures counted in the current CLOSED period."""
        return self._failures

    @property
    def quarantined(self) -> bool:
        return self._quarantined

    @property
    def open_reason(self) -> OpenReason | None:
        """Why the key is (or last was) out of service."""
        return self._open_reason

    @property
    def quarantine_reason(self) -> str | None:
        return self._open_reason.value if self._quarantined and self._open_reason else None

    def plainly_closed(self) -> bool:
        """Closed with nothing that time could change and nothing to report (a cheap check)."""
        return (
            self._state is BreakerState.CLOSED
            and not self._quarantined
            and not self._throttled_until
            and not self._pending
        )

    def tripped_until(self) -> float | None:
        """The open deadline while the breaker is tripped (open or half-open), else ``None``."""
        if self._state is BreakerState.CLOSED and not self._quarantined:
            return None
        return self._open_until

    @property
    def throttled_until(self) -> float:
        """The Retry-After instant of the last 429 (0.0 if never throttled); may be in the past."""
        return self._throttled_until

    def state(self, now: float | None = None) -> BreakerState:
        """The effective state at ``now`` (default: the clock's now). Changes nothing."""
        t = self._clock() if now is None else now
        if self._throttled_until > t:
            return BreakerState.OPEN
        if self._quarantined:
            return BreakerState.HALF_OPEN if self._recheck_due(t) else BreakerState.OPEN
        if self._state is BreakerState.OPEN and t >= self._open_until:
            return BreakerState.HALF_OPEN
        return self._state

    def _recheck_due(self, now: float) -> bool:
        return self._quarantined and 0.0 < self._recheck_at <= now

    @property
    def recheck_at(self) -> float | None:
        """When a quarantined key is next re-verified, if that is scheduled."""
        return self._recheck_at if self._quarantined and self._recheck_at else None

    def admits_at(self, now: float | None = None) -> float | None:
        """The earliest instant a call could be admitted (``now`` if it could be now).

        ``None`` means never by itself: the key is quarantined.
        """
        t = self._clock() if now is None else now
        if self._quarantined and not self._recheck_at:
            return None
        at = t
        if self._quarantined:
            at = max(at, self._recheck_at)
        elif self._state is BreakerState.OPEN:
            at = max(at, self._open_until)
        at = max(at, self._throttled_until)
        probing = self._state is BreakerState.HALF_OPEN or self._quarantined
        if probing and (self._state is not BreakerState.OPEN or self._quarantined):
            # Trial slots taken now stay taken until they end or expire, past a throttle too.
            live = sorted(exp for exp in self._trials.values() if exp > at)
            cap = self._trial_cap()
            if len(live) >= cap:
                at = live[len(live) - cap]
        return at

    def _trial_cap(self) -> int:
        """Trials at once: ``half_open_max_calls``, or one for a quarantined key's recheck."""
        return 1 if self._quarantined else self._config.half_open_max_calls

    def can_admit(self, now: float | None = None) -> bool:
        t = self._clock() if now is None else now
        return self.admits_at(t) == t

    def next_transition_at(self, now: float | None = None) -> float | None:
        """When the effective state will next change by the passing of time alone, if ever."""
        t = self._clock() if now is None else now
        if self._quarantined and not self._recheck_at:
            return None
        candidates = []
        if self._throttled_until > t:
            candidates.append(self._throttled_until)
        if self._quarantined:
            if self._recheck_at > t:
                candidates.append(self._recheck_at)
        elif self._state is BreakerState.OPEN and self._open_until > t:
            candidates.append(self._open_until)
        if not candidates:
            return None
        # While throttled over an open breaker, the visible state changes only when both passed.
        return max(candidates) if self._throttled_until > t else min(candidates)

    def trial_slots_full(self, now: float | None = None) -> bool:
        """Half-open with every trial slot held by a call in flight: busy, not down."""
        t = self._clock() if now is None else now
        if self.state(t) is not BreakerState.HALF_OPEN:
            return False
        return self.trials_in_flight(t) >= self._trial_cap()

    def trials_in_flight(self, now: float | None = None) -> int:
        t = self._clock() if now is None else now
        probing = self._state is BreakerState.HALF_OPEN or self._recheck_due(t)
        if self.state(t) is not BreakerState.HALF_OPEN or not probing:
            return 0
        return sum(1 for exp in self._trials.values() if exp > t)

    def snapshot(self, now: float | None = None) -> BreakerSnapshot:
        t = self._clock() if now is None else now
        state = self.state(t)
        lazily_half_open = self._state is BreakerState.OPEN and state is BreakerState.HALF_OPEN
        lazily_half_open = lazily_half_open and not self._recheck_due(t)
        return BreakerSnapshot(
            state=state,
            failure_count=self._failures,
            success_count=0 if lazily_half_open else self._successes,
            trials_in_flight=self.trials_in_flight(t),
            # Why the key is out; a closed key is out for no reason, whatever it last tripped on.
            open_reason=None if state is BreakerState.CLOSED else self._open_reason,
            quarantined=self._quarantined,
            throttled_until=self._throttled_until if self._throttled_until > t else None,
            next_transition_at=self.next_transition_at(t),
            admits_at=self.admits_at(t),
            since=self._reported_since if state is self._reported else self._lazy_since(t),
            trips=self._trips,
            total_successes=self._total_successes,
            total_failures=self._total_failures,
        )

    def time_in_states(self, now: float | None = None) -> tuple[float, float, float]:
        """Seconds spent in CLOSED, HALF_OPEN and OPEN so far (transitions noticed so far)."""
        t = self._clock() if now is None else now
        spent = list(self._time_in)
        spent[self._reported] += max(0.0, t - self._reported_since)
        return spent[0], spent[1], spent[2]

    def _lazy_since(self, now: float) -> float:
        """When the state that reading sees but no transition has noted yet began: the latest of
        the instants that time has passed (the open deadline, the recheck, the throttle's end)."""
        passed = [at for at in self._pending_instants() if at <= now]
        return max(passed) if passed else self._reported_since

    def _pending_instants(self) -> list[float]:
        out = []
        if self._quarantined:
            if self._recheck_at:
                out.append(self._recheck_at)
        elif self._state is BreakerState.OPEN:
            out.append(self._open_until)
        if self._throttled_until:
            out.append(self._throttled_until)
        return out

    # ------------------------------------------------------------------ transitions log

    def drain_transitions(self) -> list[Transition]:
        """Transitions noticed since the last call, oldest first."""
        pending, self._pending = self._pending, []
        return pending

    def poll(self) -> None:
        """Materialise transitions that time alone has caused (for observers, e.g. metrics)."""
        self._settle(self._clock())

    def _note(self, at: float, reason: str) -> None:
        now_state = self.state(at)
        if now_state is not self._reported:
            self._time_in[self._reported] += max(0.0, at - self._reported_since)
            self._pending.append(Transition(self._reported, now_state, at, reason))
            self._reported = now_state
            self._reported_since = at

    def _settle(self, now: float) -> None:
        """Apply what time has done: OPEN→HALF_OPEN, throttle expiry, expired trial slots."""
        while True:
            due: list[tuple[float, str]] = []
            if self._state is BreakerState.OPEN and not self._quarantined and self._open_until <= now:
                due.append((self._open_until, "open"))
            if self._state is BreakerState.OPEN and self._recheck_due(now):
                due.append((self._recheck_at, "recheck"))
            if self._throttled_until and self._throttled_until <= now:
                due.append((self._throttled_until, "throttle"))
            if not due:
                break
            at, what = min(due)
            if what == "open":
                self._state = BreakerState.HALF_OPEN
                self._since = at
                self._generation += 1
                self._successes = 0
                self._trials.clear()
                self._note(at, "timeout_elapsed")
            elif what == "recheck":
                self._state = BreakerState.HALF_OPEN  # still quarantined: one trial decides
                self._since = at
                self._generation += 1
                self._successes = 0
                self._trials.clear()
                self._note(at, "recheck_due")
            else:
                self._throttled_until = 0.0
                self._throttle_guessed = False
                self._note(at, "retry_after_elapsed")
        if self._trials:
            for token in [tok for tok, exp in self._trials.items() if exp <= now]:
                del self._trials[token]

    # ------------------------------------------------------------------ admission and outcomes

    def try_acquire(self) -> Permit | None:
        """Admit one call, or return ``None`` if the breaker refuses it now."""
        now = self._clock()
        self._settle(now)
        if self._throttled_until > now or (self._quarantined and not self._recheck_due(now)):
            return None
        if self._state is BreakerState.CLOSED:
            return Permit(self._generation, trial=False)
        if self._state is BreakerState.HALF_OPEN:
            if len(self._trials) >= self._trial_cap():
                return None
            token = next(_tokens)
            self._trials[token] = now + self._config.probe_timeout
            return Permit(self._generation, trial=True, token=token)
        return None

    def _finish(self, permit: Permit) -> bool:
        """Free the permit's slot; True if its outcome may still move the state."""
        now = self._clock()
        self._settle(now)
        if permit.trial:
            self._trials.pop(permit.token, None)
        if permit.generation != self._generation:
            return False
        return not self._quarantined or (permit.trial and self._recheck_due(now))

    def record_success(self, permit: Permit) -> bool:
        """Count a success; ``False`` if the permit was stale and moved nothing."""
        self._total_successes += 1
        if not self._finish(permit):
            return False
        if self._quarantined:  # a recheck's trial: the key is accepted again
            self._quarantined = False
            self._recheck_at = 0.0
            self._recheck_streak = 0
            self._open_reason = None
            self._close(self._clock(), "recheck_succeeded")
        elif self._state is BreakerState.CLOSED:
            self._failures = 0
        elif self._state is BreakerState.HALF_OPEN and permit.trial:
            self._successes += 1
            if self._successes >= self._config.success_threshold:
                self._close(self._clock(), "trial_succeeded")
        return True

    def record_failure(self, permit: Permit) -> bool:
        """Count a failure; ``False`` if the permit was stale and moved nothing."""
        self._total_failures += 1
        if not self._finish(permit):
            return False
        now = self._clock()
        if self._quarantined:  # a recheck's trial failed for another reason: look again later
            self._recheck_later(now)
        elif self._state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self._config.failure_threshold:
                self._trip(now, OpenReason.FAILURES)
        elif self._state is BreakerState.HALF_OPEN and permit.trial:
            self._trip(now, OpenReason.TRIAL_FAILED)
        return True

    def release(self, permit: Permit) -> None:
        """Hand a permit back without an outcome (caller error, cancellation, ignored result)."""
        self._finish(permit)

    def throttle(self, retry_after: float | None, permit: Permit | None = None) -> float:
        """Keep the key out for ``retry_after`` seconds (clamped); returns the instant it is back."""
        if permit is not None:
            self._finish(permit)
        now = self._clock()
        self._settle(now)
        cfg = self._config
        given = retry_after is not None and retry_after >= 0  # NaN fails this test too
        wait = retry_after if given and retry_after is not None else cfg.default_retry_after
        until = now + min(wait, cfg.max_retry_after)
        if until > self._throttled_until and until > now:
            if self.state(now) is not BreakerState.OPEN:  # a trip only when the key goes out
                self._trips += 1
                if not self._quarantined:  # a quarantine's reason is the one to show
                    self._open_reason = OpenReason.THROTTLED
            self._throttled_until = until
            self._throttle_guessed = not given
            self._note(now, OpenReason.THROTTLED.value)
        return self._throttled_until

    @property
    def throttle_guessed(self) -> bool:
        """Whether the current throttle ends at a guess (a 429 without Retry-After) rather than at
        the instant the server gave: such a recovery is not worth waiting for."""
        return self._throttle_guessed

    def quarantine(self, reason: OpenReason, permit: Permit | None = None) -> None:
        """Take the key out until :meth:`reset`: it never half-opens by itself."""
        recheck = permit is not None and permit.trial and self._recheck_due(self._clock())
        if permit is not None:
            self._finish(permit)
        now = self._clock()
        self._settle(now)
        if self._quarantined:
            if recheck and permit is not None and permit.generation == self._generation:
                self._recheck_later(now)  # re-verified and still refused
            return
        if self.state(now) is not BreakerState.OPEN:  # a trip only when the key goes out
            self._trips += 1
        self._quarantined = True
        self._recheck_at = 0.0
        self._recheck_streak = 0
        self._state = BreakerState.OPEN
        self._open_reason = reason
        self._since = now
        self._generation += 1
        self._failures = 0
        self._successes = 0
        self._trials.clear()
        self._note(now, reason.value)

    def schedule_recheck(self, delay: float) -> None:
        """Re-verify a quarantined key with one trial ``delay`` seconds from now; each recheck
        that finds it still refused waits twice as long as the one before, up to ``max_timeout``
        (or ``delay``, if that is longer). No effect on a key that is not quarantined."""
        if not self._quarantined:
            return
        now = self._clock()
        self._settle(now)
        self._recheck_at = now + max(0.0, delay)
        self._recheck_delay = max(0.0, delay)
        self._state = BreakerState.OPEN
        self._generation += 1
        self._trials.clear()
        self._note(now, "recheck_scheduled")

    def _recheck_later(self, now: float) -> None:
        self._recheck_streak = min(self._recheck_streak + 1, 64)
        cap = max(self._config.max_timeout, self._recheck_delay)
        self._recheck_at = now + min(self._recheck_delay * 2.0**self._recheck_streak, cap)
        self._state = BreakerState.OPEN
        self._generation += 1
        self._trials.clear()
        self._note(now, self._open_reason.value if self._open_reason else "recheck_failed")

    def reset(self) -> None:
        """Close the breaker and forget throttles, quarantine and the trip streak."""
        now = self._clock()
        self._settle(now)
        self._quarantined = False
        self._recheck_at = 0.0
        self._recheck_streak = 0
        self._throttled_until = 0.0
        self._throttle_guessed = False
        self._open_reason = None
        self._streak = 0
        self._close(now, "reset")

    def update_config(self, config: BreakerConfig) -> None:
        """Swap the settings, keeping state; new thresholds and timeouts apply from the next event."""
        self._config = config

    def force_open(self, reason: OpenReason = OpenReason.FAILURES) -> None:
        """Trip now, as if the threshold were reached (tests and operators)."""
        now = self._clock()
        self._settle(now)
        if self._quarantined:
            return  # already out, for a reason an operator must see: keep it
        self._trip(now, reason)

    def adopt(
        self,
        *,
        open_: bool,
        open_until: float,
        throttled_until: float,
        quarantine: OpenReason | None,
        reason: OpenReason | None,
        failures: int,
        successes: int,
        foreign_trials: Sequence[float] = (),
    ) -> None:
        """Take on the state another process decided (a shared store's view).

        Keeps this breaker's own trial slots while the key is half-open everywhere, and holds a
        placeholder slot for each trial other processes run (``foreign_trials``: when each
        expires), so ``half_open_max_calls`` counts them too; the transitions it causes are noted
        (and counted as trips) like local ones.
        """
        now = self._clock()
        self._settle(now)
        was_out = self.state(now) is BreakerState.OPEN
        if quarantine is not None:
            if not self._quarantined:
                self._quarantined = True
                self._state = BreakerState.OPEN
                self._open_reason = quarantine
                self._generation += 1
                self._trials.clear()
        else:
            self._quarantined = False
            probing_already = self._state is BreakerState.HALF_OPEN and open_ and open_until <= now
            if open_ and not probing_already:
                if self._state is not BreakerState.OPEN:
                    self._generation += 1
                    self._trials.clear()
                    self._successes = 0
                self._state = BreakerState.OPEN
                self._open_until = open_until
                self._open_reason = reason or OpenReason.FAILURES
            elif not open_ and self._state is not BreakerState.CLOSED:
                self._close(now, "shared")
            if probing_already:
                self._successes = max(self._successes, successes)
        # The shared count is the one that trips (and a tripped or quarantined key counts none):
        # a count kept from before a trip learned from the store would otherwise linger.
        self._failures = failures
        if throttled_until > now and self._throttled_until <= now and not self._quarantined:
            self._open_reason = OpenReason.THROTTLED
        if throttled_until != self._throttled_until:
            self._throttle_guessed = False  # another process's throttle: its end is what it was told
        self._throttled_until = throttled_until
        if not was_out and self.state(now) is BreakerState.OPEN:
            self._trips += 1
        self._note(now, "shared")
        self._settle(now)
        for token in [t for t in self._trials if t < 0]:  # the previous placeholders
            del self._trials[token]
        if self._state is BreakerState.HALF_OPEN:
            for expires in foreign_trials:
                if expires > now:
                    self._trials[-next(_tokens)] = expires

    # ------------------------------------------------------------------ internal moves

    def _trip(self, now: float, reason: OpenReason) -> None:
        cfg = self._config
        self._streak += 1
        steps = self._streak - 1
        # Compare logarithms first: after a long streak ``multiplier ** steps`` would overflow.
        growth_to_cap = math.log(cfg.max_timeout / cfg.timeout)
        if (
            steps
            and cfg.backoff_multiplier > 1.0
            and steps * math.log(cfg.backoff_multiplier) >= growth_to_cap
        ):
            duration = cfg.max_timeout
        else:
            duration = min(cfg.timeout * cfg.backoff_multiplier**steps, cfg.max_timeout)
        if cfg.jitter:
            duration = _jittered(duration, cfg, self._random())
        self._state = BreakerState.OPEN
        self._open_until = now + duration
        self._open_reason = reason
        self._since = now
        self._generation += 1
        self._failures = 0
        self._successes = 0
        self._trials.clear()
        self._trips += 1
        self._note(now, reason.value)

    def _close(self, now: float, reason: str) -> None:
        self._state = BreakerState.CLOSED
        self._since = now
        self._generation += 1
        self._failures = 0
        self._successes = 0
        self._streak = 0
        self._trials.clear()
        self._note(now, reason)

    def __repr__(self) -> str:
        snap = self.snapshot()
        return f"CircuitBreaker(state={snap.state.label}, failures={snap.failure_count}, trips={snap.trips})"


def _jittered(duration: float, cfg: BreakerConfig, draw: float) -> float:
    """Spread an open time by up to ``jitter`` of itself without ever passing ``max_timeout``
    (a hard cap) or falling short of ``timeout``: near the cap, the spread moves below it."""
    spread = duration * (1.0 + cfg.jitter)
    if spread <= cfg.max_timeout:
        return duration * (1.0 + cfg.jitter * draw)
    low = max(cfg.timeout, cfg.max_timeout / (1.0 + cfg.jitter))
    return low + (cfg.max_timeout - low) * draw
