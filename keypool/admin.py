"""The runbook's admin HTTP API over a :class:`~keypool.KeyPool` (FastAPI).

::

    from keypool.admin import create_app

    app = create_app(pool, token=os.environ["KEYPOOL_ADMIN_TOKEN"])  # serve with uvicorn
    # or mount the endpoints in an existing FastAPI app:
    app.include_router(keypool.admin.router(pool, token=...))

=======  =========================================  ===============================================
method   path                                       what it does
=======  =========================================  ===============================================
GET      /api/v1/circuit-breaker/stats              every key's breaker (the runbook's list shape)
POST     /api/v1/circuit-breaker/reset              close every breaker (optional ``{"provider"}``)
POST     /api/v1/circuit-breaker/{key_id}/reset     close one key's breaker
PATCH    /api/v1/circuit-breaker/{key_id}/config    change one key's breaker settings (partial)
PATCH    /api/v1/circuit-breaker/config             change settings of all keys (``?provider=``)
POST     /api/v1/keys/rotate                        ``{"provider", "activate_backup"}``
GET      /api/v1/capacity                           every provider's capacity
GET      /metrics                                   Prometheus exposition of the registry
GET      /healthz                                   liveness
=======  =========================================  ===============================================

Mutations need ``Authorization: Bearer <token>`` (401 without it, 403 with a wrong one); with
``protect_reads=True`` so do the read endpoints except ``/healthz``. Every error is JSON
``{"error": ..., "detail": ...}``: 400 for a body that is not JSON, 413 for a body over 64 KiB
(declared or streamed in chunks), 422 for a body or value that does not validate, 404 for an
unknown key id or provider (the message lists the known ones), 409 when the request conflicts with
the pool (an ambiguous key id, backups that do not exist). The OpenAPI document describes exactly
these bodies and answers. The pool's methods do the work; this module only translates HTTP.

No response or log line carries a secret, not even one pasted by mistake where a key id belongs: an
unknown key id is shown as given only when it is short and looks like a key id, else as its
length and fingerprint (:func:`shown_key_id`).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Collection, Coroutine
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message

from ._config import BreakerConfig, fingerprint, valid_key_id
from ._errors import ConfigError, KeyPoolError, UnknownKeyError, UnknownProviderError

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from ._pool import KeyPool

__all__ = [
    "BreakerConfigPatch",
    "ErrorBody",
    "ResetRequest",
    "RotateRequest",
    "create_app",
    "router",
    "shown_key_id",
    "shown_path",
]

log = logging.getLogger("keypool.admin")

_MAX_BODY = 64 * 1024  # bodies above this, declared or streamed, get a JSON 413
_SHOWN_ID_LENGTH = 24  # unknown ids longer than this may be secrets (real ones are 32+ characters)
_SECRET_PREFIXES = ("sk-", "pplx-")  # how OpenAI-style and Perplexity secrets begin, even cut short
_ProviderQuery = Annotated[str | None, Query(description="limit to this provider")]
_bearer = HTTPBearer(
    auto_error=False,
    description="The admin token (keypool serve-admin reads it from KEYPOOL_ADMIN_TOKEN).",
)


# ---------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _set_fields_only(schema: dict[str, Any]) -> None:
    """Describe what the API accepts: at least one field, and no field given as ``null``.

    The fields are optional in Python so that only those given change; the document must not say
    that ``null`` or ``{}`` are welcome (both get a 422).
    """
    for prop in schema.get("properties", {}).values():
        branches = [b for b in prop.pop("anyOf", []) if b.get("type") != "null"]
        if len(branches) == 1:
            prop.update(branches[0])
        elif branches:
            prop["anyOf"] = branches
        prop.pop("default", None)
    schema["minProperties"] = 1


class ResetRequest(_Body):
    """Which breakers to reset; no body (or no ``provider``) resets every key of every provider."""

    provider: StrictStr | None = Field(None, description="only this provider's keys")


class RotateRequest(_Body):
    """Force a provider's backup keys on (``true``) or off (``false``), or back to automatic (``null``)."""

    provider: StrictStr
    activate_backup: StrictBool | None = Field(
        description="true: backups serve now; false: never; null: automatic (primary healthy share)"
    )


def _like(name: str) -> Any:
    """A nullable field with the same bounds and description as ``BreakerConfig.<name>``."""
    info = BreakerConfig.model_fields[name]
    bounds: dict[str, Any] = {}
    for item in info.metadata:
        for attr in ("gt", "ge", "lt", "le"):
            value = getattr(item, attr, None)
            if value is not None:
                bounds[attr] = value
    return Field(None, description=info.description, **bounds)


