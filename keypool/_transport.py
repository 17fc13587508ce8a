"""KeyPoolTransport: an ``httpx2`` transport that leases a key for every attempt of a request.

Any SDK that runs on ``httpx2`` (``openai``, ``mcp``) gets pooling, failover and breakers by being
handed a client over this transport. For one request: lease a key -> set its auth header -> send ->
classify -> record -> if the failure is the key's or the server's, close that response and try
another key (never the same key twice; one attempt budget and one deadline for the whole request)
-> hand back the response. A 2xx body is wrapped so that its clean end records success and a broken
one records failure; a failure before the first byte is retried on another key, a failure after
bytes reached the caller raises :class:`~keypool.StreamInterrupted`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import anyio
import httpx2

from ._budget import RequestBudget, current_budget
from ._errors import NoKeyAvailable, StreamInterrupted
from ._outcome import Outcome, OutcomeKind, classify_exception, classify_status
from ._pool import KeyPool, Lease

__all__ = ["KeyPoolTransport", "SyncKeyPoolTransport"]


@dataclass
class _Plan:
    """The budget of one request: attempts left, keys tried, the deadline and replayability."""

    attempts_left: int
    deadline: float | None
    replayable: bool
    shared: RequestBudget | None = None
    tried: set[str] = field(default_factory=set)

    def served(self, provider: str, key_id: str) -> None:
        if self.shared is not None:
            self.shared.served_by = (provider, key_id)

    def can_retry(self, now: float) -> bool:
        return self.replayable and self.attempts_left > 0 and (self.deadline is None or now < self.deadline)


class _Base:
    """What the async and sync transports share: configuration, planning and classification."""

    def __init__(
        self,
        pool: KeyPool,
        provider: str,
        *,
        max_attempts: int | None = None,
        timeout: float | None = 60.0,
        auth_header: str = "Authorization",
        auth_scheme: str | None = "Bearer",
        stream_idle_timeout: float | None = None,
        sse_terminator: Terminator = None,
        attempt_timeout: float | None = None,
    ) -> None:
        if max_attempts is not None and max_attempts < 1:
            from ._errors import ConfigError

            raise ConfigError(f"max_attempts: must be >= 1 (got {max_attempts})")
        pool.capacity(provider)  # fail fast on an unknown provider
        self.pool = pool
        self.provider = provider
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.auth_header = auth_header
        self.auth_scheme = auth_scheme
        self.stream_idle_timeout = stream_idle_timeout
        self.sse_terminator = sse_terminator
        self.attempt_timeout = attempt_timeout

    def _end_check(self, request: httpx2.Request, response: httpx2.Response) -> _EndCheck:
        """How the end of this response's body is judged (an event stream may need a terminator)."""
        if not _is_event_stream(response):
            return _PLAIN_BODY
        marker = self.sse_terminator
        return _EndCheck(marker(request) if callable(marker) else marker, event_stream=True)

    def _plan(self, request: httpx2.Request) -> _Plan:
        attempts = max(1, self.max_attempts or self.pool.key_count(self.provider))
        now = self.pool.clock.now()
        deadline = None if self.timeout is None else now + self.timeout
        shared = current_budget()
        if shared is not None and shared.exhausted():
            raise NoKeyAvailable(self.provider, 0.0, "the request's attempt budget or deadline is spent")
        if shared is not None:  # an enclosing request_budget() caps attempts and the deadline
            attempts = max(1, min(attempts, shared.attempts_left))
            left = shared.remaining_time()
            if left is not None:
                shared_deadline = now + max(0.0, left)
                deadline = shared_deadline if deadline is None else min(deadline, shared_deadline)
        return _Plan(
            attempts_left=attempts,
            deadline=deadline,
            replayable=isinstance(request.stream, httpx2.ByteStream),
            shared=shared,
        )

    def _attempt_limit(self, plan: _Plan) -> float | None:
        """How long this attempt may take to answer: its own cap, and never past the deadline."""
        left = None if plan.deadline is None else max(0.0, plan.deadline - self.pool.clock.now())
        if self.attempt_timeout is None:
            return left
        return self.attempt_timeout if left is None else min(self.attempt_timeout, left)

    def _wait_budget(self, plan: _Plan) -> float | None:
        if plan.deadline is None:
            return None
        return max(0.0, plan.deadline - self.pool.clock.now())

    def _authorize(self, request: httpx2.Request, lease: Lease, plan: _Plan) -> None:
        plan.tried.add(lease.key_id)
        plan.attempts_left -= 1
        if plan.shared is not None:
            plan.shared.spend(self.provider, lease.key_id)
        secret = lease.secret.get_secret_value()
        value = f"{self.auth_scheme} {secret}" if self.auth_scheme else secret
        request.headers[self.auth_header] = value

    def _judge(self, lease: Lease, plan: _Plan, outcome: Outcome) -> bool:
        """Record a non-success outcome; True if the request should move to another key."""
        lease.record(outcome)
        return outcome.kind.retry_elsewhere and plan.can_retry(self.pool.clock.now())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(provider={self.provider!r})"


