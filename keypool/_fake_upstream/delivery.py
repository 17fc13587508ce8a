"""How an answer reaches the client under a key's fault: whole, delayed, cut, stalled or replaced.

The endpoints build the full answer first; this is the one place that breaks it, so every fault
behaves the same on every endpoint.
"""

from __future__ import annotations

import json
import time
from typing import Final

from .._loopback import DropConnection
from .aliases import JSON
from .answers import Answer, balance_body
from .errors import retry_headers
from .exchange import Exchange, wait_for_disconnect
from .faults import STREAM_FAULTS, Fault

_KEEP_ALIVE: Final = b": keep-alive\n\n"
_MALFORMED: Final = b'data: {"choices": [{"index": 0, "delta": {"content": "half' + b"\n\n"
_ERROR_EVENT: Final = (
    b'data: {"error": {"message": "The server had an error while processing your request.", '
    b'"type": "server_error", "param": null, "code": "server_error"}}\n\n'
)


async def deliver(ex: Exchange, fault: Fault, path: str, answer: Answer) -> None:
    """Send ``answer`` as ``fault`` makes the key send it: an error, a wait, or a broken body."""
    kind = fault.kind
    if kind == "status":
        if fault.status_code == 402 and path == "/user/balance":
            await ex.json(200, balance_body(available=False))
            return
        await ex.error(fault.status_code)
        return
    if kind == "rate_limited":
        await ex.error(429, retry_headers(fault))
        return
    if kind == "hang":
        ex.count(hangs=1)
        await wait_for_disconnect(ex.receive, None)
        return
    if kind == "slow" and await wait_for_disconnect(ex.receive, fault.delay):
        return
    if kind == "keep_alive" and answer.events is None and await wait_for_disconnect(ex.receive, fault.delay):
        return
    breaking = fault if kind in STREAM_FAULTS else None
    if answer.events is None:
        whole_break = breaking if kind in ("cut_stream", "stall") else None
        await _send_whole(ex, answer.body, whole_break)
    else:
        await _send_stream(ex, answer, breaking)


async def _send_whole(ex: Exchange, payload: JSON, breaking: Fault | None) -> None:
    data = json.dumps(payload).encode()
    if breaking is None:
        await ex.json(200, payload)
        return
    await ex.start(200, "application/json")
    await ex.body(data[: len(data) // 2], more=True)
    await _break(ex, breaking)


async def _send_stream(ex: Exchange, answer: Answer, breaking: Fault | None) -> None:
    events = answer.events or []
    await ex.start(
        200,
        "text/event-stream; charset=utf-8",
        [("cache-control", "no-cache"), ("connection", "keep-alive")],
    )
    ex.count(streams_started=1)
    kind = breaking.kind if breaking is not None else "ok"
    if breaking is not None and kind in ("keep_alive_cut", "keep_alive"):
        if await _keep_alive(ex, breaking):
            return
        breaking = None
    elif breaking is not None and kind == "malformed":
        at = breaking.after_chunks
        events = [*events[:at], _MALFORMED, *events[at:]]
        breaking = None
    elif breaking is not None and kind == "error_event":
        breaking = Fault.cut_stream(breaking.after_chunks + 1, mode="truncate")
        events = [*events[: breaking.after_chunks - 1], _ERROR_EVENT]
    limit = breaking.after_chunks if breaking is not None else len(events)
    for event in events[:limit]:
        await ex.body(event, more=True)
    if breaking is not None:
        await _break(ex, breaking)
        return
    await ex.body(answer.terminator, more=False)
    ex.count(streams_completed=1)


async def _keep_alive(ex: Exchange, fault: Fault) -> bool:
    """Send keep-alive comments; ``True`` if the stream ends there (cut, or the client left)."""
    if fault.kind == "keep_alive_cut":
        for _ in range(fault.after_chunks):
            await ex.body(_KEEP_ALIVE, more=True)
            if await wait_for_disconnect(ex.receive, fault.delay):
                return True
        ex.count(cut=1)
        raise DropConnection("stream cut after keep-alives on purpose by FakeUpstream")
    interval = fault.retry_after or 0.05
    deadline = time.monotonic() + fault.delay
    while time.monotonic() < deadline:
        await ex.body(_KEEP_ALIVE, more=True)
        if await wait_for_disconnect(ex.receive, min(interval, max(0.0, deadline - time.monotonic()))):
            return True
    return False


async def _break(ex: Exchange, fault: Fault) -> None:
    if fault.kind == "stall":
        ex.count(stalled=1)
        await wait_for_disconnect(ex.receive, None)
        return
    ex.count(cut=1)
    if fault.mode == "truncate":
        await ex.body(b"", more=False)
        return
    raise DropConnection("response body cut on purpose by FakeUpstream")
