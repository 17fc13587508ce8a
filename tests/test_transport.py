"""KeyPoolTransport under real ``openai`` clients: failover, breakers, streams, cancellation, budgets."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import httpx2
import openai
import pytest

from keypool import (
    CallRecorded,
    CallRejected,
    CallSettings,
    KeyPool,
    KeyPoolTransport,
    NoKeyAvailable,
    OutcomeKind,
    PoolEvent,
    StreamInterrupted,
    SyncKeyPoolTransport,
    request_budget,
)
from keypool.testing import FakeClock, FakeUpstream, Fault, LoopbackServer

P = "p"
BASE = "http://upstream.test/v1"
MESSAGES: Any = [{"role": "user", "content": "hello"}]
CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
}
CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
}
SSE_EVENT = f"data: {json.dumps(CHUNK)}\n\n".encode()
SSE_BODY = SSE_EVENT + SSE_EVENT + b"data: [DONE]\n\n"
MODELS = {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "test"}]}

Handler = Callable[[httpx2.Request], Any]


def secret_of(key_id: str) -> str:
    return f"sk-test-{key_id}-0123456789abcdef"


def ok(request: httpx2.Request) -> httpx2.Response:
    if request.url.path.endswith("/models"):
        return httpx2.Response(200, json=MODELS)
    body = json.loads(request.content or b"{}")
    if body.get("stream"):
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=SSE_BODY)
    return httpx2.Response(200, json=CHAT)


def status(code: int, headers: dict[str, str] | None = None) -> Handler:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            code, headers=headers, json={"error": {"message": f"status {code}", "type": "x"}}
        )

    return handler


class Upstream:
    """A MockTransport handler: per-key behaviour, calls counted per key and per request."""

    def __init__(self, n_keys: int) -> None:
        self.by_secret = {secret_of(f"k{i}"): f"k{i}" for i in range(n_keys)}
        self.calls: Counter[str] = Counter()
        self.per_request: dict[str, list[str]] = defaultdict(list)
        self.behaviour: dict[str, Handler] = {}
        self.default: Handler = ok

    def key_of(self, request: httpx2.Request) -> str:
        auth = request.headers.get("authorization", "")
        return self.by_secret.get(auth.removeprefix("Bearer "), f"unknown:{auth}")

    def __call__(self, request: httpx2.Request) -> Any:
        key = self.key_of(request)
        self.calls[key] += 1
        self.per_request[request.headers.get("x-test-request", "")].append(key)
        return self.behaviour.get(key, self.default)(request)


class Recorder:
    def __init__(self) -> None:
        self.events: list[PoolEvent] = []

    def __call__(self, event: PoolEvent) -> None:
        self.events.append(event)

    def recorded(self) -> list[CallRecorded]:
        return [e for e in self.events if isinstance(e, CallRecorded)]


def make_pool(
    clock: FakeClock, n_keys: int = 2, seed: int = 0, hooks: tuple[Any, ...] = (), *, shared: bool = True
) -> KeyPool:
    keys = [{"secret": secret_of(f"k{i}"), "key_id": f"k{i}"} for i in range(n_keys)]
    config = {"providers": [{"name": P, "keys": keys, "shared_endpoint": shared}]}
    return KeyPool(config, clock=clock, seed=seed, hooks=hooks)


@asynccontextmanager
async def async_openai(pool: KeyPool, upstream: Handler, **kwargs: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    transport = KeyPoolTransport(pool, P, transport=httpx2.MockTransport(upstream), **kwargs)
    async with httpx2.AsyncClient(transport=transport) as http:
        yield openai.AsyncOpenAI(api_key="sk-placeholder", base_url=BASE, max_retries=0, http_client=http)


@contextmanager
def sync_openai(pool: KeyPool, upstream: Handler, **kwargs: Any) -> Iterator[openai.OpenAI]:
    transport = SyncKeyPoolTransport(pool, P, transport=httpx2.MockTransport(upstream), **kwargs)
    with httpx2.Client(transport=transport) as http:
        yield openai.OpenAI(api_key="sk-placeholder", base_url=BASE, max_retries=0, http_client=http)


async def collect(stream: Any, into: list[Any]) -> None:
    async for chunk in stream:
        into.append(chunk.choices[0].delta.content)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---------------------------------------------------------------------------------- streams for tests


class FailingAsyncStream(httpx2.AsyncByteStream):
    """A body that yields ``before`` (if any) and then breaks with a read error."""

    def __init__(self, before: bytes = b"") -> None:
        self.before = before
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.before:
            yield self.before
        raise httpx2.ReadError("connection reset by peer")

    async def aclose(self) -> None:
        self.closed = True


class FailingSyncStream(httpx2.SyncByteStream):
    def __init__(self, before: bytes = b"") -> None:
        self.before = before

    def __iter__(self) -> Iterator[bytes]:
        if self.before:
            yield self.before
        raise httpx2.ReadError("connection reset by peer")


class StalledAsyncStream(httpx2.AsyncByteStream):
    """A body whose first byte never comes."""

    def __init__(self, started: anyio.Event) -> None:
        self.started = started
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started.set()
        await anyio.sleep_forever()
        yield b""  # pragma: no cover

    async def aclose(self) -> None:
        self.closed = True


class OneChunkAsyncStream(httpx2.AsyncByteStream):
    """A body that is not read in advance, like a real network response."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body


