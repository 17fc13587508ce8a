"""``keypool tune``: candidate breaker settings, replayed against your traffic, ranked.

Input: an event log (:class:`~keypool.EventLog`) or a synthetic description (:class:`Workload`).
From it comes a *workload*: request rate, keys, each key's attempt rate and background failure
rate outside outages, answer times. Every candidate then gets, with the same seeds (so candidates
differ only by their settings):

* **false trips per day**, exact: the renewal rate of a lone key's trip cycle at its attempt rate
  and background failure rate (:func:`~keypool.sim.renewal_cycle`), summed over the keys;
* **detection delay**: simulated seconds from a key going dead (fast errors) to its breaker opening;
* **recovery**: simulated seconds from the heal of a 30-300 s outage to the breaker closing;
* **wasted attempts**: attempts sent to the dead key during a 5 minute outage, and, for a log, in
  the replay of the log itself (per hour of log).

Ranking: candidates within the false-trip budget first; among them the least detection delay plus
recovery (seconds a key is mis-handled per outage), then the fewest wasted attempts. The model has
no upstream that recovers more slowly when probed, nor one that comes back flaky; say so in your
reading of a short timeout.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from .._config import BreakerConfig, _Model
from .._errors import ConfigError
from .._outcome import OutcomeKind
from ._engine import Answers, Simulation
from ._exact import renewal_cycle
from ._replay import EventLogData, RecordedAnswers, median_or, request_instants
from ._scenario import Scenario

__all__ = ["Candidate", "Workload", "rank", "workload_from_log"]

_BIN = 5.0  # seconds: bins of a key's calls; a bin that mostly failed is an outage, not background


class Workload(_Model):
    """What the candidates are measured against (from a log, or described by hand)."""

    provider: str = "provider"
    rate: float = Field(gt=0.0, le=1_000_000.0, description="requests per second")
    keys: int = Field(1, ge=1, le=10_000)
    failure_rate: float = Field(0.0, ge=0.0, lt=1.0, description="background i.i.d. failure rate")
    latency: float = Field(0.0, ge=0.0, le=3600.0, description="seconds an answer takes")
    failure_latency: float = Field(0.0, ge=0.0, le=3600.0, description="seconds an error takes")
    key_rates: tuple[float, ...] = ()
    key_failure_rates: tuple[float, ...] = ()

    def per_key(self) -> list[tuple[float, float]]:
        """(attempts/s, failure rate) per key; by default failover spreads attempts evenly."""
        if self.key_rates:
            rates = self.key_failure_rates or (self.failure_rate,) * len(self.key_rates)
            return list(zip(self.key_rates, rates, strict=True))
        attempts = sum(self.failure_rate**j for j in range(self.keys))
        return [(self.rate * attempts / self.keys, self.failure_rate)] * self.keys


@dataclass
class Replay:
    """A log's calls of one provider, ready to run again under other settings."""

    scenario: Scenario
    answers: dict[tuple[str, str], Answers]
    hours: float
    errors: list[tuple[int, str]]


