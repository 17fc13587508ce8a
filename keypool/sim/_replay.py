"""Reading an event log (:class:`~keypool.EventLog`'s JSON lines) and replaying it in the simulator.

A malformed line is skipped and reported by its number; the rest of the log still counts. From
the calls of one provider the replay takes two things: the request instants (an attempt that began
when another of the same provider had just failed is a failover, not a new request) and, per key,
what the upstream answered around each instant. A simulated attempt on a key at time ``t`` gets an
answer drawn from that key's recorded answers within ``window`` seconds of ``t`` (the nearest one
if there is none): a candidate configuration that probes a key when the recorded run did not still
meets what the upstream was doing then.
"""

from __future__ import annotations

import bisect
import json
import math
import random
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import ConfigError
from .._outcome import Outcome, OutcomeKind
from ._faults import TIMEOUT_OUTCOME, Answer

__all__ = ["Call", "EventLogData", "RecordedAnswers", "read_event_log", "request_instants"]

_KINDS = {k.value for k in OutcomeKind}
_FAILOVER_GAP = 0.002  # seconds between a failed attempt's end and the next attempt's start


@dataclass(frozen=True, slots=True)
class Call:
    provider: str
    key_id: str
    kind: OutcomeKind
    status: int | None
    start: float
    duration: float


@dataclass
class EventLogData:
    """What a log held: calls, throttle lengths per key, the pool's description, and bad lines."""

    calls: list[Call] = field(default_factory=list)
    throttles: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    pool: dict[str, Any] | None = None
    lines: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)

    def providers(self) -> list[str]:
        counts: dict[str, int] = defaultdict(int)
        for call in self.calls:
            counts[call.provider] += 1
        return sorted(counts, key=lambda p: -counts[p])

    def breaker(self, provider: str) -> dict[str, Any] | None:
        for entry in (self.pool or {}).get("providers", []):
            if entry.get("name") == provider and isinstance(entry.get("breaker"), dict):
                return dict(entry["breaker"])
        return None

    def keys(self, provider: str) -> list[tuple[str, float]]:
        """(key_id, weight) of the provider: from the pool record, else from the calls."""
        for entry in (self.pool or {}).get("providers", []):
            if entry.get("name") == provider:
                return [
                    (k["key_id"], float(k.get("weight", 1.0)))
                    for k in entry.get("keys", [])
                    if k.get("tier", "primary") == "primary"
                ]
        return [(k, 1.0) for k in sorted({c.key_id for c in self.calls if c.provider == provider})]


def _number(record: dict[str, Any], name: str) -> float:
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    return float(value)


def _text(record: dict[str, Any], name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
    return value


def read_event_log(path: str | Path) -> EventLogData:
    """Parse an event log; malformed lines are counted in ``errors`` as (line number, reason)."""
    data = EventLogData()
    opened: dict[tuple[str, str], float] = {}
    try:
        handle = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"event log: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            data.lines += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                _parse(record, data, opened)
            except (ValueError, KeyError, TypeError) as exc:
                reason = "not JSON" if isinstance(exc, json.JSONDecodeError) else str(exc)
                data.errors.append((number, reason))
    return data


def _parse(record: dict[str, Any], data: EventLogData, opened: dict[tuple[str, str], float]) -> None:
    kind = record.get("type")
    if kind == "call":
        outcome = _text(record, "outcome")
        if outcome not in _KINDS:
            raise ValueError(f"outcome: unknown kind {outcome!r}")
        status = record.get("status")
        if status is not None and (isinstance(status, bool) or not isinstance(status, int)):
            raise ValueError(f"status: expected an integer or null, got {status!r}")
        end, duration = _number(record, "t"), _number(record, "duration")
        if duration < 0:
            raise ValueError(f"duration: must be >= 0, got {duration}")
        data.calls.append(
            Call(
                _text(record, "provider"),
                _text(record, "key_id"),
                OutcomeKind(outcome),
                status,
                end - duration,
                duration,
            )
        )
    elif kind == "state":
        key = (_text(record, "provider"), _text(record, "key_id"))
        at = _number(record, "at")
        if record.get("reason") == "throttled":
            opened[key] = at
        elif record.get("reason") == "retry_after_elapsed" and key in opened:
            data.throttles.setdefault(key, []).append(at - opened.pop(key))
    elif kind == "pool":
        if not isinstance(record.get("providers"), list):
            raise ValueError("providers: expected a list")
        data.pool = record
    elif kind in ("log", "rejected", "backup", "other"):
        return
    else:
        raise ValueError(f"type: unknown record type {kind!r}")


def request_instants(calls: Iterable[Call]) -> list[float]:
    """When requests began: every attempt except those that began right after a failed one."""
    ordered = sorted(calls, key=lambda c: c.start)
    failed_ends = sorted(c.start + c.duration for c in ordered if c.kind.retry_elsewhere)
    instants = []
    for call in ordered:
        lo = bisect.bisect_left(failed_ends, call.start - _FAILOVER_GAP)
        hi = bisect.bisect_right(failed_ends, call.start + 1e-9)
        own = 1 if call.kind.retry_elsewhere and call.duration <= _FAILOVER_GAP + 1e-9 else 0
        if hi - lo > own:
            continue  # a failover: it began as another failed attempt ended
        instants.append(call.start)
    return instants


class RecordedAnswers:
    """A key's recorded answers, drawn near the instant asked about (see the module docstring)."""

    def __init__(
        self,
        calls: list[Call],
        origin: float,
        *,
        window: float,
        throttle_seconds: float,
        rng: random.Random,
    ) -> None:
        ordered = sorted(calls, key=lambda c: c.start)
        self._starts = [c.start - origin for c in ordered]
        self._answers = [_answer(c, throttle_seconds) for c in ordered]
        self._window = window
        self._rng = rng

    def answer(self, t: float) -> Answer:
        starts = self._starts
        lo = bisect.bisect_left(starts, t - self._window)
        hi = bisect.bisect_right(starts, t + self._window)
        if hi > lo:
            return self._answers[lo + int(self._rng.random() * (hi - lo))]
        i = bisect.bisect_left(starts, t)
        if i == 0:
            return self._answers[0]
        if i == len(starts) or t - starts[i - 1] <= starts[i] - t:
            return self._answers[i - 1]
        return self._answers[i]


def _answer(call: Call, throttle_seconds: float) -> Answer:
    if call.kind is OutcomeKind.THROTTLED:
        return Answer(Outcome(OutcomeKind.THROTTLED, call.status, throttle_seconds), call.duration)
    if call.kind is OutcomeKind.FAILURE and call.status is None:
        return Answer(TIMEOUT_OUTCOME, call.duration)
    return Answer(Outcome(call.kind, call.status), call.duration)


def median_or(values: list[float], default: float) -> float:
    return statistics.median(values) if values else default
