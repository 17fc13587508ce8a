"""``providers.MCPClient`` against real MCP tool servers on loopback.

Two ``McpReplica`` replicas of one tool server, each with its own bearer token, are the two
endpoints of one ``MCPClient``. Replicas are killed, restarted, made to hang and made to refuse a
token while calls run; breaker time runs on the ``FakeClock`` of the client's ``KeyPool`` (call
deadlines are real time, measured here).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import pytest
from mcp import MCPError
from mcp_types import CallToolResult, TextContent
from pydantic import SecretStr

from keypool import (
    BreakerConfig,
    CallRecorded,
    CallRejected,
    ConfigError,
    KeyPool,
    KeyStateChanged,
    NoKeyAvailable,
    OutcomeKind,
    PoolEvent,
)
from keypool.testing import FakeClock
from providers.mcp import MCPClient, MCPEndpoint
from tests.mcp_servers import TOOL_NAMES, McpReplica

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

SERVER = "search-tools"
TOKENS = {"a": "mcp-token-alpha-7c41d2e9", "b": "mcp-token-bravo-0e93ab51"}
THRESHOLD = 5
OPEN_TIMEOUT = 60.0


@dataclass
class Rig:
    """Two replicas, an MCPClient over them, its pool, fake clock and every pool event."""

    replicas: dict[str, McpReplica]
    clock: FakeClock
    pool: KeyPool
    events: list[PoolEvent] = field(default_factory=list)

    def state(self, key_id: str) -> str:
        return str(self.pool.key_stats(key_id, SERVER)["state"])

    def stats(self, key_id: str) -> dict[str, Any]:
        return self.pool.key_stats(key_id, SERVER)

    def requests(self) -> dict[str, int]:
        return {k: r.request_count for k, r in self.replicas.items()}

    def changes(self, key_id: str) -> list[tuple[str, str]]:
        return [
            (e.old.label, e.new.label)
            for e in self.events
            if isinstance(e, KeyStateChanged) and e.key_id == key_id
        ]

    def client(self, *, tokens: dict[str, str] | None = None, **options: Any) -> MCPClient:
        tokens = tokens or TOKENS
        endpoints = [
            MCPEndpoint(url=r.url, token=SecretStr(tokens[k]), key_id=k) for k, r in self.replicas.items()
        ]
        options.setdefault("call_timeout", 10.0)
        return MCPClient(SERVER, endpoints, pool=self.pool, **options)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    replicas = {k: McpReplica(token=t, shutdown_timeout=0.2) for k, t in TOKENS.items()}
    for replica in replicas.values():
        await replica.astart()
    clock = FakeClock()
    events: list[PoolEvent] = []
    pool = KeyPool(clock=clock, hooks=[events.append], seed=11)
    pool.add_provider(
        {
            "name": SERVER,
            "keys": [{"secret": TOKENS[k], "key_id": k} for k in replicas],
            "breaker": BreakerConfig(failure_threshold=THRESHOLD, timeout=OPEN_TIMEOUT),
        }
    )
    try:
        yield Rig(replicas, clock, pool, events)
    finally:
        for replica in replicas.values():
            await replica.astop()


async def echo(client: MCPClient, text: str = "hello") -> CallToolResult:
    return await client.call_tool("echo", {"text": text})


def assert_echoed(result: CallToolResult, text: str = "hello") -> None:
    assert not result.is_error, result
    assert result.structured_content == {"result": text}


def assert_fallback(result: CallToolResult) -> dict[str, Any]:
    assert result.is_error
    content = result.structured_content
    assert isinstance(content, dict)
    assert content["error"] == "circuit_open"
    assert content["server"] == SERVER
    assert isinstance(result.content[0], TextContent)
    assert SERVER in result.content[0].text
    json.dumps(result.model_dump(by_alias=True, mode="json"))  # a plain JSON-able tool result
    return content


# -- the happy path and failover ----------------------------------------------------------------


async def test_tool_calls_succeed_and_spread_over_both_endpoints(rig: Rig) -> None:
    async with rig.client() as client:
        for i in range(20):
            assert_echoed(await echo(client, f"call {i}"), f"call {i}")
        added = await client.call_tool("add", {"a": 2, "b": 3})
        assert added.structured_content == {"result": 5}
    assert all(rig.stats(k)["total_successes"] > 0 for k in TOKENS)
    assert rig.pool.capacity(SERVER).status == "healthy"
    assert rig.pool.capacity(SERVER).in_flight == 0


async def test_a_killed_replica_trips_after_the_threshold_and_calls_go_to_the_other(rig: Rig) -> None:
    async with rig.client() as client:
        assert_echoed(await echo(client))
        await rig.replicas["a"].astop()
        for i in range(30):
            assert_echoed(await echo(client, f"n{i}"), f"n{i}")
        stats = rig.stats("a")
        assert stats["state"] == "open"
        assert stats["open_reason"] == "failures"
        assert stats["trips"] == 1
        assert stats["total_failures"] == THRESHOLD  # exactly: an open endpoint gets no more calls
        served_by_b = rig.stats("b")["total_successes"]

        # Concurrent calls while 'a' is open: all go to 'b'.
        results: list[CallToolResult] = []

        async def one(i: int) -> None:
            results.append(await echo(client, f"c{i}"))

        async with anyio.create_task_group() as group:
            for i in range(20):
                group.start_soon(one, i)
        assert len(results) == 20
        assert not any(r.is_error for r in results)
        assert rig.stats("b")["total_successes"] == served_by_b + 20
        assert rig.stats("a")["total_failures"] == THRESHOLD
    assert rig.changes("a") == [("closed", "open")]
    assert rig.changes("b") == []


async def test_concurrent_calls_fail_over_while_a_replica_dies(rig: Rig) -> None:
    async with rig.client() as client:
        assert_echoed(await echo(client))
        await rig.replicas["a"].astop()
        results: list[CallToolResult] = []

        async def one(i: int) -> None:
            results.append(await echo(client, f"c{i}"))

        async with anyio.create_task_group() as group:
            for i in range(40):
                group.start_soon(one, i)
        assert sorted(r.structured_content["result"] for r in results) == sorted(f"c{i}" for i in range(40))
        assert rig.pool.capacity(SERVER).in_flight == 0
        assert rig.stats("b")["failure_count"] == 0


async def test_calls_wait_for_a_busy_endpoint_instead_of_falling_back(rig: Rig) -> None:
    """Endpoints at their concurrency limit are busy, not down: a call waits for a free slot."""
    pool = KeyPool(clock=FakeClock())
    pool.add_provider(
        {
            "name": SERVER,
            "keys": [{"secret": t, "key_id": k, "max_concurrency": 1} for k, t in TOKENS.items()],
        }
    )
    endpoints = [MCPEndpoint(r.url, SecretStr(TOKENS[k]), k) for k, r in rig.replicas.items()]
    results: list[CallToolResult] = []
    async with MCPClient(SERVER, endpoints, pool=pool, call_timeout=10) as client:

        async def one() -> None:
            results.append(await client.call_tool("slow", {"seconds": 0.05}))

        started = time.monotonic()
        async with anyio.create_task_group() as group:
            for _ in range(8):
                group.start_soon(one)
        elapsed = time.monotonic() - started
    assert [r.is_error for r in results] == [False] * 8
    assert elapsed >= 4 * 0.05  # two at a time
    assert pool.capacity(SERVER).in_flight == 0


async def test_both_replicas_dead_give_the_structured_fallback_well_within_the_deadline(rig: Rig) -> None:
    call_timeout = 10.0
    async with rig.client(call_timeout=call_timeout) as client:
        assert_echoed(await echo(client))
        for replica in rig.replicas.values():
            await replica.astop()
        slowest = 0.0
        contents = []
        for _ in range(THRESHOLD + 3):
            started = time.monotonic()
            result = await echo(client)
            slowest = max(slowest, time.monotonic() - started)
            contents.append(assert_fallback(result))
        assert slowest < call_timeout / 10, f"a fallback took {slowest:.3f} s"
        # Before the breakers open the endpoints are still in service: retry shortly.
        assert contents[0]["retry_after"] is not None
        assert contents[0]["retry_after"] <= 1.0
        assert contents[0]["last_error"] is not None
        # Once both are open, no endpoint is contacted and the fallback says when they are due back.
        last = contents[-1]
        assert last["endpoints"] == {"a": "open", "b": "open"}
        assert last["retry_after"] == pytest.approx(OPEN_TIMEOUT, abs=1.0)
        assert rig.pool.capacity(SERVER).status == "down"
        assert all(rig.stats(k)["total_failures"] == THRESHOLD for k in TOKENS)


async def test_hung_replicas_time_out_at_the_callers_deadline_and_count_against_nobody(rig: Rig) -> None:
    async with rig.client(call_timeout=0.5) as client:
        assert_echoed(await echo(client))
        for replica in rig.replicas.values():
            replica.hang()
        started = time.monotonic()
        result = await echo(client)
        elapsed = time.monotonic() - started
        assert result.is_error
        assert result.structured_content is not None
        assert result.structured_content["error"] == "timeout"
        assert result.structured_content["timeout"] == 0.5
        assert 0.45 <= elapsed < 1.0, elapsed
        assert rig.pool.capacity(SERVER).in_flight == 0
        # The caller's own deadline cut it: not the endpoint's failure.
        assert sum(rig.stats(k)["failure_count"] for k in TOKENS) == 0
        for replica in rig.replicas.values():
            replica.clear_fault()
        assert_echoed(await echo(client))


async def test_an_attempt_past_attempt_timeout_counts_and_is_rerun_only_if_idempotent(rig: Rig) -> None:
    async with rig.client(call_timeout=2.0, attempt_timeout=0.2) as client:
        while not all(rig.stats(k)["total_successes"] for k in TOKENS):  # both sessions open
            assert_echoed(await echo(client))
        for replica in rig.replicas.values():
            replica.hang()
        result = await echo(client)  # it may have run: not re-run on the other replica
        assert result.is_error
        assert result.structured_content is not None
        assert result.structured_content["error"] == "call_failed"
        assert result.structured_content["retried"] is False
        assert sum(rig.stats(k)["failure_count"] for k in TOKENS) == 1
        again = await client.call_tool("echo", {"text": "x"}, idempotent=True)  # may run twice: both tried
        assert again.is_error
        assert again.structured_content is not None
        assert again.structured_content["error"] == "circuit_open"
        assert again.structured_content["last_error"] == "TimeoutError"
        assert sum(rig.stats(k)["failure_count"] for k in TOKENS) == 3
        assert rig.pool.capacity(SERVER).in_flight == 0
        for replica in rig.replicas.values():
            replica.clear_fault()
        assert_echoed(await echo(client))


async def test_opening_a_session_to_a_wedged_replica_is_bounded_too(rig: Rig) -> None:
    """A replica that accepts but never answers: the call times out at its deadline, and the task
    that was opening the session gives up too (nobody waits for it any more) instead of waiting
    on httpx2's read timeout."""
    for replica in rig.replicas.values():
        replica.hang()
    async with rig.client(call_timeout=0.4) as client:
        before = len(asyncio.all_tasks())
        started = time.monotonic()
        timed_out = await echo(client)
        assert timed_out.is_error
        assert timed_out.structured_content is not None
        assert timed_out.structured_content["error"] == "timeout"
        assert time.monotonic() - started < 1.0
        with anyio.fail_after(3):
            while len(asyncio.all_tasks()) > before:  # noqa: ASYNC110 -- no event for "task ended"
                await anyio.sleep(0.02)
        for replica in rig.replicas.values():
            replica.clear_fault()
        assert_echoed(await echo(client))


