"""keypool's refusals and broken streams as the ``openai`` exceptions a plain client would raise.

A caller's ``except openai.RateLimitError`` (or ``AuthenticationError``, ``APITimeoutError``...)
must keep working when the client underneath is pooled. So each refusal is raised as the class the
plain client raises for the same situation, with a real ``response`` (status, ``retry-after``
header, an OpenAI-style error body) and the real ``request``, and is also a
:class:`keypool.NoKeyAvailable` carrying the pool's view (``provider``, ``reason``,
``retry_after``). A stream that breaks after content reached the caller and cannot be finished is
the ``openai.APIConnectionError`` (``APITimeoutError`` for a stall) a plain client raises for it,
and also a :class:`keypool.StreamInterrupted`.

=========================================  =========================================  ======
why no key can serve (``reason``)          raised as                                  status
=========================================  =========================================  ======
``throttled``                              ``RateLimitError``                         429
``rejected``                               ``AuthenticationError``                    401
``forbidden``                              ``PermissionDeniedError``                  403
``quota``                                  ``APIStatusError`` (as openai does)        402
``busy`` (the deadline came first)         ``APITimeoutError``                        —
``open``, ``manual``, ``no_keys``, others  ``InternalServerError``                    503
=========================================  =========================================  ======
"""

from __future__ import annotations

import math
from typing import Any

import httpx2
import openai

from keypool import KeyPoolError, NoKeyAvailable, StreamInterrupted

__all__ = [
    "NoKeyAvailableError",
    "PoolExhaustedError",
    "PoolForbiddenError",
    "PoolRateLimitError",
    "PoolRejectedError",
    "PoolTimeoutError",
    "PoolUnavailableError",
    "StreamInterruptedError",
    "StreamStalledError",
    "openai_error",
]


class NoKeyAvailableError(NoKeyAvailable, openai.APIError):
    """No key can take the call: a :class:`keypool.NoKeyAvailable` that is also ``openai``'s error.

    Every refusal raised through a pooled ``openai`` client is one of its subclasses below, so
    ``except keypool.NoKeyAvailable`` and ``except openai.APIError`` both catch it.
    """

    def _take(self, cause: NoKeyAvailable) -> None:
        self.provider = cause.provider
        self.retry_after = cause.retry_after
        self.reason = cause.reason
        self.detail = cause.detail


class PoolRateLimitError(NoKeyAvailableError, openai.RateLimitError):
    """Every key is rate-limited (429) for longer than the call may wait."""


class PoolRejectedError(NoKeyAvailableError, openai.AuthenticationError):
    """Every key was rejected (401)."""


class PoolForbiddenError(NoKeyAvailableError, openai.PermissionDeniedError):
    """Every key was refused access (403)."""


class PoolExhaustedError(NoKeyAvailableError, openai.APIStatusError):
    """Every key is out of balance or quota (402; ``openai`` has no class of its own for it)."""


class PoolUnavailableError(NoKeyAvailableError, openai.InternalServerError):
    """No key can serve (open breakers, keys taken out, none left): a 503 with ``retry-after``."""


class PoolTimeoutError(NoKeyAvailableError, openai.APITimeoutError):
    """The call's deadline passed while every key was busy with calls in flight."""


class StreamInterruptedError(StreamInterrupted, openai.APIConnectionError):
    """A stream broke after part of it reached the caller and could not be finished: the
    ``openai.APIConnectionError`` the plain client raises for a cut stream, also a
    :class:`keypool.StreamInterrupted` (``provider``, ``key_id``, ``reason``, ``delivered``)."""


class StreamStalledError(StreamInterruptedError, openai.APITimeoutError):
    """A stream went silent after part of it reached the caller: ``openai.APITimeoutError``, as
    the plain client raises for a read timeout, and a :class:`StreamInterruptedError`."""


_STATUS: dict[str, tuple[int, type[NoKeyAvailableError]]] = {
    "throttled": (429, PoolRateLimitError),
    "rejected": (401, PoolRejectedError),
    "forbidden": (403, PoolForbiddenError),
    "quota": (402, PoolExhaustedError),
}
_UNAVAILABLE = (503, PoolUnavailableError)


def _response(status: int, message: str, refusal: NoKeyAvailable, request: httpx2.Request) -> httpx2.Response:
    headers = {"x-keypool-reason": refusal.reason, "x-keypool-provider": refusal.provider}
    if refusal.retry_after is not None:
        headers["retry-after"] = str(max(0, math.ceil(refusal.retry_after)))
        headers["retry-after-ms"] = str(max(0, round(refusal.retry_after * 1000)))
    body = _body(message, refusal)
    return httpx2.Response(status, headers=headers, json={"error": body}, request=request)


def _body(message: str, refusal: NoKeyAvailable) -> dict[str, Any]:
    return {"message": message, "type": "keypool_refusal", "code": refusal.reason, "param": None}


def openai_error(error: KeyPoolError, request: httpx2.Request) -> BaseException:
    """keypool's error as the ``openai`` exception a plain client would raise (the transport's
    ``errors`` map for the pooled clients)."""
    if isinstance(error, openai.APIError):
        return error
    message = str(error)
    if isinstance(error, StreamInterrupted):
        kind = StreamStalledError if error.stalled else StreamInterruptedError
        broken = kind.__new__(kind)
        broken.provider, broken.key_id, broken.reason = error.provider, error.key_id, error.reason
        broken.delivered, broken.stalled = error.delivered, error.stalled
        openai.APIError.__init__(broken, message, request, body=None)
        return broken
    if not isinstance(error, NoKeyAvailable):
        return error
    if error.reason == "busy":
        timeout = PoolTimeoutError.__new__(PoolTimeoutError)
        openai.APITimeoutError.__init__(timeout, request=request)
        timeout.message = message
        timeout.args = (message,)
        timeout._take(error)
        return timeout
    status, cls = _STATUS.get(error.reason, _UNAVAILABLE)
    refused: Any = cls.__new__(cls)  # every class here is an APIStatusError but the timeout
    response = _response(status, message, error, request)
    openai.APIStatusError.__init__(refused, message, response=response, body=_body(message, error))
    refused._take(error)
    typed: NoKeyAvailableError = refused
    return typed
