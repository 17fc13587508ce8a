"""The body of a 2xx answer, and how its end decides the key's outcome.

A JSON answer is read whole inside the transport, so a body cut short is retried on another key
instead of reaching the caller half-read. An event stream hands its first bytes on and is wrapped:
a clean end records success (or a failure if a required terminator never came), a break records a
failure and reaches the caller as a :class:`~keypool.StreamInterrupted` (or whatever the client's
error map makes of it), and a caller closing early blames nobody.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator

import anyio
import httpx2

from ._errors import KeyPoolError, StreamInterrupted
from ._lease import Lease
from ._outcome import Outcome, OutcomeKind, classify_exception

__all__ = [
    "ErrorMap",
    "LeasedAsyncStream",
    "LeasedSyncStream",
    "RetryableStart",
    "Terminator",
    "body_of",
    "end_check",
    "stream_outcome",
    "within",
]

Terminator = bytes | Callable[[httpx2.Request], bytes | None] | None
#: Turns a keypool error into the exception the caller should see (e.g. an ``openai`` error).
ErrorMap = Callable[[KeyPoolError, httpx2.Request], BaseException]

_MAX_WHOLE = 8 * 1024 * 1024  # JSON bodies up to this size are read whole before they are returned
_DONE = b"[DONE]"  # the OpenAI-style end-of-stream event
_EMPTY_STATUSES = frozenset({202, 204, 205, 304})  # answers that carry no body, or need none


def buffers_whole(response: httpx2.Response) -> bool:
    """Whether a 2xx answer is JSON, read whole (streamed JSON such as ``x-ndjson`` is not)."""
    media = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class Body:
    """The start of a 2xx body: its first chunk, or for JSON the whole of it."""

    __slots__ = ("chunks", "ended", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.ended = False

    def add(self, chunk: bytes, whole: bool) -> bool:
        """Keep ``chunk``; ``True`` to read on (only a JSON body under the size limit is)."""
        if not chunk:
            return True  # nothing reached anyone yet: keep reading
        self.chunks.append(chunk)
        self.size += len(chunk)
        return whole and self.size <= _MAX_WHOLE

    def prefix(self) -> bytes | None:
        return b"".join(self.chunks) if self.chunks else None

    def response(
        self,
        request: httpx2.Request,
        response: httpx2.Response,
        lease: Lease,
        json_body: bool,
        end: EndCheck,
    ) -> httpx2.Response:
        """The whole body as a finished response and the key's success, or a retryable failure
        if the body cannot be the complete answer (cut JSON, a stream without its end)."""
        content = b"".join(self.chunks)
        problem = None
        if json_body and not _complete_json(content, request, response):
            problem = "the JSON body ended before it was complete"
        elif end.missing(content):
            problem = "the event stream ended without its terminator"
        if problem is not None:
            cut = httpx2.RemoteProtocolError(problem, request=request)
            raise RetryableStart(Outcome(OutcomeKind.FAILURE, detail=problem), cut)
        lease.success()
        # The response is ours (the inner transport just made it): swap its body, keep the rest.
        response.stream = httpx2.ByteStream(content)
        return response


def body_of(request: httpx2.Request, response: httpx2.Response) -> bool:
    """Whether a 2xx answer should have a body at all (204, HEAD, ``Content-Length: 0`` do not)."""
    return not (
        response.status_code in _EMPTY_STATUSES
        or request.method == "HEAD"
        or response.headers.get("content-length", "").strip() == "0"
    )


def _complete_json(content: bytes, request: httpx2.Request, response: httpx2.Response) -> bool:
    """Whether a 2xx JSON body is a whole document. An answer that needs no body is complete
    empty; a body whose length the server declared was checked by the HTTP layer; one sent
    without a length is parsed to be sure."""
    if not content.strip():
        return not body_of(request, response)
    if "content-length" in response.headers:
        return True
    try:
        json.loads(content)
    except ValueError:
        return False
    return True


class RetryableStart(Exception):
    """A 2xx body failed before its first byte: the request may still go to another key."""

    def __init__(self, outcome: Outcome, error: BaseException) -> None:
        super().__init__(str(error))
        self.outcome = outcome
        self.error = error


def stream_outcome(exc: BaseException) -> Outcome:
    outcome = classify_exception(exc)
    if outcome.kind is OutcomeKind.IGNORED and isinstance(exc, Exception):
        # Inside the transport, an unexplained error reading the body is the server's doing.
        return Outcome(OutcomeKind.FAILURE, detail=type(exc).__name__)
    return outcome


def within(seconds: float | None) -> contextlib.AbstractContextManager[object]:
    """A deadline for one step (``None``: the HTTP layer's own timeouts only)."""
    return anyio.fail_after(seconds) if seconds else contextlib.nullcontext()


def _is_event_stream(response: httpx2.Response) -> bool:
    return "text/event-stream" in response.headers.get("content-type", "")


def end_check(request: httpx2.Request, response: httpx2.Response, marker: Terminator) -> EndCheck:
    """How the end of this response's body is judged (an event stream may need a terminator)."""
    if not _is_event_stream(response):
        return _PLAIN_BODY
    return EndCheck(marker(request) if callable(marker) else marker, event_stream=True)


class EndCheck:
    """Remembers the tail of an event stream to tell a complete one from a truncated one.

    ``required`` is the marker a stream must end with to count as a success (``None``: any clean
    end will do). Separately, a stream the caller closes right after the ``[DONE]`` event (as the
    sync ``openai`` client does) was complete, so it records a success rather than nothing.
    """

    __slots__ = ("_event_stream", "_required", "_tail")

    def __init__(self, required: bytes | None, event_stream: bool) -> None:
        self._required = required
        self._event_stream = event_stream
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        if self._event_stream:
            self._tail = (self._tail + chunk)[-128:]

    def _seen(self, marker: bytes) -> bool:
        return marker in self._tail

    def finish(self, lease: Lease) -> StreamInterrupted | None:
        """Record the clean end: success, or a failure (returned) if the required marker never came."""
        if self._required is None or self._seen(self._required):
            lease.success()
            return None
        lease.failure("stream ended without its terminator")
        marker = self._required.decode(errors="replace")
        return StreamInterrupted(lease.provider, lease.key_id, f"stream ended without {marker!r}")

    def missing(self, content: bytes) -> bool:
        """Whether a complete body lacks the required terminator."""
        return self._required is not None and self._required not in content[-(len(self._required) + 128) :]

    def closed_early(self, lease: Lease) -> None:
        """The caller closed the body before its end: a success if the stream was complete."""
        if self._event_stream and self._seen(self._required or _DONE):
            lease.success()
        else:
            lease.release()  # a caller closing early blames nobody


_PLAIN_BODY = EndCheck(None, event_stream=False)  # keeps no state: one serves every plain body


def _interrupted(lease: Lease, exc: BaseException, idle: float | None) -> StreamInterrupted:
    reason = f"no data for {idle} s" if isinstance(exc, TimeoutError) else type(exc).__name__
    interrupted = StreamInterrupted(lease.provider, lease.key_id, reason)
    interrupted.__cause__ = exc  # known before it is raised, so an error map can tell a timeout
    return interrupted


class LeasedAsyncStream(httpx2.AsyncByteStream):
    """A 2xx body whose end decides the key's outcome."""

    def __init__(
        self,
        request: httpx2.Request,
        stream: httpx2.AsyncByteStream,
        chunks: AsyncIterator[bytes],
        first: bytes | None,
        lease: Lease,
        end: EndCheck,
        idle: float | None,
        errors: ErrorMap,
    ) -> None:
        self._request = request
        self._stream = stream
        self._chunks = chunks
        self._first = first
        self._lease = lease
        self._end = end
        self._idle = idle
        self._errors = errors

    async def __aiter__(self) -> AsyncIterator[bytes]:
        lease = self._lease
        try:
            if self._first is not None:
                first, self._first = self._first, None
                self._end.feed(first)
                yield first
            while True:
                with within(self._idle):
                    try:
                        chunk = await self._chunks.__anext__()
                    except StopAsyncIteration:
                        break
                self._end.feed(chunk)
                yield chunk
        except (GeneratorExit, anyio.get_cancelled_exc_class()):
            lease.release()
            raise
        except Exception as exc:
            lease.record(stream_outcome(exc))
            raise self._errors(_interrupted(lease, exc, self._idle), self._request) from exc
        cut = self._end.finish(lease)
        if cut is not None:
            raise self._errors(cut, self._request)

    async def aclose(self) -> None:
        self._end.closed_early(self._lease)  # no-op after an outcome
        await self._stream.aclose()


class LeasedSyncStream(httpx2.SyncByteStream):
    def __init__(
        self,
        request: httpx2.Request,
        stream: httpx2.SyncByteStream,
        chunks: Iterator[bytes],
        first: bytes | None,
        lease: Lease,
        end: EndCheck,
        errors: ErrorMap,
    ) -> None:
        self._request = request
        self._stream = stream
        self._chunks = chunks
        self._first = first
        self._lease = lease
        self._end = end
        self._errors = errors

    def __iter__(self) -> Iterator[bytes]:
        lease = self._lease
        try:
            if self._first is not None:
                first, self._first = self._first, None
                self._end.feed(first)
                yield first
            for chunk in self._chunks:
                self._end.feed(chunk)
                yield chunk
        except GeneratorExit:
            lease.release()
            raise
        except Exception as exc:
            lease.record(stream_outcome(exc))
            raise self._errors(_interrupted(lease, exc, None), self._request) from exc
        cut = self._end.finish(lease)
        if cut is not None:
            raise self._errors(cut, self._request)

    def close(self) -> None:
        self._end.closed_early(self._lease)  # no-op after an outcome
        self._stream.close()
