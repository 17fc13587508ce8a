"""What a simulated run did: its counts, its breaker transitions, and the questions asked of them."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from .._outcome import OutcomeKind

__all__ = ["SimResult", "StateChange"]

# Attempts that reached the upstream and did not answer (IGNORED: cut off by the caller's deadline).
_WASTED = frozenset(OutcomeKind) - {OutcomeKind.SUCCESS, OutcomeKind.CALLER_ERROR}


@dataclass(frozen=True, slots=True)
class StateChange:
    """A breaker transition, at ``t`` seconds into the run (the instant it really happened)."""

    t: float
    provider: str
    key_id: str
    old: str
    new: str
    reason: str


@dataclass
class SimResult:
    """What one run did. Counts are exact; times are seconds from the start of the run."""

    seed: int
    ended_at: float
    requests: int = 0
    served: int = 0
    refused: int = 0  # no key could take it, before any attempt
    failed: int = 0  # attempts tried and none answered (or the deadline passed)
    caller_errors: int = 0
    waited: int = 0  # requests that waited for a key at least once (busy queue or a near recovery)
    refusals: Counter[str] = field(default_factory=Counter)  # refused requests by NoKeyAvailable.reason
    attempts: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)
    transitions: list[StateChange] = field(default_factory=list)
    request_seconds: float = 0.0

    @property
    def total_attempts(self) -> int:
        return sum(sum(c.values()) for c in self.attempts.values())

    @property
    def wasted_attempts(self) -> int:
        """Attempts that reached the upstream and did not answer the request (retried or failed)."""
        return sum(n for c in self.attempts.values() for kind, n in c.items() if OutcomeKind(kind) in _WASTED)

    def attempts_of(self, key_id: str, kind: str | None = None, provider: str | None = None) -> int:
        return sum(
            (c[kind] if kind else sum(c.values()))
            for (p, k), c in self.attempts.items()
            if k == key_id and provider in (None, p)
        )

    def trips(self, key_id: str | None = None, *, after: float = 0.0) -> list[StateChange]:
        """Transitions into ``open`` caused by failures (not throttles or quarantines)."""
        return [
            s
            for s in self.transitions
            if s.new == "open"
            and s.reason in ("failures", "trial_failed")
            and s.t >= after
            and key_id in (None, s.key_id)
        ]

    def first_trip(self, key_id: str | None = None, *, after: float = 0.0) -> float | None:
        found = [s.t for s in self.trips(key_id, after=after) if s.old == "closed"]
        return min(found) if found else None

    def closed_at(self, key_id: str, *, after: float) -> float | None:
        """The first instant at or after ``after`` at which the key's breaker closed."""
        for s in self.transitions:
            if s.key_id == key_id and s.new == "closed" and s.t >= after:
                return s.t
        return None

    def transitions_of(self, key_id: str | None = None, *, start: float = 0.0, end: float = math.inf) -> int:
        return sum(1 for s in self.transitions if key_id in (None, s.key_id) and start <= s.t < end)
