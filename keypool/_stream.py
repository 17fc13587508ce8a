"""LLM event streams through the transport: progress, limits, clean ends and continuation.

A stream with an event grammar (a pooled ``openai`` client's chat, completions or Responses
stream) is read event by event through an :class:`~keypool._sse.EventScanner`:

* until its first content, reasoning or tool-call delta nothing reaches the caller: a cut, a
  stall, a malformed event, an in-band error or ``first_token_timeout`` there fails over to
  another key (:class:`~keypool._body.RetryableStart`);
* after it, only whole, well-formed events are passed on. The end after a ``finish_reason`` is a
  success with or without ``[DONE]``; an end without one is a cut; ``stream_idle_timeout``
  bounds each silence (as the attempt's read timeout), ``stream_timeout`` (if set) the stream;
* a break after content is *continued* when the answer can be (plain content, the route takes a
  prefill, continuations and deadline left): see :mod:`keypool._continuation`. Otherwise the
  caller gets the break as a clean error (the client's error map of
  :class:`~keypool.StreamInterrupted`) saying how much was delivered and why it stopped.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass

import anyio
import httpx2

from ._body import ErrorMap, RetryableStart, stream_outcome, within
from ._continuation import Splice, continuation_request
from ._errors import NoKeyAvailable, StreamInterrupted
from ._lease import Lease
from ._outcome import Outcome, OutcomeKind
from ._policy import EXTENSION, CallSettings
from ._sse import EventScanner, Grammar

__all__ = ["ScannedAsyncStream", "ScannedSyncStream", "StreamCall", "start_async", "start_sync"]

_FIRST_TOKEN = "first_token_timeout"  # noqa: S105 - a setting's name


@dataclass(slots=True)
class StreamCall:
    """What a scanned stream knows of its call; the transport makes one per streamed request."""

    request: httpx2.Request
    grammar: Grammar
    settings: CallSettings
    errors: ErrorMap
    timeout: Mapping[str, float | None] | None  # the call's own httpx2 timeouts
    remaining: Callable[[], float | None]  # seconds to the call's deadline
    started: float  # time.monotonic() at the call's start
    continuing: bool = False  # this stream is itself a continuation: it does not continue

    def first_token_left(self, sent: float) -> float | None:
        limit = self.settings.first_token_timeout
        left = self.remaining()
        if limit is not None:
            limit = max(0.0, limit - (time.monotonic() - sent))
        if left is not None:
            limit = left if limit is None else min(limit, left)
        return limit

    def total_left(self) -> float | None:
        cap = self.settings.stream_timeout
        return None if cap is None else cap - (time.monotonic() - self.started)

    def can_continue(self, scanner: EventScanner) -> str | None:
        """Why this answer cannot be continued (``None``: it can)."""
        if self.continuing:
            return "a continuation does not continue itself"
        if scanner.grammar != "chat":
            return "only chat completions are continued"
        if self.settings.prefill is None:
            return "the route takes no prefill"
        if self.settings.max_continuations <= 0:
            return "continuations are off (max_continuations=0)"
        if scanner.tools:
            return "a tool call was being written"
        if scanner.reasoning:
            return "reasoning was being streamed"
        if scanner.several:
            return "several choices were streamed"
        return None

    def continuation(self, delivered: str, exclude: frozenset[str]) -> httpx2.Request:
        prefill = self.settings.prefill
        assert prefill is not None
        left = self.remaining()
        timeout = dict(self.timeout or {})
        if left is not None:  # the continuation lives inside the call's deadline
            for name in ("connect", "read", "write", "pool"):
                given = timeout.get(name)
                timeout[name] = left if given is None else min(given, left)
        mark = {
            "settings": self.settings,
            "stream": True,
            "grammar": "chat",
            "continuing": True,
            "exclude": exclude,
            "started": self.started,  # stream_timeout counts from the call's start
        }
        return continuation_request(self.request, delivered, prefill, {EXTENSION: mark, "timeout": timeout})


def _limit(seconds: float | None) -> float | None:
    """A limit for :func:`within`, where 0 means "at once" rather than "none"."""
    return None if seconds is None else max(seconds, 1e-6)


def _cut(problem: str, request: httpx2.Request) -> RetryableStart:
    error = httpx2.RemoteProtocolError(problem, request=request)
    return RetryableStart(Outcome(OutcomeKind.FAILURE, detail=problem), error)


def _before_content(call: StreamCall, scanner: EventScanner, lease: Lease, ended: bool) -> None:
    """Raise the retryable failure of a stream that stopped before showing content."""
    request = call.request
    if scanner.broken is not None:
        raise _cut(f"malformed event before any content: {scanner.broken}", request)
    if scanner.error is not None:
        reason = f"in-band error event before any content: {scanner.error}"
        error = call.errors(StreamInterrupted(lease.provider, lease.key_id, reason, delivered=0), request)
        raise RetryableStart(Outcome(OutcomeKind.FAILURE, detail="in-band error event"), error)
    if ended and not scanner.finished:
        raise _cut("the event stream ended before any content and without a finish_reason", request)


def _late(call: StreamCall, limit: float | None) -> RetryableStart:
    waited = f" ({limit:.3g} s)" if limit is not None else ""
    late = httpx2.ReadTimeout(f"no content within {_FIRST_TOKEN}{waited}", request=call.request)
    return RetryableStart(Outcome(OutcomeKind.FAILURE, detail=f"ReadTimeout: {_FIRST_TOKEN}"), late)


def _finished(response: httpx2.Response, head: list[bytes], lease: Lease) -> httpx2.Response:
    lease.success()
    response.stream = httpx2.ByteStream(b"".join(head))
    return response


async def start_async(
    call: StreamCall,
    response: httpx2.Response,
    lease: Lease,
    sent: float,
    resume: Callable[[httpx2.Request], Awaitable[httpx2.Response]],
    hard: float | None = None,
) -> httpx2.Response:
    """Read an LLM stream up to its first content; the response to hand on, or RetryableStart.
    ``hard``: the attempt's own cap (``attempt_timeout``), if it is shorter."""
    stream = response.stream
    assert isinstance(stream, httpx2.AsyncByteStream)
    scanner = EventScanner(call.grammar)
    chunks = stream.__aiter__()
    head: list[bytes] = []
    ended = False
    limit = call.first_token_left(sent)
    if hard is not None:
        limit = hard if limit is None else min(limit, hard)
    try:
        # One timer for the whole head; silence is the attempt's read timeout (see _cap_reads).
        with within(_limit(limit)):
            while not (scanner.progress or scanner.finished or scanner.broken or scanner.error):
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    ended = True
                    break
                out = scanner.feed(chunk)
                if out:
                    head.append(out)
        if not scanner.progress:
            _before_content(call, scanner, lease, ended)
    except TimeoutError as exc:
        await stream.aclose()
        raise _late(call, limit) from exc
    except RetryableStart:
        await stream.aclose()
        raise
    except Exception as exc:
        await stream.aclose()
        raise RetryableStart(stream_outcome(exc), exc) from exc
    except BaseException:
        lease.release()  # cancelled before any content: free the key, blame nobody
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        raise
    if ended:
        await stream.aclose()
        return _finished(response, head, lease)
    wrapped = ScannedAsyncStream(call, stream, chunks, scanner, b"".join(head), lease, resume)
    return httpx2.Response(
        response.status_code,
        headers=response.headers,
        stream=wrapped,
        extensions=response.extensions,
        request=call.request,
    )


