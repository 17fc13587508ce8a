"""The shared breaker state of one key and the one function that changes it.

A shared store (Redis, or the in-process :class:`~keypool.store.MemoryStore`) keeps, per key, the
state below and applies every change with :func:`apply` as one atomic step on the store's own clock
(milliseconds). The Redis store runs the same function as a Lua script; this Python version is the
reference the contract tests hold both to.

Half-open is not stored: it is ``open`` whose deadline has passed, so every process agrees on
when a key reopens without anyone having to write it.

Two numbers order the changes. ``version`` counts every change the store made to a key (trial
slots included), so a process can drop news older than what it holds. ``stamp`` is the store-clock
instant of the key's last change of *state* (open, its deadline, throttle, quarantine): after the
store was unreachable or restarted from an older snapshot, a ``merge`` keeps whichever side changed
last, so an operator's reset made meanwhile beats an older quarantine and a newer trip beats an
older reset.

Trial slots are leases: a claim holds its slot for ``arg`` ms (the store's ``trial_lease``), which
the holder renews while the trial runs, never past ``probe_timeout`` from the claim. A process
that dies holding a slot frees it within one lease.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Literal

from .._config import BreakerConfig

__all__ = ["Op", "SharedBreaker", "Verdict", "apply"]

Op = Literal[
    "failure",
    "success",
    "claim",
    "renew",
    "release",
    "throttle",
    "quarantine",
    "trip",
    "reset",
    "merge",
    "read",
]


@dataclass(frozen=True, slots=True)
class SharedBreaker:
    """One key's shared state; deadlines are store-clock milliseconds (0: none)."""

    open: bool = False
    open_until: int = 0
    throttled_until: int = 0
    quarantine: str = ""
    failures: int = 0
    successes: int = 0
    streak: int = 0
    reason: str = ""  # why it last tripped: failures or trial_failed
    version: int = 0
    stamp: int = 0  # when the state (open, open_until, throttled_until, quarantine) last changed
    trials: tuple[tuple[str, int], ...] = ()  # (token, expires at)

    def half_open(self, now: int) -> bool:
        return self.open and not self.quarantine and now >= self.open_until


@dataclass(frozen=True, slots=True)
class Verdict:
    """The state after an operation, whether it changed, and (for ``claim``) whether it admits."""

    state: SharedBreaker
    changed: bool
    allowed: bool
    now: int


def _open_for(cfg: BreakerConfig, streak: int, rng: random.Random) -> int:
    """How long a trip keeps the key open, in ms, computed exactly as the Lua script does."""
    timeout, cap = round(cfg.timeout * 1000), round(cfg.max_timeout * 1000)
    try:
        ms = min(timeout * cfg.backoff_multiplier ** (streak - 1), cap)
    except OverflowError:  # a long streak: Lua's ``^`` gives inf, Python's ``**`` raises
        ms = cap
    if cfg.jitter:
        ms += ms * cfg.jitter * rng.random()
    return math.floor(ms + 0.5)  # Lua rounds half up; Python's round() would round half to even


def apply(
    s: SharedBreaker,
    op: Op,
    now: int,
    cfg: BreakerConfig,
    *,
    token: str = "",
    arg: int = 0,
    reason: str = "",
    cap: int = 0,
    local: SharedBreaker | None = None,
    rng: random.Random | None = None,
) -> Verdict:
    """Apply one operation at store time ``now`` (ms). Mirrors ``redis_script.lua`` line for line.

    ``arg`` is a throttle's length or a trial lease's (ms); ``cap`` is the latest instant a renewed
    lease may reach; ``local`` (merge) is a process's own view, its ``stamp`` when it last changed.
    """
    rng = rng or random.Random()
    # As the script does: sweep expired slots, and free the caller's own (only a real token; a
    # renewal keeps it).
    mine = bool(token) and op != "renew"
    trials = tuple((t, exp) for t, exp in s.trials if exp > now and not (mine and t == token))
    before = s
    s = replace(s, trials=trials)
    half = s.half_open(now)
    allowed = False

    def trip(state: SharedBreaker, why: str) -> SharedBreaker:
        streak = state.streak + 1
        return replace(
            state,
            reason=why,
            open=True,
            open_until=now + _open_for(cfg, streak, rng),
            failures=0,
            successes=0,
            streak=streak,
            trials=(),
        )

    def close(state: SharedBreaker) -> SharedBreaker:
        return replace(state, open=False, open_until=0, failures=0, successes=0, streak=0, trials=())

    if op == "failure":
        if not s.quarantine:
            if half and token:
                s = trip(s, "trial_failed")  # a failed trial re-opens
            elif not s.open:
                s = replace(s, failures=s.failures + 1)
                if s.failures >= cfg.failure_threshold:
                    s = trip(s, "failures")
    elif op == "success":
        if not s.quarantine:
            if half and token:
                s = replace(s, successes=s.successes + 1)
                if s.successes >= cfg.success_threshold:
                    s = close(s)
            elif not s.open and s.failures:
                s = replace(s, failures=0)
    elif op == "claim":
        if s.quarantine or s.throttled_until > now or (s.open and now < s.open_until):
            allowed = False
        elif not s.open:
            allowed = True  # closed: no trial slot needed
        elif len(s.trials) < cfg.half_open_max_calls:
            probe = round(cfg.probe_timeout * 1000)
            lease = min(arg, probe) if arg > 0 else probe
            s = replace(s, trials=(*s.trials, (token, now + lease)))
            allowed = True
    elif op == "renew":
        if token and not s.quarantine:
            until = min(now + arg, cap) if cap else now + arg
            s = replace(s, trials=tuple((t, max(exp, until) if t == token else exp) for t, exp in s.trials))
    elif op == "throttle":
        until = now + arg
        if until > s.throttled_until:
            s = replace(s, throttled_until=until)
    elif op == "quarantine":
        if not s.quarantine:
            s = replace(s, quarantine=reason or "manual", open=True, failures=0, successes=0, trials=())
    elif op == "trip":
        if not s.quarantine:
            s = trip(s, "failures")
    elif op == "reset":
        s = close(replace(s, quarantine="", throttled_until=0))
    elif op == "merge" and local is not None and local.stamp > s.stamp:
        # After the store was unreachable or lost state: the side that changed last wins, whole.
        same = local.open == s.open and (not local.open or local.open_until == s.open_until)
        tripped = local.open and not local.quarantine
        s = replace(
            s,
            open=local.open,
            open_until=local.open_until if local.open else 0,
            throttled_until=local.throttled_until,
            quarantine=local.quarantine,
            reason=(local.reason or "failures") if tripped else s.reason,
            failures=0,
            successes=0,
            streak=max(s.streak, 1) if tripped else (s.streak if local.quarantine else 0),
            trials=s.trials if same else (),
        )
    if _state(s) != _state(before):
        s = replace(s, stamp=local.stamp if op == "merge" and local is not None else now)
    changed = _fields(s) != _fields(before) or sorted(s.trials) != sorted(before.trials)
    if changed:
        s = replace(s, version=before.version + 1)
    return Verdict(state=s, changed=changed, allowed=allowed, now=now)


def _state(s: SharedBreaker) -> tuple[object, ...]:
    """What a state change is (its instant is the key's ``stamp``); counts are not."""
    return (s.open, s.open_until, s.throttled_until, s.quarantine)


def _fields(s: SharedBreaker) -> tuple[object, ...]:
    """What observers care about, besides the trial slots."""
    return (
        s.open,
        s.open_until,
        s.throttled_until,
        s.quarantine,
        s.failures,
        s.successes,
        s.streak,
        s.reason,
    )