class KeyPoolTransport(_Base, httpx2.AsyncBaseTransport):
    """The async transport. ``transport`` is where requests really go (default: a new
    ``httpx2.AsyncHTTPTransport``, closed with this one; a transport you pass is yours to close).
    """

    def __init__(
        self,
        pool: KeyPool,
        provider: str,
        *,
        transport: httpx2.AsyncBaseTransport | None = None,
        max_attempts: int | None = None,
        timeout: float | None = 60.0,
        auth_header: str = "Authorization",
        auth_scheme: str | None = "Bearer",
        stream_idle_timeout: float | None = None,
        sse_terminator: Terminator = None,
        attempt_timeout: float | None = None,
    ) -> None:
        super().__init__(
            pool,
            provider,
            max_attempts=max_attempts,
            timeout=timeout,
            auth_header=auth_header,
            auth_scheme=auth_scheme,
            stream_idle_timeout=stream_idle_timeout,
            sse_terminator=sse_terminator,
            attempt_timeout=attempt_timeout,
        )
        self._owns_inner = transport is None
        self.inner = transport or httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        plan = self._plan(request)
        last: httpx2.Response | BaseException | None = None
        while True:
            try:
                lease = await self.pool.acquire(
                    self.provider, timeout=self._wait_budget(plan), exclude=plan.tried
                )
            except NoKeyAvailable:
                if last is None:
                    raise
                break
            self._authorize(request, lease, plan)
            limit = self._attempt_limit(plan)
            _cap_timeouts(request, limit)  # httpx2's own timeouts: free, and enough for a hung key
            hard = limit if self.attempt_timeout is not None else None  # a strict cap costs a scope
            try:
                with _within(hard):
                    response = await self.inner.handle_async_request(request)
            except BaseException as exc:
                exc = _timed_out(exc, request, limit)
                if self._judge(lease, plan, classify_exception(exc)):
                    last = exc
                    continue
                raise exc from None
            outcome = classify_status(response.status_code, response.headers)
            if outcome.kind is OutcomeKind.SUCCESS:
                try:
                    wrapped = await self._wrap(request, response, lease, hard)
                    plan.served(self.provider, lease.key_id)
                    return wrapped
                except _RetryableStreamStart as failed:
                    if self._judge(lease, plan, failed.outcome):
                        last = failed.error
                        continue
                    raise failed.error from None
            if not self._judge(lease, plan, outcome):
                return response
            try:
                await response.aread()  # keep the body: it is the answer if no other key can be had
                last = response
            except Exception as exc:
                last = exc
            finally:
                await response.aclose()
        if isinstance(last, BaseException):
            raise last
        assert last is not None
        return last

    async def _wrap(
        self, request: httpx2.Request, response: httpx2.Response, lease: Lease, limit: float | None
    ) -> httpx2.Response:
        stream = response.stream
        assert isinstance(stream, httpx2.AsyncByteStream)
        chunks = stream.__aiter__()
        whole = _buffers_whole(response)
        body = _Body()
        try:
            # The head of the body (all of a JSON one) counts toward the attempt; the idle timeout
            # guards each chunk only where the attempt has no strict cap of its own or it is a stream.
            idle = None if whole and limit is not None else self.stream_idle_timeout
            with _within(limit):
                while True:
                    with _idle(idle):
                        try:
                            chunk = await chunks.__anext__()
                        except StopAsyncIteration:
                            body.ended = True
                            break
                    if not body.add(chunk, whole):
                        break
        except TimeoutError as exc:  # no data in time: a read timeout, as httpx2 would say
            await stream.aclose()
            stalled = httpx2.ReadTimeout("no data before the attempt's time ran out", request=request)
            raise _RetryableStreamStart(_stream_outcome(stalled), stalled) from exc
        except Exception as exc:
            await stream.aclose()
            raise _RetryableStreamStart(_stream_outcome(exc), exc) from exc
        except BaseException:
            lease.release()  # cancelled before the first byte: free the key, blame nobody
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise
        if body.ended:
            await stream.aclose()
            return body.response(request, response, lease, whole, self._end_check(request, response))
        first = body.prefix()
        wrapped = _LeasedAsyncStream(self, stream, chunks, first, lease, self._end_check(request, response))
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=wrapped,
            extensions=response.extensions,
            request=request,
        )

    async def aclose(self) -> None:
        if self._owns_inner:
            await self.inner.aclose()


