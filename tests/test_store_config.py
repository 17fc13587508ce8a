"""RedisStore configuration fails loudly: malformed URLs, wrong passwords, untrusted TLS
certificates and unreachable servers, each with ``strict`` on and off, against private
``redis-server`` processes; and key ids that would collide in Redis without escaping.

Strict: the constructor raises at once, naming the cause, never a credential. Not strict: one
warning naming the cause, the pool serves on local state, reconnection attempts back off.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from keypool import BreakerConfig, ConfigError, KeyPool
from keypool.store import RedisStore, StoreUnavailable
from tests.redis_server import RedisServer, closed_afterwards, free_port, redis_server_binary, running_redis

P = "p"
PASSWORD = f"pw-{uuid.uuid4().hex[:12]}"
STORE_LOG = "keypool.store"


@pytest.fixture(scope="module")
def guarded() -> Iterator[RedisServer]:
    yield from running_redis("--requirepass", PASSWORD)


@pytest.fixture(scope="module")
def tls_server() -> Iterator[RedisServer]:
    server = RedisServer(redis_server_binary(), tls=True)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def stores() -> Iterator[list[RedisStore]]:
    yield from closed_afterwards()


def pool_on(store: RedisStore, keys: list[str] | None = None) -> KeyPool:
    specs = [{"secret": f"sk-config-{k}", "key_id": k} for k in keys or ["k0", "k1"]]
    return KeyPool(
        {"providers": [{"name": P, "keys": specs, "breaker": BreakerConfig(jitter=0).model_dump()}]},
        store=store,
    )


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == STORE_LOG and r.levelno == logging.WARNING]


def connections(server: RedisServer) -> int:
    info = server.command(b"INFO", b"stats").decode()
    return int(re.search(r"total_connections_received:(\d+)", info).group(1))  # type: ignore[union-attr]


# ---------------------------------------------------------------------- malformed URLs


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"redis://:{PASSWORD}@127.0.0.1:notaport/0", "Port could not be cast"),
        (f"http://:{PASSWORD}@127.0.0.1:6379/0", "schemes"),
        (f"redis://:{PASSWORD}@127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
        (f"redis://127.0.0.1:6379/0?password={PASSWORD}&health_check_interval=x", "health_check_interval"),
    ],
)
def test_a_malformed_url_raises_at_construction_with_the_password_masked(
    url: str, says: str, strict: bool
) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        RedisStore(url, strict=strict)
    assert time.monotonic() - started < 5  # raises: no thread left hanging on it
    message = str(info.value)
    assert message.startswith("url:")
    assert says in message
    assert PASSWORD not in message
    assert PASSWORD not in repr(info.value)


def test_the_strict_switch_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    monkeypatch.setenv("KEYPOOL_REDIS_STRICT", "1")
    with pytest.raises(StoreUnavailable, match="connection refused"):
        RedisStore(url)
    monkeypatch.setenv("KEYPOOL_REDIS_STRICT", "sometimes")
    with pytest.raises(ConfigError, match="KEYPOOL_REDIS_STRICT"):
        RedisStore(url)
    monkeypatch.setenv("KEYPOOL_REDIS_STRICT", "0")
    store = RedisStore(url)
    try:
        assert store.degraded
        assert store.cause is not None
        assert "connection refused" in store.cause
    finally:
        store.close()


@pytest.mark.parametrize(
    ("name", "value"),
    [("claim_timeout", 0), ("op_timeout", -1), ("trial_lease", 0), ("max_retry_interval", 0.01)],
)
def test_settings_out_of_range_name_the_field(name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=name):
        RedisStore("redis://127.0.0.1:6379/0", **{name: value})


# ---------------------------------------------------------------------- wrong password


def test_a_wrong_password_is_an_error_at_start_up_when_strict(guarded: RedisServer) -> None:
    url = guarded.url.replace(PASSWORD, f"{PASSWORD}-wrong")
    with pytest.raises(StoreUnavailable) as info:
        RedisStore(url, strict=True)
    assert "authentication failed" in str(info.value)
    assert f"127.0.0.1:{guarded.port}" in str(info.value)
    assert PASSWORD not in str(info.value)
    with pytest.raises(StoreUnavailable, match="authentication failed"):
        RedisStore(guarded.url.replace(f":{PASSWORD}@", ""), strict=True)  # no password at all
    store = RedisStore(guarded.url, strict=True)  # the right one works
    try:
        pool_on(store).trip(P, "k0")
        assert not store.degraded
    finally:
        store.close()


def test_a_wrong_password_warns_once_and_backs_off_when_not_strict(
    guarded: RedisServer, stores: list[RedisStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    before = connections(guarded)
    store = RedisStore(
        guarded.url.replace(PASSWORD, "nope"), strict=False, retry_interval=0.05, max_retry_interval=2.0
    )
    stores.append(store)
    pool = pool_on(store)
    for _ in range(5):  # the pool serves on local state
        lease = pool.try_acquire_key(P, "k0")
        assert lease is not None
        lease.failure("503")
    assert pool.key_stats("k0", P)["state"] == "open"
    time.sleep(1.2)
    attempts = connections(guarded) - before
    # Without backoff: one attempt every 0.05 s (24 here); doubling from 0.05 s: a handful.
    assert attempts <= 10, attempts
    assert store.degraded
    messages = warnings_of(caplog)
    assert len(messages) == 1, messages
    assert "authentication failed" in messages[0]
    assert f"127.0.0.1:{guarded.port}" in messages[0]
    assert PASSWORD not in caplog.text
    assert "nope" not in caplog.text


# ---------------------------------------------------------------------- TLS


def test_an_untrusted_certificate_is_an_error_when_strict_and_one_warning_otherwise(
    tls_server: RedisServer, stores: list[RedisStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    with pytest.raises(StoreUnavailable) as info:
        RedisStore(tls_server.url, strict=True)
    assert "TLS certificate not trusted" in str(info.value)
    assert "ssl_ca_certs" in str(info.value)  # what to do about it

    lax = RedisStore(tls_server.url, strict=False, namespace="tls-lax")
    stores.append(lax)
    pool_on(lax)
    assert lax.degraded
    messages = warnings_of(caplog)
    assert len(messages) == 1, messages
    assert "TLS certificate not trusted" in messages[0]

    trusted: dict[str, Any] = {"ssl_ca_certs": str(tls_server.certificate)}
    good = RedisStore(tls_server.url, strict=True, namespace="tls-good", client_options=trusted)
    stores.append(good)
    pool = pool_on(good)
    pool.trip(P, "k1")
    client = redis.Redis.from_url(tls_server.url, ssl_ca_certs=str(tls_server.certificate))
    try:
        deadline = time.monotonic() + 5
        while client.hget(f"tls-good:b:{P}:k1", "open") != b"1":
            assert time.monotonic() < deadline, "the trip never reached Redis over TLS"
            time.sleep(0.01)
    finally:
        client.close()
    assert not good.degraded


# ---------------------------------------------------------------------- key names


def test_key_ids_that_would_collide_in_redis_are_kept_apart(
    guarded: RedisServer, stores: list[RedisStore]
) -> None:
    """``k`` and ``k:trials``: unescaped, the second's state hash is the first's trial set."""
    namespace = f"esc{uuid.uuid4().hex[:6]}"
    a_store = RedisStore(guarded.url, namespace=namespace)
    b_store = RedisStore(guarded.url, namespace=namespace)
    stores += [a_store, b_store]
    ids = ["k", "k:trials", "k:trials:trials"]
    a, b = pool_on(a_store, ids), pool_on(b_store, ids)
    a.trip(P, "k:trials")
    deadline = time.monotonic() + 5
    while b.key_stats("k:trials", P)["state"] != "open":
        assert time.monotonic() < deadline
        time.sleep(0.005)
    for pool in (a, b):
        assert pool.key_stats("k", P)["state"] == "closed"
        assert pool.key_stats("k:trials:trials", P)["state"] == "closed"
    b.trip(P, "k")
    while a.key_stats("k", P)["state"] != "open":
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert a.key_stats("k:trials:trials", P)["state"] == "closed"
    assert not a_store.degraded
    assert not b_store.degraded
    client = redis.Redis.from_url(guarded.url)
    try:
        names = {n.decode() for n in client.keys(f"{namespace}:b:*")}
    finally:
        client.close()
    assert f"{namespace}:b:{P}:k" in names
    assert f"{namespace}:b:{P}:k%3Atrials" in names
