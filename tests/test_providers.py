"""The provider clients (``AsyncDeepSeek``/``DeepSeek``, ``AsyncPerplexity``/``Perplexity``, the
generic pooled clients) driven through the real ``openai`` SDK against the real ``FakeUpstream``.

Every outcome row of the design table is shown three ways: the async client in-process
(``httpx2.ASGITransport``), the async client over a loopback socket, and the sync client over a
loopback socket. Breaker time runs on a ``FakeClock`` owned by the test's ``KeyPool``; upstream
attempts are counted exactly with ``FakeUpstream.counters``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import httpx2
import openai
import pytest

import keypool
from keypool import (
    BreakerState,
    CallRecorded,
    ConfigError,
    KeyPool,
    KeySpec,
    KeyStateChanged,
    NoKeyAvailable,
    OutcomeKind,
    PoolEvent,
)
from keypool.testing import FakeClock, FakeUpstream, Fault, KeyCounters, LoopbackServer
from providers import (
    AsyncDeepSeek,
    AsyncPerplexity,
    AsyncPooledOpenAI,
    DeepSeek,
    NoKeyAvailableError,
    Perplexity,
    PooledOpenAI,
)
from tests.upstreams import Swap, messages

SECRETS = {
    "alpha": "sk-live-alpha-5f1c2e9d77",
    "bravo": "sk-live-bravo-a83b07c4e1",
    "charlie": "sk-live-charlie-2d9e41b6f0",
}
THRESHOLD = 5  # the runbook's failure_threshold, the pool's default
PLACEHOLDER = "keypool-managed"
RIG_KINDS = ("async-asgi", "async-loopback", "sync-loopback")
NET_KINDS = ("async-loopback", "sync-loopback")


def sync_chat(client: openai.OpenAI, text: str, stream: bool, model: str) -> str:
    if not stream:
        reply = client.chat.completions.create(model=model, messages=messages(text))
        return reply.choices[0].message.content or ""
    with client.chat.completions.create(model=model, messages=messages(text), stream=True) as chunks:
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def async_chat(client: openai.AsyncOpenAI, text: str, stream: bool, model: str) -> str:
    if not stream:
        reply = await client.chat.completions.create(model=model, messages=messages(text))
        return reply.choices[0].message.content or ""
    parts: list[str] = []
    async with await client.chat.completions.create(
        model=model, messages=messages(text), stream=True
    ) as chunks:
        async for chunk in chunks:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
    return "".join(parts)


@dataclass
class Rig:
    """One client over one upstream, with the pool, its fake clock and every pool event."""

    kind: str
    upstream: FakeUpstream
    clock: FakeClock
    pool: KeyPool
    client: Any
    events: list[PoolEvent] = field(default_factory=list)
    sent: int = 0

    @property
    def sync(self) -> bool:
        return self.kind.startswith("sync")

    async def chat(
        self,
        text: str | None = None,
        *,
        stream: bool = False,
        model: str = "deepseek-chat",
        client: Any = None,
    ) -> str:
        self.sent += 1
        text = text if text is not None else f"request number {self.sent}"
        client = client if client is not None else self.client
        if isinstance(client, openai.OpenAI):
            return await anyio.to_thread.run_sync(partial(sync_chat, client, text, stream, model))
        return await async_chat(client, text, stream, model)

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(client)`` for either client kind (awaiting it for the async one)."""
        if self.sync:
            return await anyio.to_thread.run_sync(fn, self.client)
        result = fn(self.client)
        return await result if isinstance(result, Awaitable) else result

    def counters(self, key_id: str) -> KeyCounters:
        return self.upstream.counters(SECRETS[key_id])

    def stats(self, key_id: str) -> dict[str, Any]:
        return self.pool.key_stats(key_id, "deepseek")

    async def drive_until(
        self, key_id: str, done: Callable[[KeyCounters], bool], *, stream: bool = False, client: Any = None
    ) -> int:
        """Send good requests (each must succeed) until ``key_id``'s counters satisfy ``done``."""
        for n in range(1, 301):
            text = f"drive {n}"
            assert await self.chat(text, stream=stream, client=client) == text
            if done(self.counters(key_id)):
                return n
        raise AssertionError(f"{key_id} never reached the condition: {self.counters(key_id)}")

    async def many(self, n: int, *, stream: bool = False) -> None:
        for i in range(n):
            text = f"more {i}"
            assert await self.chat(text, stream=stream) == text

    def state_changes(self, key_id: str) -> list[KeyStateChanged]:
        return [e for e in self.events if isinstance(e, KeyStateChanged) and e.key_id == key_id]


