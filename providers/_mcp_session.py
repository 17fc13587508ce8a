"""The sessions behind ``MCPClient``: one ``mcp.Client`` per endpoint, shared by concurrent calls.

A session is owned by a task of the ``MCPClient``'s task group (so a failing session can never
cancel a caller). Calls hold it while they run; replacing it (after the endpoint lost it, or it
broke) only stops new calls from using it: the calls already in flight on it finish there, and it
closes when the last one is done.

Transport errors are answered inside the HTTP layer with a synthetic 503, so they surface at the
call site as an ``MCPError`` instead of tearing the session down, and the HTTP status behind every
call is observed for the calling task (the SDK sends each request in its caller's context), which
is how a 401 is told from a 503, and a tool's JSON-RPC error (HTTP 200) from a replica's failure.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal

import anyio
import httpx2
from anyio.abc import TaskGroup
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CONNECTION_CLOSED, LoggingLevel, Tool

__all__ = ["Endpoint", "Observed", "ObservingTransport", "Session", "SessionFailed", "leaf", "observed"]

SYNTHETIC = "x-keypool-synthetic"


@dataclass
class Observed:
    """The HTTP side of one MCP request, filled in by :class:`ObservingTransport`."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    transport_error: str | None = None


observed: ContextVar[Observed | None] = ContextVar("keypool_mcp_observed", default=None)


class ObservingTransport(httpx2.AsyncBaseTransport):
    """Records each response's status for the calling task; turns transport errors into a 503."""

    def __init__(self, inner: httpx2.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        seen = observed.get()
        try:
            response = await self.inner.handle_async_request(request)
        except httpx2.TransportError as exc:
            if seen is not None:
                seen.status, seen.transport_error = 503, type(exc).__name__
            return httpx2.Response(503, request=request, headers={SYNTHETIC: "1"})
        if seen is not None and (seen.status is None or response.status_code >= 400):
            seen.status = response.status_code
            seen.headers = {k.lower(): v for k, v in response.headers.items() if "retry" in k.lower()}
        return response

    async def aclose(self) -> None:
        """Nothing: every endpoint's client shares this transport; MCPClient closes the inner one."""


def leaf(error: BaseException) -> BaseException:
    """The first real error inside the exception groups the SDK's task groups wrap it in."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


class SessionFailed(Exception):
    """Opening a session failed; ``opening`` is what HTTP said meanwhile, ``error`` the cause."""

    def __init__(self, error: BaseException, opening: Observed) -> None:
        super().__init__(str(error))
        self.error = error
        self.opening = opening


class Session:
    """One open ``mcp.Client`` and the calls using it."""

    def __init__(self) -> None:
        self.client: Client | None = None
        self.error: BaseException | None = None
        self.opening = Observed()  # the HTTP side of opening it (initialize)
        self.opened = anyio.Event()
        self.closing = anyio.Event()
        self.users = 0
        self.retired = False
        self.scope: anyio.CancelScope | None = None  # while opening: cancelled if every caller gives up

    def retire(self) -> None:
        """No new calls; close once the calls in flight on it are done."""
        self.retired = True
        if not self.users:
            self.closing.set()


class Endpoint:
    """An endpoint's current session, opened on demand and replaced when it is lost."""

    def __init__(self, url: str, key_id: str, http: httpx2.AsyncClient) -> None:
        self.url = url
        self.key_id = key_id
        self.http = http
        self.session: Session | None = None
        self.lock = anyio.Lock()
        self.tools: tuple[float, list[Tool]] | None = None

    async def _own(
        self,
        session: Session,
        mode: Literal["auto", "legacy", "2026-07-28"],
        log_level: LoggingLevel | None,
        open_by: float,
    ) -> None:
        """Hold ``session`` open until it is retired and unused, or breaks. Opening is bounded:
        a wedged endpoint must not hold this task (and a connection) long after callers gave up."""
        observed.set(session.opening)
        try:
            with anyio.CancelScope(deadline=open_by) as bound:
                session.scope = bound
                transport = streamable_http_client(self.url, http_client=self.http)
                async with Client(transport, mode=mode, log_level=log_level) as client:
                    bound.deadline = math.inf
                    session.scope = None
                    session.client = client
                    session.opened.set()
                    await session.closing.wait()
        except Exception as exc:
            session.error = exc
        finally:
            session.client = None
            if self.session is session:
                self.session = None
                self.tools = None
            session.opened.set()

    @asynccontextmanager
    async def use(
        self,
        group: TaskGroup,
        open_by: Callable[[], float],
        mode: Literal["auto", "legacy", "2026-07-28"],
        log_level: LoggingLevel | None,
    ) -> AsyncIterator[tuple[Client, Session]]:
        """The current session (opened if there is none), held for one call."""
        session = self.session
        if session is None or session.retired:
            async with self.lock:
                session = self.session
                if session is None or session.retired:
                    session = self.session = Session()
                    group.start_soon(self._own, session, mode, log_level, open_by())
        session.users += 1
        try:
            await session.opened.wait()
            if session.client is None:
                error = (
                    leaf(session.error) if session.error else MCPError(CONNECTION_CLOSED, "session closed")
                )
                raise SessionFailed(error, session.opening)
            yield session.client, session
        finally:
            session.users -= 1
            if not session.users:
                if session.scope is not None:  # still opening, and nobody waits for it any more
                    session.scope.cancel()
                    self.replace(session)
                elif session.retired:
                    session.closing.set()

    def replace(self, session: Session) -> None:
        """Stop handing out ``session`` (lost or broken); the next call opens a fresh one."""
        if self.session is session:
            self.session = None
            self.tools = None
        session.retire()

    def close(self) -> None:
        if self.session is not None:
            self.session.retire()
            self.session.closing.set()
