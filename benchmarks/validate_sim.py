"""The simulator against the real stack: the same scenarios, in real time and in virtual time.

Real: a real ``openai`` client (``providers.AsyncDeepSeek``) over keypool's transport and the fake
upstream on a loopback port. Traffic is open loop, RATE requests/s evenly spaced, each request its
own task (so callers that find no key wait in the pool's queue, as concurrent callers do).
Simulated: ``keypool.sim`` with the same keys, breaker and faults, fed the real run's own request
instants and latencies drawn from the real attempts' durations, so that only the mechanics can
differ: which attempts are made, when callers wait, and what trips.

1. One of 4 keys answers 503 from the start (threshold 5), 4 s: attempts wasted on it (exactly 5,
   one trip) and failed requests (0), in both.
2. One key, 25 % i.i.d. 503s, threshold 3, timeout 0.5 s, success_threshold 1, RUNS runs of
   SECONDS s. The 503s are drawn once per run from a seeded generator and scripted into the
   upstream (``Fault.sequence``) and into the simulated key alike, so the n-th attempt meets the same
   answer in both. What the twins cannot share with the real run is the client's backoff jitter
   (0.5 s, 1 s, less a quarter to a half, drawn at random) and which attempt took how long: they decide
   which request a later draw lands on, and the real stack itself varies by a trip or two from run
   to run on the same draws. So each real run is compared with JITTER_SEEDS simulated twins that
   differ only in those two (latencies drawn from the real run's own attempt durations): trips
   (transitions into open after failures or a failed trial, the same definition on both sides),
   attempts and requests not served must each fall within 3 standard deviations of the twins (at
   least ±1). Over all runs: the real trips per 100 attempts against the simulator's own i.i.d.
   fault (``failure_rate``) over SIM_SEEDS seeds, within 3 standard errors of the difference.

Run: .venv/bin/python benchmarks/validate_sim.py  (about 45 s)
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from keypool import (
    BreakerConfig,
    CallRecorded,
    CallRejected,
    KeyPool,
    KeySpec,
    KeyStateChanged,
    Outcome,
    OutcomeKind,
    PoolEvent,
    classify_status,
)
from keypool.sim import Answer, Scenario, SimResult, Simulation
from keypool.testing import FakeUpstream, Fault, LoopbackServer
from providers import AsyncDeepSeek

RATE = 40.0
TIMEOUT = 5.0  # each request's deadline (openai's timeout): waits, attempts and backoffs included
RUNS = 3
SECONDS = 12.0
SIM_SEEDS = 40
P_FLAKY = 0.25
JITTER_SEEDS = 20
TRIP_REASONS = ("failures", "trial_failed")


@dataclass
class RealRun:
    """What the real stack did: request instants (s from the start), attempts, trips, refusals."""

    starts: list[float] = field(default_factory=list)
    served: int = 0
    failed: int = 0  # the client raised (no key, or the last key's error)
    refused: int = 0  # the pool refused a fresh caller (CallRejected)
    durations: list[float] = field(default_factory=list)
    trips: int = 0
    elapsed: float = 0.0

    @property
    def horizon(self) -> float:
        """Long enough for the simulated twin to finish every request, as the real run did."""
        return max(self.starts) + TIMEOUT + 1.0

    def hook(self, event: PoolEvent) -> None:
        if isinstance(event, CallRecorded):
            self.durations.append(event.duration)
        elif isinstance(event, KeyStateChanged):
            if event.new.label == "open" and event.reason in TRIP_REASONS:
                self.trips += 1
        elif isinstance(event, CallRejected):
            self.refused += 1


async def drive(pool: KeyPool, base_url: str, seconds: float, run: RealRun) -> None:
    """Open loop: a request every 1/RATE s for ``seconds``, each in its own task."""
    client = AsyncDeepSeek(pool=pool, base_url=base_url, timeout=TIMEOUT)

    async def one() -> None:
        try:
            await client.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": "q"}]
            )
            run.served += 1
        except Exception:
            run.failed += 1

    start = time.monotonic()
    async with anyio.create_task_group() as group:
        for i in range(math.ceil(seconds * RATE)):
            await anyio.sleep(max(0.0, start + i / RATE - time.monotonic()))
            run.starts.append(time.monotonic() - start)
            group.start_soon(one)
    run.elapsed = time.monotonic() - start
    await client.close()


def real_pool(keys: list[str], breaker: BreakerConfig, run: RealRun) -> KeyPool:
    pool = KeyPool(hooks=[run.hook])
    pool.add_provider(
        {
            "name": "deepseek",
            "keys": [KeySpec(secret=k, key_id=f"key-{i}") for i, k in enumerate(keys, 1)],
            "breaker": breaker,
        }
    )
    return pool


class Scripted:
    """A simulated key's answers: the n-th attempt gets the n-th scripted 503-or-200, after a
    latency drawn from the real run's own attempt durations."""

    def __init__(self, draws: list[bool], latencies: list[float], rng: random.Random) -> None:
        self._draws = iter(draws)
        self._latencies = latencies
        self._rng = rng
        self._fail = classify_status(503)
        self._ok = Outcome(OutcomeKind.SUCCESS, 200)

    def answer(self, t: float) -> Answer:
        outcome = self._fail if next(self._draws, False) else self._ok
        return Answer(outcome, self._rng.choice(self._latencies))


