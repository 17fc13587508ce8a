"""No secret ever appears in a log line, stats payload, capacity, repr, exception message or event."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import httpx2
import openai
import pytest
from pydantic import SecretStr

from keypool import (
    BreakerConfig,
    ConfigError,
    KeyPool,
    KeyPoolTransport,
    KeySpec,
    NoKeyAvailable,
    Outcome,
    OutcomeKind,
    PoolConfig,
    PoolEvent,
    ProviderConfig,
    StreamInterrupted,
)
from keypool.testing import FakeClock

SECRETS = [
    "sk-SECRET-abc123def456-alpha-0001",
    "sk-SECRET-abc123def456-bravo-0002",
    "sk-SECRET-abc123def456-charlie-0003",
    "sk-SECRET-abc123def456-delta-0004",
    "sk-SECRET-abc123def456-echo-0005",
]
MARKERS = ["SECRET", "abc123def456", *SECRETS]
BASE = "http://upstream.test/v1"
P = "deepseek"


def assert_clean(text: str, where: str) -> None:
    for marker in MARKERS:
        assert marker not in text, f"{marker!r} leaked in {where}"


class Broken(httpx2.AsyncByteStream):
    def __init__(self, before: bytes) -> None:
        self.before = before

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.before:
            yield self.before
        raise httpx2.ReadError("reset")


def behaviour_for(secret: str, n: int) -> httpx2.Response:
    """Each key cycles through every outcome the table knows."""
    index = SECRETS.index(secret)
    kind = (index + n) % 8
    if kind == 0:
        return httpx2.Response(200, json={"object": "list", "data": []})
    if kind == 1:
        return httpx2.Response(429, headers={"retry-after": "3"}, json={"error": {"message": "slow down"}})
    if kind == 2:
        return httpx2.Response(401, json={"error": {"message": "invalid api key"}})
    if kind == 3:
        return httpx2.Response(402, json={"error": {"message": "insufficient balance"}})
    if kind == 4:
        return httpx2.Response(503, json={"error": {"message": "overloaded"}})
    if kind == 5:
        return httpx2.Response(400, json={"error": {"message": "bad request"}})
    if kind == 6:
        return httpx2.Response(200, stream=Broken(b'{"object": "list", '))
    raise httpx2.ConnectError("refused")


@pytest.mark.anyio
async def test_no_secret_anywhere(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    clock = FakeClock()
    events: list[PoolEvent] = []

    def broken_hook(event: PoolEvent) -> None:
        raise RuntimeError(f"hook failed on {event!r}")

    specs = [KeySpec(secret=SecretStr(s), key_id=f"key-{i}") for i, s in enumerate(SECRETS[:4])]
    specs.append(KeySpec(secret=SecretStr(SECRETS[4]), tier="backup"))  # id from the fingerprint
    config = PoolConfig(providers=(ProviderConfig(name=P, keys=tuple(specs), breaker=BreakerConfig()),))
    pool = KeyPool(config, clock=clock, hooks=(events.append, broken_hook), seed=3)

    texts: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    counter = {"n": 0}

    def handler(request: httpx2.Request) -> httpx2.Response:
        secret = request.headers["authorization"].removeprefix("Bearer ")
        counter["n"] += 1
        return behaviour_for(secret, counter["n"])

    transport = KeyPoolTransport(pool, P, transport=httpx2.MockTransport(handler))
    async with httpx2.AsyncClient(transport=transport) as http:
        client = openai.AsyncOpenAI(api_key="sk-placeholder", base_url=BASE, max_retries=0, http_client=http)
        for _ in range(40):
            try:
                await client.models.list()
            except Exception as exc:
                errors.append(exc)
            clock.advance(2)
            if counter["n"] % 7 == 0:
                pool.reset()
        texts.append(("transport", repr(transport)))

    # direct pool use: leases, context managers and every outcome
    pool.reset()
    for kind in OutcomeKind:
        lease = pool.try_acquire(P)
        texts.append(("lease", repr(lease)))
        texts.append(("lease.secret", repr(lease.secret)))
        texts.append(("lease.secret", str(lease.secret)))
        lease.record(Outcome(kind, 500))
    pool.reset()
    with pytest.raises(ValueError, match="boom"), pool.try_acquire(P):
        raise ValueError("boom")
    for key_id in pool.key_ids(P):
        pool.quarantine(key_id)
    for call in (
        lambda: pool.try_acquire(P),
        lambda: pool.acquire_sync(P, timeout=5),
        lambda: pool.key_stats("missing"),
        lambda: pool.capacity("missing"),
        lambda: pool.update_config({"timeout": -1}),
        lambda: pool.update_config({"api_key": SECRETS[0]}),
        lambda: pool.add_key(P, SECRETS[4]),
        lambda: KeySpec(secret=SECRETS[0], api_key=SECRETS[1]),
        lambda: KeySpec(secret=SECRETS[0], weight=0),
        lambda: ProviderConfig(name=P, keys=SECRETS),
        lambda: ProviderConfig(name=P, keys=[{"secret": SECRETS[0]}, {"secret": SECRETS[0]}]),
        lambda: KeyPool({"providers": [{"name": P, "keys": [SECRETS[0]]}]}),
        lambda: KeyPool.from_keys(P, [SECRETS[0], SECRETS[0]]),
    ):
        try:
            call()
        except Exception as exc:
            errors.append(exc)
        else:  # pragma: no cover
            raise AssertionError("expected an error")
    errors.append(StreamInterrupted(P, "key-0", "ReadError"))
    errors.append(NoKeyAvailable(P, 1.5))

    assert any(isinstance(e, ConfigError) for e in errors)
    assert any(isinstance(e, StreamInterrupted) for e in errors)
    assert any(isinstance(e, openai.APIStatusError) for e in errors)
    for exc in errors:
        for link in _chain(exc):
            texts.append((f"exception {type(link).__name__}", f"{link!s} {link!r} {link.args!r}"))

    texts.append(("stats", json.dumps(pool.stats())))
    for key_id in pool.key_ids():
        texts.append(("key_stats", json.dumps(pool.key_stats(key_id))))
        texts.append(("breaker_config", repr(pool.breaker_config(key_id))))
    texts.append(("capacity", repr(pool.capacity(P))))
    texts.append(("capacity", json.dumps(pool.capacity(P).as_dict())))
    texts.append(("time_in_states", repr(list(pool.time_in_states()))))
    texts.append(("pool", repr(pool)))
    texts.append(("key_ids", repr(pool.key_ids())))
    for breaker in (k.breaker for p in pool._providers.values() for k in p.keys.values()):
        texts.append(("breaker", repr(breaker)))
        texts.append(("snapshot", repr(breaker.snapshot())))
    texts.append(("config", repr(config)))
    texts.append(("config", str(config)))
    texts.append(("config dump", repr(config.model_dump())))
    texts.append(("config json", config.model_dump_json()))
    for spec in specs:
        texts.append(("keyspec", f"{spec!r} {spec!s} {spec.id}"))
    texts.append(("events", repr(events)))
    texts.append(("log", caplog.text))
    texts.append(("log messages", "\n".join(r.getMessage() for r in caplog.records)))

    assert len(events) > 50
    assert any("hook" in r.getMessage() for r in caplog.records)
    for where, text in texts:
        assert_clean(text, where)
    # the key without a label is named by its fingerprint, which is not the secret
    assert any(k.startswith("key-") and len(k) == 14 for k in pool.key_ids())


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


@pytest.mark.anyio
async def test_stream_interrupted_names_the_key_id_only() -> None:
    clock = FakeClock()
    pool = KeyPool.from_keys(P, [KeySpec(secret=SECRETS[0], key_id="only")], clock=clock)

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, stream=Broken(b"partial"))

    async with httpx2.AsyncClient(
        transport=KeyPoolTransport(pool, P, transport=httpx2.MockTransport(handler))
    ) as http:
        with pytest.raises(StreamInterrupted) as info:
            await http.get(f"{BASE}/models")
    assert info.value.key_id == "only"
    assert_clean(str(info.value), "StreamInterrupted")
    assert_clean(repr(info.value.__cause__), "its cause")


def test_breaker_config_and_keyspec_reprs_mask_the_secret() -> None:
    spec = KeySpec(secret=SECRETS[0])
    assert "**" in repr(spec)
    assert_clean(repr(spec), "KeySpec repr")
    assert_clean(spec.model_dump_json(), "KeySpec json")
    assert spec.secret.get_secret_value() == SECRETS[0]


def test_log_records_from_a_failing_hook_are_clean(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    def hook(event: PoolEvent) -> None:
        raise RuntimeError("instrumentation bug")

    clock = FakeClock()
    pool = KeyPool.from_keys(P, SECRETS[:2], hooks=(hook,), clock=clock)
    pool.trip(P)
    clock.advance(60)
    pool.poll()
    assert len(caplog.records) >= 4  # two trips, two half-opens
    assert_clean(caplog.text, "log")
