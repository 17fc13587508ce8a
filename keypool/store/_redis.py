"""RedisStore: breaker state shared by every process (and host) that points at one Redis.

Every decision that must be atomic (count a failure and maybe trip, take a half-open trial slot,
close after enough trial successes, extend a throttle) is one Lua script on Redis's clock, so
``half_open_max_calls`` holds across all processes together and every process agrees on when a key
reopens. The script publishes each change; every process adopts it within milliseconds.

Nothing waits for Redis on the way to a healthy key: changes go to a background event loop (the
``redis`` package's asyncio client, in a thread of its own) that sends whatever has queued up in
one pipeline, and only half-open trial slots are claimed synchronously. A claim not answered within
``claim_timeout`` is refused (the caller tries another key) and, if Redis applied it late, given
back. Slots are leases of ``trial_lease`` seconds renewed while the trial runs, so a process that
dies holding one frees it within a lease; ``close`` sends what is queued and gives back the slots
still held.

The store degrades (serves on local state) only when the connection fails: a refused or broken
connection, or a Redis that answers neither a call nor a ping. It says so once, with the cause, and
reconnects with backoff; when it is back, each process merges what it knows, the newest change per
key winning (see :mod:`keypool.store._model`), and shares again. With ``strict=True`` (or
``KEYPOOL_REDIS_STRICT=1``) a Redis that cannot be reached or refuses the credentials at start-up is
an error instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections import defaultdict
from collections.abc import Coroutine, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._config import BreakerConfig
from .._errors import ConfigError
from ._base import SharedView, StoreUnavailable
from ._leases import Ticket, Trials
from ._model import Op
from ._redis_log import SharedLog
from ._setup import backoff, describe, open_pool, safe_url, strict_from_env
from ._wire import Change, Local, Wire, argv, local_for_merge, state_keys, text

if TYPE_CHECKING:
    from .._pool import KeyPool

__all__ = ["RedisStore"]

log = logging.getLogger("keypool.store")

_SCRIPT = resources.files("keypool.store").joinpath("redis_script.lua").read_text()

_TROUBLE = (RedisError, OSError, asyncio.TimeoutError)
_BATCH = 256  # changes per pipeline
_T = TypeVar("_T")


def _slow(exc: BaseException) -> bool:
    """A call that was not answered in time (as opposed to a connection that failed)."""
    return isinstance(exc, (asyncio.TimeoutError, RedisTimeoutError))


class RedisStore:
    """Shared breaker state on Redis.

    ``url`` (or ``KEYPOOL_REDIS_URL``) is any URL the ``redis`` client accepts, TLS (``rediss://``)
    and passwords included; ``namespace`` keeps pools on one Redis apart. ``strict`` (default: the
    ``KEYPOOL_REDIS_STRICT`` environment variable) makes an unreachable or unauthenticated Redis
    an error at construction. ``claim_timeout`` bounds the one synchronous call (taking a trial
    slot: past it the trial is refused); ``op_timeout`` bounds every other call; reconnection
    attempts back off from ``retry_interval`` to ``max_retry_interval``; trial slots are leases of
    ``trial_lease`` seconds; clock offsets are measured again every ``clock_interval`` seconds.
    ``client_options`` go to the ``redis`` client (``ssl_ca_certs``, ``username``, ...).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str = "keypool",
        strict: bool | None = None,
        claim_timeout: float = 0.25,
        op_timeout: float = 0.5,
        retry_interval: float = 0.25,
        max_retry_interval: float = 10.0,
        trial_lease: float = 3.0,
        clock_interval: float = 30.0,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        url = url or os.environ.get("KEYPOOL_REDIS_URL")
        if not url:
            raise ConfigError("url: no Redis URL given; pass url=... or set KEYPOOL_REDIS_URL")
        if not namespace or any(c in namespace for c in " \t\n"):
            raise ConfigError(f"namespace: must be a non-empty word (got {namespace!r})")
        for name, value in (
            ("claim_timeout", claim_timeout),
            ("op_timeout", op_timeout),
            ("retry_interval", retry_interval),
            ("trial_lease", trial_lease),
            ("clock_interval", clock_interval),
        ):
            if not value > 0:
                raise ConfigError(f"{name}: must be > 0 seconds (got {value})")
        if max_retry_interval < retry_interval:
            raise ConfigError(f"max_retry_interval: must be >= retry_interval (got {max_retry_interval})")
        self.url = safe_url(url)
        self._url = url
        self.namespace = namespace
        self.strict = strict_from_env() if strict is None else strict
        self.claim_timeout = claim_timeout
        self.op_timeout = op_timeout
        self.retry_interval = retry_interval
        self.max_retry_interval = max_retry_interval
        self.trial_lease = trial_lease
        self.clock_interval = clock_interval
        options: dict[str, Any] = {"socket_timeout": op_timeout, "socket_connect_timeout": op_timeout}
        options.update(client_options or {})
        self._connections = open_pool(url, options)  # a malformed URL raises here
        self._channel = f"{namespace}:events"
        self._lease_ms = round(trial_lease * 1000)
        self._pools: list[KeyPool] = []
        self._offsets: dict[int, float] = {}  # id(pool) -> Redis seconds minus pool-clock seconds
        self._mono_offset = 0.0  # Redis seconds minus time.monotonic()
        self._pending: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._overtaken: dict[tuple[str, str], Wire] = {}  # others' news that came while we wrote
        self._seen: dict[tuple[str, str], int] = {}
        # Adoptions so far, and the count at each key's last one: a merge's answer older than a
        # version adopted after the merge was sent was read before that change landed (stale).
        self._adoptions = 0
        self._adopted_at: dict[tuple[str, str], int] = {}
        self._known: dict[tuple[str, str], Wire] = {}  # the last state adopted, per key
        self._touched: dict[tuple[str, str], float] = {}  # monotonic time of our last unshared change
        self._trials = Trials(self)  # the trial slots we hold
        self._stale: set[tuple[str, str]] = set()  # keys whose write went unanswered: merge them
        self._log = SharedLog(self, f"{namespace}:admin")  # operators' changes, in order
        # Which incarnation of the shared state the versions in ``_seen`` belong to. After a Redis
        # restart or flush, the first process back starts a new one and versions start again: a
        # process that sees a new epoch merges what it knows (its own knowledge is in no store).
        self._epoch: str | None = None
        self._lost = False
        self._lock = threading.Lock()
        self._rng = random.Random()
        self._healthy = threading.Event()
        self.degraded = False
        self.degradations = 0
        self.cause: str | None = None  # why the store last degraded, in words
        self.slow_claims = 0  # claims refused because Redis did not answer within claim_timeout
        self._attempts = 0  # reconnection attempts since the store degraded
        self._next_try = 0.0  # loop time of the next attempt
        self._probing = False
        self._suspect = False  # a claim went unanswered and a ping is on its way
        self._closing = False
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._queue: asyncio.Queue[Change] = asyncio.Queue()
        self._ready = asyncio.Event()  # set once the constructor's first connection is decided
        self._client: aioredis.Redis | None = None
        self._sha = hashlib.sha1(_SCRIPT.encode(), usedforsecurity=False).hexdigest()  # the script's name
        self._thread = threading.Thread(target=self._run_loop, name="keypool-redis", daemon=True)
        self._started = threading.Event()
        self._thread.start()
        self._started.wait()
        self._start()

    # ------------------------------------------------------------------ the store's own loop

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._client = aioredis.Redis(connection_pool=self._connections)
            self._log.connect(self._client)
            for task in (self._writer, self._listener, self._trials.renew, self._clock, self._log.writer):
                self._loop.create_task(task())
        finally:
            self._loop.call_soon(self._started.set)
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout)

    def _start(self) -> None:
        """Connect once now, so a wrong password or an untrusted certificate is known at once
        (the listener waits for this, so that a strict store that fails says nothing more)."""
        try:
            self._run(self._connect(), timeout=max(2.0, 4 * self.op_timeout))
        except Exception as exc:
            if self.strict:
                self.close()
                cause = describe(exc, self._url)
                raise StoreUnavailable(
                    f"shared breaker state on {self.url} unavailable: {cause} (strict: not serving unshared)"
                ) from None
            self._run(self._started_degraded(exc), timeout=2.0)
        self._loop.call_soon_threadsafe(self._ready.set)

    async def _started_degraded(self, exc: BaseException) -> None:
        self._degrade(exc)

    async def _connect(self) -> None:
        assert self._client is not None
        async with asyncio.timeout(2 * self.op_timeout):
            await self._client.script_load(_SCRIPT)

    # ------------------------------------------------------------------ calls to Redis

    async def _batch(
        self, changes: Sequence[Change], merges: Sequence[Local] | None = None
    ) -> list[Wire | None]:
        """Run the script once per change in one pipeline; ``None`` for a change Redis refused."""
        assert self._client is not None
        replies: list[Wire | None] = [None] * len(changes)
        todo = list(range(len(changes)))
        for _ in range(3):  # again after loading the script, or after re-creating lost state
            pipe = self._client.pipeline(transaction=False)
            for i in todo:
                change = changes[i]
                local = merges[i] if merges is not None else None
                args = argv(change, self._channel, self._rng.random(), local, os.urandom(8).hex())
                pipe.evalsha(self._sha, 3, *state_keys(self.namespace, change.provider, change.key_id), *args)
            async with asyncio.timeout(self.op_timeout):
                results = await pipe.execute(raise_on_error=False)
            again, unloaded, lost = [], False, False
            for i, result in zip(todo, results, strict=True):
                if isinstance(result, NoScriptError):
                    again.append(i)
                    unloaded = True
                elif isinstance(result, ResponseError):
                    log.error(
                        "keypool: shared state of %s/%s not written: %s",
                        changes[i].provider,
                        changes[i].key_id,
                        result,
                    )
                elif isinstance(result, BaseException):
                    raise result
                elif result and text(result[0]) == "lost":
                    again.append(i)
                    lost = True
                else:
                    replies[i] = Wire.from_reply(result)
            if not again:
                break
            if unloaded:
                await self._connect()
            if lost:
                await self._resync("the shared state was lost (a Redis restart or flush?)")
            todo = again
        return replies

    async def _ping(self) -> bool:
        assert self._client is not None
        try:
            async with asyncio.timeout(self.op_timeout):
                await self._client.ping()
        except _TROUBLE:
            return False
        return True

    async def _probe(self, exc: BaseException) -> None:
        """A call went unanswered: degrade only if Redis does not answer a ping either."""
        if self._probing:
            return
        self._probing = True
        try:
            if not await self._ping():
                self._degrade(exc)
        finally:
            self._probing = False
            self._suspect = False

    def _start_probe(self) -> None:
        self._loop.create_task(self._probe(TimeoutError()))

    def _trouble(self, exc: BaseException, keys: Sequence[tuple[str, str]] = ()) -> None:
        if _slow(exc):
            self._stale.update(keys)  # maybe applied, maybe not: merge them once Redis answers
            self._loop.create_task(self._probe(exc))
        else:
            self._degrade(exc)

    # ------------------------------------------------------------------ adopting what Redis says

    def _adopt(self, provider: str, key_id: str, wire: Wire, force: bool = False, sent: int = 0) -> None:
        """Hand a state to every bound pool, newest versions only.

        A merge's answer (``force``) is adopted whatever its version (after a restart from an older
        snapshot, versions go back), unless it is older than a version adopted since the merge was
        sent (``sent``: the adoption count then): it read the key before that change landed, and
        adopting it would undo the change here for good (its news has been heard already).
        """
        key = (provider, key_id)
        with self._lock:
            if (
                force
                and wire.epoch == self._epoch
                and wire.version < self._seen.get(key, -1)
                and self._adopted_at.get(key, 0) > sent
            ):
                return
            if force or self._epoch is None:
                self._epoch = wire.epoch or self._epoch
            elif wire.epoch and wire.epoch != self._epoch:
                self._lost = True  # the state was lost and made again without us: merge first
                return
            if not force and wire.version <= self._seen.get(key, -1):
                return
            self._seen[key] = wire.version
            self._adoptions += 1
            self._adopted_at[key] = self._adoptions
            self._known[key] = wire
            self._touched.pop(key, None)
            pools = list(self._pools)
        for pool in pools:
            pool.adopt_shared(provider, key_id, wire.view(self._offsets.get(id(pool), 0.0)))

    def _news(self, provider: str, key_id: str, wire: Wire) -> None:
        """Another process's change (or a claim's answer): adopt it, unless a write of ours is on
        its way back; then hold it, and the writer adopts it after ours if it is newer."""
        key = (provider, key_id)
        with self._lock:
            if self._pending[key] > 0:
                held = self._overtaken.get(key)
                if held is None or wire.version > held.version or wire.epoch != held.epoch:
                    self._overtaken[key] = wire
                return
        self._adopt(provider, key_id, wire)

    def _store_ms(self, monotonic: float) -> int:
        return round((monotonic + self._mono_offset) * 1000)

    def _local(self, provider: str, key_id: str, view: SharedView, offset: float) -> Local:
        with self._lock:
            known = self._known.get((provider, key_id))
            touched = self._touched.get((provider, key_id))
        now = self._store_ms(time.monotonic())
        changed = None if touched is None else self._store_ms(touched)
        return local_for_merge(view, offset, known, changed, now)

    async def _measure_offsets(self, samples: int = 5) -> None:
        """Redis's clock minus ours, from the quickest of a few ``TIME`` round trips.

        One sample is not enough: the first call may also open a connection, and a busy process
        may sit on a reply; either skews the midpoint, and every process would then see keys
        half-open before Redis does and have its trial claims refused.
        """
        assert self._client is not None
        best: tuple[float, float] | None = None  # (round trip, offset)
        for _ in range(samples + 1):
            before = time.monotonic()
            async with asyncio.timeout(self.op_timeout):
                seconds, micros = await self._client.time()
            after = time.monotonic()
            sample = (after - before, seconds + micros / 1e6 - (before + after) / 2)
            if best is None or sample[0] < best[0]:
                best = sample
        assert best is not None
        self._mono_offset = best[1]
        for pool in list(self._pools):
            self._offsets[id(pool)] = best[1] + time.monotonic() - pool.clock.now()

    async def _resync(
        self, why: str, pools: Sequence[KeyPool] | None = None, keys: set[tuple[str, str]] | None = None
    ) -> None:
        """Merge the pools' local views into Redis (the newest change per key wins), then adopt
        the result. Every key of every pool, unless ``pools`` or ``keys`` narrow it down."""
        full = pools is None and keys is None
        if full:
            self._lost = False
        await self._measure_offsets()
        for pool in list(self._pools) if pools is None else pools:
            offset = self._offsets.get(id(pool), 0.0)
            rows = [
                (Change(p, k, "merge", pool.breaker_config(k, p)), self._local(p, k, view, offset))
                for p, k, view in pool.shared_views()
                if keys is None or (p, k) in keys
            ]
            for start in range(0, len(rows), _BATCH):
                chunk = rows[start : start + _BATCH]
                sent = self._adoptions
                replies = await self._batch([c for c, _ in chunk], [m for _, m in chunk])
                for (change, _), reply in zip(chunk, replies, strict=True):
                    if reply is not None:
                        self._adopt(change.provider, change.key_id, reply, force=True, sent=sent)
        if full:
            await self._log.flush()  # what operators changed here meanwhile, then what others did
            await self._log.replay()
            if self.degraded:
                log.info("keypool: shared breaker state on %s is back (%s); resynchronised", self.url, why)
            self.degraded = False
            self._attempts = 0
            self._healthy.set()

    def _degrade(self, exc: BaseException) -> None:
        if self.degraded or self._closed:
            return
        self.degraded = True
        self.degradations += 1
        self._healthy.clear()
        self.cause = describe(exc, self._url)
        self._next_try = self._loop.time() + self.retry_interval
        log.warning(
            "keypool: shared breaker state on %s unavailable: %s; serving on local state, reconnecting",
            self.url,
            self.cause,
        )

    # ------------------------------------------------------------------ background tasks

    async def _writer(self) -> None:
        # Loops test ``_closed`` rather than trusting cancellation alone: on Python 3.11 the
        # ``asyncio.wait_for`` inside redis-py's send path can swallow a task's cancellation.
        while not self._closed:
            batch = [await self._queue.get()]
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            replies: list[Wire | None] = [None] * len(batch)
            try:
                if not self.degraded:  # else dropped: local state carries on, the resync merges it
                    replies = await self._batch(batch)
            except _TROUBLE as exc:
                self._trouble(exc, [(c.provider, c.key_id) for c in batch])
            except Exception:
                log.exception("keypool: shared state change failed")
            finally:
                for change, reply in zip(batch, replies, strict=True):
                    self._written(change, reply)
                    self._queue.task_done()

    def _written(self, change: Change, reply: Wire | None) -> None:
        key = (change.provider, change.key_id)
        with self._lock:
            last = self._pending[key] == 1  # a later change of ours is queued: its answer is newer
            self._pending[key] -= 1
            held = self._overtaken.pop(key, None) if self._pending[key] == 0 else None
        if reply is not None and last:
            self._adopt(change.provider, change.key_id, reply)
        if held is not None:  # another process's change that may be newer than ours
            self._adopt(change.provider, change.key_id, held)

    async def _listener(self) -> None:
        """Adopt other processes' changes; while degraded or behind, resynchronise with backoff.

        Recovery does not wait for a quiet channel: after every message (or ``retry_interval``
        without one) the listener checks whether an attempt is due.
        """
        assert self._client is not None
        await self._ready.wait()
        while not self._closed:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(self.op_timeout):
                    await pubsub.subscribe(self._channel)
                if self.degraded or self._lost or not self._healthy.is_set():
                    await self._resync("connected")
                while not self._closed:
                    message = await pubsub.get_message(timeout=self.retry_interval)
                    if message is not None:
                        self._on_message(message)
                    await self._catch_up()
            except _TROUBLE as exc:
                self._degrade(exc)
                self._attempts += 1
                await asyncio.sleep(
                    backoff(self._attempts, self.retry_interval, self.max_retry_interval, self._rng)
                )
            except Exception:
                log.exception("keypool: shared state listener failed")
                await asyncio.sleep(self.retry_interval)
            finally:
                with contextlib.suppress(Exception):  # a broken connection: nothing to tidy
                    async with asyncio.timeout(self.op_timeout):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _backoff(self) -> float:
        self._attempts += 1
        return backoff(self._attempts, self.retry_interval, self.max_retry_interval, self._rng)

    async def _catch_up(self) -> None:
        """Resynchronise now if the store is degraded, lost its state, or missed writes."""
        if self._lost:
            log.info("keypool: shared breaker state on %s was lost; merging ours", self.url)
            await self._resync("the shared state was lost")
        elif self.degraded:
            if self._loop.time() < self._next_try:
                return
            try:
                await self._resync("answering again")
            except _TROUBLE:
                self._next_try = self._loop.time() + self._backoff()
        elif self._stale:
            keys, self._stale = self._stale, set()
            await self._resync("unanswered writes", keys=keys)
        if self._log.due and not self.degraded:
            self._log.due = False
            await self._log.replay()

    def _on_message(self, message: dict[str, Any]) -> None:
        if self.degraded:
            # Serving on local state: what this process learned meanwhile is in no store yet, and
            # adopting others' news now could undo it (close a key it knows to be open). The
            # resynchronisation merges both and tells the pools the result.
            return
        try:
            data = json.loads(message["data"])
            if "a" in data:  # the operators' log grew
                self._stale.update(self._log.heard(int(data["a"]), data.get("x")))
                return
            provider, key_id, wire = str(data["p"]), str(data["k"]), Wire.from_message(data)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return
        self._news(provider, key_id, wire)

    async def _clock(self) -> None:
        """Measure the clock offsets again now and then: a clock step on the Redis host (or ours)
        must not skew every deadline until the next outage."""
        while not self._closed:
            await asyncio.sleep(self.clock_interval)
            if not self.degraded:
                with contextlib.suppress(*_TROUBLE):
                    await self._measure_offsets()

    def _enqueue(self, change: Change) -> None:
        """Queue a change from the store's own loop."""
        with self._lock:
            self._pending[(change.provider, change.key_id)] += 1
        self._queue.put_nowait(change)

    # ------------------------------------------------------------------ what pools call

    def bind(self, pool: KeyPool) -> None:
        with self._lock:
            if pool not in self._pools:
                self._pools.append(pool)
        if self.degraded or self._closed:
            return  # the resynchronisation merges its keys when Redis is back
        try:
            self._run(self._bound(pool), timeout=max(2.0, self.op_timeout * 4))
        except Exception as exc:  # Redis went away meanwhile: serve locally, catch up later
            self._loop.call_soon_threadsafe(self._degrade, exc)

    async def _bound(self, pool: KeyPool) -> None:
        try:
            await self._log.replay([pool])  # the configuration the others run with, keys included
            await self._resync("bound", pools=[pool])
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
        with self._lock:
            if token:
                self._trials.slots.pop(token, None)  # its outcome is on its way: no more renewals
            self._touched[(provider, key_id)] = time.monotonic()
            if self._closed or self.degraded:
                return  # local state carries on; the resync merges it when Redis is back
            self._pending[(provider, key_id)] += 1
        change = Change(provider, key_id, op, config, token, arg, reason)
        self._loop.call_soon_threadsafe(self._queue.put_nowait, change)

    def share_admin(self, pool: KeyPool, entry: dict[str, Any]) -> None:
        if not self._closed:
            self._loop.call_soon_threadsafe(self._log.queue.put_nowait, json.dumps(entry))

    def claim(self, provider: str, key_id: str, token: str, config: BreakerConfig) -> bool:
        if self._closing or self.degraded:
            return True
        if self._suspect:  # a claim just went unanswered: refuse at once until a ping says more
            with self._lock:
                self.slow_claims += 1
            return False
        change = Change(provider, key_id, "claim", config, token, self._lease_ms)
        ticket = Ticket()
        future = asyncio.run_coroutine_threadsafe(self._trials.claim(change, ticket), self._loop)
        try:
            return future.result(timeout=self.claim_timeout)
        except TimeoutError:
            if ticket.abandon():
                with self._lock:
                    self.slow_claims += 1
                    probe, self._suspect = not self._suspect, True
                if probe:
                    self._loop.call_soon_threadsafe(self._start_probe)
                return False  # not answered in time: refused, and given back if it lands late
            return future.result()
        except Exception:
            log.exception("keypool: trial claim failed")
            return True

    def close(self) -> None:
        """Send what is queued, give back the trial slots still held, and stop (a few seconds at
        most, even with Redis gone)."""
        if self._closing:
            return
        self._closing = True

        async def shutdown() -> None:
            if not self.degraded:
                with contextlib.suppress(*_TROUBLE):
                    async with asyncio.timeout(2 * self.op_timeout):
                        await self._queue.join()
                gone = self._trials.give_back()
                if gone:
                    with contextlib.suppress(*_TROUBLE):
                        await self._batch(gone)
            self._closed = True
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
                    await self._connections.disconnect()

        with contextlib.suppress(Exception):  # closing: nothing useful to do with an error
            self._run(shutdown(), timeout=4 * self.op_timeout + 3)
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=2)

    def __repr__(self) -> str:
        return f"RedisStore(url={self.url!r}, namespace={self.namespace!r}, degraded={self.degraded})"
