"""Operators' changes reach every worker sharing a store, and workers that start later.

Two workers (pools, each with its own store: ``MemoryStore`` shares one in memory, ``RedisStore``
gives each its own connections on a private ``redis-server``, as two processes have). An operator
talks to worker ``a``'s admin API only: ``PATCH`` config (global and per key), backup rotation,
reset and quarantine, and keys are added and removed on ``a``; worker ``b`` must apply all of it,
and a worker ``c`` started afterwards must start with it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import pytest
from prometheus_client import CollectorRegistry

from keypool import KeyPool
from keypool.admin import create_app
from keypool.store import MemoryStore, SharedStore
from keypool.testing import FakeClock
from tests.redis_server import RedisServer, TcpProxy, running_redis

P = "p"
TOKEN = "admin-token-for-the-store-tests"
NEW_SECRET = f"sk-added-{uuid.uuid4().hex}"
CONFIG = {
    "providers": [
        {
            "name": P,
            "keys": [
                {"secret": "sk-admin-0", "key_id": "k0"},
                {"secret": "sk-admin-1", "key_id": "k1"},
                {"secret": "sk-admin-b", "key_id": "b0", "tier": "backup"},
            ],
        }
    ]
}


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from running_redis()


@dataclass
class Workers:
    new_store: Callable[[], SharedStore]
    clock: FakeClock | None = None
    stores: list[SharedStore] = field(default_factory=list)

    def worker(self) -> KeyPool:
        store = self.new_store()
        self.stores.append(store)
        return KeyPool(CONFIG, store=store, clock=self.clock)

    def eventually(self, check: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.clock is not None or time.monotonic() > deadline:
                raise AssertionError("the change never reached the other worker")
            time.sleep(0.002)


@pytest.fixture(params=["memory", "redis"])
def workers(request: pytest.FixtureRequest) -> Iterator[Workers]:
    if request.param == "memory":
        clock = FakeClock()
        memory = MemoryStore(clock)
        made = Workers(lambda: memory, clock=clock)
    else:
        from keypool.store import RedisStore

        server: RedisServer = request.getfixturevalue("redis_server")
        namespace = f"adm{uuid.uuid4().hex[:8]}"
        made = Workers(lambda: RedisStore(server.url, namespace=namespace))
    try:
        yield made
    finally:
        for store in {id(s): s for s in made.stores}.values():
            store.close()


@pytest.fixture
async def admin_of() -> AsyncIterator[Callable[[KeyPool], httpx2.AsyncClient]]:
    clients: list[httpx2.AsyncClient] = []

    def make(pool: KeyPool) -> httpx2.AsyncClient:
        app = create_app(pool, token=TOKEN, registry=CollectorRegistry())
        client = httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=app),
            base_url="http://admin",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def config_of(pool: KeyPool, key_id: str) -> dict[str, Any]:
    return pool.breaker_config(key_id, P).model_dump()


@pytest.mark.anyio
async def test_admin_api_changes_on_one_worker_apply_in_every_worker(
    workers: Workers, admin_of: Callable[[KeyPool], httpx2.AsyncClient]
) -> None:
    a, b = workers.worker(), workers.worker()
    admin = admin_of(a)
    response = await admin.patch(
        "/api/v1/circuit-breaker/config", json={"failure_threshold": 9, "timeout": 30}
    )
    assert response.status_code == 200, response.text
    workers.eventually(lambda: config_of(b, "k0")["failure_threshold"] == 9)
    assert all(config_of(b, k)["timeout"] == 30 for k in ("k0", "k1", "b0"))

    response = await admin.patch("/api/v1/circuit-breaker/k1/config", json={"half_open_max_calls": 1})
    assert response.status_code == 200, response.text
    workers.eventually(lambda: config_of(b, "k1")["half_open_max_calls"] == 1)
    assert config_of(b, "k0")["half_open_max_calls"] == 3  # only that key
    assert config_of(b, "k1")["failure_threshold"] == 9  # the earlier global change kept

    response = await admin.post("/api/v1/keys/rotate", json={"provider": P, "activate_backup": True})
    assert response.status_code == 200, response.text
    workers.eventually(lambda: b.capacity(P).backup_active)
    assert b.capacity(P).backup_forced is True
    response = await admin.post("/api/v1/keys/rotate", json={"provider": P, "activate_backup": None})
    assert response.status_code == 200, response.text
    workers.eventually(lambda: b.capacity(P).backup_forced is None)

    a.quarantine("k0", P)
    workers.eventually(lambda: bool(b.key_stats("k0", P)["quarantined"]))
    response = await admin.post("/api/v1/circuit-breaker/k0/reset")
    assert response.status_code == 200, response.text
    workers.eventually(lambda: not b.key_stats("k0", P)["quarantined"])

    added = a.add_key(P, NEW_SECRET)
    workers.eventually(lambda: added in b.key_ids(P))
    lease = b.try_acquire_key(P, added)
    assert lease is not None
    assert lease.secret.get_secret_value() == NEW_SECRET  # b can call with it
    lease.success()
    a.remove_key(P, "k1")
    workers.eventually(lambda: "k1" not in b.key_ids(P))
    assert sorted(a.key_ids(P)) == sorted(b.key_ids(P))


def test_a_worker_that_starts_later_adopts_the_current_configuration(workers: Workers) -> None:
    a = workers.worker()
    a.update_config({"failure_threshold": 7})
    a.update_config({"timeout": 12}, provider=P, key_id="k0")
    a.activate_backup(P, True)
    added = a.add_key(P, NEW_SECRET)
    a.remove_key(P, "k1")
    a.trip(P, "k0")
    c = workers.worker()  # a restarted worker, from the same configuration file
    workers.eventually(lambda: sorted(c.key_ids(P)) == sorted(a.key_ids(P)))
    assert added in c.key_ids(P)
    assert "k1" not in c.key_ids(P)
    assert config_of(c, "k0")["timeout"] == 12
    assert config_of(c, "b0")["failure_threshold"] == 7
    assert c.capacity(P).backup_forced is True
    workers.eventually(lambda: c.key_stats("k0", P)["state"] == "open")  # breaker state too
    a.trip(P, added)  # the added key's breaker is shared like the others
    workers.eventually(lambda: c.key_stats(added, P)["state"] == "open")


def test_a_change_that_does_not_fit_a_worker_is_skipped_there_and_applied_elsewhere(
    workers: Workers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="keypool.store")
    a, b = workers.worker(), workers.worker()
    b.remove_key(P, "k1")  # (now removed everywhere)
    workers.eventually(lambda: "k1" not in a.key_ids(P))
    extra = a.add_key(P, NEW_SECRET)
    a.update_config({"timeout": 45}, provider=P, key_id=extra)
    workers.eventually(lambda: extra in b.key_ids(P) and config_of(b, extra)["timeout"] == 45)
    a.update_config({"failure_threshold": 3})
    workers.eventually(lambda: config_of(b, "k0")["failure_threshold"] == 3)
    assert NEW_SECRET not in caplog.text


def test_changes_made_while_cut_off_from_redis_reach_the_others_when_it_returns(
    redis_server: RedisServer,
) -> None:
    from keypool.store import RedisStore

    namespace = f"cut{uuid.uuid4().hex[:6]}"
    with TcpProxy(redis_server.port) as proxy:
        a_store = RedisStore(proxy.url(redis_server.url), namespace=namespace)
        b_store = RedisStore(redis_server.url, namespace=namespace)
        try:
            a, b = KeyPool(CONFIG, store=a_store), KeyPool(CONFIG, store=b_store)
            proxy.cut()
            deadline = time.monotonic() + 5
            while not a_store.degraded:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            a.update_config({"success_threshold": 4})
            a.activate_backup(P, False)
            time.sleep(0.2)
            assert config_of(b, "k0")["success_threshold"] == 2  # not yet: a is cut off
            proxy.restore()
            while config_of(b, "k0")["success_threshold"] != 4 or b.capacity(P).backup_forced is not False:
                assert time.monotonic() < deadline + 10, "the change made while cut off never arrived"
                time.sleep(0.005)
        finally:
            a_store.close()
            b_store.close()
