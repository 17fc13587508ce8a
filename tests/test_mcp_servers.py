"""Tests of the loopback MCP harness, and a record of how the `mcp` 2.3 client fails.

Each failure test pins down exactly what the real client raises, where (at the `call_tool`
line, or only when the `async with Client(...)` block exits), and about how long it takes:

* a tool's own error is a result (`CallToolResult.is_error`), never an exception;
* an HTTP error status is `MCPError` at the call site and the session survives;
* a transport error (`httpx2.ConnectError`, `httpx2.ReadTimeout` before the response headers)
  cancels the calling task and kills the session: it surfaces as an `ExceptionGroup` around the
  `httpx2` error when the `async with Client(...)` block exits.

"auto" (the default `Client` mode) negotiates protocol 2026-07-28 with these servers: one
stateless POST per request, no session id. "legacy" forces the 2025-11-25 initialize handshake
and a server-side session (`Mcp-Session-Id`).
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import anyio
import httpcore2
import httpx2
import mcp_types
import pytest
from mcp import Client, MCPDeprecationWarning, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp_types import (
    CONNECTION_CLOSED,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    REQUEST_TIMEOUT,
    CallToolResult,
    TextContent,
)

from tests.mcp_servers import TOOL_NAMES, McpReplica, free_port

pytestmark = pytest.mark.timeout(30)

TOKEN = "replica-token"
MODES = ("auto", "legacy")
PROTOCOL_BY_MODE = {"auto": "2026-07-28", "legacy": "2025-11-25"}
GENERIC_HTTP_ERROR = "Server returned an error response"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def replica() -> Iterator[McpReplica]:
    with McpReplica(token=TOKEN) as running:
        yield running


# -- client-side helpers -------------------------------------------------------------------


@dataclass(frozen=True)
class SeenResponse:
    method: str
    status: int
    headers: dict[str, str]


# The streamable-HTTP transport sends each message's HTTP request in the context of the task
# that sent the message, so an httpx2 response hook can report to the caller through a ContextVar.
_seen: ContextVar[list[SeenResponse] | None] = ContextVar("_seen", default=None)


async def _record_response(response: httpx2.Response) -> None:
    log = _seen.get()
    if log is not None:
        log.append(SeenResponse(response.request.method, response.status_code, dict(response.headers)))


@contextmanager
def http_responses() -> Iterator[list[SeenResponse]]:
    """The HTTP responses behind the MCP requests sent by this task inside the block."""
    log: list[SeenResponse] = []
    token = _seen.set(log)
    try:
        yield log
    finally:
        _seen.reset(token)


@asynccontextmanager
async def connect(
    replica: McpReplica,
    mode: str = "auto",
    *,
    token: str | None = None,
    timeout: httpx2.Timeout | None = None,
    read_timeout_seconds: float | None = None,
    transport: httpx2.AsyncBaseTransport | None = None,
) -> AsyncIterator[Client]:
    """An open `mcp.Client` session to `replica`, authenticated with `token` (default: its own)."""
    async with (
        httpx2.AsyncClient(
            headers=replica.auth_headers(token),
            timeout=timeout if timeout is not None else httpx2.Timeout(10.0),
            event_hooks={"response": [_record_response]},
            transport=transport,
        ) as http,
        Client(
            streamable_http_client(replica.url, http_client=http),
            mode=mode,
            read_timeout_seconds=read_timeout_seconds,
        ) as client,
    ):
        yield client


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaf_exceptions(sub)]
    return [exc]


def group_depth(exc: BaseException) -> int:
    """How many single-member exception groups wrap the one leaf exception."""
    depth = 0
    while isinstance(exc, BaseExceptionGroup):
        assert len(exc.exceptions) == 1, exc.exceptions
        exc = exc.exceptions[0]
        depth += 1
    return depth


def only_leaf(exc: BaseException) -> BaseException:
    leaves = leaf_exceptions(exc)
    assert len(leaves) == 1, leaves
    return leaves[0]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `predicate` (state owned by the replica's thread) until true, for at most `timeout` s."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - no event to await across the server thread
            await anyio.sleep(0.005)


def text_of(result: CallToolResult) -> str:
    [block] = result.content
    assert isinstance(block, TextContent)
    return block.text


def report(label: str, seconds: float) -> None:
    print(f"TIMING {label}: {seconds * 1000:.1f} ms")


# -- the harness itself --------------------------------------------------------------------


def test_replica_lifecycle_keeps_its_port() -> None:
    replica = McpReplica()
    assert not replica.running
    assert replica.url == f"http://127.0.0.1:{replica.port}/mcp"
    with replica:
        assert replica.running
        with pytest.raises(RuntimeError, match="already running"):
            replica.start()
        port = replica.port
        started = time.perf_counter()
        replica.restart()
        report("replica restart (no client)", time.perf_counter() - started)
        assert replica.running
        assert replica.port == port
    assert not replica.running
    replica.stop()  # stopping a stopped replica is a no-op


def test_replica_start_fails_cleanly_when_the_port_is_taken() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        replica = McpReplica(port=squatter.getsockname()[1])
        with pytest.raises(OSError, match="in use"):
            replica.start()
        assert not replica.running


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.anyio
async def test_auth_gate_and_fault_switch_answer_plain_http(replica: McpReplica) -> None:
    async with httpx2.AsyncClient() as http:
        response = await http.post(replica.url, json={})
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
        assert response.json() == {
            "error": "invalid_token",
            "error_description": "Authentication required",
        }
        replica.set_fault(503, retry_after=7)
        response = await http.post(replica.url, json={}, headers=replica.auth_headers())
        assert (response.status_code, response.headers["retry-after"]) == (503, "7")
        assert response.text == "replica fault 503"
        replica.set_fault(500, jsonrpc_error=True)
        response = await http.post(replica.url, json={}, headers=replica.auth_headers())
        assert response.status_code == 500
        assert response.json()["error"] == {
            "code": -32603,
            "message": "replica fault 500",
            "data": {"status": 500},
        }
    assert replica.request_count == 3


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_stop_is_prompt_with_open_sessions_and_calls(replica: McpReplica, mode: str) -> None:
    async with connect(replica, mode) as client:
        await client.call_tool("echo", {"text": "warm"})
        async with anyio.create_task_group() as tg:
            before = replica.request_count

            async def slow_call() -> None:
                with pytest.raises(MCPError):
                    await client.call_tool("slow", {"seconds": 30})

            tg.start_soon(slow_call)
            await wait_until(lambda: replica.request_count > before)
            started = time.perf_counter()
            await replica.astop()
            elapsed = time.perf_counter() - started
    report(f"stop with an open {mode} session and a call in flight", elapsed)
    # uvicorn waits shutdown_timeout (0.5 s) for in-flight requests; a legacy session's
    # dispatcher then spends up to 1 s more on a shutdown write that can no longer land.
    assert elapsed < replica.shutdown_timeout + 2.0


# -- the happy path ------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_list_and_call_tools(replica: McpReplica, mode: str) -> None:
    async with connect(replica, mode) as client:
        assert client.protocol_version == PROTOCOL_BY_MODE[mode]
        assert client.server_info is not None
        assert client.server_info.name == "keypool-test-tools"

        listing = await client.list_tools()
        assert sorted(tool.name for tool in listing.tools) == sorted(TOOL_NAMES)
        echo = next(tool for tool in listing.tools if tool.name == "echo")
        assert echo.input_schema["required"] == ["text"]
        assert echo.output_schema is not None

        result = await client.call_tool("echo", {"text": "hello"})
        assert isinstance(result, CallToolResult)
        assert not result.is_error
        assert text_of(result) == "hello"
        # A return annotation makes the tool structured: `{"result": <value>}`.
        assert result.structured_content == {"result": "hello"}

        result = await client.call_tool("add", {"a": 2, "b": 3})
        assert (text_of(result), result.structured_content) == ("5", {"result": 5})

        result = await client.call_tool("slow", {"seconds": 0.01})
        assert text_of(result) == "slept 0.01"


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_tool_errors_are_results_not_exceptions(replica: McpReplica, mode: str) -> None:
    async with connect(replica, mode) as client:
        result = await client.call_tool("fail", {"message": "boom"})
        assert result.is_error
        assert text_of(result) == "Error executing tool fail: boom"
        assert result.structured_content is None

        # An unexpected exception in the tool: its text stays on the server.
        result = await client.call_tool("crash", {"message": "secret detail"})
        assert result.is_error
        assert text_of(result) == "Error executing tool crash"

        # An unknown tool and invalid arguments are tool errors too, not protocol errors.
        result = await client.call_tool("no_such_tool", {})
        assert result.is_error
        assert text_of(result) == "Unknown tool: no_such_tool"
        result = await client.call_tool("add", {"a": "x", "b": 1})
        assert result.is_error
        assert text_of(result).startswith("Error executing tool add: ")

        # The session is unaffected.
        assert text_of(await client.call_tool("echo", {"text": "still here"})) == "still here"


def test_a_fallback_result_can_be_built_locally() -> None:
    fallback = CallToolResult(content=[TextContent(text="all endpoints unavailable")], is_error=True)
    assert fallback.model_dump(by_alias=True, mode="json", exclude_none=True) == {
        "content": [{"type": "text", "text": "all endpoints unavailable"}],
        "isError": True,
        "resultType": "complete",
    }
    # The same model is importable as mcp.types.CallToolResult.
    assert mcp_types.CallToolResult is CallToolResult
    structured = CallToolResult(
        content=[TextContent(type="text", text="{}")], structured_content={}, is_error=False
    )
    assert CallToolResult.model_validate(structured.model_dump(by_alias=True)) == structured


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_one_session_carries_concurrent_calls(replica: McpReplica, mode: str) -> None:
    async with connect(replica, mode) as client:
        results: list[str] = []

        async def call() -> None:
            results.append(text_of(await client.call_tool("slow", {"seconds": 0.3})))

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(call)
        elapsed = time.perf_counter() - started
    assert results == ["slept 0.3"] * 10
    report(f"10 concurrent slow(0.3) calls, {mode}", elapsed)
    assert elapsed < 2.0


@pytest.mark.anyio
async def test_an_exception_leaving_the_session_block_is_wrapped_twice(replica: McpReplica) -> None:
    """Whatever escapes `async with Client(...)` (here our own error) crosses two task groups."""

    async def scenario() -> None:
        async with connect(replica) as client:
            await client.call_tool("echo", {"text": "up"})
            raise LookupError("raised by the caller")

    with pytest.raises(ExceptionGroup) as info:
        await scenario()
    assert group_depth(info.value) == 2
    assert type(only_leaf(info.value)) is LookupError
    # `except*` reaches the leaf whatever the depth.
    caught: list[BaseException] = []
    try:
        await scenario()
    except* LookupError as group:
        caught.extend(leaf_exceptions(group))
    assert [str(e) for e in caught] == ["raised by the caller"]


@pytest.mark.anyio
async def test_timeout_defaults() -> None:
    # An httpx2.AsyncClient passed to streamable_http_client keeps its own timeouts, 5 s for
    # everything by default; only the client the transport creates itself gets 30 s / read 300 s.
    async with httpx2.AsyncClient() as http, create_mcp_http_client() as sdk_default:
        assert http.timeout == httpx2.Timeout(5.0)
        assert sdk_default.timeout == httpx2.Timeout(30.0, read=300.0)
    assert Client("http://127.0.0.1:9/mcp").read_timeout_seconds is None


# -- (a) replica down before connecting ----------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_a_connect_to_a_stopped_replica(mode: str) -> None:
    replica = McpReplica(token=TOKEN)  # never started: nothing listens on its port

    async def scenario() -> None:
        async with connect(replica, mode):
            pytest.fail("connected to a stopped replica")

    started = time.perf_counter()
    with pytest.raises(ExceptionGroup) as info:
        await scenario()
    elapsed = time.perf_counter() - started
    report(f"(a) connect to a stopped replica, {mode}", elapsed)
    assert elapsed < 1.0
    assert group_depth(info.value) == 1
    leaf = only_leaf(info.value)
    assert type(leaf) is httpx2.ConnectError
    assert str(leaf) == "All connection attempts failed"
    assert type(leaf.__cause__) is httpcore2.ConnectError
    assert isinstance(leaf, httpx2.TransportError)
    assert leaf.request.url == replica.url


# -- (b) replica stops under an open session -----------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_b_call_after_the_replica_stopped(replica: McpReplica, mode: str) -> None:
    outcome: dict[str, float | bool] = {}

    async def scenario() -> None:
        async with connect(replica, mode) as client:
            await client.call_tool("echo", {"text": "up"})
            await replica.astop()
            outcome["started"] = time.perf_counter()
            try:
                await client.call_tool("echo", {"text": "down"})
            except anyio.get_cancelled_exc_class():
                # The POST failed in the transport's task group, which cancels this task.
                outcome["cancelled at the call"] = True
                raise
            pytest.fail("call_tool returned with the replica stopped")

    with pytest.raises(ExceptionGroup) as info:
        await scenario()
    elapsed = time.perf_counter() - outcome["started"]
    report(f"(b) call after stop, until the session exits, {mode}", elapsed)
    assert elapsed < 1.0
    assert outcome["cancelled at the call"]
    assert group_depth(info.value) == 1
    leaf = only_leaf(info.value)
    assert type(leaf) is httpx2.ConnectError
    assert type(leaf.__cause__) is httpcore2.ConnectError


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("mode", "code", "message"),
    [
        # uvicorn cancels the request after its graceful-shutdown timeout and answers 500.
        ("auto", INTERNAL_ERROR, GENERIC_HTTP_ERROR),
        # The SSE response stream closes without the JSON-RPC response.
        ("legacy", CONNECTION_CLOSED, "SSE stream ended without a response"),
    ],
    ids=MODES,
)
async def test_b_call_in_flight_when_the_replica_stops(
    replica: McpReplica, mode: str, code: int, message: str
) -> None:
    async with connect(replica, mode) as client:
        await client.call_tool("echo", {"text": "up"})
        before = replica.request_count
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:

            async def stop_once_the_call_arrived() -> None:
                await wait_until(lambda: replica.request_count > before)
                await replica.astop()

            tg.start_soon(stop_once_the_call_arrived)
            with http_responses() as seen, pytest.raises(MCPError) as info:
                await client.call_tool("slow", {"seconds": 30})
        elapsed = time.perf_counter() - started
    report(f"(b) call in flight while the replica stops, {mode}", elapsed)
    assert elapsed < replica.shutdown_timeout + 2.0
    assert (info.value.code, info.value.message, info.value.data) == (code, message, None)
    if mode == "auto":
        assert [r.status for r in seen] == [500]
    else:
        assert [r.status for r in seen] == [200]  # an SSE stream that ended early


# -- (c) wrong token: HTTP 401 -------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("mode", "requests"), [("auto", 2), ("legacy", 1)], ids=MODES)
async def test_c_wrong_token_fails_the_connect(replica: McpReplica, mode: str, requests: int) -> None:
    before = replica.request_count

    async def scenario() -> None:
        async with connect(replica, mode, token="wrong-token"):
            pytest.fail("connected with a wrong token")

    started = time.perf_counter()
    with http_responses() as seen, pytest.raises(ExceptionGroup) as info:
        await scenario()
    elapsed = time.perf_counter() - started
    report(f"(c) connect with a wrong token, {mode}", elapsed)
    assert elapsed < 1.0
    # The MCPError is raised inside the session's task group, which sits inside the
    # transport's: two levels of ExceptionGroup.
    assert group_depth(info.value) == 2
    leaf = only_leaf(info.value)
    assert isinstance(leaf, MCPError)
    assert (leaf.code, leaf.message, leaf.data) == (INTERNAL_ERROR, GENERIC_HTTP_ERROR, None)
    # The status code is not in the exception; only an httpx2 response hook sees it.
    assert "401" not in repr(leaf)
    assert [r.status for r in seen] == [401] * requests
    assert seen[0].headers["www-authenticate"].startswith("Bearer ")
    # "auto" probes server/discover, takes the error as "not a modern server", and falls
    # back to the initialize handshake, which is refused too.
    assert replica.request_count - before == requests
    if mode == "auto":
        assert isinstance(leaf.__context__, MCPError)
        assert leaf.__context__.code == INTERNAL_ERROR


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_c_token_rejected_mid_session(replica: McpReplica, mode: str) -> None:
    async with connect(replica, mode) as client:
        await client.call_tool("echo", {"text": "before"})
        replica.token = "rotated-token"
        started = time.perf_counter()
        with http_responses() as seen, pytest.raises(MCPError) as info:
            await client.call_tool("echo", {"text": "rejected"})
        report(f"(c) call rejected with 401 mid-session, {mode}", time.perf_counter() - started)
        assert (info.value.code, info.value.message) == (INTERNAL_ERROR, GENERIC_HTTP_ERROR)
        assert [r.status for r in seen] == [401]
        # The session survives: with the token accepted again, calls succeed.
        replica.token = TOKEN
        assert text_of(await client.call_tool("echo", {"text": "after"})) == "after"


# -- (d) HTTP 5xx and other statuses -------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("status", [500, 502, 503, 429, 403])
@pytest.mark.parametrize("mode", MODES)
async def test_d_error_status_is_an_mcp_error_at_the_call(
    replica: McpReplica, mode: str, status: int
) -> None:
    async with connect(replica, mode) as client:
        await client.call_tool("echo", {"text": "up"})
        replica.set_fault(status, retry_after=3)
        started = time.perf_counter()
        with http_responses() as seen, pytest.raises(MCPError) as info:
            await client.call_tool("echo", {"text": "x"})
        report(f"(d) HTTP {status} at a call, {mode}", time.perf_counter() - started)
        assert type(info.value) is MCPError
        assert (info.value.code, info.value.message, info.value.data) == (
            INTERNAL_ERROR,
            GENERIC_HTTP_ERROR,
            None,
        )
        assert [(r.status, r.headers["retry-after"]) for r in seen] == [(status, "3")]
        replica.clear_fault()
        assert text_of(await client.call_tool("echo", {"text": "back"})) == "back"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("mode", "code", "message"),
    [("auto", METHOD_NOT_FOUND, "Not Found"), ("legacy", INVALID_REQUEST, "Session terminated")],
    ids=MODES,
)
async def test_d_404_depends_on_the_session(replica: McpReplica, mode: str, code: int, message: str) -> None:
    async with connect(replica, mode) as client:
        await client.call_tool("echo", {"text": "up"})
        replica.set_fault(404)
        with pytest.raises(MCPError) as info:
            await client.call_tool("echo", {"text": "x"})
        assert (info.value.code, info.value.message) == (code, message)
        replica.clear_fault()


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_d_jsonrpc_error_body_is_passed_through(replica: McpReplica, mode: str) -> None:
    async with connect(replica, mode) as client:
        replica.set_fault(503, jsonrpc_error=True)
        with pytest.raises(MCPError) as info:
            await client.call_tool("echo", {"text": "x"})
        assert (info.value.code, info.value.message, info.value.data) == (
            INTERNAL_ERROR,
            "replica fault 503",
            {"status": 503},
        )
        replica.clear_fault()


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_d_error_status_during_connect(replica: McpReplica, mode: str) -> None:
    replica.set_fault(503)

    async def scenario() -> None:
        async with connect(replica, mode):
            pytest.fail("connected to a failing replica")

    with pytest.raises(ExceptionGroup) as info:
        await scenario()
    assert group_depth(info.value) == 2
    leaf = only_leaf(info.value)
    assert isinstance(leaf, MCPError)
    assert (leaf.code, leaf.message) == (INTERNAL_ERROR, GENERIC_HTTP_ERROR)


# -- (e) client-side timeouts --------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_e_read_timeout_seconds_per_call(replica: McpReplica, mode: str) -> None:
    async with connect(replica, mode) as client:
        started = time.perf_counter()
        with pytest.raises(MCPError) as info:
            await client.call_tool("slow", {"seconds": 5}, read_timeout_seconds=0.2)
        elapsed = time.perf_counter() - started
        report(f"(e) call_tool(read_timeout_seconds=0.2), {mode}", elapsed)
        assert 0.2 <= elapsed < 1.0
        assert (info.value.code, info.value.message) == (
            REQUEST_TIMEOUT,
            "Request 'tools/call' timed out",
        )
        # The request is abandoned (its POST aborted), the session lives on.
        assert text_of(await client.call_tool("echo", {"text": "next"})) == "next"


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_e_client_wide_read_timeout(replica: McpReplica, mode: str) -> None:
    async with connect(replica, mode, read_timeout_seconds=0.2) as client:
        with pytest.raises(MCPError) as info:
            await client.call_tool("slow", {"seconds": 5})
        assert info.value.code == REQUEST_TIMEOUT
        # A per-call value overrides the client-wide one.
        result = await client.call_tool("slow", {"seconds": 0.3}, read_timeout_seconds=5)
        assert text_of(result) == "slept 0.3"


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_e_anyio_fail_after(replica: McpReplica, mode: str) -> None:
    async with connect(replica, mode) as client:
        started = time.perf_counter()
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.2):
                await client.call_tool("slow", {"seconds": 5})
        elapsed = time.perf_counter() - started
        report(f"(e) anyio.fail_after(0.2), {mode}", elapsed)
        assert 0.2 <= elapsed < 1.0
        assert text_of(await client.call_tool("echo", {"text": "next"})) == "next"


@pytest.mark.anyio
async def test_e_httpx_read_timeout_kills_a_modern_session(replica: McpReplica) -> None:
    # At 2026-07-28 the server answers a short call with one JSON response, so nothing arrives
    # until the tool is done: httpx2's read timeout fires before the response headers, inside
    # the transport's task, and takes the session down like a connection error.
    outcome: dict[str, float | bool] = {}

    async def scenario() -> None:
        async with connect(replica, "auto", timeout=httpx2.Timeout(10.0, read=0.2)) as client:
            outcome["started"] = time.perf_counter()
            try:
                await client.call_tool("slow", {"seconds": 5})
            except anyio.get_cancelled_exc_class():
                outcome["cancelled at the call"] = True
                raise

    with pytest.raises(ExceptionGroup) as info:
        await scenario()
    elapsed = time.perf_counter() - outcome["started"]
    report("(e) httpx2 read timeout 0.2 s, auto, until the session exits", elapsed)
    assert 0.2 <= elapsed < 1.0
    assert outcome["cancelled at the call"]
    assert group_depth(info.value) == 1
    leaf = only_leaf(info.value)
    assert type(leaf) is httpx2.ReadTimeout
    assert type(leaf.__cause__) is httpcore2.ReadTimeout


@pytest.mark.anyio
async def test_e_httpx_read_timeout_in_a_legacy_session(replica: McpReplica) -> None:
    # At 2025-11-25 the response is an SSE stream whose headers arrive at once; the read
    # timeout then ends the stream, which the transport reports as a closed connection.
    async with connect(replica, "legacy", timeout=httpx2.Timeout(10.0, read=0.2)) as client:
        started = time.perf_counter()
        with pytest.raises(MCPError) as info:
            await client.call_tool("slow", {"seconds": 5})
        assert 0.2 <= time.perf_counter() - started < 1.0
        assert (info.value.code, info.value.message) == (
            CONNECTION_CLOSED,
            "SSE stream ended without a response",
        )
        assert text_of(await client.call_tool("echo", {"text": "next"})) == "next"


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_e_connect_to_a_wedged_replica_needs_an_outer_deadline(replica: McpReplica, mode: str) -> None:
    # The connect has no deadline of its own short of httpx2's read timeout ("auto" bounds
    # its server/discover probe at 10 s, then falls back to an unbounded initialize), but a
    # cancel scope around it unwinds cleanly: a bare TimeoutError, no exception group.
    replica.hang()

    async def scenario() -> None:
        with anyio.fail_after(0.3):
            async with connect(replica, mode):
                pytest.fail("connected to a wedged replica")

    started = time.perf_counter()
    with pytest.raises(TimeoutError):
        await scenario()
    assert 0.3 <= time.perf_counter() - started < 1.0
    replica.clear_fault()


@pytest.mark.anyio
async def test_e_wedged_replica_modern_session_times_out_cleanly(replica: McpReplica) -> None:
    async with connect(replica, "auto", timeout=httpx2.Timeout(10.0, read=1.0)) as client:
        await client.call_tool("echo", {"text": "up"})
        replica.hang()
        started = time.perf_counter()
        for _ in range(4):  # outlasts httpx2's read timeout: each timed-out POST was aborted
            with pytest.raises(MCPError) as info:
                await client.call_tool("echo", {"text": "x"}, read_timeout_seconds=0.3)
            assert info.value.code == REQUEST_TIMEOUT
        elapsed = time.perf_counter() - started
        report("(e) 4 calls to a wedged replica, read_timeout_seconds=0.3, auto", elapsed)
        assert elapsed < 2.0
        replica.clear_fault()
        assert text_of(await client.call_tool("echo", {"text": "back"})) == "back"


@pytest.mark.anyio
async def test_e_wedged_replica_kills_a_legacy_session_later(replica: McpReplica) -> None:
    # At 2025-11-25 a timed-out request's POST is not aborted (the courtesy
    # notifications/cancelled is POSTed instead, and holds up the transport's writer, which
    # sends notifications one at a time). When httpx2's read timeout later fires on the
    # orphaned POST, it takes the whole session down.
    outcome: dict[str, float | bool] = {}

    async def scenario() -> None:
        async with connect(replica, "legacy", timeout=httpx2.Timeout(10.0, read=1.0)) as client:
            await client.call_tool("echo", {"text": "up"})
            replica.hang()
            outcome["started"] = time.perf_counter()
            with pytest.raises(MCPError) as info:
                await client.call_tool("echo", {"text": "x"}, read_timeout_seconds=0.3)
            assert info.value.code == REQUEST_TIMEOUT
            outcome["first timeout"] = time.perf_counter() - outcome["started"]
            try:
                await client.call_tool("echo", {"text": "y"}, read_timeout_seconds=5.0)
            except anyio.get_cancelled_exc_class():
                outcome["second call cancelled"] = True
                raise

    with pytest.raises(ExceptionGroup) as info:
        await scenario()
    replica.clear_fault()
    elapsed = time.perf_counter() - outcome["started"]
    report("(e) wedged replica until the legacy session dies (httpx2 read=1 s)", elapsed)
    assert outcome["first timeout"] < 0.6
    assert outcome["second call cancelled"]
    assert 0.9 <= elapsed < 2.5
    assert group_depth(info.value) == 1
    assert type(only_leaf(info.value)) is httpx2.ReadTimeout


# -- (f) restart and reconnect -------------------------------------------------------------


@pytest.mark.anyio
async def test_f_modern_session_survives_a_restart(replica: McpReplica) -> None:
    async with connect(replica, "auto") as client:
        await client.call_tool("echo", {"text": "before"})
        started = time.perf_counter()
        await replica.arestart()
        report("(f) replica restart with an open auto session", time.perf_counter() - started)
        # No server-side session: the same Client keeps working against the new process.
        started = time.perf_counter()
        assert text_of(await client.call_tool("echo", {"text": "after"})) == "after"
        report("(f) first call after the restart, auto", time.perf_counter() - started)


@pytest.mark.anyio
async def test_f_legacy_session_is_lost_on_restart(replica: McpReplica) -> None:
    async with connect(replica, "legacy") as client:
        await client.call_tool("echo", {"text": "before"})
        await replica.arestart()
        for _ in range(2):  # the session does not re-initialize by itself
            with http_responses() as seen, pytest.raises(MCPError) as info:
                await client.call_tool("echo", {"text": "after"})
            assert (info.value.code, info.value.message) == (INVALID_REQUEST, "Session not found")
            assert [r.status for r in seen] == [404]
    # A new Client is a new session.
    async with connect(replica, "legacy") as client:
        assert text_of(await client.call_tool("echo", {"text": "new"})) == "new"


@pytest.mark.anyio
async def test_f_a_client_object_is_single_use(replica: McpReplica) -> None:
    async with httpx2.AsyncClient(headers=replica.auth_headers()) as http:
        client = Client(streamable_http_client(replica.url, http_client=http))
        async with client:
            await client.call_tool("echo", {"text": "first"})
        with pytest.raises(RuntimeError, match="Client must be used within an async context"):
            await client.call_tool("echo", {"text": "after exit"})

        async def reenter() -> None:
            async with client:
                pytest.fail("re-entered a used Client")

        with pytest.raises(RuntimeError, match="Client is already entered; cannot reenter"):
            await reenter()
        # The httpx2 client outlives the MCP session (the transport does not close a client
        # it was given), so a new Client can reuse it and its connection pool.
        async with Client(streamable_http_client(replica.url, http_client=http)) as fresh:
            assert text_of(await fresh.call_tool("echo", {"text": "fresh"})) == "fresh"
        assert not http.is_closed


# -- ping, health checks, latency ----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_ping_is_deprecated_and_gone_at_2026(replica: McpReplica, mode: str) -> None:
    async with connect(replica, mode) as client:
        if mode == "legacy":
            with pytest.warns(MCPDeprecationWarning, match="ping is removed as of 2026-07-28"):
                await client.send_ping()
        else:
            with (
                pytest.warns(MCPDeprecationWarning, match="ping is removed as of 2026-07-28"),
                pytest.raises(MCPError) as info,
            ):
                await client.send_ping()
            assert (info.value.code, info.value.data) == (METHOD_NOT_FOUND, "ping")
        # A probe that works in both eras and always reaches the server:
        before = replica.request_count
        await client.list_tools(cache_mode="bypass")
        assert replica.request_count == before + 1


@pytest.mark.anyio
async def test_transport_errors_can_be_kept_at_the_call_site(replica: McpReplica) -> None:
    """An httpx2 transport that answers a transport error with a response keeps the session."""
    errors: list[httpx2.TransportError] = []

    class AnswerTransportErrors(httpx2.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx2.AsyncHTTPTransport()

        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            try:
                return await self.inner.handle_async_request(request)
            except httpx2.TransportError as exc:
                errors.append(exc)
                return httpx2.Response(503, request=request)

        async def aclose(self) -> None:
            await self.inner.aclose()

    async with connect(replica, "auto", transport=AnswerTransportErrors()) as client:
        await client.call_tool("echo", {"text": "up"})
        await replica.astop()
        with pytest.raises(MCPError) as info:
            await client.call_tool("echo", {"text": "down"})
        assert info.value.code == INTERNAL_ERROR
        assert [type(e) for e in errors] == [httpx2.ConnectError]
        await replica.astart()
        assert text_of(await client.call_tool("echo", {"text": "back"})) == "back"


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_loopback_call_latency(replica: McpReplica, mode: str) -> None:
    async with connect(replica, mode) as client:
        for _ in range(20):
            await client.call_tool("echo", {"text": "warm-up"})
        samples: list[float] = []
        for _ in range(200):
            started = time.perf_counter()
            await client.call_tool("echo", {"text": "x"})
            samples.append(time.perf_counter() - started)
    samples.sort()
    median = statistics.median(samples)
    print(
        f"LATENCY {mode}: median {median * 1000:.2f} ms, p90 {samples[179] * 1000:.2f} ms, "
        f"p99 {samples[197] * 1000:.2f} ms over 200 calls"
    )
    assert median < 0.03
