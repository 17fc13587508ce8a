"""KeyPool: selection, leases, backup tier, waiting, capacity, stats, admin operations and events."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from typing import Any

import anyio
import httpx2
import pytest

from keypool import (
    BackupTierChanged,
    BreakerState,
    CallRecorded,
    CallRejected,
    KeyPool,
    KeyPoolError,
    KeyStateChanged,
    Lease,
    NoKeyAvailable,
    Outcome,
    OutcomeKind,
    PoolEvent,
)
from keypool.testing import FakeClock

P = "p"
YEAR = 365 * 86_400.0


class Recorder:
    def __init__(self) -> None:
        self.events: list[PoolEvent] = []

    def __call__(self, event: PoolEvent) -> None:
        self.events.append(event)

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def clear(self) -> None:
        self.events.clear()


def make_pool(
    clock: FakeClock,
    primary: int = 4,
    backup: int = 0,
    *,
    weights: list[float] | None = None,
    seed: int = 0,
    breaker: dict[str, Any] | None = None,
    hooks: tuple[Any, ...] = (),
    max_concurrency: int | None = None,
    backup_threshold: float = 0.5,
    probation: float = 0.0,
) -> KeyPool:
    keys: list[dict[str, Any]] = [
        {
            "secret": f"sk-test-primary-{i}-xxxxxxxx",
            "key_id": f"k{i}",
            "weight": weights[i] if weights else 1.0,
            "max_concurrency": max_concurrency,
        }
        for i in range(primary)
    ]
    keys += [
        {"secret": f"sk-test-backup-{i}-xxxxxxxx", "key_id": f"b{i}", "tier": "backup"} for i in range(backup)
    ]
    provider = {
        "name": P,
        "keys": keys,
        "breaker": breaker or {},
        "backup_threshold": backup_threshold,
        "probation": probation,  # tested on its own below; off so mechanics tests can hold leases
    }
    return KeyPool({"providers": [provider]}, clock=clock, seed=seed, hooks=hooks)


def lease_on(pool: KeyPool, key_id: str) -> Lease:
    others = [k for k in pool.key_ids(P) if k != key_id]
    lease = pool.try_acquire(P, exclude=others)
    assert lease.key_id == key_id
    return lease


def fail_key(pool: KeyPool, key_id: str, times: int = 5) -> None:
    for _ in range(times):
        lease_on(pool, key_id).failure()


def state_of(pool: KeyPool, key_id: str) -> str:
    return str(pool.key_stats(key_id)["state"])


def picks(pool: KeyPool, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        lease = pool.try_acquire(P)
        seen[lease.key_id] += 1
        lease.success()
    return seen


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---------------------------------------------------------------------------------- selection


def test_selection_follows_weights(clock: FakeClock) -> None:
    weights = [1.0, 2.0, 3.0, 4.0]
    pool = make_pool(clock, weights=weights, seed=11)
    n = 20_000
    seen = picks(pool, n)
    stat = sum((seen[f"k{i}"] - n * w / 10) ** 2 / (n * w / 10) for i, w in enumerate(weights))
    assert stat < 16.3  # 3 degrees of freedom, 99.9 % quantile


def test_fractional_weights(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=2, weights=[0.25, 0.75], seed=3)
    seen = picks(pool, 8000)
    assert 0.70 < seen["k1"] / 8000 < 0.80


def test_selection_leans_away_from_busy_keys(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=2, seed=5)
    held = [lease_on(pool, "k0") for _ in range(20)]
    seen = picks(pool, 4000)
    # two draws, keep the less loaded: k0 only wins when both draws land on it (about 1 in 4)
    assert seen["k0"] / 4000 < 0.35
    assert seen["k1"] > 2 * seen["k0"]
    for lease in held:
        lease.success()
    seen = picks(pool, 4000)
    assert 0.4 < seen["k0"] / 4000 < 0.6


@pytest.mark.parametrize(("failures", "admitted"), [(1, 4), (2, 3), (3, 2), (4, 1)])
def test_failing_key_admits_no_more_calls_than_failures_left(
    clock: FakeClock, failures: int, admitted: int
) -> None:
    pool = make_pool(clock, primary=1)
    fail_key(pool, "k0", failures)
    leases = []
    for _ in range(10):
        try:
            leases.append(pool.try_acquire(P))
        except NoKeyAvailable:
            break
    assert len(leases) == admitted
    assert pool.capacity(P).in_flight == admitted
    # every one of them failing trips the key exactly at the threshold
    for lease in leases:
        lease.failure()
    assert state_of(pool, "k0") == "open"


def test_dead_key_wastes_at_most_threshold_calls(clock: FakeClock) -> None:
    """Callers that keep retrying a dead key get at most failure_threshold calls through it."""
    pool = make_pool(clock, primary=1)
    first = pool.try_acquire(P)
    first.failure()
    admitted = 1
    in_flight: list[Lease] = []
    while state_of(pool, "k0") == "closed":
        while True:
            try:
                in_flight.append(pool.try_acquire(P))
                admitted += 1
            except NoKeyAvailable:
                break
        in_flight.pop(0).failure()
    assert admitted == 5
    assert not in_flight


def test_a_healthy_key_is_not_limited(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1)
    leases = [pool.try_acquire(P) for _ in range(100)]
    assert pool.capacity(P).in_flight == 100
    for lease in leases:
        lease.success()


def test_max_concurrency_per_key(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=2, max_concurrency=2)
    leases = [pool.try_acquire(P) for _ in range(4)]
    assert Counter(lease.key_id for lease in leases) == {"k0": 2, "k1": 2}
    with pytest.raises(NoKeyAvailable) as info:
        pool.try_acquire(P)
    assert info.value.retry_after is not None  # merely busy: it frees up by itself
    leases[0].release()
    assert pool.try_acquire(P).key_id == leases[0].key_id


def test_open_keys_are_never_picked(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=3)
    pool.trip(P, "k1")
    pool.quarantine("k2")
    assert set(picks(pool, 300)) == {"k0"}


def test_exclude(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=3)
    for _ in range(50):
        lease = pool.try_acquire(P, exclude={"k0", "k2"})
        assert lease.key_id == "k1"
        lease.release()
    with pytest.raises(NoKeyAvailable):
        pool.try_acquire(P, exclude={"k0", "k1", "k2"})


def test_added_and_removed_keys(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1)
    held = pool.try_acquire(P)
    key_id = pool.add_key(P, "sk-test-added-key-xxxxxxxx")
    assert key_id in pool.key_ids(P)
    assert set(picks(pool, 200)) == {"k0", key_id}
    pool.remove_key(P, "k0")
    assert pool.key_ids(P) == [key_id]
    assert set(picks(pool, 100)) == {key_id}
    held.failure()  # a call already holding a removed key finishes normally
    cap = pool.capacity(P)
    assert (cap.total, cap.in_flight) == (1, 0)


# ---------------------------------------------------------------------------------- leases


def test_lease_reports_once(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, primary=1, hooks=(rec,))
    lease = pool.try_acquire(P)
    assert not lease.done
    lease.failure()
    lease.success()
    lease.release()
    assert lease.done
    assert [e.outcome for e in rec.of(CallRecorded)] == [OutcomeKind.FAILURE]
    assert pool.capacity(P).in_flight == 0
    assert pool.key_stats("k0")["failure_count"] == 1


def test_lease_context_manager_records_success(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, primary=1, hooks=(rec,))
    with pool.try_acquire(P) as lease:
        assert pool.capacity(P).in_flight == 1
        assert lease.secret.get_secret_value() == "sk-test-primary-0-xxxxxxxx"
    assert [e.outcome for e in rec.of(CallRecorded)] == [OutcomeKind.SUCCESS]
    assert pool.capacity(P).in_flight == 0


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (httpx2.ConnectError("refused"), OutcomeKind.FAILURE),
        (httpx2.ReadTimeout("slow"), OutcomeKind.FAILURE),
        (TimeoutError(), OutcomeKind.FAILURE),
        (ValueError("a bug in the caller"), OutcomeKind.IGNORED),
        (KeyboardInterrupt(), OutcomeKind.IGNORED),
    ],
    ids=lambda v: type(v).__name__,
)
def test_lease_context_manager_classifies_exceptions(
    clock: FakeClock, exc: BaseException, kind: OutcomeKind
) -> None:
    rec = Recorder()
    pool = make_pool(clock, primary=1, hooks=(rec,))
    with pytest.raises(type(exc)), pool.try_acquire(P):
        raise exc
    assert [e.outcome for e in rec.of(CallRecorded)] == [kind]
    assert pool.key_stats("k0")["failure_count"] == (1 if kind is OutcomeKind.FAILURE else 0)
    assert pool.capacity(P).in_flight == 0


def test_explicit_record_inside_the_block_wins(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, primary=1, hooks=(rec,))

    def call() -> None:
        with pool.try_acquire(P) as lease:
            lease.record(Outcome(OutcomeKind.THROTTLED, 429, 30.0))
            raise RuntimeError("after the 429")

    with pytest.raises(RuntimeError):
        call()
    assert [e.outcome for e in rec.of(CallRecorded)] == [OutcomeKind.THROTTLED]
    assert state_of(pool, "k0") == "open"


@pytest.mark.anyio
async def test_async_lease_records_success_and_failure(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, primary=1, hooks=(rec,))
    async with await pool.acquire(P, timeout=1):
        pass
    with pytest.raises(httpx2.ReadError):
        async with await pool.acquire(P, timeout=1):
            raise httpx2.ReadError("reset")
    assert [e.outcome for e in rec.of(CallRecorded)] == [OutcomeKind.SUCCESS, OutcomeKind.FAILURE]


@pytest.mark.anyio
async def test_async_lease_releases_its_trial_slot_on_cancellation(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, primary=1, hooks=(rec,))
    pool.trip(P)
    clock.advance(60)
    with anyio.CancelScope() as scope:
        async with await pool.acquire(P, timeout=1) as lease:
            assert lease.trial
            assert pool.key_stats("k0")["trials_in_flight"] == 1
            scope.cancel()
            await anyio.sleep(10)
    assert scope.cancelled_caught
    assert [e.outcome for e in rec.of(CallRecorded)] == [OutcomeKind.IGNORED]
    stats = pool.key_stats("k0")
    assert (stats["state"], stats["in_flight"], stats["trials_in_flight"]) == ("half_open", 0, 0)
    assert (stats["total_failures"], stats["success_count"]) == (0, 0)


def test_lease_repr_names_the_key_only(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1)
    lease = pool.try_acquire(P)
    assert repr(lease) == "Lease(provider='p', key_id='k0', done=False)"
    assert (lease.provider, lease.tier, lease.trial) == (P, "primary", False)


# ---------------------------------------------------------------------------------- backup tier


def test_backup_tier_follows_primary_health(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, primary=4, backup=2, hooks=(rec,), seed=2)
    assert not pool.capacity(P).backup_active
    assert set(picks(pool, 400)) <= {"k0", "k1", "k2", "k3"}

    pool.trip(P, "k0")
    pool.trip(P, "k1")  # healthy share 0.5: not below the threshold
    assert not pool.capacity(P).backup_active
    assert rec.of(BackupTierChanged) == []

    pool.trip(P, "k2")  # 0.25
    assert pool.capacity(P).backup_active
    assert rec.of(BackupTierChanged) == [BackupTierChanged(P, True, "primary_unhealthy")]
    seen = picks(pool, 600)
    assert set(seen) == {"k3", "b0", "b1"}

    # primaries recover by themselves: half-open, two trial successes each
    clock.advance(60)
    for key_id in ("k0", "k1"):
        for _ in range(2):
            lease_on(pool, key_id).success()
    assert pool.capacity(P).backup_active is False
    assert rec.of(BackupTierChanged)[-1] == BackupTierChanged(P, False, "primary_recovered")
    assert set(picks(pool, 400)) <= {"k0", "k1", "k2", "k3"}


def test_backup_tier_steps_back_on_reset(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, primary=2, backup=1, hooks=(rec,))
    pool.trip(P, "k0")
    pool.trip(P, "k1")
    assert pool.capacity(P).backup_active
    assert pool.reset(P) == 3
    assert not pool.capacity(P).backup_active
    assert [e.active for e in rec.of(BackupTierChanged)] == [True, False]


def test_backup_threshold_is_configurable(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=4, backup=1, backup_threshold=0.9)
    pool.trip(P, "k0")  # 0.75 < 0.9
    assert pool.capacity(P).backup_active


def test_manual_backup_activation(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, primary=2, backup=2, hooks=(rec,), seed=4)
    pool.activate_backup(P)  # True by default
    cap = pool.capacity(P)
    assert (cap.backup_active, cap.backup_forced) == (True, True)
    assert {"b0", "b1"} <= set(picks(pool, 400))

    pool.trip(P, "k0")
    pool.trip(P, "k1")
    pool.activate_backup(P, False)
    assert (pool.capacity(P).backup_active, pool.capacity(P).backup_forced) == (False, False)
    pool.reset(P, "k0")
    assert set(picks(pool, 200)) == {"k0"}  # forced off: backups do not serve beside a primary

    pool.activate_backup(P, None)  # automatic again: one primary of two closed is not below half
    assert pool.capacity(P).backup_forced is None
    assert not pool.capacity(P).backup_active
    assert rec.of(BackupTierChanged) == [
        BackupTierChanged(P, True, "operator"),
        BackupTierChanged(P, False, "operator"),
    ]
    pool.trip(P, "k0")
    assert pool.capacity(P).backup_active
    assert rec.of(BackupTierChanged)[-1] == BackupTierChanged(P, True, "primary_unhealthy")


def test_backups_do_not_serve_while_the_primaries_are_merely_busy(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1, backup=1, max_concurrency=1)
    held = pool.try_acquire(P)
    assert held.key_id == "k0"
    with pytest.raises(NoKeyAvailable):  # the primary is healthy, only busy: backups stay idle
        pool.try_acquire(P)
    assert not pool.capacity(P).backup_active
    held.success()
    assert pool.try_acquire(P).key_id == "k0"


def test_backups_serve_when_no_primary_can(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1, backup=1)
    pool.trip(P, "k0")
    assert pool.capacity(P).backup_active
    assert pool.try_acquire(P).key_id == "b0"


# ---------------------------------------------------------------------------------- waiting


@pytest.mark.anyio
async def test_acquire_waits_for_the_soonest_recovery_inside_max_wait_and_the_deadline(
    clock: FakeClock,
) -> None:
    pool = make_pool(clock, primary=2)
    pool.trip(P, "k0")
    clock.advance(10)
    pool.trip(P, "k1")  # k0 back at 1060, k1 at 1070
    lease = await pool.acquire(P, timeout=55, max_wait=math.inf)
    assert clock.slept == [50.0]
    assert clock.now() == 1060.0
    assert (lease.key_id, lease.trial) == ("k0", True)


@pytest.mark.anyio
async def test_a_down_pool_is_refused_at_once_by_default(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, primary=2, hooks=(rec,))
    pool.trip(P)  # back in 60 s: far beyond the default max_wait of 5 s
    with pytest.raises(NoKeyAvailable) as info:
        await pool.acquire(P, timeout=600)
    assert clock.slept == []
    assert (info.value.reason, info.value.retry_after) == ("open", 60.0)
    assert "open after failures" in str(info.value)
    assert rec.of(CallRejected) == [CallRejected(P, "open")]


def test_acquire_sync_waits_on_the_clock(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1)
    pool.trip(P)
    lease = pool.acquire_sync(P, timeout=60, max_wait=60)
    assert clock.slept == [60.0]
    assert lease.trial


@pytest.mark.anyio
async def test_acquire_raises_at_once_when_recovery_is_beyond_the_deadline(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, primary=2, hooks=(rec,))
    pool.trip(P)
    clock.advance(15)
    with pytest.raises(NoKeyAvailable) as info:
        await pool.acquire(P, timeout=30)
    assert clock.slept == []
    assert info.value.retry_after == pytest.approx(45.0)
    assert info.value.provider == P
    assert "'p'" in str(info.value)
    assert "45.000" in str(info.value)
    assert isinstance(info.value, KeyPoolError)
    assert rec.of(CallRejected) == [CallRejected(P, "open")]
    with pytest.raises(NoKeyAvailable):
        pool.acquire_sync(P, timeout=30)
    with pytest.raises(NoKeyAvailable) as now_info:
        pool.try_acquire(P)
    assert now_info.value.retry_after == pytest.approx(45.0)


@pytest.mark.anyio
async def test_acquire_waits_for_a_short_throttle_and_refuses_a_long_one(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1)
    pool.try_acquire(P).record(Outcome(OutcomeKind.THROTTLED, 429, 3.0))
    lease = await pool.acquire(P, timeout=31)  # a 3 s Retry-After is inside the default max_wait
    assert clock.slept == [3.0]
    assert not lease.trial
    lease.record(Outcome(OutcomeKind.THROTTLED, 429, 30.0))
    with pytest.raises(NoKeyAvailable) as info:
        pool.try_acquire(P)
    assert (info.value.reason, info.value.retry_after) == ("throttled", pytest.approx(30.0))
    with pytest.raises(NoKeyAvailable) as waited:
        await pool.acquire(P, timeout=31)
    assert waited.value.reason == "throttled"
    assert clock.slept == [3.0]  # refused at once: 30 s is beyond max_wait
    lease = await pool.acquire(P, timeout=31, max_wait=30)
    assert clock.slept == [3.0, 30.0]


@pytest.mark.anyio
async def test_all_quarantined_means_no_retry_after(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=2)
    pool.quarantine("k0")
    pool.try_acquire(P).record(Outcome(OutcomeKind.EXHAUSTED, 402))
    with pytest.raises(NoKeyAvailable) as info:
        await pool.acquire(P, timeout=YEAR)
    assert info.value.retry_after is None
    assert "reset or rotate" in str(info.value)
    assert clock.slept == []


@pytest.mark.anyio
async def test_quarantine_after_a_trip_leaves_no_phantom_recovery(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1)
    pool.trip(P)  # would have been back at 1060 ...
    pool.quarantine("k0")  # ... but now it never comes back by itself
    assert pool.capacity(P).next_recovery_in is None
    with pytest.raises(NoKeyAvailable) as info:
        await pool.acquire(P, timeout=120)
    assert info.value.retry_after is None
    assert clock.slept == []


@pytest.mark.anyio
async def test_waiting_ignores_excluded_keys(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=2)
    pool.quarantine("k1")
    pool.try_acquire(P).record(Outcome(OutcomeKind.THROTTLED, 429, 30.0))  # k0 back at 1030
    with pytest.raises(NoKeyAvailable):
        await pool.acquire(P, timeout=60, exclude={"k0"})
    assert clock.slept == []  # waiting for a key the caller will not take is pointless


@pytest.mark.anyio
async def test_a_caller_queued_behind_a_busy_key_gets_it_the_moment_it_frees(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1, max_concurrency=1)
    held = pool.try_acquire(P)
    got: list[Lease] = []

    async def wait_for_it() -> None:
        got.append(await pool.acquire(P, timeout=1))

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_for_it)
        await anyio.wait_all_tasks_blocked()
        assert pool.capacity(P).waiting == 1
        held.success()
    assert [lease.key_id for lease in got] == ["k0"]
    assert clock.slept == []  # handed over, not polled for
    assert pool.capacity(P).waiting == 0


def test_acquire_with_a_zero_timeout_does_not_wait(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1)
    pool.trip(P)
    with pytest.raises(NoKeyAvailable):
        pool.acquire_sync(P, timeout=0)
    assert clock.slept == []


def test_acquire_without_a_timeout_waits_for_a_recovery_only_inside_max_wait(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1)
    pool.trip(P)
    with pytest.raises(NoKeyAvailable):
        pool.acquire_sync(P)
    lease = pool.acquire_sync(P, max_wait=math.inf)
    assert lease.trial
    assert sum(clock.slept) == pytest.approx(60.0)


def test_acquire_without_a_timeout_does_not_wait_for_quarantined_keys(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1)
    pool.quarantine("k0", P)
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire_sync(P)
    assert info.value.retry_after is None
    assert clock.slept == []


# ---------------------------------------------------------------------------------- probation


def test_a_new_key_carries_one_call_at_a_time_until_it_succeeds(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1, probation=0.25)
    first = pool.try_acquire(P)
    with pytest.raises(NoKeyAvailable) as info:
        pool.try_acquire(P)
    assert info.value.retry_after == pytest.approx(0.25)
    first.success()
    leases = [pool.try_acquire(P) for _ in range(10)]  # proven: no limit any more
    assert len(leases) == 10


def test_probation_ends_by_itself_after_its_window(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1, probation=0.25)
    pool.try_acquire(P)  # never reports back
    clock.advance(0.25)
    assert pool.try_acquire(P).key_id == "k0"


def test_a_key_dead_from_the_start_costs_one_call_not_a_burst(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=2, probation=0.25)
    taken = [pool.try_acquire(P) for _ in range(2)]
    assert sorted(lease.key_id for lease in taken) == ["k0", "k1"]
    with pytest.raises(NoKeyAvailable):  # both keys are on probation with a call in flight
        pool.try_acquire(P)
    dead = next(lease for lease in taken if lease.key_id == "k0")
    dead.record(Outcome(OutcomeKind.THROTTLED, 429, 30.0))
    assert pool.key_stats("k0", P)["state"] == "open"


def test_reset_puts_a_key_back_on_probation(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1, probation=0.25)
    pool.try_acquire(P).success()
    pool.reset(P, "k0")
    pool.try_acquire(P)
    with pytest.raises(NoKeyAvailable):
        pool.try_acquire(P)


# ---------------------------------------------------------------------------------- capacity


def test_capacity_counts_and_status(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=4, backup=2)
    cap = pool.capacity(P)
    assert (cap.total, cap.closed, cap.open, cap.status, cap.healthy_share) == (6, 6, 0, "healthy", 1.0)
    assert cap.next_recovery_in is None
    assert (cap.primary.total, cap.backup.total) == (4, 2)

    pool.trip(P, "k0")
    cap = pool.capacity(P)
    assert (cap.closed, cap.open, cap.status) == (5, 1, "degraded")
    assert cap.next_recovery_in == 60.0

    clock.advance(20)
    pool.try_acquire(P, exclude={"k2", "k3", "b0", "b1"}).record(Outcome(OutcomeKind.THROTTLED, 429, 10.0))
    pool.quarantine("k2")
    cap = pool.capacity(P)
    # Exactly half closed is not "majority open": degraded, like the alert and the backup tier.
    assert (cap.closed, cap.open, cap.throttled, cap.quarantined, cap.status) == (3, 3, 1, 1, "degraded")
    assert cap.healthy_share == 0.5
    assert cap.next_recovery_in == 10.0  # the throttled key
    assert (cap.primary.open, cap.primary.throttled, cap.primary.quarantined) == (1, 1, 1)

    clock.advance(10)
    cap = pool.capacity(P)
    assert (cap.closed, cap.open, cap.throttled) == (4, 2, 0)
    assert cap.next_recovery_in == 30.0

    clock.advance(30)
    cap = pool.capacity(P)
    assert (cap.half_open, cap.open, cap.status) == (1, 1, "degraded")
    assert cap.next_recovery_in is None

    pool.trip(P)
    pool.quarantine("k0")
    pool.quarantine("k1")
    pool.quarantine("k3")
    pool.quarantine("b0")
    pool.quarantine("b1")
    cap = pool.capacity(P)
    assert (cap.status, cap.quarantined, cap.closed, cap.next_recovery_in) == ("down", 6, 0, None)


def test_capacity_when_every_key_is_open(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=3)
    pool.trip(P)
    cap = pool.capacity(P)
    assert (cap.status, cap.open, cap.healthy_share, cap.next_recovery_in) == ("down", 3, 0.0, 60.0)
    clock.advance(60)
    cap = pool.capacity(P)
    assert (cap.status, cap.half_open) == ("critical", 3)


def test_capacity_in_flight_and_as_dict(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=2, backup=1)
    leases = [pool.try_acquire(P) for _ in range(3)]
    cap = pool.capacity(P)
    assert cap.in_flight == 3
    assert cap.primary.in_flight == 3
    data = cap.as_dict()
    json.dumps(data)
    assert data["provider"] == P
    assert data["status"] == "healthy"
    assert data["primary"]["in_flight"] == 3
    assert set(data) >= {
        "total",
        "closed",
        "half_open",
        "open",
        "throttled",
        "quarantined",
        "next_recovery_in",
    }
    for lease in leases:
        lease.success()
    assert pool.capacity(P).in_flight == 0


def test_a_busy_pool_is_not_down(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1, max_concurrency=1)
    pool.try_acquire(P)
    assert pool.capacity(P).status == "healthy"


# ---------------------------------------------------------------------------------- stats and admin


def test_stats_has_the_runbook_shape(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=2)
    fail_key(pool, "k0", 3)
    stats = pool.stats()
    json.dumps(stats)
    assert [s["key_id"] for s in stats] == ["k0", "k1"]
    for row in stats:
        assert {"key_id", "provider", "state", "failure_count", "success_count", "config"} <= set(row)
        assert {"failure_threshold", "success_threshold", "timeout"} <= set(row["config"])
        assert row["provider"] == P
    k0 = stats[0]
    assert (k0["state"], k0["failure_count"], k0["success_count"]) == ("closed", 3, 0)
    assert k0["config"]["failure_threshold"] == 5
    assert k0["config"]["success_threshold"] == 2
    assert k0["config"]["timeout"] == 60
    assert pool.stats(P) == stats
    assert pool.key_stats("k0") == k0


def test_stats_follow_the_breaker(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1)
    fail_key(pool, "k0", 5)
    assert pool.key_stats("k0")["state"] == "open"
    assert pool.key_stats("k0")["retry_in"] == 60.0
    clock.advance(60)
    assert pool.key_stats("k0")["state"] == "half_open"
    lease_on(pool, "k0").success()
    row = pool.key_stats("k0")
    assert (row["state"], row["success_count"]) == ("half_open", 1)
    lease_on(pool, "k0").success()
    assert pool.key_stats("k0")["state"] == "closed"


def test_reset_one_and_all(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=3)
    pool.trip(P)
    pool.quarantine("k2")
    assert pool.reset(P, "k0") == 1
    assert [s["state"] for s in pool.stats()] == ["closed", "open", "open"]
    assert pool.reset(key_id="k1") == 1
    assert pool.reset() == 3
    assert {s["state"] for s in pool.stats()} == {"closed"}
    assert pool.capacity(P).status == "healthy"


def test_trip_counts_and_reports(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=3)
    assert pool.trip(P) == 3
    assert pool.capacity(P).open == 3


def test_pool_repr(clock: FakeClock) -> None:
    assert repr(make_pool(clock, primary=2, backup=1)) == "KeyPool(providers={'p': 3})"


def test_multiple_providers_are_independent(clock: FakeClock) -> None:
    pool = KeyPool(
        {
            "providers": [
                {"name": "deepseek", "keys": [{"secret": "sk-ds-xxxxxxxxxxxx", "key_id": "d0"}]},
                {"name": "perplexity", "keys": [{"secret": "pplx-xxxxxxxxxxxx", "key_id": "x0"}]},
            ]
        },
        clock=clock,
    )
    assert pool.providers == ("deepseek", "perplexity")
    pool.trip("deepseek")
    assert pool.capacity("deepseek").status == "down"
    assert pool.capacity("perplexity").status == "healthy"
    assert pool.try_acquire("perplexity").key_id == "x0"
    assert pool.reset("deepseek") == 1


# ---------------------------------------------------------------------------------- events


def test_events_for_a_trip_and_a_recovery(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, primary=1, hooks=(rec,))
    for _ in range(5):
        lease = pool.try_acquire(P)
        clock.advance(0.25)
        lease.failure()
    recorded = rec.of(CallRecorded)
    assert len(recorded) == 5
    assert recorded[0] == CallRecorded(P, "k0", OutcomeKind.FAILURE, None, 0.25, False)
    assert rec.of(KeyStateChanged) == [
        KeyStateChanged(P, "k0", BreakerState.CLOSED, BreakerState.OPEN, "failures", 1001.25)
    ]
    rec.clear()
    clock.advance(200)
    pool.poll()
    assert rec.of(KeyStateChanged) == [
        KeyStateChanged(P, "k0", BreakerState.OPEN, BreakerState.HALF_OPEN, "timeout_elapsed", 1061.25)
    ]
    rec.clear()
    for _ in range(2):
        lease = pool.try_acquire(P)
        lease.success()
    assert [e.trial for e in rec.of(CallRecorded)] == [True, True]
    assert [(e.old, e.new, e.reason) for e in rec.of(KeyStateChanged)] == [
        (BreakerState.HALF_OPEN, BreakerState.CLOSED, "trial_succeeded")
    ]


def test_events_for_statuses(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, primary=1, hooks=(rec,))
    pool.try_acquire(P).record(Outcome(OutcomeKind.CALLER_ERROR, 400))
    pool.try_acquire(P).record(Outcome(OutcomeKind.REJECTED, 401))
    assert [(e.outcome, e.status) for e in rec.of(CallRecorded)] == [
        (OutcomeKind.CALLER_ERROR, 400),
        (OutcomeKind.REJECTED, 401),
    ]
    [change] = rec.of(KeyStateChanged)
    assert (change.new, change.reason) == (BreakerState.OPEN, "rejected")
    assert pool.key_stats("k0")["open_reason"] == "rejected"
    assert pool.key_stats("k0")["quarantined"] is True
    with pytest.raises(NoKeyAvailable):
        pool.try_acquire(P)
    assert rec.of(CallRejected) == [CallRejected(P, "rejected")]


def test_a_caller_error_never_opens_a_breaker(clock: FakeClock) -> None:
    pool = make_pool(clock, primary=1)
    for _ in range(1000):
        pool.try_acquire(P).record(Outcome(OutcomeKind.CALLER_ERROR, 400))
    row = pool.key_stats("k0")
    assert (row["state"], row["failure_count"], row["trips"]) == ("closed", 0, 0)


def test_a_raising_hook_does_not_break_a_call(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: PoolEvent) -> None:
        raise RuntimeError("hook bug")

    rec = Recorder()
    pool = make_pool(clock, primary=1, hooks=(broken, rec))
    with caplog.at_level(logging.ERROR, logger="keypool"):
        lease = pool.try_acquire(P)
        lease.success()
        pool.trip(P)
        with pytest.raises(NoKeyAvailable):
            pool.try_acquire(P)
    assert len(rec.of(CallRecorded)) == 1  # later hooks still hear every event
    assert len(rec.of(KeyStateChanged)) == 1
    assert any("hook" in r.getMessage() and r.exc_info for r in caplog.records)
    assert pool.capacity(P).in_flight == 0


def test_hooks_can_be_added_and_removed(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, primary=1)
    pool.add_hook(rec)
    pool.try_acquire(P).success()
    pool.remove_hook(rec)
    pool.try_acquire(P).success()
    assert len(rec.of(CallRecorded)) == 1


def test_events_are_frozen(clock: FakeClock) -> None:
    event = CallRejected(P, "breaker_open")
    with pytest.raises(AttributeError):
        event.reason = "x"  # type: ignore[misc]


def test_a_provider_outage_opens_keys_left_half_open_so_none_looks_stuck(clock: FakeClock) -> None:
    """A key half-open when the provider's own breaker opens could get no trial while the
    provider is out: it opens again with the others instead of waiting there half-open."""
    from keypool import BreakerState, Outcome, OutcomeKind

    pool = KeyPool(clock=clock, seed=1)
    pool.add_provider(
        {"name": "p", "keys": [{"secret": f"sk-stuck-{i}-abcdef", "key_id": f"k{i}"} for i in range(4)]}
    )
    pool.trip("p", "k0")
    clock.advance(61.0)
    assert pool.key_stats("k0", "p")["state"] == "half_open"
    others = ["k1", "k2", "k3"]
    while pool.capacity("p").provider_state == "closed":
        lease = pool.try_acquire("p", exclude={"k0"})
        assert lease.key_id in others
        lease.record(Outcome(OutcomeKind.FAILURE, 503))
    assert pool.capacity("p").provider_state == BreakerState.OPEN.label
    assert pool.key_stats("k0", "p")["state"] == "open"  # not left half-open with no trial to run
    assert pool.capacity("p").half_open == 0


def test_two_dead_keys_failing_side_by_side_do_not_take_the_provider_out(clock: FakeClock) -> None:
    """Concurrent calls on two dead keys of six can fail many times in a row before a sibling's
    success lands: a run on fewer than half the keys stays those keys' (their own breakers)."""
    from keypool import Outcome, OutcomeKind

    pool = KeyPool(clock=clock, seed=1)
    keys = [{"secret": f"sk-sidebyside-{i}-abcdef", "key_id": f"k{i}"} for i in range(6)]
    pool.add_provider({"name": "p", "keys": keys, "breaker": {"failure_threshold": 5}})
    healthy = {"k2", "k3", "k4", "k5"}
    for _ in range(4):  # k0, k1, k0, k1, ...: eight failures in a row across the two
        for dead in ("k0", "k1"):
            lease = pool.try_acquire("p", exclude=healthy | ({"k0", "k1"} - {dead}))
            lease.record(Outcome(OutcomeKind.FAILURE, 503))
    assert pool.capacity("p").provider_state == "closed"
    assert {pool.key_stats(k, "p")["state"] for k in healthy} == {"closed"}
    assert pool.try_acquire("p", exclude={"k0", "k1"}).key_id in healthy
