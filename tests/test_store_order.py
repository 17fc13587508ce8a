"""Convergence with an order: after a partition or a Redis restart, the newest change per key wins.

Two pools, each with its own ``RedisStore`` (its own connections and listener, as two processes
have), share a private ``redis-server``; pool ``a`` reaches it through a ``TcpProxy`` that can cut
it off (a real partition: its connections drop and new ones are refused). Store settings are the
defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from keypool import BreakerConfig, KeyPool, KeyStateChanged, classify_status
from keypool.store import RedisStore
from tests.redis_server import RedisServer, TcpProxy, closed_afterwards, running_redis

P = "p"
KEYS = [{"secret": f"sk-order-{i}", "key_id": f"k{i}"} for i in range(3)]


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    yield from running_redis()


@pytest.fixture
def proxy(server: RedisServer) -> Iterator[TcpProxy]:
    with TcpProxy(server.port) as running:
        yield running


@pytest.fixture
def stores() -> Iterator[list[RedisStore]]:
    yield from closed_afterwards()


def pool_on(stores: list[RedisStore], url: str, namespace: str) -> tuple[KeyPool, RedisStore]:
    store = RedisStore(url, namespace=namespace)
    stores.append(store)
    config = BreakerConfig(jitter=0).model_dump()
    return KeyPool({"providers": [{"name": P, "keys": KEYS, "breaker": config}]}, store=store), store


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


def state(pool: KeyPool, key_id: str) -> str:
    return str(pool.key_stats(key_id, P)["state"])


def quarantined(pool: KeyPool, key_id: str) -> bool:
    return bool(pool.key_stats(key_id, P)["quarantined"])


def stored(server: RedisServer, namespace: str, key_id: str) -> dict[str, str]:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        return client.hgetall(f"{namespace}:b:{P}:{key_id}")  # type: ignore[return-value]
    finally:
        client.close()


def test_a_reset_made_while_a_process_was_cut_off_stands_when_it_returns(
    server: RedisServer, proxy: TcpProxy, stores: list[RedisStore]
) -> None:
    ns = f"r{uuid.uuid4().hex[:6]}"
    a, a_store = pool_on(stores, proxy.url(server.url), ns)
    b, b_store = pool_on(stores, server.url, ns)
    lease = a.try_acquire_key(P, "k0")
    assert lease is not None
    lease.record(classify_status(401))  # k0 quarantined everywhere
    wait_for(lambda: quarantined(b, "k0"))
    proxy.cut()
    wait_for(lambda: a_store.degraded)
    b.reset(P, "k0")  # the operator's reset reaches b and Redis, not a
    wait_for(lambda: stored(server, ns, "k0").get("q") == "")
    assert quarantined(a, "k0")
    proxy.restore()
    wait_for(lambda: not a_store.degraded)
    wait_for(lambda: state(a, "k0") == "closed")
    assert not quarantined(a, "k0")
    assert not quarantined(b, "k0")  # not re-quarantined by a's older view
    assert stored(server, ns, "k0")["q"] == ""
    assert not b_store.degraded


def test_a_trip_made_while_cut_off_after_a_reset_wins(
    server: RedisServer, proxy: TcpProxy, stores: list[RedisStore]
) -> None:
    ns = f"t{uuid.uuid4().hex[:6]}"
    a, a_store = pool_on(stores, proxy.url(server.url), ns)
    b, _ = pool_on(stores, server.url, ns)
    b.trip(P, "k1")
    wait_for(lambda: state(a, "k1") == "open")
    b.reset(P, "k1")  # the reset comes first ...
    wait_for(lambda: state(a, "k1") == "closed")
    b.trip(P, "k2")  # (k2: tripped before the cut, unchanged by a: b's state stands)
    wait_for(lambda: state(a, "k2") == "open")
    proxy.cut()
    wait_for(lambda: a_store.degraded)
    a.trip(P, "k1")  # ... the trip, seen only by a, is newer
    b.reset(P, "k2")  # and b's reset of k2 is newer than what a holds
    proxy.restore()
    wait_for(lambda: not a_store.degraded)
    wait_for(lambda: state(b, "k1") == "open")
    wait_for(lambda: state(a, "k2") == "closed")
    assert state(a, "k1") == "open"
    assert state(b, "k2") == "closed"
    assert stored(server, ns, "k1")["open"] == "1"
    assert stored(server, ns, "k2")["open"] == "0"


def test_a_redis_restarted_from_an_older_snapshot_does_not_bring_back_a_cleared_quarantine(
    stores: list[RedisStore],
) -> None:
    from tests.redis_server import redis_server_binary

    with RedisServer(redis_server_binary()) as own:
        ns = "snap"
        a, a_store = pool_on(stores, own.url, ns)
        b, b_store = pool_on(stores, own.url, ns)
        lease = a.try_acquire_key(P, "k0")
        assert lease is not None
        lease.record(classify_status(402))  # k0 quarantined (quota) ...
        b.trip(P, "k1")  # ... and k1 open
        wait_for(lambda: quarantined(b, "k0") and state(a, "k1") == "open")
        own.snapshot()  # what the restart will bring back
        b.reset(P, "k0")  # cleared after the snapshot
        wait_for(lambda: not quarantined(a, "k0"))
        own.restart()  # loads the snapshot: k0 quarantined again in Redis
        assert stored(own, ns, "k0")["q"] == "quota"
        wait_for(lambda: stored(own, ns, "k0").get("q") == "")  # the processes' newer reset wins
        for pool in (a, b):
            assert not quarantined(pool, "k0")
            assert state(pool, "k0") == "closed"
            assert state(pool, "k1") == "open"  # unchanged since the snapshot: still open
        assert stored(own, ns, "k1")["open"] == "1"
        wait_for(lambda: not a_store.degraded and not b_store.degraded)
        a.trip(P, "k2")  # and sharing goes on
        wait_for(lambda: state(b, "k2") == "open")


def test_a_merge_answer_read_before_a_trip_landed_does_not_undo_it(
    server: RedisServer, stores: list[RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool that binds (starts, or adds a provider) merges its keys into Redis; another process's
    trip may land right after that merge read a key, and reach this process (its message) before
    the merge's answer does. The older answer must not undo the trip here: nothing would redo it."""
    ns = f"f{uuid.uuid4().hex[:6]}"
    a, _ = pool_on(stores, server.url, ns)
    c, c_store = pool_on(stores, server.url, ns)
    a.trip(P, "k2")
    wait_for(lambda: state(c, "k2") == "open")  # c hears the others
    opened = asyncio.Event()  # set on c's store loop, where c adopts what it hears
    c.add_hook(lambda e: opened.set() if isinstance(e, KeyStateChanged) and e.key_id == "k0" else None)
    merge = c_store._batch

    async def merge_then_hear_the_trip(changes: Any, merges: Any = None) -> Any:
        answers = await merge(changes, merges)  # k0 read closed, before the trip
        if merges is not None and not opened.is_set():
            a.trip(P, "k0")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(opened.wait(), 1.5)  # c hears of the trip first
        return answers

    monkeypatch.setattr(c_store, "_batch", merge_then_hear_the_trip)
    c.add_provider({"name": "q", "keys": [{"secret": "sk-order-q", "key_id": "q0"}]})  # binds again
    assert state(a, "k0") == "open"
    assert state(c, "k0") == "open"
