"""Real MCP tool servers on loopback, for tests and benchmarks.

`build_mcp_server()` builds an `MCPServer` with a few tools (`echo`, `add`, `fail`, `crash`,
`slow`, `refuse`, `progress`, `meta`, `lookup`), a resource, a resource template, a prompt and a
completion handler. `McpReplica` serves that app with uvicorn on 127.0.0.1 in a background
thread, the way one replica of a tool server would run, with:

* an optional bearer token: a request whose `Authorization` header is not exactly
  `Bearer <token>` gets HTTP 401 before it reaches the MCP app;
* fault switches: `set_fault(503)` makes every HTTP request answer with that status, and
  `hang()` holds every request unanswered, until `clear_fault()`;
* `tool_calls`: how many times each tool started running on this replica (all starts);
* `start()` / `stop()` / `restart()` on the same port, also as `astart()` / `astop()` /
  `arestart()` for async tests, and use as a (sync or async) context manager.

Stopping is prompt even while clients hold sessions or calls open: uvicorn's graceful
shutdown is bounded by `shutdown_timeout` seconds, after which in-flight requests are
cancelled.

This is a helper module, not a test module.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final, Self

import anyio
import uvicorn
from mcp import MCPError
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import Completion, EmptyResult, SetLevelRequestParams, ToolAnnotations
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "LOOPBACK",
    "TOOL_NAMES",
    "McpReplica",
    "build_mcp_app",
    "build_mcp_server",
    "free_port",
]

# Records still propagate to the root logger (pytest captures them); the NullHandlers only keep
# Python's last-resort handler from printing SDK and uvicorn warnings to stderr in scripts.
logging.getLogger("mcp").addHandler(logging.NullHandler())
logging.getLogger("uvicorn").addHandler(logging.NullHandler())

LOOPBACK: Final = "127.0.0.1"
MCP_PATH: Final = "/mcp"
TOOL_NAMES: Final = ("add", "crash", "echo", "fail", "lookup", "meta", "progress", "refuse", "slow")
REFUSE_CODE: Final = -32050  # the JSON-RPC error code the `refuse` tool raises


def build_mcp_server(
    name: str = "keypool-test-tools", on_call: Callable[[str], None] | None = None
) -> MCPServer:
    """An `MCPServer` with the test tools.

    * `echo(text) -> str`: returns `text`.
    * `add(a, b) -> int`: returns `a + b`.
    * `fail(message)`: raises `ToolError(message)`; the client gets `is_error=True` and the text
      `"Error executing tool fail: <message>"`.
    * `crash(message)`: raises `RuntimeError(message)`, an unexpected exception; the client gets
      `is_error=True` and only `"Error executing tool crash"`, the server logs a traceback.
    * `slow(seconds) -> str`: sleeps `seconds` (async), then returns `"slept <seconds>"`.
    * `refuse(message)`: raises `MCPError(REFUSE_CODE, message)`: a JSON-RPC error of the tool's
      own, which the client gets as an `MCPError` with that code and message.
    * `progress(steps) -> int`: reports progress `1..steps` of `steps`, then returns `steps`.
    * `meta() -> str`: the request's `_meta` as JSON.
    * `lookup(key) -> str`: returns `key`; annotated `idempotentHint=True`.
    * resource `keypool://motd`, template `keypool://greeting/{name}`, prompt `summarize(text)`,
      and completions for the prompt's `text` argument (`["alpha", "beta"]` filtered by prefix);
      `logging/setLevel` is answered (and counted as `"logging/setLevel:<level>"`).

    `on_call(tool)` is called as each tool starts.

    `MCPServer.__init__` calls `logging.basicConfig(...)`, which installs a handler on the root
    logger and sets its level when the root logger has no handler yet. That process-wide side
    effect is undone here.
    """
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    try:
        server = MCPServer(name, log_level="WARNING")
    finally:
        root.setLevel(saved_level)
        root.handlers[:] = saved_handlers

    def called(tool: str) -> None:
        if on_call is not None:
            on_call(tool)

    # Async tools run on the event loop; a sync tool would cost a worker-thread hop per call.
    @server.tool()
    async def echo(text: str) -> str:
        """Return the text unchanged."""
        called("echo")
        return text

    @server.tool()
    async def add(a: int, b: int) -> int:
        """Add two integers."""
        called("add")
        return a + b

    @server.tool()
    async def fail(message: str) -> str:
        """Fail the way a tool reports an anticipated error."""
        called("fail")
        raise ToolError(message)

    @server.tool()
    async def crash(message: str) -> str:
        """Fail with an unexpected exception inside the tool."""
        called("crash")
        raise RuntimeError(message)

    @server.tool()
    async def slow(seconds: float) -> str:
        """Sleep, then answer."""
        called("slow")
        await anyio.sleep(seconds)
        return f"slept {seconds}"

    @server.tool()
    async def refuse(message: str) -> str:
        """Answer with a JSON-RPC error of the tool's own."""
        called("refuse")
        raise MCPError(code=REFUSE_CODE, message=message)

    @server.tool()
    async def progress(steps: int, ctx: Context) -> int:  # type: ignore[type-arg]
        """Report progress, then answer."""
        called("progress")
        for step in range(1, steps + 1):
            await ctx.report_progress(step, steps)
        return steps

    @server.tool()
    async def meta(ctx: Context) -> str:  # type: ignore[type-arg]
        """The request's ``_meta``."""
        called("meta")
        return json.dumps(dict(ctx.request_context.meta or {}), sort_keys=True)

    @server.tool(annotations=ToolAnnotations(idempotent_hint=True, read_only_hint=True))
    async def lookup(key: str) -> str:
        """Look a key up (safe to run twice)."""
        called("lookup")
        return key

    @server.resource("keypool://motd")
    async def motd() -> str:
        return "all keys healthy"

    @server.resource("keypool://greeting/{name}")
    async def greeting(name: str) -> str:
        return f"hello {name}"

    @server.prompt()
    async def summarize(text: str) -> str:
        """Summarize a text."""
        return f"Summarize: {text}"

    async def set_level(ctx: Any, params: SetLevelRequestParams) -> EmptyResult:
        called(f"logging/setLevel:{params.level}")  # (a request, not a tool: counted alike)
        return EmptyResult()

    # MCPServer has no decorator for it (logging/setLevel predates MCP 2026-07-28).
    server._lowlevel_server.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)

    @server.completion()
    async def complete(ref: Any, argument: Any, context: Any) -> Completion:
        values = [v for v in ("alpha", "beta") if v.startswith(argument.value)]
        return Completion(values=values, total=len(values), has_more=False)

    return server


