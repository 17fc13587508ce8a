"""Provider outages seen as one, retry discipline between attempts, and ``UnifiedAgent`` streaming.

Each scenario is a fault class that a gateway comparison scripts: a provider down for a minute, a
silent provider, persistent 429s without ``Retry-After``, 429s on keys that share one account,
and a request too long for the model. DeepSeek and Perplexity are two ``FakeUpstream`` apps under
real ``AsyncDeepSeek`` / ``AsyncPerplexity`` clients; where time matters they run in-process on a
``FakeClock`` (the upstreams counting every attempt), the silent provider on loopback in real time.
Every scenario runs both ways: ``chat()`` and ``chat(stream=True)``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx2
import openai
import pytest
from pydantic import SecretStr

from keypool import BreakerConfig, KeyPool, KeySpec, StreamInterrupted
from keypool.testing import FakeClock, FakeUpstream, Fault, LoopbackServer
from providers import AsyncDeepSeek, AsyncPerplexity
from providers.unified import AgentResponse, AgentStream, ChatRoute, UnifiedAgent

pytestmark = pytest.mark.anyio

DEEPSEEK = {f"ds-{i}": f"sk-route-ds-{i}-5f0c2a" for i in range(1, 7)}
PERPLEXITY = {f"px-{i}": f"pplx-route-{i}-0e9b71" for i in range(1, 4)}
MODELS = {"deepseek-chat": "sonar"}
BOTH_WAYS = pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])

Scope = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


def messages(text: str = "hello") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@dataclass
class Rig:
    clock: FakeClock
    pool: KeyPool
    ds: FakeUpstream
    px: FakeUpstream
    deepseek: AsyncDeepSeek
    perplexity: AsyncPerplexity

    def agent(self, **options: Any) -> UnifiedAgent:
        routes = [ChatRoute(self.deepseek), ChatRoute(self.perplexity, models=MODELS)]
        return UnifiedAgent(routes, **options)

    async def ask(self, agent: UnifiedAgent, text: str, stream: bool) -> tuple[str, str, str]:
        """One call: (provider, model, the assembled answer) whichever way it was made."""
        if not stream:
            answer = await agent.chat(model="deepseek-chat", messages=messages(text), priority="critical")
            assert isinstance(answer, AgentResponse)
            return answer.provider, answer.model, answer.response.choices[0].message.content or ""
        async with await agent.chat(
            model="deepseek-chat", messages=messages(text), priority="critical", stream=True
        ) as streamed:
            assert isinstance(streamed, AgentStream)
            parts = [c.choices[0].delta.content or "" async for c in streamed if c.choices]
            return streamed.provider, streamed.model, "".join(parts)


def build(
    *,
    breaker: BreakerConfig | None = None,
    account: str | None = None,
    shared_endpoint: bool = True,
    ds_app: Callable[[FakeUpstream], Any] = lambda app: app,
) -> Rig:
    clock = FakeClock()
    pool = KeyPool(clock=clock, seed=7)
    for name, keys in (("deepseek", DEEPSEEK), ("perplexity", PERPLEXITY)):
        specs = [
            KeySpec(secret=SecretStr(s), key_id=k, account=account if name == "deepseek" else None)
            for k, s in keys.items()
        ]
        pool.add_provider(
            {
                "name": name,
                "keys": specs,
                "breaker": breaker or BreakerConfig(),
                "shared_endpoint": shared_endpoint,
            }
        )
    ds = FakeUpstream(DEEPSEEK.values(), flavor="deepseek")
    px = FakeUpstream(PERPLEXITY.values(), flavor="perplexity")
    deepseek = AsyncDeepSeek(
        pool=pool, base_url="http://deepseek.test", transport=httpx2.ASGITransport(app=ds_app(ds))
    )
    perplexity = AsyncPerplexity(
        pool=pool, base_url="http://perplexity.test", transport=httpx2.ASGITransport(app=px)
    )
    return Rig(clock, pool, ds, px, deepseek, perplexity)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    built = build()
    try:
        yield built
    finally:
        await built.deepseek.close()
        await built.perplexity.close()


# -- a provider down for a minute -----------------------------------------------------------------


@BOTH_WAYS
async def test_a_provider_down_for_a_minute_is_served_by_the_fallback_and_gets_its_traffic_back(
    stream: bool,
) -> None:
    """DeepSeek answers 503 for 60 s, then heals; 20 requests, 4 s apart. The provider is seen as
    down after about ``failure_threshold`` failures in total (not five per key), every request is
    answered (by Perplexity meanwhile), the primary is probed with at most ``half_open_max_calls``
    trials per probe, and serves again within one breaker timeout of its recovery."""
    timeout = 20.0
    rig = build(breaker=BreakerConfig(timeout=timeout))
    agent = rig.agent()
    rig.ds.set_default_fault(Fault.status(503))
    served: list[tuple[float, str]] = []
    primary_attempts_in_outage = 0
    try:
        for i in range(20):
            now = rig.clock.now() - 1000.0  # the FakeClock starts at 1000
            if now >= 60.0:
                rig.ds.clear_faults()
            before = rig.ds.total_requests()
            provider, _, text = await rig.ask(agent, f"request {i}", stream)
            sent = rig.ds.total_requests() - before
            assert text == f"request {i}"  # every request answered, whole
            assert sent <= BreakerConfig().half_open_max_calls  # a probe is bounded
            if now < 60.0:
                primary_attempts_in_outage += sent
            served.append((now, provider))
            rig.clock.advance(4.0 - (rig.clock.now() - 1000.0 - now))
    finally:
        await rig.deepseek.close()
        await rig.perplexity.close()
    back_at = next((t for t, p in served if t >= 60.0 and p == "deepseek"), None)
    print(
        f"\nDeepSeek down 60 s ({'stream' if stream else 'whole'}): {primary_attempts_in_outage} primary"
        f" attempts over {sum(t < 60.0 for t, _ in served)} requests while down; serving again at"
        f" t={back_at} s"
    )
    while_down = [p for t, p in served if t < 60.0]
    assert set(while_down[1:]) == {"perplexity"}
    # Recognised as one outage: about failure_threshold failed attempts, then only trials.
    trips = BreakerConfig().failure_threshold
    assert primary_attempts_in_outage <= trips + int(60.0 // timeout) * BreakerConfig().half_open_max_calls
    back = [t for t, p in served if t >= 60.0 and p == "deepseek"]
    assert back, f"DeepSeek never served again after healing: {served}"
    assert back[0] <= 60.0 + timeout + 4.0  # within one timeout of its recovery (plus one tick)
    assert all(p == "deepseek" for t, p in served if t > back[0])  # and keeps its traffic


async def test_per_key_only_a_dead_provider_costs_far_more_attempts() -> None:
    """The same outage with the provider's own view off (keys as separate endpoints): each key
    needs its own five failures. The provider view is what makes the difference."""
    attempts = {}
    for shared in (True, False):
        rig = build(shared_endpoint=shared)
        rig.ds.set_default_fault(Fault.status(503))
        agent = rig.agent()
        try:
            for i in range(15):
                await rig.ask(agent, f"r{i}", stream=False)
        finally:
            await rig.deepseek.close()
            await rig.perplexity.close()
        attempts[shared] = rig.ds.total_requests()
    assert attempts[True] <= BreakerConfig().failure_threshold + 1
    assert attempts[False] > 2 * attempts[True]


# -- a silent provider ------------------------------------------------------------------------------


@BOTH_WAYS
async def test_a_silent_primary_is_left_after_one_attempt_and_the_fallback_answers(stream: bool) -> None:
    ds = FakeUpstream(DEEPSEEK.values(), flavor="deepseek")
    ds.set_default_fault(Fault.hang())
    px = FakeUpstream(PERPLEXITY.values(), flavor="perplexity")
    pool = KeyPool.from_keys("deepseek", list(DEEPSEEK.values()))
    pool.add_provider({"name": "perplexity", "keys": [{"secret": s} for s in PERPLEXITY.values()]})
    async with LoopbackServer(ds) as ds_server, LoopbackServer(px) as px_server:
        deepseek = AsyncDeepSeek(pool=pool, base_url=ds_server.base_url, headers_timeout=0.3)
        perplexity = AsyncPerplexity(pool=pool, base_url=px_server.base_url)
        agent = UnifiedAgent([ChatRoute(deepseek), ChatRoute(perplexity, models=MODELS)], timeout=30)
        try:
            if stream:
                async with await agent.chat(
                    model="deepseek-chat", messages=messages("quiet?"), stream=True
                ) as streamed:
                    text = "".join([c.choices[0].delta.content or "" async for c in streamed if c.choices])
                    provider = streamed.provider
            else:
                answer = await agent.chat(model="deepseek-chat", messages=messages("quiet?"))
                provider, text = answer.provider, answer.response.choices[0].message.content or ""
        finally:
            await deepseek.close()
            await perplexity.close()
    assert (provider, text) == ("perplexity", "quiet?")
    # One time-to-headers limit, not one per key: a silent provider is not retried key after key.
    assert ds.total_requests() == 1


# -- throttles ------------------------------------------------------------------------------------


async def test_persistent_429s_without_retry_after_are_spaced_like_openais_retries_then_give_up(
    rig: Rig,
) -> None:
    """The pooled client alone (no other route): a first 429 may be one key's, so the next key
    is tried at once; from the second in a row on, attempts are spaced by openai's own backoff
    and bounded by ``max_retries``, so the call gives up no later than the plain client would."""
    rig.ds.set_default_fault(Fault.rate_limited(None))
    with pytest.raises(openai.RateLimitError):
        await rig.deepseek.chat.completions.create(model="deepseek-chat", messages=messages())  # type: ignore[arg-type]
    assert rig.ds.total_requests() == 1 + 2 + 1  # one free move, then max_retries (2) more
    assert len(rig.clock.slept) == 2
    assert 0.25 <= rig.clock.slept[0] <= 0.375  # never longer than the plain client's shortest
    assert 0.5 <= rig.clock.slept[1] <= 0.75


@BOTH_WAYS
async def test_persistent_429s_move_the_agent_to_the_fallback_after_two(rig: Rig, stream: bool) -> None:
    rig.ds.set_default_fault(Fault.rate_limited(None))
    provider, model, text = await rig.ask(rig.agent(), "throttled", stream)
    assert (provider, model, text) == ("perplexity", "sonar", "throttled")
    assert rig.ds.total_requests() == 2
    assert rig.clock.slept == []  # no backoff spent on a provider that has a fallback


@BOTH_WAYS
async def test_a_429_on_one_key_of_an_account_benches_the_whole_account(stream: bool) -> None:
    rig = build(account="acct-1")
    rig.ds.set_default_fault(Fault.rate_limited(2.0))
    try:
        provider, _, _ = await rig.ask(rig.agent(), "shared limits", stream)
        assert provider == "perplexity"
        assert rig.ds.total_requests() == 1  # the account's limit: its other keys are not hammered
        cap = rig.pool.capacity("deepseek")
        assert [(a.name, a.keys, a.throttled) for a in cap.accounts] == [("acct-1", 6, 6)]
        assert cap.accounts[0].throttled_for == pytest.approx(2.0)
        assert cap.status == "down"
        rig.ds.clear_faults()
        rig.clock.advance(2.0)  # the Retry-After instant: the account is back, DeepSeek first again
        provider, _, _ = await rig.ask(rig.agent(), "again", stream)
        assert provider == "deepseek"
    finally:
        await rig.deepseek.close()
        await rig.perplexity.close()


# -- errors by class ------------------------------------------------------------------------------


def too_long_for(model: str) -> Callable[[FakeUpstream], Any]:
    """An upstream that answers ``model`` with OpenAI's context-length 400 (as servers do for a
    request larger than the model's window) and every other model as usual."""

    def wrap(app: FakeUpstream) -> Any:
        async def asgi(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
                await app(scope, receive, send)
                return
            body = b""
            more = True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
            if json.loads(body).get("model") == model:
                error = {
                    "error": {
                        "message": "This model's maximum context length is 65536 tokens.",
                        "type": "invalid_request_error",
                        "param": "messages",
                        "code": "context_length_exceeded",
                    }
                }
                payload = json.dumps(error).encode()
                headers = [(b"content-type", b"application/json")]
                await send({"type": "http.response.start", "status": 400, "headers": headers})
                await send({"type": "http.response.body", "body": payload})
                return
            sent = False

            async def replay() -> dict[str, Any]:
                nonlocal sent
                if sent:
                    return {"type": "http.disconnect"}
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            await app(scope, replay, send)

        return asgi

    return wrap


@BOTH_WAYS
async def test_a_request_too_long_for_the_model_goes_to_the_routes_larger_model(stream: bool) -> None:
    rig = build(ds_app=too_long_for("deepseek-chat"))
    routes = [
        ChatRoute(rig.deepseek, on_context_length="deepseek-reasoner"),
        ChatRoute(rig.perplexity, models=MODELS),
    ]
    try:
        provider, model, text = await rig.ask(UnifiedAgent(routes), "a long one", stream)
        assert (provider, model, text) == ("deepseek", "deepseek-reasoner", "a long one")
        # Without the fallback the 400 propagates unchanged: a caller's error is not retried.
        plain = UnifiedAgent([ChatRoute(rig.deepseek), ChatRoute(rig.perplexity, models=MODELS)])
        with pytest.raises(openai.BadRequestError) as info:
            await rig.ask(plain, "a long one", stream)
        assert info.value.code == "context_length_exceeded"
        assert rig.px.total_requests() == 0
        assert all(s["state"] == "closed" for s in rig.pool.stats("deepseek"))  # no key blamed
    finally:
        await rig.deepseek.close()
        await rig.perplexity.close()


@BOTH_WAYS
async def test_a_context_length_fallback_may_be_another_route(stream: bool) -> None:
    rig = build(ds_app=too_long_for("deepseek-chat"))
    larger = ChatRoute(rig.perplexity, models={"deepseek-chat": "sonar-pro"})
    agent = UnifiedAgent([ChatRoute(rig.deepseek, on_context_length=larger)])
    try:
        provider, model, _ = await rig.ask(agent, "longer still", stream)
    finally:
        await rig.deepseek.close()
        await rig.perplexity.close()
    assert (provider, model) == ("perplexity", "sonar-pro")


# -- streaming through the agent ------------------------------------------------------------------


async def test_an_agent_stream_behaves_like_the_openai_stream_and_reports_who_served(rig: Rig) -> None:
    rig.ds.set_default_fault(Fault.status(503))
    agent = rig.agent()
    streamed = await agent.chat(
        model="deepseek-chat",
        messages=messages("stream me"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in streamed]
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "stream me"
    assert (streamed.provider, streamed.model, streamed.fallbacks) == ("perplexity", "sonar", ("deepseek",))
    assert streamed.key_id in PERPLEXITY
    assert streamed.attempts == 3
    assert streamed.usage is not None
    assert streamed.usage.completion_tokens > 0
    await streamed.close()
    assert rig.pool.capacity("perplexity").in_flight == 0  # the lease is back


async def test_an_agent_stream_closed_early_gives_its_lease_back(rig: Rig) -> None:
    streamed = await rig.agent().chat(model="deepseek-chat", messages=messages("a b c d e f"), stream=True)
    await streamed.__anext__()
    await streamed.close()
    assert rig.pool.capacity("deepseek").in_flight == 0


async def test_a_stream_cut_before_any_content_fails_over_invisibly(rig: Rig) -> None:
    rig.ds.set_default_fault(Fault.cut_stream(after_chunks=1))  # the role chunk, then the cut
    provider, _, text = await rig.ask(rig.agent(), "after a cut", stream=True)
    assert (provider, text) == ("perplexity", "after a cut")


async def test_a_content_policy_rejection_propagates_at_once(rig: Rig) -> None:
    policy = Fault.status(400)
    rig.ds.set_default_fault(policy)
    with pytest.raises(openai.BadRequestError):
        await rig.ask(rig.agent(), "x", stream=True)
    assert rig.px.total_requests() == 0


async def test_a_healed_provider_gets_its_trials_first_even_while_the_fallback_is_healthy() -> None:
    rig = build(breaker=BreakerConfig(timeout=30.0))
    try:
        rig.pool.trip(provider="deepseek")  # every key open: DeepSeek goes behind Perplexity
        assert rig.pool.capacity("deepseek").status == "down"
        provider, _, _ = await rig.ask(rig.agent(), "while down", stream=False)
        assert provider == "perplexity"
        rig.clock.advance(31.0)  # half-open: a call now is a trial, and DeepSeek's recovery needs it
        cap = rig.pool.capacity("deepseek")
        assert cap.trial_ready
        assert cap.status != "healthy"
        provider, _, _ = await rig.ask(rig.agent(), "trial", stream=False)
        assert provider == "deepseek"
    finally:
        await rig.deepseek.close()
        await rig.perplexity.close()


# -- a stream broken after content, finished on another route -------------------------------------

ANSWER = "the quick brown fox jumps over the lazy dog and runs far away into the woods"


async def read_into(agent: UnifiedAgent, chunks: list[Any]) -> None:
    async with await agent.chat(model="deepseek-chat", messages=messages(ANSWER), stream=True) as streamed:
        async for chunk in streamed:
            chunks.append(chunk)


@asynccontextmanager
async def on_loopback() -> AsyncIterator[Rig]:
    """The rig with both upstreams on loopback ports, in real time: a stream cut mid-way is then
    cut on the wire (in-process, the ASGI transport reads a whole body before it answers)."""
    rig = build()
    async with LoopbackServer(rig.ds) as ds_server, LoopbackServer(rig.px) as px_server:
        rig.deepseek = AsyncDeepSeek(pool=rig.pool, base_url=ds_server.base_url)
        rig.perplexity = AsyncPerplexity(pool=rig.pool, base_url=px_server.base_url)
        try:
            yield rig
        finally:
            await rig.deepseek.close()
            await rig.perplexity.close()


async def agent_stream_text(agent: UnifiedAgent) -> tuple[AgentStream, list[Any]]:
    chunks: list[Any] = []
    async with await agent.chat(model="deepseek-chat", messages=messages(ANSWER), stream=True) as streamed:
        async for chunk in streamed:
            chunks.append(chunk)
    return streamed, chunks


async def test_a_stream_cut_after_content_is_finished_by_the_next_route_as_one_answer() -> None:
    async with on_loopback() as rig:
        rig.px.set_default_fault(Fault.cut_after_tokens(4))  # Perplexity takes no prefill
        agent = UnifiedAgent([ChatRoute(rig.perplexity, models=MODELS), ChatRoute(rig.deepseek)])
        streamed, chunks = await agent_stream_text(agent)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert {c.id for c in chunks} == {chunks[0].id}  # one answer, whoever wrote which part
    assert streamed.provider == "perplexity"
    assert streamed.continued_by == ["deepseek"]
    assert sum(rig.ds.counters(s).prefills for s in DEEPSEEK.values()) == 1


async def test_a_fallback_that_refuses_the_prefill_leaves_the_caller_the_original_break() -> None:
    chunks: list[Any] = []
    async with on_loopback() as rig:
        rig.px.set_default_fault(Fault.cut_after_tokens(4))
        rig.ds.set_default_fault(Fault.rejects_prefill())
        agent = UnifiedAgent([ChatRoute(rig.perplexity, models=MODELS), ChatRoute(rig.deepseek)])
        with pytest.raises(openai.APIConnectionError) as info:  # what the plain client raises
            await read_into(agent, chunks)
    assert not isinstance(info.value, openai.BadRequestError)  # never the prefill's 400
    assert isinstance(info.value, StreamInterrupted)
    assert info.value.provider == "perplexity"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert text != ANSWER  # the break is raised: a truncated answer never passes for complete
    assert all(s["state"] == "closed" for s in rig.pool.stats("deepseek"))  # the 400 blames no key


async def test_no_continuation_when_the_agent_allows_none() -> None:
    async with on_loopback() as rig:
        rig.px.set_default_fault(Fault.cut_after_tokens(4))
        agent = UnifiedAgent(
            [ChatRoute(rig.perplexity, models=MODELS), ChatRoute(rig.deepseek)], max_continuations=0
        )
        with pytest.raises(StreamInterrupted):
            await agent_stream_text(agent)
    assert rig.ds.total_requests() == 0


async def test_a_continuation_spends_the_calls_budget_and_none_is_made_once_it_is_spent() -> None:
    async with on_loopback() as rig:
        rig.px.set_default_fault(Fault.cut_after_tokens(4))
        routes = [ChatRoute(rig.perplexity, models=MODELS), ChatRoute(rig.deepseek)]
        with pytest.raises(StreamInterrupted):  # the one attempt went to the answer that broke
            await agent_stream_text(UnifiedAgent(routes, max_attempts=1))
        assert rig.ds.total_requests() == 0
        streamed, _ = await agent_stream_text(UnifiedAgent(routes, max_attempts=2))
        assert streamed.continued_by == ["deepseek"]  # the second attempt finished it