class SyncKeyPoolTransport(_Base, httpx2.BaseTransport):
    """The same request path for ``httpx2.Client`` / ``openai.OpenAI`` in threads."""

    def __init__(
        self,
        pool: KeyPool,
        provider: str,
        *,
        transport: httpx2.BaseTransport | None = None,
        max_attempts: int | None = None,
        timeout: float | None = 60.0,
        auth_header: str = "Authorization",
        auth_scheme: str | None = "Bearer",
        sse_terminator: Terminator = None,
        attempt_timeout: float | None = None,
    ) -> None:
        super().__init__(
            pool,
            provider,
            max_attempts=max_attempts,
            timeout=timeout,
            auth_header=auth_header,
            auth_scheme=auth_scheme,
            sse_terminator=sse_terminator,
            attempt_timeout=attempt_timeout,
        )
        self._owns_inner = transport is None
        self.inner = transport or httpx2.HTTPTransport()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        plan = self._plan(request)
        last: httpx2.Response | BaseException | None = None
        while True:
            try:
                lease = self.pool.acquire_sync(
                    self.provider, timeout=self._wait_budget(plan), exclude=plan.tried
                )
            except NoKeyAvailable:
                if last is None:
                    raise
                break
            self._authorize(request, lease, plan)
            _cap_timeouts(request, self._attempt_limit(plan))
            try:
                response = self.inner.handle_request(request)
            except BaseException as exc:
                if self._judge(lease, plan, classify_exception(exc)):
                    last = exc
                    continue
                raise
            outcome = classify_status(response.status_code, response.headers)
            if outcome.kind is OutcomeKind.SUCCESS:
                try:
                    wrapped = self._wrap(request, response, lease)
                    plan.served(self.provider, lease.key_id)
                    return wrapped
                except _RetryableStreamStart as failed:
                    if self._judge(lease, plan, failed.outcome):
                        last = failed.error
                        continue
                    raise failed.error from None
            if not self._judge(lease, plan, outcome):
                return response
            try:
                response.read()  # keep the body: it is the answer if no other key can be had
                last = response
            except Exception as exc:
                last = exc
            finally:
                response.close()
        if isinstance(last, BaseException):
            raise last
        assert last is not None
        return last

    def _wrap(self, request: httpx2.Request, response: httpx2.Response, lease: Lease) -> httpx2.Response:
        stream = response.stream
        assert isinstance(stream, httpx2.SyncByteStream)
        chunks = iter(stream)
        whole = _buffers_whole(response)
        body = _Body()
        try:
            for chunk in chunks:
                if not body.add(chunk, whole):
                    break
            else:
                body.ended = True
        except Exception as exc:
            stream.close()
            raise _RetryableStreamStart(_stream_outcome(exc), exc) from exc
        except BaseException:
            lease.release()
            stream.close()
            raise
        if body.ended:
            stream.close()
            return body.response(request, response, lease, whole, self._end_check(request, response))
        first = body.prefix()
        wrapped = _LeasedSyncStream(self, stream, chunks, first, lease, self._end_check(request, response))
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=wrapped,
            extensions=response.extensions,
            request=request,
        )

    def close(self) -> None:
        if self._owns_inner:
            self.inner.close()


Terminator = bytes | Callable[[httpx2.Request], bytes | None] | None
_MAX_WHOLE = 8 * 1024 * 1024  # JSON bodies up to this size are read whole before they are returned


def _buffers_whole(response: httpx2.Response) -> bool:
    """A JSON answer is read whole inside the transport: a body cut short is then retried on
    another key instead of reaching the caller half-read (the SDK reads it whole anyway).
    Streamed JSON (``application/x-ndjson``, ``json-seq``) is streamed, not buffered."""
    media = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class _Body:
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
        end: _EndCheck,
    ) -> httpx2.Response:
        """The whole body as a finished response and the key's success, or a retryable failure
        if the body cannot be the complete answer (empty or cut JSON, a stream without its end)."""
        content = b"".join(self.chunks)
        problem = None
        if json_body and not _complete_json(content, response):
            problem = "the JSON body ended before it was complete"
        elif end.missing(content):
            problem = "the event stream ended without its terminator"
        if problem is not None:
            cut = httpx2.RemoteProtocolError(problem, request=request)
            raise _RetryableStreamStart(Outcome(OutcomeKind.FAILURE, detail=problem), cut)
        lease.success()
        # The response is ours (the inner transport just made it): swap its body, keep the rest.
        response.stream = httpx2.ByteStream(content)
        return response


def _complete_json(content: bytes, response: httpx2.Response) -> bool:
    """Whether a 2xx JSON body is a whole document. A body whose length the server declared was
    checked by the HTTP layer; one sent without a length is parsed to be sure."""
    if not content.strip():
        return False
    if "content-length" in response.headers:
        return True
    try:
        json.loads(content)
    except ValueError:
        return False
    return True


class _RetryableStreamStart(Exception):
    """A 2xx body failed before its first byte: the request may still go to another key."""

    def __init__(self, outcome: Outcome, error: BaseException) -> None:
        super().__init__(str(error))
        self.outcome = outcome
        self.error = error


