"""keypool.sim: the exact run-length figures, the simulator against them, determinism, scenarios."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keypool import ConfigError
from keypool.sim import (
    Scenario,
    clopper_pearson,
    expected_attempts_to_run,
    poisson_run_probability,
    run_probability,
    run_probability_curve,
    simulate,
)


def brute_force(n: int, k: int, p: float) -> float:
    """P(a run of k failures) by summing over all 2^n outcome sequences."""
    total = 0.0
    for seq in itertools.product((0, 1), repeat=n):
        if "1" * k in "".join(map(str, seq)):
            fails = sum(seq)
            total += p**fails * (1 - p) ** (n - fails)
    return total


@pytest.mark.parametrize(("n", "k", "p"), [(1, 1, 0.3), (5, 2, 0.5), (10, 3, 0.2), (12, 4, 0.7), (3, 5, 0.9)])
def test_exact_matches_enumeration(n: int, k: int, p: float) -> None:
    assert run_probability(n, k, p) == pytest.approx(brute_force(n, k, p), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 12), p=st.floats(0.01, 0.99), n=st.integers(0, 3000))
def test_matrix_power_and_recursion_agree(k: int, p: float, n: int) -> None:
    from keypool.sim._exact import _matrix_power_probability

    by_recursion = run_probability_curve(n, k, p)[n]
    assert _matrix_power_probability(n, k, p) == pytest.approx(by_recursion, rel=1e-9, abs=1e-15)
    assert run_probability(n, k, p) <= run_probability(n + 1, k, p) + 1e-15  # monotone in n


def test_the_issues_reference_values() -> None:
    """p = 0.05 at 50 attempts/s: per 5 minutes 83 %, 0.44 %, 0.001 %; per minute 30 %, 0.09 %, 0.0002 %."""
    five, one = 50 * 300, 50 * 60
    assert run_probability(five, 3, 0.05) == pytest.approx(0.83, abs=0.005)
    assert run_probability(five, 5, 0.05) == pytest.approx(0.0044, abs=0.00005)
    assert run_probability(five, 7, 0.05) == pytest.approx(0.0000111, rel=0.01)
    assert run_probability(one, 3, 0.05) == pytest.approx(0.30, abs=0.005)
    assert run_probability(one, 5, 0.05) == pytest.approx(0.00089, rel=0.01)
    assert run_probability(one, 7, 0.05) == pytest.approx(0.00000222, rel=0.01)
    # A day at 50 attempts/s is 4.32 million attempts; the mean wait is the closed form.
    assert 0 < run_probability(4_320_000, 10, 0.05) < 1e-6
    assert expected_attempts_to_run(5, 0.05) == pytest.approx((1 - 0.05**5) / (0.95 * 0.05**5))


def test_edges_and_bad_input() -> None:
    assert run_probability(2, 3, 0.5) == 0.0
    assert run_probability(3, 3, 1.0) == 1.0
    assert run_probability(100, 3, 0.0) == 0.0
    for args, field in (
        ((10, 3, 1.5), "failure_rate"),
        ((10, 0, 0.5), "failure_threshold"),
        ((-1, 3, 0.5), "attempts"),
        ((10, 3, -0.1), "failure_rate"),
    ):
        with pytest.raises(ConfigError, match=field):
            run_probability(*args)
    assert poisson_run_probability(100.0, 3, 0.5) == pytest.approx(
        sum(
            math.exp(m * math.log(100) - 100 - math.lgamma(m + 1)) * run_probability(m, 3, 0.5)
            for m in range(250)
        ),
        rel=1e-9,
    )
    lo, hi = clopper_pearson(0, 20, 0.99)
    assert lo == 0.0
    assert hi == pytest.approx(1 - 0.005 ** (1 / 20), rel=1e-6)


def one_key(k: int, p: float, duration: float, rate: float = 50.0, keys: int = 1) -> Scenario:
    return Scenario.parse(
        {
            "providers": [{"name": "p", "keys": keys, "breaker": {"failure_threshold": k}}],
            "traffic": [{"provider": "p", "rate": rate, "arrivals": "uniform"}],
            "faults": [{"kind": "failure_rate", "p": p}],
            "duration": duration,
        }
    )


def test_simulated_false_trips_agree_with_the_exact_figure() -> None:
    """k=3, p=0.3, 40 attempts per window (one key at 50/s for 0.8 s): 400 seeds."""
    k, p, n = 3, 0.3, 40
    scenario = one_key(k, p, duration=n / 50.0)
    trips = sum(
        simulate(scenario, seed, stop_at_first_trip=True).first_trip() is not None for seed in range(400)
    )
    lo, hi = clopper_pearson(trips, 400, 0.99)
    assert lo <= run_probability(n, k, p) <= hi
    # The test can fail: a breaker that tripped one failure early or late would not agree.
    assert not lo <= run_probability(n, k - 1, p) <= hi
    assert not lo <= run_probability(n, k + 1, p) <= hi


def test_a_run_is_deterministic_for_its_seed() -> None:
    scenario = one_key(3, 0.2, duration=60.0, keys=3)
    first, again, other = simulate(scenario, 7), simulate(scenario, 7), simulate(scenario, 8)
    assert first == again
    assert first.transitions
    assert first.transitions != other.transitions


def test_a_dead_key_wastes_exactly_its_threshold_and_heals_after_timeout() -> None:
    scenario = Scenario.parse(
        {
            "providers": [{"name": "p", "keys": 1, "breaker": {"failure_threshold": 4, "timeout": 30}}],
            "traffic": [{"provider": "p", "rate": 10, "arrivals": "uniform"}],
            "faults": [{"kind": "outage", "start": 5, "end": 20}],
            "duration": 60,
        }
    )
    result = simulate(scenario, 1)
    trip = result.first_trip("key-1", after=5)
    assert trip is not None
    assert 5 + 0.3 <= trip <= 5 + 0.4  # the 4th failure at 10 attempts/s
    assert result.attempts_of("key-1", "failure") == 4  # nothing reaches a dead key while it is open
    closed = result.closed_at("key-1", after=20)
    assert closed is not None
    assert trip + 30 <= closed <= trip + 30 + 0.25  # half-open at trip + timeout, two trial successes
    assert result.refused > 0


def test_caller_errors_and_throttles_never_trip() -> None:
    scenario = Scenario.parse(
        {
            "providers": [{"name": "p", "keys": 2, "breaker": {"failure_threshold": 1}}],
            "traffic": [{"provider": "p", "rate": 20}],
            "faults": [
                {"kind": "caller_errors", "p": 0.5},
                {"kind": "throttle", "p": 0.1, "retry_after": 2, "keys": ["key-1"]},
            ],
            "duration": 30,
        }
    )
    result = simulate(scenario, 3)
    assert result.trips() == []
    assert result.caller_errors > 100
    throttled = [s for s in result.transitions if s.reason == "throttled"]
    assert throttled
    assert all(s.key_id == "key-1" for s in throttled)


def test_stalls_time_out_at_the_attempt_timeout() -> None:
    scenario = Scenario.parse(
        {
            "providers": [{"name": "p", "keys": 1, "breaker": {"failure_threshold": 3}}],
            "traffic": [{"provider": "p", "rate": 10, "arrivals": "uniform", "attempt_timeout": 4}],
            "faults": [{"kind": "outage", "start": 1, "status": None}],
            "duration": 10,
        }
    )
    trip = simulate(scenario, 0).first_trip()
    assert trip is not None
    assert 5.0 <= trip <= 5.3


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"faults": [{"kind": "failure_rate", "p": 1.5}]}, "p"),
        ({"traffic": [{"provider": "p", "rate": -1}]}, "rate"),
        ({"faults": [{"kind": "outage", "start": 10, "end": 5}]}, "end"),
        ({"faults": [{"kind": "outage", "keys": ["nope"]}]}, "keys"),
        ({"traffic": [{"provider": "q"}]}, "provider"),
        ({"faults": [{"kind": "blips", "per_hour": 1, "duration": 0}]}, "duration"),
    ],
)
def test_impossible_scenarios_are_refused_with_the_field_named(change: dict[str, object], field: str) -> None:
    base: dict[str, object] = {
        "providers": [{"name": "p", "keys": 2}],
        "traffic": [{"provider": "p"}],
        "duration": 10,
    }
    with pytest.raises(ConfigError, match=field):
        Scenario.parse({**base, **change})


def test_quick_study_writes_an_agreeing_document(tmp_path: object) -> None:
    from pathlib import Path

    from keypool.sim._commands import RESULTS_FILE, study_command

    out = Path(str(tmp_path))
    doc = out / "doc.md"
    doc.write_text("intro\n<!-- study:exact -->\nold\n<!-- /study:exact -->\nend\n")
    assert study_command(out=str(out), doc=str(doc), quick=True, jobs=2) == 0
    data = json.loads((out / RESULTS_FILE).read_text())
    assert data["schema"] == "keypool-threshold-study/1"
    assert data["agreement"]["all_agree"]
    assert data["agreement"]["checked"] == 22
    assert {c["verdict"] for c in data["runbook_claims"]} >= {"holds", "wrong", "needs a window"}
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        [
            "false-trips.png",
            "false-trips-validation.png",
            "time-to-trip.png",
            "recovery.png",
            "transitions.png",
            "wasted-attempts.png",
        ]
    )
    text = doc.read_text()
    assert "\nold\n" not in text
    assert "| failure_threshold |" in text
    assert text.endswith("end\n")
