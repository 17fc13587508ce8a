"""Batches over the pool: ``client.batch_chat`` and ``run_batch``.

Results come back in input order with one outcome per item; a poison item fails alone and opens no
breaker; a key dying mid-batch costs no item; cancelling a batch stops it promptly and gives every
leased key back.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx2
import openai
import pytest

from keypool import CallRecorded, ConfigError, KeyPool, KeySpec, OutcomeKind, PoolEvent
from keypool.testing import FakeUpstream, Fault, LoopbackServer
from providers import AsyncDeepSeek, BatchItem, run_batch

SECRETS = {
    "alpha": "sk-batch-alpha-6a1d90ce",
    "bravo": "sk-batch-bravo-0f3b2e77",
    "charlie": "sk-batch-charlie-c41e85d2",
}


def make_pool(events: list[PoolEvent] | None = None) -> KeyPool:
    pool = KeyPool(hooks=[events.append] if events is not None else [], seed=11)
    pool.add_provider({"name": "deepseek", "keys": [KeySpec(secret=s, key_id=k) for k, s in SECRETS.items()]})
    return pool


def chat_request(i: int, model: str = "deepseek-chat") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": f"item {i}"}]}


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream(SECRETS.values(), flavor="deepseek")


@pytest.fixture
def server(upstream: FakeUpstream) -> Iterator[LoopbackServer]:
    with LoopbackServer(upstream, shutdown_timeout=0.2) as running:
        yield running


@pytest.mark.anyio
async def test_thousand_requests_with_ten_percent_poison(
    upstream: FakeUpstream, server: LoopbackServer
) -> None:
    events: list[PoolEvent] = []
    pool = make_pool(events)
    peak = 0

    def watch(event: PoolEvent) -> None:
        nonlocal peak
        peak = max(peak, pool.capacity("deepseek").in_flight)

    pool.add_hook(watch)
    requests = [chat_request(i, "poison" if i % 10 == 3 else "deepseek-chat") for i in range(1000)]
    # Over a socket, so that the 32 workers really run at once.
    async with AsyncDeepSeek(pool=pool, base_url=server.base_url) as client:
        results = await client.batch_chat(requests, concurrency=32)
    assert 16 <= peak <= 32

    assert [r.index for r in results] == list(range(1000))
    assert [r.input for r in results] == requests
    poison = [r for r in results if r.input["model"] == "poison"]
    good = [r for r in results if r.input["model"] != "poison"]
    assert len(poison) == 100
    assert all(not r.ok and isinstance(r.error, openai.BadRequestError) and r.result is None for r in poison)
    shown = repr(poison[0]) + str(poison[0].error)
    assert not any(secret in shown for secret in SECRETS.values())
    assert all(r.ok and r.error is None for r in good)
    assert all(
        r.result is not None and r.result.choices[0].message.content == f"item {r.index}" for r in good
    )

    # Each request reached the upstream exactly once: the poison ones were never retried.
    assert upstream.total_requests() == 1000
    assert sum(upstream.counters(s).status(400) for s in SECRETS.values()) == 100
    assert sum(upstream.counters(s).status(200) for s in SECRETS.values()) == 900
    outcomes = [e.outcome for e in events if isinstance(e, CallRecorded)]
    assert outcomes.count(OutcomeKind.CALLER_ERROR) == 100
    assert outcomes.count(OutcomeKind.SUCCESS) == 900
    for row in pool.stats("deepseek"):
        assert (row["state"], row["trips"], row["failure_count"]) == ("closed", 0, 0)
    assert pool.capacity("deepseek").in_flight == 0


@pytest.mark.anyio
@pytest.mark.parametrize("fault", [Fault.status(503), Fault.rejected()], ids=["503", "401"])
async def test_a_key_dying_mid_batch_costs_no_item(
    upstream: FakeUpstream, server: LoopbackServer, fault: Fault
) -> None:
    pool = make_pool()
    halfway = anyio.Event()
    recorded = 0

    def count(event: PoolEvent) -> None:
        nonlocal recorded
        if isinstance(event, CallRecorded):
            recorded += 1
            if recorded == 150:
                halfway.set()

    pool.add_hook(count)
    requests = [chat_request(i) for i in range(450)]
    # Over a socket: in-process, a worker never yields while every answer is ready at once.
    async with AsyncDeepSeek(pool=pool, base_url=server.base_url) as client:

        async def kill() -> None:  # another task switches the fault while the batch runs
            await halfway.wait()
            upstream.set_fault(SECRETS["alpha"], fault)

        async with anyio.create_task_group() as group:
            group.start_soon(kill)
            results = await client.batch_chat(requests, concurrency=32)

    assert [r.index for r in results] == list(range(450))
    assert [r for r in results if not r.ok] == []
    assert all(
        r.result is not None and r.result.choices[0].message.content == f"item {r.index}" for r in results
    )
    dead = upstream.counters(SECRETS["alpha"])
    assert dead.status(fault.status_code) >= 1
    assert dead.status(200) >= 1  # it served before it died
    stats = pool.key_stats("alpha", "deepseek")
    assert stats["state"] == "open"
    assert pool.capacity("deepseek").in_flight == 0


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["in-process", "loopback"])
async def test_cancelling_a_batch_stops_promptly_and_frees_every_key(
    upstream: FakeUpstream, where: str, request: pytest.FixtureRequest
) -> None:
    pool = make_pool()
    upstream.set_default_fault(Fault.hang())
    if where == "loopback":
        server = request.getfixturevalue("server")
        client = AsyncDeepSeek(pool=pool, base_url=server.base_url)
    else:
        client = AsyncDeepSeek(
            pool=pool, base_url="http://deepseek.test", transport=httpx2.ASGITransport(app=upstream)
        )
    done: list[Any] = []
    started = time.monotonic()
    async with client:
        # New keys carry one call each for their first 0.25 s (probation): give every worker time
        # to start its request before the cancel.
        with anyio.move_on_after(1.0) as scope:
            done.append(await client.batch_chat([chat_request(i) for i in range(200)], concurrency=8))
    elapsed = time.monotonic() - started
    assert scope.cancelled_caught
    assert done == []
    assert elapsed < 2.5
    assert pool.capacity("deepseek").in_flight == 0
    for row in pool.stats("deepseek"):  # a cancellation blames no key
        assert (row["state"], row["total_failures"], row["in_flight"]) == ("closed", 0, 0)
    hung = sum(upstream.counters(s).hangs for s in SECRETS.values())
    assert hung == 8  # one request per worker had started; nothing after the cancel
    for _ in range(300):  # the upstream notices the disconnects soon after
        if not sum(upstream.counters(s).in_flight for s in SECRETS.values()):
            break
        await anyio.sleep(0.01)
    assert sum(upstream.counters(s).in_flight for s in SECRETS.values()) == 0


@pytest.mark.anyio
async def test_progress_is_monotonic_and_reaches_the_total() -> None:
    calls: list[tuple[int, int, int]] = []
    rng = random.Random(5)

    async def work(i: int) -> int:
        await anyio.sleep(rng.random() / 500)
        if i % 7 == 0:
            raise ValueError(f"item {i} is bad")
        return i * 2

    results = await run_batch(work, list(range(150)), concurrency=9, progress=lambda *a: calls.append(a))
    assert [r.result for r in results if r.ok] == [i * 2 for i in range(150) if i % 7]
    assert [str(r.error) for r in results if not r.ok] == [f"item {i} is bad" for i in range(0, 150, 7)]
    assert len(calls) == 150
    assert [c[0] for c in calls] == list(range(1, 151))
    failed = [c[1] for c in calls]
    assert failed == sorted(failed)
    assert {c[2] for c in calls} == {150}
    assert calls[-1] == (150, 22, 150)


@pytest.mark.anyio
async def test_progress_true_draws_one_line_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    async def work(i: int) -> int:
        return i

    await run_batch(work, list(range(40)), concurrency=4, progress=True)
    err = capsys.readouterr().err
    assert err.endswith("\rbatch: 40/40 done, 0 failed\n")


@pytest.mark.anyio
async def test_bounded_concurrency_and_order() -> None:
    running = peak = 0

    async def work(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep((i % 5) / 1000)
        running -= 1
        return i

    results = await run_batch(work, list(range(100)), concurrency=6)
    assert peak == 6
    assert [r.result for r in results] == list(range(100))
    assert all(isinstance(r, BatchItem) and r.ok for r in results)


@pytest.mark.anyio
async def test_edge_cases() -> None:
    async def work(i: int) -> int:
        return i

    assert await run_batch(work, [], concurrency=4) == []
    assert [r.result for r in await run_batch(work, [1, 2], concurrency=50)] == [1, 2]
    with pytest.raises(ConfigError, match="concurrency"):
        await run_batch(work, [1], concurrency=0)