def event_stream(stream: Any) -> Handler:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, stream=stream())

    return handler


# ---------------------------------------------------------------------------------- failover and breakers


@pytest.mark.anyio
async def test_dead_key_is_skipped_and_trips_after_exactly_five_failures(clock: FakeClock) -> None:
    pool = make_pool(clock, 2, seed=1)
    upstream = Upstream(2)
    upstream.behaviour["k0"] = status(503)
    async with async_openai(pool, upstream) as client:
        for _ in range(60):
            completion = await client.chat.completions.create(model="m", messages=MESSAGES)
            assert completion.choices[0].message.content == "hi"
    assert upstream.calls["k0"] == 5
    assert upstream.calls["k1"] == 60
    row = pool.key_stats("k0")
    assert (row["state"], row["open_reason"], row["total_failures"]) == ("open", "failures", 5)
    assert pool.key_stats("k1")["state"] == "closed"


def test_sync_dead_key_is_skipped_and_trips_after_exactly_five_failures(clock: FakeClock) -> None:
    pool = make_pool(clock, 2, seed=1)
    upstream = Upstream(2)
    upstream.behaviour["k0"] = status(503)
    with sync_openai(pool, upstream) as client:
        for _ in range(60):
            assert (
                client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content
                == "hi"
            )
    assert upstream.calls["k0"] == 5
    assert pool.key_stats("k0")["state"] == "open"


@pytest.mark.anyio
async def test_connect_errors_fail_over(clock: FakeClock) -> None:
    pool = make_pool(clock, 2, seed=2)
    upstream = Upstream(2)

    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused", request=request)

    upstream.behaviour["k0"] = refuse
    async with async_openai(pool, upstream) as client:
        for _ in range(30):
            await client.models.list()
    assert upstream.calls["k0"] == 5
    assert pool.key_stats("k0")["state"] == "open"


@pytest.mark.anyio
async def test_429_keeps_its_key_out_until_the_retry_after_instant(clock: FakeClock) -> None:
    pool = make_pool(clock, 2, seed=3)
    upstream = Upstream(2)
    upstream.behaviour["k0"] = status(429, {"retry-after": "30"})
    async with async_openai(pool, upstream) as client:
        for _ in range(100):
            await client.chat.completions.create(model="m", messages=MESSAGES)
            if upstream.calls["k0"]:
                break
        assert upstream.calls["k0"] == 1
        row = pool.key_stats("k0")
        assert (row["state"], row["open_reason"], row["retry_in"]) == ("open", "throttled", 30.0)
        assert row["total_failures"] == 0  # a throttle is not a failure
        assert pool.capacity(P).throttled == 1

        clock.advance(29)
        for _ in range(40):
            await client.chat.completions.create(model="m", messages=MESSAGES)
        assert upstream.calls["k0"] == 1
        assert pool.key_stats("k0")["state"] == "open"

        clock.advance(1)
        assert pool.key_stats("k0")["state"] == "closed"
        upstream.behaviour["k0"] = ok
        for _ in range(40):
            await client.chat.completions.create(model="m", messages=MESSAGES)
        assert upstream.calls["k0"] > 1


@pytest.mark.anyio
async def test_429_on_the_only_key_reaches_the_caller(clock: FakeClock) -> None:
    pool = make_pool(clock, 1)
    upstream = Upstream(1)
    upstream.behaviour["k0"] = status(429, {"retry-after-ms": "1500"})
    async with async_openai(pool, upstream) as client:
        with pytest.raises(openai.RateLimitError):
            await client.models.list()
    assert pool.key_stats("k0")["retry_in"] == 1.5


@pytest.mark.anyio
@pytest.mark.parametrize(("code", "reason"), [(401, "rejected"), (403, "rejected"), (402, "quota")])
async def test_rejected_and_exhausted_keys_are_quarantined(clock: FakeClock, code: int, reason: str) -> None:
    pool = make_pool(clock, 2, seed=4)
    upstream = Upstream(2)
    upstream.behaviour["k0"] = status(code)
    async with async_openai(pool, upstream) as client:
        for _ in range(100):
            await client.chat.completions.create(model="m", messages=MESSAGES)
            if upstream.calls["k0"]:
                break
        row = pool.key_stats("k0")
        assert (row["state"], row["open_reason"], row["quarantined"]) == ("open", reason, True)
        clock.advance(365 * 86_400)
        for _ in range(30):
            await client.chat.completions.create(model="m", messages=MESSAGES)
    assert upstream.calls["k0"] == 1
    assert pool.capacity(P).quarantined == 1


@pytest.mark.anyio
async def test_a_thousand_bad_requests_open_no_breaker_and_are_not_retried(clock: FakeClock) -> None:
    pool = make_pool(clock, 3)
    upstream = Upstream(3)
    upstream.default = status(400)
    async with async_openai(pool, upstream) as client:
        for i in range(1000):
            with pytest.raises(openai.BadRequestError):
                await client.chat.completions.create(
                    model="m", messages=MESSAGES, extra_headers={"x-test-request": str(i)}
                )
    assert sum(upstream.calls.values()) == 1000
    assert all(len(keys) == 1 for keys in upstream.per_request.values())
    assert len(upstream.per_request) == 1000
    for row in pool.stats():
        assert (row["state"], row["failure_count"], row["trips"], row["total_failures"]) == (
            "closed",
            0,
            0,
            0,
        )
    assert pool.capacity(P).status == "healthy"


