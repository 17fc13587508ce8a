"""Relaying an event stream, and finishing a chat answer whose stream broke after content.

The answer's events go through :class:`keypool.EventScanner` on their way to the caller, so only
whole events are passed on and the scanner knows what the caller has read. When the stream
breaks (cut, stall, malformed or in-band error event) after content and before the answer ended,
the same conversation goes to a route whose provider takes a prefill (``prefill`` in its table),
with the delivered text as the trailing assistant message; the continuation's events are spliced
into the answer the caller is reading (same ``id``, ``model``, ``created``; no second ``role``).
Where no route can continue, the caller gets an in-band error event, never a truncated answer
presented as complete.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2

from keypool import EventScanner, KeyPoolError, Splice

__all__ = ["Continue", "relay_events"]

MAX_CONTINUATIONS = 4

#: Given the delivered text, a new upstream response that continues it (or ``None``).
Continue = Callable[[str], Awaitable[httpx2.Response | None]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def error_event(reason: str) -> bytes:
    error = {
        "message": f"The upstream stream broke after part of the answer was sent ({reason}).",
        "type": "server_error",
        "param": None,
        "code": "stream_interrupted",
    }
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"


async def _pump(response: httpx2.Response, scanner: EventScanner, send: Send) -> str | None:
    """Pass ``response``'s whole events on; the reason it broke, or ``None`` for a clean end."""
    try:
        async for chunk in response.aiter_raw():
            out = scanner.feed(chunk)
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
            if scanner.broken or scanner.error:
                return "malformed event" if scanner.broken else "error event"
    except (KeyPoolError, httpx2.HTTPError) as exc:
        return type(exc).__name__
    finally:
        await response.aclose()
    if scanner.pending or not scanner.finished:  # [DONE] without a finish_reason is a cut too
        return "the stream ended before the answer did"
    return None


async def relay_events(
    response: httpx2.Response, send: Send, grammar: Any, continue_with: Continue | None
) -> tuple[str | None, int]:
    """Relay an event stream whose headers were sent; ``(why it broke, continuations used)``."""
    scanner = EventScanner(grammar)
    broke = await _pump(response, scanner, send)
    continued = 0
    while (
        broke is not None
        and continue_with is not None
        and continued < MAX_CONTINUATIONS
        and scanner.progress
        and not scanner.finished
        and scanner.continuable
    ):
        follow = await continue_with(scanner.text)
        if follow is None:
            break
        continued += 1
        scanner.restart(Splice.of(scanner))
        broke = await _pump(follow, scanner, send)
    if broke is not None and not scanner.finished:
        await send({"type": "http.response.body", "body": error_event(broke), "more_body": True})
    elif broke is not None and not scanner.done:
        broke = None  # a finish_reason ends the answer, with or without [DONE]
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return broke, continued