def workload_from_log(
    data: EventLogData, provider: str | None = None
) -> tuple[Workload, Replay, dict[str, Any]]:
    """The workload a log shows, a replay of it, and the breaker settings it ran with."""
    if not data.calls:
        raise ConfigError("event log: no call records (was the EventLog hook on the pool?)")
    providers = data.providers()
    name = provider or providers[0]
    if name not in providers:
        raise ConfigError(f"--provider: the log has no calls of {name!r} (it has {providers})")
    calls = [c for c in data.calls if c.provider == name]
    origin = min(c.start for c in calls)
    span = max(max(c.start + c.duration for c in calls) - origin, 1e-3)
    key_ids = [k for k, _ in data.keys(name)] or sorted({c.key_id for c in calls})
    for c in calls:
        if c.key_id not in key_ids:
            key_ids.append(c.key_id)
    rates, fail_rates = [], []
    for key in key_ids:
        mine = [c for c in calls if c.key_id == key]
        bins: dict[int, list[int]] = {}
        for c in mine:
            if c.kind in (OutcomeKind.SUCCESS, OutcomeKind.FAILURE):
                tally = bins.setdefault(int((c.start - origin) // _BIN), [0, 0])
                tally[c.kind is OutcomeKind.FAILURE] += 1
        healthy = [b for b in bins.values() if not (b[1] >= 3 and b[1] >= b[0])]
        ok, bad = sum(b[0] for b in healthy), sum(b[1] for b in healthy)
        rates.append((ok + bad) / max(len(healthy) * _BIN, _BIN) if healthy else len(mine) / span)
        fail_rates.append(bad / (ok + bad) if ok + bad else 0.0)
    instants = request_instants(calls)
    durations = [c.duration for c in calls if c.kind is OutcomeKind.SUCCESS]
    failures = [c.duration for c in calls if c.kind is OutcomeKind.FAILURE]
    current = data.breaker(name) or {}
    workload = Workload(
        provider=name,
        rate=max(len(instants) / span, 1e-6),
        keys=len(key_ids),
        failure_rate=statistics.fmean(fail_rates),
        latency=median_or(durations, 0.0),
        failure_latency=median_or(failures, 0.0),
        key_rates=tuple(rates),
        key_failure_rates=tuple(fail_rates),
    )
    scenario = Scenario.parse(
        {
            "providers": [{"name": name, "keys": key_ids, "breaker": current}],
            "traffic": [{"provider": name, "times": [t - origin for t in instants]}],
            "duration": span + 1.0,
        }
    )
    rng = random.Random("keypool.tune:replay")
    answers: dict[tuple[str, str], Answers] = {}
    for key in key_ids:
        mine = [c for c in calls if c.key_id == key]
        if not mine:
            mine = calls  # a key the log never used answers like the provider did
        throttle = median_or(data.throttles.get((name, key), []), 5.0)
        answers[(name, key)] = RecordedAnswers(mine, origin, window=5.0, throttle_seconds=throttle, rng=rng)
    return workload, Replay(scenario, answers, span / 3600.0, data.errors), current


@dataclass
class Candidate:
    """One breaker configuration and what it measured."""

    config: BreakerConfig
    false_trips_per_day: float = 0.0
    detection_s: float = 0.0
    recovery_s: float = 0.0
    outage_wasted: float = 0.0
    replay_wasted_per_hour: float | None = None
    replay_trips: float | None = None
    current: bool = False
    feasible: bool = True

    @property
    def cost_s(self) -> float:
        return self.detection_s + self.recovery_s

    def patch(self) -> dict[str, Any]:
        """The body of ``PATCH /api/v1/circuit-breaker/config`` that applies this candidate."""
        c = self.config
        return {
            "failure_threshold": c.failure_threshold,
            "success_threshold": c.success_threshold,
            "timeout": c.timeout,
            "half_open_max_calls": c.half_open_max_calls,
        }


def candidates(
    thresholds: Sequence[int],
    timeouts: Sequence[float],
    successes: Sequence[int],
    half_open: Sequence[int],
    current: dict[str, Any],
) -> list[BreakerConfig]:
    """Every combination, validated (a bad value raises :class:`ConfigError` naming the field)."""
    base = BreakerConfig().updated({k: v for k, v in current.items() if k in BreakerConfig.model_fields})
    configs = []
    for k, t, s, m in itertools.product(thresholds, timeouts, successes, half_open):
        configs.append(
            base.updated(
                {
                    "failure_threshold": k,
                    "timeout": t,
                    "success_threshold": s,
                    "half_open_max_calls": m,
                    "max_timeout": max(t, base.max_timeout),
                }
            )
        )
    return list(dict.fromkeys(configs))


def _one_key(
    workload: Workload, config: BreakerConfig, faults: list[dict[str, Any]], duration: float, rate: float
) -> Scenario:
    background = [{"kind": "failure_rate", "p": workload.failure_rate}] if workload.failure_rate else []
    latency = [{"kind": "latency", "mean": workload.latency}] if workload.latency else []
    return Scenario.parse(
        {
            "providers": [{"name": "p", "keys": 1, "breaker": config.model_dump()}],
            "traffic": [{"provider": "p", "rate": rate, "arrivals": "poisson"}],
            "faults": faults + background + latency,
            "duration": duration,
        }
    )


def _measure_outage(
    workload: Workload, config: BreakerConfig, seed: int, rate: float
) -> tuple[float, float, float]:
    """(detection delay, heal-to-close, attempts wasted) for one key's outage, one seed."""
    rng = random.Random(f"keypool.tune:{seed}")
    t0 = 10.0 + rng.random() * 10.0
    t1 = t0 + rng.uniform(30.0, 300.0)
    outage = {"kind": "outage", "start": t0, "end": t1, "latency": workload.failure_latency}
    scenario = _one_key(workload, config, [outage], t1 + 40 * config.timeout, rate)
    sim = Simulation(scenario, seed)
    sim.stop_when_closed(after=t1)
    result = sim.run()
    before = [c for c in result.transitions if c.t < t0]
    trips = result.trips("key-1", after=t0)  # a false trip may have opened it already, or be probing
    closed = result.closed_at("key-1", after=t1)
    detection = 0.0 if before and before[-1].new == "open" else trips[0].t - t0 if trips else t1 - t0
    recovery = (closed - t1) if closed is not None else 40 * config.timeout
    return detection, recovery, float(result.attempts_of("key-1", "failure"))


def evaluate(
    workload: Workload,
    configs: Sequence[BreakerConfig],
    *,
    replay: Replay | None = None,
    seeds: int = 12,
    budget: float = 1.0,
    current: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Candidate]:
    """Measure every configuration (same seeds for all) and return them ranked, best first."""
    if seeds < 1:
        raise ConfigError(f"--seeds: must be >= 1 (got {seeds})")
    per_key = workload.per_key()
    rate = statistics.fmean(r for r, _ in per_key)
    results = []
    for done, config in enumerate(configs, start=1):
        trips = 0.0
        for key_rate, p in per_key:
            if p > 0 and key_rate > 0:
                seconds, _ = renewal_cycle(
                    rate=key_rate,
                    k=config.failure_threshold,
                    p=p,
                    timeout=config.timeout,
                    success_threshold=config.success_threshold,
                )
                trips += 86_400.0 / seconds if math.isfinite(seconds) else 0.0
        outage = [_measure_outage(workload, config, seed, rate) for seed in range(seeds)]
        candidate = Candidate(
            config=config,
            false_trips_per_day=trips,
            detection_s=statistics.fmean(o[0] for o in outage),
            recovery_s=statistics.fmean(o[1] for o in outage),
            outage_wasted=statistics.fmean(o[2] for o in outage),
            feasible=trips <= budget,
        )
        if replay is not None:
            runs = [
                Simulation(replay.scenario.with_breaker(config), seed, answers=replay.answers).run()
                for seed in range(min(seeds, 3))
            ]
            candidate.replay_wasted_per_hour = (
                statistics.fmean(r.wasted_attempts for r in runs) / replay.hours
            )
            candidate.replay_trips = statistics.fmean(len(r.trips()) for r in runs)
        if current:
            candidate.current = all(candidate.patch().get(k) == current.get(k) for k in candidate.patch())
        results.append(candidate)
        if progress is not None:
            progress(done, len(configs))
    return rank(results)


def rank(results: Sequence[Candidate]) -> list[Candidate]:
    """Feasible first (by detection + recovery, then wasted attempts); the rest by false trips."""

    def key(c: Candidate) -> tuple[Any, ...]:
        if c.feasible:
            return (0, round(c.cost_s, 3), round(c.outage_wasted, 3), c.config.failure_threshold)
        return (1, c.false_trips_per_day, round(c.cost_s, 3))

    return sorted(results, key=key)


def plain_progress(done: int, total: int) -> None:
    """A plain progress bar on stderr, only when it is a terminal."""
    if not sys.stderr.isatty():
        return
    width = 30
    filled = int(width * done / total)
    sys.stderr.write(f"\rreplaying candidates [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()
