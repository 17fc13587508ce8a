"""The operators' log of a RedisStore: configuration changes every process applies in one order
(see :mod:`keypool.store._admin`), kept in a Redis list so that a process that starts later adopts
them. Appending an entry publishes it with the log's new length on the store's channel; a pool
that has applied every entry before it applies it at once, and one that missed some (a process
that was cut off, or just started) reads the entries it has not applied yet."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from .._pool import KeyPool
    from ._redis import RedisStore

__all__ = ["SharedLog"]

# Append one entry and tell every process: the entry, and how long the log is now.
_APPEND = """
local n = redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], '{"a":' .. n .. ',"x":' .. ARGV[1] .. '}')
return n
"""


class SharedLog:
    """One namespace's log; ``due`` is set when another process appended to it."""

    def __init__(self, store: RedisStore, key: str) -> None:
        self.store = store
        self.key = key
        self.seen: dict[int, int] = {}  # id(pool) -> entries of the log it has applied
        self.queue: asyncio.Queue[str] = asyncio.Queue()  # entries of ours, to append
        self.out: list[str] = []  # entries made while Redis was unreachable
        self.due = False
        self._client: aioredis.Redis | None = None
        self._sha = hashlib.sha1(_APPEND.encode(), usedforsecurity=False).hexdigest()

    def connect(self, client: aioredis.Redis) -> None:
        self._client = client

    async def writer(self) -> None:
        """Append this process's entries in the order they were made, all that have queued up in
        one pipeline (so a remote Redis does not queue them behind each other)."""
        store = self.store
        while not store._closed:
            self.out.append(await self.queue.get())  # appended when Redis is back if it is not now
            while not self.queue.empty():
                self.out.append(self.queue.get_nowait())
            if store.degraded:
                continue
            try:
                await self.flush()
            except Exception as exc:  # RedisError, OSError, a timeout: the connection's trouble
                store._trouble(exc)

    def heard(self, length: int, entry: Any) -> set[tuple[str, str]]:
        """Another process appended ``entry`` as the log's ``length``-th: pools that applied all
        before it apply it now, the others catch up (``due``). The keys it added, to merge."""
        added: set[tuple[str, str]] = set()
        for pool in list(self.store._pools):
            if self.seen.get(id(pool), 0) != length - 1 or not isinstance(entry, dict):
                self.due = True
                continue
            key = pool.apply_admin(entry)
            self.seen[id(pool)] = length
            if key is not None:
                added.add(key)
        return added

    async def flush(self) -> None:
        """Append the entries waiting in ``out``, in order."""
        assert self._client is not None
        while self.out:
            entries = list(self.out)
            pipe = self._client.pipeline(transaction=False)
            for entry in entries:
                pipe.evalsha(self._sha, 1, self.key, entry, self.store._channel)
            async with asyncio.timeout(self.store.op_timeout):
                results = await pipe.execute(raise_on_error=False)
            done = 0
            for result in results:
                if isinstance(result, BaseException):
                    break
                done += 1
            del self.out[:done]
            if done < len(entries):
                error = results[done]
                if not isinstance(error, NoScriptError):
                    raise error
                async with asyncio.timeout(self.store.op_timeout):
                    await self._client.script_load(_APPEND)

    async def replay(self, pools: Sequence[KeyPool] | None = None) -> None:
        """Apply the entries each pool has not applied yet, in order; then merge the shared
        breaker state of the keys they added."""
        assert self._client is not None
        store = self.store
        for pool in list(store._pools) if pools is None else pools:
            seen = self.seen.get(id(pool), 0)
            async with asyncio.timeout(store.op_timeout):
                raw = await self._client.lrange(self.key, seen, -1)
                if not raw:
                    length = int(await self._client.llen(self.key))
                    if length < seen:  # the log was lost (a Redis restart): start over from here
                        self.seen[id(pool)] = length
                    continue
            added: set[tuple[str, str]] = set()
            for item in raw:
                try:
                    entry = json.loads(item)
                except ValueError:
                    continue
                key = pool.apply_admin(entry) if isinstance(entry, dict) else None
                if key is not None:
                    added.add(key)
            self.seen[id(pool)] = seen + len(raw)
            if added:
                await store._resync("keys added", pools=[pool], keys=added)