_INT_FIELDS = frozenset(name for name, f in BreakerConfig.model_fields.items() if f.annotation is int)


class BreakerConfigPatch(_Body):
    """A partial :class:`~keypool.BreakerConfig`: only the fields given change; state is kept.

    At least one field; none may be null. The result must still be a valid configuration
    (``max_timeout`` >= ``timeout``, ``max_retry_after`` >= ``default_retry_after``), else 422.
    """

    model_config = ConfigDict(json_schema_extra=_set_fields_only)

    failure_threshold: StrictInt | None = _like("failure_threshold")
    success_threshold: StrictInt | None = _like("success_threshold")
    timeout: StrictFloat | None = _like("timeout")  # StrictFloat takes integers too, never bools
    half_open_max_calls: StrictInt | None = _like("half_open_max_calls")
    backoff_multiplier: StrictFloat | None = _like("backoff_multiplier")
    max_timeout: StrictFloat | None = _like("max_timeout")
    jitter: StrictFloat | None = _like("jitter")
    probe_timeout: StrictFloat | None = _like("probe_timeout")
    default_retry_after: StrictFloat | None = _like("default_retry_after")
    max_retry_after: StrictFloat | None = _like("max_retry_after")

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        """JSON does not tell 7 from 7.0 (JSON Schema calls both integers): take 7.0 as 7, never
        "7", 7.5 or true."""
        if not isinstance(data, dict):
            return data
        return {
            name: int(value)
            if name in _INT_FIELDS and isinstance(value, float) and value.is_integer()
            else value
            for name, value in data.items()
        }

    def changes(self) -> dict[str, Any]:
        """The fields the caller set; raises :class:`ConfigError` for none or for ``null`` values."""
        changes = self.model_dump(exclude_unset=True)
        nulls = sorted(k for k, v in changes.items() if v is None)
        if nulls:
            raise ConfigError(f"breaker config field(s) {nulls} must not be null")
        if not changes:
            allowed = ", ".join(type(self).model_fields)
            raise ConfigError(f"the body names no breaker config field; allowed: {allowed}")
        return changes


# ---------------------------------------------------------------------- errors


class ErrorBody(BaseModel):
    """Every error answer: a short phrase and what exactly is wrong (a string or a list)."""

    error: str
    detail: Any


_ERRORS: dict[int, str] = {
    400: "the body is not valid JSON",
    401: "no bearer token: send the admin token as 'Authorization: Bearer <token>'",
    403: "the bearer token is not the admin token",
    404: "unknown key id or provider (the answer lists the known ones)",
    409: "the request conflicts with the pool (an ambiguous key id: add ?provider=; no backup keys)",
    413: f"the body is larger than {_MAX_BODY} bytes",
    422: "the body or a value does not validate (the answer names the field)",
}


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers of an endpoint, for the OpenAPI document."""
    return {status: {"model": ErrorBody, "description": _ERRORS[status]} for status in statuses}


class _Conflict(KeyPoolError):
    """The request is well formed but conflicts with the pool's current shape."""


