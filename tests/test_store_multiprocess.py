"""Four OS processes share one pool on Redis (each its own ``KeyPool`` and ``RedisStore``).

- A key that fails five times in one process is skipped by all four; the delay from the trip in
  one process to the others adopting it is measured (wall clock, one machine: ``time.monotonic``
  is system-wide on Linux) and printed as p50/p99.
- During half-open, the trial calls admitted across all four never exceed ``half_open_max_calls``.
- A 429 with ``retry-after: 30`` in one process keeps the key out in all of them, until the same
  instant.
"""

from __future__ import annotations

import statistics
import time
import traceback
import uuid
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest

from tests.process_fleet import Fleet
from tests.redis_server import RedisServer, running_redis

pytestmark = pytest.mark.slow

P = "p"
PROCESSES = 4
ROUNDS = 30
HALF_OPEN_MAX = 3
OPEN_SECONDS = 0.3
TRIP_KEYS = [f"t{i}" for i in range(ROUNDS)]
TRIAL_KEYS = [f"h{i}" for i in range(ROUNDS)]
OTHER_KEYS = ["x0", "x1", "x2", "x3"]


def _worker(url: str, namespace: str, barrier: Any, conn: Connection) -> None:
    """One process: a pool on Redis, driven by commands over ``conn``."""
    from keypool import BreakerConfig, BreakerState, KeyPool, KeyStateChanged, Lease, classify_status
    from keypool.store import RedisStore

    seen: dict[str, float] = {}

    def hook(event: object) -> None:
        if isinstance(event, KeyStateChanged) and event.new is BreakerState.OPEN:
            seen.setdefault(event.key_id, time.monotonic())

    breaker = BreakerConfig(
        timeout=OPEN_SECONDS, half_open_max_calls=HALF_OPEN_MAX, success_threshold=50, jitter=0.0
    )
    keys = [{"secret": f"sk-mp-{k}", "key_id": k} for k in TRIP_KEYS + TRIAL_KEYS + OTHER_KEYS]
    store = RedisStore(url, namespace=namespace, claim_timeout=0.5, op_timeout=0.5)
    pool = KeyPool(
        {"providers": [{"name": P, "keys": keys, "breaker": breaker.model_dump()}]},
        store=store,
        hooks=[hook],
    )
    held: list[Lease] = []

    def state(key_id: str) -> str:
        return str(pool.key_stats(key_id, P)["state"])

    def until(check: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def skips(key_id: str) -> bool:
        if pool.try_acquire_key(P, key_id) is not None:
            return False
        for _ in range(40):
            lease = pool.try_acquire(P)
            lease.release()  # no outcome: a probe of the selection, not a call
            if lease.key_id == key_id:
                return False
        return True

    conn.send(("ready", None))
    try:
        while True:
            command, arg = conn.recv()
            if command == "stop":
                break
            if command == "trip":  # five failures; report when the fifth was recorded
                for _ in range(4):
                    lease = pool.try_acquire_key(P, arg)
                    assert lease is not None
                    lease.failure("503")
                lease = pool.try_acquire_key(P, arg)
                assert lease is not None
                at = time.monotonic()
                lease.failure("503")
                conn.send(("ok", at))
            elif command == "seen":  # when this process learned of the trip, and that it skips it
                ok = until(lambda key_id=arg: key_id in seen, 2.0)
                conn.send(("ok", (seen.get(arg), ok and skips(arg))))
            elif command == "opened":  # (whether it learned of the trip)
                conn.send(("ok", until(lambda key_id=arg: key_id in seen, 2.0)))
            elif command == "contest":  # wait for half-open, line up with the others, grab trials
                ready = until(lambda key_id=arg: state(key_id) == "half_open", 3.0)
                barrier.wait(timeout=10)
                for _ in range(2 * HALF_OPEN_MAX):
                    lease = pool.try_acquire_key(P, arg)
                    if lease is not None:
                        assert lease.trial
                        held.append(lease)
                conn.send(("ok", (ready, len(held))))
            elif command == "release":
                for lease in held:
                    lease.release()
                held.clear()
                conn.send(("ok", None))
            elif command == "throttle":
                key_id, seconds = arg
                lease = pool.try_acquire_key(P, key_id)
                assert lease is not None
                lease.record(classify_status(429, {"retry-after": str(seconds)}))
                conn.send(("ok", pool._key(P, key_id).breaker.throttled_until))
            elif command == "throttled":  # (the instant it is out until, whether it is skipped now)
                ok = until(lambda key_id=arg: pool.key_stats(key_id, P)["open_reason"] == "throttled", 2.0)
                until_at = pool._key(P, arg).breaker.throttled_until
                conn.send(("ok", (until_at if ok else None, skips(arg))))
            elif command == "admits":
                lease = pool.try_acquire_key(P, arg)
                if lease is not None:
                    lease.release()
                conn.send(("ok", lease is not None))
            else:
                conn.send(("error", f"unknown command {command!r}"))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        store.close()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from running_redis()


@pytest.fixture(scope="module")
def fleet(redis_server: RedisServer) -> Iterator[Fleet]:
    namespace = f"mp{uuid.uuid4().hex[:8]}"
    group = Fleet(PROCESSES, _worker, lambda barrier: (redis_server.url, namespace, barrier))
    try:
        yield group
    finally:
        group.close()


def test_a_key_tripped_in_one_process_is_skipped_by_all_four(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    delays = []
    for r, key_id in enumerate(TRIP_KEYS):
        tripper = r % PROCESSES
        others = [i for i in range(PROCESSES) if i != tripper]
        tripped_at = fleet.ask(tripper, "trip", key_id)
        for seen_at, skipped in fleet.ask_all("seen", key_id, who=others):
            assert seen_at is not None, f"round {r}: a process never saw the trip of {key_id}"
            assert skipped, f"round {r}: a process still hands out {key_id}"
            delays.append(max(0.0, seen_at - tripped_at))
    delays.sort()
    p50 = statistics.median(delays)
    p99 = delays[min(len(delays) - 1, round(0.99 * (len(delays) - 1)))]
    with capsys.disabled():
        print(
            f"\ntrip propagation across {PROCESSES} processes, {len(delays)} samples: "
            f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms, max {delays[-1] * 1000:.2f} ms"
        )
    assert delays[-1] < 2.0


def test_half_open_trials_across_four_processes_never_exceed_the_limit(fleet: Fleet) -> None:
    for r, key_id in enumerate(TRIAL_KEYS):  # trip them all first: they half-open together
        fleet.ask(r % PROCESSES, "trip", key_id)
    for key_id in TRIAL_KEYS:
        assert all(fleet.ask_all("opened", key_id))
    totals = []
    for key_id in TRIAL_KEYS:
        results = fleet.ask_all("contest", key_id)
        assert all(ready for ready, _ in results), f"{key_id} never half-opened everywhere"
        total = sum(count for _, count in results)
        totals.append(total)
        fleet.ask_all("release")
        assert total <= HALF_OPEN_MAX, f"{key_id}: {total} trials admitted across processes"
    assert all(total == HALF_OPEN_MAX for total in totals), f"{totals}"  # the limit is reachable


def test_a_429_in_one_process_keeps_the_key_out_in_all(fleet: Fleet) -> None:
    until = fleet.ask(0, "throttle", ("x0", 30))
    assert until - time.monotonic() > 29
    for until_at, skipped in fleet.ask_all("throttled", "x0", who=[1, 2, 3]):
        assert until_at == pytest.approx(until, abs=0.05)  # the same instant everywhere
        assert skipped

    short = fleet.ask(1, "throttle", ("x1", 0.5))  # a short one: out everywhere, then back
    for until_at, skipped in fleet.ask_all("throttled", "x1", who=[0, 2, 3]):
        assert until_at == pytest.approx(short, abs=0.05)
        assert skipped
    time.sleep(max(0.0, short - time.monotonic()) + 0.05)
    assert all(fleet.ask_all("admits", "x1"))
    assert not any(fleet.ask_all("admits", "x0"))
