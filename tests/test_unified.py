"""``providers.UnifiedAgent``: cross-provider fallback, one attempt budget, load shedding.

DeepSeek and Perplexity are two ``FakeUpstream`` apps served in-process
(``httpx2.ASGITransport``) under real ``AsyncDeepSeek`` / ``AsyncPerplexity`` clients that share
one ``KeyPool`` on a ``FakeClock``. Every upstream attempt is counted on the upstreams themselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from keypool import (
    BreakerConfig,
    CallRejected,
    Capacity,
    ConfigError,
    KeyPool,
    KeySpec,
    LoadShed,
    NoKeyAvailable,
    Outcome,
    OutcomeKind,
    PoolEvent,
)
from keypool.testing import FakeClock, FakeUpstream, Fault
from providers import AsyncDeepSeek, AsyncPerplexity
from providers.mcp import MCPClient, MCPEndpoint
from providers.unified import AgentResponse, ChatRoute, SheddingPolicy, UnifiedAgent
from tests.mcp_servers import McpReplica

pytestmark = pytest.mark.anyio

DEEPSEEK = {"ds-1": "sk-ds-one-4b1e0c", "ds-2": "sk-ds-two-9a7f31", "ds-3": "sk-ds-three-55d2e8"}
PERPLEXITY = {"px-1": "pplx-one-c03e9a", "px-2": "pplx-two-71bd44", "px-3": "pplx-three-e8a210"}
OPEN_TIMEOUT = 60.0
CITATIONS = ["https://example.com/source-1", "https://example.org/source-2"]
MODELS = {"deepseek-chat": "sonar", "deepseek-reasoner": "sonar-reasoning"}


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
    events: list[PoolEvent] = field(default_factory=list)

    def agent(self, **options: Any) -> UnifiedAgent:
        routes = [ChatRoute(self.deepseek), ChatRoute(self.perplexity, models=MODELS)]
        return UnifiedAgent(routes, **options)

    def total(self) -> int:
        return self.ds.total_requests() + self.px.total_requests()

    def per_key(self) -> dict[str, int]:
        out = {k: self.ds.counters(s).requests for k, s in DEEPSEEK.items()}
        out.update({k: self.px.counters(s).requests for k, s in PERPLEXITY.items()})
        return out

    def kill(self, provider: str, fault: Fault | None = None) -> None:
        (self.ds if provider == "deepseek" else self.px).set_default_fault(fault or Fault.status(503))

    def trip(self, *key_ids: str) -> None:
        for key_id in key_ids:
            self.pool.trip(key_id=key_id)

    def rejected(self, reason: str) -> list[CallRejected]:
        return [e for e in self.events if isinstance(e, CallRejected) and e.reason == reason]

    async def aclose(self) -> None:
        await self.deepseek.close()
        await self.perplexity.close()


def build_rig() -> Rig:
    clock = FakeClock()
    events: list[PoolEvent] = []
    pool = KeyPool(clock=clock, hooks=[events.append], seed=5)
    breaker = BreakerConfig(timeout=OPEN_TIMEOUT)
    for name, keys in (("deepseek", DEEPSEEK), ("perplexity", PERPLEXITY)):
        specs = [KeySpec(secret=SecretStr(s), key_id=k) for k, s in keys.items()]
        pool.add_provider({"name": name, "keys": specs, "breaker": breaker})
    ds = FakeUpstream(DEEPSEEK.values(), flavor="deepseek")
    px = FakeUpstream(PERPLEXITY.values(), flavor="perplexity")
    deepseek = AsyncDeepSeek(
        pool=pool, base_url="http://deepseek.test", transport=httpx2.ASGITransport(app=ds)
    )
    perplexity = AsyncPerplexity(
        pool=pool, base_url="http://perplexity.test", transport=httpx2.ASGITransport(app=px)
    )
    return Rig(clock, pool, ds, px, deepseek, perplexity, events)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    built = build_rig()
    try:
        yield built
    finally:
        await built.aclose()


# -- fallback -------------------------------------------------------------------------------------


async def test_a_healthy_first_provider_answers_with_its_own_model(rig: Rig) -> None:
    answer = await rig.agent().chat(model="deepseek-chat", messages=messages("hi there"))
    assert isinstance(answer, AgentResponse)
    assert (answer.provider, answer.model, answer.fallbacks, answer.attempts) == (
        "deepseek",
        "deepseek-chat",
        (),
        1,
    )
    assert answer.key_id in DEEPSEEK
    assert answer.response.choices[0].message.content == "hi there"
    assert (rig.ds.total_requests(), rig.px.total_requests()) == (1, 0)


async def test_deepseek_dead_the_same_call_is_answered_by_perplexity_with_the_mapped_model(rig: Rig) -> None:
    rig.kill("deepseek")
    agent = rig.agent()
    answer = await agent.chat(model="deepseek-chat", messages=messages("where from?"))
    assert answer.provider == "perplexity"
    assert answer.model == "sonar"
    assert answer.response.model == "sonar"  # what Perplexity was asked for
    assert answer.key_id in PERPLEXITY
    assert answer.fallbacks == ("deepseek",)
    # The first 503 may be the key's own: one more key; a second in a row is DeepSeek's, and the
    # call moves to the next route at once instead of trying every key of a dead provider.
    assert answer.attempts == 2 + 1
    assert answer.response.citations == CITATIONS  # type: ignore[attr-defined]
    assert answer.response.choices[0].message.content == "where from?"
    assert rig.ds.total_requests() == 2
    assert all(rig.ds.counters(s).requests <= 1 for s in DEEPSEEK.values())  # never a key twice
    assert rig.px.total_requests() == 1

    # Once DeepSeek's breakers are open it is skipped without a request, and the answer still
    # says that it came from the fallback.
    while rig.pool.capacity("deepseek").status != "down":
        await agent.chat(model="deepseek-chat", messages=messages(), priority="critical")
    before = rig.ds.total_requests()
    answer = await agent.chat(model="deepseek-chat", messages=messages(), priority="critical")
    assert (answer.provider, answer.model, answer.fallbacks) == ("perplexity", "sonar", ("deepseek",))
    assert answer.attempts == 1
    assert rig.ds.total_requests() == before


async def test_a_model_without_a_mapping_keeps_its_name(rig: Rig) -> None:
    rig.kill("deepseek")
    answer = await rig.agent().chat(model="sonar-pro", messages=messages())
    assert (answer.provider, answer.model, answer.response.model) == ("perplexity", "sonar-pro", "sonar-pro")


async def test_both_providers_dead_raise_no_key_available_with_retry_after(rig: Rig) -> None:
    rig.kill("deepseek")
    rig.kill("perplexity", Fault.status(502))
    agent = rig.agent(max_attempts=10)
    with pytest.raises(NoKeyAvailable) as first:
        await agent.chat(model="deepseek-chat", messages=messages())
    assert not isinstance(first.value, LoadShed)
    assert first.value.retry_after is not None
    assert first.value.retry_after > 0
    assert "deepseek" in first.value.provider
    assert "perplexity" in first.value.provider
    assert "InternalServerError" in str(first.value)
    # two failures in a row leave DeepSeek; Perplexity, the last route, gets its keys and retries
    assert rig.total() == 2 + 3
    # Keep calling until every breaker is open: then nothing is sent and the error says when.
    while any(rig.pool.capacity(p).status != "down" for p in ("deepseek", "perplexity")):
        with pytest.raises(NoKeyAvailable):
            await agent.chat(model="deepseek-chat", messages=messages(), priority="critical")
    sent = rig.total()
    # Down providers are still tried last, but the pool waits only for a recovery inside the
    # deadline: with none in sight nothing is sent, and the error says when to come back.
    quick = rig.agent(max_attempts=10, timeout=OPEN_TIMEOUT / 2)
    with pytest.raises(NoKeyAvailable) as info:
        await quick.chat(model="deepseek-chat", messages=messages(), priority="critical")
    assert info.value.retry_after == pytest.approx(OPEN_TIMEOUT, abs=1.0)
    assert rig.total() == sent


async def test_a_down_provider_is_still_tried_last_when_it_recovers_inside_max_wait(rig: Rig) -> None:
    for key_id in DEEPSEEK:  # DeepSeek throttled for 3 s: down, but back within max_wait (5 s)
        rig.pool.try_acquire("deepseek", exclude=set(DEEPSEEK) - {key_id}).record(
            Outcome(OutcomeKind.THROTTLED, 429, 3.0)
        )
    rig.kill("perplexity")
    assert rig.pool.capacity("deepseek").status == "down"
    answer = await rig.agent(timeout=OPEN_TIMEOUT * 2).chat(model="deepseek-chat", messages=messages())
    assert answer.provider == "deepseek"  # waited (on the fake clock) for the throttle to pass
    assert sum(rig.clock.slept) == pytest.approx(3.0)


async def test_a_down_provider_is_not_waited_for_beyond_max_wait(rig: Rig) -> None:
    rig.trip("ds-1", "ds-2", "ds-3")  # DeepSeek down, back in OPEN_TIMEOUT: far beyond max_wait
    rig.kill("perplexity")
    with pytest.raises(NoKeyAvailable) as info:
        await rig.agent(timeout=OPEN_TIMEOUT * 2).chat(model="deepseek-chat", messages=messages())
    assert info.value.retry_after == pytest.approx(1.0)  # Perplexity's keys are still in service
    assert rig.clock.slept == []
    assert rig.ds.total_requests() == 0


async def test_a_bad_request_is_raised_at_once_without_fallback(rig: Rig) -> None:
    agent = rig.agent()
    with pytest.raises(openai.BadRequestError):
        await agent.chat(model="poison", messages=messages())
    assert (rig.ds.total_requests(), rig.px.total_requests()) == (1, 0)
    assert all(row["failure_count"] == 0 and row["state"] == "closed" for row in rig.pool.stats())


async def test_a_critical_provider_goes_to_the_back_of_the_line(rig: Rig) -> None:
    rig.trip("ds-1", "ds-2")  # DeepSeek: one key of three closed -> critical
    assert rig.pool.capacity("deepseek").status == "critical"
    answer = await rig.agent().chat(model="deepseek-chat", messages=messages())
    assert answer.provider == "perplexity"
    assert answer.fallbacks == ("deepseek",)  # passed over, though not tried
    assert rig.ds.total_requests() == 0
    rig.kill("perplexity")
    answer = await rig.agent().chat(model="deepseek-chat", messages=messages())
    assert (answer.provider, answer.fallbacks) == ("deepseek", ("perplexity",))
    assert answer.key_id == "ds-3"


# -- one budget for the whole call ---------------------------------------------------------------


@pytest.mark.parametrize("budget", [1, 2, 3, 4, 5, 6, 9])
async def test_the_attempt_budget_is_never_exceeded(rig: Rig, budget: int) -> None:
    rig.kill("deepseek")
    rig.kill("perplexity")
    with pytest.raises(NoKeyAvailable) as info:
        await rig.agent(max_attempts=budget).chat(model="deepseek-chat", messages=messages())
    # two failures in a row leave DeepSeek; the last route, Perplexity, tries each of its keys
    assert rig.total() == min(budget, 5)
    assert max(rig.per_key().values()) == 1
    assert f"{min(budget, 5)} attempt" in str(info.value)
    assert rig.ds.total_requests() == min(budget, 2)  # DeepSeek first


async def test_a_provider_already_tried_is_not_tried_again(rig: Rig) -> None:
    rig.kill("deepseek")
    rig.kill("perplexity", Fault.rate_limited(5))
    with pytest.raises(NoKeyAvailable) as info:
        await rig.agent(max_attempts=50, timeout=None).chat(model="deepseek-chat", messages=messages())
    assert max(rig.per_key().values()) == 1
    # two 503s in a row leave DeepSeek; Perplexity, the last route, is given each of its keys
    # (a key is never tried twice in one call)
    assert (rig.ds.total_requests(), rig.px.total_requests()) == (2, 3)
    assert "['deepseek', 'perplexity']" in str(info.value)


FAULTS = st.sampled_from(
    [
        Fault.ok(),
        Fault.status(500),
        Fault.status(503),
        Fault.status(408),
        Fault.rate_limited(30),
        Fault.rate_limited(None),
        Fault.rejected(),
        Fault.forbidden(),
        Fault.exhausted(),
        Fault.cut_stream(),
    ]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    faults=st.fixed_dictionaries({k: FAULTS for k in [*DEEPSEEK, *PERPLEXITY]}),
    budget=st.integers(min_value=1, max_value=8),
    calls=st.integers(min_value=1, max_value=3),
)
async def test_the_budget_holds_for_any_mix_of_faults(
    faults: dict[str, Fault], budget: int, calls: int
) -> None:
    rig = build_rig()
    try:
        secrets = {**DEEPSEEK, **PERPLEXITY}
        for key_id, fault in faults.items():
            (rig.ds if key_id in DEEPSEEK else rig.px).set_fault(secrets[key_id], fault)
        agent = rig.agent(max_attempts=budget)
        for _ in range(calls):
            before = rig.per_key()
            try:
                answer = await agent.chat(model="deepseek-chat", messages=messages(), priority="critical")
            except NoKeyAvailable:
                answer = None
            spent = {k: n - before[k] for k, n in rig.per_key().items()}
            assert sum(spent.values()) <= budget
            assert max(spent.values()) <= 1  # no key twice in one call
            if answer is not None:
                assert faults[answer.key_id].kind == "ok"
                assert spent[answer.key_id] == 1
                assert answer.attempts == sum(spent.values())
                assert answer.provider not in answer.fallbacks
            else:
                # Refused only when the budget ran out, or every provider with a healthy key left
                # untried was tried in this call and left (it failed twice in a row, or failed with
                # no clean key beside it: the next route was the better retry).
                healthy_left = [
                    k for k in faults if faults[k].kind == "ok" and spent[k] == 0 and _in_service(rig, k)
                ]
                for key_id in healthy_left:
                    keys = DEEPSEEK if key_id in DEEPSEEK else PERPLEXITY
                    assert sum(spent.values()) == budget or any(spent[k] for k in keys)
    finally:
        await rig.aclose()


def _in_service(rig: Rig, key_id: str) -> bool:
    return bool(rig.pool.key_stats(key_id)["state"] != "open")


# -- load shedding --------------------------------------------------------------------------------


async def test_idle_quarantined_backups_do_not_shed_low_priority_calls() -> None:
    upstream = FakeUpstream(["sk-idle-p1-xxxx", "sk-idle-p2-xxxx"], flavor="deepseek")
    client = AsyncDeepSeek(
        api_keys=["sk-idle-p1-xxxx", "sk-idle-p2-xxxx"],
        backup_keys=["sk-idle-b1-xxxx", "sk-idle-b2-xxxx", "sk-idle-b3-xxxx"],
        base_url="http://deepseek.test",
        transport=httpx2.ASGITransport(app=upstream),
    )
    for row in client.pool.stats():
        if row["tier"] == "backup":
            client.pool.quarantine(row["key_id"])
    agent = UnifiedAgent([ChatRoute(client)])
    assert agent.healthy_share() == 1.0  # the two serving primaries are healthy: 2/2, not 2/5
    answer = await agent.chat(model="deepseek-chat", messages=messages(), priority="low")
    assert answer.provider == "deepseek"
    await client.close()


async def test_low_priority_is_shed_at_once_when_capacity_is_critical(rig: Rig) -> None:
    agent = rig.agent()
    rig.trip("ds-1", "ds-2", "px-1", "px-2")  # 2 of 6 keys closed: healthy share 1/3
    assert {rig.pool.capacity(p).status for p in ("deepseek", "perplexity")} == {"critical"}
    with pytest.raises(LoadShed) as info:
        await agent.chat(model="deepseek-chat", messages=messages(), priority="low")
    assert isinstance(info.value, NoKeyAvailable)
    assert info.value.retry_after == pytest.approx(OPEN_TIMEOUT, abs=1.0)
    assert "'low' call shed" in str(info.value)
    assert rig.total() == 0  # refused before any request
    assert [e.provider for e in rig.rejected("load_shed")] == ["deepseek", "perplexity"]

    for priority in ("normal", "critical"):
        answer = await agent.chat(model="deepseek-chat", messages=messages(), priority=priority)
        assert answer.key_id in ("ds-3", "px-3")
    assert rig.total() == 2

    rig.trip("ds-3")  # 1 of 6 closed: below the normal level too
    with pytest.raises(LoadShed):
        await agent.chat(model="deepseek-chat", messages=messages(), priority="normal")
    with pytest.raises(LoadShed):
        await agent.chat(model="deepseek-chat", messages=messages(), priority="low")
    answer = await agent.chat(model="deepseek-chat", messages=messages(), priority="critical")
    assert (answer.provider, answer.key_id) == ("perplexity", "px-3")
    assert rig.total() == 3

    assert agent.priority_stats() == {
        "critical": {"accepted": 2, "shed": 0},
        "normal": {"accepted": 1, "shed": 1},
        "low": {"accepted": 0, "shed": 2},
    }


async def test_nothing_is_shed_while_capacity_is_healthy_and_the_levels_are_configurable(rig: Rig) -> None:
    agent = rig.agent()
    for priority in ("low", "normal", "critical"):
        await agent.chat(model="deepseek-chat", messages=messages(), priority=priority)
    assert agent.priority_stats()["low"] == {"accepted": 1, "shed": 0}
    rig.trip("ds-1")  # share 5/6
    strict = rig.agent(shedding=SheddingPolicy(shed_low_below=0.9, shed_normal_below=0.5))
    with pytest.raises(LoadShed):
        await strict.chat(model="deepseek-chat", messages=messages(), priority="low")
    await strict.chat(model="deepseek-chat", messages=messages(), priority="normal")
    assert strict.priority_stats()["low"] == {"accepted": 0, "shed": 1}


def test_shedding_policy_and_agent_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="shed_low_below"):
        SheddingPolicy(shed_low_below=1.5)
    with pytest.raises(ConfigError, match="shed_normal_below"):
        SheddingPolicy(shed_low_below=0.2, shed_normal_below=0.4)
    with pytest.raises(ConfigError, match="routes"):
        UnifiedAgent([])


async def test_bad_arguments_are_config_errors(rig: Rig) -> None:
    agent = rig.agent()
    with pytest.raises(ConfigError, match="priority"):
        await agent.chat(model="deepseek-chat", messages=messages(), priority="urgent")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unique"):
        UnifiedAgent([ChatRoute(rig.deepseek), ChatRoute(rig.deepseek)])
    with pytest.raises(ConfigError, match="max_attempts"):
        rig.agent(max_attempts=0)
    with pytest.raises(ConfigError, match="max_wait"):
        rig.agent(max_wait=-1)
    with pytest.raises(ConfigError, match="timeout"):
        rig.agent(timeout=0)
    assert rig.total() == 0


# -- capacity and tools --------------------------------------------------------------------------


async def test_capacity_reports_every_provider_and_tool_server_and_tools_go_to_mcp(rig: Rig) -> None:
    async with McpReplica(token="mcp-agent-token-31c7") as replica:
        endpoint = MCPEndpoint(replica.url, SecretStr("mcp-agent-token-31c7"), "east")
        async with MCPClient("search-tools", [endpoint], pool=KeyPool(clock=rig.clock)) as tools:
            agent = rig.agent(tools=[tools])
            rig.trip("ds-1")
            capacity = agent.capacity()
            assert set(capacity) == {"deepseek", "perplexity", "search-tools"}
            assert all(isinstance(c, Capacity) for c in capacity.values())
            assert (capacity["deepseek"].status, capacity["deepseek"].open) == ("degraded", 1)
            assert (capacity["perplexity"].status, capacity["search-tools"].status) == ("healthy", "healthy")
            before = replica.request_count
            result = await agent.call_tool("search-tools", "add", {"a": 20, "b": 22})
            assert result.structured_content == {"result": 42}
            assert replica.request_count > before
            assert tools.pool.key_stats("east")["total_successes"] == 1
            with pytest.raises(ConfigError, match="search-tools"):
                await agent.call_tool("nope", "add", {})
