"""Time to an answer in an outage: keypool's refusal against the plain client's error.

Every key of the fake upstream on loopback answers 503. ``AsyncDeepSeek`` (10 keys, defaults) is
driven until its keys are open, then 30 concurrent callers are timed from the call to the
exception, round after round; the plain ``openai.AsyncOpenAI`` (one key) is timed the same way
against the same upstream in the same run, with its default ``max_retries=2`` (what a user gets)
and with ``max_retries=0`` (one round trip: the fastest any client can learn of the outage). The
same is then done with every key rate-limited (429, retry-after 30 s), where the plain client's
default retries would sleep the Retry-After (60 s a call), so only its single round trip is timed.
Run: .venv/bin/python benchmarks/bench_outage.py
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import anyio
import openai

from keypool.testing import FakeUpstream, Fault, LoopbackServer
from providers import AsyncDeepSeek

CALLERS = 30
POOLED_ROUNDS = 40
PLAIN_ROUNDS = 4
SECRETS = [f"sk-bench-outage-{i}" for i in range(10)]
PLAIN = "sk-bench-outage-plain"
MESSAGES = [{"role": "user", "content": "hello"}]


async def round_of(client: openai.AsyncOpenAI, expected: type[Exception]) -> list[float]:
    """CALLERS concurrent calls; each one's seconds from the call to its exception."""
    times: list[float] = []

    async def one() -> None:
        start = time.perf_counter()
        try:
            await client.chat.completions.create(model="deepseek-chat", messages=MESSAGES)  # type: ignore[arg-type]
        except expected:
            times.append(time.perf_counter() - start)
            return
        raise AssertionError(f"expected {expected.__name__}")

    async with anyio.create_task_group() as group:
        for _ in range(CALLERS):
            group.start_soon(one)
    return times


async def sample(client: openai.AsyncOpenAI, expected: type[Exception], rounds: int) -> list[float]:
    times: list[float] = []
    for _ in range(rounds):
        times += await round_of(client, expected)
    return times


def pct(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def show(label: str, times: list[float]) -> None:
    p50, p99 = pct(times, 0.5) * 1e3, pct(times, 0.99) * 1e3
    print(f"  {label:34s} p50 {p50:9.2f} ms   p99 {p99:9.2f} ms   (n={len(times)})")


async def scenario(
    name: str,
    server: LoopbackServer,
    upstream: FakeUpstream,
    fault: Fault,
    expected: type[Exception],
    until_out: Callable[[AsyncDeepSeek], bool],
    retry_rounds: int = PLAIN_ROUNDS,
) -> None:
    upstream.clear_faults()
    upstream.set_default_fault(fault)
    pooled = AsyncDeepSeek(api_keys=SECRETS, base_url=server.base_url)
    plain = openai.AsyncOpenAI(api_key=PLAIN, base_url=server.base_url)
    plain_once = plain.with_options(max_retries=0)
    while not until_out(pooled):  # real failures until every key is out
        with contextlib.suppress(expected):
            await pooled.chat.completions.create(model="deepseek-chat", messages=MESSAGES)  # type: ignore[arg-type]
    upstream.reset_counters()
    ours = await sample(pooled, expected, POOLED_ROUNDS)
    sent = sum(upstream.counters(s).requests for s in SECRETS)
    once = await sample(plain_once, expected, PLAIN_ROUNDS * 5)
    base = await sample(plain, expected, retry_rounds) if retry_rounds else []
    print(f"{name}: {CALLERS} concurrent callers per round")
    show("AsyncDeepSeek (10 keys), refused", ours)
    show("plain AsyncOpenAI, max_retries=0", once)
    if base:
        show("plain AsyncOpenAI, max_retries=2", base)
    print(f"  upstream requests during the refusals   {sent}")
    for label, other in (("max_retries=0", once), ("max_retries=2", base)):
        if not other:
            continue
        p50 = pct(ours, 0.5) / pct(other, 0.5)
        p99 = pct(ours, 0.99) / pct(other, 0.99)
        print(f"  ratio keypool / plain ({label})  p50 {p50:.4f}   p99 {p99:.4f}")
    await pooled.close()
    await plain.close()


async def main() -> None:
    upstream = FakeUpstream([*SECRETS, PLAIN], flavor="deepseek")
    with LoopbackServer(upstream) as server:
        await scenario(
            "every key open after 503s",
            server,
            upstream,
            Fault.status(503),
            openai.InternalServerError,
            lambda c: c.pool.capacity(c.provider).status == "down",
        )
        await scenario(
            "every key rate-limited (429, retry-after 30 s)",
            server,
            upstream,
            Fault.rate_limited(30.0),
            openai.RateLimitError,
            lambda c: c.pool.capacity(c.provider).throttled == len(SECRETS),
            retry_rounds=0,  # the plain client sleeps the 30 s Retry-After before each retry
        )


if __name__ == "__main__":
    anyio.run(main)
