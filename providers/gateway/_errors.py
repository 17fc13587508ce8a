"""The gateway's own answers in OpenAI's error shape, with the status a plain provider would give.

``{"error": {"message", "type", "param", "code"}}``: 400 for a body the endpoint cannot take, 401
for a missing or wrong caller key, 403 for a model the caller may not use, 404 for an unknown
model or path, 413 for a body over the limit, 429 (every route throttled or busy) or 503 (down,
or shed) with ``Retry-After``, 502/504 when no upstream answered at all.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from keypool import LoadShed, NoKeyAvailable

__all__ = ["GatewayError", "refusal_error"]

_RATE_REASONS = frozenset({"throttled", "busy"})


@dataclass
class GatewayError(Exception):
    """An answer the gateway gives itself, ready to send."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    retry_after: float | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    raw: bytes | None = None  # an upstream error body, relayed as it came

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> bytes:
        if self.raw is not None:
            return self.raw
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return json.dumps({"error": error}).encode()

    def all_headers(self) -> list[tuple[bytes, bytes]]:
        out = [(b"content-type", b"application/json"), *self.headers]
        if self.retry_after is not None:
            seconds = max(1, math.ceil(self.retry_after))
            out.append((b"retry-after", str(seconds).encode()))
            out.append((b"retry-after-ms", str(max(1, round(self.retry_after * 1000))).encode()))
        return out


def unauthorized(present: bool) -> GatewayError:
    message = (
        "Incorrect API key provided."
        if present
        else "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
    )
    return GatewayError(401, message, "authentication_error", "invalid_api_key")


def refusal_error(refusals: Sequence[NoKeyAvailable]) -> GatewayError:
    """One answer for every route's refusal: 429 if all were rate limits or busy keys, else 503;
    ``Retry-After`` is the soonest recovery any of them expects."""
    waits = [r.retry_after for r in refusals if r.retry_after is not None]
    retry_after = min(waits) if waits else None
    providers = ", ".join(dict.fromkeys(r.provider for r in refusals))
    if any(isinstance(r, LoadShed) for r in refusals):
        return GatewayError(
            503, str(refusals[0]), "server_error", "load_shed", retry_after=retry_after if waits else 1.0
        )
    if refusals and all(r.reason in _RATE_REASONS for r in refusals):
        return GatewayError(
            429,
            f"Rate limit reached on every route ({providers}); retry later.",
            "rate_limit_error",
            "rate_limit_exceeded",
            retry_after=retry_after if waits else 1.0,
        )
    reasons = ", ".join(dict.fromkeys(r.reason for r in refusals)) or "unavailable"
    return GatewayError(
        503,
        f"No upstream key can take the request now (providers: {providers}; {reasons}).",
        "server_error",
        "service_unavailable",
        retry_after=retry_after,
    )