def scenario(
    keys: int, breaker: BreakerConfig, duration: float, faults: list[dict[str, Any]], **traffic: Any
) -> Scenario:
    """The simulated twin: the same keys and breaker, the client's 5 s request timeout."""
    return Scenario.parse(
        {
            "providers": [{"name": "deepseek", "keys": keys, "breaker": breaker.model_dump()}],
            "traffic": [
                {"provider": "deepseek", "request_timeout": TIMEOUT, "attempt_timeout": None, **traffic}
            ],
            "faults": faults,
            "duration": duration,
        }
    )


def not_served(sim: SimResult) -> int:
    assert sim.served + sim.failed + sim.refused + sim.caller_errors == sim.requests  # all finished
    return sim.failed + sim.refused


async def dead_key() -> bool:
    secrets = [f"sk-val-{i}" for i in range(4)]
    upstream = FakeUpstream(secrets, flavor="deepseek")
    upstream.set_fault(secrets[0], Fault.status(503))
    breaker = BreakerConfig(failure_threshold=5, timeout=60)
    run = RealRun()
    with LoopbackServer(upstream) as server:
        await drive(real_pool(secrets, breaker, run), server.base_url, 4.0, run)
    real_wasted = upstream.counters(secrets[0]).requests
    dead = [{"kind": "outage", "keys": ["key-1"]}]
    sim = Simulation(scenario(4, breaker, run.horizon, dead, times=run.starts), 0).run()
    print("1. one of 4 keys dead (503), threshold 5, 4 s")
    print(
        f"   real:      {len(run.starts)} requests, {run.failed} failed, "
        f"{real_wasted} attempts on the dead key"
    )
    print(
        f"   simulated: {sim.requests} requests, {not_served(sim)} failed, "
        f"{sim.attempts_of('key-1')} attempts on the dead key"
    )
    ok = real_wasted == sim.attempts_of("key-1") == 5 and run.failed == not_served(sim) == 0
    print(f"   agree (wasted equal, exactly 5; no failed request): {'yes' if ok else 'NO'}")
    return ok


async def flaky_run(index: int, breaker: BreakerConfig) -> tuple[RealRun, list[SimResult], int]:
    """One real run with scripted draws; its simulated twins with the same draws and arrivals, one
    per seed of what the real run cannot share with them: the client's backoff jitter and which
    attempt took how long (drawn from the real attempts' durations)."""
    rng = random.Random(f"validate_sim:{index}")
    draws = [rng.random() < P_FLAKY for _ in range(int(SECONDS * RATE * 2))]
    secret = "sk-val-flaky"
    upstream = FakeUpstream([secret], flavor="deepseek")
    steps = [Fault.status(503) if d else Fault.ok() for d in draws]
    upstream.set_fault(secret, Fault.sequence(*steps))
    run = RealRun()
    with LoopbackServer(upstream) as server:
        await drive(real_pool([secret], breaker, run), server.base_url, SECONDS, run)
    attempts = upstream.counters(secret).requests
    same = scenario(1, breaker, run.horizon, [], times=run.starts)
    twins = []
    for seed in range(JITTER_SEEDS):
        answers = Scripted(draws, run.durations, random.Random(f"validate_sim:{index}:{seed}"))
        twins.append(Simulation(same, seed, answers={("deepseek", "key-1"): answers}).run())
    return run, twins, attempts


