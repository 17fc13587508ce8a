"""Fault processes at run time: what the upstream answers one attempt on one key at one instant.

A scenario's fault models are compiled into small objects with one method, ``answer(t)``, that
returns an :class:`Answer` (the outcome the pool will record and how long it takes to arrive) or
``None`` to let the next process decide. Every process draws from its own random stream, seeded
from the run's seed, the fault's position and the key, so adding a key or a fault does not change
what the others draw. The statuses are classified by keypool's own :func:`~keypool.classify_status`
and a silent upstream by :func:`~keypool.classify_exception` of a read timeout, exactly as the
transport would.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import httpx2

from .._outcome import Outcome, OutcomeKind, classify_exception, classify_status
from ._scenario import (
    Blips,
    CallerErrors,
    FailureRate,
    Fault,
    Flapping,
    Latency,
    Outage,
    Scenario,
    Throttle,
)

__all__ = ["Answer", "FaultProcess", "KeyFaults", "compile_faults"]

TIMEOUT_OUTCOME = classify_exception(httpx2.ReadTimeout("simulated: no answer in time"))


@dataclass(frozen=True, slots=True)
class Answer:
    """An attempt's fate: the outcome recorded on its lease, ``latency`` seconds after it started.

    ``latency=None`` means the upstream never answers: the attempt fails at its attempt timeout.
    """

    outcome: Outcome
    latency: float | None

    @property
    def kind(self) -> OutcomeKind:
        return self.outcome.kind


SUCCESS = Outcome(OutcomeKind.SUCCESS, 200)


class FaultProcess(Protocol):
    """Decides attempts on one key: an :class:`Answer`, or ``None`` to let the next one decide."""

    def answer(self, t: float) -> Answer | None: ...


def _error(status: int | None, latency: float) -> Answer:
    if status is None:
        return Answer(TIMEOUT_OUTCOME, None)
    return Answer(classify_status(status), latency)


class _Window:
    __slots__ = ("end", "start")

    def __init__(self, start: float, end: float | None) -> None:
        self.start = start
        self.end = math.inf if end is None else end


class _Random(_Window):
    """Fires with probability ``p`` inside its window (i.i.d. failures, throttles, caller errors)."""

    __slots__ = ("_answer", "_p", "_rng")

    def __init__(self, fault: FailureRate | Throttle | CallerErrors, answer: Answer, rng: random.Random):
        super().__init__(fault.start, fault.end)
        self._p = fault.p
        self._answer = answer
        self._rng = rng.random

    def answer(self, t: float) -> Answer | None:
        if self.start <= t < self.end and self._rng() < self._p:
            return self._answer
        return None


class _Periods(_Window):
    """Fires inside any of a sorted list of [start, end) periods (outages, blips)."""

    __slots__ = ("_answer", "_ends", "_starts")

    def __init__(self, periods: Sequence[tuple[float, float]], answer: Answer, window: _Window) -> None:
        super().__init__(window.start, None if window.end == math.inf else window.end)
        self._starts = [a for a, _ in periods]
        self._ends = [b for _, b in periods]
        self._answer = answer

    def answer(self, t: float) -> Answer | None:
        if not self.start <= t < self.end:
            return None
        i = bisect.bisect_right(self._starts, t) - 1
        if i >= 0 and t < self._ends[i]:
            return self._answer
        return None


class _Flapping(_Window):
    __slots__ = ("_answer", "_down", "_period", "_phase")

    def __init__(self, fault: Flapping) -> None:
        super().__init__(fault.start, fault.end)
        self._down = fault.down
        self._period = fault.down + fault.up
        self._phase = fault.phase
        self._answer = _error(fault.status, fault.latency)

    def answer(self, t: float) -> Answer | None:
        if self.start <= t < self.end and (t - self.start + self._phase) % self._period < self._down:
            return self._answer
        return None


class _Latency(_Window):
    """Success latency and stalls; it never fails an attempt by itself except by stalling."""

    __slots__ = ("_draw", "_rng", "_stall_p")

    def __init__(self, fault: Latency, rng: random.Random) -> None:
        super().__init__(fault.start, fault.end)
        self._rng = rng
        self._stall_p = fault.stall_p
        mean, sigma = fault.mean, fault.sigma
        self._draw: Callable[[], float]
        if fault.distribution == "fixed" or mean == 0.0:
            self._draw = lambda: mean
        elif fault.distribution == "exponential":
            self._draw = lambda: rng.expovariate(1.0 / mean)
        else:  # lognormal with this mean: mu = ln(mean) - sigma^2 / 2
            mu = math.log(mean) - sigma * sigma / 2
            self._draw = lambda: rng.lognormvariate(mu, sigma)

    def applies(self, t: float) -> bool:
        return self.start <= t < self.end

    def stalls(self) -> bool:
        return self._stall_p > 0.0 and self._rng.random() < self._stall_p

    def delay(self) -> float:
        return self._draw()


class KeyFaults:
    """Every process that decides one key's attempts, in the scenario's order."""

    __slots__ = ("_instant", "latency", "processes")

    def __init__(self, processes: list[FaultProcess], latency: list[_Latency]) -> None:
        self.processes = processes
        self.latency = latency
        self._instant = Answer(SUCCESS, 0.0)

    def answer(self, t: float) -> Answer:
        for process in self.processes:
            found = process.answer(t)
            if found is not None:
                return found
        for lat in self.latency:
            if lat.applies(t):
                if lat.stalls():
                    return Answer(TIMEOUT_OUTCOME, None)
                return Answer(SUCCESS, lat.delay())
        return self._instant


def _stream(seed: int, index: int, provider: str, key: str) -> random.Random:
    # String seeds are hashed with SHA-512 by random.seed: stable across runs and processes.
    return random.Random(f"keypool.sim:{seed}:{index}:{provider}:{key}")


def _blip_periods(fault: Blips, horizon: float, rng: random.Random) -> list[tuple[float, float]]:
    periods: list[tuple[float, float]] = []
    if fault.per_hour <= 0:
        return periods
    end = min(horizon, math.inf if fault.end is None else fault.end)
    t = fault.start
    rate = fault.per_hour / 3600.0
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            return periods
        periods.append((t, t + fault.duration))
        t += fault.duration  # blips do not overlap


def _process(
    fault: Fault, index: int, seed: int, provider: str, key: str, horizon: float
) -> FaultProcess | _Latency:
    rng = _stream(seed, index, provider, key)
    if isinstance(fault, FailureRate):
        return _Random(fault, _error(fault.status, fault.latency), rng)
    if isinstance(fault, Throttle):
        outcome = Outcome(OutcomeKind.THROTTLED, 429, fault.retry_after)
        return _Random(fault, Answer(outcome, fault.latency), rng)
    if isinstance(fault, CallerErrors):
        return _Random(fault, Answer(classify_status(fault.status), 0.0), rng)
    if isinstance(fault, Outage):
        end = math.inf if fault.end is None else fault.end
        return _Periods([(fault.start, end)], _error(fault.status, fault.latency), _Window(0.0, None))
    if isinstance(fault, Blips):
        schedule_rng = _stream(seed, index, provider, "*") if fault.shared else rng
        periods = _blip_periods(fault, horizon, schedule_rng)
        return _Periods(periods, _error(fault.status, fault.latency), _Window(fault.start, fault.end))
    if isinstance(fault, Flapping):
        return _Flapping(fault)
    return _Latency(fault, rng)


def compile_faults(scenario: Scenario, seed: int) -> dict[tuple[str, str], KeyFaults]:
    """The fault processes of every (provider, key) of ``scenario`` for the run with ``seed``."""
    compiled: dict[tuple[str, str], KeyFaults] = {}
    for provider in scenario.providers:
        for key in provider.keys:
            processes: list[FaultProcess] = []
            latency: list[_Latency] = []
            for index, fault in enumerate(scenario.faults):
                if fault.provider not in (None, provider.name):
                    continue
                if fault.keys is not None and key.key_id not in fault.keys:
                    continue
                built = _process(fault, index, seed, provider.name, key.key_id, scenario.duration)
                if isinstance(built, _Latency):
                    latency.append(built)
                else:
                    processes.append(built)
            compiled[(provider.name, key.key_id)] = KeyFaults(processes, latency)
    return compiled