def test_sync_bad_request_is_not_retried(clock: FakeClock) -> None:
    pool = make_pool(clock, 3)
    upstream = Upstream(3)
    upstream.default = status(422)
    with sync_openai(pool, upstream) as client:
        for _ in range(50):
            with pytest.raises(openai.UnprocessableEntityError):
                client.models.list()
    assert sum(upstream.calls.values()) == 50
    assert {row["state"] for row in pool.stats()} == {"closed"}


# ---------------------------------------------------------------------------------- attempts


@pytest.mark.anyio
async def test_a_failure_beside_clean_keys_is_free_then_max_retries_bound_the_rest(clock: FakeClock) -> None:
    pool = make_pool(clock, 4, seed=5, shared=False)  # per-key view only: see the provider's below
    upstream = Upstream(4)
    upstream.default = status(503)
    async with async_openai(pool, upstream) as client:
        with pytest.raises(openai.InternalServerError):
            await client.models.list(extra_headers={"x-test-request": "one"})
    tried = upstream.per_request["one"]
    # The first 503 beside clean keys may be the key's own: the next key at once, free. A second in
    # a row is the endpoint's: max_retries (2, as in openai) more attempts, each after openai's own
    # backoff, so the call gives up no later than the plain client would.
    assert len(tried) == 1 + 2 + 1
    assert len(set(tried)) == 4  # never the same key twice while another can serve
    assert len(clock.slept) == 2
    assert 0.25 <= clock.slept[0] <= 0.375
    assert 0.5 <= clock.slept[1] <= 0.75


@pytest.mark.anyio
async def test_a_provider_wide_outage_is_seen_after_failure_threshold_failures_in_total(
    clock: FakeClock,
) -> None:
    pool = make_pool(clock, 6, seed=5)
    upstream = Upstream(6)
    upstream.default = status(503)
    async with async_openai(pool, upstream, settings=CallSettings(retries=10)) as client:
        with pytest.raises(openai.InternalServerError) as first:
            await client.models.list(extra_headers={"x-test-request": "one"})
        # Five failures across the keys (not five per key: thirty) and the provider is out ...
        assert len(upstream.per_request["one"]) == 5
        assert first.value.status_code == 503
        with pytest.raises(NoKeyAvailable) as refused:  # raised as openai's 503 by the pooled clients
            await client.models.list(extra_headers={"x-test-request": "two"})
    # ... so the next call is refused at once, and every key says so.
    assert upstream.per_request["two"] == []
    assert refused.value.reason == "open"
    assert {row["state"] for row in pool.stats()} == {"open"}
    assert pool.capacity(P).status == "down"


@pytest.mark.anyio
async def test_a_key_is_tried_again_only_when_no_other_can_serve_after_openais_backoff(
    clock: FakeClock,
) -> None:
    pool = make_pool(clock, 2, seed=5, shared=False)
    upstream = Upstream(2)
    upstream.default = status(503)
    settings = CallSettings(retries=4)
    async with async_openai(pool, upstream, settings=settings) as client:
        with pytest.raises(openai.InternalServerError):
            await client.models.list(extra_headers={"x-test-request": "one"})
    tried = upstream.per_request["one"]
    assert len(tried) == 2 + 4  # the first failure beside a clean key is free; then 4 retries
    for start in (0, 2, 4):  # each round tries both keys before either is reused
        assert len(set(tried[start : start + 2])) == 2
    # before each attempt that costs a retry, the openai client's own delays: 0.5 s, 1 s, 2 s, 4 s
    # (less up to a quarter), once each: the same waits as the plain client with max_retries=4
    assert len(clock.slept) == 4
    for slept, base in zip(clock.slept, (0.5, 1.0, 2.0, 4.0), strict=True):
        assert 0.5 * base <= slept <= 0.75 * base


@pytest.mark.anyio
async def test_key_scope_failures_move_on_without_costing_a_retry(clock: FakeClock) -> None:
    pool = make_pool(clock, 4, seed=5)
    upstream = Upstream(4)
    upstream.default = status(401)
    upstream.behaviour["k3"] = ok
    async with async_openai(pool, upstream, settings=CallSettings(retries=0)) as client:
        await client.models.list(extra_headers={"x-test-request": "one"})
    assert upstream.per_request["one"][-1] == "k3"  # however many revoked keys came first


@pytest.mark.anyio
async def test_max_attempts_is_respected(clock: FakeClock) -> None:
    pool = make_pool(clock, 5, seed=6, shared=False)
    upstream = Upstream(5)
    upstream.default = status(500)
    async with async_openai(pool, upstream, max_attempts=2) as client:
        for i in range(10):
            with pytest.raises(openai.InternalServerError):
                await client.models.list(extra_headers={"x-test-request": str(i)})
    assert [len(keys) for keys in upstream.per_request.values()] == [2] * 10
    assert all(len(set(keys)) == 2 for keys in upstream.per_request.values())


def test_sync_max_attempts_is_respected(clock: FakeClock) -> None:
    pool = make_pool(clock, 5, seed=6)
    upstream = Upstream(5)
    upstream.default = status(502)
    with sync_openai(pool, upstream, max_attempts=3) as client, pytest.raises(openai.InternalServerError):
        client.models.list(extra_headers={"x-test-request": "r"})
    assert len(upstream.per_request["r"]) == 3
    assert len(set(upstream.per_request["r"])) == 3


