"""Setting a RedisStore up so that bad configuration fails loudly: URLs checked at construction
(credentials masked in every message), causes named in words an operator can act on, strict mode
from the environment, and the backoff between reconnection attempts.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._errors import ConfigError

__all__ = ["STRICT_ENV", "backoff", "describe", "open_pool", "safe_url", "strict_from_env"]

STRICT_ENV = "KEYPOOL_REDIS_STRICT"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def safe_url(url: str) -> str:
    """The URL without credentials (user info, or a ``password=`` query argument), for messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<not a URL>"
    address, qmark, query = rest.partition("?")
    address = address.rpartition("@")[2]
    if qmark:
        pairs = parse_qsl(query, keep_blank_values=True)
        kept = [(k, "***" if k.lower() == "password" else v) for k, v in pairs]
        return f"{scheme}://{address}?{urlencode(kept, safe='*')}"
    return f"{scheme}://{address}"


def _secrets_in(url: str) -> list[str]:
    """Every credential in ``url``, raw and decoded, so that messages can be scrubbed of them."""
    found: list[str] = []
    rest = url.partition("://")[2]
    address, _, query = rest.partition("?")
    userinfo = address.rpartition("@")[0]
    if userinfo:
        found += [userinfo, *userinfo.split(":", 1)]
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k.lower() == "password":
            found.append(v)
    found += [unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


def scrub(message: str, url: str) -> str:
    for secret in _secrets_in(url):
        message = message.replace(secret, "***")
    return message


def open_pool(url: str, options: dict[str, Any]) -> aioredis.ConnectionPool:
    """The client's connection pool for ``url``: parsing it (no I/O) finds a malformed URL now."""
    try:
        return aioredis.ConnectionPool.from_url(url, **options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"url: not a valid Redis URL ({scrub(str(exc), url)}): {safe_url(url)}") from None


def strict_from_env() -> bool:
    value = os.environ.get(STRICT_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{STRICT_ENV}: must be one of 1/true/yes/on or 0/false/no/off (got {value!r})")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


def describe(exc: BaseException, url: str) -> str:
    """What went wrong, in words that say what to fix (never a credential)."""
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            detail = e.verify_message or "certificate verify failed"
            return f"TLS certificate not trusted ({detail}); pass ssl_ca_certs in client_options"
        if isinstance(e, ssl.SSLError):
            return f"TLS handshake failed ({e.reason or type(e).__name__})"
    for e in chain:
        message = str(e)
        if isinstance(e, AuthenticationError) or (
            isinstance(e, ResponseError) and message.startswith(("WRONGPASS", "NOAUTH", "NOPERM"))
        ):
            return f"authentication failed ({scrub(message, url) or 'wrong or missing password'})"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused (is Redis running at that address?)"
        if isinstance(e, socket.gaierror):
            return "host name not found"
        if isinstance(e, (TimeoutError, RedisTimeoutError)):
            return "no answer in time (Redis overloaded, paused or unreachable)"
    if isinstance(exc, RedisConnectionError):
        return f"connection failed ({scrub(str(exc), url)})"
    return f"{type(exc).__name__}: {scrub(str(exc), url)}" if str(exc) else type(exc).__name__


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds before reconnection attempt ``attempt`` (1, 2, ...): doubling, capped, jittered."""
    delay: float = min(cap, base * 2.0 ** min(attempt - 1, 30))
    return delay * (0.75 + 0.5 * rng.random())
