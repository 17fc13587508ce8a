"""keypool.sim waits and retries as the pool and the transport do: the busy queue, max_wait, the
client's retries with backoff, and refusals reported only for callers that were refused."""

from __future__ import annotations

from typing import Any

import pytest

from keypool import CallRejected, Outcome, OutcomeKind, PoolEvent, classify_status
from keypool.sim import Answer, Scenario, Simulation, simulate


def scenario(provider: dict[str, Any], traffic: dict[str, Any], faults: list[dict[str, Any]]) -> Scenario:
    return Scenario.parse(
        {
            "providers": [{"name": "p", **provider}],
            "traffic": [{"provider": "p", **traffic}],
            "faults": faults,
            "duration": 30.0,
        }
    )


def test_a_busy_key_serves_its_queue_first_come_until_the_deadline() -> None:
    """One call at a time, answers in 0.1 s, four callers 10 ms apart with a 0.35 s deadline: three
    are served back to back in arrival order; the fourth gets the key at 0.3 s with 0.05 s left,
    and its attempt is cut off by its own deadline (not counted against the key)."""
    busy = scenario(
        {"keys": [{"key_id": "a", "max_concurrency": 1}], "probation": 0.0},
        {"times": [0.0, 0.01, 0.02, 0.03], "request_timeout": 0.35, "retries": 0},
        [{"kind": "latency", "mean": 0.1}],
    )
    result = simulate(busy, 0)
    assert (result.served, result.failed, result.refused, result.waited) == (3, 1, 0, 3)
    assert result.attempts_of("a", "success") == 3
    assert result.attempts_of("a", "ignored") == 1
    # Ends at 0.1, 0.2, 0.3 and the deadline 0.38: waits of 0.09, 0.18 and 0.27 s were served in order.
    assert result.request_seconds == pytest.approx(0.1 + 0.19 + 0.28 + 0.35)
    assert not result.trips()


@pytest.mark.parametrize(
    ("provider_wait", "traffic_wait", "served", "refused"),
    [(None, None, 3, 0), (1.0, None, 1, 2), (None, 0.0, 0, 3), (1.0, 5.0, 3, 0)],
)
def test_a_down_key_is_waited_for_only_within_max_wait(
    provider_wait: float | None, traffic_wait: float | None, served: int, refused: int
) -> None:
    """The key trips at 0 and comes back at 3 s; callers at 0.5, 1 and 2.5 s are 2.5, 2 and 0.5 s
    from it. The provider's max_wait (5 s by default) decides, unless the traffic sets its own."""
    provider: dict[str, Any] = {"keys": 1, "breaker": {"failure_threshold": 1, "timeout": 3.0}}
    if provider_wait is not None:
        provider["max_wait"] = provider_wait
    traffic: dict[str, Any] = {"times": [0.0, 0.5, 1.0, 2.5], "retries": 0}
    if traffic_wait is not None:
        traffic["max_wait"] = traffic_wait
    down = scenario(provider, traffic, [{"kind": "outage", "end": 0.1}])
    rejected: list[PoolEvent] = []
    result = Simulation(down, 0, hooks=[rejected.append], fast_refusals=False).run()
    assert result.failed == 1  # the request that met the outage (no retry)
    assert (result.served, result.refused, result.waited) == (served, refused, served)
    assert result.refusals == ({"open": refused} if refused else {})
    # A caller that waited was never reported as refused; each refused one was, once, as "open".
    assert [e.reason for e in rejected if isinstance(e, CallRejected)] == ["open"] * refused


def test_fast_refusals_count_what_asking_the_pool_would() -> None:
    """The shortcut for arrivals while a key is out agrees with asking the pool every time."""
    flaky = scenario(
        {"keys": 2, "breaker": {"failure_threshold": 3, "timeout": 20.0}, "max_wait": 2.0},
        {"rate": 40.0},
        [{"kind": "blips", "per_hour": 400.0, "duration": 8.0}],
    )
    fast = Simulation(flaky, 3).run()
    slow = Simulation(flaky, 3, fast_refusals=False).run()
    assert fast.refused > 100  # the shortcut was taken
    assert (fast.requests, fast.served, fast.failed, fast.refused, fast.waited) == (
        slow.requests,
        slow.served,
        slow.failed,
        slow.refused,
        slow.waited,
    )
    assert fast.refusals == slow.refusals