@pytest.mark.anyio
async def test_an_unread_error_body_still_reaches_the_caller(clock: FakeClock) -> None:
    pool = make_pool(clock, 2, seed=0)
    pool.quarantine("k1")
    upstream = Upstream(2)
    body = json.dumps({"error": {"message": "upstream is down", "type": "x"}}).encode()
    upstream.behaviour["k0"] = lambda request: httpx2.Response(
        503, headers={"content-type": "application/json"}, stream=OneChunkAsyncStream(body)
    )
    async with async_openai(pool, upstream) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.models.list()
    assert "upstream is down" in str(info.value)


@pytest.mark.anyio
async def test_no_key_available_reaches_the_caller(clock: FakeClock) -> None:
    pool = make_pool(clock, 2)
    pool.quarantine("k0")
    pool.quarantine("k1")
    upstream = Upstream(2)
    async with async_openai(pool, upstream) as client:
        with pytest.raises(NoKeyAvailable) as info:
            await client.models.list()
    assert info.value.provider == P
    assert info.value.retry_after is None
    assert sum(upstream.calls.values()) == 0
    assert clock.slept == []


def test_sync_no_key_available_reaches_the_caller(clock: FakeClock) -> None:
    pool = make_pool(clock, 1)
    pool.trip(P)
    with sync_openai(pool, Upstream(1), timeout=10) as client, pytest.raises(NoKeyAvailable) as info:
        client.models.list()
    assert info.value.retry_after == 60.0


@pytest.mark.anyio
async def test_request_waits_for_a_recovery_inside_its_deadline(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, 1, hooks=(rec,))
    pool.trip(P)
    upstream = Upstream(1)
    patient = CallSettings(max_wait=math.inf)  # a down pool is waited for only within max_wait
    async with async_openai(pool, upstream, timeout=90, settings=patient) as client:
        await client.models.list()
    assert clock.slept == [60.0]
    assert [(e.outcome, e.trial) for e in rec.recorded()] == [(OutcomeKind.SUCCESS, True)]


@pytest.mark.anyio
async def test_request_beyond_its_deadline_fails_fast(clock: FakeClock) -> None:
    pool = make_pool(clock, 1)
    pool.trip(P)
    async with async_openai(pool, Upstream(1), timeout=10) as client:
        with pytest.raises(NoKeyAvailable) as info:
            await client.models.list()
    assert info.value.retry_after == 60.0
    assert clock.slept == []


# ---------------------------------------------------------------------------------- endpoints


@pytest.mark.anyio
async def test_models_list_and_raw_responses_go_through_the_pool(clock: FakeClock) -> None:
    pool = make_pool(clock, 2)
    upstream = Upstream(2)
    async with async_openai(pool, upstream) as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["m"]
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        assert raw.status_code == 200
        assert raw.parse().choices[0].message.content == "hi"
        raw_models = await client.models.with_raw_response.list()
        assert raw_models.http_response.status_code == 200
    assert sum(upstream.calls.values()) == 3
    assert "unknown" not in " ".join(upstream.calls)  # the pool's keys, never the client's api_key
    assert sum(row["total_successes"] for row in pool.stats()) == 3


def test_sync_models_list_and_raw_responses_go_through_the_pool(clock: FakeClock) -> None:
    pool = make_pool(clock, 2)
    upstream = Upstream(2)
    with sync_openai(pool, upstream) as client:
        assert [m.id for m in client.models.list().data] == ["m"]
        raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        assert raw.parse().choices[0].message.content == "hi"
    assert sum(upstream.calls.values()) == 2
    assert set(upstream.calls) <= {"k0", "k1"}
    assert sum(row["total_successes"] for row in pool.stats()) == 2


@pytest.mark.anyio
async def test_custom_auth_header(clock: FakeClock) -> None:
    pool = make_pool(clock, 1)
    seen: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request.headers["x-api-key"])
        return httpx2.Response(200, json=MODELS)

    transport = KeyPoolTransport(
        pool, P, transport=httpx2.MockTransport(handler), auth_header="x-api-key", auth_scheme=None
    )
    async with httpx2.AsyncClient(transport=transport) as http:
        await http.get(f"{BASE}/models")
    assert seen == [secret_of("k0")]


# ---------------------------------------------------------------------------------- streaming


@pytest.mark.anyio
async def test_stream_failing_before_the_first_byte_fails_over(clock: FakeClock) -> None:
    pool = make_pool(clock, 2, seed=7)
    upstream = Upstream(2)
    upstream.behaviour["k0"] = event_stream(FailingAsyncStream)
    texts = []
    async with async_openai(pool, upstream) as client:
        for _ in range(100):
            stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            texts.append("".join([chunk.choices[0].delta.content or "" async for chunk in stream]))
            if upstream.calls["k0"] >= 3:
                break
    assert upstream.calls["k0"] == 3
    assert set(texts) == {"hihi"}  # every request got its whole answer from k1
    row = pool.key_stats("k0")
    assert (row["failure_count"], row["in_flight"]) == (3, 0)
    assert pool.key_stats("k1")["in_flight"] == 0


def test_sync_stream_failing_before_the_first_byte_fails_over(clock: FakeClock) -> None:
    pool = make_pool(clock, 2, seed=7)
    upstream = Upstream(2)
    upstream.behaviour["k0"] = event_stream(FailingSyncStream)
    with sync_openai(pool, upstream) as client:
        for _ in range(100):
            stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == "hihi"
            if upstream.calls["k0"]:
                break
    assert upstream.calls["k0"] == 1
    assert pool.key_stats("k0")["failure_count"] == 1


