"""Busy versus down: the first-come queue, hand-off, refusals, and the planning cases that used to
go wrong (a busy key beside an open key, a full half-open key, queued callers after a recovery)."""

from __future__ import annotations

import heapq
import math
import random
import threading
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keypool import KeyPool, Lease, NoKeyAvailable, Outcome, OutcomeKind
from keypool._keys import KeyState, ProviderState
from keypool._waiting import Waiter, soonest_timer
from keypool.testing import FakeClock

P = "p"


def pool_of(clock: FakeClock, n: int = 2, *, concurrency: int | None = None, **provider: Any) -> KeyPool:
    keys = [
        {"secret": f"sk-wait-{i}-xxxxxxxx", "key_id": f"k{i}", "max_concurrency": concurrency}
        for i in range(n)
    ]
    return KeyPool(
        {"providers": [{"name": P, "keys": keys, "probation": 0.0, **provider}]}, clock=clock, seed=3
    )


def throttle(pool: KeyPool, key_id: str, seconds: float) -> None:
    others = set(pool.key_ids(P)) - {key_id}
    pool.try_acquire(P, exclude=others).record(Outcome(OutcomeKind.THROTTLED, 429, seconds))


@pytest.mark.anyio
async def test_a_busy_key_beside_an_open_key_serves_the_queue_when_its_call_ends() -> None:
    clock = FakeClock()
    pool = pool_of(clock, concurrency=1)
    pool.trip(P, "k1")  # open for 60 s: a timer far away
    held = pool.try_acquire(P)
    assert held.key_id == "k0"
    got: list[Lease] = []

    async def caller() -> None:
        got.append(await pool.acquire(P, timeout=5))

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        assert got == []  # queued behind the busy key, not refused because k1 is open
        held.success()
    assert [lease.key_id for lease in got] == ["k0"]
    assert clock.slept == []  # no wait for k1's timer, no polling


@pytest.mark.anyio
async def test_the_queue_is_first_come_first_served() -> None:
    clock = FakeClock()
    pool = pool_of(clock, n=1, concurrency=1)
    held = pool.try_acquire(P)
    order: list[int] = []

    async def caller(i: int) -> None:
        lease = await pool.acquire(P, timeout=5)
        order.append(i)
        lease.success()

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(caller, i)
            await anyio.wait_all_tasks_blocked()  # each joins the queue in turn
        assert pool.capacity(P).waiting == 20
        held.success()
    assert order == list(range(20))


def test_a_newcomer_does_not_take_a_key_a_queued_caller_was_handed() -> None:
    clock = FakeClock()
    pool = pool_of(clock, n=1, concurrency=1)
    held = pool.try_acquire(P)
    got: list[Lease] = []
    ready = threading.Event()

    def queued() -> None:
        ready.set()
        got.append(pool.acquire_sync(P, timeout=5))

    t = threading.Thread(target=queued)
    t.start()
    ready.wait()
    while pool.capacity(P).waiting == 0:
        threading.Event().wait(0.001)
    held.success()  # handed to the queued caller under the lock, before anyone else looks
    with pytest.raises(NoKeyAvailable) as info:
        pool.try_acquire(P)
    assert info.value.reason == "busy"
    t.join(5)
    assert [lease.key_id for lease in got] == ["k0"]


@pytest.mark.anyio
async def test_a_full_half_open_key_is_busy_and_serves_its_queue_when_it_closes() -> None:
    clock = FakeClock()
    pool = pool_of(clock, n=1, breaker={"half_open_max_calls": 2, "probe_timeout": 120})
    pool.trip(P)
    clock.advance(60)
    trials = [pool.try_acquire(P), pool.try_acquire(P)]
    with pytest.raises(NoKeyAvailable) as refused:
        pool.try_acquire(P)
    assert refused.value.reason == "busy"  # not "open", and not retry_after=120 (probe_timeout)
    served: list[Lease] = []

    async def caller() -> None:
        served.append(await pool.acquire(P, timeout=10))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        clock.advance(0.01)
        for trial in trials:
            trial.success()
    assert len(served) == 5
    assert clock.slept == []


@pytest.mark.anyio
async def test_queued_callers_after_a_recovery_are_served_as_soon_as_the_keys_close() -> None:
    clock = FakeClock()
    pool = pool_of(clock, n=2, max_wait=120.0)
    pool.trip(P)  # both keys back in 60 s, inside max_wait
    served: list[Lease] = []
    done: list[float] = []

    async def caller() -> None:
        lease = await pool.acquire(P, timeout=120)
        served.append(lease)
        done.append(clock.now())
        if lease.trial:
            lease.success()

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(caller)
    assert len(served) == 10
    assert set(done) == {1060.0}  # every one served at the recovery instant, none left behind
    assert {row["state"] for row in pool.stats()} == {"closed"}