async def test_on_unavailable_raise_raises_no_key_available(rig: Rig) -> None:
    async with rig.client(on_unavailable="raise") as client:
        for replica in rig.replicas.values():
            await replica.astop()
        with pytest.raises(NoKeyAvailable) as first:
            await echo(client)
        assert first.value.provider == SERVER
        assert first.value.retry_after is not None
        rig.pool.trip(SERVER)
        with pytest.raises(NoKeyAvailable) as info:
            await echo(client)
        assert info.value.provider == SERVER
        assert info.value.retry_after == pytest.approx(OPEN_TIMEOUT, abs=1.0)
        assert SERVER in str(info.value)


async def test_a_restarted_replica_recovers_through_half_open(rig: Rig) -> None:
    a = rig.replicas["a"]
    async with rig.client() as client:
        await a.astop()
        while rig.state("a") != "open":
            assert_echoed(await echo(client))
        await a.astart()
        before = a.request_count
        for _ in range(10):  # still open on the fake clock: 'a' is not contacted
            assert_echoed(await echo(client))
        assert a.request_count == before
        rig.clock.advance(OPEN_TIMEOUT + 0.1)
        assert rig.state("a") == "half_open"
        await rig.replicas["b"].astop()  # every call now has to be a trial on 'a'
        for _ in range(2):  # success_threshold
            assert_echoed(await echo(client))
        assert rig.state("a") == "closed"
        assert rig.stats("a")["failure_count"] == 0
    assert rig.changes("a") == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    trials = [e for e in rig.events if isinstance(e, CallRecorded) and e.key_id == "a" and e.trial]
    assert [e.outcome for e in trials] == [OutcomeKind.SUCCESS, OutcomeKind.SUCCESS]


