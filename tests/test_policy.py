"""RequestPlan and CallSettings: a request's decisions between attempts, on a fake clock."""

from __future__ import annotations

import math
import random

import pytest

from keypool import CallSettings, ConfigError, Outcome, OutcomeKind
from keypool._budget import RequestBudget
from keypool._policy import RequestPlan, deadline_of
from keypool.testing import FakeClock

FAIL = Outcome(OutcomeKind.FAILURE, 503)
THROTTLED = Outcome(OutcomeKind.THROTTLED, 429, 2.0)
HEADERLESS = Outcome(OutcomeKind.THROTTLED, 429)
REJECTED = Outcome(OutcomeKind.REJECTED, 401)
BAD = Outcome(OutcomeKind.CALLER_ERROR, 400)


def plan(total: float | None = 60.0, keys: int = 3, **settings: object) -> RequestPlan:
    p = RequestPlan.start(
        1000.0,
        total=total,
        settings=CallSettings(**settings),
        keys=keys,
        replayable=True,  # type: ignore[arg-type]
    )
    p.rng = random.Random(1)
    return p


def test_the_deadline_is_the_longest_phase_of_openais_timeout() -> None:
    assert deadline_of({"connect": 5.0, "read": 600.0, "write": 600.0, "pool": 600.0}) == 600.0
    assert deadline_of(dict.fromkeys(("connect", "read", "write", "pool"), 0.5)) == 0.5
    assert deadline_of({"connect": 5.0, "read": None, "write": 600.0, "pool": 600.0}) is None
    assert deadline_of(None) is None


def test_attempt_limits_keep_connect_cap_reads_at_the_headers_limit_and_nothing_outlasts_the_deadline() -> (
    None
):
    p = plan(total=600.0)
    limits = p.attempt_limits(1000.0, {"connect": 5.0, "read": 600.0, "write": 600.0, "pool": 600.0})
    assert limits == {"connect": 5.0, "read": 300.0, "write": 600.0, "pool": 600.0}  # auto: half
    streamed = plan(total=600.0)
    streamed.stream = True
    assert streamed.attempt_limits(1000.0, {"read": 600.0})["read"] == 30.0
    late = p.attempt_limits(1599.0, {"connect": 5.0, "read": 600.0, "write": 600.0, "pool": 600.0})
    assert late == {"connect": 1.0, "read": 1.0, "write": 1.0, "pool": 1.0}
    assert p.deadline_bound  # an attempt that times out now ran into the caller's own deadline


def test_a_first_failure_beside_a_clean_key_is_free_and_the_next_in_a_row_costs_a_retry() -> None:
    p = plan(keys=4, retries=1)
    assert p.begin("a", "x")
    assert p.retry_after(FAIL, 1000.0, healthy_elsewhere=True)
    assert (p.retries_left, p.pause_due) == (1, 0.0)  # moves on at once
    assert p.begin("b", "x")
    assert p.retry_after(FAIL, 1000.0, healthy_elsewhere=True)  # two in a row: the endpoint's
    assert p.retries_left == 0
    assert 0.25 <= p.pause_due <= 0.375  # and the next attempt waits openai's first backoff
    assert p.begin("c", "x")
    assert not p.retry_after(FAIL, 1000.0, healthy_elsewhere=True)  # max_retries=1 is spent


def test_key_scope_outcomes_move_on_for_free_and_caller_errors_never_do() -> None:
    p = plan(retries=0)
    for key in ("a", "b"):
        assert p.begin(key, "x")
        assert p.retry_after(REJECTED, 1000.0)
    assert p.retries_left == 0
    assert p.pause_due == 0.0
    assert not p.retry_after(BAD, 1000.0)


def test_consecutive_throttles_back_off_like_openais_retry_of_a_429() -> None:
    p = plan(keys=5, retries=2)
    pauses = []
    for key in "abcd":
        assert p.begin(key, "x")
        if not p.retry_after(HEADERLESS, 1000.0):
            break
        pauses.append(p.take_pause(1000.0))
    assert pauses[0] == 0.0  # the first 429 may be this key's alone
    assert [0.5 <= d / b <= 0.75 for d, b in zip(pauses[1:], (0.5, 1.0), strict=True)] == [True, True]
    assert len(pauses) == 3
    assert p.retries_left == 0


def test_attempts_that_cost_a_retry_wait_openais_backoff_then_stop() -> None:
    p = plan(keys=1, retries=3)
    delays = []
    for _ in range(3):
        assert p.begin("a", "x")
        assert p.retry_after(FAIL, 1000.0)
        pause = p.take_pause(1000.0)
        assert pause is not None
        assert p.look_again(1000.0) == 0.0  # the backoff is paid once, not twice
        delays.append(pause)
    for delay, base in zip(delays, (0.5, 1.0, 2.0), strict=True):
        assert 0.5 * base <= delay <= 0.75 * base  # never longer than the plain client's shortest
    assert p.begin("a", "x")
    assert not p.retry_after(FAIL, 1000.0)