@pytest.mark.anyio
async def test_a_down_pool_refuses_at_once_and_says_why() -> None:
    clock = FakeClock()
    pool = pool_of(clock, n=3)
    pool.trip(P, "k0")
    throttle(pool, "k1", 30.0)
    pool.quarantine("k2")
    with pytest.raises(NoKeyAvailable) as info:
        await pool.acquire(P, timeout=600)
    # The soonest recovery is the throttle: it says when, and why.
    assert (info.value.reason, info.value.retry_after) == ("throttled", 30.0)
    assert clock.slept == []


def test_refusal_reasons_for_quarantined_pools() -> None:
    clock = FakeClock()
    for status, kind, reason in (
        (401, OutcomeKind.REJECTED, "rejected"),
        (403, OutcomeKind.REJECTED, "forbidden"),
        (402, OutcomeKind.EXHAUSTED, "quota"),
    ):
        pool = pool_of(clock, n=2, incident_window=0.0)  # no incident: each refusal is a verdict
        clock.advance(1)
        for key_id in ("k0", "k1"):
            pool.try_acquire(P, exclude={"k0", "k1"} - {key_id}).record(Outcome(kind, status))
            clock.advance(1)
        with pytest.raises(NoKeyAvailable) as info:
            pool.try_acquire(P)
        assert (info.value.reason, info.value.retry_after) == (reason, None)


def test_a_deadline_of_zero_and_bad_waits_are_named() -> None:
    pool = pool_of(FakeClock())
    with pytest.raises(ValueError, match="max_wait"):
        pool.acquire_sync(P, max_wait=-1)
    with pytest.raises(ValueError, match="timeout"):
        pool.acquire_sync(P, timeout=-0.1)
    with pytest.raises(ValueError, match="max_wait"):
        KeyPool({"providers": [{"name": P, "keys": [{"secret": "sk-x-yyyyyyyy"}], "max_wait": -1}]})


@pytest.mark.anyio
async def test_a_busy_wait_ends_at_the_deadline_as_busy() -> None:
    clock = FakeClock()
    pool = pool_of(clock, n=1, concurrency=1)
    pool.try_acquire(P)
    errors: list[NoKeyAvailable] = []

    async def caller() -> None:
        try:
            await pool.acquire(P, timeout=2)
        except NoKeyAvailable as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        clock.advance(2.5)  # the deadline passes while the key is still held
    assert [e.reason for e in errors] == ["busy"]
    assert pool.capacity(P).waiting == 0


@pytest.mark.anyio
async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    clock = FakeClock()
    pool = pool_of(clock, n=1, concurrency=1)
    held = pool.try_acquire(P)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.acquire, P)
        await anyio.wait_all_tasks_blocked()
        assert pool.capacity(P).waiting == 1
        tg.cancel_scope.cancel()
    assert pool.capacity(P).waiting == 0
    held.success()  # nobody is handed it: the cancelled caller is gone
    assert pool.capacity(P).in_flight == 0
    assert pool.try_acquire(P).key_id == "k0"


@pytest.mark.anyio
async def test_a_waiter_that_leaves_after_being_handed_a_key_gives_it_back() -> None:
    clock = FakeClock()
    pool = pool_of(clock, n=1, concurrency=1)
    held = pool.try_acquire(P)
    waiter = Waiter(frozenset(), sync=False)
    lease, plan = pool._attempt(P, frozenset(), waiter, None, 5.0, False)
    assert lease is None
    assert plan is not None
    assert plan.wait
    held.success()  # handed to the waiter under the lock
    assert waiter.lease is not None
    assert pool.capacity(P).in_flight == 1
    pool._abandon(P, waiter)  # cancelled before it ran again
    assert pool.capacity(P).in_flight == 0
    assert pool.capacity(P).waiting == 0


@pytest.mark.anyio
async def test_an_async_waiter_is_woken_by_a_thread_and_a_thread_by_a_task() -> None:
    clock = FakeClock()
    pool = pool_of(clock, n=1, concurrency=1)
    held = pool.try_acquire(P)
    got: list[Lease] = []

    async def task_waiter() -> None:
        got.append(await pool.acquire(P, timeout=30))

    async with anyio.create_task_group() as tg:
        tg.start_soon(task_waiter)
        await anyio.wait_all_tasks_blocked()
        await anyio.to_thread.run_sync(held.success)  # freed in another thread
    assert len(got) == 1
    lease = got[0]
    thread_got: list[Lease] = []
    t = threading.Thread(target=lambda: thread_got.append(pool.acquire_sync(P, timeout=30)))
    t.start()
    while pool.capacity(P).waiting == 0:  # noqa: ASYNC110 - a thread joins the queue, no event to wait on
        await anyio.sleep(0.001)
    lease.success()  # freed on the event loop
    await anyio.to_thread.run_sync(t.join, 10)
    assert len(thread_got) == 1