def make_pool(clock: FakeClock, events: list[PoolEvent], provider: str = "deepseek") -> KeyPool:
    pool = KeyPool(clock=clock, hooks=[events.append], seed=7)
    pool.add_provider({"name": provider, "keys": [KeySpec(secret=s, key_id=k) for k, s in SECRETS.items()]})
    return pool


@pytest.fixture
async def make_rig(loopback: tuple[Swap, LoopbackServer]) -> AsyncIterator[Callable[..., Rig]]:
    made: list[Rig] = []
    swap, server = loopback

    def build(kind: str, flavor: Any = "deepseek", **options: Any) -> Rig:
        upstream = FakeUpstream(SECRETS.values(), flavor=flavor)
        clock = FakeClock()
        events: list[PoolEvent] = []
        pool = make_pool(clock, events)
        client: Any
        if kind == "async-asgi":
            client = AsyncDeepSeek(
                pool=pool,
                base_url="http://deepseek.test",
                transport=httpx2.ASGITransport(app=upstream),
                **options,
            )
        elif kind == "async-loopback":
            swap.app = upstream
            client = AsyncDeepSeek(pool=pool, base_url=server.base_url, **options)
        else:
            swap.app = upstream
            client = DeepSeek(pool=pool, base_url=server.base_url, **options)
        rig = Rig(kind, upstream, clock, pool, client, events)
        made.append(rig)
        return rig

    yield build
    for rig in made:
        if rig.sync:
            rig.client.close()
        else:
            await rig.client.close()


@pytest.fixture(params=RIG_KINDS)
def rig(request: pytest.FixtureRequest, make_rig: Callable[..., Rig]) -> Rig:
    return make_rig(request.param)


@pytest.fixture(params=NET_KINDS)
def net_rig(request: pytest.FixtureRequest, make_rig: Callable[..., Rig]) -> Rig:
    return make_rig(request.param)


STREAM = pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])


# -- the outcome table ------------------------------------------------------------------------


@pytest.mark.anyio
@STREAM
@pytest.mark.parametrize("status", [503, 500, 502, 504, 408])
async def test_failing_key_is_skipped_and_trips_after_exactly_threshold_attempts(
    rig: Rig, status: int, stream: bool
) -> None:
    rig.upstream.set_fault(SECRETS["alpha"], Fault.status(status))
    sent = await rig.drive_until("alpha", lambda c: c.requests == THRESHOLD, stream=stream)
    stats = rig.stats("alpha")
    assert (stats["state"], stats["open_reason"], stats["trips"]) == ("open", "failures", 1)

    await rig.many(20, stream=stream)  # every request still succeeds; the open key is not contacted

    dead = rig.counters("alpha")
    assert dead.requests == THRESHOLD
    assert dict(dead.by_status) == {status: THRESHOLD}
    # Each failure cost exactly one extra attempt, on another key.
    assert rig.upstream.total_requests() == sent + 20 + THRESHOLD
    for other in ("bravo", "charlie"):
        assert rig.stats(other)["state"] == "closed"
        assert rig.stats(other)["total_failures"] == 0
    changes = rig.state_changes("alpha")
    assert [(e.old, e.new, e.reason) for e in changes] == [
        (BreakerState.CLOSED, BreakerState.OPEN, "failures")
    ]


