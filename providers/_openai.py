"""Pooled ``openai`` clients for any OpenAI-compatible API.

:class:`AsyncPooledOpenAI` *is* an ``openai.AsyncOpenAI`` (and :class:`PooledOpenAI` an
``openai.OpenAI``): same resources, same types, same streaming. The only difference is the
``httpx2`` client underneath, whose transport leases a key from a :class:`keypool.KeyPool` for every
attempt. The SDK's own retries are off (``max_retries=0``): failover across keys replaces them.

When no key can take a call, the error raised is both a :class:`keypool.NoKeyAvailable` (with
``provider`` and ``retry_after``) and an ``openai.APIConnectionError``, so existing ``except``
clauses keep working.
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
    ConfigError,
    KeyPool,
    KeyPoolTransport,
    KeySpec,
    NoKeyAvailable,
    SyncKeyPoolTransport,
)
from keypool._config import keys_from

from ._batch import BatchItem, Progress, run_batch
from ._env import keys_from_env
from ._health import HealthReport, Probe, check_health, check_health_sync

__all__ = ["AsyncPooledOpenAI", "NoKeyAvailableError", "PooledOpenAI"]

_PLACEHOLDER_KEY = "keypool-managed"  # openai insists on an api_key; the transport sets the real one


class NoKeyAvailableError(NoKeyAvailable, openai.APIConnectionError):
    """No key can take the call: a :class:`keypool.NoKeyAvailable` that ``openai`` code also catches."""

    def __init__(self, cause: NoKeyAvailable, request: httpx2.Request) -> None:
        openai.APIConnectionError.__init__(self, message=str(cause), request=request)
        self.provider = cause.provider
        self.retry_after = cause.retry_after


# Only the completions endpoints end their event streams with ``data: [DONE]``; the Responses API
# (and other event streams) end after their last event, so a missing ``[DONE]`` there is no failure.
_DONE = b"[DONE]"


def _done_on_completions(request: httpx2.Request) -> bytes | None:
    """The terminator a streamed request's answer must end with, by endpoint."""
    return _DONE if request.url.path.rstrip("/").endswith("/completions") else None


class _PooledSettings:
    """What a pooled client is built from; shared by the sync and async clients."""

    provider_name: ClassVar[str] = "openai-compatible"
    default_base_url: ClassVar[str | None] = None
    env_prefix: ClassVar[str | None] = None
    probe: ClassVar[Probe] = Probe(method="GET", path="/models")
    require_stream_terminator: ClassVar[bool] = True

    pool: KeyPool
    provider: str
    keypool_transport: Any

    def _connect(
        self,
        http_client: Any,
        transport_type: type[KeyPoolTransport] | type[SyncKeyPoolTransport],
        client_type: type[httpx2.AsyncClient] | type[httpx2.Client],
        keys: dict[str, Any],
        options: dict[str, Any],
    ) -> Any:
        """The HTTP client under the openai client: adopted from a copy, or built over a pool."""
        adopted = getattr(http_client, "_transport", None)
        if isinstance(adopted, transport_type):  # openai's copy()/with_options(): share it
            self.pool, self.provider, self.keypool_transport = adopted.pool, adopted.provider, adopted
            return http_client
        if http_client is not None:
            raise ConfigError("http_client: pass transport= instead; the client builds its own")
        self.pool, self.provider = self._resolve_pool(**keys)
        terminator = _done_on_completions if self.require_stream_terminator else None
        self.keypool_transport = transport_type(
            self.pool, self.provider, sse_terminator=terminator, **options
        )
        return client_type(transport=self.keypool_transport, timeout=None)

    def _openai_options(
        self, base_url: str | None, http_client: Any, options: dict[str, Any]
    ) -> dict[str, Any]:
        """What the openai constructor gets: our HTTP client, no SDK retries, a placeholder key."""
        options.pop("api_key", None)
        url = base_url or self.default_base_url
        if url is None:
            raise ConfigError("base_url: required for a generic OpenAI-compatible provider")
        return {
            **options,
            "api_key": _PLACEHOLDER_KEY,
            "base_url": url,
            "http_client": http_client,
            "max_retries": 0,
        }

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
            raise ConfigError(f"api_keys: no keys given for provider {name!r}; pass api_keys=[...]{where}")
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


