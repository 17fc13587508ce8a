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
import uuid
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

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
    """The URL without credentials (user info, or a ``password=`` query argument), for log lines."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    address, qmark, query = rest.partition("?")
    address = address.rpartition("@")[2]
    if qmark:
        pairs = parse_qsl(query, keep_blank_values=True)
        kept = [(k, "***" if k.lower() == "password" else v) for k, v in pairs]
        return f"{scheme}://{address}?{urlencode(kept, safe='*')}"
    return f"{scheme}://{address}"


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
        self._held: dict[tuple[str, str], tuple[list[Any], Any]] = {}  # news that came while writing
        self._seen: dict[tuple[str, str], int] = {}
        # Which incarnation of the shared state the versions in ``_seen`` belong to. After a Redis
        # restart or flush, the first process back starts a new one and versions start again: a
        # process that sees a new epoch merges what it knows (its own knowledge is in no store).
        self._epoch: str | None = None
        self._lost = False
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
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _call(self, change: _Change, local: SharedView | None = None, offset: float = 0.0) -> list[Any]:
        """Run the script for one change; ``local`` (merge) is a pool's view, ``offset`` its clock's."""
        cfg = change.config

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
            argv.append(uuid.uuid4().hex[:16])  # the epoch to start, if the state was lost
        keys = self._keys(change.provider, change.key_id)
        async with asyncio.timeout(self.op_timeout):
            result: list[Any] = await self._script(keys=keys, args=argv)
        if result and result[0] in (b"lost", "lost"):
            await self._resync("the shared state was lost (a Redis restart?)")
            async with asyncio.timeout(self.op_timeout):
                result = await self._script(keys=keys, args=argv)
        return result

    def _adopt(self, provider: str, key_id: str, fields: list[Any], epoch: Any, force: bool = False) -> None:
        """Hand a state (as the script returns it) to every bound pool, newest versions only."""
        version = int(fields[8])
        key = (provider, key_id)
        epoch = _text(epoch)
        with self._lock:
            if force or self._epoch is None:
                self._epoch = epoch or self._epoch
            elif epoch and epoch != self._epoch:
                self._lost = True  # the state was lost and made again without us: merge first
                return
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
        # Loops test ``_closed`` rather than trusting cancellation alone: on Python 3.11 the
        # ``asyncio.wait_for`` inside redis-py's send path can swallow a task's cancellation.
        while not self._closed:
            change = await self._queue.get()
            key = (change.provider, change.key_id)
            try:
                if not self.degraded:
                    result = await self._call(change)
                    with self._lock:
                        last = self._pending[key] == 1
                    if last:  # a later change of ours is queued: its answer will be newer
                        self._adopt(change.provider, change.key_id, result, result[12])
            except _TROUBLE as exc:
                self._degrade(exc)
            except Exception:
                log.exception("keypool: shared state change failed")
            finally:
                with self._lock:
                    self._pending[key] -= 1
                    held = self._held.pop(key, None) if self._pending[key] == 0 else None
                if held is not None:  # another process's change that may be newer than ours
                    self._adopt(change.provider, change.key_id, *held)

    async def _listener(self) -> None:
        """Adopt other processes' changes; while degraded, try to resynchronise every so often.

        The subscription may outlive a degradation (a Redis too slow to answer, not gone), so
        recovery cannot wait for it to break: every ``retry_interval`` without news the listener
        checks whether the store is degraded and, if so, resynchronises.
        """
        assert self._client is not None
        while not self._closed:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(self.op_timeout):
                    await pubsub.subscribe(self._channel)
                if self.degraded or not self._healthy.is_set():
                    await self._resync("connected")
                while not self._closed:
                    message = await pubsub.get_message(timeout=self.retry_interval)
                    if message is not None:
                        self._on_message(message)
                    if self._lost:
                        log.info("keypool: shared breaker state on %s was lost; merging ours", self.url)
                        await self._resync("the shared state was lost")
                    elif message is None and self.degraded:
                        await self._resync("answering again")
            except _TROUBLE as exc:
                self._degrade(exc)
                await asyncio.sleep(self.retry_interval)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("keypool: shared state listener failed")
                await asyncio.sleep(self.retry_interval)
            finally:
                with contextlib.suppress(Exception):  # a broken connection: nothing to tidy
                    async with asyncio.timeout(self.op_timeout):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _on_message(self, message: dict[str, Any]) -> None:
        if self.degraded:
            # Serving on local state: what this process learned meanwhile is in no store yet, and
            # adopting others' news now could undo it (close a key it knows to be open). The
            # resynchronisation merges both and tells the pools the result.
            return
        try:
            data = json.loads(message["data"])
            provider, key_id, fields = str(data["p"]), str(data["k"]), list(data["s"])
            epoch = data.get("e")
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        key = (provider, key_id)
        with self._lock:
            if self._pending[key] > 0:
                # Our own write is on its way back. Adopting this now could undo a change the local
                # breaker already made; hold it, and the writer adopts it after ours if it is newer.
                held = self._held.get(key)
                if held is None or int(fields[8]) > int(held[0][8]) or epoch != held[1]:
                    self._held[key] = (fields, epoch)
                return
        self._adopt(provider, key_id, fields, epoch)

    def _degrade(self, exc: BaseException) -> None:
        if not self.degraded and not self._closed:
            self.degraded = True
            self.degradations += 1
            self._healthy.clear()
            log.warning(
                "keypool: shared breaker state on %s unavailable (%s); serving on local state",
                self.url,
                type(exc).__name__,
            )

    async def _measure_offsets(self, samples: int = 5) -> None:
        """Redis's clock minus each pool's, from the quickest of a few ``TIME`` round trips.

        One sample is not enough: the first call also opens the connection, and a busy process
        (one that just started, say) may sit on a reply; either skews the midpoint, and every
        process would then see keys half-open before Redis does and have its trial claims refused.
        """
        assert self._client is not None
        for pool in list(self._pools):
            best: tuple[float, float] | None = None  # (round trip, offset)
            for _ in range(samples + 1):
                before = pool.clock.now()
                async with asyncio.timeout(self.op_timeout):
                    seconds, micros = await self._client.time()
                after = pool.clock.now()
                sample = (after - before, seconds + micros / 1e6 - (before + after) / 2)
                if best is None or sample[0] < best[0]:
                    best = sample
            assert best is not None
            self._offsets[id(pool)] = best[1]

    async def _resync(self, why: str) -> None:
        """Merge every bound pool's local view into Redis, then adopt the result."""
        self._lost = False
        await self._measure_offsets()
        for pool in list(self._pools):
            offset = self._offsets.get(id(pool), 0.0)
            for provider, key_id, view in pool.shared_views():
                config = pool.breaker_config(key_id, provider)
                change = _Change(provider, key_id, "merge", config)
                result = await self._call(change, local=view, offset=offset)
                self._adopt(provider, key_id, result, result[12], force=True)
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
            self._adopt(provider, key_id, result, result[12])
        return int(result[9]) == 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def shutdown() -> None:
            pending = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
            for _ in range(20):  # cancel again if a task swallowed it (it must not outlive us)
                if not pending:
                    break
                for task in pending:
                    task.cancel()
                _, pending = await asyncio.wait(pending, timeout=0.05)
            if self._client is not None:
                async with asyncio.timeout(1):
                    await self._client.aclose()

        with contextlib.suppress(Exception):  # closing: nothing useful to do with an error
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=3)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=2)

    def __repr__(self) -> str:
        return f"RedisStore(url={self.url!r}, namespace={self.namespace!r}, degraded={self.degraded})"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
