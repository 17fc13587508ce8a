"""One simulated run per call: the measurements the threshold study repeats over seeds.

Each function builds a small :class:`~keypool.sim.Scenario`, runs it once with ``seed`` and
returns plain numbers (so runs can go to worker processes and the results stay JSON). Every run
draws its own phases and outage lengths from ``seed``: one seed, one result, on any machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from .._events import CallRecorded, PoolEvent
from ._engine import Simulation, simulate
from ._scenario import Scenario

__all__ = ["MEASURES"]

PROVIDER = "p"


def _scenario(
    *,
    keys: int = 1,
    breaker: dict[str, Any] | None = None,
    rate: float = 50.0,
    arrivals: str = "uniform",
    faults: list[dict[str, Any]] | None = None,
    duration: float,
    attempt_timeout: float = 10.0,
    retries: int = 2,
) -> Scenario:
    """A one-provider scenario. ``retries`` is the client's ``max_retries`` (openai's default 2);
    the measurements checked against per-attempt exact figures send one attempt per request (0)."""
    return Scenario.parse(
        {
            "providers": [{"name": PROVIDER, "keys": keys, "breaker": breaker or {}}],
            "traffic": [
                {
                    "provider": PROVIDER,
                    "rate": rate,
                    "arrivals": arrivals,
                    "attempt_timeout": attempt_timeout,
                    "retries": retries,
                }
            ],
            "faults": faults or [],
            "duration": duration,
        }
    )


def _rng(seed: int, what: str) -> random.Random:
    return random.Random(f"keypool.study:{seed}:{what}")


def first_trip(*, seed: int, k: int, p: float, rate: float, keys: int, window: float, arrivals: str) -> Any:
    """Seconds until the first failure trip of any key under an i.i.d. mix (None: none in ``window``).

    One key: one attempt per request, so the attempts are exactly the arrivals. A pool: failover
    to another key as the client does it (a failure is retried on a clean key for free).
    """
    scenario = _scenario(
        keys=keys,
        breaker={"failure_threshold": k},
        rate=rate,
        arrivals=arrivals,
        faults=[{"kind": "failure_rate", "p": p}],
        duration=window,
        retries=0 if keys == 1 else 2,
    )
    return simulate(scenario, seed, stop_at_first_trip=True).first_trip()


def _outage_fault(mode: str, start: float, end: float | None, keys: list[str] | None) -> dict[str, Any]:
    fault: dict[str, Any] = {"kind": "outage", "start": start, "end": end, "keys": keys}
    if mode == "timeout":
        fault["status"] = None  # the upstream stops answering: attempts time out
    return fault


def time_to_trip(*, seed: int, k: int, setup: str, mode: str) -> dict[str, Any]:
    """A persistent outage starts at t0: how long until the dead keys open, and what it cost."""
    keys = 1 if setup == "one_key" else 5
    dead = ["key-1"] if setup != "all_five" else [f"key-{i}" for i in range(1, 6)]
    t0 = 2.0 + _rng(seed, "t0").random()
    horizon = t0 + (15.0 if mode == "timeout" else 5.0)
    scenario = _scenario(
        keys=keys,
        breaker={"failure_threshold": k},
        rate=50.0,
        arrivals="uniform" if keys == 1 else "poisson",
        faults=[_outage_fault(mode, t0, None, dead)],
        duration=horizon,
    )
    result = simulate(scenario, seed)
    delays = [trip - t0 for key in dead if (trip := result.first_trip(key, after=t0)) is not None]
    return {
        "delays": delays,
        "all_open": max(delays) if len(delays) == len(dead) else None,
        "wasted": sum(result.attempts_of(key, "failure") for key in dead),
    }


def recovery(*, seed: int, timeout: float, s: int, outage: str, p_after: float) -> dict[str, Any]:
    """One key trips in an outage that heals at t1: when is it closed again?

    ``outage="blip"``: 5 s, shorter than any timeout; ``"long"``: 30-300 s, so the heal falls at a
    random point of the open/half-open cycle. ``p_after`` is the failure rate around the outage.
    """
    rng = _rng(seed, "outage")
    t0 = 5.0 + rng.random()
    length = 5.0 if outage == "blip" else rng.uniform(30.0, 300.0)
    t1 = t0 + length
    faults = [_outage_fault("fast", t0, t1, None)]
    if p_after > 0:
        faults.append({"kind": "failure_rate", "p": p_after})
    scenario = _scenario(
        breaker={"failure_threshold": 5, "timeout": timeout, "success_threshold": s},
        faults=faults,
        duration=t1 + 40 * timeout,
    )
    sim = Simulation(scenario, seed)
    sim.stop_when_closed(after=t1)
    result = sim.run()
    trip = result.first_trip("key-1", after=t0)
    closed = result.closed_at("key-1", after=t1)
    episodes = sum(1 for c in result.transitions if c.new == "half_open" and c.t >= t1)
    return {
        "trip": None if trip is None else trip - t0,
        "after_heal": None if closed is None else closed - t1,
        "out_of_service": None if closed is None or trip is None else closed - trip,
        "episodes_after_heal": episodes,
    }


def flapping(*, seed: int, k: int, p: float, timeout: float, s: int, window: float) -> dict[str, Any]:
    """Transitions per minute of one key at 50 attempts/s (one per request) under an i.i.d. failure
    rate ``p``, to compare with the renewal figure."""
    scenario = _scenario(
        breaker={"failure_threshold": k, "timeout": timeout, "success_threshold": s},
        faults=[{"kind": "failure_rate", "p": p}],
        duration=window,
        retries=0,
    )
    result = simulate(scenario, seed)
    return {"per_minute": result.transitions_of() * 60.0 / window, "trips": len(result.trips())}


def flapping_upstream(
    *, seed: int, k: int, timeout: float, down: float, up: float, window: float
) -> dict[str, Any]:
    """Transitions per minute when the upstream alternates ``down`` s broken and ``up`` s healthy."""
    phase = _rng(seed, "phase").random() * (down + up)
    scenario = _scenario(
        breaker={"failure_threshold": k, "timeout": timeout},
        faults=[{"kind": "flapping", "down": down, "up": up, "phase": phase}],
        duration=window,
    )
    result = simulate(scenario, seed)
    return {"per_minute": result.transitions_of() * 60.0 / window, "trips": len(result.trips())}


def throttle_flapping(*, seed: int, p: float, retry_after: float, window: float) -> dict[str, Any]:
    """Transitions per minute when a share ``p`` of calls gets 429 with a short Retry-After."""
    scenario = _scenario(
        faults=[{"kind": "throttle", "p": p, "retry_after": retry_after}],
        duration=window,
    )
    result = simulate(scenario, seed)
    return {"per_minute": result.transitions_of() * 60.0 / window}


def outage_waste(*, seed: int, k: int, timeout: float, m: int, mode: str, length: float) -> dict[str, Any]:
    """A provider-wide outage of ``length`` s on 4 keys at 50 req/s: attempts that hit the dead upstream."""
    t0 = 5.0 + _rng(seed, "t0").random()
    scenario = _scenario(
        keys=4,
        breaker={"failure_threshold": k, "timeout": timeout, "half_open_max_calls": m},
        arrivals="poisson",
        faults=[_outage_fault(mode, t0, t0 + length, None)],
        duration=t0 + length,
    )
    result = simulate(scenario, seed)
    return {"wasted": result.wasted_attempts, "failed_requests": result.failed + result.refused}


def half_open(*, seed: int, m: int, s: int, mode: str, timeout: float) -> dict[str, Any]:
    """One key at 50 req/s, answers taking 1 s; an outage of 60-240 s (503 after 0.2 s, or no
    answer until the 10 s attempt timeout). Trials wasted per half-open episode while still down,
    and how long after the heal the key is closed."""
    rng = _rng(seed, "outage")
    t0 = 5.0 + rng.random()
    t1 = t0 + rng.uniform(60.0, 240.0)
    outage = _outage_fault(mode, t0, t1, None)
    if mode == "fast":
        outage["latency"] = 0.2
    scenario = _scenario(
        breaker={
            "failure_threshold": 5,
            "timeout": timeout,
            "success_threshold": s,
            "half_open_max_calls": m,
        },
        faults=[outage, {"kind": "latency", "mean": 1.0}],
        duration=t1 + 40 * timeout,
    )
    trial_failures = [0]

    def count(event: PoolEvent) -> None:
        if isinstance(event, CallRecorded) and event.trial and event.outcome.value == "failure":
            trial_failures[0] += 1

    sim = Simulation(scenario, seed, hooks=[count])
    sim.stop_when_closed(after=t1)
    result = sim.run()
    episodes = sum(1 for c in result.transitions if c.new == "half_open" and t0 <= c.t < t1)
    closed = result.closed_at("key-1", after=t1)
    return {
        "trial_failures": trial_failures[0],
        "episodes": episodes,
        "after_heal": None if closed is None else closed - t1,
    }


MEASURES: dict[str, Callable[..., Any]] = {
    "first_trip": first_trip,
    "time_to_trip": time_to_trip,
    "recovery": recovery,
    "flapping": flapping,
    "flapping_upstream": flapping_upstream,
    "throttle_flapping": throttle_flapping,
    "outage_waste": outage_waste,
    "half_open": half_open,
}