def build_mcp_app(
    name: str = "keypool-test-tools", on_call: Callable[[str], None] | None = None, **app_options: Any
) -> ASGIApp:
    """The streamable-HTTP ASGI app (served at `/mcp`) of a fresh `build_mcp_server()`.

    `app_options` go to `MCPServer.streamable_http_app` (e.g. `json_response=True`,
    `stateless_http=True`). An app can be served only once: its session manager refuses a
    second `run()`, so build a new one for every start.
    """
    return build_mcp_server(name, on_call).streamable_http_app(host=LOOPBACK, **app_options)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _bind(port: int) -> socket.socket:
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
    # and without it small responses wait ~40 ms on delayed ACKs.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # Lets a restart rebind the port while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _send_response(
    send: Send, status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> None:
    raw_headers = [(b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class _ReplicaGate:
    """ASGI middleware in front of the MCP app: counts requests, injects faults, checks the token."""

    def __init__(self, app: ASGIApp, replica: McpReplica) -> None:
        self.app = app
        self.replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replica = self.replica
        replica._count_request()
        # Hold the request unanswered while hanging; stop() cancels it. The flag is flipped from
        # another thread, so there is no event to await on this loop.
        while replica._hanging:  # noqa: ASYNC110
            await anyio.sleep(0.01)
        fault = replica._fault
        if fault is not None:
            status, body, headers = fault
            await _send_response(send, status, body, headers)
            return
        token = replica.token
        if token is not None:
            expected = f"Bearer {token}".encode()
            given = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            if given != expected:
                # The same response shape as the SDK's own RequireAuthMiddleware.
                body = json.dumps(
                    {"error": "invalid_token", "error_description": "Authentication required"}
                ).encode()
                www_authenticate = 'Bearer error="invalid_token", error_description="Authentication required"'
                await _send_response(
                    send,
                    401,
                    body,
                    {"content-type": "application/json", "www-authenticate": www_authenticate},
                )
                return
        await self.app(scope, receive, send)


class McpReplica:
    """One replica of the test tool server, served by uvicorn on 127.0.0.1 in a thread.

    Args:
        token: Bearer token the replica requires (`None`: no auth). Can be changed while
            running by assigning `replica.token`.
        port: TCP port on 127.0.0.1; `None` picks a free one. The port is kept across
            `stop()` / `start()`, so a restarted replica answers at the same `url`.
        name: The MCP server name.
        shutdown_timeout: Seconds `stop()` lets in-flight requests (a `slow` call, an open SSE
            stream) finish before cancelling them.
        startup_timeout: Seconds `start()` waits for the server to accept connections.
        app_options: Passed to `MCPServer.streamable_http_app` at every start (e.g.
            `json_response=True`, `stateless_http=True`).
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        port: int | None = None,
        name: str = "keypool-test-tools",
        shutdown_timeout: float = 0.5,
        startup_timeout: float = 10.0,
        app_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.token = token
        self.name = name
        self.shutdown_timeout = shutdown_timeout
        self.startup_timeout = startup_timeout
        self.app_options: dict[str, Any] = dict(app_options or {})
        self._port = port if port is not None else free_port()
        # A port picked here may be taken by someone else before the first start; then pick again.
        self._may_repick_port = port is None
        self._lock = threading.Lock()
        self._requests = 0
        self.tool_calls: Counter[str] = Counter()
        self._fault: tuple[int, bytes, dict[str, str]] | None = None
        self._hanging = False
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None

    # -- addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The streamable-HTTP endpoint, e.g. `http://127.0.0.1:PORT/mcp`."""
        return f"http://{LOOPBACK}:{self._port}{MCP_PATH}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def auth_headers(self, token: str | None = None) -> dict[str, str]:
        """`{"Authorization": "Bearer <token>"}` for `token`, or for this replica's token.

        Empty when neither is set.
        """
        token = token if token is not None else self.token
        return {} if token is None else {"Authorization": f"Bearer {token}"}

    # -- observation and faults ------------------------------------------------------------

    @property
    def request_count(self) -> int:
        """HTTP requests this replica received (all starts), counting rejected ones."""
        with self._lock:
            return self._requests

    def _count_request(self) -> None:
        with self._lock:
            self._requests += 1

    def _count_call(self, tool: str) -> None:
        with self._lock:
            self.tool_calls[tool] += 1

    def set_fault(
        self,
        status: int,
        *,
        jsonrpc_error: bool = False,
        retry_after: int | None = None,
    ) -> None:
        """Answer every HTTP request with `status` until `clear_fault()`.

        The body is plain text, or with `jsonrpc_error=True` a JSON-RPC error object
        (`{"jsonrpc": "2.0", "id": null, "error": {"code": -32603, ...}}`) with an
        `application/json` content type, which the client surfaces as that error.
        `retry_after` adds a `Retry-After` header.
        """
        headers: dict[str, str] = {}
        if jsonrpc_error:
            error = {"code": -32603, "message": f"replica fault {status}", "data": {"status": status}}
            body = json.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()
            headers["content-type"] = "application/json"
        else:
            body = f"replica fault {status}".encode()
            headers["content-type"] = "text/plain; charset=utf-8"
        if retry_after is not None:
            headers["retry-after"] = str(retry_after)
        self._fault = (status, body, headers)

    def hang(self) -> None:
        """Accept requests but answer none until `clear_fault()` (or `stop()`): a wedged replica.

        Held requests resume normally (status fault, auth check, MCP app) once cleared.
        """
        self._hanging = True

    def clear_fault(self) -> None:
        """Undo `set_fault()` and `hang()`."""
        self._fault = None
        self._hanging = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Serve a fresh app on `port`; returns once the server accepts connections."""
        if self.running:
            raise RuntimeError(f"replica on port {self._port} is already running")
        try:
            sock = _bind(self._port)
        except OSError:
            if not self._may_repick_port:
                raise
            self._port = free_port()
            sock = _bind(self._port)
        self._may_repick_port = False
        app = _ReplicaGate(build_mcp_app(self.name, self._count_call, **self.app_options), self)
        config = uvicorn.Config(
            app,
            host=LOOPBACK,
            port=self._port,
            loop="asyncio",
            http="h11",
            lifespan="on",
            log_config=None,
            log_level="warning",
            access_log=False,
            # uvicorn hands this to asyncio.wait_for, which takes float seconds.
            timeout_graceful_shutdown=self.shutdown_timeout,  # type: ignore[arg-type]
        )
        server = uvicorn.Server(config)
        self._thread_error = None
        thread = threading.Thread(
            target=self._serve, args=(server, sock), name=f"mcp-replica-{self._port}", daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not server.started:
            if not thread.is_alive():
                sock.close()
                self._server = self._thread = None
                raise RuntimeError(f"replica on port {self._port} failed to start") from self._thread_error
            if time.monotonic() > deadline:
                self._stop(server, thread)
                raise TimeoutError(f"replica on port {self._port} did not start in time")
            time.sleep(0.005)
        return self

    def _serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # uvicorn calls sys.exit() when startup fails
            self._thread_error = exc
        finally:
            sock.close()

    def stop(self) -> None:
        """Stop serving and wait for the server thread; a no-op when not running.

        Open connections are closed; requests still in flight after `shutdown_timeout`
        seconds are cancelled.
        """
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None and thread is not None:
            self._stop(server, thread)

    def _stop(self, server: uvicorn.Server, thread: threading.Thread) -> None:
        server.should_exit = True
        thread.join(self.shutdown_timeout + 5.0)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5.0)
        if thread.is_alive():
            raise RuntimeError(f"replica on port {self._port} did not stop")

    def restart(self) -> Self:
        """`stop()` then `start()` on the same port (a fresh app: no server-side state survives)."""
        self.stop()
        return self.start()

    async def astart(self) -> Self:
        """`start()` in a worker thread, leaving the event loop free meanwhile."""
        return await anyio.to_thread.run_sync(self.start)

    async def astop(self) -> None:
        """`stop()` in a worker thread, leaving the event loop free meanwhile."""
        await anyio.to_thread.run_sync(self.stop)

    async def arestart(self) -> Self:
        """`restart()` in a worker thread, leaving the event loop free meanwhile."""
        return await anyio.to_thread.run_sync(self.restart)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"McpReplica(url={self.url!r}, {state}, auth={self.token is not None})"
