"""The pool under contention: tasks and threads at once never break the breaker's limits."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import pytest

from keypool import (
    BreakerState,
    CallRecorded,
    KeyPool,
    Lease,
    NoKeyAvailable,
    Outcome,
    OutcomeKind,
    PoolEvent,
)
from keypool.testing import FakeClock

P = "p"


def half_open_pool(clock: FakeClock, half_open_max_calls: int = 3) -> KeyPool:
    pool = KeyPool(
        {
            "providers": [
                {
                    "name": P,
                    "keys": [{"secret": "sk-test-only-key-xxxxxxxx", "key_id": "k0"}],
                    "breaker": {"half_open_max_calls": half_open_max_calls},
                }
            ]
        },
        clock=clock,
    )
    pool.trip(P)
    clock.advance(60)
    assert pool.key_stats("k0")["state"] == "half_open"
    return pool


@contextmanager
def small_thread_stacks() -> Iterator[None]:
    old = threading.stack_size(256 * 1024)
    try:
        yield
    finally:
        threading.stack_size(old)


@pytest.mark.anyio
@pytest.mark.parametrize("limit", [1, 3])
async def test_a_thousand_tasks_on_a_half_open_key(limit: int) -> None:
    clock = FakeClock()
    pool = half_open_pool(clock, limit)
    go = anyio.Event()
    admitted: list[Lease] = []
    refused = 0

    async def contender() -> None:
        nonlocal refused
        await go.wait()
        try:
            admitted.append(pool.try_acquire(P))
        except NoKeyAvailable:
            refused += 1

    async with anyio.create_task_group() as tg:
        for _ in range(1000):
            tg.start_soon(contender)
        await anyio.wait_all_tasks_blocked()
        go.set()
    assert len(admitted) == limit
    assert refused == 1000 - limit
    assert all(lease.trial for lease in admitted)
    assert pool.key_stats("k0")["trials_in_flight"] == limit
    for lease in admitted:
        lease.success()
    assert pool.key_stats("k0")["state"] == ("closed" if limit >= 2 else "half_open")


@pytest.mark.anyio
async def test_a_thousand_waiting_tasks_on_a_half_open_key_that_closes_10_ms_later() -> None:
    """Callers that wait queue behind the trials instead of being refused (the key is busy, not
    down); the trials never exceed the limit, and when the key closes every caller is served."""
    clock = FakeClock()
    pool = half_open_pool(clock)
    go = anyio.Event()
    admitted: list[Lease] = []
    refused: list[NoKeyAvailable] = []

    async def contender() -> None:
        await go.wait()
        try:
            admitted.append(await pool.acquire(P, timeout=1.0))
        except NoKeyAvailable as exc:
            refused.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(1000):
            tg.start_soon(contender)
        await anyio.wait_all_tasks_blocked()
        go.set()
        await anyio.wait_all_tasks_blocked()
        assert len(admitted) == 3  # the trials, no more
        assert all(lease.trial for lease in admitted)
        assert pool.capacity(P).waiting == 997
        clock.advance(0.010)
        admitted[0].success()
        admitted[1].success()  # success_threshold 2: closed, and the queue is served at once
    assert refused == []
    assert len(admitted) == 1000
    assert clock.now() == pytest.approx(1060.010)  # served then, not at a deadline or a timer
    assert pool.capacity(P).waiting == 0


@pytest.mark.anyio
async def test_waiting_tasks_are_refused_at_once_when_the_trials_fail() -> None:
    clock = FakeClock()
    pool = half_open_pool(clock)
    go = anyio.Event()
    admitted: list[Lease] = []
    refused: list[NoKeyAvailable] = []

    async def contender() -> None:
        await go.wait()
        try:
            admitted.append(await pool.acquire(P, timeout=30.0))
        except NoKeyAvailable as exc:
            refused.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(contender)
        await anyio.wait_all_tasks_blocked()
        go.set()
        await anyio.wait_all_tasks_blocked()
        admitted[0].failure()  # the key opens again for 60 s: the queue is down, not busy
    assert len(admitted) == 3
    assert len(refused) == 197
    assert {(e.reason, e.retry_after) for e in refused} == {("open", 60.0)}
    assert clock.now() == 1060.0  # nobody was held to the 30 s deadline
    assert pool.capacity(P).waiting == 0


def test_a_thousand_threads_on_a_half_open_key() -> None:
    clock = FakeClock()
    pool = half_open_pool(clock)
    n = 1000
    barrier = threading.Barrier(n, timeout=60)
    lock = threading.Lock()
    admitted: list[Lease] = []
    refused = Counter[str]()
    errors: list[BaseException] = []

    def contender(i: int) -> None:
        try:
            barrier.wait()
            lease = pool.try_acquire(P) if i % 2 else pool.acquire_sync(P, timeout=0)
        except NoKeyAvailable:
            with lock:
                refused["no_key"] += 1
            return
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            return
        with lock:
            admitted.append(lease)

    with small_thread_stacks():
        threads = [threading.Thread(target=contender, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors
    assert len(admitted) == 3
    assert refused["no_key"] == n - 3
    assert pool.key_stats("k0")["trials_in_flight"] == 3
    assert pool.capacity(P).in_flight == 3


@pytest.mark.anyio
async def test_mixed_stress_keeps_every_invariant() -> None:
    clock = FakeClock()
    keys = [{"secret": f"sk-stress-{i}-xxxxxxxx", "key_id": f"k{i}", "weight": 1 + i % 3} for i in range(6)]
    keys += [{"secret": f"sk-stress-b{i}-xxxxxxxx", "key_id": f"b{i}", "tier": "backup"} for i in range(2)]
    pool = KeyPool(
        {
            "providers": [
                {
                    "name": P,
                    "keys": keys,
                    "breaker": {
                        "failure_threshold": 3,
                        "timeout": 2,
                        "half_open_max_calls": 2,
                        "probe_timeout": 5,
                    },
                }
            ]
        },
        clock=clock,
        seed=1,
    )
    violations: list[str] = []
    recorded = Counter[OutcomeKind]()
    count_lock = threading.Lock()
    acquired = 0

    def watch(event: PoolEvent) -> None:
        if isinstance(event, CallRecorded):
            with count_lock:
                recorded[event.outcome] += 1
            row = pool.key_stats(event.key_id)
            if row["in_flight"] < 0:
                violations.append(f"negative in_flight on {event.key_id}")
            if row["trials_in_flight"] > 2:
                violations.append(f"too many trials on {event.key_id}")

    pool.add_hook(watch)
    outcomes = [
        Outcome(OutcomeKind.SUCCESS, 200),
        Outcome(OutcomeKind.SUCCESS, 200),
        Outcome(OutcomeKind.SUCCESS, 200),
        Outcome(OutcomeKind.FAILURE, 503),
        Outcome(OutcomeKind.FAILURE, 503),
        Outcome(OutcomeKind.THROTTLED, 429, 0.5),
        Outcome(OutcomeKind.CALLER_ERROR, 400),
        Outcome(OutcomeKind.IGNORED),
    ]

    def settle(lease: Lease, rng: random.Random) -> None:
        lease.record(rng.choice(outcomes))

    def thread_worker(seed: int) -> None:
        nonlocal acquired
        rng = random.Random(seed)
        held: list[Lease] = []
        for _ in range(3000):
            try:
                lease = pool.try_acquire(P) if rng.random() < 0.7 else pool.acquire_sync(P, timeout=0.5)
                with count_lock:
                    acquired += 1
                held.append(lease)
            except NoKeyAvailable:
                pass
            if held and (len(held) > 3 or rng.random() < 0.6):
                settle(held.pop(rng.randrange(len(held))), rng)
            if rng.random() < 0.05:
                clock.advance(rng.random())
            if rng.random() < 0.005:
                pool.reset(P, f"k{rng.randrange(6)}")
        for lease in held:
            settle(lease, rng)

    async def task_worker(seed: int) -> None:
        nonlocal acquired
        rng = random.Random(seed)
        for _ in range(400):
            try:
                async with await pool.acquire(P, timeout=1.0) as lease:
                    with count_lock:
                        acquired += 1
                    await anyio.lowlevel.checkpoint()
                    if rng.random() < 0.7:
                        settle(lease, rng)
            except NoKeyAvailable:
                pass
            if rng.random() < 0.05:
                clock.advance(rng.random())

    threads = [threading.Thread(target=thread_worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()

    async def ticker() -> None:
        # Callers queued behind busy keys wait for a key or their deadline; a worker that holds
        # leases while it waits needs time to pass, so time passes while anyone still works.
        while any(t.is_alive() for t in threads):
            clock.advance(0.01)
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        for i in range(40):
            tg.start_soon(task_worker, 1000 + i)
        for _ in range(500):
            cap = pool.capacity(P)
            if cap.in_flight < 0:
                violations.append("negative in_flight in capacity")
            await anyio.lowlevel.checkpoint()
    for t in threads:
        await anyio.to_thread.run_sync(t.join, 60)

    assert not violations
    assert acquired > 20_000
    assert sum(recorded.values()) == acquired  # every lease reported exactly once
    stats = pool.stats(P)
    assert all(row["in_flight"] == 0 for row in stats)
    assert sum(row["total_successes"] for row in stats) == recorded[OutcomeKind.SUCCESS]
    assert sum(row["total_failures"] for row in stats) == recorded[OutcomeKind.FAILURE]

    pool.poll()
    cap = pool.capacity(P)
    assert cap.in_flight == 0
    assert cap.total == 8
    assert cap.closed + cap.half_open + cap.open == cap.total
    assert cap.throttled + cap.quarantined <= cap.open
    states = Counter(row["state"] for row in stats)
    assert states["closed"] == cap.closed
    assert states["half_open"] == cap.half_open
    assert states["open"] == cap.open
    for tier in (cap.primary, cap.backup):
        assert tier.closed + tier.half_open + tier.open + tier.throttled + tier.quarantined == tier.total

    pool.reset()
    cap = pool.capacity(P)
    assert (cap.status, cap.closed) == ("healthy", 8)
    assert {pool.key_stats(k)["state"] for k in pool.key_ids(P)} == {BreakerState.CLOSED.label}
