"""The outcome table: what a status, a header or an exception means for the key that made the call."""

from __future__ import annotations

import asyncio
import math
from email.utils import formatdate

import anyio
import httpx2
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keypool import Outcome, OutcomeKind, classify_exception, classify_status, parse_retry_after

NOW = 1_750_000_000.0  # a wall-clock instant for date and epoch headers
URL = "https://api.example.test/v1/chat/completions"

SUCCESS, THROTTLED, REJECTED = OutcomeKind.SUCCESS, OutcomeKind.THROTTLED, OutcomeKind.REJECTED
EXHAUSTED, FAILURE, CALLER_ERROR, IGNORED = (
    OutcomeKind.EXHAUSTED,
    OutcomeKind.FAILURE,
    OutcomeKind.CALLER_ERROR,
    OutcomeKind.IGNORED,
)


# ---------------------------------------------------------------------------------- statuses

TABLE = [
    *[(s, SUCCESS) for s in (200, 201, 202, 204, 206, 299)],
    (429, THROTTLED),
    (401, REJECTED),
    (403, REJECTED),
    (402, EXHAUSTED),
    *[(s, FAILURE) for s in (408, 500, 501, 502, 503, 504, 529, 599)],
    *[(s, CALLER_ERROR) for s in (400, 404, 405, 409, 410, 413, 415, 418, 422, 451, 499)],
]


@pytest.mark.parametrize(("status", "kind"), TABLE)
def test_status_table(status: int, kind: OutcomeKind) -> None:
    outcome = classify_status(status)
    assert outcome.kind is kind
    assert outcome.status == status


@pytest.mark.parametrize(
    ("kind", "retry"),
    [
        (SUCCESS, False),
        (THROTTLED, True),
        (REJECTED, True),
        (EXHAUSTED, True),
        (FAILURE, True),
        (CALLER_ERROR, False),
        (IGNORED, False),
    ],
)
def test_which_kinds_retry_on_another_key(kind: OutcomeKind, retry: bool) -> None:
    assert kind.retry_elsewhere is retry


def test_429_carries_its_retry_after() -> None:
    assert classify_status(429, {"Retry-After": "30"}) == Outcome(THROTTLED, 429, 30.0)
    assert classify_status(429) == Outcome(THROTTLED, 429, None)
    assert classify_status(429, httpx2.Headers({"retry-after-ms": "1500"})).retry_after == 1.5


def test_retry_after_is_read_only_for_429() -> None:
    assert classify_status(503, {"retry-after": "30"}).retry_after is None


# ---------------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "30"}, 30.0),
        ({"Retry-After": "30"}, 30.0),
        ({"retry-after": " 7 "}, 7.0),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": formatdate(NOW + 120, usegmt=True)}, 120.0),
        ({"retry-after": formatdate(NOW - 120, usegmt=True)}, 0.0),  # already passed: go now
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250.5"}, 0.2505),
        ({"retry-after-ms": "250", "retry-after": "30"}, 0.25),  # the precise one wins
        ({"retry-after-ms": "soon", "retry-after": "30"}, 30.0),  # a broken one is skipped
        ({"retry-after-ms": "-5", "retry-after": "30"}, 30.0),
        ({"x-ratelimit-reset-requests": "6m0s"}, 360.0),
        ({"x-ratelimit-reset-requests": "20ms"}, 0.02),
        ({"x-ratelimit-reset-requests": "1s"}, 1.0),
        ({"x-ratelimit-reset-tokens": "1h2m3.5s"}, 3723.5),
        ({"x-ratelimit-reset-requests": "1.5"}, 1.5),
        ({"x-ratelimit-reset": "17"}, 17.0),
        ({"x-ratelimit-reset": str(int(NOW + 42))}, 42.0),  # epoch seconds
        ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),  # longest
        ({"x-ratelimit-reset-requests": "bogus", "x-ratelimit-reset-tokens": "3s"}, 3.0),
        ({"retry-after": "5", "x-ratelimit-reset-tokens": "6m0s"}, 5.0),  # retry-after first
    ],
)
def test_retry_after_forms(headers: dict[str, str], seconds: float) -> None:
    assert parse_retry_after(headers, now=NOW) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"retry-after": ""},
        {"retry-after": "soon"},
        {"retry-after": "-5"},
        {"retry-after": "-0.1"},
        {"retry-after": "nan"},
        {"retry-after": "NaN"},
        {"retry-after": "inf"},
        {"retry-after": "-inf"},
        {"retry-after": "1e999"},
        {"retry-after": "Wed, 32 Oct 2015 07:28:00 GMT"},
        {"retry-after": "Wed, 21 Oct 2015 07:28:00"},  # no zone: ambiguous
        {"retry-after-ms": "nan"},
        {"retry-after-ms": "-250"},
        {"retry-after-ms": "inf"},
        {"x-ratelimit-reset-requests": "6m0x"},
        {"x-ratelimit-reset-requests": "m"},
        {"x-ratelimit-reset-requests": "5 s"},
        {"x-ratelimit-reset-requests": "-5"},
        {"x-ratelimit-reset-requests": "-1s"},
        {"x-ratelimit-reset-requests": "nan"},
        {"x-ratelimit-reset-requests": "inf"},
        {"x-ratelimit-reset-requests": ""},
        {"x-ratelimit-reset": str(int(NOW - 42))},  # an epoch in the past
        {"x-ratelimit-limit-requests": "60"},  # not a reset header
    ],
)
def test_unusable_retry_after_is_none(headers: dict[str, str]) -> None:
    assert parse_retry_after(headers, now=NOW) is None


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(
        ["retry-after", "retry-after-ms", "x-ratelimit-reset-requests", "x-ratelimit-reset"]
    ),
    value=st.one_of(
        st.text(max_size=40),
        st.from_regex(r"-?[0-9]{0,400}(\.[0-9]*)?(ms|h|m|s|e[+-]?[0-9]{1,4})?", fullmatch=True),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
    ),
)
def test_retry_after_never_raises_and_is_finite(name: str, value: str) -> None:
    result = parse_retry_after({name: value}, now=NOW)
    assert result is None or (math.isfinite(result) and result >= 0)