def test_look_again_after_a_throttle_costs_a_retry_and_nothing_outlasts_the_deadline() -> None:
    p = plan(keys=1, retries=1, max_attempts=5)
    assert p.begin("a", "x")
    assert p.retry_after(THROTTLED, 1000.0)
    assert p.look_again(1000.0) == 0.0  # the pool waits for the Retry-After if it may
    assert p.retries_left == 0
    assert p.begin("a", "x")
    assert not p.retry_after(THROTTLED, 1000.0)  # a second 429 in a row needs a retry: none left
    short = plan(total=0.2, keys=1, retries=2)
    assert short.begin("a", "x")
    assert short.retry_after(FAIL, 1000.0)
    assert short.take_pause(1000.0) is None  # a 0.5 s backoff would pass the deadline


def test_with_another_route_a_failing_or_silent_provider_is_left_at_once() -> None:
    budget = RequestBudget(attempts_left=10, deadline=None, clock=FakeClock(), fallback=True)

    def routed() -> RequestPlan:
        p = RequestPlan.start(
            1000.0, total=60.0, settings=CallSettings(), keys=4, replayable=True, shared=budget
        )
        assert p.begin("a", "x")
        return p

    first = routed()
    assert first.retry_after(FAIL, 1000.0, healthy_elsewhere=True)  # maybe the key's: one more key
    assert first.begin("b", "x")
    assert not first.retry_after(FAIL, 1000.0, healthy_elsewhere=True)  # twice: the provider's
    assert not routed().retry_after(FAIL, 1000.0)  # no clean key beside it: the provider's
    silent = Outcome(OutcomeKind.FAILURE, detail="ReadTimeout")
    assert not routed().retry_after(silent, 1000.0, healthy_elsewhere=True)
    throttled = routed()
    assert throttled.retry_after(THROTTLED, 1000.0)
    assert throttled.begin("b", "x")
    assert not throttled.retry_after(THROTTLED, 1000.0)  # an account's limit: go elsewhere
    assert routed().retry_after(REJECTED, 1000.0)  # a key's own refusal still moves to a key


def test_a_throttle_without_retry_after_waits_no_longer_than_openais_backoff() -> None:
    p = plan(keys=1, retries=2, max_attempts=5, max_wait=5.0)
    assert p.max_wait(9.0) == 5.0  # the call's own max_wait
    assert p.begin("a", "x")
    assert p.retry_after(Outcome(OutcomeKind.THROTTLED, 429), 1000.0)  # no Retry-After header
    assert p.look_again(1000.0) == 0.0
    assert 0.25 <= p.max_wait(9.0) <= 0.375  # the keys' recovery is a guess: within openai's first backoff
    assert p.begin("a", "x")
    assert p.retry_after(THROTTLED, 1000.0)  # this one said when: max_wait governs again
    assert p.look_again(1000.0) == 0.0
    assert p.max_wait(9.0) == 5.0
    assert plan().max_wait(9.0) == 9.0  # no max_wait of its own: the provider's


def test_only_a_connect_whose_limit_was_the_deadline_is_the_callers_timeout() -> None:
    p = plan(total=10.0, headers_timeout=30.0)
    p.attempt_limits(1000.0, {"connect": 0.2, "read": 10.0, "write": 10.0, "pool": 10.0})
    assert p.at_deadline("ReadTimeout")  # a read limit of 10 s is the caller's deadline
    assert not p.at_deadline("ConnectTimeout")  # a 0.2 s connect limit is not
    p.attempt_limits(1009.9, {"connect": 0.2, "read": 10.0, "write": 10.0, "pool": 10.0})
    assert p.at_deadline("ConnectTimeout")  # 0.1 s left: the connect ran into the deadline


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("retries", -1),
        ("retries", True),
        ("max_attempts", 0),
        ("max_wait", -0.5),
        ("max_wait", math.nan),
        ("headers_timeout", 0),
        ("headers_timeout", "soon"),
        ("attempt_timeout", -1),
        ("stream_idle_timeout", 0),
    ],
)
def test_bad_settings_name_the_option(field: str, value: object) -> None:
    name = "max_retries" if field == "retries" else field
    with pytest.raises(ConfigError, match=name):
        CallSettings(**{field: value})  # type: ignore[arg-type]


def test_merged_refuses_unknown_settings() -> None:
    with pytest.raises(ConfigError, match="allowed"):
        CallSettings().merged({"request_timeout": 5})


def test_a_timeout_at_the_attempts_own_cap_is_the_keys_even_late_in_the_call() -> None:
    p = plan(total=3.0, attempt_timeout=1.0)  # headers limit: half the deadline, 1.5 s
    p.attempt_limits(1001.5, None)  # 1.5 s left: reads end at the deadline, but the cap is 1 s
    assert not p.deadline_bound  # a hang ended by the 1 s cap counts against the key
    p.attempt_limits(1002.2, None)  # 0.8 s left: the caller's deadline ends it first
    assert p.deadline_bound
