"""The exceptions keypool raises.

Every error a caller can see derives from :class:`KeyPoolError`, so one ``except`` catches them all::

    KeyPoolError
    ├── ConfigError              (also ValueError)    invalid configuration; names the field
    ├── UnknownProviderError     (also LookupError)   names the providers that exist
    ├── UnknownKeyError          (also LookupError)   names the key ids that exist
    ├── NoKeyAvailable                                no key can take the call before the deadline
    │   └── LoadShed                                  refused on purpose to protect critical traffic
    └── StreamInterrupted                             a stream broke and could not be finished

Messages never contain a key's secret: keys are named by their ``key_id`` only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "ConfigError",
    "KeyPoolError",
    "LoadShed",
    "NoKeyAvailable",
    "StreamInterrupted",
    "UnknownKeyError",
    "UnknownProviderError",
]

_MAX_LISTED = 20


def _listing(names: Iterable[str]) -> str:
    items = sorted(names)
    shown = ", ".join(repr(n) for n in items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f", … ({len(items) - _MAX_LISTED} more)"
    return shown or "none"


class KeyPoolError(Exception):
    """Base class of every keypool error."""


class ConfigError(KeyPoolError, ValueError):
    """A configuration value is out of range or inconsistent; the message names the field."""


class UnknownProviderError(KeyPoolError, LookupError):
    """A provider name that the pool does not have."""

    def __init__(self, provider: str, known: Iterable[str]) -> None:
        self.provider = provider
        self.known = sorted(known)
        super().__init__(f"unknown provider {provider!r}; known providers: {_listing(self.known)}")


class UnknownKeyError(KeyPoolError, LookupError):
    """A key id that the pool (or the named provider) does not have."""

    def __init__(self, key_id: str, known: Iterable[str], provider: str | None = None) -> None:
        self.key_id = key_id
        self.provider = provider
        self.known = sorted(known)
        where = f" for provider {provider!r}" if provider else ""
        super().__init__(f"unknown key id {key_id!r}{where}; known key ids: {_listing(self.known)}")


class NoKeyAvailable(KeyPoolError):
    """No key of ``provider`` can take a call now, nor before the caller's deadline.

    ``reason`` says why: ``open`` (keys tripped by failures), ``throttled`` (429), ``rejected``
    (401), ``forbidden`` (403), ``quota`` (402), ``manual`` (taken out by an operator), ``busy``
    (every key is at its limit of calls in flight and the deadline came first), ``no_keys``,
    ``load_shed`` or ``budget`` (the request's attempts or deadline were spent). ``retry_after`` is
    the number of seconds until the soonest key is expected back, or ``None`` when no key will come
    back by itself (all quarantined: an operator must reset or rotate). ``request`` is the HTTP
    request that was refused, when there was one.
    """

    def __init__(
        self,
        provider: str,
        retry_after: float | None,
        detail: str = "",
        *,
        reason: str = "unavailable",
        request: Any = None,
    ) -> None:
        self.provider = provider
        self.retry_after = retry_after
        self.reason = reason
        self.detail = detail
        self.request = request
        super().__init__(refusal_message(provider, retry_after, detail, reason))


_WHY = {
    "open": "its keys are open after failures",
    "throttled": "its keys are rate-limited",
    "rejected": "its keys were rejected (401)",
    "forbidden": "its keys were refused access (403)",
    "quota": "its keys have no balance or quota left (402)",
    "manual": "its keys were taken out by an operator",
    "busy": "every key is busy with calls in flight",
    "no_keys": "it has no keys",
}


def refusal_message(provider: str, retry_after: float | None, detail: str, reason: str) -> str:
    """The one-line text of a refusal: which provider, why, and when to retry."""
    when = (
        f"retry in {retry_after:.3f} s"
        if retry_after is not None
        else "no key recovers by itself (reset or rotate keys)"
    )
    why = _WHY.get(reason)
    extra = "; ".join(part for part in (why, detail) if part)
    extra = f" ({extra})" if extra else ""
    return f"no key of provider {provider!r} can take a call{extra}; {when}"


class LoadShed(NoKeyAvailable):
    """The call was refused to keep the remaining capacity for higher-priority traffic."""


class StreamInterrupted(KeyPoolError):
    """A streamed response broke after part of it reached the caller and could not be finished."""

    def __init__(
        self,
        provider: str,
        key_id: str,
        reason: str,
        *,
        delivered: int | None = None,
        outcome: str = "the request was not retried",
        stalled: bool = False,
    ) -> None:
        self.provider = provider
        self.key_id = key_id
        self.reason = reason
        self.delivered = delivered  # characters of content the caller had (None: not counted)
        self.stalled = stalled  # the stream went silent rather than broke
        super().__init__(f"stream from provider {provider!r} (key {key_id!r}) broke: {reason}; {outcome}")