@pytest.mark.anyio
async def test_stress_many_callers_released_together_never_exceed_the_caps() -> None:
    clock = FakeClock()
    pool = pool_of(clock, n=4, concurrency=2)
    in_flight = 0
    peak = 0
    served = 0
    go = anyio.Event()

    async def caller(i: int) -> None:
        nonlocal in_flight, peak, served
        await go.wait()
        lease = await pool.acquire(P, timeout=60)
        in_flight += 1
        peak = max(peak, in_flight)
        for _ in range(i % 3):
            await anyio.lowlevel.checkpoint()
        in_flight -= 1
        served += 1
        lease.success()

    async with anyio.create_task_group() as tg:
        for i in range(500):
            tg.start_soon(caller, i)
        await anyio.wait_all_tasks_blocked()
        go.set()
    assert served == 500
    assert peak <= 8  # four keys, two calls each
    assert all(row["in_flight"] == 0 for row in pool.stats())
    assert clock.slept == []


# ---------------------------------------------------------------------------------- the heap walk


@settings(max_examples=200, deadline=None)
@given(
    times=st.lists(st.floats(0, 1000, allow_nan=False), min_size=1, max_size=60),
    stale=st.sets(st.integers(0, 59)),
    excluded=st.sets(st.integers(0, 59)),
)
def test_the_best_first_heap_walk_finds_the_soonest_live_unexcluded_timer(
    times: list[float], stale: set[int], excluded: set[int]
) -> None:
    pool = pool_of(FakeClock(), n=len(times))
    prov: ProviderState = pool._providers[P]
    keys: list[KeyState] = list(prov.keys.values())
    prov.heap.clear()
    for i, (at, key) in enumerate(zip(times, keys, strict=True)):
        key.scheduled_at = None if i in stale else at
        heapq.heappush(prov.heap, (at, i, key))
    exclude = frozenset(keys[i].id for i in excluded if i < len(keys))
    live = [(at, i) for i, at in enumerate(times) if i not in stale and keys[i].id not in exclude]
    found = soonest_timer(prov, exclude)
    if not live:
        assert found is None
    else:
        assert found is not None
        assert found[0] == min(at for at, _ in live)


def test_a_refusal_at_ten_thousand_keys_walks_only_what_comes_before_the_answer() -> None:
    clock = FakeClock()
    keys = [{"secret": f"sk-many-{i:05d}-xxxx", "key_id": f"k{i}"} for i in range(10_000)]
    pool = KeyPool({"providers": [{"name": P, "keys": keys}]}, clock=clock)
    pool.trip(P)
    prov = pool._providers[P]
    visited = 0
    real_heappop = heapq.heappop  # every entry looked at is popped from the walk's frontier

    def counting_heappop(heap: list[Any]) -> Any:
        nonlocal visited
        visited += 1
        return real_heappop(heap)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("keypool._waiting.heapq.heappop", counting_heappop)
        with pytest.raises(NoKeyAvailable):
            pool.try_acquire(P)
    assert len(prov.heap) >= 10_000
    assert visited <= 3  # the top entry is the answer: nothing else is looked at


# ---------------------------------------------------------------------------------- selection


def test_a_failover_pick_whose_draws_hit_excluded_keys_still_draws_by_weight() -> None:
    clock = FakeClock()
    keys = [
        {"secret": "sk-heavy-xxxxxxxx", "key_id": "heavy", "weight": 100_000},
        {"secret": "sk-light-xxxxxxxx", "key_id": "light", "weight": 1},
        {"secret": "sk-mid-xxxxxxxxxx", "key_id": "mid", "weight": 3},
    ]
    pool = KeyPool({"providers": [{"name": P, "keys": keys, "probation": 0.0}]}, clock=clock, seed=11)
    picks = {"light": 0, "mid": 0}
    for _ in range(4000):
        lease = pool.try_acquire(P, exclude={"heavy"})  # nearly every draw lands on "heavy"
        picks[lease.key_id] += 1
        lease.success()
    share = picks["mid"] / 4000
    assert 0.70 < share < 0.80  # by weight (3 of 4), not by list order (which gave "light" always)


