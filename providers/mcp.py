"""MCPClient: tool calls to MCP servers behind a circuit breaker per endpoint.

The endpoints of one tool server (its replicas, each with its own token) are pooled like keys: a
call goes to a healthy endpoint, fails over to another, and when every endpoint is open returns a
structured fallback ``CallToolResult(is_error=True)`` saying which server, that the circuit is open
and when to retry (or raises, with ``on_unavailable="raise"``). What counts against an endpoint:
transport failures, protocol errors, timeouts and HTTP 5xx; a 401/403 quarantines its token; a 429
keeps it out until its Retry-After. A tool's own error (``is_error=True``) counts against nothing.

Each endpoint keeps one ``mcp.Client`` session, owned by a task of the ``MCPClient``'s own task
group (so a failing session can never cancel a caller), re-established after a failure. Transport
errors are answered inside the HTTP layer with a synthetic 503, so they surface at the call site as
an ``MCPError`` instead of tearing down the session, and the HTTP status behind every call is
observed there too, which is how a 401 is told from a 503.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

import anyio
import httpx2
from anyio.abc import TaskGroup
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp_types import INVALID_PARAMS, CallToolResult, TextContent, Tool
from pydantic import SecretStr

from keypool import (
    BreakerConfig,
    Capacity,
    Clock,
    ConfigError,
    KeyPool,
    KeySpec,
    Lease,
    NoKeyAvailable,
    Outcome,
    OutcomeKind,
    classify_status,
    fingerprint,
)

from ._health import HealthReport, KeyHealth

__all__ = ["MCPClient", "MCPEndpoint"]

log = logging.getLogger("keypool.mcp")

_SYNTHETIC = "x-keypool-synthetic"
_DEFAULT_RETRY_AFTER = 1.0
_BUSY_POLL = 0.005  # seconds between looks while every endpoint in service is at its limit


@dataclass(frozen=True, slots=True)
class MCPEndpoint:
    """One replica of a tool server: its streamable-HTTP URL, optional bearer token and id."""

    url: str
    token: SecretStr | None = None
    key_id: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.token, str):  # accept a plain string, but never hold it in the clear
            object.__setattr__(self, "token", SecretStr(self.token))

    def id(self) -> str:
        return self.key_id or fingerprint(self.url, prefix="endpoint")


@dataclass
class _Observed:
    """The HTTP side of one MCP call, filled in by the transport below."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    transport_error: str | None = None


_observed: ContextVar[_Observed | None] = ContextVar("keypool_mcp_observed", default=None)


