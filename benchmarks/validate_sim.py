"""The simulator against the real stack: the same scenarios, in real time and in virtual time.

Real: a real ``openai`` client (``providers.AsyncDeepSeek``) over keypool's transport and the fake
upstream on a loopback port, one caller pacing ~40 requests/s. Simulated: ``keypool.sim`` with the
same keys, breaker and faults. Compared:

1. one of 4 keys answers 503 from the start (threshold 5): attempts wasted on it (exact: 5 per
   trip) and failed requests (0), over 4 s;
2. one key, 25 % i.i.d. 503s (``Fault.flaky``), threshold 3, timeout 0.5 s, success_threshold 1,
   for 12 s: breaker trips per second; the real count must fall within 3 standard deviations of
   the simulator's mean over 40 seeds (Poisson-like spread).

Run: .venv/bin/python benchmarks/validate_sim.py
"""

from __future__ import annotations

import os
import statistics
import time

import anyio

from keypool import BreakerConfig, KeyPool, KeySpec, KeyStateChanged, PoolEvent
from keypool.sim import Scenario, simulate
from keypool.testing import FakeUpstream, Fault, LoopbackServer
from providers import AsyncDeepSeek

RATE = 40.0


async def drive(pool: KeyPool, base_url: str, seconds: float) -> tuple[int, int, float]:
    """(requests, failed, elapsed): one caller at about RATE requests/s."""
    client = AsyncDeepSeek(pool=pool, base_url=base_url, request_timeout=5.0)
    requests = failed = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        requests += 1
        try:
            await client.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": "q"}]
            )
        except Exception:
            failed += 1
        await anyio.sleep(max(0.0, start + requests / RATE - time.monotonic()))
    await client.close()
    return requests, failed, time.monotonic() - start


def real_pool(keys: list[str], breaker: BreakerConfig, hook: object) -> KeyPool:
    pool = KeyPool(hooks=[hook])  # type: ignore[list-item]
    pool.add_provider(
        {
            "name": "deepseek",
            "keys": [KeySpec(secret=k, key_id=f"key-{i}") for i, k in enumerate(keys, 1)],
            "breaker": breaker,
        }
    )
    return pool


async def dead_key() -> None:
    secrets = [f"sk-val-{i}" for i in range(4)]
    upstream = FakeUpstream(secrets, flavor="deepseek")
    upstream.set_fault(secrets[0], Fault.status(503))
    with LoopbackServer(upstream) as server:
        pool = real_pool(secrets, BreakerConfig(failure_threshold=5, timeout=60), lambda e: None)
        requests, failed, _ = await drive(pool, server.base_url, 4.0)
    real_wasted = upstream.counters(secrets[0]).requests
    sim = simulate(
        Scenario.parse(
            {
                "providers": [{"name": "p", "keys": 4, "breaker": {"failure_threshold": 5, "timeout": 60}}],
                "traffic": [{"provider": "p", "rate": RATE}],
                "faults": [{"kind": "outage", "keys": ["key-1"]}],
                "duration": 4.0,
            }
        ),
        0,
    )
    print("1. one of 4 keys dead (503), threshold 5, 4 s")
    print(f"   real:      {requests} requests, {failed} failed, {real_wasted} attempts on the dead key")
    print(
        f"   simulated: {sim.requests} requests, {sim.failed + sim.refused} failed, "
        f"{sim.attempts_of('key-1')} attempts on the dead key"
    )
    ok = real_wasted == sim.attempts_of("key-1") == 5 and failed == 0
    print(f"   agree (wasted equal, exactly 5; no failed request): {'yes' if ok else 'NO'}")


async def flaky_key() -> None:
    seconds, p = 12.0, 0.25
    breaker = BreakerConfig(failure_threshold=3, timeout=0.5, success_threshold=1, max_timeout=0.5)
    secret = "sk-val-flaky"
    upstream = FakeUpstream([secret], flavor="deepseek")
    upstream.set_fault(secret, Fault.flaky(p, Fault.status(503), seed=int(os.environ.get("FLAKY_SEED", "1"))))
    trips: list[float] = []

    def on_event(event: PoolEvent) -> None:
        if isinstance(event, KeyStateChanged) and event.new.label == "open":
            trips.append(event.at)

    with LoopbackServer(upstream) as server:
        pool = real_pool([secret], breaker, on_event)
        requests, _, elapsed = await drive(pool, server.base_url, seconds)
    scenario = Scenario.parse(
        {
            "providers": [{"name": "p", "keys": 1, "breaker": breaker.model_dump()}],
            # One caller that waits for a key inside its 5 s timeout, as the transport does.
            "traffic": [
                {"provider": "p", "workers": 1, "think": 1 / RATE, "max_wait": 5.0, "request_timeout": 5.0}
            ],
            "faults": [{"kind": "failure_rate", "p": p}],
            "duration": elapsed,
        }
    )
    counts = [len(simulate(scenario, seed).trips()) for seed in range(40)]
    mean, sd = statistics.fmean(counts), statistics.stdev(counts)
    print(
        f"2. one key, {p:.0%} i.i.d. 503s, threshold 3, timeout 0.5 s, {elapsed:.1f} s, "
        f"{requests / elapsed:.1f} req/s"
    )
    by_status = dict(upstream.counters(secret).by_status)
    print(f"   real:      {len(trips)} trips; upstream answered {by_status}")
    sim_requests = statistics.fmean(simulate(scenario, seed).requests for seed in range(5))
    print(f"   simulated: {mean:.1f} ± {sd:.1f} trips (40 seeds), {sim_requests:.0f} requests")
    ok = abs(len(trips) - mean) <= 3 * sd
    print(f"   agree (within 3 sd): {'yes' if ok else 'NO'}")


async def main() -> None:
    await dead_key()
    await flaky_key()


if __name__ == "__main__":
    anyio.run(main)
