"""RedisStore: breaker state shared by every process (and host) that points at one Redis.

Every decision that must be atomic (count a failure and maybe trip, take a half-open trial slot,
close after enough trial successes, extend a throttle) is one Lua script, timed by Redis's clock in
milliseconds, so ``half_open_max_calls`` holds across all processes together and every process
agrees on when a key reopens. The script publishes each change; every process listens and adopts
it within milliseconds (push, not polling).

Nothing waits for Redis on the way to a healthy key: changes are handed to a background event loop
(the ``redis`` package's asyncio client, in a thread of its own) and only half-open trial slots are
claimed synchronously, with a short timeout. When Redis is unreachable or slow the pools keep
serving on local state; the degradation is logged once, and when Redis is back each process merges
what it knows (the most restrictive view wins, so a Redis that restarted empty never closes a
breaker a process knows to be open) before sharing again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import threading
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .._config import BreakerConfig
from .._errors import ConfigError
from ._base import SharedView
from ._model import Op

if TYPE_CHECKING:
    from .._pool import KeyPool

__all__ = ["RedisStore"]

log = logging.getLogger("keypool.store")

_SCRIPT = resources.files("keypool.store").joinpath("redis_script.lua").read_text()
_TROUBLE = (RedisError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True, slots=True)
class _Change:
    provider: str
    key_id: str
    op: Op
    config: BreakerConfig
    token: str = ""
    arg: int = 0
    reason: str = ""


def _safe_url(url: str) -> str:
    """The URL without credentials, for log lines."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}" if rest else url