def start_sync(
    call: StreamCall,
    response: httpx2.Response,
    lease: Lease,
    sent: float,
    resume: Callable[[httpx2.Request], httpx2.Response],
) -> httpx2.Response:
    """The sync twin of :func:`start_async` (reads are bounded by the attempt's read timeout)."""
    stream = response.stream
    assert isinstance(stream, httpx2.SyncByteStream)
    scanner = EventScanner(call.grammar)
    chunks = iter(stream)
    head: list[bytes] = []
    ended = False
    limit = call.first_token_left(sent)
    try:
        while not (scanner.progress or scanner.finished or scanner.broken or scanner.error):
            chunk = next(chunks, None)
            if chunk is None:
                ended = True
                break
            out = scanner.feed(chunk)
            if out:
                head.append(out)
            if not scanner.progress and limit is not None and time.monotonic() - sent > limit:
                raise _late(call, limit)
        if not scanner.progress:
            _before_content(call, scanner, lease, ended)
    except RetryableStart:
        stream.close()
        raise
    except Exception as exc:
        stream.close()
        raise RetryableStart(stream_outcome(exc), exc) from exc
    except BaseException:
        lease.release()
        stream.close()
        raise
    if ended:
        stream.close()
        return _finished(response, head, lease)
    wrapped = ScannedSyncStream(call, stream, chunks, scanner, b"".join(head), lease, resume)
    return httpx2.Response(
        response.status_code,
        headers=response.headers,
        stream=wrapped,
        extensions=response.extensions,
        request=call.request,
    )