@pytest.mark.anyio
async def test_stream_breaking_after_data_raises_and_records_a_failure(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, 2, hooks=(rec,))
    upstream = Upstream(2)
    upstream.default = event_stream(lambda: FailingAsyncStream(SSE_EVENT))
    got = []
    async with async_openai(pool, upstream) as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(StreamInterrupted) as info:
            await collect(stream, got)
    assert got == ["hi"]
    assert sum(upstream.calls.values()) == 1  # not retried: the caller already has data
    assert info.value.provider == P
    assert isinstance(info.value.__cause__, httpx2.ReadError)
    [recorded] = rec.recorded()
    assert recorded.outcome is OutcomeKind.FAILURE
    assert pool.stats()[0]["in_flight"] + pool.stats()[1]["in_flight"] == 0
    assert sum(row["failure_count"] for row in pool.stats()) == 1


def test_sync_stream_breaking_after_data_raises(clock: FakeClock) -> None:
    pool = make_pool(clock, 1)
    upstream = Upstream(1)
    upstream.default = event_stream(lambda: FailingSyncStream(SSE_EVENT))
    with sync_openai(pool, upstream) as client:
        stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(StreamInterrupted):
            for _ in stream:
                pass
    assert pool.key_stats("k0")["failure_count"] == 1
    assert upstream.calls["k0"] == 1


@pytest.mark.anyio
async def test_a_clean_stream_records_success_at_its_end(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, 1, hooks=(rec,))
    async with async_openai(pool, Upstream(1)) as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        assert pool.capacity(P).in_flight == 1  # the outcome waits for the body
        chunks = [c async for c in stream]
    assert len(chunks) == 2
    assert [e.outcome for e in rec.recorded()] == [OutcomeKind.SUCCESS]
    assert pool.capacity(P).in_flight == 0


@pytest.mark.anyio
async def test_closing_a_complete_stream_early_credits_the_key(clock: FakeClock) -> None:
    # The mock sends the whole event stream, [DONE] included, in one chunk: the key delivered
    # everything, so the caller stopping early is a success for it (not a failure, not nothing).
    # Closing before [DONE] arrived blames nobody: tests/test_providers_streaming.py shows it.
    rec = Recorder()
    pool = make_pool(clock, 1, hooks=(rec,))
    async with async_openai(pool, Upstream(1)) as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        async for _ in stream:
            break
        await stream.close()
    assert [e.outcome for e in rec.recorded()] == [OutcomeKind.SUCCESS]
    assert pool.capacity(P).in_flight == 0


# ---------------------------------------------------------------------------------- cancellation


async def _cancel_while_waiting(pool: KeyPool, handler: Handler, started: anyio.Event) -> None:
    async with async_openai(pool, handler) as client, anyio.create_task_group() as tg:
        scope = anyio.CancelScope()

        async def call() -> None:
            with scope:
                await client.chat.completions.create(model="m", messages=MESSAGES)

        tg.start_soon(call)
        await started.wait()
        assert pool.capacity(P).in_flight == 1
        scope.cancel()


@pytest.mark.anyio
async def test_cancelled_request_leaves_no_slot_taken(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, 1, hooks=(rec,))
    pool.trip(P)
    clock.advance(60)  # half-open: the call holds a trial slot
    started = anyio.Event()

    async def handler(request: httpx2.Request) -> httpx2.Response:
        started.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    await _cancel_while_waiting(pool, handler, started)
    row = pool.key_stats("k0")
    assert (row["in_flight"], row["trials_in_flight"], row["state"]) == (0, 0, "half_open")
    assert [e.outcome for e in rec.recorded()] == [OutcomeKind.IGNORED]
    assert pool.capacity(P).in_flight == 0


@pytest.mark.anyio
async def test_cancelled_while_waiting_for_the_first_byte_leaves_no_slot_taken(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, 1, hooks=(rec,))
    pool.trip(P)
    clock.advance(60)
    started = anyio.Event()
    streams: list[StalledAsyncStream] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        streams.append(StalledAsyncStream(started))
        return httpx2.Response(200, stream=streams[-1])

    await _cancel_while_waiting(pool, handler, started)
    row = pool.key_stats("k0")
    assert (row["in_flight"], row["trials_in_flight"], row["total_failures"]) == (0, 0, 0)
    assert [e.outcome for e in rec.recorded()] == [OutcomeKind.IGNORED]
    assert streams[0].closed


# ---------------------------------------------------------------------------------- request bodies


@pytest.mark.anyio
async def test_non_replayable_bodies_are_not_retried(clock: FakeClock) -> None:
    pool = make_pool(clock, 3)
    upstream = Upstream(3)
    upstream.default = status(503)

    async def body() -> AsyncIterator[bytes]:
        yield b'{"model": "m", '
        yield b'"input": "x"}'

    transport = KeyPoolTransport(pool, P, transport=httpx2.MockTransport(upstream))
    async with httpx2.AsyncClient(transport=transport) as http:
        response = await http.post(f"{BASE}/embeddings", content=body())
    assert response.status_code == 503
    assert sum(upstream.calls.values()) == 1
    assert sum(row["failure_count"] for row in pool.stats()) == 1  # the failure still counts


