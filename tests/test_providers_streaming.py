"""Streaming through the provider clients: what a broken, stalled or truncated stream means for a key.

Over a real socket (``LoopbackServer``) content reaches the caller while the body is still arriving,
so a break after the first content delta is not retried: with continuation off (these tests; see
``tests/test_streams.py`` for continuation) it raises ``keypool.StreamInterrupted``, while a break
before it fails over. In-process (``httpx2.ASGITransport``) bodies are buffered, so every cut lands
before the first byte and fails over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import httpx2
import openai
import pytest

from keypool import KeyPool, KeySpec, StreamInterrupted
from keypool.testing import FakeClock, FakeUpstream, Fault, KeyCounters, LoopbackServer
from providers import AsyncDeepSeek, AsyncPerplexity, AsyncPooledOpenAI, DeepSeek
from tests.upstreams import Swap, messages

SECRETS = {"alpha": "sk-stream-alpha-93e1f0aa", "bravo": "sk-stream-bravo-17c4d2bb"}
TEXT = "one two three four five six"
IDLE = 0.3  # stream_idle_timeout (and the sync client's headers_timeout) in the stall tests


@dataclass
class Received:
    """What the caller saw of one streamed request: the text before any error, and the error."""

    text: str
    error: BaseException | None


def sync_stream(client: openai.OpenAI, text: str) -> Received:
    parts: list[str] = []
    try:
        with client.chat.completions.create(model="deepseek-chat", messages=messages(text), stream=True) as s:
            for chunk in s:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
    except Exception as exc:
        return Received("".join(parts), exc)
    return Received("".join(parts), None)


async def async_stream(client: openai.AsyncOpenAI, text: str) -> Received:
    parts: list[str] = []
    try:
        async with await client.chat.completions.create(
            model="deepseek-chat", messages=messages(text), stream=True
        ) as s:
            async for chunk in s:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
    except Exception as exc:
        return Received("".join(parts), exc)
    return Received("".join(parts), None)


@dataclass
class Rig:
    kind: str
    upstream: FakeUpstream
    pool: KeyPool
    client: Any

    async def stream(self, text: str = TEXT, client: Any = None) -> Received:
        client = client if client is not None else self.client
        client = client.with_options(max_continuations=0)
        if isinstance(client, openai.OpenAI):
            return await anyio.to_thread.run_sync(partial(sync_stream, client, text))
        return await async_stream(client, text)

    def counters(self, key_id: str) -> KeyCounters:
        return self.upstream.counters(SECRETS[key_id])

    def stats(self, key_id: str) -> dict[str, Any]:
        return self.pool.key_stats(key_id, "deepseek")

    def totals(self) -> tuple[int, int]:
        rows = self.pool.stats("deepseek")
        return sum(r["total_successes"] for r in rows), sum(r["total_failures"] for r in rows)

    async def drive_until(self, key_id: str, done: Callable[[KeyCounters], bool]) -> int:
        for n in range(1, 201):
            got = await self.stream(f"{TEXT} {n}")
            assert got.error is None, got.error
            assert got.text == f"{TEXT} {n}"
            if done(self.counters(key_id)):
                return n
        raise AssertionError(f"{key_id} never reached the condition: {self.counters(key_id)}")


def make_pool() -> KeyPool:
    pool = KeyPool(clock=FakeClock(), seed=3)
    pool.add_provider({"name": "deepseek", "keys": [KeySpec(secret=s, key_id=k) for k, s in SECRETS.items()]})
    return pool


@pytest.fixture
async def make_rig(loopback: tuple[Swap, LoopbackServer]) -> AsyncIterator[Callable[..., Rig]]:
    swap, server = loopback
    made: list[Rig] = []

    def build(kind: str) -> Rig:
        upstream = FakeUpstream(SECRETS.values(), flavor="deepseek")
        pool = make_pool()
        client: Any
        if kind == "async-asgi":
            client = AsyncDeepSeek(
                pool=pool, base_url="http://deepseek.test", transport=httpx2.ASGITransport(app=upstream)
            )
        elif kind == "async-loopback":
            swap.app = upstream
            client = AsyncDeepSeek(pool=pool, base_url=server.base_url, stream_idle_timeout=IDLE)
        else:
            swap.app = upstream
            # The sync client has no idle timer of its own: the time-to-headers limit, which bounds
            # every read of an attempt, plays that part (a key, not the caller's deadline).
            client = DeepSeek(pool=pool, base_url=server.base_url, headers_timeout=IDLE)
        rig = Rig(kind, upstream, pool, client)
        made.append(rig)
        return rig

    yield build
    for rig in made:
        if isinstance(rig.client, openai.OpenAI):
            rig.client.close()
        else:
            await rig.client.close()


@pytest.fixture(params=["async-loopback", "sync-loopback"])
def rig(request: pytest.FixtureRequest, make_rig: Callable[..., Rig]) -> Rig:
    return make_rig(request.param)


async def eventually(check: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Whether ``check`` holds within ``timeout`` (for counters the server thread updates late)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await anyio.sleep(0.005)
    return True


def interrupted(error: BaseException | None) -> StreamInterrupted | None:
    seen = error
    while seen is not None:
        if isinstance(seen, StreamInterrupted):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@pytest.mark.anyio
async def test_clean_stream_records_success(rig: Rig) -> None:
    got = await rig.stream()
    assert (got.text, got.error) == (TEXT, None)
    assert rig.totals() == (1, 0)
    assert rig.upstream.total_requests() == 1
    served = [k for k in SECRETS if rig.counters(k).requests]
    assert len(served) == 1
    # The server counts a completed stream just after its last byte left: give it a moment.
    assert await eventually(lambda: rig.counters(served[0]).streams_completed == 1)
    assert rig.pool.capacity("deepseek").in_flight == 0


@pytest.mark.anyio
async def test_cut_before_the_first_byte_fails_over(rig: Rig) -> None:
    rig.upstream.set_fault(SECRETS["alpha"], Fault.cut_stream(after_chunks=0))
    sent = await rig.drive_until("alpha", lambda c: c.cut == 1)
    assert rig.stats("alpha")["failure_count"] == 1
    assert rig.counters("alpha").requests == 1
    assert await eventually(lambda: rig.counters("bravo").streams_completed == sent)
    assert rig.upstream.total_requests() == sent + 1  # exactly one extra attempt
    assert rig.totals() == (sent, 1)


@pytest.mark.anyio
async def test_cut_after_bytes_reached_the_caller_raises_and_is_not_retried(rig: Rig) -> None:
    rig.upstream.set_default_fault(Fault.cut_stream(after_chunks=3))
    got = await rig.stream()
    cause = interrupted(got.error)
    assert cause is not None, repr(got.error)
    assert got.text  # part of it arrived, not all
    assert TEXT.startswith(got.text)
    assert got.text != TEXT
    assert rig.upstream.total_requests() == 1  # no retry once content was delivered
    key_id = cause.key_id
    assert cause.provider == "deepseek"
    assert "not continued" in str(cause)
    assert cause.delivered == len(got.text)
    assert rig.stats(key_id)["failure_count"] == 1
    assert rig.counters(key_id).cut == 1
    assert rig.totals() == (0, 1)
    assert rig.pool.capacity("deepseek").in_flight == 0


@pytest.mark.anyio
async def test_stream_that_stalls_fails_clearly_and_counts_against_the_key(rig: Rig) -> None:
    rig.upstream.set_default_fault(Fault.stall(after_chunks=2))
    started = time.monotonic()
    got = await rig.stream()
    elapsed = time.monotonic() - started
    assert IDLE <= elapsed < IDLE + 2.0
    cause = interrupted(got.error)
    assert cause is not None, repr(got.error)
    assert f"stalled: no data for {IDLE} s" in str(cause)
    assert rig.upstream.total_requests() == 1
    assert rig.stats(cause.key_id)["failure_count"] == 1
    assert rig.counters(cause.key_id).stalled == 1
    assert rig.pool.capacity("deepseek").in_flight == 0


@pytest.mark.anyio
async def test_stall_before_the_first_byte_fails_over(rig: Rig) -> None:
    rig.upstream.set_fault(SECRETS["alpha"], Fault.stall(after_chunks=0))
    sent = await rig.drive_until("alpha", lambda c: c.stalled == 1)
    assert rig.stats("alpha")["failure_count"] == 1
    assert rig.upstream.total_requests() == sent + 1
    assert rig.totals() == (sent, 1)


@pytest.mark.anyio
async def test_every_key_stalling_before_the_first_byte_is_a_timeout_error(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig("async-loopback")
    rig.upstream.set_default_fault(Fault.stall(after_chunks=0))
    got = await rig.stream()
    assert isinstance(got.error, openai.APITimeoutError), repr(got.error)


@pytest.mark.anyio
async def test_every_key_stalling_before_the_first_byte_sync(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig("sync-loopback")
    rig.upstream.set_default_fault(Fault.stall(after_chunks=0))
    got = await rig.stream()
    assert isinstance(got.error, openai.APITimeoutError), repr(got.error)
    # Both keys tried once (the first stall beside a clean key is free), then max_retries=2 more
    # attempts after openai's own backoff, as the plain client would retry its one endpoint.
    assert rig.upstream.total_requests() == 4
    assert rig.totals() == (0, 4)


@pytest.mark.anyio
async def test_stream_without_done_after_a_finish_is_a_success_for_deepseek(rig: Rig) -> None:
    # Every chunk, finish_reason included, arrived; only [DONE] is missing: the plain client takes
    # that as the end, and so does the pool (it is no key's failure).
    rig.upstream.set_default_fault(Fault.no_done())
    got = await rig.stream()
    assert (got.text, got.error) == (TEXT, None)
    assert rig.upstream.total_requests() == 1
    assert rig.totals() == (1, 0)


@pytest.mark.anyio
async def test_stream_ending_without_a_finish_reason_is_a_failure(rig: Rig) -> None:
    rig.upstream.set_default_fault(Fault.cut_after_tokens(3, mode="truncate"))
    got = await rig.stream()
    cause = interrupted(got.error)
    assert cause is not None, repr(got.error)
    assert "without a finish_reason" in str(cause)
    assert TEXT.startswith(got.text)
    assert got.text != TEXT
    assert rig.upstream.total_requests() == 1
    assert rig.stats(cause.key_id)["failure_count"] == 1
    assert rig.totals() == (0, 1)


@pytest.mark.anyio
async def test_stream_without_done_is_fine_for_perplexity(loopback: tuple[Swap, LoopbackServer]) -> None:
    swap, server = loopback
    upstream = FakeUpstream(SECRETS.values(), flavor="perplexity")
    upstream.set_default_fault(Fault.cut_stream(after_chunks=1000, mode="truncate"))
    swap.app = upstream
    async with AsyncPerplexity(api_keys=list(SECRETS.values()), base_url=server.base_url) as client:
        got = await async_stream(client, TEXT)
        assert (got.text, got.error) == (TEXT, None)
        rows = client.pool.stats("perplexity")
        assert sum(r["total_successes"] for r in rows) == 1
        assert sum(r["total_failures"] for r in rows) == 0


@pytest.mark.anyio
async def test_caller_closing_a_stream_early_blames_nobody(rig: Rig) -> None:
    def sync_first(client: openai.OpenAI) -> str:
        with client.chat.completions.create(model="deepseek-chat", messages=messages(TEXT), stream=True) as s:
            return next(iter(s)).id

    async def async_first(client: openai.AsyncOpenAI) -> str:
        async with await client.chat.completions.create(
            model="deepseek-chat", messages=messages(TEXT), stream=True
        ) as s:
            async for chunk in s:
                return chunk.id
        raise AssertionError("no chunk")

    if isinstance(rig.client, openai.OpenAI):
        first = await anyio.to_thread.run_sync(sync_first, rig.client)
    else:
        first = await async_first(rig.client)
    assert first.startswith("chatcmpl-fake-")
    assert rig.totals() == (0, 0)
    assert rig.pool.capacity("deepseek").in_flight == 0
    assert all(s["trials_in_flight"] == 0 for s in rig.pool.stats("deepseek"))


@pytest.mark.anyio
async def test_in_process_cut_lands_before_the_first_byte_and_fails_over(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig("async-asgi")
    rig.upstream.set_fault(SECRETS["alpha"], Fault.cut_stream(after_chunks=3))
    sent = await rig.drive_until("alpha", lambda c: c.cut == 1)
    assert rig.stats("alpha")["failure_count"] == 1
    assert rig.upstream.total_requests() == sent + 1


@pytest.mark.anyio
async def test_streamed_responses_api_ends_cleanly_without_done(
    loopback: tuple[Swap, LoopbackServer],
) -> None:
    swap, server = loopback
    upstream = FakeUpstream(SECRETS.values())
    swap.app = upstream
    async with AsyncPooledOpenAI(
        api_keys=list(SECRETS.values()), base_url=f"{server.base_url}/v1", provider="openai"
    ) as client:
        async with await client.responses.create(model="gpt-4o-mini", input=TEXT, stream=True) as events:
            kinds = [e.type async for e in events]
        assert kinds[-1] == "response.completed"
        rows = client.pool.stats("openai")
        assert (sum(r["total_successes"] for r in rows), sum(r["total_failures"] for r in rows)) == (1, 0)
        # A chat stream on the same client still needs its finish_reason.
        upstream.set_default_fault(Fault.cut_after_tokens(3, mode="truncate"))
        got = await async_stream(client, TEXT)
        assert interrupted(got.error) is not None


@pytest.mark.anyio
async def test_streams_that_succeed_reset_the_failure_count(rig: Rig) -> None:
    """Six failures, each followed by a clean stream on the same key: never five in a row, no trip."""
    rig.upstream.set_fault(SECRETS["alpha"], Fault.sequence(*[Fault.status(503), Fault.ok()] * 6))
    await rig.drive_until("alpha", lambda c: c.requests == 12)
    stats = rig.stats("alpha")
    assert (stats["state"], stats["trips"], stats["total_failures"]) == ("closed", 0, 6)
    assert stats["total_successes"] == 6
    assert stats["failure_count"] == 0


@pytest.mark.anyio
async def test_no_secret_in_stream_errors_or_logs(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    for fault in (Fault.cut_stream(after_chunks=2), Fault.cut_after_tokens(3, mode="truncate")):
        rig.upstream.set_default_fault(fault)
        got = await rig.stream()
        assert got.error is not None
        seen: BaseException | None = got.error
        while seen is not None:
            texts += [str(seen), repr(seen)]
            seen = seen.__cause__ or seen.__context__
    blob = "\n".join([*texts, caplog.text, repr(rig.client), repr(rig.pool.stats())])
    for secret in SECRETS.values():
        assert secret not in blob