@pytest.mark.anyio
@STREAM
async def test_throttled_key_stays_out_until_its_retry_after(rig: Rig, stream: bool) -> None:
    rig.upstream.set_fault(SECRETS["alpha"], Fault.rate_limited(30))
    await rig.drive_until("alpha", lambda c: c.requests == 1, stream=stream)
    stats = rig.stats("alpha")
    assert (stats["state"], stats["open_reason"]) == ("open", "throttled")
    assert stats["retry_in"] == pytest.approx(30.0)
    assert stats["total_failures"] == 0  # a throttle is no failure

    await rig.many(15, stream=stream)
    rig.clock.advance(29.0)
    await rig.many(15, stream=stream)
    assert rig.counters("alpha").requests == 1  # still out one second before the instant

    rig.clock.advance(1.5)
    rig.upstream.clear_fault(SECRETS["alpha"])
    await rig.drive_until("alpha", lambda c: c.status(200) >= 1, stream=stream)
    assert dict(rig.counters("alpha").by_status) == {429: 1, 200: 1}
    assert rig.stats("alpha")["state"] == "closed"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "header", ["retry-after", "retry-after-ms", "retry-after-date", "x-ratelimit-reset-requests"]
)
async def test_every_retry_after_header_keeps_the_key_out(make_rig: Callable[..., Rig], header: Any) -> None:
    rig = make_rig("async-asgi")
    rig.upstream.set_fault(SECRETS["alpha"], Fault.rate_limited(30, header=header))
    await rig.drive_until("alpha", lambda c: c.requests == 1)
    assert rig.stats("alpha")["retry_in"] == pytest.approx(30.0, abs=1.5)  # an HTTP date has 1 s steps
    rig.clock.advance(28.0)
    await rig.many(20)
    assert rig.counters("alpha").requests == 1
    rig.clock.advance(4.0)
    rig.upstream.clear_fault(SECRETS["alpha"])
    await rig.drive_until("alpha", lambda c: c.status(200) >= 1)


@pytest.mark.anyio
@STREAM
@pytest.mark.parametrize(
    ("fault", "reason"),
    [(Fault.rejected(), "rejected"), (Fault.forbidden(), "rejected"), (Fault.exhausted(), "quota")],
    ids=["401", "403", "402"],
)
async def test_rejected_or_exhausted_key_is_quarantined(
    rig: Rig, fault: Fault, reason: str, stream: bool
) -> None:
    rig.upstream.set_fault(SECRETS["alpha"], fault)
    await rig.drive_until("alpha", lambda c: c.requests == 1, stream=stream)
    stats = rig.stats("alpha")
    assert (stats["state"], stats["quarantined"], stats["open_reason"]) == ("open", True, reason)
    assert rig.pool.capacity("deepseek").quarantined == 1

    rig.clock.advance(24 * 3600.0)  # no automatic half-open, however long
    await rig.many(20, stream=stream)
    assert rig.counters("alpha").requests == 1
    assert rig.stats("alpha")["quarantined"] is True
    assert [e.reason for e in rig.state_changes("alpha")] == [reason]

    rig.pool.reset("deepseek", "alpha")  # back only by reset (or rotation)
    rig.upstream.clear_fault(SECRETS["alpha"])
    await rig.drive_until("alpha", lambda c: c.status(200) >= 1, stream=stream)
    assert rig.stats("alpha")["state"] == "closed"


@pytest.mark.anyio
@STREAM
async def test_poison_request_raises_bad_request_once_and_opens_nothing(rig: Rig, stream: bool) -> None:
    for _ in range(THRESHOLD * 2):
        with pytest.raises(openai.BadRequestError) as info:
            await rig.chat(model="poison", stream=stream)
        assert info.value.status_code == 400
    assert rig.upstream.total_requests() == THRESHOLD * 2  # never retried on another key
    for key_id in SECRETS:
        stats = rig.stats(key_id)
        assert (stats["state"], stats["failure_count"], stats["trips"]) == ("closed", 0, 0)
    recorded = [e for e in rig.events if isinstance(e, CallRecorded)]
    assert [e.outcome for e in recorded] == [OutcomeKind.CALLER_ERROR] * (THRESHOLD * 2)
    assert not [e for e in rig.events if isinstance(e, KeyStateChanged)]
    assert await rig.chat("still fine", stream=stream) == "still fine"


@pytest.mark.anyio
@STREAM
async def test_hanging_key_times_out_and_the_request_fails_over(net_rig: Rig, stream: bool) -> None:
    rig = net_rig
    # A key silent past the time-to-headers limit is failed over (the caller's own deadline, were
    # it shorter, would end the call instead, and count against no key).
    quick = rig.client.with_options(headers_timeout=0.25)
    rig.upstream.set_fault(SECRETS["alpha"], Fault.hang())
    started = time.monotonic()
    await rig.drive_until("alpha", lambda c: c.hangs == 1, stream=stream, client=quick)
    assert time.monotonic() - started >= 0.25
    stats = rig.stats("alpha")
    assert (stats["failure_count"], stats["total_failures"], stats["in_flight"]) == (1, 1, 0)
    assert rig.counters("alpha").by_status == {}  # it never answered


