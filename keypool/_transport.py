"""KeyPoolTransport: an ``httpx2`` transport that leases a key for every attempt of a request.

Any SDK that runs on ``httpx2`` (``openai``, ``mcp``) gets pooling, failover and breakers by being
handed a client over this transport. For one request: lease a key -> set its auth header -> send ->
classify -> record -> if the failure is the key's or the server's, close that response and try
another key -> hand back the response. What may be tried next, and within which limits, is the
request's :class:`~keypool._policy.RequestPlan`; this module only carries it out. The body of a
2xx answer is handled by ``_body``: a clean end records success, a break before the first byte is
retried on another key, a break after bytes reached the caller is raised.

A client that knows its caller's settings (the pooled ``openai`` clients) puts them on each
request under ``request.extensions["keypool"]`` (``{"settings": CallSettings, "stream": bool}``);
the deadline is then the request's own timeout (``openai``'s ``timeout=``). Other requests use
the transport's ``timeout`` and settings.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx2

from ._body import (
    Body,
    ErrorMap,
    LeasedAsyncStream,
    LeasedSyncStream,
    RetryableStart,
    Terminator,
    buffers_whole,
    end_check,
    stream_outcome,
    within,
)
from ._budget import current_budget
from ._errors import ConfigError, KeyPoolError, NoKeyAvailable
from ._lease import Lease
from ._outcome import IGNORED, Outcome, OutcomeKind, classify_exception, classify_status
from ._policy import EXTENSION, CallSettings, RequestPlan, capped, deadline_of
from ._pool import KeyPool
from ._sse import Grammar
from ._stream import StreamCall, start_async, start_sync

__all__ = ["KeyPoolTransport", "SyncKeyPoolTransport"]


_CONNECT_FAILURES = frozenset({"ConnectError", "ConnectTimeout"})


def _as_is(error: KeyPoolError, request: httpx2.Request) -> BaseException:
    return error


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
        settings: CallSettings | None = None,
        errors: ErrorMap | None = None,
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"timeout: must be > 0 seconds or None (got {timeout})")
        base = settings or CallSettings()
        overrides: dict[str, Any] = {
            name: value
            for name, value in (
                ("max_attempts", max_attempts),
                ("stream_idle_timeout", stream_idle_timeout),
                ("attempt_timeout", attempt_timeout),
            )
            if value is not None
        }
        self.settings = base.merged(overrides) if overrides else base
        pool.capacity(provider)  # fail fast on an unknown provider
        self.pool = pool
        self.provider = provider
        self.timeout = timeout
        self.auth_header = auth_header
        self.auth_scheme = auth_scheme
        self.sse_terminator = sse_terminator
        self.errors: ErrorMap = errors or _as_is

    @property
    def max_attempts(self) -> int | None:
        return self.settings.max_attempts

    @property
    def attempt_timeout(self) -> float | None:
        return self.settings.attempt_timeout

    @property
    def stream_idle_timeout(self) -> float | None:
        return self.settings.idle_limit(False)

    def _plan(self, request: httpx2.Request) -> RequestPlan:
        given = request.extensions.get(EXTENSION)
        settings = self.settings
        stream = False
        total = self.timeout
        grammar: Grammar | None = None
        exclude: frozenset[str] = frozenset()
        if isinstance(given, dict):  # a client that knows the caller's settings and deadline
            settings = given.get("settings") or settings
            stream = bool(given.get("stream"))
            grammar = given.get("grammar") if stream else None
            exclude = frozenset(given.get("exclude") or ())
            total = deadline_of(request.extensions.get("timeout"))
        shared = current_budget()
        if shared is not None and shared.exhausted():
            spent = NoKeyAvailable(
                self.provider, 0.0, "the request's attempt budget or deadline is spent", reason="budget"
            )
            raise self._refused(spent, request)
        plan = RequestPlan.start(
            self.pool.clock.now(),
            total=total,
            settings=settings,
            keys=self.pool.key_count(self.provider),
            replayable=_replayable(request.stream),
            stream=stream,
            shared=shared,
        )
        plan.exclude = exclude
        plan.grammar = grammar
        return plan

    def _stream_call(self, request: httpx2.Request, plan: RequestPlan, timeout: Any) -> StreamCall | None:
        """How an LLM event stream of this request is read (``None``: not one)."""
        if plan.grammar is None:
            return None
        given = request.extensions.get(EXTENSION)
        clock = self.pool.clock
        return StreamCall(
            request=request,
            grammar=plan.grammar,
            settings=plan.settings,
            errors=self.errors,
            timeout=timeout,
            remaining=lambda: plan.remaining(clock.now()),
            started=given.get("started") or time.monotonic() if isinstance(given, dict) else time.monotonic(),
            continuing=isinstance(given, dict) and bool(given.get("continuing")),
        )

    def _refused(self, refusal: NoKeyAvailable, request: httpx2.Request) -> BaseException:
        refusal.request = request
        return self.errors(refusal, request)

    def _begin(self, request: httpx2.Request, lease: Lease, plan: RequestPlan, timeout: Any) -> bool:
        """Count the attempt, set its key and its limits; ``False`` if no attempt is left for it."""
        if not plan.begin(lease.key_id, self.provider):
            lease.release()
            return False
        secret = lease.secret.get_secret_value()
        request.headers[self.auth_header] = f"{self.auth_scheme} {secret}" if self.auth_scheme else secret
        limits = plan.attempt_limits(self.pool.clock.now(), timeout)
        request.extensions = {**request.extensions, "timeout": limits}
        return True

    def _max_wait(self, plan: RequestPlan) -> float | None:
        if plan.settings.max_wait is None and plan.wait_cap is None:
            return None  # the provider's own, resolved by the pool
        return plan.max_wait(self.pool._provider(self.provider).config.max_wait)

    def _judge(self, lease: Lease, plan: RequestPlan, outcome: Outcome) -> bool:
        """Record a non-success outcome; True if the request should move to another key."""
        now = self.pool.clock.now()
        failed = outcome.kind is OutcomeKind.FAILURE
        if failed and "Timeout" in outcome.detail and plan.at_deadline(outcome.detail):
            outcome = IGNORED  # the caller's own deadline ran out: not the key's fault
        lease.record(outcome)
        # A connect fails before any key is sent: on a shared endpoint another key cannot help, so
        # moving on costs a retry, as the plain client's next connect does.
        healthy = (
            outcome.kind is OutcomeKind.FAILURE
            and not (outcome.detail in _CONNECT_FAILURES and self._shared_endpoint())
            and self.pool.healthy_elsewhere(self.provider, plan.exclude)
        )
        return plan.retry_after(outcome, now, healthy_elsewhere=healthy)

    def _shared_endpoint(self) -> bool:
        return self.pool._provider(self.provider).config.shared_endpoint

    def _out_of_attempts(self, request: httpx2.Request) -> BaseException:
        spent = NoKeyAvailable(self.provider, 0.0, "the request's attempt budget is spent", reason="budget")
        return self._refused(spent, request)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(provider={self.provider!r})"


def _replayable(stream: object) -> bool:
    """Whether a request body can be sent again: bytes, or a multipart form whose files can be
    read again (``httpx2`` rewinds each seekable file when it renders the form)."""
    if isinstance(stream, httpx2.ByteStream):
        return True
    fields = getattr(stream, "fields", None)
    if type(stream).__name__ != "MultipartStream" or fields is None:
        return False
    for part in fields:
        file = getattr(part, "file", None)
        if (
            file is not None
            and not isinstance(file, bytes | str)
            and not callable(getattr(file, "seek", None))
        ):
            return False
    return True


def _scannable(response: httpx2.Response, kind: type) -> bool:
    """Whether a 2xx answer is an event stream to read with its grammar."""
    stream = response.stream
    return isinstance(stream, kind) and "text/event-stream" in response.headers.get("content-type", "")


def _cap_reads(request: httpx2.Request, settings: CallSettings, *, sync: bool) -> None:
    """An LLM stream's stall limit is the attempt's read timeout (``httpx2``'s timer costs nothing
    per chunk). A sync stream has no timer for its first token either: its reads are no longer."""
    limits = dict(request.extensions.get("timeout") or {})
    read = limits.get("read")
    caps = (settings.idle_limit(True), settings.first_token_timeout) if sync else (settings.idle_limit(True),)
    for cap in caps:
        read = capped(read, cap)
    limits["read"] = read
    request.extensions = {**request.extensions, "timeout": limits}


def _timed_out(exc: BaseException, request: httpx2.Request, limit: float | None) -> BaseException:
    """Our own attempt deadline surfaces as httpx2's read timeout, which SDKs know how to report."""
    if isinstance(exc, TimeoutError) and limit is not None:
        return httpx2.ReadTimeout(f"no answer within the attempt's {limit:.3g} s", request=request)
    return exc