def test_sync_non_replayable_bodies_are_not_retried(clock: FakeClock) -> None:
    pool = make_pool(clock, 3)
    upstream = Upstream(3)
    upstream.default = status(500)

    def body() -> Iterator[bytes]:
        yield b"part one, "
        yield b"part two"

    transport = SyncKeyPoolTransport(pool, P, transport=httpx2.MockTransport(upstream))
    with httpx2.Client(transport=transport) as http:
        response = http.post(f"{BASE}/embeddings", content=body())
    assert response.status_code == 500
    assert sum(upstream.calls.values()) == 1


@pytest.mark.anyio
async def test_replayable_bodies_are_resent_whole(clock: FakeClock) -> None:
    pool = make_pool(clock, 2, seed=8)
    upstream = Upstream(2)
    upstream.behaviour["k0"] = status(503)
    bodies: list[bytes] = []
    original = upstream.__call__

    def handler(request: httpx2.Request) -> Any:
        bodies.append(request.content)
        return original(request)

    async with async_openai(pool, handler) as client:
        for _ in range(30):
            await client.chat.completions.create(model="m", messages=MESSAGES)
            if upstream.calls["k0"]:
                break
    assert upstream.calls["k0"] == 1
    assert len(set(bodies)) == 1
    assert json.loads(bodies[0])["messages"] == MESSAGES


def test_transport_repr_names_the_provider_only(clock: FakeClock) -> None:
    pool = make_pool(clock, 1)
    transport = KeyPoolTransport(pool, P, transport=httpx2.MockTransport(ok))
    assert repr(transport) == "KeyPoolTransport(provider='p')"


def test_sync_openai_stream_records_success(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, 1, hooks=(rec,))
    with sync_openai(pool, Upstream(1)) as client:
        stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        assert len(list(stream)) == 2
    assert [e.outcome for e in rec.recorded()] == [OutcomeKind.SUCCESS]


# ---------------------------------------------------------------------------------- whole JSON bodies

JSON_HEADERS = {"content-type": "application/json"}


@pytest.mark.anyio
async def test_a_json_body_cut_mid_way_is_retried_on_another_key(clock: FakeClock) -> None:
    upstream = Upstream(2)
    half = json.dumps(CHAT).encode()[:20]
    upstream.behaviour["k0"] = lambda request: httpx2.Response(
        200, headers=JSON_HEADERS, stream=FailingAsyncStream(before=half)
    )
    pool = make_pool(clock, 2)
    async with async_openai(pool, upstream) as client:
        for _ in range(4):
            reply = await client.chat.completions.create(model="m", messages=MESSAGES)
            assert reply.choices[0].message.content == "hi"
    stats = {row["key_id"]: row for row in pool.stats(P)}
    assert stats["k0"]["total_failures"] == upstream.calls["k0"] >= 1
    assert stats["k1"]["total_successes"] == 4


def test_a_json_body_cut_mid_way_is_retried_on_another_key_sync(clock: FakeClock) -> None:
    upstream = Upstream(2)
    half = json.dumps(CHAT).encode()[:20]
    upstream.behaviour["k0"] = lambda request: httpx2.Response(
        200, headers=JSON_HEADERS, stream=FailingSyncStream(before=half)
    )
    pool = make_pool(clock, 2)
    with sync_openai(pool, upstream) as client:
        for _ in range(4):
            assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content
    assert pool.key_stats("k0", P)["total_failures"] == upstream.calls["k0"] >= 1


@pytest.mark.anyio
async def test_a_json_body_that_ends_early_counts_against_its_key(clock: FakeClock) -> None:
    upstream = Upstream(2)
    # A chunked body (no declared length) that ends cleanly before its document is closed.
    truncated = json.dumps(CHAT).encode()[:-7]
    upstream.behaviour["k0"] = lambda request: httpx2.Response(
        200, headers=JSON_HEADERS, stream=OneChunkAsyncStream(truncated)
    )
    pool = make_pool(clock, 2)
    async with async_openai(pool, upstream) as client:
        for _ in range(4):
            assert (await client.chat.completions.create(model="m", messages=MESSAGES)).choices
    assert pool.key_stats("k0", P)["total_failures"] == upstream.calls["k0"] >= 1
    assert pool.key_stats("k0", P)["total_successes"] == 0


@pytest.mark.anyio
async def test_a_whole_json_body_is_recorded_before_the_caller_reads_it(clock: FakeClock) -> None:
    rec = Recorder()
    pool = make_pool(clock, 1, hooks=(rec,))
    async with async_openai(pool, Upstream(1)) as client:
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        assert [e.outcome for e in rec.recorded()] == [OutcomeKind.SUCCESS]  # before parse()
        assert raw.parse().choices[0].message.content == "hi"
    assert pool.capacity(P).in_flight == 0


@pytest.mark.anyio
async def test_an_empty_json_body_is_retried_on_another_key(clock: FakeClock) -> None:
    upstream = Upstream(2)
    upstream.behaviour["k0"] = lambda request: httpx2.Response(
        200, headers=JSON_HEADERS, stream=OneChunkAsyncStream(b"")
    )
    pool = make_pool(clock, 2)
    async with async_openai(pool, upstream) as client:
        for _ in range(3):
            assert (await client.chat.completions.create(model="m", messages=MESSAGES)).choices
    assert pool.key_stats("k0", P)["total_successes"] == 0


