"""The discrete-event loop: a real :class:`~keypool.KeyPool` on a fake clock, driven by scripted traffic.

Nothing is modelled that the pool does itself: breakers, selection, the backup tier, probation and
the lean-away-from-failing-keys rule are keypool's own code, reached only through its public API
(:meth:`~keypool.KeyPool.try_acquire`, :meth:`~keypool.Lease.record`, hooks). The loop keeps a
heap of virtual-time events (request arrivals, attempts answering, waiting requests retrying),
moves a :class:`~keypool.testing.FakeClock` to each event's instant and does what a
:class:`~keypool.KeyPoolTransport` would do at that instant: lease a key, let the fault processes
decide the answer, record it, and fail over to another key (never the same one twice) while the
request has attempts and time left. No real sleep, no event loop: hours of virtual time run in
seconds.

One shortcut, exact by construction: when a provider refuses a request and has no attempt in
flight, nothing can change before the soonest recovery the pool announces, so arrivals until then
are counted as refused without asking the pool again (``fast_refusals=False`` turns this off, for
an event log that must show every refusal).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .._errors import NoKeyAvailable
from .._events import Hook, KeyStateChanged, PoolEvent
from .._outcome import OutcomeKind
from .._pool import KeyPool, Lease
from ..testing import FakeClock
from ._faults import TIMEOUT_OUTCOME, Answer, compile_faults
from ._scenario import Scenario, Traffic

__all__ = ["Answers", "SimResult", "Simulation", "StateChange", "simulate"]

_ORIGIN = 1000.0  # the fake clock's reading at t = 0 (a breaker treats 0.0 as "never")
_WASTED = frozenset({OutcomeKind.FAILURE, OutcomeKind.THROTTLED, OutcomeKind.REJECTED, OutcomeKind.EXHAUSTED})
_ARRIVAL, _DONE, _RETRY, _WORKER, _CALL = range(5)


class Answers(Protocol):
    """What decides one key's attempts (compiled faults, or a recorded log's outcomes)."""

    def answer(self, t: float) -> Answer: ...


@dataclass(frozen=True, slots=True)
class StateChange:
    """A breaker transition, at ``t`` seconds into the run (the instant it really happened)."""

    t: float
    provider: str
    key_id: str
    old: str
    new: str
    reason: str


@dataclass
class SimResult:
    """What one run did. Counts are exact; times are seconds from the start of the run."""

    seed: int
    ended_at: float
    requests: int = 0
    served: int = 0
    refused: int = 0  # no key could take it, before any attempt
    failed: int = 0  # attempts tried and none answered (or the deadline passed)
    caller_errors: int = 0
    attempts: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)
    transitions: list[StateChange] = field(default_factory=list)
    request_seconds: float = 0.0

    @property
    def total_attempts(self) -> int:
        return sum(sum(c.values()) for c in self.attempts.values())

    @property
    def wasted_attempts(self) -> int:
        """Attempts that reached the upstream and did not answer the request (retried or failed)."""
        return sum(n for c in self.attempts.values() for kind, n in c.items() if OutcomeKind(kind) in _WASTED)

    def attempts_of(self, key_id: str, kind: str | None = None, provider: str | None = None) -> int:
        return sum(
            (c[kind] if kind else sum(c.values()))
            for (p, k), c in self.attempts.items()
            if k == key_id and provider in (None, p)
        )

    def trips(self, key_id: str | None = None, *, after: float = 0.0) -> list[StateChange]:
        """Transitions into ``open`` caused by failures (not throttles or quarantines)."""
        return [
            s
            for s in self.transitions
            if s.new == "open"
            and s.reason in ("failures", "trial_failed")
            and s.t >= after
            and key_id in (None, s.key_id)
        ]

    def first_trip(self, key_id: str | None = None, *, after: float = 0.0) -> float | None:
        found = [s.t for s in self.trips(key_id, after=after) if s.old == "closed"]
        return min(found) if found else None

    def closed_at(self, key_id: str, *, after: float) -> float | None:
        """The first instant at or after ``after`` at which the key's breaker closed."""
        for s in self.transitions:
            if s.key_id == key_id and s.new == "closed" and s.t >= after:
                return s.t
        return None

    def transitions_of(self, key_id: str | None = None, *, start: float = 0.0, end: float = math.inf) -> int:
        return sum(1 for s in self.transitions if key_id in (None, s.key_id) and start <= s.t < end)


class _Request:
    __slots__ = ("attempts_left", "deadline", "started", "traffic", "tried", "worker")

    def __init__(self, traffic: _Stream, started: float, worker: int | None) -> None:
        self.traffic = traffic
        self.started = started
        self.deadline = started + traffic.spec.request_timeout
        self.attempts_left = traffic.max_attempts
        self.tried: list[str] = []
        self.worker = worker


