"""One request and its response over ASGI, with what was sent recorded in the key's counters.

Statuses are counted when sent, so a hang (which sends none) is told apart from an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

import anyio

from .aliases import JSON, Receive, Send
from .errors import STATUS_ERRORS, error_body

if TYPE_CHECKING:
    from .app import FakeUpstream


async def wait_for_disconnect(receive: Receive, timeout: float | None) -> bool:
    """Wait up to ``timeout`` seconds (forever if None); True if the client went away."""
    with anyio.move_on_after(timeout):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return True
    return False


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class Exchange:
    """One request/response, recording what was sent into the key's tally."""

    def __init__(
        self, upstream: FakeUpstream, tally_key: str, receive: Receive, send: Send, request_id: str
    ) -> None:
        self._upstream = upstream
        self._tally_key = tally_key
        self.receive = receive
        self._send = send
        self._request_id = request_id

    def count(self, **increments: int) -> None:
        self._upstream._bump(self._tally_key, **increments)

    async def start(self, status: int, content_type: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        self._upstream._record_status(self._tally_key, status)
        raw = [(b"content-type", content_type.encode()), (b"x-request-id", self._request_id.encode())]
        raw += [(name.encode(), value.encode("latin-1")) for name, value in headers]
        await self._send({"type": "http.response.start", "status": status, "headers": raw})

    async def body(self, data: bytes, *, more: bool) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def json(self, status: int, payload: JSON, headers: Iterable[tuple[str, str]] = ()) -> None:
        data = json.dumps(payload).encode()
        await self.start(status, "application/json", [*headers, ("content-length", str(len(data)))])
        await self.body(data, more=False)

    async def error(self, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        message, type_, code = STATUS_ERRORS.get(
            status,
            (f"Upstream error {status}.", "server_error" if status >= 500 else "invalid_request_error", None),
        )
        await self.json(status, error_body(message, type_, code), headers)
