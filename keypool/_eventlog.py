"""EventLog: an opt-in hook that writes the pool's events as JSON lines, for replay by ``keypool tune``.

One line per event: each call's outcome (key id, provider, outcome kind, HTTP status, duration,
trial or not), each breaker transition, each refusal and backup-tier change, stamped with the
pool's clock (``t``) and the wall clock (``wall``). Key ids and provider names only: no secret,
header or request content can reach the log, because no event carries one. Lines are buffered and
written under a lock (hooks may run in several threads); :meth:`EventLog.close` flushes.

Format ``keypool-event-log/1``; every line has ``"v": 1`` and a ``type``:

======== ===================================================================================
type     fields besides ``v``, ``type``, ``t``, ``wall``
======== ===================================================================================
log      ``schema`` (the first line)
pool     ``providers``: ``[{name, keys: [{key_id, tier, weight}], breaker: {...}}]``
call     ``provider``, ``key_id``, ``outcome``, ``status``, ``duration``, ``trial``
state    ``provider``, ``key_id``, ``old``, ``new``, ``reason``, ``at`` (when it happened)
rejected ``provider``, ``reason``, ``key_id``
backup   ``provider``, ``active``, ``reason``
======== ===================================================================================
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Self

from ._clock import Clock, MonotonicClock
from ._events import BackupTierChanged, CallRecorded, CallRejected, KeyStateChanged, PoolEvent

if TYPE_CHECKING:
    from ._pool import KeyPool

__all__ = ["EVENT_LOG_SCHEMA", "EventLog"]

EVENT_LOG_SCHEMA = "keypool-event-log/1"


def _t(x: float) -> float:
    return round(x, 6)


class EventLog:
    """A hook: ``KeyPool(hooks=[EventLog("events.jsonl")])``, then :meth:`describe` the pool.

    ``path`` is a file name (truncated, or appended to with ``append=True``) or an open text
    stream (left open by :meth:`close`). ``clock`` is the pool's clock; :meth:`describe` adopts
    the pool's, so a pool on a fake clock logs fake-clock times.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | IO[str],
        *,
        clock: Clock | None = None,
        wall: Callable[[], float] = time.time,
        append: bool = False,
    ) -> None:
        if isinstance(path, str | os.PathLike):
            self._file: IO[str] = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
            self._owns = True
        else:
            self._file = path
            self._owns = False
        self._clock: Clock = clock or MonotonicClock()
        self._wall = wall
        self._lock = threading.Lock()
        self._closed = False
        self.lines = 0
        self._write({"type": "log", "schema": EVENT_LOG_SCHEMA})

    def describe(self, pool: KeyPool) -> None:
        """Write the pool's providers, key ids and breaker settings, and log on the pool's clock."""
        self._clock = pool.clock
        providers: dict[str, dict[str, Any]] = {}
        for row in pool.stats():
            entry = providers.setdefault(
                row["provider"], {"name": row["provider"], "keys": [], "breaker": dict(row["config"])}
            )
            entry["keys"].append({"key_id": row["key_id"], "tier": row["tier"], "weight": row["weight"]})
        self._write({"type": "pool", "providers": list(providers.values())})

    def __call__(self, event: PoolEvent, /) -> None:
        if isinstance(event, CallRecorded):
            record: dict[str, Any] = {
                "type": "call",
                "provider": event.provider,
                "key_id": event.key_id,
                "outcome": event.outcome.value,
                "status": event.status,
                "duration": _t(event.duration),
                "trial": event.trial,
            }
        elif isinstance(event, KeyStateChanged):
            record = {
                "type": "state",
                "provider": event.provider,
                "key_id": event.key_id,
                "old": event.old.label,
                "new": event.new.label,
                "reason": event.reason,
                "at": _t(event.at),
            }
        elif isinstance(event, CallRejected):
            record = {
                "type": "rejected",
                "provider": event.provider,
                "reason": event.reason,
                "key_id": event.key_id,
            }
        elif isinstance(event, BackupTierChanged):
            record = {
                "type": "backup",
                "provider": event.provider,
                "active": event.active,
                "reason": event.reason,
            }
        else:  # an event type from a newer pool: keep its name, nothing else
            record = {"type": "other", "event": type(event).__name__}
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps({"v": 1, **record, "t": _t(self._clock.now()), "wall": _t(self._wall())})
        with self._lock:
            if self._closed:
                return
            self._file.write(line + "\n")
            self.lines += 1

    def flush(self) -> None:
        with self._lock:
            if not self._closed:
                self._file.flush()

    def close(self) -> None:
        """Flush and stop writing (later events are dropped); closes a file this log opened."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._file.flush()
            if self._owns:
                self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventLog(lines={self.lines}, closed={self._closed})"