def spread(values: list[int]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values)


def agrees(real: int, values: list[int]) -> bool:
    """Within 3 standard deviations of the twins' spread, and never tighter than one count."""
    mean, sd = spread(values)
    return abs(real - mean) <= max(3 * sd, 1.0)


async def flaky_key() -> bool:
    breaker = BreakerConfig(failure_threshold=3, timeout=0.5, success_threshold=1, max_timeout=0.5)
    print(
        f"2. one key, {P_FLAKY:.0%} i.i.d. 503s, threshold 3, timeout 0.5 s, success_threshold 1, "
        f"{RUNS} runs of {SECONDS:g} s at {RATE:g} req/s;\n   simulated: the same draws and arrivals, "
        f"{JITTER_SEEDS} twins over backoff jitter and attempt durations (mean ± sd)"
    )
    print("   run  requests   trips real | sim     attempts real | sim    not served real | sim")
    ok = True
    rates: list[float] = []
    for index in range(RUNS):
        run, twins, attempts = await flaky_run(index, breaker)
        measured = [
            (run.trips, [len(t.trips()) for t in twins]),
            (attempts, [t.total_attempts for t in twins]),
            (run.failed, [not_served(t) for t in twins]),
        ]
        agree = all(agrees(real, sims) for real, sims in measured)
        ok = ok and agree
        rates.append(100.0 * run.trips / attempts)
        cells = ""
        for real, sims in measured:
            mean, sd = spread(sims)
            cells += f"   {real:5d} | {mean:6.1f} ± {sd:<4.1f}"
        print(f"   {index:3d}  {len(run.starts):8d}{cells}   {'yes' if agree else 'NO'}")
        waited = statistics.fmean(t.waited for t in twins)
        refused = statistics.fmean(t.refused for t in twins)
        print(
            f"        refused {run.refused} | {refused:.1f}; "
            f"simulated requests that waited for the key: {waited:.0f}"
        )
    print(f"   same draws agree (each within 3 sd of its twins, at least ±1): {'yes' if ok else 'NO'}")
    # The simulator's own i.i.d. fault, over many seeds, with the same open-loop traffic.
    iid = scenario(
        1, breaker, SECONDS, [{"kind": "failure_rate", "p": P_FLAKY}], rate=RATE, arrivals="uniform"
    )
    sim_rates = []
    for seed in range(SIM_SEEDS):
        result = Simulation(iid, seed).run()
        sim_rates.append(100.0 * len(result.trips()) / result.total_attempts)
    real_mean, sim_mean = statistics.fmean(rates), statistics.fmean(sim_rates)
    se = math.sqrt(statistics.variance(sim_rates) * (1 / RUNS + 1 / SIM_SEEDS))
    stat_ok = abs(real_mean - sim_mean) <= 3 * se
    print(
        f"   trips per 100 attempts: real {real_mean:.2f} over {RUNS} runs "
        f"({', '.join(f'{r:.2f}' for r in rates)}), simulated i.i.d. {sim_mean:.2f} ± "
        f"{statistics.stdev(sim_rates):.2f} over {SIM_SEEDS} seeds"
    )
    print(f"   agree (within 3 standard errors, {3 * se:.2f}): {'yes' if stat_ok else 'NO'}")
    return ok and stat_ok


async def main() -> None:
    first = await dead_key()
    second = await flaky_key()
    print(f"all agree: {'yes' if first and second else 'NO'}")


if __name__ == "__main__":
    anyio.run(main)
