"""Provider-wide outages: attempts spent before one is recognised, and primary attempts per request
while it lasts, with the provider's own breaker against the per-key view only, in one run.

DeepSeek (6 keys) answers 503 to everything for ``--outage`` seconds of virtual time; Perplexity
(3 keys) is healthy. A ``UnifiedAgent`` sends one request per ``--interval`` seconds. The pool
runs on a fake clock and the upstreams in-process, so the figures are counts, not timings: the
same on any machine.

    .venv/bin/python benchmarks/bench_routing.py
"""

from __future__ import annotations

import argparse

import anyio
import httpx2
from pydantic import SecretStr

from keypool import BreakerConfig, KeyPool, KeySpec
from keypool.testing import FakeClock, FakeUpstream, Fault
from providers import AsyncDeepSeek, AsyncPerplexity
from providers.unified import ChatRoute, UnifiedAgent

DEEPSEEK = [f"sk-bench-ds-{i}" for i in range(6)]
PERPLEXITY = [f"pplx-bench-{i}" for i in range(3)]


async def run(shared_endpoint: bool, outage: float, interval: float) -> dict[str, float]:
    clock = FakeClock()
    pool = KeyPool(clock=clock, seed=3)
    for name, keys in (("deepseek", DEEPSEEK), ("perplexity", PERPLEXITY)):
        specs = [KeySpec(secret=SecretStr(k)) for k in keys]
        pool.add_provider(
            {"name": name, "keys": specs, "shared_endpoint": shared_endpoint, "breaker": BreakerConfig()}
        )
    ds = FakeUpstream(DEEPSEEK, flavor="deepseek")
    px = FakeUpstream(PERPLEXITY, flavor="perplexity")
    ds.set_default_fault(Fault.status(503))
    deepseek = AsyncDeepSeek(pool=pool, base_url="http://ds.test", transport=httpx2.ASGITransport(app=ds))
    perplexity = AsyncPerplexity(pool=pool, base_url="http://px.test", transport=httpx2.ASGITransport(app=px))
    agent = UnifiedAgent([ChatRoute(deepseek), ChatRoute(perplexity, models={"deepseek-chat": "sonar"})])
    recognised_after: int | None = None
    requests = failed = 0
    start = clock.now()
    while clock.now() - start < outage:
        try:
            await agent.chat(
                model="deepseek-chat", messages=[{"role": "user", "content": "hi"}], priority="critical"
            )
        except Exception:
            failed += 1
        requests += 1
        if recognised_after is None and pool.capacity("deepseek").status == "down":
            recognised_after = ds.total_requests()
        clock.advance(interval)
    await deepseek.close()
    await perplexity.close()
    return {
        "recognised_after": float(recognised_after if recognised_after is not None else ds.total_requests()),
        "primary_attempts": float(ds.total_requests()),
        "per_request": ds.total_requests() / requests,
        "requests": float(requests),
        "failed": float(failed),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=600.0, help="seconds of virtual time")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between requests")
    args = parser.parse_args()
    provider_view = await run(True, args.outage, args.interval)
    per_key = await run(False, args.outage, args.interval)
    print(
        f"DeepSeek down for {args.outage:g} s, one request every {args.interval:g} s,"
        " 6 keys, fallback healthy"
    )
    print(f"{'':34} {'provider view':>14} {'per key only':>13} {'ratio':>7}")
    for name, label in (
        ("recognised_after", "attempts before it counts as down"),
        ("primary_attempts", "primary attempts in the outage"),
        ("per_request", "primary attempts per request"),
        ("failed", "requests failed"),
    ):
        a, b = provider_view[name], per_key[name]
        ratio = f"{a / b:7.3f}" if b else "      -"
        print(f"{label:34} {a:14.3f} {b:13.3f} {ratio}")


if __name__ == "__main__":
    anyio.run(main)
