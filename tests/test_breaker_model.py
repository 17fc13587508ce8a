"""The breaker against a small eager reference model, driven by hypothesis.

The model applies time eagerly (every clock step settles it), the breaker lazily; after every rule
the breaker's observable state must equal the model's.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from keypool import BreakerConfig, BreakerState, CircuitBreaker, OpenReason, Permit
from keypool.testing import FakeClock

CFG = BreakerConfig(
    failure_threshold=3,
    success_threshold=2,
    timeout=10.0,
    half_open_max_calls=2,
    backoff_multiplier=2.0,
    max_timeout=35.0,
    jitter=0.5,
    probe_timeout=15.0,
    default_retry_after=5.0,
    max_retry_after=50.0,
)
JITTER_DRAW = 0.25


@dataclass
class ModelPermit:
    generation: int
    trial: bool
    token: int


class Model:
    """The runbook's breaker, written as plainly as possible."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.state = "closed"
        self.open_until = 0.0
        self.quarantined = False
        self.recheck_at = 0.0
        self.recheck_delay = 0.0
        self.recheck_streak = 0
        self.throttled_until = 0.0
        self.failures = 0
        self.successes = 0
        self.trials: dict[int, float] = {}  # token -> slot expiry
        self.generation = 0
        self.streak = 0
        self.next_token = 0

    # time
    def advance(self, dt: float) -> None:
        self.now += dt
        self.settle()

    def recheck_due(self) -> bool:
        return self.quarantined and 0 < self.recheck_at <= self.now

    def settle(self) -> None:
        if self.state == "open" and not self.quarantined and self.now >= self.open_until:
            self.state = "half_open"
            self.generation += 1
            self.successes = 0
            self.trials.clear()
        if self.state == "open" and self.recheck_due():
            self.state = "half_open"
            self.generation += 1
            self.successes = 0
            self.trials.clear()
        self.trials = {t: exp for t, exp in self.trials.items() if exp > self.now}

    def effective(self) -> BreakerState:
        if self.throttled_until > self.now:
            return BreakerState.OPEN
        if self.quarantined:
            return BreakerState.HALF_OPEN if self.recheck_due() else BreakerState.OPEN
        return {
            "closed": BreakerState.CLOSED,
            "half_open": BreakerState.HALF_OPEN,
            "open": BreakerState.OPEN,
        }[self.state]

    # moves
    def trip(self) -> None:
        self.streak += 1
        base = min(CFG.timeout * CFG.backoff_multiplier ** (self.streak - 1), CFG.max_timeout)
        if base * (1 + CFG.jitter) <= CFG.max_timeout:
            duration = base * (1 + CFG.jitter * JITTER_DRAW)
        else:  # jitter stays inside the hard cap
            low = max(CFG.timeout, CFG.max_timeout / (1 + CFG.jitter))
            duration = low + (CFG.max_timeout - low) * JITTER_DRAW
        self.state = "open"
        self.open_until = self.now + duration
        self.generation += 1
        self.failures = 0
        self.successes = 0
        self.trials.clear()

    def close(self) -> None:
        self.state = "closed"
        self.generation += 1
        self.failures = 0
        self.successes = 0
        self.streak = 0
        self.trials.clear()

    # calls
    def acquire(self) -> ModelPermit | None:
        if self.throttled_until > self.now or (self.quarantined and not self.recheck_due()):
            return None
        if self.state == "closed":
            return ModelPermit(self.generation, False, -1)
        cap = 1 if self.quarantined else CFG.half_open_max_calls
        if self.state == "half_open" and len(self.trials) < cap:
            self.next_token += 1
            self.trials[self.next_token] = self.now + CFG.probe_timeout
            return ModelPermit(self.generation, True, self.next_token)
        return None

    def finish(self, permit: ModelPermit) -> bool:
        self.trials.pop(permit.token, None)
        if permit.generation != self.generation:
            return False
        return not self.quarantined or (permit.trial and self.recheck_due())

    def success(self, permit: ModelPermit) -> None:
        if not self.finish(permit):
            return
        if self.quarantined:
            self.quarantined = False
            self.recheck_at = 0.0
            self.recheck_streak = 0
            self.close()
        elif self.state == "closed":
            self.failures = 0
        elif self.state == "half_open" and permit.trial:
            self.successes += 1
            if self.successes >= CFG.success_threshold:
                self.close()

    def failure(self, permit: ModelPermit) -> None:
        if not self.finish(permit):
            return
        if self.quarantined:
            self.recheck_later()
        elif self.state == "closed":
            self.failures += 1
            if self.failures >= CFG.failure_threshold:
                self.trip()
        elif self.state == "half_open" and permit.trial:
            self.trip()

    def throttle(self, retry_after: float | None) -> None:
        wait = CFG.default_retry_after if retry_after is None or retry_after < 0 else retry_after
        self.throttled_until = max(self.throttled_until, self.now + min(wait, CFG.max_retry_after))

    def recheck_later(self) -> None:
        self.recheck_streak = min(self.recheck_streak + 1, 64)
        cap = max(CFG.max_timeout, self.recheck_delay)
        self.recheck_at = self.now + min(self.recheck_delay * 2.0**self.recheck_streak, cap)
        self.state = "open"
        self.generation += 1
        self.trials.clear()

    def schedule_recheck(self, delay: float) -> None:
        if not self.quarantined:
            return
        self.recheck_at = self.now + delay
        self.recheck_delay = delay
        self.state = "open"
        self.generation += 1
        self.trials.clear()

    def quarantine(self, permit: ModelPermit | None = None) -> None:
        recheck = permit is not None and permit.trial and self.recheck_due()
        if permit is not None:
            self.finish(permit)
        if self.quarantined:
            if recheck and permit is not None and permit.generation == self.generation:
                self.recheck_later()
            return
        self.quarantined = True
        self.recheck_at = 0.0
        self.recheck_streak = 0
        self.state = "open"
        self.generation += 1
        self.failures = 0
        self.successes = 0
        self.trials.clear()

    def reset(self) -> None:
        self.quarantined = False
        self.recheck_at = 0.0
        self.recheck_streak = 0
        self.throttled_until = 0.0
        self.close()


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(start=500.0)
        self.breaker = CircuitBreaker(CFG, clock=self.clock.now, rng=lambda: JITTER_DRAW)
        self.model = Model(self.clock.now())
        self.outstanding: list[tuple[Permit, ModelPermit]] = []
        self.max_trials_seen = 0

    @initialize(failures=st.integers(0, 3))
    def start(self, failures: int) -> None:
        for _ in range(failures):
            self.acquire()
            self.finish_one(0, "failure")

    # -------------------------------------------------------------- rules

    @rule()
    def acquire(self) -> None:
        got = self.breaker.try_acquire()
        want = self.model.acquire()
        assert (got is None) == (want is None), (got, want)
        if got is not None and want is not None:
            assert got.trial == want.trial
            self.outstanding.append((got, want))

    def finish_one(self, index: int, how: str) -> None:
        permit, mine = self.outstanding.pop(index % len(self.outstanding))
        if how == "success":
            self.breaker.record_success(permit)
            self.model.success(mine)
        elif how == "failure":
            self.breaker.record_failure(permit)
            self.model.failure(mine)
        elif how == "release":
            self.breaker.release(permit)
            self.model.finish(mine)
        elif how == "rejected":
            self.breaker.quarantine(OpenReason.REJECTED, permit)
            self.model.quarantine(mine)
        else:
            retry_after = 7.0
            self.breaker.throttle(retry_after, permit)
            self.model.finish(mine)
            self.model.throttle(retry_after)

    @precondition(lambda self: self.outstanding)
    @rule(
        index=st.integers(0, 50),
        how=st.sampled_from(["success", "failure", "release", "throttle", "rejected"]),
    )
    def report(self, index: int, how: str) -> None:
        self.finish_one(index, how)

    @rule(retry_after=st.one_of(st.none(), st.sampled_from([-1.0, 0.5, 3.0, 12.0, 30.0, 500.0])))
    def throttle(self, retry_after: float | None) -> None:
        self.breaker.throttle(retry_after)
        self.model.throttle(retry_after)

    @rule(reason=st.sampled_from([OpenReason.REJECTED, OpenReason.QUOTA]))
    def quarantine(self, reason: OpenReason) -> None:
        self.breaker.quarantine(reason)
        self.model.quarantine()

    @rule(delay=st.sampled_from([0.0, 1.0, 8.0, 30.0]))
    def schedule_recheck(self, delay: float) -> None:
        self.breaker.schedule_recheck(delay)
        self.model.schedule_recheck(delay)

    @rule()
    def reset(self) -> None:
        self.breaker.reset()
        self.model.reset()
        assert self.breaker.state() is BreakerState.CLOSED

    @rule(dt=st.sampled_from([0.5, 1.0, 5.0, 9.99, 10.0, 12.5, 15.0, 40.0, 200.0]))
    def advance(self, dt: float) -> None:
        self.clock.advance(dt)
        self.model.advance(dt)
        if self.model.quarantined and not self.model.recheck_due():
            assert self.breaker.state() is BreakerState.OPEN

    @rule()
    def poll(self) -> None:
        before = self.breaker.state()
        self.breaker.poll()
        assert self.breaker.state() is before
        for t in self.breaker.drain_transitions():
            assert t.at <= self.clock.now()

    # -------------------------------------------------------------- invariants

    @invariant()
    def state_matches_model(self) -> None:
        self.model.settle()
        first = self.breaker.state()
        assert first is self.breaker.state()  # a pure read
        assert first is self.model.effective(), (first, self.model.__dict__)

    @invariant()
    def trials_bounded(self) -> None:
        in_flight = self.breaker.trials_in_flight()
        assert 0 <= in_flight <= CFG.half_open_max_calls
        if self.breaker.state() is BreakerState.HALF_OPEN:
            assert in_flight == len(self.model.trials)

    @invariant()
    def no_half_open_before_the_deadline(self) -> None:
        if self.breaker.state() is BreakerState.HALF_OPEN and self.model.quarantined:
            assert self.clock.now() >= self.model.recheck_at > 0  # a recheck, never early
        elif self.breaker.state() is BreakerState.HALF_OPEN and self.model.open_until:
            assert self.clock.now() >= self.model.open_until

    @invariant()
    def quarantine_is_visible(self) -> None:
        assert self.breaker.quarantined == self.model.quarantined
        if self.model.quarantined:
            snap = self.breaker.snapshot()
            if not self.model.recheck_at:  # no way back but a reset
                assert snap.admits_at is None
                assert snap.next_transition_at is None
            else:  # a recheck: never before its instant, on the doubling schedule
                assert self.breaker.recheck_at == self.model.recheck_at
                assert snap.admits_at is not None
                assert snap.admits_at >= self.model.recheck_at
            assert snap.open_reason in (OpenReason.REJECTED, OpenReason.QUOTA)

    @invariant()
    def counts_match(self) -> None:
        assert self.breaker.failure_count == self.model.failures


BreakerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
TestBreakerModel = BreakerMachine.TestCase
