"""CircuitBreaker: every transition of the runbook's state machine, on a fake clock."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

import pytest

from keypool import BreakerConfig, BreakerState, CircuitBreaker, OpenReason, Permit, Transition
from keypool.testing import FakeClock

CLOSED, HALF_OPEN, OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN
YEAR = 365 * 86_400.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1000.0)


def make(clock: FakeClock, rng: Callable[[], float] | None = None, **config: object) -> CircuitBreaker:
    cfg = BreakerConfig.model_validate(config)
    if rng is None:
        return CircuitBreaker(cfg, clock=clock.now)
    return CircuitBreaker(cfg, clock=clock.now, rng=rng)


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        permit = breaker.try_acquire()
        assert permit is not None
        breaker.record_failure(permit)


def succeed(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        permit = breaker.try_acquire()
        assert permit is not None
        breaker.record_success(permit)


def open_duration(breaker: CircuitBreaker, clock: FakeClock) -> float:
    """Seconds from now until the open breaker half-opens by itself."""
    at = breaker.next_transition_at()
    assert at is not None
    return at - clock.now()


def trip_and_half_open(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, breaker.config.failure_threshold)
    assert breaker.state() is OPEN
    clock.advance(open_duration(breaker, clock))
    assert breaker.state() is HALF_OPEN


# ---------------------------------------------------------------------------------- closed -> open


def test_defaults_are_the_runbooks() -> None:
    cfg = BreakerConfig()
    assert (cfg.failure_threshold, cfg.success_threshold, cfg.timeout, cfg.half_open_max_calls) == (
        5,
        2,
        60.0,
        3,
    )


def test_state_values_are_the_metric_values() -> None:
    assert [int(s) for s in (CLOSED, HALF_OPEN, OPEN)] == [0, 1, 2]
    assert [s.label for s in (CLOSED, HALF_OPEN, OPEN)] == ["closed", "half_open", "open"]


def test_four_consecutive_failures_do_not_open(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 4)
    assert breaker.state() is CLOSED
    assert breaker.failure_count == 4
    assert breaker.try_acquire() is not None


def test_five_consecutive_failures_open(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 5)
    assert breaker.state() is OPEN
    assert breaker.try_acquire() is None
    snap = breaker.snapshot()
    assert snap.open_reason is OpenReason.FAILURES
    assert snap.trips == 1
    assert snap.failure_count == 0  # the count restarts with the next closed period
    assert breaker.drain_transitions() == [Transition(CLOSED, OPEN, 1000.0, "failures")]


def test_a_success_in_between_resets_the_count(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 4)
    succeed(breaker)
    assert breaker.failure_count == 0
    fail(breaker, 4)
    assert breaker.state() is CLOSED
    fail(breaker)
    assert breaker.state() is OPEN


def test_failures_from_calls_in_flight_together_count(clock: FakeClock) -> None:
    breaker = make(clock)
    permits = [breaker.try_acquire() for _ in range(5)]
    assert all(p is not None and not p.trial for p in permits)
    for p in permits:
        assert p is not None
        breaker.record_failure(p)
    assert breaker.state() is OPEN


# ---------------------------------------------------------------------------------- open -> half-open


def test_no_half_open_before_the_timeout(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 5)
    clock.advance(59.999)
    assert breaker.state() is OPEN
    assert breaker.try_acquire() is None
    assert not breaker.can_admit()
    assert breaker.admits_at() == pytest.approx(1060.0)


def test_half_open_exactly_at_the_timeout(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 5)
    clock.advance(60.0)
    assert breaker.state() is HALF_OPEN
    assert breaker.can_admit()
    permit = breaker.try_acquire()
    assert permit is not None
    assert permit.trial


def test_state_is_a_pure_read(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 5)
    breaker.drain_transitions()
    clock.advance(61.0)
    for _ in range(100):
        assert breaker.state() is HALF_OPEN
        breaker.snapshot()
        breaker.admits_at()
        breaker.next_transition_at()
        breaker.trials_in_flight()
        repr(breaker)
    # Reading noticed nothing: no transition was materialised by any of those calls.
    assert breaker.drain_transitions() == []
    assert breaker.snapshot().success_count == 0


def test_transition_to_half_open_is_stamped_with_the_deadline(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 5)
    assert breaker.drain_transitions() == [Transition(CLOSED, OPEN, 1000.0, "failures")]
    clock.advance(500.0)  # noticed long after it happened
    breaker.poll()
    assert breaker.drain_transitions() == [Transition(OPEN, HALF_OPEN, 1060.0, "timeout_elapsed")]
    assert breaker.drain_transitions() == []
    assert breaker.snapshot().since == 1060.0


def test_transition_noticed_by_an_acquire_is_stamped_with_the_deadline(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 5)
    breaker.drain_transitions()
    clock.advance(90.0)
    assert breaker.try_acquire() is not None
    assert breaker.drain_transitions() == [Transition(OPEN, HALF_OPEN, 1060.0, "timeout_elapsed")]


def test_lazy_half_open_snapshot_since_is_the_deadline(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 5)
    clock.advance(75.0)
    snap = breaker.snapshot()
    assert snap.state is HALF_OPEN
    assert snap.since == 1060.0


# ---------------------------------------------------------------------------------- half-open


def test_at_most_half_open_max_calls_trials(clock: FakeClock) -> None:
    breaker = make(clock)
    trip_and_half_open(breaker, clock)
    permits = [breaker.try_acquire() for _ in range(10)]
    admitted = [p for p in permits if p is not None]
    assert len(admitted) == 3
    assert all(p.trial for p in admitted)
    assert len({p.token for p in admitted}) == 3
    assert breaker.trials_in_flight() == 3
    assert not breaker.can_admit()


def test_half_open_max_calls_is_configurable(clock: FakeClock) -> None:
    breaker = make(clock, half_open_max_calls=1)
    trip_and_half_open(breaker, clock)
    assert breaker.try_acquire() is not None
    assert breaker.try_acquire() is None


def test_two_trial_successes_close(clock: FakeClock) -> None:
    breaker = make(clock)
    trip_and_half_open(breaker, clock)
    p1, p2 = breaker.try_acquire(), breaker.try_acquire()
    assert p1 is not None
    assert p2 is not None
    breaker.drain_transitions()
    breaker.record_success(p1)
    assert breaker.state() is HALF_OPEN
    assert breaker.snapshot().success_count == 1
    clock.advance(1.0)
    breaker.record_success(p2)
    assert breaker.state() is CLOSED
    assert breaker.drain_transitions() == [Transition(HALF_OPEN, CLOSED, 1061.0, "trial_succeeded")]
    assert breaker.snapshot().open_reason is None  # closed: no reason to be out any more


def test_success_threshold_is_configurable(clock: FakeClock) -> None:
    breaker = make(clock, success_threshold=3, half_open_max_calls=3)
    trip_and_half_open(breaker, clock)
    succeed(breaker, 2)
    assert breaker.state() is HALF_OPEN
    succeed(breaker)
    assert breaker.state() is CLOSED


@pytest.mark.parametrize("successes_first", [0, 1])
def test_any_trial_failure_reopens(clock: FakeClock, successes_first: int) -> None:
    breaker = make(clock)
    trip_and_half_open(breaker, clock)
    succeed(breaker, successes_first)
    breaker.poll()
    breaker.drain_transitions()
    clock.advance(2.0)
    fail(breaker)
    assert breaker.state() is OPEN
    assert breaker.snapshot().open_reason is OpenReason.TRIAL_FAILED
    [transition] = breaker.drain_transitions()
    assert (transition.old, transition.new, transition.reason) == (HALF_OPEN, OPEN, "trial_failed")
    # The new open period starts at the failure, not at the old deadline.
    assert open_duration(breaker, clock) == pytest.approx(60.0)


def test_trial_failure_makes_other_trials_stale(clock: FakeClock) -> None:
    breaker = make(clock)
    trip_and_half_open(breaker, clock)
    p1, p2 = breaker.try_acquire(), breaker.try_acquire()
    assert p1 is not None
    assert p2 is not None
    breaker.record_failure(p1)
    assert breaker.state() is OPEN
    breaker.record_success(p2)  # too late: the breaker opened again in between
    assert breaker.state() is OPEN
    assert breaker.snapshot().success_count == 0


def test_full_recovery_cycle_transitions(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 5)
    clock.advance(60.0)
    succeed(breaker, 2)
    got = [(t.old, t.new, t.at) for t in breaker.drain_transitions()]
    assert got == [(CLOSED, OPEN, 1000.0), (OPEN, HALF_OPEN, 1060.0), (HALF_OPEN, CLOSED, 1060.0)]
    closed, half_open, open_ = breaker.time_in_states()
    assert (closed, half_open, open_) == (0.0, 0.0, 60.0)
    clock.advance(5.0)
    assert sum(breaker.time_in_states()) == pytest.approx(65.0)


# ---------------------------------------------------------------------------------- backoff and jitter


def test_backoff_grows_per_consecutive_trip_and_is_capped(clock: FakeClock) -> None:
    breaker = make(clock, timeout=10, backoff_multiplier=2.0, max_timeout=35)
    fail(breaker, 5)
    durations = [open_duration(breaker, clock)]
    for _ in range(4):
        clock.advance(durations[-1])
        fail(breaker)  # the trial fails: a consecutive trip
        durations.append(open_duration(breaker, clock))
    assert durations == pytest.approx([10, 20, 35, 35, 35])


def test_backoff_restarts_after_a_close(clock: FakeClock) -> None:
    breaker = make(clock, timeout=10, backoff_multiplier=3.0, max_timeout=100)
    fail(breaker, 5)
    clock.advance(10)
    fail(breaker)
    assert open_duration(breaker, clock) == pytest.approx(30)
    clock.advance(30)
    succeed(breaker, 2)
    assert breaker.state() is CLOSED
    fail(breaker, 5)
    assert open_duration(breaker, clock) == pytest.approx(10)


def test_backoff_restarts_after_a_reset(clock: FakeClock) -> None:
    breaker = make(clock, timeout=10, backoff_multiplier=2.0, max_timeout=100)
    fail(breaker, 5)
    clock.advance(10)
    fail(breaker)
    assert open_duration(breaker, clock) == pytest.approx(20)
    breaker.reset()
    fail(breaker, 5)
    assert open_duration(breaker, clock) == pytest.approx(10)


def test_a_long_streak_of_trips_stays_at_the_cap(clock: FakeClock) -> None:
    # multiplier ** streak would overflow a float after a few hundred trips
    breaker = make(clock, timeout=1, backoff_multiplier=100.0, max_timeout=3600)
    for _ in range(2000):
        breaker.force_open()
    assert open_duration(breaker, clock) == 3600
    assert breaker.snapshot().trips == 2000


@pytest.mark.parametrize("r", [0.0, 0.25, 0.5, 0.999])
def test_jitter_adds_a_fraction_drawn_from_rng(clock: FakeClock, r: float) -> None:
    breaker = make(clock, rng=lambda: r, jitter=0.2)
    fail(breaker, 5)
    assert open_duration(breaker, clock) == pytest.approx(60 * (1 + 0.2 * r))


def test_jitter_stays_within_bounds(clock: FakeClock) -> None:
    rng = random.Random(7)
    breaker = make(clock, rng=rng.random, jitter=0.5, timeout=10, backoff_multiplier=2.0, max_timeout=40)
    seen = []
    fail(breaker, 5)
    for streak in range(1, 200):
        base = min(10 * 2.0 ** (streak - 1), 40)
        d = open_duration(breaker, clock)
        assert 10 <= d <= 40  # never below timeout, never past max_timeout: a hard cap
        if base * 1.5 <= 40:
            assert base <= d <= base * 1.5
        else:  # at the cap the spread moves below it, so keys still do not re-probe in step
            assert 40 / 1.5 <= d <= 40
        seen.append(d)
        clock.advance(d)
        fail(breaker)
    # the draws really vary, at the cap too: keys that trip together do not re-probe in step
    assert max(seen[5:]) - min(seen[5:]) > 5


def test_no_jitter_by_default(clock: FakeClock) -> None:
    breaker = make(clock, rng=lambda: 0.9)
    fail(breaker, 5)
    assert open_duration(breaker, clock) == 60.0


# ---------------------------------------------------------------------------------- slots


def test_unreported_trial_slot_is_reclaimed_after_probe_timeout(clock: FakeClock) -> None:
    breaker = make(clock, probe_timeout=30)
    trip_and_half_open(breaker, clock)
    held = [breaker.try_acquire() for _ in range(3)]
    assert all(held)
    clock.advance(29.999)
    assert breaker.try_acquire() is None
    assert breaker.admits_at() == pytest.approx(clock.now() + 0.001)
    clock.advance(0.001)
    assert breaker.trials_in_flight() == 0
    fresh = [breaker.try_acquire() for _ in range(4)]
    assert sum(p is not None for p in fresh) == 3
    assert breaker.state() is HALF_OPEN  # never stuck: probing goes on


def test_release_returns_a_trial_slot(clock: FakeClock) -> None:
    breaker = make(clock)
    trip_and_half_open(breaker, clock)
    permits = [breaker.try_acquire() for _ in range(3)]
    assert breaker.try_acquire() is None
    first = permits[0]
    assert first is not None
    breaker.release(first)
    assert breaker.trials_in_flight() == 2
    assert breaker.state() is HALF_OPEN
    assert breaker.snapshot().success_count == 0
    assert breaker.try_acquire() is not None
    assert breaker.try_acquire() is None


def test_release_in_closed_counts_nothing(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 4)
    permit = breaker.try_acquire()
    assert permit is not None
    breaker.release(permit)
    assert breaker.failure_count == 4
    snap = breaker.snapshot()
    assert (snap.total_failures, snap.total_successes) == (4, 0)


def test_releasing_twice_frees_only_one_slot(clock: FakeClock) -> None:
    breaker = make(clock)
    trip_and_half_open(breaker, clock)
    a, b, _ = (breaker.try_acquire() for _ in range(3))
    assert a is not None
    assert b is not None
    breaker.release(a)
    breaker.release(a)
    assert breaker.trials_in_flight() == 2


# ---------------------------------------------------------------------------------- quarantine


@pytest.mark.parametrize("reason", [OpenReason.REJECTED, OpenReason.QUOTA, OpenReason.MANUAL])
def test_quarantine_never_recovers_by_itself(clock: FakeClock, reason: OpenReason) -> None:
    breaker = make(clock)
    breaker.quarantine(reason)
    for _ in range(12):
        clock.advance(YEAR / 12)
        assert breaker.state() is OPEN
        assert breaker.try_acquire() is None
        breaker.poll()
    snap = breaker.snapshot()
    assert snap.quarantined
    assert snap.open_reason is reason
    assert snap.admits_at is None
    assert snap.next_transition_at is None
    assert [t.new for t in breaker.drain_transitions()] == [OPEN]


def test_quarantine_while_open_or_half_open_never_recovers(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 5)
    breaker.quarantine(OpenReason.REJECTED)
    clock.advance(YEAR)
    assert breaker.state() is OPEN
    breaker.reset()
    trip_and_half_open(breaker, clock)
    trial = breaker.try_acquire()
    assert trial is not None
    breaker.quarantine(OpenReason.QUOTA, trial)
    breaker.record_success(trial)  # a late outcome cannot bring it back
    clock.advance(YEAR)
    assert breaker.state() is OPEN
    assert breaker.snapshot().open_reason is OpenReason.QUOTA


def test_outcomes_while_quarantined_move_nothing(clock: FakeClock) -> None:
    breaker = make(clock)
    permits = [breaker.try_acquire() for _ in range(6)]
    breaker.quarantine(OpenReason.REJECTED)
    for p in permits:
        assert p is not None
        breaker.record_failure(p)
    assert breaker.state() is OPEN
    assert breaker.snapshot().trips == 1


# ---------------------------------------------------------------------------------- rechecks


def test_a_scheduled_recheck_lets_one_trial_through_and_its_success_closes(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.quarantine(OpenReason.REJECTED)
    breaker.schedule_recheck(30.0)
    assert breaker.admits_at() == pytest.approx(1030.0)
    assert breaker.next_transition_at() == pytest.approx(1030.0)
    clock.advance(29.9)
    assert breaker.try_acquire() is None
    clock.advance(0.1)
    assert breaker.state() is HALF_OPEN
    trial = breaker.try_acquire()
    assert trial is not None
    assert trial.trial
    assert breaker.try_acquire() is None  # one probe at a time for a quarantined key
    assert breaker.snapshot().quarantined
    breaker.record_success(trial)
    assert breaker.state() is CLOSED
    snap = breaker.snapshot()
    assert (snap.quarantined, snap.open_reason, snap.admits_at) == (False, None, 1030.0)
    assert [t.reason for t in breaker.drain_transitions()][-1] == "recheck_succeeded"


def test_a_recheck_still_refused_waits_twice_as_long_up_to_max_timeout(clock: FakeClock) -> None:
    breaker = make(clock, max_timeout=200)
    breaker.quarantine(OpenReason.QUOTA)
    breaker.schedule_recheck(30.0)
    waits = []
    for _ in range(5):
        at = breaker.recheck_at
        assert at is not None
        waits.append(at - clock.now())
        clock.advance(at - clock.now())
        trial = breaker.try_acquire()
        assert trial is not None
        breaker.quarantine(OpenReason.QUOTA, trial)  # the provider still says no
        assert breaker.state() is OPEN
        assert breaker.snapshot().open_reason is OpenReason.QUOTA
    assert waits == pytest.approx([30, 60, 120, 200, 200])


def test_a_recheck_that_fails_for_another_reason_also_waits_longer(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.quarantine(OpenReason.REJECTED)
    breaker.schedule_recheck(10.0)
    clock.advance(10.0)
    trial = breaker.try_acquire()
    assert trial is not None
    breaker.record_failure(trial)  # a 503 says nothing about the key: look again later
    assert breaker.recheck_at == pytest.approx(clock.now() + 20.0)
    assert breaker.snapshot().quarantined


def test_a_throttle_during_a_recheck_keeps_the_quarantine_reason(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.quarantine(OpenReason.REJECTED)
    breaker.schedule_recheck(10.0)
    clock.advance(10.0)
    trial = breaker.try_acquire()
    assert trial is not None
    breaker.throttle(5.0, trial)
    assert breaker.snapshot().open_reason is OpenReason.REJECTED
    clock.advance(5.0)
    assert breaker.try_acquire() is not None  # the recheck is still due once the throttle ends


def test_no_recheck_without_a_quarantine_and_reset_cancels_one(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.schedule_recheck(5.0)
    assert breaker.recheck_at is None
    assert breaker.state() is CLOSED
    breaker.quarantine(OpenReason.REJECTED)
    breaker.schedule_recheck(5.0)
    breaker.reset()
    assert breaker.recheck_at is None
    breaker.quarantine(OpenReason.REJECTED)
    clock.advance(YEAR)
    assert breaker.state() is OPEN  # a new quarantine has no recheck unless one is scheduled


def test_trip_keeps_a_quarantine_and_its_reason(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.quarantine(OpenReason.QUOTA)
    breaker.force_open()
    snap = breaker.snapshot()
    assert (snap.quarantined, snap.open_reason, snap.trips) == (True, OpenReason.QUOTA, 1)
    clock.advance(YEAR)
    assert breaker.state() is OPEN


def test_admits_at_when_throttled_over_a_full_half_open_breaker(clock: FakeClock) -> None:
    breaker = make(clock, probe_timeout=100)
    trip_and_half_open(breaker, clock)
    held = [breaker.try_acquire() for _ in range(3)]
    assert all(p is not None for p in held)
    breaker.throttle(10.0)
    # The throttle ends first, but the three trial slots are still taken then: the earliest
    # admission is when the first of them expires.
    assert breaker.admits_at() == pytest.approx(clock.now() + 100.0)
    first = held[0]
    assert first is not None
    breaker.release(first)
    assert breaker.admits_at() == pytest.approx(clock.now() + 10.0)


def test_since_after_a_429_on_an_open_breaker_is_the_later_instant(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 5)  # open until 1060
    clock.advance(10)
    breaker.throttle(5.0)  # throttled until 1015, inside the open time
    clock.advance(100)
    snap = breaker.snapshot()
    assert snap.state is HALF_OPEN
    assert snap.since == pytest.approx(1060.0)  # half-open since the open time ended, not 1015
    breaker.throttle(200.0, None)  # now throttled until 1310, past nothing: open again
    clock.advance(300)
    assert breaker.snapshot().since == pytest.approx(1310.0)


def _closed(clock: FakeClock) -> CircuitBreaker:
    return make(clock)


def _open(clock: FakeClock) -> CircuitBreaker:
    breaker = make(clock)
    fail(breaker, 5)
    return breaker


def _half_open_with_trials(clock: FakeClock) -> CircuitBreaker:
    breaker = make(clock)
    trip_and_half_open(breaker, clock)
    breaker.try_acquire()
    breaker.try_acquire()
    return breaker


def _throttled(clock: FakeClock) -> CircuitBreaker:
    breaker = make(clock)
    breaker.throttle(3000)
    return breaker


def _throttled_over_open(clock: FakeClock) -> CircuitBreaker:
    breaker = _open(clock)
    breaker.throttle(3000)
    return breaker


def _quarantined(clock: FakeClock) -> CircuitBreaker:
    breaker = make(clock)
    breaker.quarantine(OpenReason.QUOTA)
    return breaker


@pytest.mark.parametrize(
    "build",
    [_closed, _open, _half_open_with_trials, _throttled, _throttled_over_open, _quarantined],
    ids=lambda f: f.__name__.strip("_"),
)
def test_reset_closes_from_every_state(
    clock: FakeClock, build: Callable[[FakeClock], CircuitBreaker]
) -> None:
    breaker = build(clock)
    breaker.reset()
    assert breaker.state() is CLOSED
    snap = breaker.snapshot()
    assert (snap.failure_count, snap.success_count, snap.trials_in_flight) == (0, 0, 0)
    assert not snap.quarantined
    assert snap.throttled_until is None
    assert snap.open_reason is None
    assert breaker.try_acquire() is not None
    clock.advance(YEAR)
    assert breaker.state() is CLOSED


def test_reset_makes_permits_in_flight_stale(clock: FakeClock) -> None:
    breaker = make(clock)
    permits = [breaker.try_acquire() for _ in range(5)]
    breaker.reset()
    for p in permits:
        assert p is not None
        breaker.record_failure(p)
    assert breaker.state() is CLOSED
    assert breaker.failure_count == 0


# ---------------------------------------------------------------------------------- throttle


def test_throttle_keeps_the_key_out_until_the_instant(clock: FakeClock) -> None:
    breaker = make(clock)
    until = breaker.throttle(30.0)
    assert until == 1030.0
    assert breaker.state() is OPEN
    assert breaker.snapshot().open_reason is OpenReason.THROTTLED
    clock.advance(29.999)
    assert breaker.try_acquire() is None
    clock.advance(0.001)
    assert breaker.state() is CLOSED
    assert breaker.snapshot().open_reason is None  # back by time alone: no reason lingers
    assert breaker.try_acquire() is not None
    assert [(t.new, t.at) for t in breaker.drain_transitions()] == [(OPEN, 1000.0), (CLOSED, 1030.0)]


def test_throttle_extends_but_never_shortens(clock: FakeClock) -> None:
    breaker = make(clock)
    assert breaker.throttle(30.0) == 1030.0
    clock.advance(5.0)
    assert breaker.throttle(10.0) == 1030.0  # would end at 1015: ignored
    assert breaker.throttle(0.0) == 1030.0
    assert breaker.throttle(60.0) == 1065.0  # extends
    clock.advance(59.0)
    assert breaker.state() is OPEN
    clock.advance(1.0)
    assert breaker.state() is CLOSED
    assert breaker.snapshot().trips == 1  # one throttle period, however often extended


@pytest.mark.parametrize("value", [None, -1.0, -0.001, math.nan])
def test_throttle_without_a_usable_retry_after_uses_the_default(
    clock: FakeClock, value: float | None
) -> None:
    breaker = make(clock, default_retry_after=7.0)
    assert breaker.throttle(value) == 1007.0
    assert breaker.state() is OPEN


@pytest.mark.parametrize("value", [1e9, math.inf])
def test_throttle_is_clamped_to_max_retry_after(clock: FakeClock, value: float) -> None:
    breaker = make(clock, max_retry_after=100.0)
    assert breaker.throttle(value) == 1100.0


def test_throttle_with_a_permit_frees_its_trial_slot(clock: FakeClock) -> None:
    breaker = make(clock)
    trip_and_half_open(breaker, clock)
    trial = breaker.try_acquire()
    assert trial is not None
    breaker.throttle(10.0, trial)
    assert breaker.state() is OPEN
    clock.advance(10.0)
    assert breaker.state() is HALF_OPEN
    assert breaker.trials_in_flight() == 0
    assert sum(breaker.try_acquire() is not None for _ in range(5)) == 3


def test_throttle_does_not_count_as_a_failure(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 4)
    permit = breaker.try_acquire()
    assert permit is not None
    breaker.throttle(1.0, permit)
    clock.advance(1.0)
    assert breaker.state() is CLOSED
    assert breaker.failure_count == 4


def test_throttle_over_an_open_breaker_holds_until_both_pass(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 5)  # open until 1060
    breaker.throttle(100.0)  # out until 1100
    assert breaker.next_transition_at() == 1100.0
    clock.advance(80.0)
    assert breaker.state() is OPEN
    assert breaker.try_acquire() is None
    clock.advance(20.0)
    assert breaker.state() is HALF_OPEN
    breaker.poll()
    assert [(t.old, t.new, t.at) for t in breaker.drain_transitions()] == [
        (CLOSED, OPEN, 1000.0),
        (OPEN, HALF_OPEN, 1100.0),
    ]


def test_throttle_shorter_than_the_open_time_changes_nothing_visible(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 5)
    breaker.throttle(10.0)
    clock.advance(10.0)
    assert breaker.state() is OPEN
    clock.advance(50.0)
    assert breaker.state() is HALF_OPEN


# ---------------------------------------------------------------------------------- generations


def test_stale_permit_from_before_a_trip_does_not_reopen_a_probing_breaker(clock: FakeClock) -> None:
    breaker = make(clock)
    early = breaker.try_acquire()
    assert early is not None
    fail(breaker, 5)
    clock.advance(60.0)
    assert breaker.state() is HALF_OPEN
    breaker.record_failure(early)
    assert breaker.state() is HALF_OPEN
    breaker.record_success(early)
    assert breaker.snapshot().success_count == 0


def test_stale_closed_permit_success_does_not_count_as_a_trial(clock: FakeClock) -> None:
    breaker = make(clock)
    stale = [breaker.try_acquire() for _ in range(3)]
    fail(breaker, 5)
    clock.advance(60.0)
    for p in stale:
        assert p is not None
        breaker.record_success(p)
    assert breaker.state() is HALF_OPEN


def test_permit_generation_changes_with_state(clock: FakeClock) -> None:
    breaker = make(clock)
    first = breaker.try_acquire()
    assert isinstance(first, Permit)
    assert not first.trial
    fail(breaker, 5)
    clock.advance(60.0)
    trial = breaker.try_acquire()
    assert trial is not None
    assert trial.generation != first.generation


# ---------------------------------------------------------------------------------- config


def test_update_config_keeps_state(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 5)
    before = breaker.snapshot()
    breaker.update_config(BreakerConfig(failure_threshold=2, timeout=10, max_timeout=10))
    after = breaker.snapshot()
    assert after.state is OPEN
    assert (after.trips, after.open_reason, after.since) == (before.trips, before.open_reason, before.since)
    # the running open period keeps its deadline; the new timeout applies to the next trip
    assert breaker.next_transition_at() == 1060.0
    clock.advance(60.0)
    succeed(breaker, 2)
    fail(breaker, 2)
    assert breaker.state() is OPEN
    assert open_duration(breaker, clock) == 10.0


def test_update_config_keeps_failure_count(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 3)
    breaker.update_config(BreakerConfig(failure_threshold=10))
    assert breaker.failure_count == 3
    assert breaker.config.failure_threshold == 10
    fail(breaker, 6)
    assert breaker.state() is CLOSED
    fail(breaker)
    assert breaker.state() is OPEN


def test_update_config_half_open_max_calls_applies_to_the_next_admission(clock: FakeClock) -> None:
    breaker = make(clock)
    trip_and_half_open(breaker, clock)
    assert breaker.try_acquire() is not None
    breaker.update_config(BreakerConfig(half_open_max_calls=1))
    assert breaker.try_acquire() is None
    assert breaker.state() is HALF_OPEN


def test_force_open(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.force_open()
    assert breaker.state() is OPEN
    clock.advance(60.0)
    assert breaker.state() is HALF_OPEN


def test_snapshot_fields(clock: FakeClock) -> None:
    breaker = make(clock)
    fail(breaker, 2)
    succeed(breaker)
    fail(breaker)
    snap = breaker.snapshot()
    assert snap.state is CLOSED
    assert snap.failure_count == 1
    assert (snap.total_failures, snap.total_successes, snap.trips) == (3, 1, 0)
    assert snap.admits_at == clock.now()
    assert snap.next_transition_at is None
    assert snap.throttled_until is None
    assert repr(breaker) == "CircuitBreaker(state=closed, failures=1, trips=0)"


def _walk(breaker: CircuitBreaker, clock: FakeClock) -> Iterator[BreakerState]:
    fail(breaker, 5)
    yield breaker.state()
    clock.advance(60)
    yield breaker.state()
    succeed(breaker, 2)
    yield breaker.state()


def test_the_runbook_cycle(clock: FakeClock) -> None:
    assert list(_walk(make(clock), clock)) == [OPEN, HALF_OPEN, CLOSED]


def test_a_throttle_without_retry_after_is_marked_as_a_guess(clock: FakeClock) -> None:
    b = make(clock, default_retry_after=5.0)
    b.throttle(None)
    assert b.throttle_guessed  # its end is default_retry_after: not worth waiting for
    b.throttle(8.0)  # a later 429 that says when: the instant is the server's
    assert not b.throttle_guessed
    b.reset()
    b.throttle(float("nan"))  # an unreadable header is no header
    assert b.throttle_guessed
    clock.advance(5.0)
    b.state()
    assert b.can_admit()
    b.poll()
    assert not b.throttle_guessed  # the throttle is over