@pytest.mark.anyio
async def test_timeouts_count_toward_the_threshold(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig("async-loopback")
    rig.pool.update_config({"failure_threshold": 2}, provider="deepseek")
    quick = rig.client.with_options(headers_timeout=0.2)
    rig.upstream.set_fault(SECRETS["alpha"], Fault.hang())
    await rig.drive_until("alpha", lambda c: c.hangs == 2, client=quick)
    assert (rig.stats("alpha")["state"], rig.stats("alpha")["open_reason"]) == ("open", "failures")
    await rig.many(10)
    assert rig.counters("alpha").requests == 2


# -- every endpoint goes through the pool -------------------------------------------------------


@pytest.mark.anyio
async def test_every_endpoint_goes_through_the_pool(rig: Rig) -> None:
    # Two of three keys are down: every call must fail over to charlie to succeed.
    rig.upstream.set_fault(SECRETS["alpha"], Fault.status(503))
    rig.upstream.set_fault(SECRETS["bravo"], Fault.status(502))

    models = await rig.call(lambda c: c.models.list())
    assert [m.id for m in models.data] == ["deepseek-chat", "deepseek-reasoner"]
    model = await rig.call(lambda c: c.models.retrieve("deepseek-reasoner"))
    assert model.owned_by == "deepseek"
    raw = await rig.call(
        lambda c: c.chat.completions.with_raw_response.create(model="deepseek-chat", messages=messages("raw"))
    )
    assert raw.status_code == 200
    assert raw.headers["x-request-id"].startswith("req_fake_")
    assert raw.parse().choices[0].message.content == "raw"
    embedding = await rig.call(lambda c: c.embeddings.create(model="deepseek-chat", input=["a", "b"]))
    assert [len(e.embedding) for e in embedding.data] == [8, 8]
    response = await rig.call(lambda c: c.responses.create(model="deepseek-chat", input="respond"))
    assert response.output_text == "respond"

    seen: dict[str, int] = {}
    for key_id in SECRETS:
        for endpoint, count in rig.counters(key_id).by_endpoint.items():
            seen[endpoint] = seen.get(endpoint, 0) + count
    served = rig.counters("charlie")
    assert served.by_endpoint == {
        "/models": 2,
        "/chat/completions": 1,
        "/embeddings": 1,
        "/responses": 1,
    }
    assert served.status(200) == 5
    # Nothing went out without a pooled key, or with the placeholder the SDK insists on.
    assert rig.upstream.counters(None).requests == 0
    assert rig.upstream.counters(PLACEHOLDER).requests == 0
    assert sum(seen.values()) == rig.upstream.total_requests()


@pytest.mark.anyio
async def test_streamed_responses_api_is_a_success(rig: Rig) -> None:
    """The Responses API ends its stream without ``[DONE]``: that is a clean end, not a failure."""

    def sync_events(client: openai.OpenAI) -> list[str]:
        with client.responses.create(model="deepseek-chat", input="a b c", stream=True) as events:
            return [e.type for e in events]

    async def async_events(client: openai.AsyncOpenAI) -> list[str]:
        async with await client.responses.create(model="deepseek-chat", input="a b c", stream=True) as events:
            return [e.type async for e in events]

    kinds = await rig.call(sync_events if rig.sync else async_events)
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    totals = [rig.stats(k) for k in SECRETS]
    assert sum(s["total_successes"] for s in totals) == 1
    assert sum(s["total_failures"] for s in totals) == 0


@pytest.mark.anyio
@STREAM
async def test_deepseek_reasoning_content_survives(rig: Rig, stream: bool) -> None:
    if not stream:
        reply = await rig.call(
            lambda c: c.chat.completions.create(model="deepseek-reasoner", messages=messages("why"))
        )
        message = reply.choices[0].message
        assert message.content == "why"
        assert message.reasoning_content == "The user wrote: why"
        assert message.model_extra == {"reasoning_content": "The user wrote: why"}
        return

    def sync_deltas(client: openai.OpenAI) -> list[Any]:
        with client.chat.completions.create(
            model="deepseek-reasoner", messages=messages("why"), stream=True
        ) as chunks:
            return [c.choices[0].delta for c in chunks if c.choices]

    async def async_deltas(client: openai.AsyncOpenAI) -> list[Any]:
        async with await client.chat.completions.create(
            model="deepseek-reasoner", messages=messages("why"), stream=True
        ) as chunks:
            return [c.choices[0].delta async for c in chunks if c.choices]

    deltas = await rig.call(sync_deltas if rig.sync else async_deltas)
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert reasoning == "The user wrote: why"
    assert "".join(d.content or "" for d in deltas) == "why"


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["async-asgi", "sync-loopback"])
async def test_perplexity_citations_and_search_results_survive(
    kind: str, loopback: tuple[Swap, LoopbackServer]
) -> None:
    upstream = FakeUpstream(SECRETS.values(), flavor="perplexity")
    swap, server = loopback
    swap.app = upstream
    urls = ["https://example.com/source-1", "https://example.org/source-2"]

    def sync_run() -> tuple[Any, list[Any]]:
        with Perplexity(api_keys=list(SECRETS.values()), base_url=server.base_url) as client:
            assert isinstance(client, openai.OpenAI)
            reply = client.chat.completions.create(model="sonar", messages=messages("cite"))
            with client.chat.completions.create(model="sonar", messages=messages("cite"), stream=True) as s:
                return reply, list(s)

    async def async_run() -> tuple[Any, list[Any]]:
        async with AsyncPerplexity(
            api_keys=list(SECRETS.values()),
            base_url="http://perplexity.test",
            transport=httpx2.ASGITransport(app=upstream),
        ) as client:
            assert isinstance(client, openai.AsyncOpenAI)
            reply = await client.chat.completions.create(model="sonar", messages=messages("cite"))
            stream = await client.chat.completions.create(
                model="sonar", messages=messages("cite"), stream=True
            )
            return reply, [c async for c in stream]

    reply, chunks = await anyio.to_thread.run_sync(sync_run) if kind == "sync-loopback" else await async_run()
    assert reply.citations == urls
    assert [r["url"] for r in reply.model_extra["search_results"]] == urls
    assert reply.choices[0].message.content == "cite"
    assert all(c.model_extra["citations"] == urls for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "cite"
    assert upstream.counters(None).requests == 0


# -- the client object ------------------------------------------------------------------------------


def test_clients_are_openai_clients() -> None:
    keys = list(SECRETS.values())
    pairs: list[tuple[Any, type[Any]]] = [
        (AsyncDeepSeek(api_keys=keys), openai.AsyncOpenAI),
        (AsyncPerplexity(api_keys=keys), openai.AsyncOpenAI),
        (AsyncPooledOpenAI(api_keys=keys, base_url="http://x.test/v1"), openai.AsyncOpenAI),
        (DeepSeek(api_keys=keys), openai.OpenAI),
        (Perplexity(api_keys=keys), openai.OpenAI),
        (PooledOpenAI(api_keys=keys, base_url="http://x.test/v1"), openai.OpenAI),
    ]
    for client, base in pairs:
        assert isinstance(client, base)
        assert client.max_retries == openai.DEFAULT_MAX_RETRIES  # the caller's, honoured by the pool
        if isinstance(client, openai.OpenAI):
            client.close()
    assert str(pairs[0][0].base_url).rstrip("/") == "https://api.deepseek.com"
    assert str(pairs[1][0].base_url).rstrip("/") == "https://api.perplexity.ai"
    assert pairs[0][0].provider == "deepseek"
    assert pairs[1][0].provider == "perplexity"
    assert pairs[2][0].provider == "openai-compatible"


@pytest.mark.anyio
async def test_with_options_shares_the_pool_and_transport(rig: Rig) -> None:
    other = rig.client.with_options(timeout=5.0, max_retries=4)
    assert type(other) is type(rig.client)
    assert other.pool is rig.pool
    assert other.keypool_transport is rig.client.keypool_transport
    assert other.timeout == 5.0
    assert other.max_retries == 4  # honoured as the endpoint-failure retries across keys
    assert other.keypool_settings.retries == 4
    assert rig.client.keypool_settings.retries == openai.DEFAULT_MAX_RETRIES  # the original keeps its own
    rig.upstream.set_fault(SECRETS["alpha"], Fault.status(503))
    await rig.drive_until("alpha", lambda c: c.requests == THRESHOLD, client=other)
    # The breaker that the copy tripped is the original's.
    assert rig.stats("alpha")["state"] == "open"
    await rig.many(10)
    assert rig.counters("alpha").requests == THRESHOLD


class RecordingTransport(httpx2.ASGITransport):
    closed = 0

    async def aclose(self) -> None:
        self.closed += 1
        await super().aclose()


class RecordingSyncTransport(httpx2.HTTPTransport):
    closed = 0

    def close(self) -> None:
        self.closed += 1
        super().close()


@pytest.mark.anyio
async def test_closing_the_client_leaves_a_caller_owned_transport_and_pool_open() -> None:
    upstream = FakeUpstream(SECRETS.values(), flavor="deepseek")
    pool = make_pool(FakeClock(), [])
    transport = RecordingTransport(app=upstream)
    async with AsyncDeepSeek(pool=pool, transport=transport, base_url="http://deepseek.test") as client:
        assert await async_chat(client, "one", False, "deepseek-chat") == "one"
    assert client.is_closed()
    assert transport.closed == 0
    again = AsyncDeepSeek(pool=pool, transport=transport, base_url="http://deepseek.test")
    assert await async_chat(again, "two", True, "deepseek-chat") == "two"
    await again.close()
    assert transport.closed == 0
    assert sum(s["total_successes"] for s in pool.stats("deepseek")) == 2
    assert pool.capacity("deepseek").in_flight == 0


def test_closing_the_sync_client_leaves_a_caller_owned_transport_open(
    loopback: tuple[Swap, LoopbackServer],
) -> None:
    swap, server = loopback
    swap.app = FakeUpstream(SECRETS.values(), flavor="deepseek")
    pool = make_pool(FakeClock(), [])
    transport = RecordingSyncTransport()
    with DeepSeek(pool=pool, transport=transport, base_url=server.base_url) as client:
        assert sync_chat(client, "one", False, "deepseek-chat") == "one"
    assert transport.closed == 0
    with DeepSeek(pool=pool, transport=transport, base_url=server.base_url) as again:
        assert sync_chat(again, "two", True, "deepseek-chat") == "two"
    assert transport.closed == 0
    transport.close()  # its owner closes it
    assert pool.capacity("deepseek").in_flight == 0


# -- no key available ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_no_key_available_is_both_a_keypool_and_an_openai_error(rig: Rig) -> None:
    for key_id in SECRETS:
        rig.pool.quarantine(key_id, "deepseek")
    with pytest.raises(NoKeyAvailableError) as info:
        await rig.chat("x")
    error = info.value
    assert isinstance(error, keypool.NoKeyAvailable)
    assert isinstance(error, openai.InternalServerError)  # taken out by an operator: a 503
    assert (error.status_code, error.reason, error.retry_after) == (503, "manual", None)
    assert "retry-after" not in error.response.headers  # nothing comes back by itself
    assert error.provider == "deepseek"
    assert "deepseek" in str(error)
    assert error.request.url.path.endswith("/chat/completions")  # the real request, not a stand-in
    assert rig.upstream.total_requests() == 0


@pytest.mark.anyio
async def test_waits_for_a_recovery_only_inside_max_wait_and_the_deadline(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig("async-asgi")
    rig.pool.trip("deepseek")  # every key open for the breaker timeout (60 s)
    with pytest.raises(openai.InternalServerError) as info:
        await rig.chat("x")
    assert isinstance(info.value, NoKeyAvailable)
    assert info.value.retry_after == pytest.approx(60.0)
    assert info.value.response.headers["retry-after"] == "60"
    assert rig.upstream.total_requests() == 0
    assert rig.clock.slept == []  # refused at once: 60 s is beyond max_wait

    patient = make_rig("async-asgi", max_wait=120.0)
    patient.pool.trip("deepseek")
    assert await patient.chat("later") == "later"  # slept (on the fake clock) until half-open
    assert sum(patient.clock.slept) == pytest.approx(60.0)

    hurried = patient.client.with_options(timeout=30.0)  # the deadline comes before the recovery
    patient.pool.trip("deepseek")
    with pytest.raises(openai.InternalServerError):
        await patient.chat("x", client=hurried)
    assert sum(patient.clock.slept) == pytest.approx(60.0)


@pytest.mark.anyio
async def test_every_key_throttled_returns_the_last_answer(rig: Rig) -> None:
    rig.upstream.set_default_fault(Fault.rate_limited(30))
    with pytest.raises(openai.RateLimitError):
        await rig.chat("x")
    assert rig.upstream.total_requests() == 3  # each key once, never the same key twice
    assert all(rig.counters(k).requests == 1 for k in SECRETS)
    assert rig.pool.capacity("deepseek").throttled == 3


# -- configuration -----------------------------------------------------------------------------------


ENV_NAMES = ("DEEPSEEK_API_KEYS", "DEEPSEEK_API_KEY", "PERPLEXITY_API_KEYS", "PERPLEXITY_API_KEY")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("prefix", ["DEEPSEEK", "PERPLEXITY"])
@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_keys_from_the_environment(clean_env: pytest.MonkeyPatch, prefix: str, sync: bool) -> None:
    cls: Any = {
        ("DEEPSEEK", False): AsyncDeepSeek,
        ("DEEPSEEK", True): DeepSeek,
        ("PERPLEXITY", False): AsyncPerplexity,
        ("PERPLEXITY", True): Perplexity,
    }[prefix, sync]
    clean_env.setenv(f"{prefix}_API_KEYS", " sk-env-a , sk-env-b,,sk-env-c ")
    clean_env.setenv(f"{prefix}_API_KEY", "sk-env-single")
    client = cls()
    assert [s.get_secret_value() for s in _secrets(client.pool, client.provider)] == [
        "sk-env-a",
        "sk-env-b",
        "sk-env-c",
    ]
    clean_env.setenv(f"{prefix}_API_KEYS", " , ")  # nothing usable: fall back to the single key
    fallback = cls()
    assert [s.get_secret_value() for s in _secrets(fallback.pool, fallback.provider)] == ["sk-env-single"]
    explicit = cls(api_keys=["sk-given"])  # explicit keys win over the environment
    assert [s.get_secret_value() for s in _secrets(explicit.pool, explicit.provider)] == ["sk-given"]
    for c in (client, fallback, explicit):
        if sync:
            c.close()


def _secrets(pool: KeyPool, provider: str) -> list[Any]:
    """The secrets of a pool's keys, in order (read by routing a lease to each key)."""
    out = []
    for key_id in pool.key_ids(provider):
        lease = pool.try_acquire_key(provider, key_id)
        assert lease is not None
        out.append(lease.secret)
        lease.release()
    return out


@pytest.mark.parametrize(
    ("cls", "prefix"),
    [
        (AsyncDeepSeek, "DEEPSEEK"),
        (DeepSeek, "DEEPSEEK"),
        (AsyncPerplexity, "PERPLEXITY"),
        (Perplexity, "PERPLEXITY"),
    ],
)
def test_no_keys_at_all_is_a_config_error_naming_the_field_and_variables(
    clean_env: pytest.MonkeyPatch, cls: Any, prefix: str
) -> None:
    with pytest.raises(ConfigError) as info:
        cls()
    message = str(info.value)
    assert "api_keys" in message
    assert f"{prefix}_API_KEYS" in message
    assert f"{prefix}_API_KEY" in message


def test_environment_keys_reach_the_upstream(clean_env: pytest.MonkeyPatch) -> None:
    upstream = FakeUpstream(["sk-env-a", "sk-env-b"], flavor="deepseek")
    clean_env.setenv("DEEPSEEK_API_KEYS", "sk-env-a,sk-env-b")

    async def main() -> None:
        async with AsyncDeepSeek(transport=httpx2.ASGITransport(app=upstream)) as client:
            upstream.set_fault("sk-env-a", Fault.rejected())
            for i in range(10):
                assert await async_chat(client, f"e{i}", False, "deepseek-chat") == f"e{i}"

    anyio.run(main)
    assert upstream.counters("sk-env-b").status(200) == 10
    assert upstream.counters("sk-env-a").requests <= 1


def test_invalid_construction_is_a_config_error() -> None:
    pool = make_pool(FakeClock(), [])
    with pytest.raises(ConfigError, match="either pool= or api_keys="):
        AsyncDeepSeek(pool=pool, api_keys=["sk-x"])
    for ignored in ({"breaker": keypool.BreakerConfig()}, {"weights": [1.0]}, {"max_concurrency_per_key": 2}):
        with pytest.raises(ConfigError, match=f"{next(iter(ignored))}="):  # would be silently ignored
            AsyncDeepSeek(pool=pool, **ignored)
    with pytest.raises(ConfigError, match="provider"):
        AsyncPerplexity(pool=pool)  # the pool has no provider 'perplexity'
    assert AsyncPerplexity(pool=pool, provider="deepseek").provider == "deepseek"
    with pytest.raises(ConfigError, match="http_client"):
        AsyncDeepSeek(api_keys=["sk-x"], http_client=httpx2.Client())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="http_client"):
        DeepSeek(api_keys=["sk-x"], http_client=httpx2.AsyncClient())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"request_timeout.*timeout="):
        AsyncDeepSeek(api_keys=["sk-x"], request_timeout=5.0)
    with pytest.raises(ConfigError, match="not both"):
        AsyncDeepSeek(api_key="sk-x", api_keys=["sk-y"])
    with pytest.raises(ConfigError, match="max_wait"):
        AsyncDeepSeek(api_keys=["sk-x"], max_wait=-1)
    with pytest.raises(ConfigError, match="headers_timeout"):
        AsyncDeepSeek(api_keys=["sk-x"], headers_timeout=0)
    with pytest.raises(ConfigError, match="max_retries"):
        AsyncDeepSeek(api_keys=["sk-x"], max_retries=-1)
    with pytest.raises(ConfigError, match="base_url"):
        AsyncPooledOpenAI(api_keys=["sk-x"])
    with pytest.raises(ConfigError, match="base_url"):
        PooledOpenAI(api_keys=["sk-x"])
    with pytest.raises(ConfigError, match="max_concurrency"):
        AsyncDeepSeek(api_keys=["sk-x"], max_concurrency_per_key=0)
    with pytest.raises(ConfigError, match="max_attempts"):
        AsyncDeepSeek(api_keys=["sk-x"], max_attempts=0)
    with pytest.raises(ConfigError) as info:
        AsyncDeepSeek(api_keys=["sk-same-secret-value", "sk-same-secret-value"])
    assert "sk-same-secret-value" not in str(info.value)


