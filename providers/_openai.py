"""Pooled ``openai`` clients for any OpenAI-compatible API.

:class:`AsyncPooledOpenAI` *is* an ``openai.AsyncOpenAI`` (and :class:`PooledOpenAI` an
``openai.OpenAI``): same resources, same types, same streaming, same options. The difference is
under the ``httpx2`` client: its transport leases a key from a :class:`keypool.KeyPool` for every
attempt and fails over between keys. What the plain client's options mean, they mean here:

* ``timeout`` (constructor, ``with_options``, per call) is the whole call's deadline: waits for a
  key, every attempt and every failover together;
* ``max_retries`` is how often an endpoint failure (5xx, timeouts, resets) is retried, on another
  key when there is one (a key's own 429/401/402/403 moves to another key without costing one);
* ``api_key=`` is a pool of one key; ``http_client=`` keeps its proxies, limits and hooks (the
  pool's transport is mounted under it), and proxies from the environment work as they do for the
  plain client;
* whatever keypool raises is the exception the plain client would raise for the same situation
  (see :mod:`providers._errors`), and also a :class:`keypool.KeyPoolError`.

keypool's own settings (``max_wait``, ``headers_timeout``, ``attempt_timeout``,
``stream_idle_timeout``, ``first_token_timeout``, ``stream_timeout``, ``max_attempts``,
``max_continuations``, ``prefill``) are keyword arguments of the constructor and of
``with_options``; the README's table lists every one with its default.

Streams: nothing reaches the caller before the first content delta, so a stream that breaks or
waits too long before it moves to another key unseen; a chat answer that breaks after content is
continued on another key where the route takes a prefill (``prefill="deepseek"`` for DeepSeek by
default, ``prefill="assistant"`` opt-in for servers that continue a trailing assistant message),
see :mod:`keypool._stream`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import httpx2
import openai
from openai.types.chat import ChatCompletion

from keypool import (
    BreakerConfig,
    CallSettings,
    ConfigError,
    KeyPool,
    KeyPoolTransport,
    KeySpec,
    SyncKeyPoolTransport,
)
from keypool._config import keys_from
from keypool._continuation import continuation_body, continuation_path
from keypool._policy import EXTENSION
from keypool._sse import grammar_of

from ._batch import BatchItem, Progress, run_batch
from ._env import keys_from_env
from ._errors import NoKeyAvailableError, openai_error
from ._health import HealthReport, Probe, check_health, check_health_sync

__all__ = ["AsyncPooledOpenAI", "NoKeyAvailableError", "PooledOpenAI"]

_PLACEHOLDER_KEY = "keypool-managed"  # openai insists on an api_key; the transport sets the real one
_UNSET: Any = object()
_KNOBS = (
    "max_attempts",
    "max_wait",
    "headers_timeout",
    "attempt_timeout",
    "stream_idle_timeout",
    "first_token_timeout",
    "stream_timeout",
    "max_continuations",
    "prefill",
)

# Only the completions endpoints end their event streams with ``data: [DONE]``; the Responses API
# (and other event streams) end after their last event, so a missing ``[DONE]`` there is no failure.
_DONE = b"[DONE]"


def _done_on_completions(request: httpx2.Request) -> bytes | None:
    """The terminator a streamed request's answer must end with, by endpoint."""
    return _DONE if request.url.path.rstrip("/").endswith("/completions") else None


def _knobs(values: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not _UNSET}