class _ObservingTransport(httpx2.AsyncBaseTransport):
    """Records each response's status for the calling task; turns transport errors into a 503."""

    def __init__(self, inner: httpx2.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        seen = _observed.get()
        try:
            response = await self.inner.handle_async_request(request)
        except httpx2.TransportError as exc:
            if seen is not None:
                seen.status, seen.transport_error = 503, type(exc).__name__
            return httpx2.Response(503, request=request, headers={_SYNTHETIC: "1"})
        if seen is not None and (seen.status is None or response.status_code >= 400):
            seen.status = response.status_code
            seen.headers = {k.lower(): v for k, v in response.headers.items() if "retry" in k.lower()}
        return response

    async def aclose(self) -> None:
        """Nothing: every endpoint's client shares this transport; MCPClient closes the inner one."""


class _Endpoint:
    """An endpoint's session, owned by a task of the MCPClient's group."""

    def __init__(self, spec: MCPEndpoint, http: httpx2.AsyncClient) -> None:
        self.spec = spec
        self.key_id = spec.id()
        self.http = http
        self.client: Client | None = None
        self.error: BaseException | None = None
        self.opened = anyio.Event()
        self.closing = anyio.Event()
        self.lock = anyio.Lock()
        self.opening = _Observed()
        self.tools: tuple[float, list[Tool]] | None = None


def _leaf(error: BaseException) -> BaseException:
    """The first real error inside the exception groups the SDK's task groups wrap it in."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


class _NotTheEndpoints(Exception):
    """A failure that another endpoint would repeat (the caller's request is wrong)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _classify(error: BaseException, seen: _Observed) -> Outcome:
    """What a failed MCP call says about its endpoint."""
    status = seen.status
    if status == 404:  # the endpoint lost our session (restart) or serves no MCP at this URL
        return Outcome(OutcomeKind.FAILURE, status=404, detail="session not found")
    if status is not None and status >= 400:
        return classify_status(status, seen.headers)
    if isinstance(error, MCPError) and error.code == INVALID_PARAMS:
        return Outcome(OutcomeKind.CALLER_ERROR, detail="invalid params")
    return Outcome(OutcomeKind.FAILURE, detail=type(error).__name__)


class MCPClient:
    """Tool calls to one MCP tool server with several endpoints, each behind its own breaker.

    Use it as an async context manager (it owns the sessions' tasks)::

        async with MCPClient("search-tools", ["http://10.0.0.5:8000/mcp", ...]) as tools:
            result = await tools.call_tool("search", {"q": "keypool"})

    ``call_timeout`` is one deadline for a call across all its attempts; ``wait_for_recovery``
    lets a call wait that long for an endpoint expected back soon before falling back.
    """

    def __init__(
        self,
        name: str,
        endpoints: Sequence[str | MCPEndpoint],
        *,
        pool: KeyPool | None = None,
        breaker: BreakerConfig | None = None,
        on_unavailable: Literal["fallback", "raise"] = "fallback",
        call_timeout: float = 30.0,
        wait_for_recovery: float = 0.0,
        tools_ttl: float = 300.0,
        mode: Literal["auto", "legacy", "2026-07-28"] = "auto",
        clock: Clock | None = None,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        specs = [e if isinstance(e, MCPEndpoint) else MCPEndpoint(url=e) for e in endpoints]
        if not specs:
            raise ConfigError("endpoints: at least one MCP endpoint URL is required")
        if on_unavailable not in ("fallback", "raise"):
            raise ConfigError(f"on_unavailable: must be 'fallback' or 'raise' (got {on_unavailable!r})")
        if call_timeout <= 0:
            raise ConfigError(f"call_timeout: must be > 0 seconds (got {call_timeout})")
        self.name = name
        self.on_unavailable = on_unavailable
        self.call_timeout = call_timeout
        self.wait_for_recovery = wait_for_recovery
        self.tools_ttl = tools_ttl
        self.mode = mode
        keys = [
            KeySpec(
                # The pool tells endpoints apart: replicas may share one token.
                secret=SecretStr(f"{s.url}\n{s.token.get_secret_value() if s.token else ''}"),
                key_id=s.id(),
            )
            for s in specs
        ]
        if pool is None:
            pool = KeyPool(clock=clock)
        if name not in pool.providers:
            pool.add_provider({"name": name, "keys": keys, "breaker": breaker or BreakerConfig()})
        self.pool = pool
        self._owns_transport = transport is None  # a transport you pass is yours to close
        self._transport = _ObservingTransport(transport or httpx2.AsyncHTTPTransport())
        self._endpoints: dict[str, _Endpoint] = {}
        for spec in specs:
            headers = {"Authorization": f"Bearer {spec.token.get_secret_value()}"} if spec.token else {}
            http = httpx2.AsyncClient(
                headers=headers,
                transport=self._transport,
                timeout=httpx2.Timeout(300.0, connect=5.0),  # deadlines are per call, below
            )
            self._endpoints[spec.id()] = _Endpoint(spec, http)
        self._group: TaskGroup | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose(et, exc, tb)

    async def aclose(
        self,
        et: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        """Close every session and HTTP client this object opened."""
        for ep in self._endpoints.values():
            ep.closing.set()
        if self._group is not None:
            group, self._group = self._group, None
            group.cancel_scope.cancel()
            if isinstance(exc, Exception):  # the caller's own error propagates as is, not in a group
                et = exc = tb = None
            await group.__aexit__(et, exc, tb)
        for ep in self._endpoints.values():
            await ep.http.aclose()
        if self._owns_transport:
            await self._transport.inner.aclose()

    async def _own(
        self, ep: _Endpoint, opened: anyio.Event, closing: anyio.Event, opening: _Observed
    ) -> None:
        """Hold an endpoint's session open until it is closed or breaks.

        The events are this session's own: a dropped session may still be closing while its
        successor opens, and must not touch the successor's state.
        """
        _observed.set(opening)
        mine: Client | None = None
        try:
            # Opening is bounded like a call: a wedged endpoint must not hold this task (and a
            # connection) until httpx2's read timeout, long after the caller has given up.
            with anyio.CancelScope(deadline=anyio.current_time() + self.call_timeout) as bound:
                async with Client(
                    streamable_http_client(ep.spec.url, http_client=ep.http), mode=self.mode
                ) as client:
                    bound.deadline = math.inf
                    mine = ep.client = client
                    opened.set()
                    await closing.wait()
        except Exception as exc:
            if ep.closing is closing:
                ep.error = exc
        finally:
            if mine is not None and ep.client is mine:
                ep.client = None
            opened.set()

    def _require_open(self) -> TaskGroup:
        if self._group is None:
            raise ConfigError("MCPClient must be used inside 'async with MCPClient(...) as client:'")
        return self._group

    async def _session(self, ep: _Endpoint) -> Client:
        if ep.client is not None:
            return ep.client
        group = self._require_open()
        async with ep.lock:
            if ep.client is not None:
                return ep.client
            ep.opened, ep.closing, ep.error = anyio.Event(), anyio.Event(), None
            ep.opening = _Observed()
            group.start_soon(self._own, ep, ep.opened, ep.closing, ep.opening)
            await ep.opened.wait()
            if ep.client is None:
                raise _leaf(ep.error) if ep.error else MCPError(-32000, "session closed while opening")
            return ep.client

    def _drop(self, ep: _Endpoint) -> None:
        """Forget a session after a failure; the next call opens a fresh one."""
        ep.closing.set()
        ep.client = None
        ep.tools = None

    # ------------------------------------------------------------------ calls

    async def _attempt(self, lease: Lease, deadline: float, op: str, *args: Any) -> Any:
        """One attempt on the leased endpoint; records the outcome on the lease.

        A kept-open session that the endpoint no longer knows (HTTP 404: a legacy-mode replica
        restarted) is reopened once within the attempt instead of failing it.
        """
        ep = self._endpoints[lease.key_id]
        reopened = False
        while True:
            seen = _Observed()
            token = _observed.set(seen)
            reused = ep.client is not None
            try:
                with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                    client = await self._session(ep)
                    result: Any
                    if op == "call_tool":
                        result = await client.call_tool(*args)
                    else:
                        result = (await client.list_tools(cache_mode="bypass")).tools
            except Exception as exc:
                opening = ep.opening if ep.client is None else seen
                outcome = _classify(exc, seen if seen.status else opening)
                if outcome.kind is not OutcomeKind.CALLER_ERROR:
                    self._drop(ep)
                if reused and not reopened and seen.status == 404:
                    reopened = True
                    continue
                lease.record(outcome)
                if not outcome.kind.retry_elsewhere:
                    raise _NotTheEndpoints(exc) from exc  # the call is wrong: no other replica
                raise
            except BaseException:
                lease.release()
                raise
            finally:
                _observed.reset(token)
            lease.success()
            return result

    async def _run(self, op: str, *args: Any, timeout: float | None = None) -> Any:
        """Run ``op`` on endpoints in turn until one answers, the attempts or the deadline run out."""
        self._require_open()  # misuse is the caller's error, not an endpoint failure
        deadline = time.monotonic() + (timeout or self.call_timeout)
        tried: set[str] = set()
        last: BaseException | None = None
        while len(tried) < len(self._endpoints) and time.monotonic() < deadline:
            try:
                lease = await self.pool.acquire(self.name, timeout=self.wait_for_recovery, exclude=tried)
            except NoKeyAvailable as exc:
                if self._busy(tried) and time.monotonic() + _BUSY_POLL < deadline:
                    await anyio.sleep(_BUSY_POLL)  # an endpoint is only at its limit: not a fallback
                    continue
                return self._unavailable(exc, last)
            tried.add(lease.key_id)
            try:
                return await self._attempt(lease, deadline, op, *args)
            except _NotTheEndpoints as wrong:
                raise wrong.error from None
            except Exception as exc:
                last = exc
        capacity = self.pool.capacity(self.name)
        retry = capacity.next_recovery_in
        if retry is None and capacity.status != "down":
            retry = _DEFAULT_RETRY_AFTER  # endpoints still in service: the attempts ran out first
        return self._unavailable(NoKeyAvailable(self.name, retry, "every endpoint tried failed"), last)

    def _busy(self, tried: set[str]) -> bool:
        """Whether an endpoint not tried yet is in service but has no free slot right now."""
        for key_id in self._endpoints:
            if key_id not in tried:
                row = self.pool.key_stats(key_id, self.name)
                if row["in_flight"] and row["state"] != "open":
                    return True
        return False

    def _unavailable(self, exc: NoKeyAvailable, last: BaseException | None) -> CallToolResult:
        if self.on_unavailable == "raise":
            raise exc from last
        retry = exc.retry_after
        when = f"retry after {retry:.1f} s" if retry is not None else "no endpoint recovers by itself"
        return CallToolResult(
            content=[
                TextContent(
                    type="text",
                    text=f"Tool server {self.name!r} is unavailable (circuit open); {when}.",
                )
            ],
            structured_content={
                "error": "circuit_open",
                "server": self.name,
                "retry_after": retry,
                "endpoints": {row["key_id"]: row["state"] for row in self.pool.stats(self.name)},
                "last_error": type(_leaf(last)).__name__ if last is not None else None,
            },
            is_error=True,
        )

    async def call_tool(
        self, name: str, arguments: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> CallToolResult:
        """Call a tool on a healthy endpoint; a structured fallback when none can take it."""
        result: CallToolResult = await self._run("call_tool", name, dict(arguments or {}), timeout=timeout)
        return result

    async def list_tools(self, *, refresh: bool = False) -> list[Tool]:
        """The server's tools, cached per endpoint for ``tools_ttl`` seconds."""
        now = time.monotonic()
        if not refresh:
            for ep in self._endpoints.values():
                if ep.tools is not None and ep.tools[0] > now:
                    return list(ep.tools[1])
        tools: Any = await self._run("list_tools")
        if isinstance(tools, CallToolResult):  # every endpoint down
            raise NoKeyAvailable(
                self.name, tools.structured_content.get("retry_after") if tools.structured_content else None
            )
        for ep in self._endpoints.values():
            if ep.client is not None:
                ep.tools = (now + self.tools_ttl, list(tools))
        return list(tools)

    # ------------------------------------------------------------------ observation

    def capacity(self) -> Capacity:
        return self.pool.capacity(self.name)

    async def health_check(self) -> HealthReport:
        """Probe each endpoint whose breaker admits a call with a ``tools/list``; skip open ones."""
        self._require_open()
        rows: list[KeyHealth] = []
        for key_id in self.pool.key_ids(self.name):
            lease = self.pool.try_acquire_key(self.name, key_id)
            if lease is None:
                self.pool.note_rejected(self.name, "probe_skipped", key_id)
                rows.append(
                    KeyHealth(key_id, "skipped", state=self.pool.key_stats(key_id, self.name)["state"])
                )
                continue
            probes = 0
            while lease is not None:
                probes += 1
                trial, started = lease.trial, time.monotonic()
                try:
                    await self._attempt(lease, started + self.call_timeout, "list_tools")
                    result: Literal["ok", "failed"] = "ok"
                except Exception:
                    result = "failed"
                state = self.pool.key_stats(key_id, self.name)["state"]
                lease = None
                # A half-open endpoint is probed until its trials close it, as the HTTP probes do,
                # so a recovered endpoint is back within one round.
                needed = self.pool.breaker_config(key_id, self.name).success_threshold
                if result == "ok" and trial and state == "half_open" and probes < needed:
                    lease = self.pool.try_acquire_key(self.name, key_id)
            rows.append(KeyHealth(key_id, result, latency=time.monotonic() - started, state=state))
        return HealthReport(self.name, tuple(rows))

    def __repr__(self) -> str:
        return f"MCPClient(name={self.name!r}, endpoints={list(self._endpoints)})"