async def test_a_failed_trial_reopens_the_endpoint(rig: Rig) -> None:
    async with rig.client() as client:
        rig.pool.trip(SERVER, "a")
        await rig.replicas["a"].astop()
        rig.clock.advance(OPEN_TIMEOUT + 0.1)
        for _ in range(5):
            assert_echoed(await echo(client))
        assert rig.state("a") == "open"
        assert rig.stats("a")["open_reason"] == "trial_failed"
        assert rig.stats("a")["total_failures"] == 1


# -- what does not count against an endpoint ---------------------------------------------------


async def test_tool_errors_are_results_and_trip_nothing(rig: Rig) -> None:
    async with rig.client() as client:
        for _ in range(THRESHOLD + 2):
            failed = await client.call_tool("fail", {"message": "boom"})
            assert failed.is_error
            assert failed.structured_content is None
            assert isinstance(failed.content[0], TextContent)
            assert failed.content[0].text == "Error executing tool fail: boom"
            crashed = await client.call_tool("crash", {"message": "kaput"})
            assert crashed.is_error
            assert isinstance(crashed.content[0], TextContent)
            assert crashed.content[0].text == "Error executing tool crash"
            unknown = await client.call_tool("no_such_tool", {})
            assert unknown.is_error
            bad_args = await client.call_tool("add", {"a": "x", "b": 1})
            assert bad_args.is_error
        for key_id in TOKENS:
            stats = rig.stats(key_id)
            assert (stats["state"], stats["failure_count"], stats["total_failures"]) == ("closed", 0, 0)
        assert_echoed(await echo(client))


