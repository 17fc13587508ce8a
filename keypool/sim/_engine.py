"""The discrete-event loop: a real :class:`~keypool.KeyPool` on a fake clock, driven by scripted traffic.

Nothing is modelled that the pool does itself: breakers, selection, the backup tier, probation and
the lean-away-from-failing-keys rule are keypool's own code, reached only through its public API
(:meth:`~keypool.KeyPool.try_acquire`, :meth:`~keypool.Lease.record`, hooks). The loop keeps a
heap of virtual-time events (request arrivals, attempts answering, waiting requests retrying),
moves a :class:`~keypool.testing.FakeClock` to each event's instant and does what a
:class:`~keypool.KeyPoolTransport` would do at that instant: lease a key, let the fault processes
decide the answer, record it, and fail over to another key while the request has attempts and
time left (a key already tried only when no other can serve, after the client's backoff). No real
sleep, no event loop: hours of virtual time run in seconds.

A request that finds no key waits the way :meth:`~keypool.KeyPool.acquire` does, told apart by the
refusal's ``reason``: a *busy* provider (a call in flight frees a key) queues it, first come first
served, until its deadline; a *down* one only if the soonest recovery (``retry_after``) is within
the request's ``max_wait`` and deadline, else it is refused at once. A request that already made
an attempt and is refused, at once or when its wait ends, does what the transport does when
``acquire`` refuses it: it looks again at the keys it left out (:meth:`RequestPlan.look_again`)
before it fails. The queue is the engine's own (the pool's queue serves callers blocked in
``acquire``, and nothing blocks here), served the way the pool serves its own: whenever an
outcome is recorded or a waiter's wait ends, waiters are handed keys in arrival order before
anything else happens at that instant. A refusal the pool reported for a request that then waits
is not passed on to the hooks, as ``acquire`` reports none.

One shortcut, exact by construction: when a provider refuses a request and has no attempt in
flight, nothing can change before the soonest recovery the pool announces, so arrivals that would
find it further away than they may wait are counted as refused without asking the pool again
(``fast_refusals=False`` turns this off, for an event log that must show every refusal).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from .._errors import NoKeyAvailable
from .._events import CallRejected, Hook, KeyStateChanged, PoolEvent
from .._outcome import IGNORED, OutcomeKind
from .._policy import CallSettings, RequestPlan
from .._pool import KeyPool, Lease
from ..testing import FakeClock
from ._faults import TIMEOUT_OUTCOME, Answer, compile_faults
from ._result import SimResult, StateChange
from ._scenario import Scenario, Traffic

__all__ = ["Answers", "SimResult", "Simulation", "StateChange", "simulate"]

log = logging.getLogger("keypool.sim")

_ORIGIN = 1000.0  # the fake clock's reading at t = 0 (a breaker treats 0.0 as "never")
_ARRIVAL, _DONE, _WAKE, _RETRY, _WORKER, _CALL = range(6)
# try_acquire's reason for "only a call in flight ending frees a key" (it never waits, so a busy
# provider is a refusal there; ``KeyPool.acquire`` would queue the caller).
_BUSY = "busy"


class Answers(Protocol):
    """What decides one key's attempts (compiled faults, or a recorded log's outcomes)."""

    def answer(self, t: float) -> Answer: ...


class _Request:
    """One request in flight: the transport's own :class:`RequestPlan` decides its attempts."""

    __slots__ = ("answered", "deadline", "plan", "queued", "started", "traffic", "until", "worker")

    def __init__(self, traffic: _Stream, started: float, worker: int | None, rng: random.Random) -> None:
        self.traffic = traffic
        self.started = started
        self.worker = worker
        self.deadline = started + traffic.spec.request_timeout
        self.plan = RequestPlan.start(
            started,
            total=traffic.spec.request_timeout,
            settings=traffic.settings,
            keys=traffic.key_count,
            replayable=True,
        )
        self.plan.rng = rng  # the backoff's jitter from the run's seed, not the process-wide one
        self.answered = False  # an attempt was made (a later refusal fails it rather than refuses it)
        self.queued = False  # waiting in its provider's queue
        self.until = 0.0  # when its current wait ends (it then looks again)


