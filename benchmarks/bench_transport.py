"""Requests/s of ``openai.AsyncOpenAI`` over ``KeyPoolTransport`` vs the same client over the plain
mock transport, same upstream, same run. Target ratio >= 0.95.

The upstream is an in-process ``httpx2.MockTransport`` returning a fixed chat completion, so the
figure isolates what keypool adds per request (lease, auth header, classify, record, body wrap).
Run: .venv/bin/python benchmarks/bench_transport.py
"""

from __future__ import annotations

import json
import statistics
import time

import anyio
import httpx2
import openai

from keypool import KeyPool, KeyPoolTransport

REQUESTS = 2_000
CONCURRENCY = 32
ROUNDS = 5
BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
    }
).encode()


def upstream(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, content=BODY, headers={"content-type": "application/json"})


async def drive(client: openai.AsyncOpenAI) -> float:
    remaining = iter(range(REQUESTS))

    async def worker() -> None:
        for _ in remaining:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])

    start = time.perf_counter()
    async with anyio.create_task_group() as group:
        for _ in range(CONCURRENCY):
            group.start_soon(worker)
    return REQUESTS / (time.perf_counter() - start)


def plain() -> openai.AsyncOpenAI:
    http = httpx2.AsyncClient(transport=httpx2.MockTransport(upstream))
    return openai.AsyncOpenAI(
        api_key="sk-bench", base_url="http://upstream/v1", max_retries=0, http_client=http
    )


def pooled() -> openai.AsyncOpenAI:
    pool = KeyPool.from_keys("p", [f"sk-bench-{i}" for i in range(10)])
    transport = KeyPoolTransport(pool, "p", transport=httpx2.MockTransport(upstream))
    http = httpx2.AsyncClient(transport=transport)
    return openai.AsyncOpenAI(
        api_key="unused", base_url="http://upstream/v1", max_retries=0, http_client=http
    )


async def main() -> None:
    base_client, pool_client = plain(), pooled()
    await drive(base_client)  # warm up both
    await drive(pool_client)
    base, ours = [], []
    for _ in range(ROUNDS):  # interleaved, so machine noise hits both alike
        base.append(await drive(base_client))
        ours.append(await drive(pool_client))
    b, o = statistics.median(base), statistics.median(ours)
    print(f"{REQUESTS} requests at concurrency {CONCURRENCY}, median of {ROUNDS} interleaved rounds")
    print(f"  plain transport      {b:8.0f} req/s")
    print(f"  KeyPoolTransport     {o:8.0f} req/s (10 keys)")
    print(f"  ratio pooled/plain   {o / b:8.3f}   target >= 0.95")


if __name__ == "__main__":
    anyio.run(main)
