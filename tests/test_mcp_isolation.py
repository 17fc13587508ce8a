"""MCP calls that cannot take healthy replicas down, against real replicas on loopback.

- One replica hung, one healthy, 20 concurrent callers: calls that the hung replica held fail
  (counted), none started after its breaker opened does, and the healthy one is never blamed.
- One caller's short timeout: counts against nobody, runs the tool once, disturbs no other call.
- A tool that raises ``MCPError``: the caller gets its code and message; no replica is counted
  and the tool is not run again elsewhere.
- A session replaced while calls are in flight on it: they finish there.
- The rest of the MCP surface (resources, prompts, completion, ping, logging level) goes through
  the same breakers, and ``call_tool`` passes progress callbacks, ``_meta`` and read timeouts on.

Breakers run on a ``FakeClock``: an open breaker stays open for the whole test.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from mcp import MCPError
from mcp_types import CallToolResult, PromptReference, TextContent
from pydantic import SecretStr

from keypool import BreakerConfig, BreakerState, KeyPool, KeyStateChanged, NoKeyAvailable, PoolEvent
from keypool.testing import FakeClock
from providers.mcp import MCPClient, MCPEndpoint
from tests.mcp_servers import REFUSE_CODE, McpReplica

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

SERVER = "tools"
CALLERS = 20


class Rig:
    def __init__(self, replicas: dict[str, McpReplica]) -> None:
        self.replicas = replicas
        self.clock = FakeClock()
        self.events: list[PoolEvent] = []
        self.opened_at: dict[str, float] = {}
        self.pool = KeyPool(clock=self.clock, hooks=[self.events.append, self._note], seed=5)
        self.pool.add_provider(
            {
                "name": SERVER,
                "keys": [{"secret": f"sk-{k}", "key_id": k} for k in replicas],
                "breaker": BreakerConfig(failure_threshold=5, timeout=60),
            }
        )

    def _note(self, event: PoolEvent) -> None:
        if isinstance(event, KeyStateChanged) and event.new is BreakerState.OPEN:
            self.opened_at.setdefault(event.key_id, time.monotonic())

    def client(self, **options: Any) -> MCPClient:
        endpoints = [MCPEndpoint(r.url, SecretStr(f"tok-{k}"), k) for k, r in self.replicas.items()]
        return MCPClient(SERVER, endpoints, pool=self.pool, **options)

    def stats(self, key_id: str) -> dict[str, Any]:
        return self.pool.key_stats(key_id, SERVER)

    def calls(self, tool: str) -> int:
        return sum(r.tool_calls[tool] for r in self.replicas.values())


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    replicas = {k: McpReplica(token=f"tok-{k}", shutdown_timeout=0.2) for k in ("a", "b")}
    for replica in replicas.values():
        await replica.astart()
    try:
        yield Rig(replicas)
    finally:
        for replica in replicas.values():
            replica.clear_fault()
            await replica.astop()


async def warm(rig: Rig, client: MCPClient) -> None:
    """Both endpoints proven (past probation) with a session open."""
    while not all(rig.stats(k)["total_successes"] for k in rig.replicas):
        result = await client.call_tool("echo", {"text": "warm"})
        assert not result.is_error


@pytest.mark.parametrize("tool", ["echo", "lookup"])
async def test_a_hung_replica_fails_only_the_calls_it_held_and_never_trips_the_healthy_one(
    rig: Rig, tool: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``echo`` may not run twice: a call the hung replica held fails. ``lookup`` is declared
    idempotent by the server: such a call runs again on the healthy replica."""
    async with rig.client(call_timeout=5.0, attempt_timeout=1.0) as client:
        await warm(rig, client)
        await client.list_tools()  # the server's hints (lookup: idempotent) are known
        rig.replicas["a"].hang()
        failed: list[tuple[float, str]] = []
        served = 0

        async def caller(n: int) -> None:
            nonlocal served
            for i in range(8):
                started = time.monotonic()
                key = "key" if tool == "lookup" else "text"
                result = await client.call_tool(tool, {key: f"{n}-{i}"})
                if result.is_error:
                    assert isinstance(result.structured_content, dict)
                    failed.append((started, str(result.structured_content["error"])))
                else:
                    served += 1

        async with anyio.create_task_group() as group:
            for n in range(CALLERS):
                group.start_soon(caller, n)
        opened = rig.opened_at.get("a")
        assert opened is not None, "the hung replica's breaker never opened"
        after_open = [f for f in failed if f[0] > opened]
        with capsys.disabled():
            print(
                f"\n{tool}: {CALLERS} callers x 8 calls, replica a hung: {len(failed)} failed "
                f"({len(after_open)} started after a's breaker opened), {served} served"
            )
        assert after_open == []
        assert len(failed) <= CALLERS  # at most the calls the hung replica held when it tripped
        if tool == "lookup":
            assert failed == []
        assert {why for _, why in failed} <= {"call_failed"}
        assert rig.stats("a")["state"] == "open"
        b = rig.stats("b")
        assert (b["state"], b["total_failures"], b["trips"]) == ("closed", 0, 0)
        assert served + len(failed) == CALLERS * 8
        assert rig.pool.capacity(SERVER).in_flight == 0


