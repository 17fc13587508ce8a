"""``client.health_check()``: one probe per admitted key, through the same breakers as real traffic.

DeepSeek probes ``GET /user/balance`` (an empty balance there quarantines the key with reason
``quota``); Perplexity, which has no ``/models``, sends a one-token chat; the generic client lists
models. A key whose breaker refuses calls is skipped, not contacted, and the skip is reported.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import pytest

from keypool import CallRejected, KeyPool, KeySpec, PoolEvent
from keypool.testing import FakeClock, FakeUpstream, Fault, LoopbackServer
from providers import AsyncDeepSeek, AsyncPerplexity, AsyncPooledOpenAI, DeepSeek, HealthReport, Perplexity

SECRETS = {
    "alpha": "sk-health-alpha-0c9e11f2",
    "bravo": "sk-health-bravo-77ab3d05",
    "charlie": "sk-health-charlie-5e60a4b8",
}


class Recorder:
    """ASGI middleware keeping (method, path, json body) of every request it forwards."""

    def __init__(self, app: FakeUpstream) -> None:
        self.app = app
        self.seen: list[tuple[str, str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        message = await receive()
        chunks.append(message.get("body", b""))
        while message.get("more_body"):
            message = await receive()
            chunks.append(message.get("body", b""))
        body = b"".join(chunks)
        self.seen.append((scope["method"], scope["path"], json.loads(body) if body else None))
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


@dataclass
class Setup:
    upstream: FakeUpstream
    clock: FakeClock
    pool: KeyPool
    provider: str
    events: list[PoolEvent] = field(default_factory=list)

    def counters(self, key_id: str) -> Any:
        return self.upstream.counters(SECRETS[key_id])

    def stats(self, key_id: str) -> dict[str, Any]:
        return self.pool.key_stats(key_id, self.provider)

    def skipped_events(self) -> list[CallRejected]:
        return [e for e in self.events if isinstance(e, CallRejected) and e.reason == "probe_skipped"]


def setup(flavor: Any = "deepseek", provider: str = "deepseek") -> Setup:
    clock = FakeClock()
    events: list[PoolEvent] = []
    pool = KeyPool(clock=clock, hooks=[events.append])
    pool.add_provider({"name": provider, "keys": [KeySpec(secret=s, key_id=k) for k, s in SECRETS.items()]})
    return Setup(FakeUpstream(SECRETS.values(), flavor=flavor), clock, pool, provider, events)


def deepseek(s: Setup, app: Any = None) -> AsyncDeepSeek:
    return AsyncDeepSeek(
        pool=s.pool, base_url="http://deepseek.test", transport=httpx2.ASGITransport(app=app or s.upstream)
    )


def rows(report: HealthReport) -> dict[str, tuple[str, str | None, int | None, str]]:
    return {k.key_id: (k.result, k.outcome, k.status, k.state) for k in report.keys}


@pytest.fixture(scope="module")
def loopback() -> Iterator[tuple[list[Any], LoopbackServer]]:
    holder: list[Any] = [FakeUpstream()]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await holder[0](scope, receive, send)

    with LoopbackServer(app, shutdown_timeout=0.2) as server:
        yield holder, server


@pytest.mark.anyio
async def test_deepseek_probes_each_closed_key_once_on_its_balance() -> None:
    s = setup()
    recorder = Recorder(s.upstream)
    async with deepseek(s, recorder) as client:
        report = await client.health_check()
    assert (report.provider, report.ok, report.failed, report.skipped) == ("deepseek", 3, 0, 0)
    assert rows(report) == {k: ("ok", "success", 200, "closed") for k in SECRETS}
    assert all(k.latency is not None and k.latency >= 0 for k in report.keys)
    assert recorder.seen == [("GET", "/user/balance", None)] * 3
    for key_id in SECRETS:
        assert dict(s.counters(key_id).by_endpoint) == {"/user/balance": 1}
        assert s.stats(key_id)["total_successes"] == 1
    assert s.pool.capacity("deepseek").in_flight == 0


@pytest.mark.anyio
async def test_open_keys_are_skipped_not_contacted_and_counted() -> None:
    s = setup()
    s.pool.trip("deepseek", "alpha")
    s.pool.quarantine("bravo", "deepseek")
    async with deepseek(s) as client:
        report = await client.health_check()
    assert (report.ok, report.failed, report.skipped) == (1, 0, 2)
    assert rows(report) == {
        "alpha": ("skipped", None, None, "open"),
        "bravo": ("skipped", None, None, "open"),
        "charlie": ("ok", "success", 200, "closed"),
    }
    assert s.counters("alpha").requests == 0
    assert s.counters("bravo").requests == 0
    assert s.counters("charlie").requests == 1
    assert [(e.provider, e.key_id) for e in s.skipped_events()] == [
        ("deepseek", "alpha"),
        ("deepseek", "bravo"),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fault", "outcome", "reason"),
    [
        (Fault.exhausted(), "exhausted", "quota"),
        (Fault.rejected(), "rejected", "rejected"),
        (Fault.forbidden(), "rejected", "rejected"),
        (Fault.rate_limited(30), "throttled", "throttled"),
    ],
    ids=["402-balance", "401", "403", "429"],
)
async def test_probe_outcomes_take_keys_out(fault: Fault, outcome: str, reason: str) -> None:
    s = setup()
    s.upstream.set_fault(SECRETS["alpha"], fault)
    async with deepseek(s) as client:
        report = await client.health_check()
        assert rows(report)["alpha"][:2] == ("failed", outcome)
        assert rows(report)["alpha"][3] == "open"
        stats = s.stats("alpha")
        assert (stats["state"], stats["open_reason"]) == ("open", reason)
        assert stats["quarantined"] is (reason in ("quota", "rejected"))
        # Real traffic now avoids the key the probe took out.
        for i in range(10):
            reply = await client.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": f"m{i}"}]
            )
            assert reply.choices[0].message.content == f"m{i}"
        assert dict(s.counters("alpha").by_endpoint) == {"/user/balance": 1}
        # The next round skips it.
        again = await client.health_check()
    assert rows(again)["alpha"][0] == "skipped"
    assert s.counters("alpha").requests == 1


@pytest.mark.anyio
async def test_an_empty_balance_is_reported_in_a_200_body() -> None:
    """DeepSeek answers ``/user/balance`` with 200 and ``is_available: false``: that is a 402."""
    s = setup()
    s.upstream.set_fault(SECRETS["alpha"], Fault.exhausted())
    async with deepseek(s) as client:
        report = await client.health_check()
    assert s.counters("alpha").by_status == {200: 1}
    assert rows(report)["alpha"] == ("failed", "exhausted", 402, "open")
    assert s.stats("alpha")["open_reason"] == "quota"


@pytest.mark.anyio
async def test_failing_probes_grow_the_failure_count_until_the_breaker_opens() -> None:
    s = setup()
    s.upstream.set_fault(SECRETS["alpha"], Fault.status(503))
    async with deepseek(s) as client:
        for expected in range(1, 5):
            report = await client.health_check()
            assert rows(report)["alpha"] == ("failed", "failure", 503, "closed")
            assert s.stats("alpha")["failure_count"] == expected
        report = await client.health_check()
        assert rows(report)["alpha"] == ("failed", "failure", 503, "open")
        assert (s.stats("alpha")["state"], s.stats("alpha")["open_reason"]) == ("open", "failures")
        report = await client.health_check()
    assert rows(report)["alpha"][0] == "skipped"
    assert s.counters("alpha").requests == 5
    assert report.ok == 2


@pytest.mark.anyio
async def test_a_recovered_half_open_key_is_closed_by_probes() -> None:
    s = setup()
    s.pool.trip("deepseek", "alpha")
    s.clock.advance(61.0)  # past the breaker timeout: half-open
    assert s.stats("alpha")["state"] == "half_open"
    async with deepseek(s) as client:
        report = await client.health_check()
    assert rows(report)["alpha"] == ("ok", "success", 200, "closed")
    threshold = s.stats("alpha")["config"]["success_threshold"]
    assert s.counters("alpha").requests == threshold  # one trial per success needed, no more


@pytest.mark.anyio
async def test_a_hanging_key_fails_its_probe_instead_of_hanging_the_check() -> None:
    s = setup()
    s.upstream.set_fault(SECRETS["bravo"], Fault.hang())
    started = time.monotonic()
    async with deepseek(s) as client:
        report = await client.health_check(timeout=0.2)
    assert time.monotonic() - started < 2.0
    assert rows(report)["bravo"] == ("failed", "failure", None, "closed")
    assert s.stats("bravo")["failure_count"] == 1
    assert report.ok == 2
    assert s.pool.capacity("deepseek").in_flight == 0


@pytest.mark.anyio
async def test_cancelling_a_health_check_gives_the_key_back() -> None:
    s = setup()
    s.upstream.set_default_fault(Fault.hang())
    async with deepseek(s) as client:
        with anyio.move_on_after(0.1) as scope:
            await client.health_check()
    assert scope.cancelled_caught
    assert s.pool.capacity("deepseek").in_flight == 0
    assert all(r["total_failures"] == 0 for r in s.pool.stats("deepseek"))


@pytest.mark.anyio
async def test_perplexity_probes_with_a_one_token_chat() -> None:
    s = setup("perplexity", "perplexity")
    recorder = Recorder(s.upstream)
    s.upstream.set_fault(SECRETS["charlie"], Fault.rejected())
    async with AsyncPerplexity(
        pool=s.pool, base_url="http://perplexity.test", transport=httpx2.ASGITransport(app=recorder)
    ) as client:
        report = await client.health_check()
    assert (report.ok, report.failed) == (2, 1)
    assert rows(report)["charlie"] == ("failed", "rejected", 401, "open")
    assert not any(secret in repr(report) for secret in SECRETS.values())
    probe = {"model": "sonar", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    assert recorder.seen == [("POST", "/chat/completions", probe)] * 3
    for key_id in SECRETS:
        assert dict(s.counters(key_id).by_endpoint) == {"/chat/completions": 1}


@pytest.mark.anyio
async def test_generic_client_lists_models() -> None:
    s = setup("openai", "openai")
    async with AsyncPooledOpenAI(
        pool=s.pool,
        provider="openai",
        base_url="http://openai.test/v1",
        transport=httpx2.ASGITransport(app=s.upstream),
    ) as client:
        report = await client.health_check()
    assert report.ok == 3
    assert all(dict(s.counters(k).by_endpoint) == {"/models": 1} for k in SECRETS)


def test_sync_health_check(loopback: tuple[list[Any], LoopbackServer]) -> None:
    holder, server = loopback
    s = setup()
    holder[0] = s.upstream
    s.upstream.set_fault(SECRETS["alpha"], Fault.exhausted())
    s.upstream.set_fault(SECRETS["bravo"], Fault.status(503))
    with DeepSeek(pool=s.pool, base_url=server.base_url) as client:
        report = client.health_check()
        assert rows(report) == {
            "alpha": ("failed", "exhausted", 402, "open"),
            "bravo": ("failed", "failure", 503, "closed"),
            "charlie": ("ok", "success", 200, "closed"),
        }
        assert s.stats("alpha")["open_reason"] == "quota"
        assert s.stats("bravo")["failure_count"] == 1
        again = client.health_check()
    assert rows(again)["alpha"][0] == "skipped"
    assert s.skipped_events()[0].key_id == "alpha"
    assert s.counters("alpha").requests == 1
    assert s.stats("bravo")["failure_count"] == 2
    assert all(
        dict(s.counters(k).by_endpoint) == {"/user/balance": n} for k, n in [("bravo", 2), ("charlie", 2)]
    )


def test_sync_health_check_of_a_hanging_key_and_perplexity(
    loopback: tuple[list[Any], LoopbackServer],
) -> None:
    holder, server = loopback
    s = setup("perplexity", "perplexity")
    holder[0] = s.upstream
    s.upstream.set_fault(SECRETS["alpha"], Fault.hang())
    started = time.monotonic()
    with Perplexity(pool=s.pool, base_url=server.base_url) as client:
        report = client.health_check(timeout=0.2)
    assert time.monotonic() - started < 2.0
    assert rows(report)["alpha"] == ("failed", "failure", None, "closed")
    assert report.ok == 2
    assert s.pool.capacity("perplexity").in_flight == 0


def test_health_check_timeout_must_be_positive() -> None:
    with DeepSeek(api_keys=list(SECRETS.values())) as client, pytest.raises(ValueError, match="timeout"):
        client.health_check(timeout=0)
