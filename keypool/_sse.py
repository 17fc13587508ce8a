"""Server-sent events of LLM streams, read at event boundaries: what is progress and what is an end.

Comments (``: keep-alive``), empty lines and events without content keep a connection alive but
are not progress. Progress is the first delta the caller can see: content, reasoning, a tool call
(chat completions, legacy completions) or any ``*.delta`` event (Responses API). An end is a
``finish_reason`` (or a Responses terminal event), with or without ``data: [DONE]``.

:class:`EventScanner` is fed the raw chunks of a body and returns only whole events, so nothing
half-written reaches the SDK and a stream can be cut between any two events and spliced. It is
incremental: each chunk is scanned once for an event boundary and each whole event is parsed
once. A ``data:`` payload that is not JSON is *broken*: the scan stops before it, so the SDK
never sees it.

Grammars: ``"chat"`` (``/chat/completions``), ``"completions"`` (legacy ``/completions``) and
``"responses"`` (``/responses``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["EventScanner", "Grammar", "MalformedEvent", "grammar_of"]

Grammar = Literal["chat", "completions", "responses"]
#: Rewrites one event's JSON payload before it is passed on (``None`` drops the event).
Rewrite = Callable[[dict[str, Any]], dict[str, Any] | None]

_DONE = b"[DONE]"
_RESPONSES_ENDS = frozenset({"response.completed", "response.incomplete"})
_RESPONSES_ERRORS = frozenset({"response.failed", "error"})


class MalformedEvent(ValueError):
    """A ``data:`` payload of the stream is not the JSON object its grammar requires."""


def grammar_of(path: str) -> Grammar | None:
    """The event grammar of a streamed call to this URL path (``None``: not an LLM stream)."""
    path = path.rstrip("/")
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/completions"):
        return "completions"
    if path.endswith("/responses"):
        return "responses"
    return None


class EventScanner:
    """What a stream has shown so far, fed chunk by chunk; see the module docstring.

    ``progress``: a content, reasoning or tool-call delta has been seen. ``finished``: the answer
    ended (``finish_reason`` or a terminal event). ``done``: ``[DONE]`` came. ``text``: the content
    of choice 0 so far, as the SDK saw it. ``continuable``: only plain content of one choice was
    delivered (no tool call, no reasoning, one choice), so a prefill can finish the answer.
    ``rewrite`` (for splicing) turns each JSON payload into the one passed on.
    """

    __slots__ = (
        "_buffer",
        "_last",
        "_parts",
        "_rewrite",
        "broken",
        "created",
        "done",
        "error",
        "events",
        "finished",
        "grammar",
        "id",
        "model",
        "progress",
        "reasoning",
        "several",
        "tools",
        "usage",
    )

    def __init__(self, grammar: Grammar, rewrite: Rewrite | None = None) -> None:
        self.grammar = grammar
        self._rewrite = rewrite
        self._buffer = b""
        self._parts: list[str] = []
        self.progress = False
        self.finished = False
        self.done = False
        self.events = 0
        self._last: dict[str, Any] | None = None
        self.broken: str | None = None
        self.error: str | None = None
        self.tools = False
        self.reasoning = False
        self.several = False
        self.id: str | None = None
        self.model: str | None = None
        self.created: int | None = None
        self.usage: Any = None

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def continuable(self) -> bool:
        return self.grammar == "chat" and not (self.tools or self.reasoning or self.several)

    @property
    def pending(self) -> int:
        """Bytes of an event not yet complete (held back from the caller)."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> bytes:
        """The whole events completed by ``chunk``, to pass on (``b""`` if none is complete).

        A malformed event (``broken`` is set) or an error event (``error``) stops the scan: the
        events before it are returned, it and the rest are not.
        """
        data = self._buffer + chunk if self._buffer else chunk
        if b"\r" in data:
            if data.endswith(b"\r"):  # the rest of a CRLF may be in the next chunk
                self._buffer = data
                return b""
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            self._buffer = data
            return b""
        whole, self._buffer = data[: end + 2], data[end + 2 :]
        if self._rewrite is not None:
            return self._rewritten(whole)
        start = 0
        for event in whole.split(b"\n\n"):
            if event and not self._take(event):
                self._buffer = b""
                return whole[:start]
            start += len(event) + 2
        return whole

    def restart(self, rewrite: Rewrite | None) -> None:
        """Read another body into this answer (a continuation): drop any half event, rewrite
        what comes next with ``rewrite``."""
        self._buffer = b""
        self._rewrite = rewrite
        self.broken = self.error = None
        self.done = False

    def _take(self, event: bytes) -> bool:
        """Take in one event; ``False`` if it is malformed or an error (and must not pass on)."""
        try:
            self._event(event)
        except MalformedEvent as exc:
            self.broken = str(exc)
            return False
        return self.error is None

    def _rewritten(self, whole: bytes) -> bytes:
        out: list[bytes] = []
        rewrite = self._rewrite
        assert rewrite is not None
        for event in whole.split(b"\n\n"):
            if not event:
                continue
            done = self.done
            if not self._take(event):
                self._buffer = b""
                break
            payload = self._last
            if payload is None:
                if self.done and not done:
                    out.append(b"data: [DONE]\n\n")
                continue  # a comment or an event without data: liveness only
            changed = rewrite(payload)
            if changed is None:
                continue
            name = _event_name(event)
            head = b"event: " + name + b"\n" if name else b""
            out.append(head + b"data: " + json.dumps(changed).encode() + b"\n\n")
        return b"".join(out)

    def _event(self, event: bytes) -> None:
        """Take in one whole event; its JSON payload is left in ``_last`` (``None``: no data)."""
        self._last = None
        if event.startswith(b"data: ") and b"\n" not in event:  # the usual one-line event
            data = event[6:]
            name = b""
        else:
            lines: list[bytes] = []
            name = b""
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    lines.append(line[6:] if line.startswith(b"data: ") else line[5:])
                elif line.startswith(b"event:"):
                    name = line[6:].strip()
            if not lines:
                return  # comments, ids, retry hints: no data
            data = b"\n".join(lines)
        if data.strip() == _DONE:
            self.done = True
            return
        try:
            payload = json.loads(data)
        except ValueError:
            raise MalformedEvent(f"an event's data is not JSON ({len(data)} bytes)") from None
        if not isinstance(payload, dict):
            raise MalformedEvent(f"an event's data is a JSON {type(payload).__name__}, not an object")
        if self.grammar == "responses":
            self._responses(payload, name)
        else:
            self._choices(payload)
        self.events += 1
        self._last = payload

    def _choices(self, payload: dict[str, Any]) -> None:
        error = payload.get("error")
        if error:
            self.error = _message(error)
            return
        if self.id is None:
            self.id = payload.get("id")
            self.model = payload.get("model")
            self.created = payload.get("created")
        usage = payload.get("usage")
        if usage:
            self.usage = usage
        choices = payload.get("choices")
        if not choices:
            return
        if not isinstance(choices, list):
            raise MalformedEvent("an event's 'choices' is not a list")
        for choice in choices:
            if not isinstance(choice, dict):
                raise MalformedEvent("an event's choice is not an object")
            if choice.get("index", 0) != 0:
                self.several = True
            delta = choice.get("delta") if self.grammar == "chat" else choice
            if isinstance(delta, dict):
                content = delta.get("content") if self.grammar == "chat" else delta.get("text")
                if content:
                    self.progress = True
                    if choice.get("index", 0) == 0:
                        self._parts.append(content)
                if delta.get("reasoning_content") or delta.get("reasoning"):
                    self.progress = self.reasoning = True
                if delta.get("tool_calls") or delta.get("function_call"):
                    self.progress = self.tools = True
            if choice.get("finish_reason"):
                self.finished = True

    def _responses(self, payload: dict[str, Any], name: bytes) -> None:
        kind = payload.get("type")
        if not isinstance(kind, str):
            kind = name.decode(errors="replace")
        if kind.endswith(".delta"):
            self.progress = True
            if kind == "response.output_text.delta":
                delta = payload.get("delta")
                if isinstance(delta, str):
                    self._parts.append(delta)
        elif kind in _RESPONSES_ENDS:
            self.finished = True
        elif kind in _RESPONSES_ERRORS:
            self.error = _message(payload.get("error") or payload.get("response") or payload)


def _event_name(event: bytes) -> bytes:
    if not event.startswith(b"event:"):
        return b""
    return event.split(b"\n", 1)[0][6:].strip()


def _message(error: Any) -> str:
    if isinstance(error, dict):
        inner = error.get("error") if isinstance(error.get("error"), dict) else error
        message = inner.get("message") if isinstance(inner, dict) else None
        return str(message or "an error event")
    return str(error)