class _Break(Exception):
    """Why a stream stopped before its answer's end, and whose fault it was."""

    def __init__(
        self, reason: str, outcome: Outcome, continuable: bool = True, stalled: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.outcome = outcome
        self.continuable = continuable
        self.stalled = stalled


def _broken(exc: BaseException, idle: float | None) -> _Break:
    if isinstance(exc, httpx2.ReadTimeout):  # a stall: the attempt's read timeout
        return _Break(f"stalled: no data for {idle} s", stream_outcome(exc), stalled=True)
    return _Break(f"cut ({type(exc).__name__})", stream_outcome(exc))


class _Scanned:
    """What the async and sync scanned streams share: the end of an answer and its errors."""

    def __init__(
        self,
        call: StreamCall,
        scanner: EventScanner,
        head: bytes,
        lease: Lease,
    ) -> None:
        self._call = call
        self._scanner = scanner
        self._head = head
        self._lease = lease
        # A stall is the attempt's read timeout, which the transport set (``_cap_reads``): an
        # httpx2 timer costs nothing per chunk, where a timer of our own would cost ~15 µs.
        limits = call.request.extensions.get("timeout") or {}
        self._idle: float | None = limits.get("read")
        self._over = False  # the answer's outcome is decided

    def _check(self) -> None:
        """After a chunk: a malformed or error event is a break."""
        scanner = self._scanner
        if scanner.broken is not None:
            raise _Break(
                f"malformed event ({scanner.broken})", Outcome(OutcomeKind.FAILURE, detail="malformed event")
            )
        if scanner.error is not None:
            raise _Break(
                f"in-band error event: {scanner.error}", Outcome(OutcomeKind.FAILURE, detail="error event")
            )

    def _ended(self) -> None:
        """The body ended: a success after a finish, else a cut."""
        if not self._scanner.finished:
            raise _Break(
                "the stream ended without a finish_reason", Outcome(OutcomeKind.FAILURE, detail="no finish")
            )
        self._over = True
        self._lease.success()

    def _timed_out(self) -> _Break:
        cap = self._call.settings.stream_timeout
        reason = f"stream_timeout ({cap} s) reached"
        return _Break(reason, Outcome(OutcomeKind.IGNORED), continuable=False, stalled=True)

    def _closed(self) -> None:
        """The caller closed the stream: a success if the answer had ended, else nobody's fault."""
        if self._over:
            return
        self._over = True
        if self._scanner.finished:
            self._lease.success()
        else:
            self._lease.release()

    def _give_up(self, reason: str, why_not: str, stalled: bool = False) -> BaseException:
        lease = self._lease
        delivered = len(self._scanner.text)
        outcome = f"{delivered} characters of content delivered, {why_not}"
        broken = StreamInterrupted(
            lease.provider, lease.key_id, reason, delivered=delivered, outcome=outcome, stalled=stalled
        )
        return self._call.errors(broken, self._call.request)

    def _fail(self, broke: _Break) -> str | None:
        """Record a break on the key; why it cannot be continued (``None``: it can)."""
        self._over = True
        self._lease.record(broke.outcome)
        if not broke.continuable:
            return "not continued: the caller's own limit"
        why = self._call.can_continue(self._scanner)
        return None if why is None else f"not continued: {why}"


class ScannedAsyncStream(_Scanned, httpx2.AsyncByteStream):
    """An LLM stream after its first content: whole events only, continued after a break."""

    def __init__(
        self,
        call: StreamCall,
        stream: httpx2.AsyncByteStream,
        chunks: AsyncIterator[bytes],
        scanner: EventScanner,
        head: bytes,
        lease: Lease,
        resume: Callable[[httpx2.Request], Awaitable[httpx2.Response]],
    ) -> None:
        super().__init__(call, scanner, head, lease)
        self._stream = stream
        self._chunks = chunks
        self._resume = resume
        self._current: httpx2.Response | None = None
        self._body: AsyncIterator[bytes] | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        # One body however often it is iterated: the SDK drains the stream after [DONE] with a
        # second loop, which must go on where the first stopped (perhaps in a continuation).
        if self._body is None:
            self._body = self._read()
        return self._body

    async def _read(self) -> AsyncIterator[bytes]:
        scanner = self._scanner
        broke: _Break | None = None
        try:
            if self._head:
                head, self._head = self._head, b""
                yield head
            capped = self._call.settings.stream_timeout is not None
            while True:
                try:
                    if capped:  # a timer only when the caller asked for a total limit
                        with within(_limit(self._call.total_left())):
                            chunk = await self._chunks.__anext__()
                    else:
                        chunk = await self._chunks.__anext__()
                except StopAsyncIteration:
                    self._ended()
                    return
                except TimeoutError as exc:
                    raise self._timed_out() from exc
                out = scanner.feed(chunk)
                if out:
                    yield out
                self._check()
        except _Break as exc:
            broke = exc
        except (GeneratorExit, anyio.get_cancelled_exc_class()):
            self._closed()
            raise
        except Exception as exc:
            broke = _broken(exc, self._idle)
        await self._stream.aclose()
        why_not = self._fail(broke)
        if why_not is not None:
            raise self._give_up(broke.reason, why_not, broke.stalled)
        async for out in self._continue(broke.reason, broke.stalled):
            yield out

    async def _continue(self, reason: str, stalled: bool) -> AsyncIterator[bytes]:
        scanner = self._scanner
        exclude = frozenset({self._lease.key_id})
        why = "no continuation left"
        budget = self._call.settings.max_continuations
        while budget > 0:
            left = self._call.remaining()
            if left is not None and left <= 0:
                why = "the call's deadline has passed"
                break
            try:
                response = await self._resume(self._call.continuation(scanner.text, exclude))
            except NoKeyAvailable:
                if not exclude:
                    why = "no key could take the continuation"
                    break
                exclude = frozenset()  # the key that broke is the only one: try it again
                continue
            except Exception as exc:
                why = f"the continuation failed before any content ({type(exc).__name__})"
                break
            budget -= 1
            if response.status_code >= 300:
                await response.aclose()
                why = f"the continuation was refused (HTTP {response.status_code})"
                break
            scanner.restart(Splice.of(scanner))
            self._current = response
            try:
                async for raw in response.stream:  # type: ignore[union-attr]
                    out = scanner.feed(raw)
                    if out:
                        yield out
            except StreamInterrupted as exc:
                exclude = exclude | {exc.key_id}
                reason = f"{reason}; its continuation broke too ({exc.reason})"
                continue
            finally:
                self._current = None
                await response.aclose()
            if scanner.finished:
                return
        raise self._give_up(reason, f"not continued: {why}", stalled)

    async def aclose(self) -> None:
        self._closed()
        if self._current is not None:
            await self._current.aclose()
        await self._stream.aclose()


class ScannedSyncStream(_Scanned, httpx2.SyncByteStream):
    """The sync twin of :class:`ScannedAsyncStream`; a stall is the attempt's read timeout."""

    def __init__(
        self,
        call: StreamCall,
        stream: httpx2.SyncByteStream,
        chunks: Iterator[bytes],
        scanner: EventScanner,
        head: bytes,
        lease: Lease,
        resume: Callable[[httpx2.Request], httpx2.Response],
    ) -> None:
        super().__init__(call, scanner, head, lease)
        self._stream = stream
        self._chunks = chunks
        self._resume = resume
        self._current: httpx2.Response | None = None
        self._body: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        if self._body is None:  # one body however often it is iterated (see the async twin)
            self._body = self._read()
        return self._body

    def _read(self) -> Iterator[bytes]:
        scanner = self._scanner
        broke: _Break | None = None
        try:
            if self._head:
                head, self._head = self._head, b""
                yield head
            for chunk in self._chunks:
                out = scanner.feed(chunk)
                if out:
                    yield out
                self._check()
                total = self._call.total_left()
                if total is not None and total <= 0:
                    raise self._timed_out()
            self._ended()
            return
        except _Break as exc:
            broke = exc
        except GeneratorExit:
            self._closed()
            raise
        except Exception as exc:
            broke = _broken(exc, self._idle)
        self._stream.close()
        why_not = self._fail(broke)
        if why_not is not None:
            raise self._give_up(broke.reason, why_not, broke.stalled)
        yield from self._continue(broke.reason, broke.stalled)

    def _continue(self, reason: str, stalled: bool) -> Iterator[bytes]:
        scanner = self._scanner
        exclude = frozenset({self._lease.key_id})
        why = "no continuation left"
        budget = self._call.settings.max_continuations
        while budget > 0:
            left = self._call.remaining()
            if left is not None and left <= 0:
                why = "the call's deadline has passed"
                break
            try:
                response = self._resume(self._call.continuation(scanner.text, exclude))
            except NoKeyAvailable:
                if not exclude:
                    why = "no key could take the continuation"
                    break
                exclude = frozenset()
                continue
            except Exception as exc:
                why = f"the continuation failed before any content ({type(exc).__name__})"
                break
            budget -= 1
            if response.status_code >= 300:
                response.close()
                why = f"the continuation was refused (HTTP {response.status_code})"
                break
            scanner.restart(Splice.of(scanner))
            self._current = response
            try:
                for raw in response.stream:  # type: ignore[union-attr]
                    out = scanner.feed(raw)
                    if out:
                        yield out
            except StreamInterrupted as exc:
                exclude = exclude | {exc.key_id}
                reason = f"{reason}; its continuation broke too ({exc.reason})"
                continue
            finally:
                self._current = None
                response.close()
            if scanner.finished:
                return
        raise self._give_up(reason, f"not continued: {why}", stalled)

    def close(self) -> None:
        self._closed()
        if self._current is not None:
            self._current.close()
        self._stream.close()
