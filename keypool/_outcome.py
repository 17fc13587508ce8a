"""What a response or an exception means for the key that made the call.

This is the one place that maps foreign signals (HTTP statuses, headers, ``httpx2`` and ``openai``
exceptions) onto keypool's :class:`Outcome`; the table lives in ``OutcomeKind``'s docstring.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx2

__all__ = ["Outcome", "OutcomeKind", "classify_exception", "classify_status", "parse_retry_after"]


class OutcomeKind(enum.StrEnum):
    """The effect of one call on its key.

    ========================  ===============  ========================================  ===========
    observed                  kind             effect on the key                         retry?
    ========================  ===============  ========================================  ===========
    2xx, stream ended clean   SUCCESS          breaker success                           —
    429                       THROTTLED        out until the Retry-After instant         yes
    401, 403                  REJECTED         quarantined until reset                   yes
    402                       EXHAUSTED        quarantined, reason ``quota``              yes
    408, 5xx, network error   FAILURE          counts toward ``failure_threshold``       yes
    other 4xx                 CALLER_ERROR     none: the request is wrong, not the key   no
    cancelled, unknown error  IGNORED          trial slot returned, nothing counted      no
    ========================  ===============  ========================================  ===========
    """

    SUCCESS = "success"
    THROTTLED = "throttled"
    REJECTED = "rejected"
    EXHAUSTED = "exhausted"
    FAILURE = "failure"
    CALLER_ERROR = "caller_error"
    IGNORED = "ignored"

    @property
    def retry_elsewhere(self) -> bool:
        """Whether another key may succeed where this one did not."""
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {OutcomeKind.THROTTLED, OutcomeKind.REJECTED, OutcomeKind.EXHAUSTED, OutcomeKind.FAILURE}
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """A classified result: its kind, the HTTP status if any, and a Retry-After in seconds."""

    kind: OutcomeKind
    status: int | None = None
    retry_after: float | None = None
    detail: str = ""


SUCCESS = Outcome(OutcomeKind.SUCCESS)
IGNORED = Outcome(OutcomeKind.IGNORED)


def classify_status(status: int, headers: Mapping[str, str] | None = None) -> Outcome:
    """Classify an HTTP status (and, for 429, its rate-limit headers)."""
    if 200 <= status < 400:
        return Outcome(OutcomeKind.SUCCESS, status)
    if status == 429:
        return Outcome(OutcomeKind.THROTTLED, status, parse_retry_after(headers or {}))
    if status in (401, 403):
        return Outcome(OutcomeKind.REJECTED, status)
    if status == 402:
        return Outcome(OutcomeKind.EXHAUSTED, status)
    if status == 408 or status >= 500:
        return Outcome(OutcomeKind.FAILURE, status)
    return Outcome(OutcomeKind.CALLER_ERROR, status)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# An epoch timestamp rather than a delay: anything after 2001-09-09.
_EPOCH_THRESHOLD = 1_000_000_000.0


def _parse_duration(value: str) -> float | None:
    """``"20"``, ``"1.5"``, ``"20ms"``, ``"1m30s"``, ``"6m0s"`` -> seconds; ``None`` if malformed."""
    text = value.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos > 0 else None


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait, from the first usable header, or ``None`` if none is usable.

    Understands ``retry-after-ms``, ``retry-after`` (seconds or an HTTP date) and the
    ``x-ratelimit-reset*`` family (durations such as ``"6m0s"``, seconds, or epoch seconds). When
    several reset headers are present the longest wins. Malformed, negative or non-finite values
    are skipped, never raised.
    """
    wall = time.time() if now is None else now
    lowered = {k.lower(): v for k, v in headers.items()}

    raw_ms = lowered.get("retry-after-ms")
    if raw_ms is not None:
        ms = _finite(raw_ms)
        if ms is not None and ms >= 0:
            return ms / 1000.0

    raw = lowered.get("retry-after")
    if raw is not None:
        seconds = _finite(raw)
        if seconds is not None and seconds >= 0:
            return seconds
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            when = None
        if when is not None and when.tzinfo is not None:
            return max(0.0, when.timestamp() - wall)

    resets = []
    for name, value in lowered.items():
        if not name.startswith("x-ratelimit-reset"):
            continue
        seconds = _parse_duration(value)
        if seconds is None or seconds != seconds or seconds in (float("inf"), float("-inf")):
            continue
        if seconds >= _EPOCH_THRESHOLD * 1000:  # epoch milliseconds
            seconds = seconds / 1000.0
        if seconds >= _EPOCH_THRESHOLD:
            seconds = seconds - wall
        if seconds >= 0:
            resets.append(seconds)
    return max(resets) if resets else None


def _finite(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return value


def classify_exception(exc: BaseException) -> Outcome:
    """Classify an exception raised while making or reading a call.

    Network trouble and timeouts are the key's (or the server's) failure; an ``openai`` status
    error is classified by its status; cancellation and anything unrecognised are ignored so a
    bug in the caller's code never counts against a key.
    """
    if isinstance(exc, httpx2.TimeoutException | httpx2.NetworkError | httpx2.RemoteProtocolError):
        return Outcome(OutcomeKind.FAILURE, detail=type(exc).__name__)
    if isinstance(exc, TimeoutError | ConnectionError):
        return Outcome(OutcomeKind.FAILURE, detail=type(exc).__name__)
    if isinstance(exc, httpx2.HTTPStatusError):  # ``response.raise_for_status()``
        return classify_status(exc.response.status_code, exc.response.headers)
    status = _openai_status(exc)
    if status is not None:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
        return classify_status(status, headers)
    if _is_openai_connection_error(exc):
        return Outcome(OutcomeKind.FAILURE, detail=type(exc).__name__)
    return Outcome(OutcomeKind.IGNORED, detail=type(exc).__name__)


def _openai_status(exc: BaseException) -> int | None:
    """``status_code`` of an ``openai.APIStatusError`` without importing ``openai``."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and any(c.__name__ == "APIStatusError" for c in type(exc).__mro__):
        return status
    return None


def _is_openai_connection_error(exc: BaseException) -> bool:
    return any(c.__name__ == "APIConnectionError" for c in type(exc).__mro__)