@dataclass(frozen=True, slots=True)
class _Attempt:
    request: _Request
    lease: Lease
    answer: Answer


class _Stream:
    """One traffic spec at run time: its arrival instants and its request settings."""

    __slots__ = (
        "arrivals",
        "end",
        "key_count",
        "max_wait",
        "provider",
        "refused_until",
        "settings",
        "spec",
    )

    def __init__(
        self, spec: Traffic, key_count: int, max_wait: float, rng: random.Random, horizon: float
    ) -> None:
        self.spec = spec
        self.provider = spec.provider
        self.max_wait = max_wait if spec.max_wait is None else spec.max_wait
        self.settings = CallSettings(
            retries=spec.retries,
            max_attempts=spec.max_attempts,
            max_wait=spec.max_wait,
            headers_timeout=spec.headers_timeout,
            attempt_timeout=spec.attempt_timeout,
        )
        self.key_count = key_count
        # Arrivals before this instant are refused for this reason (see fast_refusals).
        self.refused_until: tuple[float, str] = (-1.0, "")
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
        self._queues: dict[str, deque[_Request]] = {p.name: deque() for p in scenario.providers}
        self._serving: set[str] = set()
        self._serve_again: set[str] = set()
        self._hooks = list(hooks)
        self._held: list[PoolEvent] = []  # refusals of the last try_acquire, until we know it is one
        self._answers: dict[tuple[str, str], Answers] = dict(compile_faults(scenario, seed))
        self._answers.update(answers or {})
        self.pool = KeyPool(
            {"providers": [p.pool_config() for p in scenario.providers]},
            clock=self.clock,
            hooks=[self._on_event],
            seed=seed,
        )
        for key in self._answers:
            self.result.attempts[key] = Counter()
        rng = random.Random(f"keypool.sim:{seed}:traffic")
        max_waits = {p.name: p.max_wait for p in scenario.providers}
        self._streams = [
            _Stream(t, self.pool.key_count(t.provider), max_waits[t.provider], rng, scenario.duration)
            for t in scenario.traffic
        ]
        self._worker_rng = rng
        self._backoff_rng = random.Random(f"keypool.sim:{seed}:backoff")

    # ------------------------------------------------------------------ control

    @property
    def now(self) -> float:
        """Seconds since the start of the run."""
        return self.clock.now() - _ORIGIN

    def stop(self) -> None:
        """End the run after the current event."""
        self._stopped = True

    def stop_when_closed(self, after: float) -> None:
        """End the run when a breaker closes at or after ``after`` seconds (a healed key is back)."""

        def stop(run: Simulation, change: StateChange) -> None:
            if change.new == "closed" and change.t >= after:
                run.stop()

        self.on_change.append(stop)

    def call_at(self, t: float, action: Callable[[Simulation], None]) -> None:
        """Run ``action(sim)`` at virtual time ``t`` (operator actions, probes, measurements)."""
        self._push(t, _CALL, action)

    def _push(self, t: float, code: int, item: object) -> None:
        heapq.heappush(self._events, (t, next(self._seq), code, item))

    def _on_event(self, event: PoolEvent) -> None:
        if isinstance(event, CallRejected):
            self._held.append(event)
            return
        self._forward(event)
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

    def _forward(self, event: PoolEvent) -> None:
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:  # as the pool treats a failing hook: logged, the run goes on
                log.exception("keypool.sim hook %r failed on %s", hook, type(event).__name__)

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
            elif code == _WAKE:
                assert isinstance(item, _Request)
                if item.queued and item.until == t:  # else served or re-planned since
                    self._serve(item.traffic.provider, t)
            elif code == _RETRY:
                assert isinstance(item, _Request)
                self._attempt(item, t)
            elif code == _WORKER:
                stream, worker = item  # type: ignore[misc]
                self._arrive(stream, t, worker)
            else:
                for stream in self._streams:  # an operator action may bring keys back early
                    stream.refused_until = (-1.0, "")
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
        until, reason = stream.refused_until
        if self._fast_refusals and t < until:
            result.refused += 1
            result.refusals[reason] += 1
            self._finished(stream, worker, t)
            return
        self._attempt(_Request(stream, t, worker, self._backoff_rng), t)

    def _lease(self, provider: str, exclude: frozenset[str]) -> Lease:
        """``try_acquire``, holding back the refusal it reports until the caller is known to get none."""
        self._held.clear()
        return self.pool.try_acquire(provider, exclude=exclude)

    def _attempt(self, request: _Request, t: float) -> None:
        """Lease keys for ``request`` and try them until one is in flight, or it waits or ends."""
        while True:
            try:
                lease = self._lease(request.traffic.provider, request.plan.exclude)
            except NoKeyAvailable as refusal:
                self._no_key(request, t, refusal)
                return
            if not self._start(request, lease, t):
                return

    def _start(self, request: _Request, lease: Lease, t: float) -> bool:
        """Send one attempt; True if it was answered at once and the request goes on to another key."""
        stream = request.traffic
        provider = stream.provider
        plan = request.plan
        plan.begin(lease.key_id, provider)
        request.answered = True
        answer = self._answers[(provider, lease.key_id)].answer(t)
        # The transport's limits: reads end at the time-to-headers limit or the deadline, the
        # whole attempt at attempt_timeout (this engine's answers arrive whole, in one read).
        limits = [v for v in (plan.attempt_limits(t, None)["read"], plan.hard_limit(t)) if v is not None]
        limit = min(limits, default=math.inf)
        latency = answer.latency
        if latency is None or latency > limit:  # no answer in time: the attempt times out
            answer = _timed_out(answer)
            latency = max(0.0, limit)
        if latency > 0.0:
            self._in_flight[provider] += 1
            self._push(t + latency, _DONE, _Attempt(request, lease, answer))
            return False
        return self._complete(request, lease, answer, t)

    def _wait_until(self, request: _Request, t: float, refusal: NoKeyAvailable) -> float | None:
        """When a request that found no key looks again (``KeyPool.acquire``'s rule), or None: refused."""
        retry = refusal.retry_after
        if refusal.reason == _BUSY:
            if t >= request.deadline:
                return None
            # retry_after is the soonest timed recovery, 0.0 when there is none
            return min(request.deadline, t + retry) if retry else request.deadline
        # The transport's max_wait: the traffic's, or less where a guessed recovery is waited for only
        # as long as the client's backoff (a 429 without Retry-After, RequestPlan.wait_cap).
        max_wait = request.plan.max_wait(request.traffic.max_wait)
        if retry is None or retry > max_wait or t + retry > request.deadline:
            return None
        return t + max(retry, 1e-6)  # a recovery due now is noticed on the next look

    def _no_key(self, request: _Request, t: float, refusal: NoKeyAvailable) -> None:
        """No key for a request not yet waiting: queue it, or refuse it."""
        until = self._wait_until(request, t, refusal)
        if until is None:
            self._look_again(request, t, refusal)
            return
        self._held.clear()
        self.result.waited += 1
        request.queued = True
        self._queues[request.traffic.provider].append(request)
        self._wait(request, until)

    def _look_again(self, request: _Request, t: float, refusal: NoKeyAvailable) -> None:
        """No key and no wait, fresh or after waiting: as the transport does when ``acquire`` refuses,
        the keys already tried again (after any backoff owed), or the request ends."""
        delay = request.plan.look_again(t) if request.answered else None
        if delay is None:
            self._refuse(request, t, refusal)
            return
        self._held.clear()
        self._push(t + delay, _RETRY, request)

    def _wait(self, request: _Request, until: float) -> None:
        request.until = until
        self._push(until, _WAKE, request)

    def _refuse(self, request: _Request, t: float, refusal: NoKeyAvailable) -> None:
        for event in self._held:
            self._forward(event)
        self._held.clear()
        stream = request.traffic
        result = self.result
        if request.answered:  # it reached keys and none could answer: the request failed
            result.failed += 1
        else:
            result.refused += 1
            result.refusals[refusal.reason] += 1
            retry = refusal.retry_after
            provider = stream.provider
            if (
                self._fast_refusals
                and retry is not None
                and refusal.reason != _BUSY
                and not self._in_flight[provider]
            ):
                # Until the recovery comes within what an arrival may wait, it is refused too.
                horizon = min(stream.max_wait, stream.spec.request_timeout)
                stream.refused_until = (t + retry - horizon, refusal.reason)
        self._finished(stream, request.worker, t, request.started)

    def _serve(self, provider: str, t: float) -> None:
        """Hand free keys to the provider's waiters in arrival order (as the pool's queue does)."""
        if provider in self._serving:  # an attempt answered at once while serving: go round again
            self._serve_again.add(provider)
            return
        self._serving.add(provider)
        try:
            while True:
                self._serve_once(provider, t)
                if provider not in self._serve_again:
                    return
                self._serve_again.discard(provider)
        finally:
            self._serving.discard(provider)

    def _serve_once(self, provider: str, t: float) -> None:
        queue = self._queues[provider]
        if not queue:
            return
        waiting = list(queue)
        queue.clear()
        served: list[tuple[_Request, Lease]] = []
        # A refusal leaves the pool as it was: the next waiter leaving out the same keys would be
        # refused alike, so it is told so without asking (a long queue costs one look per pass).
        refused: dict[frozenset[str], tuple[NoKeyAvailable, list[PoolEvent]]] = {}
        for request in waiting:
            exclude = request.plan.exclude
            try:
                if exclude in refused:
                    refusal, held = refused[exclude]
                    self._held[:] = held
                    raise refusal
                lease = self._lease(provider, exclude)
            except NoKeyAvailable as refusal:
                refused.setdefault(exclude, (refusal, list(self._held)))
                if refusal.reason == _BUSY and t < request.until:
                    self._held.clear()  # still busy: it keeps its place and its wait
                    queue.append(request)
                    continue
                until = self._wait_until(request, t, refusal)  # its wait ended, or the key went down
                if until is None:
                    request.queued = False
                    self._look_again(request, t, refusal)
                    continue
                self._held.clear()
                queue.append(request)
                if until != request.until:
                    self._wait(request, until)
                continue
            refused.clear()
            request.queued = False
            served.append((request, lease))
        # The hand-off is done; now the served callers send their attempts, as woken callers would.
        for request, lease in served:
            if self._start(request, lease, t):
                self._attempt(request, t)

    def _complete(self, request: _Request, lease: Lease, answer: Answer, t: float) -> bool:
        """Record an attempt's answer as the transport does; True if the request goes on."""
        outcome = answer.outcome
        plan = request.plan
        if outcome.kind is OutcomeKind.FAILURE and "Timeout" in outcome.detail and plan.deadline_bound:
            outcome = IGNORED  # the caller's own deadline ran out: not the key's fault
        lease.record(outcome)
        kind = outcome.kind
        provider = request.traffic.provider
        self.result.attempts[(provider, lease.key_id)][kind.value] += 1
        if self._queues[provider]:
            self._serve(provider, t)  # the freed slot goes to the first waiter, before a failover
        if kind is OutcomeKind.SUCCESS:
            self.result.served += 1
        elif plan.retry_after(outcome, t, healthy_elsewhere=self._clean_elsewhere(request, kind)):
            if not plan.pause_due:
                return True
            pause = plan.take_pause(t)  # the client's backoff before an attempt that costs a retry
            if pause is not None:
                self._push(t + pause, _RETRY, request)
                return False
            self.result.failed += 1
        elif kind is OutcomeKind.CALLER_ERROR:
            self.result.caller_errors += 1
        else:
            self.result.failed += 1
        self._finished(request.traffic, request.worker, t, request.started)
        return False

    def _clean_elsewhere(self, request: _Request, kind: OutcomeKind) -> bool:
        provider = request.traffic.provider
        return kind is OutcomeKind.FAILURE and self.pool.healthy_elsewhere(provider, request.plan.exclude)

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