def test_builds_its_own_pool_from_keys_weights_and_backups() -> None:
    client = DeepSeek(
        api_keys=["sk-p1", "sk-p2"],
        weights=[3.0, 1.0],
        backup_keys=["sk-b1"],
        max_concurrency_per_key=4,
        breaker=keypool.BreakerConfig(failure_threshold=2),
    )
    rows = client.pool.stats("deepseek")
    assert [(r["tier"], r["weight"]) for r in rows] == [("primary", 3.0), ("primary", 1.0), ("backup", 1.0)]
    assert {r["config"]["failure_threshold"] for r in rows} == {2}
    client.close()


# -- secrets ----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_no_secret_in_reprs_messages_or_logs(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    up = rig.upstream
    up.set_fault(SECRETS["alpha"], Fault.status(503))
    up.set_fault(SECRETS["bravo"], Fault.rate_limited(10))
    await rig.many(12)
    await rig.many(3, stream=True)
    up.set_fault(SECRETS["charlie"], Fault.rejected())
    for model in ("deepseek-chat", "poison"):
        try:
            await rig.chat("boom", model=model)
        except Exception as exc:
            texts += [str(exc), repr(exc)]
            texts += [str(e) for e in _chain(exc)]
    for key_id in SECRETS:
        rig.pool.quarantine(key_id, "deepseek")
    try:
        await rig.chat("nothing left")
    except Exception as exc:
        texts += [str(exc), repr(exc)]
    assert len(texts) >= 6
    texts += [
        repr(rig.client),
        repr(rig.pool),
        repr(rig.client.keypool_transport),
        repr(rig.upstream),
        json.dumps(rig.pool.stats()),
        repr(rig.pool.capacity("deepseek")),
        repr(rig.events),
        caplog.text,
    ]
    blob = "\n".join(texts)
    for secret in SECRETS.values():
        assert secret not in blob


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__