class _PooledSettings:
    """What a pooled client is built from; shared by the sync and async clients."""

    provider_name: ClassVar[str] = "openai-compatible"
    default_base_url: ClassVar[str | None] = None
    env_prefix: ClassVar[str | None] = None
    probe: ClassVar[Probe] = Probe(method="GET", path="/models")
    require_stream_terminator: ClassVar[bool] = True
    default_settings: ClassVar[CallSettings] = CallSettings()

    pool: KeyPool
    provider: str
    keypool_transport: Any
    keypool_settings: CallSettings

    def _setup(
        self,
        *,
        api_key: Any,
        keys: dict[str, Any],
        knobs: dict[str, Any],
        max_retries: Any,
        http_client: Any,
        transport: Any,
        adopted: Any,
        openai_options: dict[str, Any],
        sync: bool,
    ) -> dict[str, Any]:
        """Resolve the pool, the settings and the HTTP client; return the openai constructor's
        keyword arguments."""
        if "request_timeout" in openai_options:
            raise ConfigError(
                "request_timeout: removed; pass timeout= (the openai option), which now bounds the "
                "whole call: waits for a key, every attempt and every failover"
            )
        retries = openai.DEFAULT_MAX_RETRIES if max_retries is _UNSET else max_retries
        if adopted is not None:  # a copy (with_options): the same pool and transport, new settings
            self.pool, self.provider, self.keypool_transport, self.keypool_settings = adopted
            http = http_client
        else:
            if api_key is not None and api_key != _PLACEHOLDER_KEY:
                if not isinstance(api_key, str):
                    raise ConfigError("api_key: must be a string (a pooled client holds its keys itself)")
                if keys["api_keys"]:
                    raise ConfigError("pass api_key= (one key) or api_keys= (several), not both")
                keys["api_keys"] = [api_key]  # a pool of one, whatever the environment says
            self.pool, self.provider = self._resolve_pool(**keys)
            self.keypool_settings = self.default_settings.merged({**_knobs(knobs), "retries": retries})
            http = self._http_client(http_client, transport, sync)
        url = openai_options.pop("base_url", None) or self.default_base_url
        if url is None:
            raise ConfigError("base_url: required for a generic OpenAI-compatible provider")
        return {
            **openai_options,
            "api_key": _PLACEHOLDER_KEY,
            "base_url": url,
            "http_client": http,
            "max_retries": retries,
        }

    def continuation(self, request: Mapping[str, Any], delivered: str) -> tuple[Any, dict[str, Any]]:
        """How this route continues an answer broken elsewhere: the client to call (a copy on
        DeepSeek's beta API for its prefix completion) and the ``chat.completions.create``
        arguments, ``request``'s with ``delivered`` as the assistant prefill. Splice the chunks
        with :class:`keypool.Splice` (``.chunk``). ConfigError if the route takes no prefill."""
        prefill = self.keypool_settings.prefill
        if prefill is None:
            raise ConfigError(
                f"prefill: provider {self.provider!r} takes none here, so it cannot continue an answer; "
                "allowed: 'deepseek', 'assistant'"
            )
        kwargs = continuation_body(request, delivered, prefill)
        client: Any = self
        url: httpx2.URL = self.base_url  # type: ignore[attr-defined]
        path = continuation_path(f"{url.path.rstrip('/')}/chat/completions", prefill)
        beta = path.removesuffix("/chat/completions") + "/"
        if beta != url.path:
            client = self.with_options(base_url=url.copy_with(path=beta))  # type: ignore[attr-defined]
        return client, kwargs

    def _make_transport(self, inner: Any, sync: bool, *, close_inner: bool = True) -> Any:
        kind = SyncKeyPoolTransport if sync else KeyPoolTransport
        return kind(
            self.pool,
            self.provider,
            transport=inner,
            close_inner=close_inner,
            timeout=None,  # the deadline is each call's own openai timeout
            settings=self.keypool_settings,
            sse_terminator=_done_on_completions if self.require_stream_terminator else None,
            errors=openai_error,
        )

    def _http_client(self, given: Any, transport: Any, sync: bool) -> Any:
        """The HTTP client under the openai client, with the pool's transport mounted under it."""
        client_type: type[httpx2.Client] | type[httpx2.AsyncClient] = (
            httpx2.Client if sync else httpx2.AsyncClient
        )
        if given is not None:
            if not isinstance(given, client_type):
                raise ConfigError(
                    f"http_client: expected an {client_type.__module__}.{client_type.__name__} "
                    f"(got {type(given).__name__}); or pass transport= for where requests really go"
                )
            if transport is not None:
                raise ConfigError("pass http_client= or transport=, not both")
            if isinstance(given._transport, KeyPoolTransport | SyncKeyPoolTransport):
                raise ConfigError(
                    "http_client: already serves a pooled client; use that client's with_options()"
                )
            return self._mount(given, sync)
        if transport is not None:
            # a transport you pass is yours to close
            self.keypool_transport = self._make_transport(transport, sync, close_inner=False)
            # openai takes its default timeout from the HTTP client it is given: give it openai's own
            return client_type(transport=self.keypool_transport, timeout=openai.DEFAULT_TIMEOUT)
        default = openai.DefaultHttpxClient() if sync else openai.DefaultAsyncHttpxClient()
        return self._mount(default, sync)

    def _mount(self, http: Any, sync: bool) -> Any:
        """Put the pool's transport over every transport of ``http`` (its proxy mounts too)."""
        self.keypool_transport = self._make_transport(http._transport, sync)
        http._transport = self.keypool_transport
        http._mounts = {
            pattern: None if inner is None else self._make_transport(inner, sync)
            for pattern, inner in http._mounts.items()
        }
        return http

    def _copy_args(
        self,
        knobs: dict[str, Any],
        api_key: Any,
        http_client: Any,
        max_retries: Any,
        extra: Mapping[str, Any],
    ) -> dict[str, Any]:
        """What a copy (``with_options``) passes on: the same pool and transport, new settings."""
        if api_key is not None and api_key != _PLACEHOLDER_KEY:
            raise ConfigError(
                "api_key: a copy of a pooled client uses its pool's keys; add a key with "
                "client.pool.add_key(...) or build another client with api_key="
            )
        if http_client is not None and http_client is not getattr(self, "_client", None):
            raise ConfigError(
                "http_client: a copy shares its client's HTTP client; build another pooled client"
            )
        changes = _knobs(knobs)
        if max_retries is not openai.NOT_GIVEN and max_retries is not _UNSET:
            changes["retries"] = max_retries
        settings = self.keypool_settings.merged(changes)
        adopted = (self.pool, self.provider, self.keypool_transport, settings)
        return {**extra, "_keypool": adopted}

    def _mark(self, request: httpx2.Request, options: Any) -> httpx2.Request:
        """Tell the transport this call's settings, and whether it streams."""
        data = getattr(options, "json_data", None)
        stream = isinstance(data, Mapping) and data.get("stream") is True
        mark: dict[str, Any] = {"settings": self.keypool_settings, "stream": stream}
        if stream:
            mark["grammar"] = grammar_of(request.url.path)
        request.extensions = {**request.extensions, EXTENSION: mark}
        return request

    @classmethod
    def _resolve_pool(
        cls,
        *,
        provider: str | None,
        api_keys: Sequence[str | KeySpec] | None,
        backup_keys: Sequence[str | KeySpec],
        weights: Sequence[float] | None,
        pool: KeyPool | None,
        breaker: BreakerConfig | None,
        max_concurrency_per_key: int | None,
    ) -> tuple[KeyPool, str]:
        name = provider or cls.provider_name
        if pool is not None:
            given = {
                "api_keys": bool(api_keys),
                "backup_keys": bool(backup_keys),
                "weights": weights is not None,
                "breaker": breaker is not None,
                "max_concurrency_per_key": max_concurrency_per_key is not None,
            }
            if any(given.values()):  # these build a pool: with a pool of yours they would be ignored
                names = ", ".join(f"{n}=" for n, g in given.items() if g)
                raise ConfigError(f"pass either pool= or api_keys= (and its options), not both: got {names}")
            if name not in pool.providers:
                raise ConfigError(
                    f"provider: the pool has no provider {name!r} (it has {sorted(pool.providers)})"
                )
            return pool, name
        secrets = list(api_keys) if api_keys else []
        if not secrets and cls.env_prefix:
            secrets = list(keys_from_env(cls.env_prefix))
        if not secrets:
            where = f" or set {cls.env_prefix}_API_KEYS / {cls.env_prefix}_API_KEY" if cls.env_prefix else ""
            raise ConfigError(
                f"api_keys: no keys given for provider {name!r}; pass api_key=... or api_keys=[...]{where}"
            )
        specs = list(keys_from(secrets, backup=backup_keys, weights=weights))
        if max_concurrency_per_key is not None:
            specs = [s.model_copy(update={"max_concurrency": max_concurrency_per_key}) for s in specs]
            specs = [KeySpec(**s.model_dump()) for s in specs]  # validate the cap
        built = KeyPool()
        built.add_provider(
            {"name": name, "keys": specs, "breaker": breaker or BreakerConfig()},
        )
        return built, name