@pytest.mark.anyio
async def test_an_event_stream_that_ends_at_once_without_its_terminator_fails_over(
    clock: FakeClock,
) -> None:
    upstream = Upstream(2)
    upstream.behaviour["k0"] = event_stream(lambda: OneChunkAsyncStream(b""))
    pool = make_pool(clock, 2)
    async with async_openai(pool, upstream, sse_terminator=b"[DONE]") as client:
        for _ in range(3):
            stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            got = [c async for c in stream]
            assert got  # always answered by the healthy key
    assert pool.key_stats("k0", P)["total_successes"] == 0
    assert pool.key_stats("k0", P)["total_failures"] == upstream.calls["k0"]


@pytest.mark.anyio
async def test_the_deadline_bounds_each_attempt_so_a_hung_key_fails_over(clock: FakeClock) -> None:
    # Real time here: the attempt limit is an anyio deadline around the send.
    upstream = Upstream(2)

    async def hang(request: httpx2.Request) -> httpx2.Response:
        await anyio.sleep(30)
        raise AssertionError("not reached")  # pragma: no cover

    upstream.behaviour["k0"] = hang
    pool = KeyPool(
        {
            "providers": [
                {"name": P, "keys": [{"secret": secret_of(f"k{i}"), "key_id": f"k{i}"} for i in range(2)]}
            ]
        }
    )
    async with async_openai(pool, upstream, attempt_timeout=0.2) as client:
        with anyio.fail_after(10):
            while not upstream.calls["k0"]:  # until the random pick has met the hung key
                assert (await client.chat.completions.create(model="m", messages=MESSAGES)).choices
    assert pool.key_stats("k0", P)["total_failures"] == upstream.calls["k0"] == 1


@pytest.mark.anyio
async def test_a_spent_request_budget_sends_nothing(clock: FakeClock) -> None:
    upstream = Upstream(4)
    upstream.default = status(503)
    pool = make_pool(clock, 4)
    async with async_openai(pool, upstream) as client:
        with request_budget(attempts=2):
            for _ in range(3):
                with pytest.raises((openai.APIStatusError, NoKeyAvailable)):
                    await client.models.list()
    assert sum(upstream.calls.values()) == 2


@pytest.mark.anyio
async def test_failover_that_runs_out_of_keys_is_not_a_rejection(clock: FakeClock) -> None:
    rec = Recorder()
    upstream = Upstream(2)
    upstream.default = status(503)
    pool = make_pool(clock, 2, hooks=(rec,))
    async with async_openai(pool, upstream) as client:
        with pytest.raises(openai.InternalServerError):
            await client.models.list()
    assert [e for e in rec.events if isinstance(e, CallRejected)] == []


@pytest.mark.anyio
async def test_ndjson_streams_are_streamed_not_buffered(clock: FakeClock) -> None:
    released = anyio.Event()

    class Gated(httpx2.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b'{"token": 0}\n'
            await released.wait()
            yield b'{"token": 1}\n'

    pool = make_pool(clock, 1)
    inner = httpx2.MockTransport(
        lambda request: httpx2.Response(200, headers={"content-type": "application/x-ndjson"}, stream=Gated())
    )
    async with (
        httpx2.AsyncClient(transport=KeyPoolTransport(pool, P, transport=inner)) as http,
        http.stream("GET", f"{BASE}/tokens") as response,
    ):
        lines = response.aiter_lines()
        with anyio.fail_after(5):
            assert await lines.__anext__() == '{"token": 0}'  # before the rest was sent
        released.set()
        assert [line async for line in lines] == ['{"token": 1}']


# ---------------------------------------------------------------------------------- review fixes


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("POST", lambda r: httpx2.Response(204)),
        ("POST", lambda r: httpx2.Response(202, headers={"content-type": "application/json"})),
        (
            "POST",
            lambda r: httpx2.Response(
                200, headers={"content-type": "application/json", "content-length": "0"}
            ),
        ),
        ("HEAD", lambda r: httpx2.Response(200, headers={"content-type": "application/json"})),
    ],
    ids=["204", "202-json-empty", "content-length-0", "head"],
)
async def test_a_2xx_that_needs_no_body_is_a_success(clock: FakeClock, method: str, answer: Handler) -> None:
    pool = make_pool(clock, 2)
    sent: list[str] = []

    def upstream(request: httpx2.Request) -> httpx2.Response:
        sent.append(request.headers["authorization"])
        return answer(request)  # type: ignore[no-any-return]

    transport = KeyPoolTransport(pool, P, transport=httpx2.MockTransport(upstream))
    async with httpx2.AsyncClient(transport=transport) as http:
        response = await http.request(method, f"{BASE}/mcp")
    assert 200 <= response.status_code < 300
    assert len(sent) == 1  # not retried on the other key
    assert [row["total_successes"] for row in pool.stats()].count(1) == 1
    assert all(row["failure_count"] == 0 for row in pool.stats())


class _OddStream:
    """A body that is neither an httpx2 byte stream kind this transport watches."""

    def __iter__(self) -> Any:
        yield b"{}"