@dataclass(frozen=True, slots=True)
class _Attempt:
    request: _Request
    lease: Lease
    answer: Answer


class _Stream:
    """One traffic spec at run time: its arrival instants and its request settings."""

    __slots__ = ("arrivals", "end", "max_attempts", "provider", "spec")

    def __init__(self, spec: Traffic, key_count: int, rng: random.Random, horizon: float) -> None:
        self.spec = spec
        self.provider = spec.provider
        self.max_attempts = spec.max_attempts or key_count
        self.end = min(horizon, math.inf if spec.end is None else spec.end)
        self.arrivals: Iterator[float] = iter(())
        if spec.workers is None:
            self.arrivals = self._open_loop(rng)

    def _open_loop(self, rng: random.Random) -> Iterator[float]:
        spec = self.spec
        if spec.times is not None:
            yield from (t for t in sorted(spec.times) if spec.start <= t < self.end)
            return
        if spec.rate <= 0:
            return
        if spec.arrivals == "uniform":
            gap = 1.0 / spec.rate
            t = spec.start + rng.random() * gap
            i = 0
            while True:
                at = t + i * gap  # no accumulated rounding over millions of arrivals
                if at >= self.end:
                    return
                yield at
                i += 1
        t = spec.start
        while True:
            t += rng.expovariate(spec.rate)
            if t >= self.end:
                return
            yield t


