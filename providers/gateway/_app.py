"""The gateway as a plain ASGI app: OpenAI's endpoints in front, keypool's pools behind.

Request bodies go upstream byte for byte but for the ``model`` value; answers come back as the
upstream sent them, with ``x-keypool-provider``, ``x-keypool-key-id``, ``x-keypool-attempts``,
``x-keypool-model`` and ``x-request-id`` added; a chat stream that breaks after content is
continued where a route takes a prefill (``_streams``). A client that disconnects cancels the upstream
attempt (its key is released, blamed on nobody). Admin paths (``/api/...``, ``/metrics``) go to
the admin app when one is mounted. One JSON access-log line per request names the caller by its
configured name and never carries a key.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, fields
from typing import Any

import anyio
import httpx2

from keypool import (
    Capacity,
    KeyPool,
    KeyPoolError,
    KeyPoolTransport,
    continuation_body,
    continuation_path,
    grammar_of,
)

from ._body import BadBody, RequestBody, parse_body
from ._callers import Caller, CallerKeys
from ._config import GatewayConfig, ModelRoutes, Route
from ._errors import GatewayError, unauthorized
from ._metrics import GatewayCounts
from ._routing import Answer, Router
from ._shedding import Shedder
from ._streams import Continue, error_event, relay_events

__all__ = ["Gateway"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("keypool.gateway.access")

_POST_ENDPOINTS = {
    "/v1/chat/completions": "/chat/completions",
    "/v1/embeddings": "/embeddings",
    "/v1/responses": "/responses",
}
_RELAYED = frozenset(
    {"content-type", "cache-control", "retry-after", "retry-after-ms", "openai-processing-ms"}
)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/=+-]{1,128}$")


class _Disconnected(Exception):
    """The caller went away while its body was being read."""


@dataclass
class _Entry:
    """One access-log line."""

    request_id: str
    method: str
    path: str
    status: int = 0
    caller: str | None = None
    model: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    key_id: str | None = None
    attempts: int = 0
    stream: bool = False
    ms: float = 0.0
    error: str | None = None
    continued: int | None = None

    def fields(self) -> dict[str, Any]:
        return {name: value for name in _ENTRY_FIELDS if (value := getattr(self, name)) is not None}


_ENTRY_FIELDS = tuple(f.name for f in fields(_Entry))


class Gateway:
    """The ASGI app of ``keypool serve`` (see the module docstring).

    ``transports`` replaces the network under a provider's pool (tests, embedded upstreams);
    ``admin`` is served on ``/api/...`` and ``/metrics``.
    """

    def __init__(
        self,
        config: GatewayConfig,
        pool: KeyPool,
        *,
        admin: ASGIApp | None = None,
        transports: Mapping[str, httpx2.AsyncBaseTransport] | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.admin = admin
        self.callers = CallerKeys(config.callers)
        s = config.settings
        self.clients: dict[str, httpx2.AsyncClient] = {}
        for name, upstream in config.upstreams.items():
            inner = (transports or {}).get(name) or httpx2.AsyncHTTPTransport(
                limits=httpx2.Limits(max_connections=1000, max_keepalive_connections=200)
            )
            transport = KeyPoolTransport(
                pool,
                name,
                transport=inner,
                close_inner=True,
                timeout=s.request_timeout,
                auth_header=upstream.auth_header,
                auth_scheme=upstream.auth_scheme,
            )
            self.clients[name] = httpx2.AsyncClient(
                transport=transport,
                base_url=upstream.base_url,
                timeout=httpx2.Timeout(s.request_timeout, connect=min(10.0, s.request_timeout)),
            )
        self.router = Router(pool, self.clients, config.models, s)
        self.shedder = Shedder(pool, s.shed_low_below, s.shed_normal_below)
        self.counts = GatewayCounts(config.models)

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        path: str = scope["path"]
        if self.admin is not None and (path.startswith("/api/") or path == "/metrics"):
            await self.admin(scope, receive, send)
            return
        await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope.get("headers", ())
        }
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else f"req_{uuid.uuid4().hex}"
        headers["x-request-id"] = request_id
        method: str = scope["method"]
        path: str = scope["path"]
        entry = _Entry(request_id, method, path if _known_path(path) else "<other>")
        try:
            await self._dispatch(method, path, headers, receive, send, entry)
        except GatewayError as error:
            entry.status = error.status
            entry.error = error.code or error.type
            await _send_whole(send, error.status, error.all_headers(), error.body(), request_id)
        except _Disconnected:
            entry.status = 499
        finally:
            entry.ms = round((time.perf_counter() - started) * 1000, 3)
            self.counts.count(entry.caller, entry.model, entry.status)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(json.dumps(entry.fields()))

    async def _dispatch(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        receive: Receive,
        send: Send,
        entry: _Entry,
    ) -> None:
        if path == "/healthz":
            if method not in ("GET", "HEAD"):
                raise _not_allowed(method, path)
            await self._health(send, entry)
            return
        upstream_path = _POST_ENDPOINTS.get(path)
        is_models = path == "/v1/models" or path.startswith("/v1/models/")
        if upstream_path is None and not is_models:
            raise GatewayError(404, f"Unknown request URL: {method} {path}.", code="unknown_url")
        caller = await self._caller(headers)
        entry.caller = caller.name
        if is_models:
            if method != "GET":
                raise _not_allowed(method, path)
            await self._models(path, caller, send, entry)
            return
        if method != "POST":
            raise _not_allowed(method, path)
        assert upstream_path is not None
        body = parse_or_raise(await _read_body(receive, headers, self.config.settings.max_body_bytes))
        shown = _shown(body.model)
        entry.model = shown
        entry.stream = body.stream
        model = self.config.models.get(body.model)
        if model is None:
            raise GatewayError(
                404,
                f"The model `{shown}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        if not caller.may_use(model.name):
            raise GatewayError(
                403,
                f"This key may not use the model `{shown}`.",
                "permission_error",
                "model_not_allowed",
                param="model",
            )
        routes = self._routes(model, upstream_path)
        caps = {r.provider: self.pool.capacity(r.provider) for r in routes}
        self.shedder.admit(caller.priority, caps)
        await self._proxy(upstream_path, body, model, routes, caps, headers, receive, send, entry)

    def _routes(self, model: ModelRoutes, upstream_path: str) -> tuple[Route, ...]:
        if upstream_path != "/responses":
            return model.routes
        routes = tuple(r for r in model.routes if self.config.upstreams[r.provider].responses)
        if not routes:
            raise GatewayError(
                400,
                f"The model `{model.name}` has no route whose provider serves /v1/responses; "
                "use /v1/chat/completions.",
                param="model",
                code="unsupported_endpoint",
            )
        return routes

    async def _caller(self, headers: Mapping[str, str]) -> Caller:
        scheme, _, key = headers.get("authorization", "").strip().partition(" ")
        present = bool(scheme)
        key = key.strip() if scheme.lower() == "bearer" else ""
        caller = await self.callers.authenticate(key or None)
        if caller is None:
            raise unauthorized(present)
        return caller

    # ------------------------------------------------------------------ endpoints

    async def _health(self, send: Send, entry: _Entry) -> None:
        providers = {p: self.pool.capacity(p).status for p in self.config.upstreams}
        body = json.dumps({"status": "ok", "providers": providers}).encode()
        entry.status = 200
        await _send_whole(send, 200, [(b"content-type", b"application/json")], body, entry.request_id)

    async def _models(self, path: str, caller: Caller, send: Send, entry: _Entry) -> None:
        names = [m for m in self.config.models if caller.may_use(m)]
        if path == "/v1/models":
            payload: dict[str, Any] = {"object": "list", "data": [_model_entry(m) for m in names]}
        else:
            wanted = path[len("/v1/models/") :]
            if wanted not in names:
                raise GatewayError(
                    404,
                    f"The model `{_shown(wanted)}` does not exist or you do not have access to it.",
                    param="model",
                    code="model_not_found",
                )
            payload = _model_entry(wanted)
        entry.status = 200
        await _send_whole(
            send,
            200,
            [(b"content-type", b"application/json")],
            json.dumps(payload).encode(),
            entry.request_id,
        )

    async def _proxy(
        self,
        upstream_path: str,
        body: RequestBody,
        model: ModelRoutes,
        routes: tuple[Route, ...],
        caps: Mapping[str, Capacity],
        headers: Mapping[str, str],
        receive: Receive,
        send: Send,
        entry: _Entry,
    ) -> None:
        entry.status = 499  # unless an answer goes out
        error: GatewayError | None = None
        async with anyio.create_task_group() as group:
            group.start_soon(_watch_disconnect, receive, group.cancel_scope)
            started = time.monotonic()
            try:
                answer = await self.router.send(upstream_path, body, model, headers, routes, caps)
            except GatewayError as refused:
                error = refused
            else:
                entry.provider, entry.upstream_model = answer.provider, answer.model
                entry.key_id, entry.attempts = answer.key_id, answer.attempts
                try:
                    entry.status = answer.response.status_code
                    follow = self._continuation(upstream_path, body, model, routes, headers, entry, started)
                    await _relay(answer, send, entry, body.stream, upstream_path, follow)
                finally:
                    with anyio.CancelScope(shield=True):
                        await answer.response.aclose()
            group.cancel_scope.cancel()
        if error is not None:
            raise error

    def _continuation(
        self,
        upstream_path: str,
        body: RequestBody,
        model: ModelRoutes,
        routes: tuple[Route, ...],
        headers: Mapping[str, str],
        entry: _Entry,
        started: float,
    ) -> Continue | None:
        """How a broken chat stream is continued: the model's routes whose provider takes a
        prefill, in order, each with its own prefill style (``None`` when there is none), inside
        what the call's attempts and deadline (from ``started``) have left."""
        able = [r for r in routes if self.config.upstreams[r.provider].prefill is not None]
        if upstream_path != "/chat/completions" or not able:
            return None

        async def follow(delivered: str) -> httpx2.Response | None:
            original = json.loads(body.text)
            for route in able:
                prefill = self.config.upstreams[route.provider].prefill
                assert prefill is not None
                base = self.clients[route.provider].base_url
                url = str(
                    base.copy_with(path=continuation_path(base.path.rstrip("/") + upstream_path, prefill))
                )
                again = parse_body(json.dumps(continuation_body(original, delivered, prefill)).encode())
                caps = {route.provider: self.pool.capacity(route.provider)}
                settings = self.config.settings
                attempts = settings.max_attempts - entry.attempts
                left = settings.request_timeout - (time.monotonic() - started)
                if attempts < 1 or left <= 0:
                    return None  # the call's budget is spent: the break stands
                try:
                    answer = await self.router.send(
                        url, again, model, headers, (route,), caps, limits=(attempts, left)
                    )
                except GatewayError:
                    continue
                if answer.response.status_code >= 400:
                    await answer.response.aclose()
                    continue
                entry.attempts += answer.attempts
                return answer.response
            return None

        return follow


