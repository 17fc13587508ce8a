"""How shared breaker state is laid out in Redis and carried to and from the Lua script.

Key names escape ``%`` and ``:`` in provider names and key ids, so that no two valid ids share a
name (``k`` and ``k:trials`` would otherwise collide: the second's state hash is the first's trial
set). A state crosses the wire as the script returns it, or as it publishes it; both parse into a
:class:`Wire` (store-clock milliseconds), which :meth:`Wire.view` turns into a pool's clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._config import BreakerConfig
from ._base import SharedView, view_of
from ._model import Op

__all__ = ["Change", "Local", "Wire", "argv", "escape", "local_for_merge", "state_keys", "text"]

_SAME_MS = 50  # open deadlines this close are one state (clock offsets are re-measured)


def escape(name: str) -> str:
    """A provider name or key id as a part of a Redis key name: ``%`` and ``:`` escaped."""
    return name.replace("%", "%25").replace(":", "%3A")


def state_keys(namespace: str, provider: str, key_id: str) -> list[str]:
    """KEYS for the script: the state hash, the trial-slot set and the epoch marker."""
    base = f"{namespace}:b:{escape(provider)}:{escape(key_id)}"
    return [base, f"{base}:trials", f"{namespace}:epoch"]


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


@dataclass(frozen=True, slots=True)
class Change:
    """One operation for the script; ``cap`` bounds a renewed lease (store ms)."""

    provider: str
    key_id: str
    op: Op
    config: BreakerConfig
    token: str = ""
    arg: int = 0
    reason: str = ""
    cap: int = 0


@dataclass(frozen=True, slots=True)
class Local:
    """A process's own view of a key for a merge, in store milliseconds, and when it changed."""

    open: bool
    open_until: int
    throttled_until: int
    quarantine: str
    reason: str
    stamp: int


def argv(change: Change, channel: str, draw: float, local: Local | None = None, epoch: str = "") -> list[Any]:
    cfg = change.config
    args: list[Any] = [
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
        channel,
        change.provider,
        change.key_id,
        draw,
        local.stamp if local is not None else change.cap,
    ]
    if local is not None:
        args += [
            int(local.open),
            local.open_until,
            local.throttled_until,
            local.quarantine,
            local.reason,
            epoch,
        ]
    return args


def _pairs(flat: Any) -> tuple[tuple[str, int], ...]:
    """``[token, expiry, ...]`` (cjson writes an empty list as ``{}``) as pairs."""
    if not isinstance(flat, list):
        return ()
    return tuple((text(flat[i]), int(float(flat[i + 1]))) for i in range(0, len(flat) - 1, 2))


@dataclass(frozen=True, slots=True)
class Wire:
    """A key's shared state as Redis holds it (store ms), plus what the call that read it says."""

    open: bool
    open_until: int
    throttled_until: int
    quarantine: str
    failures: int
    successes: int
    reason: str
    version: int
    stamp: int
    trials: tuple[tuple[str, int], ...]
    epoch: str
    allowed: bool = False
    changed: bool = False
    now: int = 0

    @classmethod
    def _of(cls, s: list[Any], stamp: Any, trials: Any, epoch: Any, **call: Any) -> Wire:
        return cls(
            open=int(s[0]) == 1,
            open_until=int(float(s[1])),
            throttled_until=int(float(s[2])),
            quarantine=text(s[3]),
            failures=int(s[4]),
            successes=int(s[5]),
            reason=text(s[7]),
            version=int(s[8]),
            stamp=int(float(stamp)),
            trials=_pairs(trials),
            epoch=text(epoch),
            **call,
        )

    @classmethod
    def from_reply(cls, reply: list[Any]) -> Wire:
        """What the script returns: the state, then allowed, changed, now, epoch, stamp, slots."""
        allowed, changed, now = int(reply[9]) == 1, int(reply[10]) == 1, int(reply[11])
        return cls._of(reply, reply[13], reply[14], reply[12], allowed=allowed, changed=changed, now=now)

    @classmethod
    def from_message(cls, data: dict[str, Any]) -> Wire:
        """What the script publishes: ``s`` (the state, then the stamp), ``t`` slots, ``e`` epoch."""
        state = list(data["s"])
        return cls._of(state, state[9], data.get("t"), data.get("e"))

    def signature(self, now: int) -> tuple[bool, int, int, str]:
        """The state a merge compares (a throttle that has passed is no throttle)."""
        throttled = self.throttled_until if self.throttled_until > now else 0
        return self.open, self.open_until if self.open else 0, throttled, self.quarantine

    def view(self, offset: float) -> SharedView:
        """In a pool's clock: store milliseconds minus ``offset`` seconds."""
        return view_of(self, offset)


def local_for_merge(
    view: SharedView, offset: float, known: Wire | None, changed: int | None, now: int
) -> Local:
    """A pool's view for a merge (store ms), stamped with when it last changed: when the store last
    told us (``known``, if unchanged since), or when we last changed it without the store knowing
    (``changed``). ``offset``: store seconds minus pool seconds; ``now``: store ms."""

    def ms(seconds: float) -> int:
        return round((seconds + offset) * 1000) if seconds else 0

    mine = (view.open, ms(view.open_until) if view.open else 0, ms(view.throttled_until), view.quarantine)
    if known is not None and _same(mine, known.signature(now)):
        stamp = known.stamp
    elif changed is not None:
        stamp = changed
    elif known is not None:
        stamp = known.stamp
    else:  # never shared: what it knows is news only if it knows something
        stamp = now if mine != (False, 0, 0, "") else 0
    return Local(mine[0], mine[1], mine[2], mine[3], view.reason, stamp)


def _same(a: tuple[bool, int, int, str], b: tuple[bool, int, int, str]) -> bool:
    return a[0] == b[0] and a[3] == b[3] and abs(a[1] - b[1]) <= _SAME_MS and abs(a[2] - b[2]) <= _SAME_MS
