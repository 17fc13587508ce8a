"""FakeUpstream and LoopbackServer, driven by the real openai clients.

In-process tests use ``httpx2.ASGITransport`` (it buffers whole bodies, so anything that depends on
timing inside a body - cut, stall, hang during shutdown - runs over a LoopbackServer instead).
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx2
import openai
import pytest
from openai.types import CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response

from keypool._fake_upstream import POISON_MODEL, FakeUpstream, Fault, KeyCounters
from keypool._loopback import DropConnection, LoopbackServer, serve_asgi

KEY_A = "sk-test-alpha-7f3a9c"
KEY_B = "sk-test-bravo-0b1e2d"
SECRETS = (KEY_A, KEY_B)
TEXT = "hello keypool world"
USER: Any = [{"role": "system", "content": "be brief"}, {"role": "user", "content": TEXT}]


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream(keys=SECRETS)


@pytest.fixture
def server(upstream: FakeUpstream) -> Iterator[LoopbackServer]:
    with LoopbackServer(upstream, shutdown_timeout=0.2) as running:
        yield running


@contextlib.asynccontextmanager
async def in_process(
    app: FakeUpstream, api_key: str = KEY_A, prefix: str = "/v1"
) -> AsyncIterator[openai.AsyncOpenAI]:
    async with (
        httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app)) as http,
        openai.AsyncOpenAI(
            base_url=f"http://upstream.test{prefix}",
            api_key=api_key,
            max_retries=0,
            http_client=http,
        ) as client,
    ):
        yield client


def over_loopback(server: LoopbackServer, api_key: str = KEY_A, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=api_key, max_retries=0, **kwargs)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# -- OpenAI-compatible answers ----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("prefix", ["/v1", ""])
async def test_chat_completion_parses_into_openai_types(upstream: FakeUpstream, prefix: str) -> None:
    async with in_process(upstream, prefix=prefix) as client:
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=USER)
    completion = raw.parse()
    assert isinstance(completion, ChatCompletion)
    ChatCompletion.model_validate(raw.http_response.json())  # strict shape check
    assert completion.choices[0].message.content == TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 3


@pytest.mark.anyio
async def test_stream_parses_into_chunks(upstream: FakeUpstream) -> None:
    async with in_process(upstream) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=USER,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert all(isinstance(chunk, ChatCompletionChunk) for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    counters = upstream.counters(KEY_A)
    assert (counters.streams_started, counters.streams_completed) == (1, 1)


def test_raw_event_stream_is_openai_shaped(server: LoopbackServer) -> None:
    body = {"model": "gpt-4o-mini", "messages": USER, "stream": True}
    with (
        httpx2.Client() as http,
        http.stream(
            "POST",
            f"{server.base_url}/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {KEY_A}"},
        ) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    for event in events[:-2]:
        assert event.startswith("data: ")
        ChatCompletionChunk.model_validate_json(event.removeprefix("data: "))


@pytest.mark.anyio
async def test_models_embeddings_and_responses(upstream: FakeUpstream) -> None:
    async with in_process(upstream) as client:
        models = await client.models.list()
        one = await client.models.retrieve("gpt-4o")
        floats = await client.embeddings.create(
            model="text-embedding-3-small", input=["a b", "c"], encoding_format="float"
        )
        b64 = await client.embeddings.create(model="text-embedding-3-small", input=["a b", "c"])
        wide = await client.embeddings.create(model="m", input="a", dimensions=32)
        response = await client.responses.create(model="gpt-4o-mini", input=TEXT)
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("no-such-model")
    assert [m.id for m in models.data] == ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
    assert all(isinstance(m, Model) for m in models.data)
    assert one.id == "gpt-4o"
    assert isinstance(floats, CreateEmbeddingResponse)
    assert len(floats.data) == 2
    assert len(floats.data[0].embedding) == 8
    assert len(wide.data[0].embedding) == 32
    # The SDK asks for base64 by default and decodes it: both encodings give the same vectors.
    assert [d.embedding for d in b64.data] == [d.embedding for d in floats.data]
    assert floats.data[0].embedding != floats.data[1].embedding
    assert floats.usage.prompt_tokens == 3
    assert isinstance(response, Response)
    assert response.output_text == TEXT
    assert response.usage is not None


@pytest.mark.anyio
async def test_responses_stream(upstream: FakeUpstream) -> None:
    async with in_process(upstream) as client:
        stream = await client.responses.create(
            model="gpt-4o-mini",
            input=[{"role": "user", "content": [{"type": "input_text", "text": TEXT}]}],
            stream=True,
        )
        events = [event async for event in stream]
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == TEXT
    assert [e.sequence_number for e in events] == list(range(len(events)))


@pytest.mark.anyio
async def test_deepseek_flavor(upstream: FakeUpstream) -> None:
    deepseek = FakeUpstream(keys=[KEY_A], flavor="deepseek")
    async with in_process(deepseek) as client:
        reasoner = await client.chat.completions.create(model="deepseek-reasoner", messages=USER)
        chat = await client.chat.completions.create(model="deepseek-chat", messages=USER)
        stream = await client.chat.completions.create(model="deepseek-reasoner", messages=USER, stream=True)
        chunks = [chunk async for chunk in stream]
        balance = await client.get("/user/balance", cast_to=httpx2.Response)
    message = reasoner.choices[0].message
    assert message.content == TEXT
    assert getattr(message, "reasoning_content", None) == f"The user wrote: {TEXT}"
    assert not hasattr(chat.choices[0].message, "reasoning_content")
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    assert streamed == f"The user wrote: {TEXT}"
    assert chunks[-1].usage is not None  # DeepSeek sends usage in its last chunk
    assert balance.json() == {
        "is_available": True,
        "balance_infos": [
            {
                "currency": "USD",
                "total_balance": "10.00",
                "granted_balance": "0.00",
                "topped_up_balance": "10.00",
            }
        ],
    }


@pytest.mark.anyio
async def test_perplexity_flavor() -> None:
    perplexity = FakeUpstream(keys=[KEY_A], flavor="perplexity")
    async with in_process(perplexity) as client:
        completion = await client.chat.completions.create(model="sonar", messages=USER)
        stream = await client.chat.completions.create(model="sonar", messages=USER, stream=True)
        chunks = [chunk async for chunk in stream]
        with pytest.raises(openai.NotFoundError):
            await client.models.list()
    extra = completion.model_extra or {}
    assert all(url.startswith("https://") for url in extra["citations"])
    assert {"title", "url", "date"} <= extra["search_results"][0].keys()
    assert (chunks[0].model_extra or {})["citations"] == extra["citations"]
    assert perplexity.counters(KEY_A).by_status == {200: 2, 404: 1}


# -- keys ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_unknown_or_missing_key_is_401(upstream: FakeUpstream) -> None:
    async with in_process(upstream, api_key="sk-not-known-5e5e") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.models.list()
        with pytest.raises(openai.AuthenticationError):
            await client.models.list(extra_headers={"Authorization": ""})
    assert caught.value.status_code == 401
    body = caught.value.response.json()
    assert set(body["error"]) >= {"message", "type", "code"}
    assert "sk-not-known" not in caught.value.response.text
    assert upstream.counters("sk-not-known-5e5e").by_status == {401: 1}
    assert upstream.counters(None).requests == 1
    assert upstream.counters(KEY_A) == KeyCounters()


@pytest.mark.anyio
async def test_other_auth_header_and_any_key() -> None:
    app = FakeUpstream(accept_any_key=True, auth_header="x-api-key")
    async with in_process(app, api_key="unused") as client:
        ok = await client.models.list(extra_headers={"x-api-key": "whatever-key"})
        assert ok.data
    assert app.counters("whatever-key").requests == 1
    strict = FakeUpstream(keys=[KEY_A])
    async with in_process(strict) as client:
        strict.remove_key(KEY_A)
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
        strict.add_key(KEY_A)
        await client.models.list()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        {"model": POISON_MODEL, "messages": USER},
        {"model": "gpt-4o-mini"},
        {"model": "gpt-4o-mini", "messages": []},
        {"messages": USER},
        "not json {",
    ],
)
async def test_bad_request_is_400_whatever_the_key(upstream: FakeUpstream, body: Any) -> None:
    upstream.set_fault(KEY_B, Fault.status(503))
    content = body if isinstance(body, str) else json.dumps(body)
    for key in SECRETS:
        async with in_process(upstream, api_key=key) as client:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.post(
                    "/chat/completions",
                    cast_to=ChatCompletion,
                    content=content.encode(),
                    options={"headers": {"content-type": "application/json"}},
                )
            assert caught.value.status_code == 400
            assert caught.value.response.json()["error"]["type"] == "invalid_request_error"
    assert upstream.counters(KEY_B).by_status == {400: 1}


# -- faults -------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fault", "error", "status"),
    [
        (Fault.status(503), openai.InternalServerError, 503),
        (Fault.status(500), openai.InternalServerError, 500),
        (Fault.status(408), openai.APIStatusError, 408),
        (Fault.rejected(), openai.AuthenticationError, 401),
        (Fault.forbidden(), openai.PermissionDeniedError, 403),
        (Fault.exhausted(), openai.APIStatusError, 402),
        (Fault.rate_limited(), openai.RateLimitError, 429),
    ],
)
async def test_status_faults(
    upstream: FakeUpstream, fault: Fault, error: type[openai.APIStatusError], status: int
) -> None:
    upstream.set_fault(KEY_A, fault)
    async with in_process(upstream) as client:
        with pytest.raises(error) as caught:
            await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert caught.value.status_code == status
    assert set(caught.value.response.json()["error"]) == {"message", "type", "param", "code"}
    async with in_process(upstream, api_key=KEY_B) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert upstream.counters(KEY_A).by_status == {status: 1}
    assert upstream.counters(KEY_B).by_status == {200: 1}


@pytest.mark.anyio
async def test_exhausted_is_deepseeks_insufficient_balance(upstream: FakeUpstream) -> None:
    upstream.set_fault(KEY_A, Fault.exhausted())
    async with in_process(upstream) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="deepseek-chat", messages=USER)
        balance = await client.get("/user/balance", cast_to=httpx2.Response)
    assert caught.value.status_code == 402
    assert caught.value.message.startswith("Error code: 402")
    assert caught.value.body == {
        "message": "Insufficient Balance",
        "type": "unknown_error",
        "param": None,
        "code": "invalid_request_error",
    }
    assert balance.json()["is_available"] is False


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("header", "retry_after", "name", "expected"),
    [
        ("retry-after", 30.0, "retry-after", "30"),
        ("retry-after", 2.5, "retry-after", "2.5"),
        ("retry-after-ms", 1.5, "retry-after-ms", "1500"),
        ("x-ratelimit-reset-requests", 90.0, "x-ratelimit-reset-requests", "1m30s"),
        ("x-ratelimit-reset-requests", 0.25, "x-ratelimit-reset-requests", "250ms"),
    ],
)
async def test_rate_limited_carries_its_header(
    upstream: FakeUpstream, header: Any, retry_after: float, name: str, expected: str
) -> None:
    upstream.set_fault(KEY_A, Fault.rate_limited(retry_after, header=header))
    async with in_process(upstream) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.models.list()
    assert caught.value.response.headers[name] == expected


@pytest.mark.anyio
async def test_rate_limited_as_http_date(upstream: FakeUpstream) -> None:
    upstream.set_fault(KEY_A, Fault.rate_limited(30, header="retry-after-date"))
    async with in_process(upstream) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.models.list()
    when = email.utils.parsedate_to_datetime(caught.value.response.headers["retry-after"])
    assert 25 < when.timestamp() - time.time() <= 32
    upstream.set_fault(KEY_A, Fault.rate_limited(None))
    async with in_process(upstream) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.models.list()
    assert "retry-after" not in caught.value.response.headers


@pytest.mark.anyio
async def test_slow_answers_after_the_delay(upstream: FakeUpstream) -> None:
    upstream.set_fault(KEY_A, Fault.slow(0.2))
    async with in_process(upstream) as client:
        started = time.monotonic()
        completion = await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert time.monotonic() - started >= 0.19
    assert completion.choices[0].message.content == TEXT


async def list_models(client: openai.AsyncOpenAI) -> None:
    await client.models.list()


@pytest.mark.anyio
async def test_hang_does_not_block_the_event_loop(upstream: FakeUpstream) -> None:
    upstream.set_fault(KEY_A, Fault.hang())
    async with (
        in_process(upstream, api_key=KEY_A) as hanging,
        in_process(upstream, api_key=KEY_B) as healthy,
    ):
        with anyio.move_on_after(0.3) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(list_models, hanging)
                await anyio.sleep(0.05)
                assert upstream.counters(KEY_A).in_flight == 1
                assert (await healthy.models.list()).data
        assert scope.cancelled_caught
    counters = upstream.counters(KEY_A)
    assert (counters.hangs, counters.in_flight, dict(counters.by_status)) == (1, 0, {})


def test_hang_until_the_client_gives_up(server: LoopbackServer, upstream: FakeUpstream) -> None:
    upstream.set_fault(KEY_A, Fault.hang())
    with (
        over_loopback(server, timeout=0.3) as client,
        pytest.raises(openai.APITimeoutError),
    ):
        client.models.list()
    wait_until(lambda: upstream.counters(KEY_A).in_flight == 0)
    assert upstream.counters(KEY_A).hangs == 1


def collect_stream(client: openai.OpenAI, received: list[ChatCompletionChunk]) -> None:
    for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True):
        received.append(chunk)


@pytest.mark.parametrize("streaming", [True, False])
def test_cut_abort_breaks_the_client(server: LoopbackServer, upstream: FakeUpstream, streaming: bool) -> None:
    upstream.set_fault(KEY_A, Fault.cut_stream(after_chunks=2))
    received: list[ChatCompletionChunk] = []
    with over_loopback(server) as client:
        call: Callable[[], object] = (
            (lambda: collect_stream(client, received))
            if streaming
            else (lambda: client.chat.completions.create(model="gpt-4o-mini", messages=USER))
        )
        with pytest.raises(openai.APIConnectionError) as caught:
            call()
    # The socket closed mid-body: httpx2 reports an incomplete chunked read.
    assert isinstance(caught.value.__cause__, httpx2.RemoteProtocolError)
    assert len(received) == (2 if streaming else 0)
    counters = upstream.counters(KEY_A)
    assert (counters.cut, counters.streams_completed) == (1, 0)
    assert counters.by_status == {200: 1}


@pytest.mark.anyio
async def test_cut_abort_in_process_raises_a_transport_error(upstream: FakeUpstream) -> None:
    upstream.set_fault(KEY_A, Fault.cut_stream(after_chunks=2))
    async with in_process(upstream) as client:
        with pytest.raises(openai.APIConnectionError) as caught:
            await client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True)
    assert isinstance(caught.value.__cause__, DropConnection)
    assert isinstance(caught.value.__cause__, httpx2.RemoteProtocolError)


def test_cut_truncate_ends_without_done(server: LoopbackServer, upstream: FakeUpstream) -> None:
    upstream.set_fault(KEY_A, Fault.cut_stream(after_chunks=3, mode="truncate"))
    with over_loopback(server) as client:
        # The openai SDK does not require [DONE]: a truncated stream just ends early.
        chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True))
    assert len(chunks) == 3
    assert all(c.choices[0].finish_reason is None for c in chunks)
    with (
        httpx2.Client() as http,
        http.stream(
            "POST",
            f"{server.base_url}/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": USER, "stream": True},
            headers={"authorization": f"Bearer {KEY_A}"},
        ) as response,
    ):
        raw = response.read()
    assert b"[DONE]" not in raw
    assert raw.count(b"data: ") == 3
    assert upstream.counters(KEY_A).cut == 2


def test_stall_is_seen_as_a_read_timeout(server: LoopbackServer, upstream: FakeUpstream) -> None:
    upstream.set_fault(KEY_A, Fault.stall(after_chunks=1))
    received: list[ChatCompletionChunk] = []
    timeout = httpx2.Timeout(5.0, read=0.3)
    with over_loopback(server, timeout=timeout) as client, pytest.raises(openai.APITimeoutError):
        collect_stream(client, received)
    assert len(received) == 1
    wait_until(lambda: upstream.counters(KEY_A).in_flight == 0)
    counters = upstream.counters(KEY_A)
    assert (counters.stalled, counters.streams_started, counters.streams_completed) == (1, 1, 0)


@pytest.mark.anyio
async def test_flaky_is_deterministic_with_a_seed() -> None:
    async def statuses_of(seed: int, key: str = KEY_A, default: bool = False) -> list[int]:
        app = FakeUpstream(keys=SECRETS)
        fault = Fault.flaky(0.5, Fault.status(503), seed=seed)
        if default:
            app.set_default_fault(fault)
        else:
            app.set_fault(key, fault)
        seen = []
        async with in_process(app, api_key=key) as client:
            for _ in range(40):
                try:
                    await client.models.list()
                    seen.append(200)
                except openai.InternalServerError:
                    seen.append(503)
        return seen

    first, again = await statuses_of(7), await statuses_of(7)
    assert first == again
    assert 5 < first.count(503) < 35
    assert await statuses_of(8) != first
    # Keys under one default fault draw independently, each reproducibly.
    assert await statuses_of(7, KEY_A, default=True) == await statuses_of(7, KEY_A, default=True)
    assert await statuses_of(7, KEY_A, default=True) != await statuses_of(7, KEY_B, default=True)


async def statuses(app: FakeUpstream, key: str, count: int) -> dict[int, int]:
    """Send ``count`` model listings with ``key``; return the statuses the upstream sent."""
    before = dict(app.counters(key).by_status)
    async with in_process(app, api_key=key) as client:
        for _ in range(count):
            with contextlib.suppress(openai.APIStatusError):
                await client.models.list()
    after = app.counters(key).by_status
    return {code: n - before.get(code, 0) for code, n in after.items() if n - before.get(code, 0)}


@pytest.mark.anyio
async def test_flaky_extremes(upstream: FakeUpstream) -> None:
    upstream.set_fault(KEY_A, Fault.flaky(1.0, Fault.rejected()))
    upstream.set_fault(KEY_B, Fault.flaky(0.0, Fault.rejected()))
    assert await statuses(upstream, KEY_A, 5) == {401: 5}
    assert await statuses(upstream, KEY_B, 5) == {200: 5}


@pytest.mark.anyio
async def test_sequence_per_key_and_default_precedence(upstream: FakeUpstream) -> None:
    upstream.set_default_fault(Fault.sequence(Fault.status(503), Fault.status(502)))
    upstream.set_fault(KEY_B, Fault.rejected())
    assert await statuses(upstream, KEY_A, 4) == {503: 1, 502: 1, 200: 2}
    assert await statuses(upstream, KEY_B, 2) == {401: 2}  # a key's own fault wins
    upstream.clear_fault(KEY_B)
    assert upstream.fault_of(KEY_B) == Fault.sequence(Fault.status(503), Fault.status(502))
    assert await statuses(upstream, KEY_B, 3) == {503: 1, 502: 1, 200: 1}  # its own cursor
    upstream.set_fault(KEY_A, Fault.sequence(Fault.hang(), then=Fault.status(500)))
    assert upstream.fault_of(KEY_A).inner == Fault.status(500)
    upstream.clear_faults()
    assert upstream.fault_of(KEY_A) == upstream.fault_of(KEY_B) == Fault.ok()
    assert await statuses(upstream, KEY_A, 2) == {200: 2}


# -- counters -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_counters_count_exactly(upstream: FakeUpstream) -> None:
    upstream.set_fault(KEY_B, Fault.status(503))
    async with in_process(upstream) as a, in_process(upstream, api_key=KEY_B) as b:
        for _ in range(3):
            await a.chat.completions.create(model="gpt-4o-mini", messages=USER)
        stream = await a.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True)
        async for _ in stream:
            pass
        await a.embeddings.create(model="m", input="x")
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                await b.models.list()
    a_counts = upstream.counters(KEY_A)
    assert a_counts.requests == 5
    assert a_counts.status(200) == 5
    assert a_counts.by_endpoint == {"/chat/completions": 4, "/embeddings": 1}
    assert (a_counts.streams_started, a_counts.streams_completed, a_counts.in_flight) == (1, 1, 0)
    assert upstream.counters(KEY_B).by_status == {503: 2}
    assert upstream.total_requests() == 7
    upstream.reset_counters()
    assert upstream.total_requests() == 0
    assert upstream.counters(KEY_A) == KeyCounters()


def test_faults_switch_safely_while_serving(server: LoopbackServer, upstream: FakeUpstream) -> None:
    stop = threading.Event()

    def toggle() -> None:
        faults = [Fault.ok(), Fault.status(503), Fault.rate_limited(1), Fault.flaky(0.5, Fault.status(500))]
        i = 0
        while not stop.is_set():
            upstream.set_fault(KEY_A, faults[i % len(faults)])
            upstream.set_default_fault(faults[(i + 1) % len(faults)])
            i += 1
            time.sleep(0.0005)

    toggler = threading.Thread(target=toggle)
    toggler.start()
    try:
        with over_loopback(server) as a, over_loopback(server, api_key=KEY_B) as b:
            for client in (a, b) * 30:
                with contextlib.suppress(openai.APIStatusError):
                    client.models.list()
    finally:
        stop.set()
        toggler.join()
    for key in SECRETS:
        counters = upstream.counters(key)
        assert counters.requests == 30 == sum(counters.by_status.values())
        assert set(counters.by_status) <= {200, 429, 500, 503}
    assert upstream.total_requests() == 60


# -- secrets --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_no_secret_in_any_response_or_repr(upstream: FakeUpstream) -> None:
    faults = [
        Fault.ok(),
        Fault.status(503),
        Fault.rejected(),
        Fault.forbidden(),
        Fault.exhausted(),
        Fault.rate_limited(3, header="x-ratelimit-reset-requests"),
        Fault.cut_stream(2, mode="truncate"),
    ]
    seen: list[str] = []
    bad_key = "sk-wrong-key-c0ffee"
    for key in (*SECRETS, bad_key):
        async with httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=upstream),
            base_url="http://upstream.test",
            headers={"authorization": f"Bearer {key}"},
        ) as http:
            for fault in faults:
                upstream.set_fault(key, fault)
                for method, path, body in [
                    ("POST", "/v1/chat/completions", {"model": "m", "messages": USER}),
                    ("POST", "/v1/chat/completions", {"model": "m", "messages": USER, "stream": True}),
                    ("POST", "/chat/completions", {"model": POISON_MODEL, "messages": USER}),
                    ("GET", "/v1/models", None),
                    ("POST", "/v1/embeddings", {"model": "m", "input": key}),
                    ("POST", "/v1/responses", {"model": "m", "input": "hi"}),
                    ("GET", "/user/balance", None),
                    ("GET", "/nowhere", None),
                ]:
                    response = await http.request(method, path, json=body)
                    seen.append(response.text)
                    seen.extend(f"{k}: {v}" for k, v in response.headers.items())
    seen += [repr(upstream), repr(upstream.counters(KEY_A)), *map(repr, faults)]
    with LoopbackServer(upstream) as server:
        seen.append(repr(server))
    for secret in (*SECRETS, bad_key):
        assert not [text for text in seen if secret in text]
    assert upstream.counters(bad_key).by_status == {401: len(faults) * 8}


# -- Fault values ---------------------------------------------------------------------------------


def test_fault_values_validate_and_read_well() -> None:
    assert repr(Fault.rejected()) == "Fault.rejected()"
    assert repr(Fault.status(503)) == "Fault.status(503)"
    assert repr(Fault.cut_stream(3)) == "Fault.cut_stream(after_chunks=3, mode='abort')"
    assert repr(Fault.flaky(0.25, Fault.hang(), seed=1)) == "Fault.flaky(0.25, Fault.hang(), seed=1)"
    assert Fault.status(503) == Fault.status(503)
    assert hash(Fault.stall(2)) == hash(Fault.stall(2))
    invalid: list[tuple[Callable[[], Fault], str]] = [
        (lambda: Fault.status(200), "4xx or 5xx"),
        (lambda: Fault.slow(-1), "delay"),
        (lambda: Fault.cut_stream(-1), "after_chunks"),
        (lambda: Fault.flaky(1.5, Fault.status(503)), "probability"),
        (lambda: Fault.flaky(0.5, Fault.flaky(0.5, Fault.status(503))), "simple fault"),
        (lambda: Fault.sequence(Fault.sequence()), "simple or flaky"),
        (lambda: Fault.rate_limited(float("nan")), "retry_after"),
    ]
    for build, message in invalid:
        with pytest.raises(ValueError, match=message):
            build()


# -- LoopbackServer -------------------------------------------------------------------------------


def test_stop_and_start_again_on_the_same_port(upstream: FakeUpstream) -> None:
    server = LoopbackServer(upstream, shutdown_timeout=0.2)
    with pytest.raises(RuntimeError):
        _ = server.base_url
    with server:
        url = server.base_url
        assert url.startswith("http://127.0.0.1:")
        with over_loopback(server) as client:
            assert client.models.list().data
    assert not server.running
    with over_loopback(server) as client, pytest.raises(openai.APIConnectionError):
        client.models.list()
    server.start()
    try:
        assert server.base_url == url
        with over_loopback(server) as client:
            assert client.models.list().data
            server.restart()
            assert server.base_url == url
            assert client.models.list().data  # the pooled connection was closed: a new one works
    finally:
        server.stop()
    server.stop()  # idempotent
    assert upstream.counters(KEY_A).requests == 3


def test_loopback_answers_without_nagle_delays(server: LoopbackServer) -> None:
    # Headers and body leave in separate writes; without TCP_NODELAY each answer waits ~40 ms.
    with over_loopback(server) as client:
        client.models.list()
        started = time.monotonic()
        for _ in range(50):
            client.models.list()
    assert time.monotonic() - started < 1.5


@pytest.mark.timeout(30)
def test_hang_does_not_block_shutdown(upstream: FakeUpstream, caplog: pytest.LogCaptureFixture) -> None:
    upstream.set_fault(KEY_A, Fault.hang())
    server = LoopbackServer(upstream, shutdown_timeout=0.2).start()
    errors: list[Exception] = []

    def call() -> None:
        with over_loopback(server, timeout=20.0) as client:
            try:
                client.models.list()
            except openai.APIError as exc:
                errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: upstream.counters(KEY_A).hangs == 1)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 3.0
    caller.join(5.0)
    assert not caller.is_alive()
    assert [type(e) for e in errors] == [openai.APIConnectionError]
    assert upstream.counters(KEY_A).in_flight == 0
    assert not [r for r in caplog.records if r.name.startswith("uvicorn")]


def test_serving_is_quiet(
    server: LoopbackServer, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream.set_fault(KEY_A, Fault.cut_stream(1))
    with over_loopback(server) as client:
        with pytest.raises(openai.APIConnectionError):
            list(client.chat.completions.create(model="m", messages=USER, stream=True))
        upstream.set_fault(KEY_A, Fault.ok())
        client.models.list()
    server.stop()
    assert not [r for r in caplog.records if r.name.startswith("uvicorn")]


@pytest.mark.anyio
async def test_async_context_manager(upstream: FakeUpstream) -> None:
    server = serve_asgi(upstream, shutdown_timeout=0.2)
    async with server, openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY_A, max_retries=0) as client:
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text == TEXT
        await server.astop()
        with pytest.raises(openai.APIConnectionError):
            await client.models.list()
        await server.astart()
        assert (await client.models.list()).data
    assert not server.running


def test_only_loopback_addresses(upstream: FakeUpstream) -> None:
    for host in ("0.0.0.0", "192.0.2.1", "example.com"):
        with pytest.raises(ValueError, match="loopback"):
            LoopbackServer(upstream, host=host)
    assert LoopbackServer(upstream, host="localhost").host == "127.0.0.1"