# ---------------------------------------------------------------------------------- exceptions


def _request() -> httpx2.Request:
    return httpx2.Request("POST", URL)


@pytest.mark.parametrize(
    "exc",
    [
        httpx2.ConnectError("refused", request=_request()),
        httpx2.ConnectTimeout("slow", request=_request()),
        httpx2.ReadTimeout("slow", request=_request()),
        httpx2.WriteTimeout("slow", request=_request()),
        httpx2.PoolTimeout("slow", request=_request()),
        httpx2.ReadError("reset", request=_request()),
        httpx2.WriteError("reset", request=_request()),
        httpx2.RemoteProtocolError("peer closed", request=_request()),
        TimeoutError(),
        ConnectionResetError(),
        ConnectionRefusedError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_network_trouble_is_a_failure(exc: BaseException) -> None:
    outcome = classify_exception(exc)
    assert outcome.kind is FAILURE
    assert outcome.detail == type(exc).__name__


def _status_error(
    cls: type[openai.APIStatusError], status: int, headers: dict[str, str] | None = None
) -> openai.APIStatusError:
    response = httpx2.Response(status, headers=headers, json={"error": {"message": "x"}}, request=_request())
    return cls("upstream said no", response=response, body={"error": {"message": "x"}})


@pytest.mark.parametrize(
    ("cls", "status", "kind"),
    [
        (openai.BadRequestError, 400, CALLER_ERROR),
        (openai.AuthenticationError, 401, REJECTED),
        (openai.APIStatusError, 402, EXHAUSTED),
        (openai.PermissionDeniedError, 403, REJECTED),
        (openai.NotFoundError, 404, CALLER_ERROR),
        (openai.APIStatusError, 408, FAILURE),
        (openai.ConflictError, 409, CALLER_ERROR),
        (openai.UnprocessableEntityError, 422, CALLER_ERROR),
        (openai.RateLimitError, 429, THROTTLED),
        (openai.InternalServerError, 500, FAILURE),
        (openai.InternalServerError, 503, FAILURE),
    ],
)
def test_openai_status_errors_are_classified_by_status(
    cls: type[openai.APIStatusError], status: int, kind: OutcomeKind
) -> None:
    exc = _status_error(cls, status)
    assert exc.status_code == status
    outcome = classify_exception(exc)
    assert (outcome.kind, outcome.status) == (kind, status)


def test_openai_rate_limit_error_carries_retry_after() -> None:
    exc = _status_error(openai.RateLimitError, 429, {"retry-after": "12"})
    assert classify_exception(exc) == Outcome(THROTTLED, 429, 12.0)


@pytest.mark.parametrize(
    "exc",
    [openai.APIConnectionError(request=_request()), openai.APITimeoutError(request=_request())],
    ids=lambda e: type(e).__name__,
)
def test_openai_connection_errors_are_failures(exc: BaseException) -> None:
    assert classify_exception(exc).kind is FAILURE


@pytest.mark.parametrize(
    ("status", "kind"), [(503, FAILURE), (429, THROTTLED), (401, REJECTED), (404, CALLER_ERROR)]
)
def test_raise_for_status_errors_are_classified_by_status(status: int, kind: OutcomeKind) -> None:
    response = httpx2.Response(status, headers={"retry-after": "3"}, request=_request())
    with pytest.raises(httpx2.HTTPStatusError) as info:
        response.raise_for_status()
    outcome = classify_exception(info.value)
    assert (outcome.kind, outcome.status) == (kind, status)


@pytest.mark.parametrize(
    "exc",
    [
        asyncio.CancelledError(),
        KeyboardInterrupt(),
        SystemExit(1),
        GeneratorExit(),
        ValueError("a bug in the caller"),
        KeyError("x"),
        RuntimeError("x"),
        AssertionError(),
        openai.OpenAIError("not an HTTP error"),
        httpx2.UnsupportedProtocol("ftp://", request=_request()),
    ],
    ids=lambda e: type(e).__name__,
)
def test_cancellation_and_unknown_errors_are_ignored(exc: BaseException) -> None:
    assert classify_exception(exc).kind is IGNORED


def test_a_status_code_attribute_alone_is_not_trusted() -> None:
    class Weird(Exception):
        status_code = 503

    assert classify_exception(Weird()).kind is IGNORED


@pytest.mark.anyio
async def test_anyio_cancellation_is_ignored() -> None:
    caught: list[BaseException] = []
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await anyio.sleep(1)
        except anyio.get_cancelled_exc_class() as exc:
            caught.append(exc)
            raise
    assert caught
    assert classify_exception(caught[0]).kind is IGNORED
