"""The fake upstream's error answers: OpenAI-style error bodies and the waits a 429 announces.

Real providers put the wait in different headers and formats; a client must read each, so the
rate-limit fault can send any of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from email.utils import formatdate
from typing import Final

from .aliases import JSON
from .faults import Fault


class HTTPError(Exception):
    """A request answered with an error before any fault applies (401, 404, 405, 400)."""

    def __init__(self, status: int, message: str, type_: str, code: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type_, code)


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> JSON:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


STATUS_ERRORS: Final[Mapping[int, tuple[str, str, str | None]]] = {
    400: ("Bad request.", "invalid_request_error", None),
    401: ("Authentication failed: the API key is invalid.", "authentication_error", "invalid_api_key"),
    # DeepSeek's body, verbatim: an empty balance is reported as an invalid request.
    402: ("Insufficient Balance", "unknown_error", "invalid_request_error"),
    403: ("This key is not allowed to use this resource.", "permission_denied_error", "permission_denied"),
    404: ("Not found.", "invalid_request_error", "not_found"),
    408: ("The request timed out.", "timeout_error", "request_timeout"),
    429: ("Rate limit reached for requests. Please try again later.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request.", "server_error", None),
    502: ("Bad gateway.", "server_error", "bad_gateway"),
    503: ("The server is overloaded or not ready yet.", "server_error", "service_unavailable"),
    504: ("Gateway timeout.", "server_error", "gateway_timeout"),
}


def _format_duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` format: ``20ms``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = f"{int(hours)}h" if hours else ""
    if hours or minutes:
        out += f"{int(minutes)}m"
    return out + f"{secs:.3f}".rstrip("0").rstrip(".") + "s"


def retry_headers(fault: Fault) -> list[tuple[str, str]]:
    wait = fault.retry_after
    if wait is None:
        return []
    header = fault.retry_after_header
    if header == "retry-after":
        return [("retry-after", f"{wait:g}")]
    if header == "retry-after-ms":
        return [("retry-after-ms", str(round(wait * 1000)))]
    if header == "retry-after-date":
        return [("retry-after", formatdate(time.time() + math.ceil(wait), usegmt=True))]
    return [("x-ratelimit-reset-requests", _format_duration(wait))]
