"""RedisStore under faults, on a private ``redis-server`` this module stops, restarts and pauses.

Redis going away, coming back empty, or hanging must never fail a user request: the pools serve
on local state, the store says so once (one log line, ``degraded``), and when Redis answers again
each process merges what it knows (a key known to be open stays open) and the pools agree again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import openai
import pytest
import redis

from keypool import BreakerConfig, KeyPool, MonotonicClock, classify_status
from keypool.store import RedisStore
from keypool.testing import FakeUpstream, Fault, LoopbackServer
from providers import AsyncDeepSeek
from tests.redis_server import RedisServer, closed_afterwards, free_port, redis_server_binary, running_redis

P = "deepseek"
SECRETS = [f"sk-redis-{i}" for i in range(4)]
KEYS = [{"secret": s, "key_id": f"k{i}"} for i, s in enumerate(SECRETS)]
STORE_LOG = "keypool.store"


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    yield from running_redis()


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[FakeUpstream, LoopbackServer]]:
    app = FakeUpstream(SECRETS, flavor="deepseek")
    with LoopbackServer(app, shutdown_timeout=0.2) as loop_server:
        yield app, loop_server


@pytest.fixture
def stores() -> Iterator[list[RedisStore]]:
    yield from closed_afterwards()


def new_store(made: list[RedisStore], url: str, namespace: str, **options: Any) -> RedisStore:
    options = {"op_timeout": 0.3, "claim_timeout": 0.1, "retry_interval": 0.05, **options}
    store = RedisStore(url, namespace=namespace, **options)
    made.append(store)
    return store


def new_pool(store: RedisStore, **breaker: Any) -> KeyPool:
    cfg = BreakerConfig(**{"jitter": 0.0, **breaker})
    return KeyPool({"providers": [{"name": P, "keys": KEYS, "breaker": cfg.model_dump()}]}, store=store)


def state(pool: KeyPool, key_id: str) -> str:
    return str(pool.key_stats(key_id, P)["state"])


def store_records(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == STORE_LOG and r.levelno == level and text in r.getMessage()
    ]


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


async def await_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await anyio.sleep(0.005)


def agree(a: KeyPool, b: KeyPool) -> bool:
    """Both pools hold the same state for every key (open deadlines within a few ms)."""
    for key_id in a.key_ids(P):
        x, y = a._key(P, key_id).breaker, b._key(P, key_id).breaker
        if x.state() != y.state() or x.quarantined != y.quarantined:
            return False
        if abs((x.tripped_until() or 0) - (y.tripped_until() or 0)) > 0.02:
            return False
    return True


# ---------------------------------------------------------------------- Redis goes away and comes back


@pytest.mark.anyio
async def test_redis_stopping_fails_no_request_and_state_converges_after_a_restart(
    server: RedisServer,
    upstream: tuple[FakeUpstream, LoopbackServer],
    stores: list[RedisStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    app, loop_server = upstream
    app.set_fault(SECRETS[0], Fault.status(503))  # k0 is dead: its failures are shared
    ns = f"chaos{uuid.uuid4().hex[:6]}"
    a_store, b_store = new_store(stores, server.url, ns), new_store(stores, server.url, ns)
    a, b = new_pool(a_store), new_pool(b_store)
    clients = [AsyncDeepSeek(pool=pool, base_url=loop_server.base_url) for pool in (a, b)]
    served, failed = 0, []

    async def drive(client: openai.AsyncOpenAI, n: int) -> None:
        nonlocal served
        for i in range(n):
            try:
                await client.chat.completions.create(
                    model="deepseek-chat", messages=[{"role": "user", "content": f"q{i}"}]
                )
                served += 1
            except Exception as exc:  # every failure counts, whatever its type
                failed.append(exc)

    async def both(n: int) -> None:
        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(drive, client, n)

    try:
        await both(30)
        await await_for(lambda: state(a, "k0") == state(b, "k0") == "open")

        async def stop_soon() -> None:
            await anyio.sleep(0.02)
            server.stop()

        async with anyio.create_task_group() as tg:  # Redis goes away in the middle of a run
            tg.start_soon(both, 40)
            tg.start_soon(stop_soon)
        await both(10)  # some requests after it went
        a.trip(P, "k1")  # known only to a: Redis is gone
        throttled = a.try_acquire_key(P, "k2")
        assert throttled is not None
        throttled.record(classify_status(429, {"retry-after": "600"}))  # likewise seen only by a
        await both(20)
        await await_for(lambda: a_store.degraded and b_store.degraded)
        assert failed == []
        warnings = store_records(caplog, logging.WARNING, "unavailable")
        assert len(warnings) == 2, [r.getMessage() for r in warnings]  # one per store, not per request
        assert a_store.degradations == b_store.degradations == 1
        assert state(b, "k1") == "closed"

        server.start()  # the same port, no data: every shared key is gone
        await await_for(lambda: not a_store.degraded and not b_store.degraded)
        await both(20)
        assert failed == []
        await await_for(lambda: agree(a, b))
        for pool in (a, b):
            assert state(pool, "k0") == "open"  # known open before the restart: still open
            assert state(pool, "k1") == "open"  # known open by a alone: now by b too
            assert pool.key_stats("k2", P)["open_reason"] == "throttled"
        assert b._key(P, "k2").breaker.throttled_until == pytest.approx(
            a._key(P, "k2").breaker.throttled_until, abs=0.02
        )
        back = store_records(caplog, logging.INFO, "is back")
        assert len(back) == 2
        assert len(store_records(caplog, logging.WARNING, "unavailable")) == 2
        client = redis.Redis.from_url(server.url)
        try:
            assert client.hget(f"{ns}:b:{P}:k0", "open") == b"1"
        finally:
            client.close()
        assert served >= 120
    finally:
        app.clear_faults()
        if not server.running:
            server.start()
        for c in clients:
            await c.close()


def test_a_store_started_while_redis_is_down_serves_and_catches_up(
    stores: list[RedisStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    late = RedisServer(redis_server_binary(), port=free_port())
    store = new_store(stores, late.url, "late")
    pool = new_pool(store)
    assert store.degraded
    for _ in range(5):  # the pool works on its own meanwhile
        lease = pool.try_acquire_key(P, "k0")
        assert lease is not None
        lease.failure("503")
    assert state(pool, "k0") == "open"
    try:
        late.start()
        wait_for(lambda: not store.degraded)
        client = redis.Redis.from_url(late.url)
        try:
            wait_for(lambda: client.hget(f"late:b:{P}:k0", "open") == b"1")  # what it knew, shared
        finally:
            client.close()
        assert len(store_records(caplog, logging.WARNING, "unavailable")) == 1
        assert len(store_records(caplog, logging.INFO, "is back")) == 1
    finally:
        store.close()
        late.close()


def test_state_lost_without_a_restart_is_noticed_by_every_process(
    server: RedisServer, stores: list[RedisStore], caplog: pytest.LogCaptureFixture
) -> None:
    """A FLUSHALL (or an eviction) drops the shared state while every connection stays up. The
    first process to write starts it again; the others must notice (versions start again too, so
    they would otherwise ignore every change until the counts caught up) and merge their view."""
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    ns = f"flush{uuid.uuid4().hex[:6]}"
    a_store, b_store = new_store(stores, server.url, ns), new_store(stores, server.url, ns)
    a, b = new_pool(a_store), new_pool(b_store)
    for _ in range(3):  # some history: k0's version is 6
        a.trip(P, "k0")
        wait_for(lambda: state(b, "k0") == "open")
        a.reset(P, "k0")
        wait_for(lambda: state(b, "k0") == "closed")
    b.trip(P, "k1")
    wait_for(lambda: state(a, "k1") == "open")
    client = redis.Redis.from_url(server.url)
    try:
        client.flushall()
        lease = a.try_acquire_key(P, "k2")
        assert lease is not None
        lease.failure("503")  # a's write finds the state gone: a starts it again with what it knows
        wait_for(lambda: client.hget(f"{ns}:b:{P}:k1", "open") == b"1")
        wait_for(lambda: not b_store._lost and b_store._epoch == a_store._epoch)
        a.trip(P, "k0")  # version 1 or 2 of the new epoch: b must not take it for old news
        wait_for(lambda: state(b, "k0") == "open")
        wait_for(lambda: agree(a, b))
        assert int(client.hget(f"{ns}:b:{P}:k2", "f") or 0) == 1
    finally:
        client.close()
    assert store_records(caplog, logging.INFO, "was lost")
    assert not store_records(caplog, logging.WARNING, "unavailable")


# ---------------------------------------------------------------------- Redis hangs


def test_a_hanging_redis_never_fails_or_stalls_a_request(
    server: RedisServer, stores: list[RedisStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    ns = f"slow{uuid.uuid4().hex[:6]}"
    a_store, b_store = new_store(stores, server.url, ns), new_store(stores, server.url, ns)
    a, b = new_pool(a_store, timeout=0.2), new_pool(b_store, timeout=0.2)
    a.trip(P, "k3")
    wait_for(lambda: state(b, "k3") == "open")
    time.sleep(0.25)  # k3 is half-open: taking a trial slot asks Redis synchronously
    worst = 0.0
    server.pause()
    try:
        for i in range(300):
            pool = (a, b)[i % 2]
            started = time.perf_counter()
            if i in (0, 1):  # a trial claim Redis cannot answer in time is refused, not admitted
                assert pool.try_acquire_key(P, "k3") is None
                worst = max(worst, time.perf_counter() - started)
                continue
            lease = pool.acquire_sync(P, timeout=1)
            if lease.key_id == "k1":
                lease.failure("503")  # a change to share: it must not wait for Redis
            elif i in (50, 51):
                lease.record(classify_status(429, {"retry-after": "0.05"}))  # so is a throttle
            else:
                lease.success()
            worst = max(worst, time.perf_counter() - started)
        wait_for(lambda: a_store.degraded and b_store.degraded, timeout=3)
        # A trial claim waits no longer than claim_timeout; the store degraded because Redis
        # answered no ping either, and now the local breakers decide.
        assert worst < a_store.claim_timeout + 0.1
        assert a_store.slow_claims >= 1
        assert len(store_records(caplog, logging.WARNING, "unavailable")) == 2
        assert all("no answer in time" in r.getMessage() for r in store_records(caplog, logging.WARNING, ""))
        trial = a.try_acquire_key(P, "k3")
        assert trial is not None
        assert trial.trial
        trial.release()
    finally:
        server.resume()
    # The connections survived the pause: the store must notice by itself that Redis answers again.
    wait_for(lambda: not a_store.degraded and not b_store.degraded, timeout=5)
    assert len(store_records(caplog, logging.INFO, "is back")) == 2
    a.reset(P)
    wait_for(lambda: all(state(b, k) == "closed" for k in b.key_ids(P)))
    assert len(store_records(caplog, logging.WARNING, "unavailable")) == 2


def test_news_that_arrives_while_degraded_does_not_undo_what_the_process_knows(
    server: RedisServer, stores: list[RedisStore], caplog: pytest.LogCaptureFixture
) -> None:
    """A store can be degraded (a timeout) while its subscription still delivers other processes'
    changes. Adopting those then would close a key this process tripped meanwhile."""
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    ns = f"deg{uuid.uuid4().hex[:6]}"
    a_store = new_store(stores, server.url, ns, retry_interval=0.5)
    b_store = new_store(stores, server.url, ns)
    a, b = new_pool(a_store), new_pool(b_store)
    a_store._loop.call_soon_threadsafe(a_store._degrade, TimeoutError())  # as after a slow reply
    wait_for(lambda: a_store.degraded)
    a.trip(P, "k0")  # known to a only: the store is degraded
    lease = b.try_acquire_key(P, "k0")
    assert lease is not None
    lease.failure("503")  # b's change: published, and heard by a's live subscription
    time.sleep(0.1)
    assert state(a, "k0") == "open"
    wait_for(lambda: not a_store.degraded)  # a resynchronises: its trip reaches b
    wait_for(lambda: state(b, "k0") == "open")
    assert state(a, "k0") == "open"


def test_news_that_overtakes_a_slow_reply_is_not_lost(server: RedisServer, stores: list[RedisStore]) -> None:
    """a's failure is applied in Redis (version 1), but its reply is slow; meanwhile b trips the
    key (version 2) and a hears of it first. a must end on version 2, not on its late reply."""
    ns = f"late{uuid.uuid4().hex[:6]}"
    a_store, b_store = new_store(stores, server.url, ns), new_store(stores, server.url, ns)
    a, b = new_pool(a_store), new_pool(b_store)
    batch = a_store._batch

    async def slow_reply(changes: Any, merges: Any = None) -> Any:
        result = await batch(changes, merges)
        if any(change.op == "failure" for change in changes):
            await asyncio.sleep(0.15)  # (within op_timeout: slow, not failed)
        return result

    a_store._batch = slow_reply  # type: ignore[method-assign]
    lease = a.try_acquire_key(P, "k0")
    assert lease is not None
    lease.failure("503")
    time.sleep(0.05)  # applied in Redis, its reply still on the way
    b.trip(P, "k0")
    wait_for(lambda: not a_store._pending[(P, "k0")])
    wait_for(lambda: state(a, "k0") == "open", timeout=1)
    assert not a_store.degraded
    assert a._key(P, "k0").breaker.tripped_until() == pytest.approx(
        b._key(P, "k0").breaker.tripped_until(), abs=0.02
    )


# ---------------------------------------------------------------------- configuration


def test_the_url_comes_from_keypool_redis_url(
    server: RedisServer, stores: list[RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYPOOL_REDIS_URL", server.url)
    store = RedisStore(namespace="fromenv")
    stores.append(store)
    assert store.url == server.url
    pool = new_pool(store)
    pool.trip(P, "k0")
    client = redis.Redis.from_url(server.url)
    try:
        wait_for(lambda: client.hget(f"fromenv:b:{P}:k0", "open") == b"1")
    finally:
        client.close()
    monkeypatch.delenv("KEYPOOL_REDIS_URL")
    from keypool import ConfigError

    with pytest.raises(ConfigError, match="KEYPOOL_REDIS_URL"):
        RedisStore()


def test_no_password_reaches_a_log_line_or_a_repr(
    stores: list[RedisStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = f"pw-{uuid.uuid4().hex}"
    with RedisServer(redis_server_binary(), "--requirepass", secret) as guarded:
        good = new_store(stores, guarded.url, "auth")
        assert secret in guarded.url
        pool = new_pool(good)
        pool.trip(P, "k0")
        client = redis.Redis.from_url(guarded.url)
        try:
            wait_for(lambda: client.hget(f"auth:b:{P}:k0", "open") == b"1")  # the password worked
        finally:
            client.close()
        wrong = new_store(stores, guarded.url.replace(secret, f"{secret}-wrong"), "auth")
        query = new_store(stores, f"redis://127.0.0.1:{guarded.port}/0?password={secret}x", "auth")
        new_pool(wrong)
        new_pool(query)
        assert wrong.degraded
        assert query.degraded
    wait_for(lambda: good.degraded)  # the server is gone: a warning that names the URL
    text = caplog.text + "".join(repr(s) + str(s.url) for s in (good, wrong, query))
    assert store_records(caplog, logging.WARNING, "unavailable")
    assert f"127.0.0.1:{guarded.port}" in text
    assert secret not in text
    assert "password=***" in repr(query)


def test_closing_the_store_stops_its_thread(server: RedisServer) -> None:
    store = RedisStore(server.url, namespace=f"close{uuid.uuid4().hex[:6]}")
    pool = new_pool(store)
    thread = store._thread
    assert thread.is_alive()
    pool.trip(P, "k0")
    store.close()
    assert not thread.is_alive()
    store.close()  # twice is fine
    lease = pool.try_acquire_key(P, "k1")  # the pool goes on alone
    assert lease is not None
    lease.failure("503")
    pool.reset(P)


# ---------------------------------------------------------------------- clocks


class SteppedClock(MonotonicClock):
    """The monotonic clock plus a step the test sets (a clock that jumped)."""

    def __init__(self) -> None:
        self.step = 0.0

    def now(self) -> float:
        return super().now() + self.step


def test_a_clock_step_is_noticed_at_the_next_measurement(
    server: RedisServer, stores: list[RedisStore]
) -> None:
    """Deadlines cross processes on Redis's clock; a pool's clock that jumps would skew them all
    until the offset is measured again (every ``clock_interval``), not just at the next outage."""
    ns = f"clk{uuid.uuid4().hex[:6]}"
    clock = SteppedClock()
    a_store = new_store(stores, server.url, ns, clock_interval=0.2)
    b_store = new_store(stores, server.url, ns)
    cfg = BreakerConfig(jitter=0.0, timeout=60).model_dump()
    a = KeyPool({"providers": [{"name": P, "keys": KEYS, "breaker": cfg}]}, store=a_store, clock=clock)
    b = new_pool(b_store, timeout=60)
    clock.step = 3600.0  # a's clock jumps an hour ahead
    time.sleep(0.6)  # a few measurements later
    b.trip(P, "k0")
    wait_for(lambda: state(a, "k0") == "open")
    until = a._key(P, "k0").breaker.tripped_until()
    assert until is not None
    assert until - clock.now() == pytest.approx(60, abs=1)  # an hour off without the measurement
