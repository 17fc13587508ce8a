"""Streams that never lie, through real ``openai`` clients over loopback.

Every answer of the fake upstream echoes the prompt, a fixed canonical text: a truncated answer
can never pass for a complete one. Before the first content delta a break is invisible to the
caller (another key takes the call); after it, a chat answer is continued on another key with the
delivered text as a prefill and spliced into the stream the caller reads, or the caller gets the
break as a clean ``openai.APIError`` that is also a ``keypool.StreamInterrupted``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import httpx2
import openai
import pytest

from keypool import (
    CallSettings,
    ConfigError,
    EventScanner,
    KeyPool,
    KeySpec,
    Splice,
    StreamInterrupted,
    continuation_body,
    continuation_path,
    grammar_of,
)
from keypool.testing import FakeClock, FakeUpstream, Fault, LoopbackServer
from providers import AsyncDeepSeek, AsyncPerplexity, AsyncPooledOpenAI, DeepSeek
from tests.upstreams import Swap, messages

SECRETS = {"alpha": "sk-streams-alpha-5d0c7e11", "bravo": "sk-streams-bravo-a2f94b07"}
CANONICAL = "the quick brown fox jumps over the lazy dog and runs far away into the woods"
IDLE = 0.3


@dataclass
class Seen:
    """What the caller assembled from one stream: ids, models, text, usage, and any error."""

    text: str = ""
    ids: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    roles: int = 0
    finish: str | None = None
    usage: Any = None
    error: BaseException | None = None

    def take(self, chunk: Any) -> None:
        self.ids.add(chunk.id)
        self.models.add(chunk.model)
        if chunk.usage is not None:
            self.usage = chunk.usage
        for choice in chunk.choices:
            self.text += choice.delta.content or ""
            self.roles += choice.delta.role is not None
            self.finish = choice.finish_reason or self.finish


async def read_async(client: openai.AsyncOpenAI, model: str = "deepseek-chat", **extra: Any) -> Seen:
    seen = Seen()
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages(CANONICAL), stream=True, **extra
        )
        async with stream:
            async for chunk in stream:
                seen.take(chunk)
    except Exception as exc:
        seen.error = exc
    return seen


def read_sync(client: openai.OpenAI, model: str = "deepseek-chat") -> Seen:
    seen = Seen()
    try:
        with client.chat.completions.create(model=model, messages=messages(CANONICAL), stream=True) as s:
            for chunk in s:
                seen.take(chunk)
    except Exception as exc:
        seen.error = exc
    return seen


WEIGHTS = {"alpha": 1_000_000.0, "bravo": 1.0}  # alpha serves first, bravo is where calls go next


def make_pool(provider: str = "deepseek") -> KeyPool:
    pool = KeyPool(clock=FakeClock(), seed=5)
    keys = [KeySpec(secret=s, key_id=k, weight=WEIGHTS[k]) for k, s in SECRETS.items()]
    pool.add_provider({"name": provider, "keys": keys})
    return pool


def totals(pool: KeyPool, provider: str = "deepseek") -> tuple[int, int]:
    rows = pool.stats(provider)
    return sum(r["total_successes"] for r in rows), sum(r["total_failures"] for r in rows)


def interrupted(error: BaseException | None) -> StreamInterrupted | None:
    return error if isinstance(error, StreamInterrupted) else None


@pytest.fixture
def deepseek(loopback: tuple[Swap, LoopbackServer]) -> tuple[FakeUpstream, str]:
    swap, server = loopback
    upstream = FakeUpstream(SECRETS.values(), flavor="deepseek")
    swap.app = upstream
    return upstream, server.base_url


@pytest.fixture
async def client(deepseek: tuple[FakeUpstream, str]) -> AsyncIterator[AsyncDeepSeek]:
    _, url = deepseek
    async with AsyncDeepSeek(pool=make_pool(), base_url=url, stream_idle_timeout=IDLE) as made:
        yield made


def first_key_gets(upstream: FakeUpstream, fault: Fault) -> None:
    """Make the key the pool picks first (alpha) answer with ``fault``."""
    upstream.set_fault(SECRETS["alpha"], fault)


# ------------------------------------------------------------------ continuation


@pytest.mark.anyio
@pytest.mark.parametrize(
    "fault",
    [Fault.cut_after_tokens(4), Fault.stall_after_tokens(4), Fault.malformed_event(at=5)],
    ids=["cut", "stall", "malformed"],
)
async def test_a_broken_answer_is_finished_on_a_key_that_accepts_prefill(
    deepseek: tuple[FakeUpstream, str], client: AsyncDeepSeek, fault: Fault
) -> None:
    upstream, _ = deepseek
    upstream.set_fault(SECRETS["alpha"], fault)
    upstream.set_fault(SECRETS["bravo"], Fault.accepts_prefill())
    got = await read_async(client)
    assert got.error is None, repr(got.error)
    assert got.text == CANONICAL
    assert upstream.counters(SECRETS["alpha"]).requests == 1
    assert upstream.counters(SECRETS["bravo"]).prefills == 1
    assert len(got.ids) == 1
    assert len(got.models) == 1
    assert got.roles == 1
    assert got.finish == "stop"
    assert got.usage is not None
    assert got.usage.completion_tokens > 0
    assert client.pool.key_stats("alpha", "deepseek")["total_failures"] == 1


@pytest.mark.anyio
async def test_the_continuation_goes_to_deepseeks_beta_api_with_prefix(
    deepseek: tuple[FakeUpstream, str], client: AsyncDeepSeek
) -> None:
    upstream, _ = deepseek
    first_key_gets(upstream, Fault.cut_after_tokens(3))
    got = await read_async(client)
    assert (got.text, got.error) == (CANONICAL, None)
    served = sum(upstream.counters(s).prefills for s in SECRETS.values())
    assert served == 1  # the fake answers 400 unless the prefill is prefix=true on /beta


@pytest.mark.anyio
async def test_only_fallback_rejecting_prefill_gives_the_original_break(
    deepseek: tuple[FakeUpstream, str], client: AsyncDeepSeek
) -> None:
    upstream, _ = deepseek
    first_key_gets(upstream, Fault.cut_after_tokens(4))
    upstream.set_fault(SECRETS["bravo"], Fault.rejects_prefill())
    got = await read_async(client)
    cause = interrupted(got.error)
    assert isinstance(got.error, openai.APIError), repr(got.error)
    assert cause is not None
    assert not isinstance(got.error, openai.BadRequestError)  # never the prefill's 400
    message = str(got.error)
    assert "cut" in message
    assert "refused (HTTP 400)" in message
    assert f"{len(got.text)} characters of content delivered" in message
    assert cause.delivered == len(got.text)
    assert 0 < len(got.text) < len(CANONICAL)
    # The 400 counts against no key; the cut counts once.
    assert totals(client.pool)[1] == 1


@pytest.mark.anyio
async def test_continuations_are_bounded(deepseek: tuple[FakeUpstream, str], client: AsyncDeepSeek) -> None:
    upstream, _ = deepseek
    upstream.set_default_fault(Fault.cut_after_tokens(2))
    got = await read_async(client)
    cause = interrupted(got.error)
    assert cause is not None, repr(got.error)
    assert "no continuation left" in str(got.error)
    assert CANONICAL.startswith(got.text)
    assert got.text != CANONICAL
    assert upstream.total_requests() == 3  # the answer and max_continuations=2 continuations
    assert totals(client.pool) == (0, 3)


@pytest.mark.anyio
async def test_no_continuation_past_the_deadline(deepseek: tuple[FakeUpstream, str]) -> None:
    upstream, url = deepseek
    first_key_gets(upstream, Fault.stall_after_tokens(3))
    pool = make_pool()
    clock = pool.clock
    assert isinstance(clock, FakeClock)
    async with AsyncDeepSeek(pool=pool, base_url=url, stream_idle_timeout=IDLE, timeout=60.0) as ds:
        seen = Seen()
        stream = await ds.chat.completions.create(
            model="deepseek-chat", messages=messages(CANONICAL), stream=True
        )
        clock.advance(61.0)  # the call's deadline passes while the answer streams
        with pytest.raises(StreamInterrupted) as caught:
            await consume(stream, seen)
    assert "the call's deadline has passed" in str(caught.value)
    assert upstream.counters(SECRETS["bravo"]).requests == 0


async def consume(stream: Any, seen: Seen) -> None:
    async with stream:
        async for chunk in stream:
            seen.take(chunk)


@pytest.mark.anyio
async def test_no_continuation_without_prefill_is_a_clean_error(
    loopback: tuple[Swap, LoopbackServer],
) -> None:
    swap, server = loopback
    upstream = FakeUpstream(SECRETS.values(), flavor="perplexity")
    upstream.set_default_fault(Fault.cut_after_tokens(3))
    swap.app = upstream
    async with AsyncPerplexity(pool=make_pool("perplexity"), base_url=server.base_url) as pplx:
        got = await read_async(pplx, model="sonar")
    assert isinstance(got.error, openai.APIError)
    assert interrupted(got.error) is not None
    assert "the route takes no prefill" in str(got.error)
    assert upstream.total_requests() == 1


@pytest.mark.anyio
async def test_the_generic_client_continues_only_when_asked(loopback: tuple[Swap, LoopbackServer]) -> None:
    swap, server = loopback
    upstream = FakeUpstream(SECRETS.values())
    upstream.set_default_fault(Fault.sequence(Fault.cut_after_tokens(3)))
    swap.app = upstream
    async with AsyncPooledOpenAI(
        pool=make_pool("openai"), provider="openai", base_url=server.base_url
    ) as plain:
        off = await read_async(plain, model="gpt-4o-mini")
        assert interrupted(off.error) is not None
        on = await read_async(plain.with_options(prefill="assistant"), model="gpt-4o-mini")
        assert (on.text, on.error) == (CANONICAL, None)


@pytest.mark.anyio
async def test_an_in_band_error_after_content_is_continued(
    deepseek: tuple[FakeUpstream, str], client: AsyncDeepSeek
) -> None:
    upstream, _ = deepseek
    first_key_gets(upstream, Fault.error_event(at=4))
    got = await read_async(client)
    assert (got.text, got.error) == (CANONICAL, None)
    assert upstream.counters(SECRETS["bravo"]).prefills == 1
    assert client.pool.key_stats("alpha", "deepseek")["total_failures"] == 1


@pytest.mark.anyio
async def test_a_total_stream_limit_is_the_callers_own(deepseek: tuple[FakeUpstream, str]) -> None:
    upstream, url = deepseek
    upstream.set_default_fault(Fault.stall_after_tokens(3))
    async with AsyncDeepSeek(pool=make_pool(), base_url=url, stream_timeout=0.3) as ds:
        got = await read_async(ds)
        assert isinstance(got.error, openai.APITimeoutError), repr(got.error)
        assert "stream_timeout (0.3 s) reached" in str(got.error)
        assert "the caller's own limit" in str(got.error)
        assert upstream.total_requests() == 1  # not continued
        assert totals(ds.pool) == (0, 0)  # and no key is blamed


# ------------------------------------------------------------------ before the first content


@pytest.mark.anyio
async def test_keep_alives_then_a_cut_fail_over_invisibly(
    deepseek: tuple[FakeUpstream, str], client: AsyncDeepSeek
) -> None:
    upstream, _ = deepseek
    first_key_gets(upstream, Fault.keep_alive_then_cut(3))
    got = await read_async(client)
    assert (got.text, got.error) == (CANONICAL, None)
    assert upstream.total_requests() == 2
    assert sum(upstream.counters(s).prefills for s in SECRETS.values()) == 0  # a plain retry
    assert totals(client.pool) == (1, 1)


@pytest.mark.anyio
async def test_an_in_band_error_before_content_fails_over_invisibly(
    deepseek: tuple[FakeUpstream, str], client: AsyncDeepSeek
) -> None:
    upstream, _ = deepseek
    first_key_gets(upstream, Fault.error_event(at=1))
    got = await read_async(client)
    assert (got.text, got.error) == (CANONICAL, None)
    assert upstream.total_requests() == 2
    assert sum(upstream.counters(s).prefills for s in SECRETS.values()) == 0


@pytest.mark.anyio
async def test_a_first_token_limit_fails_over_a_queued_request(
    deepseek: tuple[FakeUpstream, str], client: AsyncDeepSeek
) -> None:
    upstream, _ = deepseek
    first_key_gets(upstream, Fault.keep_alive(30.0, interval=0.02))
    queued = client.with_options(first_token_timeout=0.3)
    got = await read_async(queued)
    assert (got.text, got.error) == (CANONICAL, None)
    assert upstream.counters(SECRETS["alpha"]).requests == 1
    assert client.pool.key_stats("alpha", "deepseek")["total_failures"] == 1
    assert client.pool.key_stats("bravo", "deepseek")["total_successes"] == 1


@pytest.mark.anyio
async def test_keep_alives_before_the_answer_are_not_content(
    deepseek: tuple[FakeUpstream, str], client: AsyncDeepSeek
) -> None:
    upstream, _ = deepseek
    upstream.set_default_fault(Fault.keep_alive(0.1, interval=0.02))
    got = await read_async(client)
    assert (got.text, got.error) == (CANONICAL, None)
    assert totals(client.pool) == (1, 0)


# ------------------------------------------------------------------ clean ends


@pytest.mark.anyio
async def test_no_done_after_a_finish_reason_is_a_success(
    deepseek: tuple[FakeUpstream, str], client: AsyncDeepSeek
) -> None:
    upstream, _ = deepseek
    upstream.set_default_fault(Fault.no_done())
    for _ in range(3):
        got = await read_async(client)
        assert (got.text, got.error, got.finish) == (CANONICAL, None, "stop")
    assert totals(client.pool) == (3, 0)


@pytest.mark.anyio
async def test_an_end_without_finish_reason_is_a_cut(deepseek: tuple[FakeUpstream, str]) -> None:
    upstream, url = deepseek
    upstream.set_default_fault(Fault.cut_after_tokens(3, mode="truncate"))
    async with AsyncDeepSeek(pool=make_pool(), base_url=url, max_continuations=0) as ds:
        got = await read_async(ds)
        assert interrupted(got.error) is not None
        assert "without a finish_reason" in str(got.error)
        assert totals(ds.pool) == (0, 1)


# ------------------------------------------------------------------ sync and raw responses


@pytest.mark.anyio
async def test_sync_client_continues_the_same_way(deepseek: tuple[FakeUpstream, str]) -> None:
    upstream, url = deepseek
    first_key_gets(upstream, Fault.cut_after_tokens(4))
    with DeepSeek(pool=make_pool(), base_url=url) as ds:
        got = await anyio.to_thread.run_sync(partial(read_sync, ds))
        assert (got.text, got.error) == (CANONICAL, None)
        assert len(got.ids) == 1
        upstream.set_fault(SECRETS["bravo"], Fault.rejects_prefill())
        bad = await anyio.to_thread.run_sync(partial(read_sync, ds))
        assert isinstance(bad.error, openai.APIError)
        assert interrupted(bad.error) is not None
        assert "refused (HTTP 400)" in str(bad.error)


@pytest.mark.anyio
@pytest.mark.parametrize("fault", [Fault.keep_alive_then_cut(3), Fault.keep_alive(30.0, interval=0.02)])
async def test_sync_client_fails_over_before_content(
    deepseek: tuple[FakeUpstream, str], fault: Fault
) -> None:
    upstream, url = deepseek
    first_key_gets(upstream, fault)
    with DeepSeek(pool=make_pool(), base_url=url, first_token_timeout=0.3) as ds:
        got = await anyio.to_thread.run_sync(partial(read_sync, ds))
        assert (got.text, got.error) == (CANONICAL, None)
        assert upstream.counters(SECRETS["alpha"]).requests == 1
        assert totals(ds.pool) == (1, 1)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "fault",
    [Fault.stall_after_tokens(4), Fault.malformed_event(at=5), Fault.error_event(at=5)],
    ids=["stall", "malformed", "error-event"],
)
async def test_sync_client_finishes_a_broken_answer(deepseek: tuple[FakeUpstream, str], fault: Fault) -> None:
    upstream, url = deepseek
    first_key_gets(upstream, fault)
    with DeepSeek(pool=make_pool(), base_url=url, stream_idle_timeout=IDLE) as ds:
        got = await anyio.to_thread.run_sync(partial(read_sync, ds))
        assert (got.text, got.error) == (CANONICAL, None)
        assert len(got.ids) == 1
        assert upstream.counters(SECRETS["bravo"]).prefills == 1


@pytest.mark.anyio
async def test_sync_client_takes_an_end_without_done(deepseek: tuple[FakeUpstream, str]) -> None:
    upstream, url = deepseek
    upstream.set_default_fault(Fault.no_done())
    with DeepSeek(pool=make_pool(), base_url=url) as ds:
        got = await anyio.to_thread.run_sync(partial(read_sync, ds))
        assert (got.text, got.error, got.finish) == (CANONICAL, None, "stop")
        assert totals(ds.pool) == (1, 0)


@pytest.mark.anyio
async def test_with_streaming_response_sees_one_answer(
    deepseek: tuple[FakeUpstream, str], client: AsyncDeepSeek
) -> None:
    upstream, _ = deepseek
    first_key_gets(upstream, Fault.cut_after_tokens(4))
    async with client.chat.completions.with_streaming_response.create(
        model="deepseek-chat", messages=messages(CANONICAL), stream=True
    ) as raw:
        lines = [line async for line in raw.iter_lines() if line.startswith("data: {")]
    chunks = [json.loads(line[6:]) for line in lines]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == CANONICAL
    assert len({c["id"] for c in chunks}) == 1


@pytest.mark.anyio
async def test_responses_stream_fails_over_before_content(loopback: tuple[Swap, LoopbackServer]) -> None:
    swap, server = loopback
    upstream = FakeUpstream(SECRETS.values())
    upstream.set_fault(SECRETS["alpha"], Fault.keep_alive_then_cut(2))
    swap.app = upstream
    async with AsyncPooledOpenAI(pool=make_pool("openai"), provider="openai", base_url=server.base_url) as c:
        async with await c.responses.create(model="gpt-4o-mini", input=CANONICAL, stream=True) as events:
            kinds = [e.type async for e in events]
        assert kinds[-1] == "response.completed"
        assert upstream.total_requests() == 2
        upstream.clear_faults()
        upstream.set_default_fault(Fault.cut_stream(after_chunks=4))
        with pytest.raises(openai.APIError) as caught:
            async with await c.responses.create(model="gpt-4o-mini", input=CANONICAL, stream=True) as events:
                [e.type async for e in events]
        assert isinstance(caught.value, StreamInterrupted)
        assert "only chat completions are continued" in str(caught.value)


# ------------------------------------------------------------------ side by side with the plain client


@pytest.mark.anyio
@pytest.mark.parametrize(
    "fault",
    [
        Fault.cut_after_tokens(3),
        Fault.stall_after_tokens(3),
        Fault.malformed_event(at=3),
        Fault.cut_after_tokens(3, mode="truncate"),
    ],
    ids=["cut", "stall", "malformed", "truncated"],
)
async def test_side_by_side_with_the_plain_client(deepseek: tuple[FakeUpstream, str], fault: Fault) -> None:
    """One broken stream that cannot be continued, read by the plain client and by keypool with
    the same stall limit: keypool stops at the same event (never later), and where the plain client
    raises an ``openai`` error keypool raises one of the same class. Where the plain client crashes
    (``JSONDecodeError``) or passes a truncated answer as complete, keypool raises a clean one."""
    upstream, url = deepseek
    upstream.set_default_fault(fault)
    timeout = httpx2.Timeout(IDLE, connect=5.0)
    async with openai.AsyncOpenAI(
        api_key=SECRETS["alpha"], base_url=url, max_retries=0, timeout=timeout
    ) as plain:
        theirs = await read_async(plain)
    async with AsyncDeepSeek(
        pool=make_pool(), base_url=url, stream_idle_timeout=IDLE, max_continuations=0
    ) as ds:
        ours = await read_async(ds)
    assert isinstance(ours.error, openai.APIError), repr(ours.error)
    assert interrupted(ours.error) is not None
    assert ours.text == theirs.text
    assert CANONICAL.startswith(ours.text)
    assert ours.text != CANONICAL
    if isinstance(theirs.error, openai.APIError):
        assert isinstance(ours.error, type(theirs.error)), (repr(theirs.error), repr(ours.error))


# ------------------------------------------------------------------ the pieces


def test_scanner_passes_only_whole_events_and_skips_keep_alives() -> None:
    scanner = EventScanner("chat")
    event = b'data: {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
    assert scanner.feed(b": keep-alive\n\n") == b": keep-alive\n\n"
    assert not scanner.progress
    assert scanner.feed(event[:10]) == b""
    assert scanner.feed(event[10:]) == event
    assert (scanner.progress, scanner.text, scanner.id) == (True, "hi", "c1")
    assert scanner.feed(b"data: {not json\n\n" + event) == b""
    assert scanner.broken is not None
    assert scanner.text == "hi"


def test_scanner_reads_crlf_and_multi_line_events() -> None:
    scanner = EventScanner("responses")
    out = scanner.feed(
        b'event: response.output_text.delta\r\ndata: {"type": "response.output_text.delta"}\r\n\r\n'
    )
    assert out
    assert scanner.progress
    scanner.feed(b'event: response.completed\ndata: {"type": "response.completed"}\n\n')
    assert scanner.finished


def test_a_tool_call_or_reasoning_is_not_continuable() -> None:
    tool = EventScanner("chat")
    tool.feed(
        b'data: {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "f"}}]}}]}\n\n'
    )
    assert tool.progress
    assert not tool.continuable
    thinking = EventScanner("chat")
    thinking.feed(b'data: {"choices": [{"delta": {"reasoning_content": "Hm"}}]}\n\n')
    assert thinking.progress
    assert not thinking.continuable


@pytest.mark.parametrize(
    ("name", "value"),
    [("first_token_timeout", 0), ("stream_timeout", -1.0), ("max_continuations", -1), ("prefill", "maybe")],
)
def test_stream_settings_are_checked(name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=name):
        CallSettings().merged({name: value})


def test_continuation_pieces_for_a_multi_route_caller() -> None:
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    cont = continuation_body(body, "Hel", "deepseek")
    assert cont["messages"][-1] == {"role": "assistant", "content": "Hel", "prefix": True}
    assert continuation_body(body, "Hel", "assistant")["messages"][-1] == {
        "role": "assistant",
        "content": "Hel",
    }
    assert continuation_path("/v1/chat/completions", "deepseek") == "/beta/chat/completions"
    assert continuation_path("/chat/completions", "deepseek") == "/beta/chat/completions"
    assert continuation_path("/v1/chat/completions", "assistant") == "/v1/chat/completions"
    assert grammar_of("/v1/chat/completions") == "chat"
    assert grammar_of("/v1/embeddings") is None
    scanner = EventScanner("chat")
    scanner.feed(
        b'data: {"id": "a", "model": "m", "created": 1, "choices": [{"delta": {"content": "Hel"}}]}\n\n'
    )
    scanner.restart(Splice.of(scanner))
    out = scanner.feed(
        b'data: {"id": "b", "model": "m2", "created": 2, "choices": '
        b'[{"delta": {"role": "assistant", "content": "lo"}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
    )
    first = json.loads(out.split(b"\n\n")[0][6:])
    assert (first["id"], first["model"], first["created"]) == ("a", "m", 1)
    assert "role" not in first["choices"][0]["delta"]
    assert out.endswith(b"data: [DONE]\n\n")
    assert (scanner.text, scanner.finished) == ("Hello", True)


_: Callable[..., Any] = read_sync


@pytest.mark.anyio
async def test_a_multi_route_caller_continues_on_another_route(loopback: tuple[Swap, LoopbackServer]) -> None:
    """Route A (no prefill) breaks after content; the caller finishes the answer on route B
    (DeepSeek) with ``client.continuation`` and ``Splice.chunk``: one answer, one id."""
    swap, server = loopback
    broken = FakeUpstream(SECRETS.values())
    broken.set_default_fault(Fault.cut_after_tokens(4))
    swap.app = broken
    deep = FakeUpstream(SECRETS.values(), flavor="deepseek")
    request = {"model": "deepseek-chat", "messages": messages(CANONICAL)}
    chunks: list[Any] = []

    async def read_a(a: AsyncPooledOpenAI) -> None:
        async with await a.chat.completions.create(**request, stream=True) as stream:
            async for chunk in stream:
                chunks.append(chunk)

    async with AsyncPooledOpenAI(pool=make_pool("openai"), provider="openai", base_url=server.base_url) as a:
        with pytest.raises(StreamInterrupted) as caught:
            await read_a(a)
    delivered = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert caught.value.delivered == len(delivered)
    with LoopbackServer(deep) as other:
        async with AsyncDeepSeek(pool=make_pool(), base_url=other.base_url) as b:
            client, kwargs = b.continuation(request, delivered)
            splice = Splice(chunks[0].id, chunks[0].model, chunks[0].created)
            async with await client.chat.completions.create(**kwargs, stream=True) as rest:
                async for chunk in rest:
                    chunks.append(splice.chunk(chunk))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == CANONICAL
    assert {c.id for c in chunks} == {chunks[0].id}
    assert sum(c.choices[0].delta.role is not None for c in chunks if c.choices) == 1
    assert deep.counters(SECRETS["alpha"]).prefills + deep.counters(SECRETS["bravo"]).prefills == 1


def test_a_route_without_prefill_says_so() -> None:
    client = AsyncPooledOpenAI(api_key="sk-x", base_url="http://127.0.0.1:9/v1", provider="openai")
    with pytest.raises(ConfigError, match="prefill"):
        client.continuation({"model": "m", "messages": messages("hi")}, "he")
    opted, kwargs = client.with_options(prefill="assistant").continuation(
        {"model": "m", "messages": messages("hi")}, "he"
    )
    assert kwargs["messages"][-1] == {"role": "assistant", "content": "he"}
    assert str(opted.base_url) == "http://127.0.0.1:9/v1/"