class RedisStore:
    """Shared breaker state on Redis.

    ``url`` (or ``KEYPOOL_REDIS_URL``) is any URL the ``redis`` client accepts, TLS (``rediss://``)
    and passwords included; ``namespace`` keeps pools on one Redis apart. ``claim_timeout`` bounds
    the one synchronous call (taking a trial slot); past it the pool decides locally.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str = "keypool",
        claim_timeout: float = 0.05,
        op_timeout: float = 0.5,
        retry_interval: float = 0.25,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        url = url or os.environ.get("KEYPOOL_REDIS_URL")
        if not url:
            raise ConfigError("url: no Redis URL given; pass url=... or set KEYPOOL_REDIS_URL")
        if not namespace or any(c in namespace for c in " \t\n"):
            raise ConfigError(f"namespace: must be a non-empty word (got {namespace!r})")
        self.url = _safe_url(url)
        self._url = url
        self.namespace = namespace
        self.claim_timeout = claim_timeout
        self.op_timeout = op_timeout
        self.retry_interval = retry_interval
        self._options: dict[str, Any] = {"socket_timeout": op_timeout, "socket_connect_timeout": op_timeout}
        self._options.update(client_options or {})
        self._channel = f"{namespace}:events"
        self._pools: list[KeyPool] = []
        self._offsets: dict[int, float] = {}  # id(pool) -> Redis seconds minus pool-clock seconds
        self._pending: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._seen: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._queue: asyncio.Queue[_Change] | None = None
        self._client: aioredis.Redis | None = None
        self._script: Any = None
        self._healthy = threading.Event()
        self.degraded = False
        self.degradations = 0
        self._rng = random.Random()
        self._thread = threading.Thread(target=self._run_loop, name="keypool-redis", daemon=True)
        self._started = threading.Event()
        self._closed = False
        self._thread.start()
        self._started.wait()

    # ------------------------------------------------------------------ names

    def _keys(self, provider: str, key_id: str) -> list[str]:
        base = f"{self.namespace}:b:{provider}:{key_id}"
        return [base, f"{base}:trials", f"{self.namespace}:epoch"]

    # ------------------------------------------------------------------ the store's own loop

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._queue = asyncio.Queue()
        self._client = aioredis.Redis.from_url(self._url, **self._options)
        self._script = self._client.register_script(_SCRIPT)
        self._loop.create_task(self._writer())
        self._loop.create_task(self._listener())
        self._loop.call_soon(self._started.set)
        self._loop.run_forever()

    async def _call(self, change: _Change, local: SharedView | None = None) -> list[Any]:
        cfg = change.config
        offset = self._offsets.get(id(self._pools[0]), 0.0) if self._pools else 0.0

        def ms(local_seconds: float) -> int:
            return round((local_seconds + offset) * 1000) if local_seconds else 0

        argv: list[Any] = [
            change.op,
            cfg.failure_threshold,
            cfg.success_threshold,
            round(cfg.timeout * 1000),
            cfg.backoff_multiplier,
            round(cfg.max_timeout * 1000),
            cfg.jitter,
            cfg.half_open_max_calls,
            round(cfg.probe_timeout * 1000),
            change.token,
            change.arg,
            change.reason,
            self._channel,
            change.provider,
            change.key_id,
            self._rng.random(),
        ]
        if local is not None:
            argv += [int(local.open), ms(local.open_until), ms(local.throttled_until), local.quarantine]
        keys = self._keys(change.provider, change.key_id)
        result: list[Any] = await asyncio.wait_for(
            self._script(keys=keys, args=argv), timeout=self.op_timeout
        )
        if result and result[0] in (b"lost", "lost"):
            await self._resync("the shared state was lost (a Redis restart?)")
            result = await asyncio.wait_for(self._script(keys=keys, args=argv), timeout=self.op_timeout)
        return result

    def _adopt(self, provider: str, key_id: str, fields: list[Any], force: bool = False) -> None:
        """Hand a state (as the script returns it) to every bound pool, newest versions only."""
        version = int(fields[8])
        key = (provider, key_id)
        with self._lock:
            if not force and version <= self._seen.get(key, -1):
                return
            self._seen[key] = version
            pools = list(self._pools)
        for pool in pools:
            offset = self._offsets.get(id(pool), 0.0)

            def local(ms: Any, offset: float = offset) -> float:
                value = int(ms)
                return value / 1000.0 - offset if value else 0.0

            pool.adopt_shared(
                provider,
                key_id,
                SharedView(
                    open=int(fields[0]) == 1,
                    open_until=local(fields[1]),
                    throttled_until=local(fields[2]),
                    quarantine=_text(fields[3]),
                    reason=_text(fields[7]),
                    failures=int(fields[4]),
                    successes=int(fields[5]),
                    version=version,
                ),
            )

    async def _writer(self) -> None:
        assert self._queue is not None
        while True:
            change = await self._queue.get()
            key = (change.provider, change.key_id)
            try:
                if not self.degraded:
                    result = await self._call(change)
                    with self._lock:
                        last = self._pending[key] == 1
                    if last:  # a later change of ours is queued: its answer will be newer
                        self._adopt(change.provider, change.key_id, result)
            except _TROUBLE as exc:
                self._degrade(exc)
            except Exception:
                log.exception("keypool: shared state change failed")
            finally:
                with self._lock:
                    self._pending[key] -= 1

    async def _listener(self) -> None:
        assert self._client is not None
        while True:
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self._channel)
                if self.degraded or not self._healthy.is_set():
                    await self._resync("connected")
                async for message in pubsub.listen():
                    self._on_message(message)
            except _TROUBLE as exc:
                self._degrade(exc)
                await asyncio.sleep(self.retry_interval)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("keypool: shared state listener failed")
                await asyncio.sleep(self.retry_interval)

    def _on_message(self, message: dict[str, Any]) -> None:
        try:
            data = json.loads(message["data"])
            provider, key_id, fields = str(data["p"]), str(data["k"]), list(data["s"])
        except (ValueError, KeyError, TypeError):
            return
        with self._lock:
            if self._pending[(provider, key_id)] > 0:
                return  # our own write is on its way back with the newest state
        self._adopt(provider, key_id, fields)

    def _degrade(self, exc: BaseException) -> None:
        if not self.degraded:
            self.degraded = True
            self.degradations += 1
            self._healthy.clear()
            log.warning(
                "keypool: shared breaker state on %s unavailable (%s); serving on local state",
                self.url,
                type(exc).__name__,
            )

    async def _measure_offsets(self) -> None:
        assert self._client is not None
        for pool in list(self._pools):
            before = pool.clock.now()
            seconds, micros = await asyncio.wait_for(self._client.time(), timeout=self.op_timeout)
            after = pool.clock.now()
            self._offsets[id(pool)] = seconds + micros / 1e6 - (before + after) / 2

    async def _resync(self, why: str) -> None:
        """Merge every bound pool's local view into Redis, then adopt the result."""
        await self._measure_offsets()
        for pool in list(self._pools):
            for provider, key_id, view in pool.shared_views():
                config = pool.breaker_config(key_id, provider)
                result = await self._call(_Change(provider, key_id, "merge", config), local=view)
                self._adopt(provider, key_id, result, force=True)
        if self.degraded:
            log.info("keypool: shared breaker state on %s is back (%s); resynchronised", self.url, why)
        self.degraded = False
        self._healthy.set()

    # ------------------------------------------------------------------ what pools call

    def bind(self, pool: KeyPool) -> None:
        with self._lock:
            if pool not in self._pools:
                self._pools.append(pool)
        future = asyncio.run_coroutine_threadsafe(self._bound(), self._loop)
        try:
            future.result(timeout=max(2.0, self.op_timeout * 4))
        except Exception as exc:  # Redis down at start: serve locally, catch up later
            self._loop.call_soon_threadsafe(self._degrade, exc)

    async def _bound(self) -> None:
        try:
            await self._resync("bound")
        except _TROUBLE as exc:
            self._degrade(exc)

    def submit(
        self,
        provider: str,
        key_id: str,
        op: Op,
        config: BreakerConfig,
        *,
        token: str = "",
        arg: int = 0,
        reason: str = "",
    ) -> None:
        if self._closed or self.degraded:
            return  # local state carries on; the resync merges it when Redis is back
        with self._lock:
            self._pending[(provider, key_id)] += 1
        change = _Change(provider, key_id, op, config, token, arg, reason)
        assert self._queue is not None
        self._loop.call_soon_threadsafe(self._queue.put_nowait, change)

    def claim(self, provider: str, key_id: str, token: str, config: BreakerConfig) -> bool:
        if self._closed or self.degraded:
            return True
        change = _Change(provider, key_id, "claim", config, token)
        future = asyncio.run_coroutine_threadsafe(self._call(change), self._loop)
        try:
            result = future.result(timeout=self.claim_timeout)
        except Exception as exc:
            future.cancel()
            if isinstance(exc, (*_TROUBLE, TimeoutError)):
                self._loop.call_soon_threadsafe(self._degrade, exc)
            return True
        if int(result[10]):
            self._adopt(provider, key_id, result)
        return int(result[9]) == 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def shutdown() -> None:
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            if self._client is not None:
                await self._client.aclose()

        with contextlib.suppress(Exception):  # closing: nothing useful to do with an error
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=2)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=2)

    def __repr__(self) -> str:
        return f"RedisStore(url={self.url!r}, namespace={self.namespace!r}, degraded={self.degraded})"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