# -- tokens -----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["wrong-token-at-connect", "token-rotated-while-running"])
async def test_a_401_quarantines_the_endpoint_and_the_call_fails_over(rig: Rig, how: str) -> None:
    a = rig.replicas["a"]
    tokens = dict(TOKENS)
    if how == "wrong-token-at-connect":
        tokens["a"] = "mcp-token-that-a-never-issued"
    async with rig.client(tokens=tokens) as client:
        if how == "token-rotated-while-running":
            while rig.stats("a")["total_successes"] == 0:  # a session to 'a' is open and working
                assert_echoed(await echo(client))
            a.token = "mcp-token-rotated-elsewhere"
        for i in range(40):
            assert_echoed(await echo(client, f"n{i}"), f"n{i}")
            if rig.state("a") == "open":
                break
        stats = rig.stats("a")
        assert stats["state"] == "open"
        assert stats["open_reason"] == "rejected"
        assert stats["quarantined"] is True
        before = a.request_count
        rig.clock.advance(OPEN_TIMEOUT * 10)  # quarantine has no half-open
        for _ in range(10):
            assert_echoed(await echo(client))
        assert a.request_count == before
        assert rig.state("a") == "open"
        assert rig.pool.capacity(SERVER).quarantined == 1
    rejected = [e for e in rig.events if isinstance(e, CallRecorded) and e.key_id == "a"]
    assert rejected[-1].outcome is OutcomeKind.REJECTED


# -- tools listing ------------------------------------------------------------------------------


async def test_list_tools_is_cached_and_refresh_refetches(rig: Rig) -> None:
    async with rig.client() as client:
        rig.pool.trip(SERVER, "b")  # one endpoint, so that request counts are exact
        tools = await client.list_tools()
        assert sorted(t.name for t in tools) == sorted(TOOL_NAMES)
        assert {t.name: t.input_schema.get("required") for t in tools}["add"] == ["a", "b"]
        after_first = sum(rig.requests().values())
        for _ in range(3):
            again = await client.list_tools()
            assert [t.name for t in again] == [t.name for t in tools]
        assert sum(rig.requests().values()) == after_first  # served from the cache
        refreshed = await client.list_tools(refresh=True)
        assert sorted(t.name for t in refreshed) == sorted(TOOL_NAMES)
        assert sum(rig.requests().values()) == after_first + 1  # exactly one tools/list
        rig.pool.reset(SERVER, "b")
        await client.list_tools()
        assert sum(rig.requests().values()) == after_first + 1