def _error(status: int, error: str, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def _validation_detail(exc: RequestValidationError) -> list[dict[str, str]]:
    # Never echo the input: it may be anything, including a secret pasted by mistake.
    return [
        {
            "loc": ".".join(str(p) for p in err.get("loc", ())),
            "msg": str(err.get("msg", "invalid value")),
            "type": str(err.get("type", "value_error")),
        }
        for err in exc.errors()
    ]


def _error_response(exc: Exception) -> JSONResponse:
    """Map an exception raised while serving a request onto the API's JSON error shape."""
    if isinstance(exc, RequestValidationError):
        detail = _validation_detail(exc)
        if any(d["type"] == "json_invalid" for d in detail):
            return _error(400, "request body is not valid JSON", detail)
        return _error(422, "invalid request", detail)
    if isinstance(exc, UnknownKeyError):
        return _error(404, "unknown key id", str(exc))
    if isinstance(exc, UnknownProviderError):
        return _error(404, "unknown provider", str(exc))
    if isinstance(exc, ConfigError):
        return _error(422, "invalid configuration", str(exc))
    if isinstance(exc, _Conflict):
        return _error(409, "conflict", str(exc))
    if isinstance(exc, KeyPoolError):
        return _error(400, type(exc).__name__, str(exc))
    if isinstance(exc, StarletteHTTPException):
        headers = dict(exc.headers) if exc.headers else None
        return _error(exc.status_code, _phrase(exc.status_code), exc.detail, headers)
    log.error("keypool admin: unexpected %s while serving a request", type(exc).__name__, exc_info=exc)
    return _error(500, "internal error", "the admin API failed unexpectedly; see the server log")


def _phrase(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "error"


# ---------------------------------------------------------------------- ids that may be secrets


def _showable(value: str, known: Collection[str]) -> bool:
    """Known ids, and short values that look like key ids and not like secrets."""
    if value in known:
        return True
    return len(value) <= _SHOWN_ID_LENGTH and valid_key_id(value) and not value.startswith(_SECRET_PREFIXES)


def _masked(value: str) -> str:
    return f"<{len(value)} characters, fingerprint {fingerprint(value)}>"


def shown_key_id(key_id: str, known: Collection[str] = ()) -> str:
    """How a key id taken from a request may appear in an answer.

    Known ids, and short ones that look like ids, as they are; anything else might be a secret
    pasted where the id belongs, so only its length and fingerprint (the id keypool would give that
    secret) appear, with a hint when that fingerprint is one of the ``known`` ids.
    """
    if _showable(key_id, known):
        return key_id
    if fingerprint(key_id) in known:
        return f"{_masked(key_id)} (a secret? pass its key id instead)"
    return _masked(key_id)


def shown_path(path: str, known: Collection[str] = ()) -> str:
    """``path`` as a log line may show it: each segment that might be a secret masked."""
    return "/".join(part if not part or _showable(part, known) else _masked(part) for part in path.split("/"))


# ---------------------------------------------------------------------- authentication


_HOW_TO_AUTHENTICATE = (
    "this endpoint needs the admin token: send it as 'Authorization: Bearer <token>', e.g. "
    'curl -H "Authorization: Bearer $KEYPOOL_ADMIN_TOKEN" (keypool serve-admin takes the token from '
    "the KEYPOOL_ADMIN_TOKEN environment variable; an application that mounts the admin API sets its own)"
)


class _Guard:
    def __init__(self, token: str | None, protect_reads: bool, allow_no_token: bool) -> None:
        if token is not None and not token.strip():
            raise ConfigError("token: must not be empty (unset it and pass allow_no_token=True instead)")
        if token is None and not allow_no_token:
            raise ConfigError(
                "token: the admin API can reset breakers and change settings; give it a token "
                "(or pass allow_no_token=True for a loopback-only, unauthenticated API)"
            )
        self._token = token.encode() if token is not None else None
        self.protect_reads = protect_reads

    def protects(self, route: APIRoute) -> bool:
        if route.path == "/healthz":
            return False
        mutating = bool((route.methods or set()) - {"GET", "HEAD", "OPTIONS"})
        return mutating or self.protect_reads

    def deny(self, request: Request, path: str) -> JSONResponse | None:
        """``None`` if the request may go on, else the 401/403 response (``path``: as logged)."""
        if self._token is None:
            return None
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials:
            log.warning("keypool admin: %s %s refused: no bearer token", request.method, path)
            return _error(401, "unauthorized", _HOW_TO_AUTHENTICATE, {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.encode(), self._token):
            log.warning("keypool admin: %s %s refused: wrong token", request.method, path)
            return _error(403, "forbidden", "the bearer token is not the admin token")
        return None


def _too_large() -> JSONResponse:
    return _error(413, "request body too large", f"the admin API accepts at most {_MAX_BODY} bytes")


async def _bounded(request: Request) -> Request | JSONResponse:
    """``request`` with its body read whole, or a JSON 413 if it is over the limit.

    The limit holds for a declared ``Content-Length`` (refused before reading) and for a chunked
    body (refused as soon as it passes the limit). FastAPI then reads the body from the copy.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > _MAX_BODY:
        return _too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > _MAX_BODY:
            return _too_large()
        chunks.append(chunk)
    body = b"".join(chunks)
    receive = request.receive
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()  # the client's disconnect, if it comes
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, replay)


def _route_class(guard: _Guard, pool: KeyPool) -> type[APIRoute]:
    class KeyPoolAdminRoute(APIRoute):
        """Checks the token before the body is read, bounds the body, renders every error as JSON."""

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()
            protected = guard.protects(self)

            async def guarded(request: Request) -> Response:
                if protected:
                    denied = guard.deny(request, shown_path(request.url.path, pool.key_ids()))
                    if denied is not None:
                        return denied
                bounded = await _bounded(request)
                if isinstance(bounded, Response):
                    return bounded
                try:
                    return await handler(bounded)
                except Exception as exc:
                    return _error_response(exc)

            return guarded

    return KeyPoolAdminRoute


# ---------------------------------------------------------------------- the endpoints


def _registry_for(pool: KeyPool, registry: CollectorRegistry | None) -> CollectorRegistry:
    from prometheus_client import REGISTRY

    from .metrics import _lookup, instrument

    reg = REGISTRY if registry is None else registry
    if _lookup(pool, reg) is None:
        instrument(pool, reg)
    return reg


def _known(pool: KeyPool, provider: str | None) -> str | None:
    """``provider`` itself if the pool has it (``None`` means all); else UnknownProviderError."""
    if provider is not None and provider not in pool.providers:
        raise UnknownProviderError(provider, pool.providers)
    return provider


def _owner(pool: KeyPool, key_id: str, provider: str | None) -> str:
    """The provider to act on for ``key_id``; raises if the id is unknown or ambiguous."""
    if provider is not None:
        _known(pool, provider)
        if key_id not in pool.key_ids(provider):
            known = pool.key_ids(provider)
            raise UnknownKeyError(shown_key_id(key_id, pool.key_ids()), known, provider)
        return provider
    owners = [p for p in pool.providers if key_id in pool.key_ids(p)]
    if not owners:
        known = pool.key_ids()
        raise UnknownKeyError(shown_key_id(key_id, known), known)
    if len(owners) > 1:
        raise _Conflict(f"key id {key_id!r} exists in providers {owners}; say which with ?provider=<name>")
    return owners[0]


def router(
    pool: KeyPool,
    *,
    token: str | None,
    protect_reads: bool = False,
    registry: CollectorRegistry | None = None,
    allow_no_token: bool = False,
    metrics_path: str | None = "/metrics",
) -> APIRouter:
    """The admin endpoints as an :class:`fastapi.APIRouter`, for mounting in an existing app.

    ``metrics_path=None`` leaves ``/metrics`` out (if the app already serves one). Raises
    :class:`~keypool.ConfigError` when ``token`` is ``None`` unless ``allow_no_token=True``.
    """
    guard = _Guard(token, protect_reads, allow_no_token)
    reg = _registry_for(pool, registry) if metrics_path is not None else None
    api = APIRouter(route_class=_route_class(guard, pool))
    auth = [Security(_bearer)] if token is not None else []
    read_auth = auth if protect_reads else []
    denied = (401, 403) if token is not None else ()
    read_denied = denied if protect_reads else ()

    @api.get(
        "/api/v1/circuit-breaker/stats",
        tags=["circuit-breaker"],
        summary="Every key's breaker state, counts and settings",
        dependencies=read_auth,
        responses=_responses(*read_denied, 404, 422),
    )
    async def get_stats(provider: _ProviderQuery = None) -> list[dict[str, Any]]:
        return pool.stats(_known(pool, provider))

    @api.post(
        "/api/v1/circuit-breaker/reset",
        tags=["circuit-breaker"],
        summary="Close every breaker (or one provider's) and clear throttles and quarantines",
        dependencies=auth,
        responses=_responses(400, *denied, 404, 413, 422),
    )
    async def reset_all(body: ResetRequest | None = None) -> dict[str, Any]:
        provider = _known(pool, body.provider if body is not None else None)
        count = pool.reset(provider)
        log.info("keypool admin: reset %d breaker(s) (provider=%s)", count, provider or "all")
        return {"reset": count, "keys": pool.stats(provider)}

    @api.post(
        "/api/v1/circuit-breaker/{key_id}/reset",
        tags=["circuit-breaker"],
        summary="Close one key's breaker and clear its throttle or quarantine",
        dependencies=auth,
        responses=_responses(*denied, 404, 409, 422),
    )
    async def reset_key(key_id: str, provider: _ProviderQuery = None) -> dict[str, Any]:
        owner = _owner(pool, key_id, provider)
        count = pool.reset(owner, key_id)
        log.info("keypool admin: reset breaker of key %s (provider=%s)", key_id, owner)
        return {"reset": count, "keys": [pool.key_stats(key_id, owner)]}

    @api.patch(
        "/api/v1/circuit-breaker/{key_id}/config",
        tags=["circuit-breaker"],
        summary="Change one key's breaker settings (state is kept)",
        dependencies=auth,
        responses=_responses(400, *denied, 404, 409, 413, 422),
    )
    async def patch_key_config(
        key_id: str, body: BreakerConfigPatch, provider: _ProviderQuery = None
    ) -> dict[str, Any]:
        changes = body.changes()
        owner = _owner(pool, key_id, provider)
        count = pool.update_config(changes, provider=owner, key_id=key_id)
        log.info("keypool admin: key %s (provider=%s) config changed: %s", key_id, owner, sorted(changes))
        return {"updated": count, "keys": [pool.key_stats(key_id, owner)]}

    @api.patch(
        "/api/v1/circuit-breaker/config",
        tags=["circuit-breaker"],
        summary="Change the breaker settings of every key (or one provider's keys)",
        dependencies=auth,
        responses=_responses(400, *denied, 404, 413, 422),
    )
    async def patch_config(body: BreakerConfigPatch, provider: _ProviderQuery = None) -> dict[str, Any]:
        changes = body.changes()
        provider = _known(pool, provider)
        count = pool.update_config(changes, provider=provider)
        log.info(
            "keypool admin: config changed for %d key(s) (provider=%s): %s",
            count,
            provider or "all",
            sorted(changes),
        )
        return {"updated": count, "keys": pool.stats(provider)}

    @api.post(
        "/api/v1/keys/rotate",
        tags=["keys"],
        summary="Force a provider's backup keys on or off, or back to automatic",
        dependencies=auth,
        responses=_responses(400, *denied, 404, 409, 413, 422),
    )
    async def rotate(body: RotateRequest) -> dict[str, Any]:
        provider = body.provider
        capacity = pool.capacity(provider)  # raises UnknownProviderError (also for "")
        if body.activate_backup and capacity.backup.total == 0:
            raise _Conflict(f"provider {provider!r} has no backup keys to activate")
        pool.activate_backup(provider, body.activate_backup)
        capacity = pool.capacity(provider)
        log.info(
            "keypool admin: backup keys of %s forced=%s (active=%s)",
            provider,
            body.activate_backup,
            capacity.backup_active,
        )
        return {
            "provider": provider,
            "backup_active": capacity.backup_active,
            "backup_forced": capacity.backup_forced,
            "capacity": capacity.as_dict(),
            "keys": pool.stats(provider),
        }

    @api.get(
        "/api/v1/capacity",
        tags=["capacity"],
        summary="Every provider's capacity: keys by state, healthy share, status, backups",
        dependencies=read_auth,
        responses=_responses(*read_denied, 404, 422),
    )
    async def get_capacity(provider: _ProviderQuery = None) -> list[dict[str, Any]]:
        names = [provider] if provider is not None else list(pool.providers)  # capacity() checks
        return [pool.capacity(name).as_dict() for name in names]

    if reg is not None and metrics_path is not None:
        metrics_registry = reg

        @api.get(
            metrics_path,
            tags=["observability"],
            summary="Prometheus metrics (text exposition format)",
            response_class=Response,
            dependencies=read_auth,
            responses=_responses(*read_denied),
        )
        def get_metrics(request: Request) -> Response:
            # Sync on purpose: FastAPI runs it in a worker thread, so a large pool's scrape never
            # blocks the event loop.
            from prometheus_client.exposition import choose_encoder

            encoder, content_type = choose_encoder(request.headers.get("accept", ""))
            return Response(encoder(metrics_registry), media_type=content_type)

    @api.get("/healthz", tags=["observability"], summary="Liveness: the API is up")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "providers": list(pool.providers)}

    return api


def create_app(
    pool: KeyPool,
    *,
    token: str | None,
    protect_reads: bool = False,
    registry: CollectorRegistry | None = None,
    allow_no_token: bool = False,
) -> FastAPI:
    """A FastAPI app serving the admin API for ``pool`` (see the module docstring).

    ``registry`` is what ``/metrics`` serves (default: ``prometheus_client``'s global registry);
    the pool is instrumented on it unless it already is. Raises :class:`~keypool.ConfigError` for a
    mutating app without a token unless ``allow_no_token=True``.
    """
    from . import __version__

    api = router(
        pool,
        token=token,
        protect_reads=protect_reads,
        registry=registry,
        allow_no_token=allow_no_token,
    )
    app = FastAPI(
        title="keypool admin API",
        version=__version__,
        description=(
            "Circuit breakers and keys of a keypool pool: stats, resets, hot config changes, "
            "backup rotation, capacity and Prometheus metrics. Mutations need "
            "`Authorization: Bearer <token>`."
        ),
        docs_url=None,
        redoc_url=None,
    )
    app.include_router(api)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        return _error_response(exc)

    # Errors outside the routes (unknown path, wrong method) in the same JSON shape.
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_http_error)
    app.add_exception_handler(KeyPoolError, on_http_error)
    app.state.keypool_pool = pool
    return app