def _stream_outcome(exc: BaseException) -> Outcome:
    outcome = classify_exception(exc)
    if outcome.kind is OutcomeKind.IGNORED and isinstance(exc, Exception):
        # Inside the transport, an unexplained error reading the body is the server's doing.
        return Outcome(OutcomeKind.FAILURE, detail=type(exc).__name__)
    return outcome


def _within(seconds: float | None) -> contextlib.AbstractContextManager[object]:
    """A deadline for one attempt (``None``: the SDK's own timeouts only)."""
    return anyio.fail_after(seconds) if seconds is not None else contextlib.nullcontext()


def _timed_out(exc: BaseException, request: httpx2.Request, limit: float | None) -> BaseException:
    """Our own attempt deadline surfaces as httpx2's read timeout, which SDKs know how to report."""
    if isinstance(exc, TimeoutError) and limit is not None:
        return httpx2.ReadTimeout(f"no answer within the attempt's {limit:.3g} s", request=request)
    return exc


def _cap_timeouts(request: httpx2.Request, limit: float | None) -> None:
    """Bound an attempt through httpx2's per-operation timeouts (no read may outlast the deadline)."""
    if limit is None:
        return
    current = dict(request.extensions.get("timeout") or {})
    for name in ("connect", "read", "write", "pool"):
        value = current.get(name)
        current[name] = limit if value is None else min(value, limit)
    request.extensions = {**request.extensions, "timeout": current}


def _idle(seconds: float | None) -> contextlib.AbstractContextManager[object]:
    return anyio.fail_after(seconds) if seconds else contextlib.nullcontext()


_DONE = b"[DONE]"  # the OpenAI-style end-of-stream event


def _is_event_stream(response: httpx2.Response) -> bool:
    return "text/event-stream" in response.headers.get("content-type", "")


class _EndCheck:
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

    def finish(self, lease: Lease) -> None:
        """Record the clean end: success, or a failure if the required marker never came."""
        if self._required is None or self._seen(self._required):
            lease.success()
            return
        lease.failure("stream ended without its terminator")
        marker = self._required.decode(errors="replace")
        raise StreamInterrupted(lease.provider, lease.key_id, f"stream ended without {marker!r}")

    def missing(self, content: bytes) -> bool:
        """Whether a complete body lacks the required terminator."""
        return self._required is not None and self._required not in content[-(len(self._required) + 128) :]

    def closed_early(self, lease: Lease) -> None:
        """The caller closed the body before its end: a success if the stream was complete."""
        if self._event_stream and self._seen(self._required or _DONE):
            lease.success()
        else:
            lease.release()  # a caller closing early blames nobody


_PLAIN_BODY = _EndCheck(None, event_stream=False)  # keeps no state: one serves every plain body


class _LeasedAsyncStream(httpx2.AsyncByteStream):
    """A 2xx body whose end decides the key's outcome."""

    def __init__(
        self,
        owner: KeyPoolTransport,
        stream: httpx2.AsyncByteStream,
        chunks: AsyncIterator[bytes],
        first: bytes | None,
        lease: Lease,
        end: _EndCheck,
    ) -> None:
        self._owner = owner
        self._stream = stream
        self._chunks = chunks
        self._first = first
        self._lease = lease
        self._end = end

    async def __aiter__(self) -> AsyncIterator[bytes]:
        lease = self._lease
        try:
            if self._first is not None:
                first, self._first = self._first, None
                self._end.feed(first)
                yield first
            while True:
                with _idle(self._owner.stream_idle_timeout):
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
            lease.record(_stream_outcome(exc))
            reason = (
                f"no data for {self._owner.stream_idle_timeout} s"
                if isinstance(exc, TimeoutError)
                else type(exc).__name__
            )
            raise StreamInterrupted(lease.provider, lease.key_id, reason) from exc
        self._end.finish(lease)

    async def aclose(self) -> None:
        self._end.closed_early(self._lease)  # no-op after an outcome
        await self._stream.aclose()


class _LeasedSyncStream(httpx2.SyncByteStream):
    def __init__(
        self,
        owner: SyncKeyPoolTransport,
        stream: httpx2.SyncByteStream,
        chunks: Iterator[bytes],
        first: bytes | None,
        lease: Lease,
        end: _EndCheck,
    ) -> None:
        self._owner = owner
        self._stream = stream
        self._chunks = chunks
        self._first = first
        self._lease = lease
        self._end = end

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
            lease.record(_stream_outcome(exc))
            raise StreamInterrupted(lease.provider, lease.key_id, type(exc).__name__) from exc
        self._end.finish(lease)

    def close(self) -> None:
        self._end.closed_early(self._lease)  # no-op after an outcome
        self._stream.close()