async def test_list_tools_with_every_endpoint_down_raises_no_key_available(rig: Rig) -> None:
    async with rig.client() as client:
        rig.pool.trip(SERVER)
        with pytest.raises(NoKeyAvailable) as info:
            await client.list_tools()
        assert info.value.retry_after == pytest.approx(OPEN_TIMEOUT, abs=1.0)


# -- health checks ------------------------------------------------------------------------------


async def test_health_check_skips_open_endpoints_and_probes_the_others(rig: Rig) -> None:
    async with rig.client() as client:
        report = await client.health_check()
        assert report.provider == SERVER
        assert {k.key_id: k.result for k in report.keys} == {"a": "ok", "b": "ok"}
        rig.pool.trip(SERVER, "a")
        before = rig.requests()
        report = await client.health_check()
        rows = {k.key_id: k for k in report.keys}
        assert (rows["a"].result, rows["a"].state) == ("skipped", "open")
        assert (rows["b"].result, rows["b"].state) == ("ok", "closed")
        assert rows["b"].latency is not None
        assert rows["b"].latency < 1.0
        assert (report.ok, report.skipped, report.failed) == (1, 1, 0)
        after = rig.requests()
        assert after["a"] == before["a"]  # the open endpoint was not contacted
        assert after["b"] == before["b"] + 1  # one tools/list on the open session
        skipped = [e for e in rig.events if isinstance(e, CallRejected) and e.reason == "probe_skipped"]
        assert [(e.provider, e.key_id) for e in skipped] == [(SERVER, "a")]

        # Past its open timeout the endpoint is probed, and a healthy one closes within the round.
        rig.clock.advance(OPEN_TIMEOUT + 0.1)
        report = await client.health_check()
        assert {k.key_id: (k.result, k.state) for k in report.keys} == {
            "a": ("ok", "closed"),
            "b": ("ok", "closed"),
        }


async def test_health_check_of_a_dead_endpoint_counts_a_failure(rig: Rig) -> None:
    async with rig.client() as client:
        await rig.replicas["b"].astop()
        report = await client.health_check()
        assert {k.key_id: k.result for k in report.keys} == {"a": "ok", "b": "failed"}
        assert rig.stats("b")["failure_count"] == 1
        assert rig.pool.capacity(SERVER).in_flight == 0


# -- sessions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_sessions_are_reestablished_after_a_replica_restart(rig: Rig, mode: Any) -> None:
    async with rig.client(mode=mode) as client:
        rig.pool.trip(SERVER, "b")  # every call goes to 'a'
        assert_echoed(await echo(client))
        await rig.replicas["a"].arestart()
        for i in range(3):
            assert_echoed(await echo(client, f"after {i}"), f"after {i}")
        assert rig.stats("a")["failure_count"] == 0
        assert rig.stats("a")["total_successes"] == 4


async def test_a_call_after_a_short_outage_reopens_the_session(rig: Rig) -> None:
    async with rig.client() as client:
        rig.pool.trip(SERVER, "b")
        assert_echoed(await echo(client))
        await rig.replicas["a"].astop()
        assert_fallback(await echo(client))
        assert rig.stats("a")["failure_count"] == 1
        await rig.replicas["a"].astart()
        assert_echoed(await echo(client))
        assert rig.stats("a")["failure_count"] == 0


# -- cancellation -------------------------------------------------------------------------------


async def test_cancelling_a_call_leaves_nothing_in_flight_and_blames_nobody(rig: Rig) -> None:
    async with rig.client() as client:
        while not all(rig.stats(k)["total_successes"] for k in TOKENS):  # both proven: no probation
            assert_echoed(await echo(client))
        with anyio.move_on_after(0.2) as scope:
            await client.call_tool("slow", {"seconds": 5})
        assert scope.cancelled_caught
        assert rig.pool.capacity(SERVER).in_flight == 0

        async def call() -> None:
            await client.call_tool("slow", {"seconds": 5})

        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(call)
            await anyio.sleep(0.2)
            assert rig.pool.capacity(SERVER).in_flight == 4
            group.cancel_scope.cancel()
        assert rig.pool.capacity(SERVER).in_flight == 0
        for key_id in TOKENS:
            assert rig.stats(key_id)["failure_count"] == 0
            assert rig.stats(key_id)["in_flight"] == 0
        assert_echoed(await echo(client))