async def test_one_callers_short_timeout_counts_against_nobody_and_runs_the_tool_once(rig: Rig) -> None:
    async with rig.client(call_timeout=10.0) as client:
        await warm(rig, client)
        others: list[CallToolResult] = []

        async def other() -> None:
            others.append(await client.call_tool("slow", {"seconds": 0.3}))

        async with anyio.create_task_group() as group:
            for _ in range(CALLERS - 1):
                group.start_soon(other)
            await anyio.sleep(0.05)  # the others are in flight on both sessions
            short = await client.call_tool("slow", {"seconds": 2}, timeout=0.1)
        assert short.is_error
        assert isinstance(short.structured_content, dict)
        assert short.structured_content["error"] == "timeout"
        assert [r.is_error for r in others] == [False] * (CALLERS - 1)
        assert rig.calls("slow") == CALLERS  # the cut call ran once, and nothing ran twice
        for key_id in rig.replicas:
            stats = rig.stats(key_id)
            assert (stats["state"], stats["total_failures"], stats["trips"]) == ("closed", 0, 0)
    async with rig.client(call_timeout=10.0, on_unavailable="raise") as raising:
        with pytest.raises(TimeoutError):
            await raising.call_tool("slow", {"seconds": 2}, timeout=0.1)
    assert all(rig.stats(k)["total_failures"] == 0 for k in rig.replicas)


async def test_a_tool_raising_mcp_error_is_the_tools_error_not_the_replicas(rig: Rig) -> None:
    async with rig.client() as client:
        await warm(rig, client)
        for i in range(8):  # more than failure_threshold
            with pytest.raises(MCPError) as info:
                await client.call_tool("refuse", {"message": f"no such account {i}"})
            assert info.value.code == REFUSE_CODE
            assert f"no such account {i}" in str(info.value)
        assert rig.calls("refuse") == 8  # each ran once: not re-run on the other replica
        for key_id in rig.replicas:
            stats = rig.stats(key_id)
            assert (stats["state"], stats["total_failures"], stats["failure_count"]) == ("closed", 0, 0)
        result = await client.call_tool("echo", {"text": "still here"})
        assert result.structured_content == {"result": "still here"}


async def test_a_replaced_session_lets_the_calls_in_flight_on_it_finish(rig: Rig) -> None:
    async with rig.client() as client:
        await warm(rig, client)
        rig.pool.trip(SERVER, "b")  # every call on a
        endpoint = client._endpoints["a"]
        results: list[CallToolResult] = []

        async def call() -> None:
            results.append(await client.call_tool("slow", {"seconds": 0.3}))

        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(call)
            await anyio.sleep(0.1)
            old = endpoint.session
            assert old is not None
            assert old.users == 5
            endpoint.replace(old)  # as after the endpoint lost it: new calls open a new one
            fresh = await client.call_tool("echo", {"text": "new session"})
            assert fresh.structured_content == {"result": "new session"}
            assert endpoint.session is not old
            assert not old.closing.is_set()  # still serving the five
        assert [r.is_error for r in results] == [False] * 5
        assert old.closing.is_set()  # closed once they were done
        assert rig.stats("a")["total_failures"] == 0


