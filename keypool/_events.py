"""What the pool tells observers: frozen event objects and the hook protocol that receives them.

Hooks are called synchronously after the pool's lock is released, in the order they were added;
an exception in a hook is logged and swallowed so instrumentation can never break a request.
Metrics, logs and tests are all just hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ._breaker import BreakerState
from ._outcome import OutcomeKind

__all__ = [
    "REFUSAL_REASONS",
    "BackupTierChanged",
    "CallRecorded",
    "CallRejected",
    "Hook",
    "KeyStateChanged",
    "PoolEvent",
]


@dataclass(frozen=True, slots=True)
class KeyStateChanged:
    """A key's breaker changed state; ``at`` is when it happened on the pool's clock."""

    provider: str
    key_id: str
    old: BreakerState
    new: BreakerState
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class CallRecorded:
    """One call's outcome was recorded against a key."""

    provider: str
    key_id: str
    outcome: OutcomeKind
    status: int | None
    duration: float
    trial: bool


#: Why a call is refused before it reaches a key (``CallRejected.reason``; see ``NoKeyAvailable``).
REFUSAL_REASONS: tuple[str, ...] = (
    "open",
    "throttled",
    "rejected",
    "forbidden",
    "quota",
    "manual",
    "busy",
    "no_keys",
    "budget",
    "load_shed",
    "probe_skipped",
)


@dataclass(frozen=True, slots=True)
class CallRejected:
    """A call was refused before reaching any key; ``reason`` is one of :data:`REFUSAL_REASONS`."""

    provider: str
    reason: str
    key_id: str | None = None


@dataclass(frozen=True, slots=True)
class BackupTierChanged:
    """The backup tier of a provider started or stopped serving."""

    provider: str
    active: bool
    reason: str


PoolEvent = KeyStateChanged | CallRecorded | CallRejected | BackupTierChanged


class Hook(Protocol):
    """Anything callable with one event."""

    def __call__(self, event: PoolEvent, /) -> None: ...