class KeyPoolTransport(_Base, httpx2.AsyncBaseTransport):
    """The async transport. ``transport`` is where requests really go (default: a new
    ``httpx2.AsyncHTTPTransport``, closed with this one; a transport you pass is yours to close,
    unless ``close_inner=True``). ``errors`` turns a refusal or a broken stream into the exception
    the caller should see (the pooled ``openai`` clients raise ``openai``'s own).
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
        settings: CallSettings | None = None,
        errors: ErrorMap | None = None,
        close_inner: bool | None = None,
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
            settings=settings,
            errors=errors,
        )
        self._owns_inner = transport is None if close_inner is None else close_inner
        self.inner = transport or httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        plan = self._plan(request)
        timeout = request.extensions.get("timeout")
        call = self._stream_call(request, plan, timeout)
        clock = self.pool.clock
        last: httpx2.Response | BaseException | None = None
        while True:
            if plan.pause_due:
                pause = plan.take_pause(clock.now())
                if pause is None:
                    break
                await clock.sleep(pause)
            try:
                lease = await self.pool.acquire(
                    self.provider,
                    timeout=plan.remaining(clock.now()),
                    exclude=plan.exclude,
                    max_wait=self._max_wait(plan),
                )
            except NoKeyAvailable as refusal:
                if last is None:
                    raise self._refused(refusal, request) from None
                delay = plan.look_again(clock.now())
                if delay is None:
                    break
                if delay:
                    await clock.sleep(delay)
                continue
            if not self._begin(request, lease, plan, timeout):
                if last is None:
                    raise self._out_of_attempts(request)
                break
            if call is not None:
                _cap_reads(request, plan.settings, sync=False)
            hard = plan.hard_limit(clock.now())
            sent = time.monotonic()
            try:
                with within(hard):
                    response = await self.inner.handle_async_request(request)
            except BaseException as exc:
                exc = _timed_out(exc, request, hard)
                if self._judge(lease, plan, classify_exception(exc)):
                    last = exc
                    continue
                raise exc from None
            outcome = classify_status(response.status_code, response.headers)
            if outcome.kind is OutcomeKind.SUCCESS:
                try:
                    if call is not None and _scannable(response, httpx2.AsyncByteStream):
                        wrapped = await start_async(
                            call, response, lease, sent, self.handle_async_request, hard
                        )
                    else:
                        wrapped = await self._wrap(request, response, lease, plan, hard)
                except RetryableStart as failed:
                    if self._judge(lease, plan, failed.outcome):
                        last = failed.error
                        continue
                    raise failed.error from None
                if plan.shared is not None:
                    plan.shared.served_by = (self.provider, lease.key_id)
                return wrapped
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
        self,
        request: httpx2.Request,
        response: httpx2.Response,
        lease: Lease,
        plan: RequestPlan,
        limit: float | None,
    ) -> httpx2.Response:
        stream = response.stream
        if not isinstance(stream, httpx2.AsyncByteStream):  # nothing to watch: the answer is here
            lease.success()
            return response
        chunks = stream.__aiter__()
        whole = buffers_whole(response)
        body = Body()
        idle_setting = plan.settings.idle_limit(False)
        try:
            # The head of the body (all of a JSON one) counts toward the attempt; the idle timeout
            # guards each chunk only where the attempt has no strict cap of its own or it is a stream.
            idle = None if whole and limit is not None else idle_setting
            with within(limit):
                while True:
                    with within(idle):
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
            raise RetryableStart(stream_outcome(stalled), stalled) from exc
        except Exception as exc:
            await stream.aclose()
            raise RetryableStart(stream_outcome(exc), exc) from exc
        except BaseException:
            lease.release()  # cancelled before the first byte: free the key, blame nobody
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise
        end = end_check(request, response, self.sse_terminator)
        if body.ended:
            await stream.aclose()
            return body.response(request, response, lease, whole, end)
        wrapped = LeasedAsyncStream(
            request, stream, chunks, body.prefix(), lease, end, idle_setting, self.errors
        )
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
        settings: CallSettings | None = None,
        errors: ErrorMap | None = None,
        close_inner: bool | None = None,
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
            settings=settings,
            errors=errors,
        )
        self._owns_inner = transport is None if close_inner is None else close_inner
        self.inner = transport or httpx2.HTTPTransport()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        plan = self._plan(request)
        timeout = request.extensions.get("timeout")
        call = self._stream_call(request, plan, timeout)
        clock = self.pool.clock
        last: httpx2.Response | BaseException | None = None
        while True:
            if plan.pause_due:
                pause = plan.take_pause(clock.now())
                if pause is None:
                    break
                clock.sleep_sync(pause)
            try:
                lease = self.pool.acquire_sync(
                    self.provider,
                    timeout=plan.remaining(clock.now()),
                    exclude=plan.exclude,
                    max_wait=self._max_wait(plan),
                )
            except NoKeyAvailable as refusal:
                if last is None:
                    raise self._refused(refusal, request) from None
                delay = plan.look_again(clock.now())
                if delay is None:
                    break
                if delay:
                    clock.sleep_sync(delay)
                continue
            if not self._begin(request, lease, plan, timeout):
                if last is None:
                    raise self._out_of_attempts(request)
                break
            if call is not None:
                _cap_reads(request, plan.settings, sync=True)
            sent = time.monotonic()
            hard = plan.hard_limit(clock.now())
            if hard is not None:  # no task to cancel here: attempt_timeout caps every phase instead
                limits = request.extensions["timeout"]
                request.extensions["timeout"] = {
                    phase: capped(value, hard) for phase, value in limits.items()
                }
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
                    if call is not None and _scannable(response, httpx2.SyncByteStream):
                        wrapped = start_sync(call, response, lease, sent, self.handle_request)
                    else:
                        wrapped = self._wrap(request, response, lease)
                except RetryableStart as failed:
                    if self._judge(lease, plan, failed.outcome):
                        last = failed.error
                        continue
                    raise failed.error from None
                if plan.shared is not None:
                    plan.shared.served_by = (self.provider, lease.key_id)
                return wrapped
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
        if not isinstance(stream, httpx2.SyncByteStream):
            lease.success()
            return response
        chunks = iter(stream)
        whole = buffers_whole(response)
        body = Body()
        try:
            for chunk in chunks:
                if not body.add(chunk, whole):
                    break
            else:
                body.ended = True
        except Exception as exc:
            stream.close()
            raise RetryableStart(stream_outcome(exc), exc) from exc
        except BaseException:
            lease.release()
            stream.close()
            raise
        end = end_check(request, response, self.sse_terminator)
        if body.ended:
            stream.close()
            return body.response(request, response, lease, whole, end)
        wrapped = LeasedSyncStream(request, stream, chunks, body.prefix(), lease, end, self.errors)
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