def test_an_endpoint_failure_is_retried_on_the_same_key_after_the_clients_backoff() -> None:
    """One key answering 503: the request makes 1 + max_retries attempts, the second after 0.5 s
    and the third 1 s later (each less a quarter to a half: never longer than the openai client
    would wait)."""
    dead = scenario(
        {"keys": 1, "breaker": {"failure_threshold": 10}},
        {"times": [0.0], "retries": 2},
        [{"kind": "outage"}],
    )
    result = simulate(dead, 0)
    assert result.attempts_of("key-1", "failure") == 3
    assert result.failed == 1
    assert 0.5 * 1.5 <= result.request_seconds <= 0.75 * 1.5
    once = dead.traffic[0].model_copy(update={"retries": 0})
    no_retry = simulate(dead.model_copy(update={"traffic": (once,)}), 0)
    assert no_retry.attempts_of("key-1", "failure") == 1


def test_a_failure_moves_to_a_clean_key_for_free() -> None:
    """Two keys, one dead: a request that meets the dead key moves on to the other without
    spending a retry, so even with max_retries 0 nothing fails."""
    one_dead = scenario(
        {"keys": 2, "breaker": {"failure_threshold": 1000}},
        {"rate": 20.0, "retries": 0},
        [{"kind": "outage", "keys": ["key-1"]}],
    )
    result = simulate(one_dead, 1)
    assert result.attempts_of("key-1", "failure") > 100
    assert result.failed == 0
    assert result.served == result.requests


class _Script:
    """A key's answers in order: 503, then 200s, each after 0.1 s."""

    def __init__(self) -> None:
        self.failed = False

    def answer(self, t: float) -> Answer:
        if self.failed:
            return Answer(Outcome(OutcomeKind.SUCCESS, 200), 0.1)
        self.failed = True
        return Answer(classify_status(503), 0.1)


def test_a_retry_that_waited_with_its_key_left_out_then_looks_again_at_that_key() -> None:
    """As the transport does (test_transport has the same request): one key, threshold 1, the
    first 503 trips the key and the provider; after the client's backoff the retry leaves the key
    out and waits for the provider's recovery; when it comes no other key can serve, so the keys
    already tried are looked at again: the key's trial serves it (it does not fail for want of a
    key)."""
    breaker = {"failure_threshold": 1, "timeout": 0.5, "max_timeout": 0.5, "success_threshold": 1}
    one = scenario({"keys": 1, "breaker": breaker}, {"times": [0.0], "request_timeout": 5.0}, [])
    result = Simulation(one, 0, answers={("p", "key-1"): _Script()}).run()
    assert (result.served, result.failed, result.refused, result.waited) == (1, 0, 0, 1)
    assert result.attempts_of("key-1", "failure") == result.attempts_of("key-1", "success") == 1
    assert result.request_seconds == pytest.approx(0.1 + 0.5 + 0.1)  # fails, recovers, serves


def test_a_guessed_recovery_is_waited_for_no_longer_than_the_clients_backoff() -> None:
    """As the transport does (test_transport has the same request): one key, a 429 without
    Retry-After keeps it out for the default 1 s, longer than the backoff (0.25 to 0.375 s) that
    caps the wait once the key is looked at again: the request fails at once, unserved."""
    guessed = scenario(
        {"keys": 1, "breaker": {"default_retry_after": 1.0}},
        {"times": [0.0], "request_timeout": 5.0},
        [{"kind": "throttle", "retry_after": None, "end": 0.5}],
    )
    result = simulate(guessed, 0)
    assert (result.served, result.failed, result.refused, result.waited) == (0, 1, 0, 0)
    assert result.attempts_of("key-1", "throttled") == 1
    assert result.request_seconds == 0.0