class Simulation:
    """One run of a :class:`Scenario` with a seed. Use :func:`simulate` unless you need to watch it.

    ``hooks`` are extra pool hooks (an :class:`~keypool.EventLog`, say). ``answers`` replaces the
    compiled faults for some keys (a recorded log replayed). ``on_change`` callbacks see every
    breaker transition as it is noticed and may call :meth:`stop`.
    """

    def __init__(
        self,
        scenario: Scenario,
        seed: int = 0,
        *,
        hooks: Iterable[Hook] = (),
        answers: Mapping[tuple[str, str], Answers] | None = None,
        fast_refusals: bool = True,
    ) -> None:
        self.scenario = scenario
        self.seed = seed
        self.clock = FakeClock(start=_ORIGIN)
        self.result = SimResult(seed=seed, ended_at=0.0)
        self.on_change: list[Callable[[Simulation, StateChange], None]] = []
        self._stopped = False
        self._fast_refusals = fast_refusals
        self._events: list[tuple[float, int, int, object]] = []
        self._seq = itertools.count()
        self._in_flight: Counter[str] = Counter()
        self._refused_until: dict[str, float] = {}
        self._answers: dict[tuple[str, str], Answers] = dict(compile_faults(scenario, seed))
        self._answers.update(answers or {})
        self.pool = KeyPool(
            {"providers": [p.pool_config() for p in scenario.providers]},
            clock=self.clock,
            hooks=[self._on_event, *hooks],
            seed=seed,
        )
        for key in self._answers:
            self.result.attempts[key] = Counter()
        rng = random.Random(f"keypool.sim:{seed}:traffic")
        self._streams = [
            _Stream(t, self.pool.key_count(t.provider), rng, scenario.duration) for t in scenario.traffic
        ]
        self._worker_rng = rng

    # ------------------------------------------------------------------ control

    @property
    def now(self) -> float:
        """Seconds since the start of the run."""
        return self.clock.now() - _ORIGIN

    def stop(self) -> None:
        """End the run after the current event."""
        self._stopped = True

    def call_at(self, t: float, action: Callable[[Simulation], None]) -> None:
        """Run ``action(sim)`` at virtual time ``t`` (operator actions, probes, measurements)."""
        self._push(t, _CALL, action)

    def _push(self, t: float, code: int, item: object) -> None:
        heapq.heappush(self._events, (t, next(self._seq), code, item))

    def _on_event(self, event: PoolEvent) -> None:
        if isinstance(event, KeyStateChanged):
            change = StateChange(
                event.at - _ORIGIN,
                event.provider,
                event.key_id,
                event.old.label,
                event.new.label,
                event.reason,
            )
            self.result.transitions.append(change)
            for callback in self.on_change:
                callback(self, change)

    # ------------------------------------------------------------------ the loop

    def run(self) -> SimResult:
        duration = self.scenario.duration
        for stream in self._streams:
            spec = stream.spec
            if spec.workers is not None:
                for worker in range(spec.workers):
                    start = spec.start + self._worker_rng.random() * spec.think
                    if start < stream.end:
                        self._push(start, _WORKER, (stream, worker))
            else:
                first = next(stream.arrivals, None)
                if first is not None:
                    self._push(first, _ARRIVAL, stream)
        events = self._events
        clock = self.clock
        while events and not self._stopped:
            t, _, code, item = heapq.heappop(events)
            if t > duration:
                break
            target = _ORIGIN + t
            if target > clock.now():
                clock.advance(target - clock.now())
            if code == _ARRIVAL:
                assert isinstance(item, _Stream)
                self._arrive(item, t, None)
                following = next(item.arrivals, None)
                if following is not None:
                    self._push(following, _ARRIVAL, item)
            elif code == _DONE:
                assert isinstance(item, _Attempt)
                request, lease, answer = item.request, item.lease, item.answer
                self._in_flight[request.traffic.provider] -= 1
                if self._complete(request, lease, answer, t):
                    self._attempt(request, t)
            elif code == _RETRY:
                assert isinstance(item, _Request)
                self._attempt(item, t)
            elif code == _WORKER:
                stream, worker = item  # type: ignore[misc]
                self._arrive(stream, t, worker)
            else:
                item(self)  # type: ignore[operator]
        end = duration if not self._stopped else self.now
        if not self._stopped and _ORIGIN + end > clock.now():
            clock.advance(_ORIGIN + end - clock.now())
        self.pool.poll()  # notice what time alone did before the end
        self.result.ended_at = end
        return self.result

    def _arrive(self, stream: _Stream, t: float, worker: int | None) -> None:
        result = self.result
        result.requests += 1
        if self._fast_refusals and t < self._refused_until.get(stream.provider, -1.0):
            result.refused += 1
            self._finished(stream, worker, t)
            return
        self._attempt(_Request(stream, t, worker), t)

    def _attempt(self, request: _Request, t: float) -> None:
        stream = request.traffic
        provider = stream.provider
        while True:
            try:
                lease = self.pool.try_acquire(provider, exclude=request.tried)
            except NoKeyAvailable as refusal:
                self._no_key(request, t, refusal.retry_after)
                return
            request.tried.append(lease.key_id)
            request.attempts_left -= 1
            answer = self._answers[(provider, lease.key_id)].answer(t)
            limit = min(stream.spec.attempt_timeout, request.deadline - t)
            latency = answer.latency
            if latency is None or latency > limit:  # no answer in time: the attempt times out
                answer = _timed_out(answer)
                latency = max(0.0, limit)
            if latency > 0.0:
                self._in_flight[provider] += 1
                self._push(t + latency, _DONE, _Attempt(request, lease, answer))
                return
            if not self._complete(request, lease, answer, t):
                return

    def _no_key(self, request: _Request, t: float, retry_after: float | None) -> None:
        stream = request.traffic
        waited = t - request.started
        wait = retry_after
        if wait is not None and waited + wait <= stream.spec.max_wait and t + wait < request.deadline:
            self._push(t + max(wait, 1e-6), _RETRY, request)
            return
        if request.tried:
            self.result.failed += 1
        else:
            self.result.refused += 1
            provider = stream.provider
            if self._fast_refusals and retry_after is not None and not self._in_flight[provider]:
                self._refused_until[provider] = t + retry_after - stream.spec.max_wait
        self._finished(stream, request.worker, t, request.started)

    def _complete(self, request: _Request, lease: Lease, answer: Answer, t: float) -> bool:
        """Record an attempt's answer; True if the request goes on to another key."""
        outcome = answer.outcome
        lease.record(outcome)
        kind = outcome.kind
        self.result.attempts[(request.traffic.provider, lease.key_id)][kind.value] += 1
        if kind is OutcomeKind.SUCCESS:
            self.result.served += 1
        elif kind.retry_elsewhere and request.attempts_left > 0 and t < request.deadline:
            return True
        elif kind is OutcomeKind.CALLER_ERROR:
            self.result.caller_errors += 1
        else:
            self.result.failed += 1
        self._finished(request.traffic, request.worker, t, request.started)
        return False

    def _finished(self, stream: _Stream, worker: int | None, t: float, started: float | None = None) -> None:
        if started is not None:
            self.result.request_seconds += t - started
        if worker is not None:
            following = t + stream.spec.think
            if following < stream.end:
                self._push(max(following, t + 1e-9), _WORKER, (stream, worker))


def _timed_out(answer: Answer) -> Answer:
    return answer if answer.latency is None else Answer(TIMEOUT_OUTCOME, None)


def simulate(
    scenario: Scenario,
    seed: int = 0,
    *,
    hooks: Iterable[Hook] = (),
    stop_at_first_trip: bool = False,
) -> SimResult:
    """Run ``scenario`` once with ``seed`` and return what happened (deterministic for the seed)."""
    sim = Simulation(scenario, seed, hooks=hooks)
    if stop_at_first_trip:

        def stop(s: Simulation, change: StateChange) -> None:
            if change.new == "open" and change.reason == "failures":
                s.stop()

        sim.on_change.append(stop)
    return sim.run()