async def test_resources_prompts_completion_ping_and_logging_go_through_the_breakers(rig: Rig) -> None:
    async with rig.client(call_timeout=5.0) as client:
        await warm(rig, client)
        await rig.replicas["a"].astop()  # every call that lands on a fails over to b
        for _ in range(3):
            resources = await client.list_resources()
            assert [str(r.uri) for r in resources.resources] == ["keypool://motd"]
            templates = await client.list_resource_templates()
            assert [t.uri_template for t in templates.resource_templates] == ["keypool://greeting/{name}"]
            motd = await client.read_resource("keypool://motd")
            assert motd.contents[0].text == "all keys healthy"  # type: ignore[union-attr]
            hello = await client.read_resource("keypool://greeting/ops")
            assert hello.contents[0].text == "hello ops"  # type: ignore[union-attr]
            prompts = await client.list_prompts()
            assert [p.name for p in prompts.prompts] == ["summarize"]
            prompt = await client.get_prompt("summarize", {"text": "an outage"})
            content = prompt.messages[0].content
            assert isinstance(content, TextContent)
            assert content.text == "Summarize: an outage"
            ref = PromptReference(type="ref/prompt", name="summarize")
            done = await client.complete(ref, {"name": "text", "value": "al"})
            assert done.completion.values == ["alpha"]
        with pytest.raises(MCPError, match="ping is not part of MCP"):  # 2026-07-28 has no ping
            await client.send_ping()
        assert await client.set_logging_level("warning") == 1  # b: a is stopped
        a = rig.stats("a")
        assert a["total_failures"] >= 1  # the stopped replica was blamed, the calls were served
        assert rig.stats("b")["total_failures"] == 0
        rig.pool.trip(SERVER)
        with pytest.raises(NoKeyAvailable):
            await client.list_prompts()
        with pytest.raises(NoKeyAvailable):
            await client.set_logging_level("info")
    rig.pool.reset(SERVER)
    await rig.replicas["a"].astart()
    before = {k: rig.stats(k)["total_failures"] for k in rig.replicas}
    async with rig.client(call_timeout=5.0, mode="legacy") as legacy:  # where the protocol has ping
        for _ in range(4):
            await legacy.send_ping()
        assert await legacy.set_logging_level("error") == 2
    assert rig.calls("logging/setLevel:error") == 2  # both replicas were asked
    assert {k: rig.stats(k)["total_failures"] for k in rig.replicas} == before


async def test_call_tool_passes_progress_meta_and_read_timeouts_on(rig: Rig) -> None:
    async with rig.client(call_timeout=5.0) as client:
        await warm(rig, client)
        seen: list[tuple[float, float | None]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append((progress, total))

        result = await client.call_tool("progress", {"steps": 3}, progress_callback=on_progress)
        assert result.structured_content == {"result": 3}
        assert seen == [(1, 3), (2, 3), (3, 3)]
        tagged = await client.call_tool("meta", {}, meta={"trace": "t-42"})  # type: ignore[typeddict-unknown-key]
        assert isinstance(tagged.content[0], TextContent)
        assert json.loads(tagged.content[0].text)["trace"] == "t-42"
        cut = await client.call_tool("slow", {"seconds": 2}, read_timeout_seconds=0.1)
        assert cut.is_error
        assert isinstance(cut.structured_content, dict)
        assert cut.structured_content["error"] == "timeout"
        assert all(rig.stats(k)["total_failures"] == 0 for k in rig.replicas)  # the caller's own limit
        assert rig.calls("slow") == 1
