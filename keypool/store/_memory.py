"""MemoryStore: shared breaker state between pools of one process, with no server.

It applies exactly the operations a :class:`~keypool.store.RedisStore` applies (the same
:func:`~keypool.store._model.apply`), synchronously, and tells every bound pool at once. Use it to
share breakers between pools of one process, and to test what sharing does on a fake clock.
"""

from __future__ import annotations

import random
import threading
from typing import TYPE_CHECKING, Any

from .._clock import Clock, MonotonicClock
from .._config import BreakerConfig
from ._base import view_of
from ._model import Op, SharedBreaker, apply

if TYPE_CHECKING:
    from .._pool import KeyPool

__all__ = ["MemoryStore"]


def _ms(seconds: float) -> int:
    return round(seconds * 1000) if seconds else 0


class MemoryStore:
    """Shared state in a dict, on ``clock`` (default: the monotonic clock)."""

    def __init__(self, clock: Clock | None = None, *, seed: int | None = None) -> None:
        self._clock = clock or MonotonicClock()
        # Held while every pool is told of a change too, so that pools learn changes in the order
        # the store made them (told outside it, two threads could deliver v6 before v5 and leave a
        # pool on v5 for good). Re-entrant: a hook may react to a change by changing a key again.
        self._lock = threading.RLock()
        self._states: dict[tuple[str, str], SharedBreaker] = {}
        self._pools: list[KeyPool] = []
        self._rng = random.Random(seed)
        self._admin_log: list[dict[str, Any]] = []  # operators' changes, in order (see _admin)
        self._admin_seen: dict[int, int] = {}  # id(pool) -> entries of the log it has applied

    def bind(self, pool: KeyPool) -> None:
        """Share ``pool``'s keys: what it knows of a key that the store holds nothing newer about
        (a key it tripped, throttled or quarantined on its own) is merged in as news of now, and
        it is told what the other pools already decided."""
        with self._lock:
            if pool not in self._pools:
                self._pools.append(pool)
            self._replay(pool)  # the configuration the other pools run with, keys included
        for provider, key_id, view in pool.shared_views():
            knows = view.open or bool(view.quarantine) or view.throttled_until > 0
            local = SharedBreaker(
                open=view.open,
                open_until=_ms(view.open_until),
                throttled_until=_ms(view.throttled_until),
                quarantine=view.quarantine,
                reason=view.reason,
                stamp=self._now() if knows else 0,
            )
            config = pool.breaker_config(key_id, provider)
            with self._lock:
                current = self._states.get((provider, key_id), SharedBreaker())
                verdict = apply(current, "merge", self._now(), config, local=local, rng=self._rng)
                self._states[(provider, key_id)] = verdict.state
                if verdict.state.version:  # a key the store knows something about
                    view_ = view_of(verdict.state, 0.0)
                    for each in list(self._pools) if verdict.changed else [pool]:
                        each.adopt_shared(provider, key_id, view_)

    def _now(self) -> int:
        return round(self._clock.now() * 1000)

    def _apply(
        self, provider: str, key_id: str, op: Op, config: BreakerConfig, token: str, arg: int, reason: str
    ) -> tuple[SharedBreaker, bool, bool]:
        with self._lock:
            current = self._states.get((provider, key_id), SharedBreaker())
            verdict = apply(
                current, op, self._now(), config, token=token, arg=arg, reason=reason, rng=self._rng
            )
            self._states[(provider, key_id)] = verdict.state
            if verdict.changed:
                view = view_of(verdict.state, 0.0)
                for pool in list(self._pools):
                    pool.adopt_shared(provider, key_id, view)
        return verdict.state, verdict.changed, verdict.allowed

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
        self._apply(provider, key_id, op, config, token, arg, reason)

    def claim(self, provider: str, key_id: str, token: str, config: BreakerConfig) -> bool:
        return self._apply(provider, key_id, "claim", config, token, 0, "")[2]

    def share_admin(self, pool: KeyPool, entry: dict[str, Any]) -> None:
        with self._lock:
            self._admin_log.append(entry)
            self._admin_seen[id(pool)] = len(self._admin_log)  # the pool applied it already
            for other in list(self._pools):
                if other is not pool:
                    self._replay(other)

    def _replay(self, pool: KeyPool) -> None:
        """Apply the entries ``pool`` has not seen yet, in order (the lock held)."""
        seen = self._admin_seen.get(id(pool), 0)
        for entry in self._admin_log[seen:]:
            added = pool.apply_admin(entry)
            if added is not None:
                state = self._states.get(added)
                if state is not None and state.version:
                    pool.adopt_shared(*added, view_of(state, 0.0))
        self._admin_seen[id(pool)] = len(self._admin_log)

    def state(self, provider: str, key_id: str) -> SharedBreaker:
        """What the store holds for a key (for tests and inspection)."""
        with self._lock:
            return self._states.get((provider, key_id), SharedBreaker())

    def close(self) -> None:
        with self._lock:
            self._pools.clear()

    def __repr__(self) -> str:
        return f"MemoryStore(keys={len(self._states)}, pools={len(self._pools)})"