async def test_cancelling_a_half_open_trial_gives_its_slot_back(rig: Rig) -> None:
    async with rig.client() as client:
        rig.pool.trip(SERVER)
        rig.clock.advance(OPEN_TIMEOUT + 0.1)
        with anyio.move_on_after(0.2):
            await client.call_tool("slow", {"seconds": 5})
        assert rig.pool.capacity(SERVER).in_flight == 0
        assert all(rig.stats(k)["trials_in_flight"] == 0 for k in TOKENS)
        assert {rig.state(k) for k in TOKENS} == {"half_open"}


# -- lifecycle, configuration and secrets ------------------------------------------------------


async def test_an_error_in_the_block_propagates_unwrapped(rig: Rig) -> None:
    async def use() -> None:
        async with rig.client() as client:
            assert_echoed(await echo(client))
            raise LookupError("the caller's own error")

    with pytest.raises(LookupError, match="the caller's own"):
        await use()


async def test_calls_outside_the_block_and_bad_settings_are_config_errors(rig: Rig) -> None:
    client = rig.client()
    with pytest.raises(ConfigError, match="async with"):
        await echo(client)
    await client.aclose()
    with pytest.raises(ConfigError, match="endpoints"):
        MCPClient("x", [])
    with pytest.raises(ConfigError, match="on_unavailable"):
        MCPClient("x", ["http://127.0.0.1:1/mcp"], on_unavailable="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="call_timeout"):
        MCPClient("x", ["http://127.0.0.1:1/mcp"], call_timeout=0)


async def test_no_token_appears_in_reprs_results_or_logs(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    tokens = dict(TOKENS, a="mcp-token-wrong-for-a-51f0")
    async with rig.client(tokens=tokens) as client:
        for _ in range(10):
            texts.append((await echo(client)).model_dump_json())
        texts.append(repr(await client.health_check()))
        await rig.replicas["b"].astop()
        texts.append((await echo(client)).model_dump_json())
        texts += [repr(client), repr(client.capacity()), json.dumps(rig.pool.stats())]
    async with rig.client(tokens=tokens, on_unavailable="raise") as raising:
        try:
            await echo(raising)
        except NoKeyAvailable as exc:
            texts += [str(exc), repr(exc), str(exc.__cause__), repr(exc.__cause__)]
    texts += [repr(rig.events), repr(rig.pool), caplog.text]
    blob = "\n".join(texts)
    assert "circuit_open" in blob
    assert "rejected" in blob
    for token in tokens.values():
        assert token not in blob
    assert TOKENS["a"] not in blob


def test_endpoint_ids_default_to_a_fingerprint_of_the_url() -> None:
    plain = MCPEndpoint(url="http://127.0.0.1:9/mcp", token=SecretStr("mcp-secret-xyz"))
    assert plain.id().startswith("endpoint")
    assert "mcp-secret-xyz" not in repr(plain)
    assert MCPEndpoint(url="http://127.0.0.1:9/mcp", key_id="east").id() == "east"


# ---------------------------------------------------------------------- configuration and caller errors


def test_a_plain_string_token_is_held_as_a_secret() -> None:
    endpoint = MCPEndpoint("http://127.0.0.1:9/mcp", "tok-SECRET-plain-123")  # type: ignore[arg-type]
    assert isinstance(endpoint.token, SecretStr)
    assert "tok-SECRET-plain-123" not in repr(endpoint)
    assert "tok-SECRET-plain-123" not in repr(MCPClient("tools", [endpoint]))


def test_replicas_may_share_one_token() -> None:
    shared = SecretStr("tok-shared-by-replicas")
    client = MCPClient(
        "tools", [MCPEndpoint("http://127.0.0.1:9/a", shared), MCPEndpoint("http://127.0.0.1:9/b", shared)]
    )
    assert len(client.pool.key_ids("tools")) == 2


@pytest.mark.anyio
async def test_a_callers_bad_request_is_raised_once_and_trips_nothing() -> None:
    contacted: set[str] = set()

    def bad_request(request: httpx2.Request) -> httpx2.Response:
        contacted.add(request.url.path)
        return httpx2.Response(400, json={"error": "bad request"})

    endpoints = ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b", "http://127.0.0.1:9/c"]
    async with MCPClient("tools", endpoints, transport=httpx2.MockTransport(bad_request)) as client:
        with pytest.raises(MCPError):
            await client.call_tool("echo", {"text": "x"})
        assert len(contacted) == 1  # not sent to the other replicas: they would refuse it too
        assert client.capacity().status == "healthy"