@pytest.mark.anyio
async def test_a_body_that_is_not_an_async_byte_stream_leaks_no_lease(clock: FakeClock) -> None:
    pool = make_pool(clock, 1)

    class Odd(httpx2.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            return httpx2.Response(200, stream=_OddStream())  # type: ignore[arg-type]

    transport = KeyPoolTransport(pool, P, transport=Odd())
    response = await transport.handle_async_request(httpx2.Request("GET", f"{BASE}/models"))
    assert response.status_code == 200
    assert pool.capacity(P).in_flight == 0
    assert pool.stats()[0]["total_successes"] == 1


@pytest.mark.anyio
async def test_concurrent_requests_in_one_budget_never_overspend_it(clock: FakeClock) -> None:
    pool = make_pool(clock, 8)
    upstream = Upstream(8)
    upstream.default = status(503)
    async with async_openai(pool, upstream) as client:
        with request_budget(attempts=5, clock=clock) as budget:

            async def one() -> None:
                with pytest.raises((openai.APIError, NoKeyAvailable)):
                    await client.models.list()

            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(one)
    assert sum(upstream.calls.values()) == 5
    assert budget.attempts_left == 0
    assert budget.attempts_used == 5


@pytest.mark.anyio
async def test_a_replayable_multipart_body_is_sent_again_byte_for_byte(clock: FakeClock) -> None:
    pool = make_pool(clock, 2)
    bodies: list[bytes] = []

    def upstream(request: httpx2.Request) -> httpx2.Response:
        bodies.append(request.read())
        return httpx2.Response(503 if len(bodies) == 1 else 200, json={"id": "file-1"})

    transport = KeyPoolTransport(pool, P, transport=httpx2.MockTransport(upstream))
    async with httpx2.AsyncClient(transport=transport) as http:
        response = await http.post(
            f"{BASE}/files", files={"file": ("a.txt", b"hello world")}, data={"purpose": "x"}
        )
    assert response.status_code == 200
    assert len(bodies) == 2
    assert bodies[0] == bodies[1]
    assert b"hello world" in bodies[1]


@pytest.mark.anyio
async def test_a_timeout_at_the_callers_own_deadline_counts_against_no_key() -> None:
    secret = secret_of("k0")
    upstream = FakeUpstream([secret])
    upstream.set_fault(secret, Fault.hang())
    pool = KeyPool({"providers": [{"name": P, "keys": [{"secret": secret, "key_id": "k0"}]}]})
    with LoopbackServer(upstream, shutdown_timeout=0.2) as server:
        transport = KeyPoolTransport(pool, P)
        timeout = dict.fromkeys(("connect", "read", "write", "pool"), 0.3)
        request = httpx2.Request(
            "GET",
            f"{server.base_url}/models",
            extensions={"keypool": {"settings": CallSettings(headers_timeout=None)}, "timeout": timeout},
        )
        with pytest.raises(httpx2.ReadTimeout):
            await transport.handle_async_request(request)
        await transport.aclose()
    row = pool.stats()[0]
    # The caller's 0.3 s ran out while a key worked on it (no time-to-headers limit of its own
    # came first): nobody's failure.
    assert (row["failure_count"], row["total_failures"], row["in_flight"]) == (0, 0, 0)


@pytest.mark.anyio
async def test_a_retry_that_waited_with_its_key_left_out_then_looks_again_at_that_key(
    clock: FakeClock,
) -> None:
    """One key, threshold 1: the first 503 trips the key and the provider. After the client's
    backoff the retry leaves the failed key out, waits for the provider's recovery (0.5 s after
    the trip), finds no other key then, and tries the same key again (its trial): served."""
    rec = Recorder()
    keys = [{"secret": secret_of("k0"), "key_id": "k0"}]
    breaker = {"failure_threshold": 1, "timeout": 0.5, "max_timeout": 0.5, "success_threshold": 1}
    pool = KeyPool({"providers": [{"name": P, "keys": keys, "breaker": breaker}]}, clock=clock, hooks=(rec,))
    upstream = Upstream(1)
    answers = iter([status(503), ok])
    upstream.default = lambda request: next(answers)(request)
    async with async_openai(pool, upstream, timeout=5) as client:
        await client.models.list()
    assert [(e.outcome, e.trial) for e in rec.recorded()] == [
        (OutcomeKind.FAILURE, False),
        (OutcomeKind.SUCCESS, True),
    ]
    backoff, recovery = clock.slept
    assert 0.25 <= backoff <= 0.375
    assert backoff + recovery == pytest.approx(0.5)


@pytest.mark.anyio
async def test_a_guessed_recovery_is_waited_for_no_longer_than_the_clients_backoff(clock: FakeClock) -> None:
    """One key, a 429 without Retry-After (out for the default 1 s): moving on is free, but no
    other key serves; looking at the same key again costs a retry, whose backoff (0.25 to
    0.375 s) caps the wait for the guessed recovery. 1 s is longer: the 429 reaches the caller."""
    rec = Recorder()
    keys = [{"secret": secret_of("k0"), "key_id": "k0"}]
    breaker = {"default_retry_after": 1.0}
    pool = KeyPool({"providers": [{"name": P, "keys": keys, "breaker": breaker}]}, clock=clock, hooks=(rec,))
    upstream = Upstream(1)
    answers = iter([status(429), ok])
    upstream.default = lambda request: next(answers)(request)
    async with async_openai(pool, upstream, timeout=5) as client:
        with pytest.raises(openai.RateLimitError):
            await client.models.list()
    assert [e.outcome for e in rec.recorded()] == [OutcomeKind.THROTTLED]
    assert clock.slept == []