def _probe(probe: Probe, timeout: float | None) -> Probe:
    if timeout is None:
        return probe
    if not timeout > 0:
        raise ConfigError(f"timeout: must be > 0 (got {timeout})")
    return dataclasses.replace(probe, timeout=timeout)


def _no_sdk_retries(options: Any) -> Any:
    """The SDK's own retry loop is off: the transport retries, across keys, within the budget the
    caller's ``max_retries`` set (``client.max_retries`` still reads what the caller gave)."""
    options = options.model_copy()
    options.max_retries = 0
    return options


class AsyncPooledOpenAI(_PooledSettings, openai.AsyncOpenAI):
    """An ``openai.AsyncOpenAI`` whose every request goes through a key pool.

    Keys: ``api_key`` (one), ``api_keys`` (plus ``backup_keys`` and ``weights``), a ``pool`` you
    own, or the environment (``{env_prefix}_API_KEYS``, comma-separated, else
    ``{env_prefix}_API_KEY``). ``transport`` is where requests really go (default: a real HTTP
    transport); ``http_client`` is an ``httpx2.AsyncClient`` of yours to mount the pool under.
    Every other keyword goes to ``openai.AsyncOpenAI``. Closing the client closes its HTTP client
    (as the plain client does), never a pool or a transport it was given.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_keys: Sequence[str | KeySpec] | None = None,
        backup_keys: Sequence[str | KeySpec] = (),
        weights: Sequence[float] | None = None,
        pool: KeyPool | None = None,
        provider: str | None = None,
        breaker: BreakerConfig | None = None,
        max_concurrency_per_key: int | None = None,
        max_retries: int = _UNSET,
        max_attempts: int | None = _UNSET,
        max_wait: float | None = _UNSET,
        headers_timeout: float | str | None = _UNSET,
        attempt_timeout: float | None = _UNSET,
        stream_idle_timeout: float | str | None = _UNSET,
        first_token_timeout: float | None = _UNSET,
        stream_timeout: float | None = _UNSET,
        max_continuations: int = _UNSET,
        prefill: str | None = _UNSET,
        transport: httpx2.AsyncBaseTransport | None = None,
        http_client: httpx2.AsyncClient | None = None,
        _keypool: Any = None,
        **openai_options: Any,
    ) -> None:
        keys = {
            "provider": provider,
            "api_keys": api_keys,
            "backup_keys": backup_keys,
            "weights": weights,
            "pool": pool,
            "breaker": breaker,
            "max_concurrency_per_key": max_concurrency_per_key,
        }
        knobs = {
            "max_attempts": max_attempts,
            "max_wait": max_wait,
            "headers_timeout": headers_timeout,
            "attempt_timeout": attempt_timeout,
            "stream_idle_timeout": stream_idle_timeout,
            "first_token_timeout": first_token_timeout,
            "stream_timeout": stream_timeout,
            "max_continuations": max_continuations,
            "prefill": prefill,
        }
        options = self._setup(
            api_key=api_key,
            keys=keys,
            knobs=knobs,
            max_retries=max_retries,
            http_client=http_client,
            transport=transport,
            adopted=_keypool,
            openai_options=openai_options,
            sync=False,
        )
        super().__init__(**options)

    def copy(  # type: ignore[override]
        self,
        *,
        api_key: str | None = None,
        http_client: httpx2.AsyncClient | None = None,
        max_retries: int | Any = openai.NOT_GIVEN,
        max_attempts: int | None = _UNSET,
        max_wait: float | None = _UNSET,
        headers_timeout: float | str | None = _UNSET,
        attempt_timeout: float | None = _UNSET,
        stream_idle_timeout: float | str | None = _UNSET,
        first_token_timeout: float | None = _UNSET,
        stream_timeout: float | None = _UNSET,
        max_continuations: int = _UNSET,
        prefill: str | None = _UNSET,
        _extra_kwargs: Mapping[str, Any] = {},
        **kwargs: Any,
    ) -> AsyncPooledOpenAI:
        """openai's ``copy``/``with_options``, plus keypool's settings; the copy shares the pool."""
        knobs = {
            "max_attempts": max_attempts,
            "max_wait": max_wait,
            "headers_timeout": headers_timeout,
            "attempt_timeout": attempt_timeout,
            "stream_idle_timeout": stream_idle_timeout,
            "first_token_timeout": first_token_timeout,
            "stream_timeout": stream_timeout,
            "max_continuations": max_continuations,
            "prefill": prefill,
        }
        extra = self._copy_args(knobs, api_key, http_client, max_retries, _extra_kwargs)
        copied: AsyncPooledOpenAI = super().copy(max_retries=max_retries, _extra_kwargs=extra, **kwargs)
        return copied

    with_options = copy  # type: ignore[assignment]

    def _build_request(self, options: Any, *, retries_taken: int = 0) -> httpx2.Request:
        return self._mark(super()._build_request(options, retries_taken=retries_taken), options)

    async def request(self, cast_to: Any, options: Any, **kwargs: Any) -> Any:
        return await super().request(cast_to, _no_sdk_retries(options), **kwargs)

    async def batch_chat(
        self,
        requests: Sequence[Mapping[str, Any]],
        *,
        concurrency: int = 16,
        progress: bool | Progress = False,
    ) -> list[BatchItem[Mapping[str, Any], ChatCompletion]]:
        """Run many ``chat.completions.create(**request)`` calls across the pool, in input order."""

        async def one(request: Mapping[str, Any]) -> ChatCompletion:
            result: ChatCompletion = await self.chat.completions.create(**request)
            return result

        return await run_batch(one, requests, concurrency=concurrency, progress=progress)

    async def health_check(self, *, timeout: float | None = None) -> HealthReport:
        """Probe every key through its breaker (open keys are skipped, not probed).

        ``timeout`` bounds each probe (default: the probe's own, 10 s).
        """
        return await check_health(
            self.pool, self.provider, self.keypool_transport, str(self.base_url), _probe(self.probe, timeout)
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(provider={self.provider!r}, base_url={str(self.base_url)!r})"


class PooledOpenAI(_PooledSettings, openai.OpenAI):
    """The sync twin of :class:`AsyncPooledOpenAI`: an ``openai.OpenAI`` over a key pool."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_keys: Sequence[str | KeySpec] | None = None,
        backup_keys: Sequence[str | KeySpec] = (),
        weights: Sequence[float] | None = None,
        pool: KeyPool | None = None,
        provider: str | None = None,
        breaker: BreakerConfig | None = None,
        max_concurrency_per_key: int | None = None,
        max_retries: int = _UNSET,
        max_attempts: int | None = _UNSET,
        max_wait: float | None = _UNSET,
        headers_timeout: float | str | None = _UNSET,
        attempt_timeout: float | None = _UNSET,
        stream_idle_timeout: float | str | None = _UNSET,
        first_token_timeout: float | None = _UNSET,
        stream_timeout: float | None = _UNSET,
        max_continuations: int = _UNSET,
        prefill: str | None = _UNSET,
        transport: httpx2.BaseTransport | None = None,
        http_client: httpx2.Client | None = None,
        _keypool: Any = None,
        **openai_options: Any,
    ) -> None:
        keys = {
            "provider": provider,
            "api_keys": api_keys,
            "backup_keys": backup_keys,
            "weights": weights,
            "pool": pool,
            "breaker": breaker,
            "max_concurrency_per_key": max_concurrency_per_key,
        }
        knobs = {
            "max_attempts": max_attempts,
            "max_wait": max_wait,
            "headers_timeout": headers_timeout,
            "attempt_timeout": attempt_timeout,
            "stream_idle_timeout": stream_idle_timeout,
            "first_token_timeout": first_token_timeout,
            "stream_timeout": stream_timeout,
            "max_continuations": max_continuations,
            "prefill": prefill,
        }
        options = self._setup(
            api_key=api_key,
            keys=keys,
            knobs=knobs,
            max_retries=max_retries,
            http_client=http_client,
            transport=transport,
            adopted=_keypool,
            openai_options=openai_options,
            sync=True,
        )
        super().__init__(**options)

    def copy(  # type: ignore[override]
        self,
        *,
        api_key: str | None = None,
        http_client: httpx2.Client | None = None,
        max_retries: int | Any = openai.NOT_GIVEN,
        max_attempts: int | None = _UNSET,
        max_wait: float | None = _UNSET,
        headers_timeout: float | str | None = _UNSET,
        attempt_timeout: float | None = _UNSET,
        stream_idle_timeout: float | str | None = _UNSET,
        first_token_timeout: float | None = _UNSET,
        stream_timeout: float | None = _UNSET,
        max_continuations: int = _UNSET,
        prefill: str | None = _UNSET,
        _extra_kwargs: Mapping[str, Any] = {},
        **kwargs: Any,
    ) -> PooledOpenAI:
        """openai's ``copy``/``with_options``, plus keypool's settings; the copy shares the pool."""
        knobs = {
            "max_attempts": max_attempts,
            "max_wait": max_wait,
            "headers_timeout": headers_timeout,
            "attempt_timeout": attempt_timeout,
            "stream_idle_timeout": stream_idle_timeout,
            "first_token_timeout": first_token_timeout,
            "stream_timeout": stream_timeout,
            "max_continuations": max_continuations,
            "prefill": prefill,
        }
        extra = self._copy_args(knobs, api_key, http_client, max_retries, _extra_kwargs)
        copied: PooledOpenAI = super().copy(max_retries=max_retries, _extra_kwargs=extra, **kwargs)
        return copied

    with_options = copy  # type: ignore[assignment]

    def _build_request(self, options: Any, *, retries_taken: int = 0) -> httpx2.Request:
        return self._mark(super()._build_request(options, retries_taken=retries_taken), options)

    def request(self, cast_to: Any, options: Any, **kwargs: Any) -> Any:
        return super().request(cast_to, _no_sdk_retries(options), **kwargs)

    def health_check(self, *, timeout: float | None = None) -> HealthReport:
        """Probe every key through its breaker (open keys are skipped, not probed)."""
        return check_health_sync(
            self.pool, self.provider, self.keypool_transport, str(self.base_url), _probe(self.probe, timeout)
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(provider={self.provider!r}, base_url={str(self.base_url)!r})"
