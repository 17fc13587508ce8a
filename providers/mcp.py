"""MCPClient: calls to MCP servers behind a circuit breaker per endpoint.

The endpoints of one tool server (its replicas, each with its own token) are pooled like keys: a
call goes to a healthy endpoint, fails over to another, and when every endpoint is open returns a
structured fallback ``CallToolResult(is_error=True)`` saying which server, that the circuit is open
and when to retry (or raises, with ``on_unavailable="raise"``).

Whose failure is it?

- the endpoint's: transport failures, protocol errors, HTTP 5xx, an attempt that outlives
  ``attempt_timeout``; a 401/403 quarantines its token; a 429 keeps it out until its Retry-After;
- the tool's: a JSON-RPC error the server answers with (``MCPError``): raised to the caller with
  its message and code, never counted against the endpoint (it answered); a tool's own
  ``is_error=True`` result likewise;
- the caller's: a request the server calls wrong (invalid params, unknown method, HTTP 400), and
  a call whose caller deadline (``timeout``, ``read_timeout_seconds``) expires: counted against
  nobody, and never re-run.

A failed attempt is retried on another endpoint when the request cannot have run (the endpoint
refused it, or never got it) or is idempotent (reads, and tools declared so: ``idempotent_tools``,
``idempotent=True`` or the server's ``idempotentHint``). A failure ends only its own call: sessions
are shared by concurrent calls and replaced (see ``providers._mcp_session``) without failing the
calls in flight on them, and each attempt is bounded so calls do not pile onto a hung endpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import anyio
import httpx2
from anyio.abc import TaskGroup
from mcp import Client, MCPError
from mcp.shared.dispatcher import ProgressFnT
from mcp_types import (
    CONNECTION_CLOSED,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    REQUEST_TIMEOUT,
    CallToolResult,
    CompleteResult,
    EmptyResult,
    GetPromptResult,
    ListPromptsResult,
    ListResourcesResult,
    ListResourceTemplatesResult,
    LoggingLevel,
    PromptReference,
    ReadResourceResult,
    RequestParamsMeta,
    ResourceTemplateReference,
    SetLevelRequest,
    SetLevelRequestParams,
    TextContent,
    Tool,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
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
from ._mcp_session import Endpoint, Observed, ObservingTransport, Session, SessionFailed, leaf, observed

__all__ = ["MCPClient", "MCPEndpoint"]

log = logging.getLogger("keypool.mcp")

_DEFAULT_RETRY_AFTER = 1.0
_BUSY_POLL = 0.005  # seconds between looks while every endpoint in service is at its limit
_CALLERS_CODES = frozenset({INVALID_PARAMS, METHOD_NOT_FOUND, INVALID_REQUEST})  # the request is wrong
_REFUSED = frozenset({401, 403, 429, 502, 503, 504})  # answered before the request reached a tool
_NEVER_SENT = frozenset({"ConnectError", "ConnectTimeout", "PoolTimeout"})
_T = TypeVar("_T")


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


@dataclass(frozen=True, slots=True)
class _Request:
    """One MCP request as the attempt loop runs it."""

    label: str  # for messages: "tools/call search"
    send: Callable[[Client], Awaitable[Any]]
    deadline: float  # the caller's (time.monotonic())
    timeout: float  # the same, as the caller gave it (seconds)
    idempotent: bool  # may run again elsewhere after it may have run once
    fallback: bool  # a structured is_error result instead of raising (tool calls)


Verdict = Literal["ok", "answered", "caller", "deadline", "endpoint"]
Step = Literal["return", "raise", "retry", "timeout", "failed"]


@dataclass(slots=True)
class _Attempt:
    """How one attempt on one endpoint ended, and whose it was."""

    endpoint: str
    verdict: Verdict
    result: Any = None
    error: BaseException | None = None
    may_have_run: bool = False  # the request reached the endpoint and its fate is unknown


def _next_step(request: _Request, attempt: _Attempt) -> Step:
    """What a call does after an attempt: the one place that decides (no I/O)."""
    if attempt.verdict == "ok":
        return "return"
    if attempt.verdict in ("answered", "caller"):
        return "raise"
    if attempt.verdict == "deadline":
        return "timeout"
    if attempt.may_have_run and not request.idempotent:
        return "failed"  # it may have run: running it again elsewhere could run it twice
    return "retry"


class MCPClient:
    """Calls to one MCP server with several endpoints, each behind its own breaker.

    Use it as an async context manager (it owns the sessions' tasks)::

        async with MCPClient("search-tools", ["http://10.0.0.5:8000/mcp", ...]) as tools:
            result = await tools.call_tool("search", {"q": "keypool"})

    ``call_timeout`` is the default deadline of a call across all its attempts; ``attempt_timeout``
    bounds each attempt (``None``: only the deadline), so a hung endpoint costs a call one attempt
    and then counts against the endpoint; ``wait_for_recovery`` lets a call wait that long for an
    endpoint expected back soon before falling back. ``idempotent_tools`` may run again on another
    endpoint after an attempt whose outcome is unknown.
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
        attempt_timeout: float | None = 10.0,
        wait_for_recovery: float = 0.0,
        idempotent_tools: Iterable[str] = (),
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
        if attempt_timeout is not None and attempt_timeout <= 0:
            raise ConfigError(f"attempt_timeout: must be > 0 seconds or None (got {attempt_timeout})")
        self.name = name
        self.on_unavailable = on_unavailable
        self.call_timeout = call_timeout
        self.attempt_timeout = attempt_timeout
        self.wait_for_recovery = wait_for_recovery
        self.idempotent_tools = frozenset(idempotent_tools)
        self.tools_ttl = tools_ttl
        self.mode = mode
        self._log_level: LoggingLevel | None = None
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
        self._transport = ObservingTransport(transport or httpx2.AsyncHTTPTransport())
        self._endpoints: dict[str, Endpoint] = {}
        for spec in specs:
            headers = {"Authorization": f"Bearer {spec.token.get_secret_value()}"} if spec.token else {}
            http = httpx2.AsyncClient(
                headers=headers,
                transport=self._transport,
                timeout=httpx2.Timeout(300.0, connect=5.0),  # deadlines are per attempt, below
            )
            self._endpoints[spec.id()] = Endpoint(spec.url, spec.id(), http)
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
            ep.close()
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

    def _require_open(self) -> TaskGroup:
        if self._group is None:
            raise ConfigError("MCPClient must be used inside 'async with MCPClient(...) as client:'")
        return self._group

    # ------------------------------------------------------------------ one attempt

    async def _attempt(self, lease: Lease, request: _Request) -> _Attempt:
        """One attempt on the leased endpoint; records the outcome on the lease.

        A kept-open session that the endpoint no longer knows (HTTP 404: a legacy-mode replica
        restarted) is reopened once within the attempt instead of failing it.
        """
        ep = self._endpoints[lease.key_id]
        group = self._require_open()
        limit = request.deadline
        if self.attempt_timeout is not None:
            limit = min(limit, time.monotonic() + self.attempt_timeout)
        opening_bound = self.attempt_timeout or self.call_timeout  # not any one caller's deadline

        def open_by() -> float:
            return anyio.current_time() + opening_bound

        reopened = False
        while True:
            seen = Observed()
            token = observed.set(seen)
            session: Session | None = None
            try:
                with anyio.CancelScope(
                    deadline=anyio.current_time() + max(0.0, limit - time.monotonic())
                ) as scope:
                    async with ep.use(group, open_by, self.mode, self._log_level) as (client, session):
                        result = await request.send(client)
                if scope.cancelled_caught:
                    return self._timed_out(lease, request, limit, sent=session is not None)
            except SessionFailed as failed:
                return self._failed(lease, ep, None, failed.error, failed.opening, sent=False)
            except Exception as exc:
                if seen.status == 404 and session is not None and not reopened:
                    ep.replace(session)  # the endpoint lost our session: open a fresh one, once
                    reopened = True
                    continue
                return self._failed(lease, ep, session, exc, seen, sent=session is not None)
            except BaseException:
                lease.release()
                raise
            finally:
                observed.reset(token)
            lease.success()
            return _Attempt(lease.key_id, "ok", result)

    def _timed_out(self, lease: Lease, request: _Request, limit: float, *, sent: bool) -> _Attempt:
        if limit >= request.deadline:  # the caller's own deadline: nobody's failure
            lease.release()
            return _Attempt(lease.key_id, "deadline", error=TimeoutError(f"{request.label} timed out"))
        lease.record(Outcome(OutcomeKind.FAILURE, detail="attempt timed out"))
        error = TimeoutError(f"{request.label} on endpoint {lease.key_id!r} exceeded attempt_timeout")
        return _Attempt(lease.key_id, "endpoint", error=error, may_have_run=sent)

    def _failed(
        self,
        lease: Lease,
        ep: Endpoint,
        session: Session | None,
        exc: BaseException,
        http: Observed,
        *,
        sent: bool,
    ) -> _Attempt:
        """Judge a failed attempt (whose was it, may it have run), record it, and say so."""
        error = leaf(exc)
        status = http.status
        if isinstance(error, MCPError) and error.code == REQUEST_TIMEOUT:  # the caller's read timeout
            lease.release()
            return _Attempt(lease.key_id, "deadline", error=error)
        if status is not None and status >= 400:
            outcome = (
                Outcome(OutcomeKind.FAILURE, status=404, detail="session not found")
                if status == 404
                else classify_status(status, http.headers)
            )
            lease.record(outcome)
            if outcome.kind is OutcomeKind.CALLER_ERROR:
                return _Attempt(lease.key_id, "caller", error=error)
            if session is not None and status in (401, 403, 404):
                ep.replace(session)
            ran = sent and status not in _REFUSED
            if status == 503 and http.transport_error is not None:
                ran = sent and http.transport_error not in _NEVER_SENT
            return _Attempt(lease.key_id, "endpoint", error=error, may_have_run=ran)
        if isinstance(error, MCPError) and error.code != CONNECTION_CLOSED:
            if error.code in _CALLERS_CODES:
                lease.record(Outcome(OutcomeKind.CALLER_ERROR, detail=f"JSON-RPC {error.code}"))
                return _Attempt(lease.key_id, "caller", error=error)
            lease.success()  # the endpoint answered: the error is the tool's (or the server's)
            return _Attempt(lease.key_id, "answered", error=error)
        # The session broke, or the answer made no sense: the endpoint's failure.
        lease.record(Outcome(OutcomeKind.FAILURE, detail=type(error).__name__))
        if session is not None:
            ep.replace(session)
        return _Attempt(lease.key_id, "endpoint", error=error, may_have_run=sent)

    # ------------------------------------------------------------------ the attempt loop

    def _request(
        self,
        label: str,
        send: Callable[[Client], Awaitable[Any]],
        *,
        timeout: float | None,
        idempotent: bool = True,
        fallback: bool = False,
    ) -> _Request:
        seconds = timeout or self.call_timeout
        return _Request(label, send, time.monotonic() + seconds, seconds, idempotent, fallback)

    async def _run(self, request: _Request) -> Any:
        """Run ``request`` on endpoints in turn until one answers, or attempts or time run out."""
        self._require_open()  # misuse is the caller's error, not an endpoint failure
        tried: set[str] = set()
        last: BaseException | None = None
        while len(tried) < len(self._endpoints) and time.monotonic() < request.deadline:
            try:
                lease = await self.pool.acquire(self.name, timeout=self.wait_for_recovery, exclude=tried)
            except NoKeyAvailable as exc:
                if self._busy(tried) and time.monotonic() + _BUSY_POLL < request.deadline:
                    await anyio.sleep(_BUSY_POLL)  # an endpoint is only at its limit: not a fallback
                    continue
                return self._unavailable(request, exc, last)
            tried.add(lease.key_id)
            attempt = await self._attempt(lease, request)
            step = _next_step(request, attempt)
            if step == "return":
                return attempt.result
            if step == "raise":
                assert attempt.error is not None
                raise attempt.error
            if step in ("timeout", "failed"):
                return self._gave_up(request, attempt, step)
            last = attempt.error
        capacity = self.pool.capacity(self.name)
        retry = capacity.next_recovery_in
        if retry is None and capacity.status != "down":
            retry = _DEFAULT_RETRY_AFTER  # endpoints still in service: the attempts ran out first
        return self._unavailable(
            request, NoKeyAvailable(self.name, retry, "every endpoint tried failed"), last
        )

    def _busy(self, tried: set[str]) -> bool:
        """Whether an endpoint not tried yet is in service but has no free slot right now."""
        for key_id in self._endpoints:
            if key_id not in tried:
                row = self.pool.key_stats(key_id, self.name)
                if row["in_flight"] and row["state"] != "open":
                    return True
        return False

    def _fallback(self, text: str, content: dict[str, Any]) -> CallToolResult:
        return CallToolResult(
            content=[TextContent(type="text", text=text)],
            structured_content={"server": self.name, **content},
            is_error=True,
        )

    def _unavailable(self, request: _Request, exc: NoKeyAvailable, last: BaseException | None) -> Any:
        if self.on_unavailable == "raise" or not request.fallback:
            raise exc from last
        retry = exc.retry_after
        when = f"retry after {retry:.1f} s" if retry is not None else "no endpoint recovers by itself"
        return self._fallback(
            f"Tool server {self.name!r} is unavailable (circuit open); {when}.",
            {
                "error": "circuit_open",
                "retry_after": retry,
                "endpoints": {row["key_id"]: row["state"] for row in self.pool.stats(self.name)},
                "last_error": type(leaf(last)).__name__ if last is not None else None,
            },
        )

    def _gave_up(self, request: _Request, attempt: _Attempt, step: Step) -> Any:
        """The deadline passed, or an attempt failed after the request may have run."""
        assert attempt.error is not None
        if self.on_unavailable == "raise" or not request.fallback:
            raise attempt.error
        if step == "timeout":
            return self._fallback(
                f"{request.label} on {self.name!r} did not finish within {request.timeout:g} s.",
                {"error": "timeout", "timeout": request.timeout, "endpoint": attempt.endpoint},
            )
        return self._fallback(
            f"{request.label} failed on endpoint {attempt.endpoint!r} of {self.name!r} after it may have "
            "run; not re-run elsewhere (the tool is not declared idempotent).",
            {
                "error": "call_failed",
                "endpoint": attempt.endpoint,
                "last_error": type(attempt.error).__name__,
                "retried": False,
            },
        )

    # ------------------------------------------------------------------ the MCP surface

    def _idempotent(self, tool: str) -> bool:
        if tool in self.idempotent_tools:
            return True
        for ep in self._endpoints.values():  # what the server declared, if its tools are known
            if ep.tools is not None:
                for known in ep.tools[1]:
                    if known.name == tool and known.annotations is not None:
                        return bool(known.annotations.idempotent_hint)
        return False

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        read_timeout_seconds: float | None = None,
        progress_callback: ProgressFnT | None = None,
        meta: RequestParamsMeta | None = None,
        idempotent: bool | None = None,
    ) -> CallToolResult:
        """Call a tool on a healthy endpoint; a structured fallback when none can take it.

        ``timeout`` is this call's deadline (default ``call_timeout``); ``read_timeout_seconds``,
        ``progress_callback`` and ``meta`` go to the SDK's ``call_tool``; ``idempotent`` (default:
        ``idempotent_tools`` or the server's hint) lets a failed attempt run again elsewhere.
        """
        args = dict(arguments or {})

        async def send(client: Client) -> CallToolResult:
            return await client.call_tool(
                name,
                args,
                read_timeout_seconds=read_timeout_seconds,
                progress_callback=progress_callback,
                meta=meta,
            )

        once = self._idempotent(name) if idempotent is None else idempotent
        request = self._request(f"tools/call {name!r}", send, timeout=timeout, idempotent=once, fallback=True)
        result: CallToolResult = await self._run(request)
        return result

    async def list_tools(self, *, refresh: bool = False, timeout: float | None = None) -> list[Tool]:
        """The server's tools, cached per endpoint for ``tools_ttl`` seconds."""
        now = time.monotonic()
        if not refresh:
            for ep in self._endpoints.values():
                if ep.tools is not None and ep.tools[0] > now:
                    return list(ep.tools[1])

        async def send(client: Client) -> list[Tool]:
            return (await client.list_tools(cache_mode="bypass")).tools

        tools: list[Tool] = await self._run(self._request("tools/list", send, timeout=timeout))
        for ep in self._endpoints.values():
            if ep.session is not None:
                ep.tools = (now + self.tools_ttl, list(tools))
        return list(tools)

    async def _call(self, label: str, send: Callable[[Client], Awaitable[_T]], timeout: float | None) -> _T:
        result: _T = await self._run(self._request(label, send, timeout=timeout))
        return result

    async def list_resources(
        self,
        *,
        cursor: str | None = None,
        meta: RequestParamsMeta | None = None,
        timeout: float | None = None,
    ) -> ListResourcesResult:
        return await self._call(
            "resources/list", lambda c: c.list_resources(cursor=cursor, meta=meta), timeout
        )

    async def list_resource_templates(
        self,
        *,
        cursor: str | None = None,
        meta: RequestParamsMeta | None = None,
        timeout: float | None = None,
    ) -> ListResourceTemplatesResult:
        return await self._call(
            "resources/templates/list", lambda c: c.list_resource_templates(cursor=cursor, meta=meta), timeout
        )

    async def read_resource(
        self, uri: str, *, meta: RequestParamsMeta | None = None, timeout: float | None = None
    ) -> ReadResourceResult:
        return await self._call("resources/read", lambda c: c.read_resource(uri, meta=meta), timeout)

    async def list_prompts(
        self,
        *,
        cursor: str | None = None,
        meta: RequestParamsMeta | None = None,
        timeout: float | None = None,
    ) -> ListPromptsResult:
        return await self._call("prompts/list", lambda c: c.list_prompts(cursor=cursor, meta=meta), timeout)

    async def get_prompt(
        self,
        name: str,
        arguments: Mapping[str, str] | None = None,
        *,
        meta: RequestParamsMeta | None = None,
        timeout: float | None = None,
    ) -> GetPromptResult:
        args = dict(arguments or {})
        return await self._call("prompts/get", lambda c: c.get_prompt(name, args, meta=meta), timeout)

    async def complete(
        self,
        ref: ResourceTemplateReference | PromptReference,
        argument: Mapping[str, str],
        context_arguments: Mapping[str, str] | None = None,
        *,
        timeout: float | None = None,
    ) -> CompleteResult:
        arg, context = dict(argument), dict(context_arguments) if context_arguments is not None else None
        return await self._call("completion/complete", lambda c: c.complete(ref, arg, context), timeout)

    async def send_ping(self, *, timeout: float | None = None) -> EmptyResult:
        """A ping to one endpoint in service, where the protocol has one (sessions before MCP
        2026-07-28, e.g. ``mode="legacy"``); on later sessions an ``MCPError`` (method not found)
        that counts against no endpoint."""

        async def ping(client: Client) -> EmptyResult:
            if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
                raise MCPError(METHOD_NOT_FOUND, f"ping is not part of MCP {client.protocol_version}")
            return await client.session.send_ping()

        return await self._call("ping", ping, timeout)

    async def set_logging_level(self, level: LoggingLevel, *, timeout: float | None = None) -> int:
        """Have every endpoint in service log at ``level``; returns how many were reached.

        Sessions before MCP 2026-07-28 are sent ``logging/setLevel`` (through the breakers;
        endpoints whose breaker is open are skipped); later protocols carry the level on every
        request, so their sessions are replaced (calls in flight finish) and new ones carry it.
        """
        self._require_open()
        self._log_level = level

        async def set_level(client: Client) -> bool:
            if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
                return False
            request = SetLevelRequest(params=SetLevelRequestParams(level=level))
            await client.session.send_request(request, EmptyResult)
            return True

        reached = 0
        for key_id, ep in self._endpoints.items():
            lease = self.pool.try_acquire_key(self.name, key_id)
            if lease is None:
                continue
            attempt = await self._attempt(
                lease, self._request("logging/setLevel", set_level, timeout=timeout)
            )
            if attempt.verdict in ("answered", "caller") and attempt.error is not None:
                raise attempt.error
            if attempt.verdict == "ok":
                reached += 1
                if not attempt.result and ep.session is not None:
                    ep.replace(ep.session)
        if not reached:
            raise NoKeyAvailable(self.name, self.pool.capacity(self.name).next_recovery_in)
        return reached

    # ------------------------------------------------------------------ observation

    def capacity(self) -> Capacity:
        return self.pool.capacity(self.name)

    async def health_check(self) -> HealthReport:
        """Probe each endpoint whose breaker admits a call with a ``tools/list``; skip open ones."""
        self._require_open()

        async def send(client: Client) -> Any:
            return (await client.list_tools(cache_mode="bypass")).tools

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
                attempt = await self._attempt(lease, self._request("tools/list", send, timeout=None))
                result: Literal["ok", "failed"] = "ok" if attempt.verdict == "ok" else "failed"
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
