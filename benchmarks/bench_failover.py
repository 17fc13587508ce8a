"""DeepSeek client over the fake upstream on loopback: throughput and failover waste.

1. 2,000 requests at concurrency 32: ``AsyncDeepSeek`` with 10 healthy keys vs a plain
   ``openai.AsyncOpenAI`` with one key, same upstream, same run (target ratio >= 0.9).
2. The same load with 5 of the 10 keys dead (503) and 2 rate-limited (429, retry-after 30 s):
   failed requests (target 0) and upstream attempts wasted on bad keys (target <= 5 per dead key
   plus 1 per rate-limited key = 27).
Run: .venv/bin/python benchmarks/bench_failover.py
"""

from __future__ import annotations

import statistics
import time

import anyio
import openai

from keypool.testing import FakeUpstream, Fault, LoopbackServer
from providers import AsyncDeepSeek

REQUESTS = 2_000
CONCURRENCY = 32
ROUNDS = 3
SECRETS = [f"sk-bench-{i}" for i in range(10)]


async def drive(client: openai.AsyncOpenAI, requests: int = REQUESTS) -> tuple[float, int]:
    """Send ``requests`` chat calls from CONCURRENCY workers; (requests/s, failed requests)."""
    remaining = iter(range(requests))
    failed = 0

    async def worker() -> None:
        nonlocal failed
        for i in remaining:
            try:
                await client.chat.completions.create(
                    model="deepseek-chat", messages=[{"role": "user", "content": f"q{i}"}]
                )
            except openai.OpenAIError:
                failed += 1

    start = time.perf_counter()
    async with anyio.create_task_group() as group:
        for _ in range(CONCURRENCY):
            group.start_soon(worker)
    return requests / (time.perf_counter() - start), failed


async def main() -> None:
    upstream = FakeUpstream(SECRETS, flavor="deepseek")
    with LoopbackServer(upstream) as server:
        plain = openai.AsyncOpenAI(api_key=SECRETS[0], base_url=server.base_url, max_retries=0)
        pooled = AsyncDeepSeek(api_keys=SECRETS, base_url=server.base_url)
        await drive(plain)
        await drive(pooled)
        base, ours = [], []
        for _ in range(ROUNDS):
            base.append((await drive(plain))[0])
            ours.append((await drive(pooled))[0])
        b, o = statistics.median(base), statistics.median(ours)
        print(f"{REQUESTS} requests at concurrency {CONCURRENCY} over loopback, median of {ROUNDS} rounds")
        print(f"  plain AsyncOpenAI, 1 key      {b:7.0f} req/s")
        print(f"  AsyncDeepSeek, 10 keys        {o:7.0f} req/s")
        print(f"  ratio                         {o / b:7.3f}   target >= 0.9")
        await plain.close()
        await pooled.close()

        upstream.reset_counters()
        dead, limited = SECRETS[:5], SECRETS[5:7]
        for secret in dead:
            upstream.set_fault(secret, Fault.status(503))
        for secret in limited:
            upstream.set_fault(secret, Fault.rate_limited(30.0))
        broken = AsyncDeepSeek(api_keys=SECRETS, base_url=server.base_url)
        rate, failed = await drive(broken)
        wasted = sum(upstream.counters(s).requests for s in dead + limited)
        per_dead = [upstream.counters(s).requests for s in dead]
        per_limited = [upstream.counters(s).requests for s in limited]
        print("with 5 of 10 keys dead (503) and 2 rate-limited (429, retry-after 30 s):")
        print(f"  failed requests               {failed:7d}   target 0")
        print(f"  attempts wasted on bad keys   {wasted:7d}   target <= {5 * 5 + 2}")
        print(f"    per dead key                {per_dead}")
        print(f"    per rate-limited key        {per_limited}")
        print(f"  throughput                    {rate:7.0f} req/s")
        await broken.close()


if __name__ == "__main__":
    anyio.run(main)