def test_capacity_counts_only_the_tiers_that_serve() -> None:
    clock = FakeClock()
    keys = [{"secret": f"sk-cap-{i}-xxxxxxxx", "key_id": f"p{i}"} for i in range(2)]
    keys += [{"secret": f"sk-cap-b{i}-xxxxxxx", "key_id": f"b{i}", "tier": "backup"} for i in range(3)]
    pool = KeyPool({"providers": [{"name": P, "keys": keys}]}, clock=clock)
    for b in ("b0", "b1", "b2"):
        pool.quarantine(b)
    cap = pool.capacity(P)
    # 2 healthy primaries + 3 quarantined idle backups: healthy, not critical.
    assert (cap.status, cap.healthy_share, cap.serving, cap.backup_active) == ("healthy", 1.0, 2, False)
    no_backups = pool_of(clock, n=2)
    no_backups.trip(P)
    assert no_backups.capacity(P).backup_active is False  # nothing to activate
    assert no_backups.capacity(P).status == "down"


def test_capacity_degrades_as_soon_as_failures_accumulate() -> None:
    pool = pool_of(FakeClock(), n=4)
    assert pool.capacity(P).status == "healthy"
    pool.try_acquire(P).failure()
    assert pool.capacity(P).status == "degraded"  # before any breaker trips
    for key_id in pool.key_ids(P):
        pool.reset(P, key_id)
    assert pool.capacity(P).status == "healthy"


def test_capacity_is_down_only_when_nothing_serves_now_nor_when_a_call_ends() -> None:
    clock = FakeClock()
    pool = pool_of(clock, n=1, concurrency=1)
    lease = pool.try_acquire(P)
    assert pool.capacity(P).status != "down"  # busy: the call in flight frees the key
    lease.failure()
    pool.trip(P)
    assert pool.capacity(P).status == "down"
    assert pool.capacity(P).next_recovery_in == 60.0


# ---------------------------------------------------------------------------------- incidents


def test_every_key_refused_together_is_an_incident_and_the_keys_come_back() -> None:
    clock = FakeClock()
    pool = pool_of(clock, n=3)
    for key_id in ("k0", "k1", "k2"):
        pool.try_acquire(P, exclude={"k0", "k1", "k2"} - {key_id}).record(Outcome(OutcomeKind.REJECTED, 401))
    with pytest.raises(NoKeyAvailable) as info:
        pool.try_acquire(P)
    assert info.value.reason == "rejected"
    assert info.value.retry_after is not None  # a recheck is scheduled: it says when
    assert 30.0 <= info.value.retry_after <= 45.0
    clock.advance(45.0)
    trial = pool.try_acquire(P)
    assert trial.trial
    trial.success()  # the provider accepts the key again: it is back, closed
    assert pool.key_stats(trial.key_id)["state"] == "closed"
    assert pool.key_stats(trial.key_id)["quarantined"] is False


def test_a_lone_401_stays_a_quarantine() -> None:
    clock = FakeClock()
    pool = pool_of(clock, n=3)
    pool.try_acquire(P, exclude={"k1", "k2"}).record(Outcome(OutcomeKind.REJECTED, 401))
    clock.advance(3600)
    row = pool.key_stats("k0")
    assert (row["state"], row["quarantined"], row["retry_in"]) == ("open", True, None)


def test_refusals_spread_over_time_are_verdicts_not_an_incident() -> None:
    clock = FakeClock()
    pool = pool_of(clock, n=2)
    pool.try_acquire(P, exclude={"k1"}).record(Outcome(OutcomeKind.EXHAUSTED, 402))
    clock.advance(3600)  # long after, the other key runs dry too
    pool.try_acquire(P).record(Outcome(OutcomeKind.EXHAUSTED, 402))
    with pytest.raises(NoKeyAvailable) as info:
        pool.try_acquire(P)
    assert (info.value.reason, info.value.retry_after) == ("quota", None)


def test_an_operator_quarantine_is_never_an_incident() -> None:
    clock = FakeClock()
    pool = pool_of(clock, n=2)
    pool.quarantine("k0")
    pool.try_acquire(P).record(Outcome(OutcomeKind.REJECTED, 401))
    clock.advance(3600)
    assert [row["retry_in"] for row in pool.stats()] == [None, None]


def test_waiting_metric_source_is_exact_under_churn() -> None:
    rng = random.Random(4)
    clock = FakeClock()
    pool = pool_of(clock, n=2, concurrency=1)
    held = [pool.try_acquire(P), pool.try_acquire(P)]
    results: list[str] = []
    lock = threading.Lock()

    def caller() -> None:
        try:
            lease = pool.acquire_sync(P, timeout=30)
        except NoKeyAvailable:
            with lock:
                results.append("refused")
            return
        with lock:
            results.append("served")
        threading.Event().wait(rng.random() * 0.002)
        lease.success()

    threads = [threading.Thread(target=caller) for _ in range(40)]
    for t in threads:
        t.start()
    for lease in held:
        lease.success()
    for t in threads:
        t.join(30)
    assert results.count("served") == 40
    assert pool.capacity(P).waiting == 0
    assert math.isclose(pool.capacity(P).in_flight, 0)