def _dual(exc: NoKeyAvailable, base_url: httpx2.URL) -> NoKeyAvailableError:
    """The pool's refusal, typed so that both keypool and openai ``except`` clauses catch it."""
    if isinstance(exc, NoKeyAvailableError):
        return exc
    return NoKeyAvailableError(exc, httpx2.Request("POST", base_url))


class AsyncPooledOpenAI(_PooledSettings, openai.AsyncOpenAI):
    """An ``openai.AsyncOpenAI`` whose every request goes through a key pool.

    Keys: ``api_keys`` (plus ``backup_keys`` and ``weights``), or a ``pool`` you own, or the
    environment (``{env_prefix}_API_KEYS``, comma-separated, else ``{env_prefix}_API_KEY``).
    ``transport`` is where requests really go (default: a real HTTP transport). ``request_timeout``
    is one deadline for a request's waits, attempts and retries across keys (600 s, ``openai``'s
    own default); ``attempt_timeout`` caps each attempt so a key that never answers gives way to
    another one sooner; ``stream_idle_timeout`` fails a
    stream that sends nothing for that long. Any other keyword goes to ``openai.AsyncOpenAI``.
    Closing the client closes the HTTP client and transport it created, never a pool or transport
    it was given.
    """

    def __init__(
        self,
        *,
        api_keys: Sequence[str | KeySpec] | None = None,
        backup_keys: Sequence[str | KeySpec] = (),
        weights: Sequence[float] | None = None,
        pool: KeyPool | None = None,
        provider: str | None = None,
        base_url: str | None = None,
        breaker: BreakerConfig | None = None,
        max_concurrency_per_key: int | None = None,
        max_attempts: int | None = None,
        request_timeout: float | None = 600.0,
        attempt_timeout: float | None = None,
        stream_idle_timeout: float | None = 120.0,
        transport: httpx2.AsyncBaseTransport | None = None,
        http_client: httpx2.AsyncClient | None = None,
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
        options = {
            "transport": transport,
            "max_attempts": max_attempts,
            "timeout": request_timeout,
            "attempt_timeout": attempt_timeout,
            "stream_idle_timeout": stream_idle_timeout,
        }
        http = self._connect(http_client, KeyPoolTransport, httpx2.AsyncClient, keys, options)
        super().__init__(**self._openai_options(base_url, http, openai_options))

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().request(*args, **kwargs)
        except NoKeyAvailable as exc:
            raise _dual(exc, self.base_url) from exc

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
        api_keys: Sequence[str | KeySpec] | None = None,
        backup_keys: Sequence[str | KeySpec] = (),
        weights: Sequence[float] | None = None,
        pool: KeyPool | None = None,
        provider: str | None = None,
        base_url: str | None = None,
        breaker: BreakerConfig | None = None,
        max_concurrency_per_key: int | None = None,
        max_attempts: int | None = None,
        request_timeout: float | None = 600.0,
        attempt_timeout: float | None = None,
        transport: httpx2.BaseTransport | None = None,
        http_client: httpx2.Client | None = None,
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
        options = {
            "transport": transport,
            "max_attempts": max_attempts,
            "timeout": request_timeout,
            "attempt_timeout": attempt_timeout,
        }
        http = self._connect(http_client, SyncKeyPoolTransport, httpx2.Client, keys, options)
        super().__init__(**self._openai_options(base_url, http, openai_options))

    def request(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().request(*args, **kwargs)
        except NoKeyAvailable as exc:
            raise _dual(exc, self.base_url) from exc

    def health_check(self, *, timeout: float | None = None) -> HealthReport:
        """Probe every key through its breaker (open keys are skipped, not probed)."""
        return check_health_sync(
            self.pool, self.provider, self.keypool_transport, str(self.base_url), _probe(self.probe, timeout)
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(provider={self.provider!r}, base_url={str(self.base_url)!r})"