def parse_or_raise(raw: bytes) -> RequestBody:
    try:
        return parse_body(raw)
    except BadBody as exc:
        raise GatewayError(400, str(exc), param=exc.param, code="invalid_body") from None


def _shown(name: str) -> str:
    """A caller's model name as errors and the access log repeat it: bounded, one line."""
    name = name.replace("\n", " ").replace("\r", " ")
    return name if len(name) <= 200 else f"{name[:200]}…"


def _known_path(path: str) -> bool:
    return path in _POST_ENDPOINTS or path in ("/healthz", "/v1/models") or path.startswith("/v1/models/")


def _not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(405, f"Method {method} is not allowed on {path}.", code="method_not_allowed")


def _model_entry(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "keypool"}


async def _read_body(receive: Receive, headers: Mapping[str, str], limit: int) -> bytes:
    declared = headers.get("content-length", "")
    too_big = GatewayError(
        413, f"The request body is larger than the gateway's limit of {limit} bytes.", code="body_too_large"
    )
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """Cancel the request's work when the caller goes away (or once the answer is complete)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _send_whole(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes, request_id: str
) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode()), (b"x-request-id", request_id.encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _answer_headers(answer: Answer, request_id: str) -> list[tuple[bytes, bytes]]:
    out = [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, value in answer.response.headers.items()
        if name.lower() in _RELAYED or name.lower().startswith("x-ratelimit-")
    ]
    upstream_id = answer.response.headers.get("x-request-id")
    if upstream_id:
        out.append((b"x-upstream-request-id", upstream_id.encode("latin-1")))
    out += [
        (b"x-request-id", request_id.encode()),
        (b"x-keypool-provider", answer.provider.encode()),
        (b"x-keypool-key-id", answer.key_id.encode()),
        (b"x-keypool-attempts", str(answer.attempts).encode()),
        (b"x-keypool-model", answer.model.encode()),
    ]
    return out


async def _relay(
    answer: Answer,
    send: Send,
    entry: _Entry,
    stream: bool,
    upstream_path: str = "/chat/completions",
    continue_with: Continue | None = None,
) -> None:
    """Hand the upstream answer on: whole, or chunk by chunk as it arrives."""
    response = answer.response
    headers = _answer_headers(answer, entry.request_id)
    if not stream or "text/event-stream" not in response.headers.get("content-type", ""):
        content = await response.aread()
        headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": content, "more_body": False})
        return
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    grammar = grammar_of(upstream_path)
    if grammar is None:
        try:
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (KeyPoolError, httpx2.HTTPError) as exc:
            entry.error = "stream_interrupted"
            await send(
                {"type": "http.response.body", "body": error_event(type(exc).__name__), "more_body": True}
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    broke, continued = await relay_events(response, send, grammar, continue_with)
    entry.continued = continued or None
    if broke is not None:
        entry.error = "stream_interrupted"
