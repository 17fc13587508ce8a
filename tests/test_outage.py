"""The outage path, side by side with the plain ``openai`` client.

For every outage, hang, throttle and broken stream, the plain ``openai.AsyncOpenAI`` and the pooled
``AsyncDeepSeek`` meet the same faulty ``FakeUpstream`` over a loopback socket, with the same
``timeout`` and ``max_retries``. keypool must never keep the caller longer, and never raise another
exception family. "Longer" is judged without a stopwatch: by what each client may spend, read from
the limits each attempt was sent with (a recording transport under both clients), the backoffs
keypool slept (its pool runs on a ``FakeClock``) against the ones the plain client makes between
its attempts, and the attempts each key received (``FakeUpstream.counters``).
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import openai
import pytest

import keypool
from keypool import ConfigError, KeyPool, KeySpec
from keypool.testing import FakeClock, FakeUpstream, Fault, LoopbackServer
from providers import AsyncDeepSeek, AsyncPooledOpenAI, DeepSeek, NoKeyAvailableError, StreamInterruptedError
from tests.upstreams import Swap, messages

KEYS = {
    "alpha": "sk-outage-alpha-7d1e03b2",
    "bravo": "sk-outage-bravo-41c9e8a0",
    "charlie": "sk-outage-charlie-0b5f62d7",
}
PLAIN = "sk-outage-plain-4c2b19e6"
MODEL = "deepseek-chat"
FIRST_BACKOFF, MAX_BACKOFF = 0.5, 8.0  # openai's INITIAL_RETRY_DELAY and MAX_RETRY_DELAY


def plain_backoff_floor(retries: int) -> float:
    """The least the plain client sleeps over ``retries`` retries (its backoff, less 25 % jitter)."""
    return sum(0.75 * min(FIRST_BACKOFF * 2.0**n, MAX_BACKOFF) for n in range(retries))


class Recording(httpx2.AsyncBaseTransport):
    """A real HTTP transport that remembers the timeouts every attempt was sent with."""

    def __init__(self) -> None:
        self.inner = httpx2.AsyncHTTPTransport()
        self.limits: list[dict[str, float | None]] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.limits.append(dict(request.extensions.get("timeout") or {}))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def spent(self, phase: str) -> float:
        """The most every attempt together could have waited in ``phase``."""
        total = 0.0
        for limits in self.limits:
            value = limits.get(phase)
            assert value is not None, f"an attempt without a {phase} limit: {limits}"
            total += value
        return total


@dataclass
class Pair:
    """The plain client (one key) and the pooled one (three keys) over the same upstream."""

    upstream: FakeUpstream
    clock: FakeClock | None
    pool: KeyPool
    pooled: AsyncDeepSeek
    plain: openai.AsyncOpenAI
    pooled_wire: Recording
    plain_wire: Recording
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def pooled_requests(self) -> int:
        return sum(self.upstream.counters(secret).requests for secret in KEYS.values())

    def plain_requests(self) -> int:
        return self.upstream.counters(PLAIN).requests

    def per_key(self) -> dict[str, int]:
        return {key_id: self.upstream.counters(secret).requests for key_id, secret in KEYS.items()}

    def slept(self) -> list[float]:
        assert self.clock is not None
        return self.clock.slept


@pytest.fixture
async def make_pair(loopback: tuple[Swap, LoopbackServer]) -> AsyncIterator[Callable[..., Pair]]:
    swap, server = loopback
    made: list[Pair] = []

    def build(
        *,
        fake_clock: bool = True,
        base_url: str | None = None,
        pooled_only: Any = None,
        max_concurrency: int | None = None,
        **common: Any,
    ) -> Pair:
        upstream = FakeUpstream([*KEYS.values(), PLAIN], flavor="deepseek")
        swap.app = upstream
        url = base_url or server.base_url
        clock = FakeClock() if fake_clock else None
        pool = KeyPool(clock=clock, seed=11)
        pool.add_provider(
            {
                "name": "deepseek",
                "keys": [
                    KeySpec(secret=s, key_id=k, max_concurrency=max_concurrency) for k, s in KEYS.items()
                ],
            }
        )
        pooled_wire, plain_wire = Recording(), Recording()
        pooled = AsyncDeepSeek(
            pool=pool, base_url=url, transport=pooled_wire, **common, **(pooled_only or {})
        )
        plain = openai.AsyncOpenAI(
            api_key=PLAIN, base_url=url, http_client=httpx2.AsyncClient(transport=plain_wire), **common
        )
        pair = Pair(upstream, clock, pool, pooled, plain, pooled_wire, plain_wire)
        pair.closers += [pooled.close, plain.close, pooled_wire.aclose]
        made.append(pair)
        return pair

    yield build
    for pair in made:
        for close in pair.closers:
            await close()


async def chat(client: openai.AsyncOpenAI, text: str = "hello", **options: Any) -> str:
    reply = await client.chat.completions.create(model=MODEL, messages=messages(text), **options)
    return reply.choices[0].message.content or ""


async def stream_chat(client: openai.AsyncOpenAI, text: str = "one two three four five") -> str:
    parts: list[str] = []
    async with await client.chat.completions.create(
        model=MODEL, messages=messages(text), stream=True
    ) as chunks:
        async for chunk in chunks:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
    return "".join(parts)


async def failure(call: Awaitable[Any]) -> BaseException:
    try:
        await call
    except Exception as exc:
        return exc
    raise AssertionError("the call was expected to fail")


def same_family(pooled: BaseException, plain: BaseException) -> None:
    """keypool raised what ``except <the plain client's exception class>`` catches."""
    assert isinstance(pooled, openai.APIError), repr(pooled)
    assert isinstance(pooled, type(plain)), (
        f"plain raised {type(plain).__mro__}, keypool {type(pooled).__mro__}"
    )


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """A loopback port whose accept queue is full: a connect there is never answered."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@contextlib.contextmanager
def refused_port() -> Iterator[str]:
    """A loopback port nothing listens on: every connect is refused."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    yield f"http://127.0.0.1:{port}"


# -- outage: every key answers 5xx ----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("retries", [0, 2])
async def test_an_outage_fails_as_the_plain_client_fails_and_never_backs_off_longer(
    make_pair: Callable[..., Pair], retries: int
) -> None:
    pair = make_pair(max_retries=retries)
    pair.upstream.set_default_fault(Fault.status(503))

    plain = await failure(chat(pair.plain))
    pooled = await failure(chat(pair.pooled))

    assert isinstance(plain, openai.InternalServerError)
    same_family(pooled, plain)
    assert pair.plain_requests() == retries + 1
    # keypool's backoffs are openai's, and never more of them: at most one per retry.
    assert len(pair.slept()) <= retries
    assert sum(pair.slept()) <= sum(min(FIRST_BACKOFF * 2.0**n, MAX_BACKOFF) for n in range(retries))
    # No key is asked more often than the plain client asks its one key.
    assert max(pair.per_key().values()) <= pair.plain_requests()
    assert pair.pooled_requests() <= len(KEYS) + retries


@pytest.mark.anyio
@pytest.mark.parametrize("retries", [0, 1])
async def test_max_retries_on_one_key_means_what_it_means_for_the_plain_client(
    loopback: tuple[Swap, LoopbackServer], retries: int
) -> None:
    swap, server = loopback
    upstream = swap.app = FakeUpstream([KEYS["alpha"], PLAIN], flavor="deepseek")
    upstream.set_default_fault(Fault.status(500))
    plain = openai.AsyncOpenAI(api_key=PLAIN, base_url=server.base_url, max_retries=retries)
    pooled = AsyncDeepSeek(api_key=KEYS["alpha"], base_url=server.base_url, max_retries=retries)
    try:
        plain_error = await failure(chat(plain))
        pooled_error = await failure(chat(pooled))
    finally:
        await plain.close()
        await pooled.close()
    same_family(pooled_error, plain_error)
    assert upstream.counters(KEYS["alpha"]).requests == upstream.counters(PLAIN).requests == retries + 1
    assert pooled.max_retries == plain.max_retries == retries


@pytest.mark.anyio
async def test_thirty_callers_after_an_outage_are_refused_at_once_as_the_plain_client_fails(
    make_pair: Callable[..., Pair],
) -> None:
    pair = make_pair()
    pair.upstream.set_default_fault(Fault.status(503))
    plain = await failure(chat(pair.plain))
    while pair.pool.capacity("deepseek").status != "down":  # failures until the provider is out
        await failure(chat(pair.pooled))
    pair.upstream.reset_counters()
    slept = len(pair.slept())

    errors: list[BaseException] = []

    async def one() -> None:
        errors.append(await failure(chat(pair.pooled)))

    async with anyio.create_task_group() as group:
        for _ in range(30):
            group.start_soon(one)

    assert len(errors) == 30
    for error in errors:
        same_family(error, plain)
        assert isinstance(error, keypool.NoKeyAvailable)
        assert isinstance(error, openai.InternalServerError)
        assert error.status_code == 503
        assert float(error.response.headers["retry-after"]) > 0
        assert error.retry_after is not None
        assert error.retry_after > 0
    assert pair.pooled_requests() == 0  # refused without a request
    assert len(pair.slept()) == slept  # and without waiting


# -- every key throttled or rejected: refused at once, in openai's own classes ------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fault", "expected", "retry_after"),
    [
        (Fault.rate_limited(30), openai.RateLimitError, True),
        (Fault.rejected(), openai.AuthenticationError, False),
        (Fault.forbidden(), openai.PermissionDeniedError, False),
    ],
    ids=["throttled", "rejected", "forbidden"],
)
async def test_thirty_callers_on_throttled_or_rejected_keys_are_refused_at_once(
    make_pair: Callable[..., Pair], fault: Fault, expected: type[Exception], retry_after: bool
) -> None:
    pair = make_pair(max_retries=0)
    pair.upstream.set_default_fault(fault)
    plain = await failure(chat(pair.plain))
    assert isinstance(plain, expected)
    while pair.pool.capacity("deepseek").status != "down":  # each key answers once, then is out
        same_family(await failure(chat(pair.pooled)), plain)
    assert pair.per_key() == {key_id: 1 for key_id in KEYS}
    pair.upstream.reset_counters()

    errors: list[BaseException] = []

    async def one() -> None:
        errors.append(await failure(chat(pair.pooled)))

    async with anyio.create_task_group() as group:
        for _ in range(30):
            group.start_soon(one)

    assert len(errors) == 30
    for error in errors:
        same_family(error, plain)
        assert isinstance(error, NoKeyAvailableError)
        assert error.provider == "deepseek"
        assert error.request.url.path.endswith("/chat/completions")
        assert isinstance(error, openai.APIStatusError)
        assert error.status_code == getattr(plain, "status_code", None)
        if retry_after:
            assert float(error.response.headers["retry-after"]) > 0
    assert pair.pooled_requests() == 0
    assert pair.slept() == []


# -- a hang: the caller's timeout bounds the whole call ---------------------------------------------


TIMEOUT_PLACES = ["constructor", "with_options", "per_call"]


@pytest.mark.anyio
@pytest.mark.parametrize("where", TIMEOUT_PLACES)
async def test_a_hung_upstream_fails_within_the_callers_timeout(
    make_pair: Callable[..., Pair], where: str
) -> None:
    timeout = 0.5
    # A real clock: the deadline is the caller's, measured by the pool as the call goes on.
    pair = make_pair(
        fake_clock=False, max_retries=0, **({"timeout": timeout} if where == "constructor" else {})
    )
    pair.upstream.set_default_fault(Fault.hang())
    pooled: Any = pair.pooled
    options: dict[str, Any] = {}
    if where == "with_options":
        pooled = pair.pooled.with_options(timeout=timeout)
    elif where == "per_call":
        options = {"timeout": timeout}
    plain_client = pair.plain.with_options(timeout=timeout)

    plain = await failure(chat(plain_client))
    error = await failure(chat(pooled, **options))

    assert isinstance(plain, openai.APITimeoutError)
    same_family(error, plain)
    assert pair.plain_wire.spent("read") == pytest.approx(timeout)
    # Every attempt keypool made could wait, all together, no longer than the caller's timeout.
    assert pair.pooled_wire.spent("read") <= timeout + 1e-6
    assert 1 <= pair.pooled_requests() <= len(KEYS)


@pytest.mark.anyio
async def test_a_silent_key_is_failed_over_within_the_default_limits(
    make_pair: Callable[..., Pair], loopback: tuple[Swap, LoopbackServer]
) -> None:
    pair = make_pair(fake_clock=False, timeout=1.0, max_retries=0)
    for secret in (KEYS["alpha"], PLAIN):
        pair.upstream.set_fault(secret, Fault.hang())
    plain = await failure(chat(pair.plain))
    assert isinstance(plain, openai.APITimeoutError)  # the plain client's one key is silent
    # The generic client's defaults: a silent key may keep a call for half of its deadline.
    pooled = AsyncPooledOpenAI(
        provider="deepseek",
        pool=pair.pool,
        base_url=loopback[1].base_url,
        transport=pair.pooled_wire,
        timeout=1.0,
    )
    pair.closers.append(pooled.close)
    for n in range(40):
        assert await chat(pooled, f"n{n}") == f"n{n}"
        if pair.upstream.counters(KEYS["alpha"]).hangs:
            break
    assert pair.upstream.counters(KEYS["alpha"]).hangs == 1
    assert all(
        limits["read"] is not None and limits["read"] <= 0.5 + 1e-6 for limits in pair.pooled_wire.limits
    )


# -- connect refused, connect black-holed ------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("retries", [0, 2])
async def test_a_refused_connect_fails_as_the_plain_client_fails_with_no_more_connects(
    make_pair: Callable[..., Pair], retries: int
) -> None:
    with refused_port() as url:
        pair = make_pair(base_url=url, max_retries=retries)
        plain = await failure(chat(pair.plain))
        pooled = await failure(chat(pair.pooled))
    assert isinstance(plain, openai.APIConnectionError)
    same_family(pooled, plain)
    # A connect fails before any key is sent: another key cannot help, so it costs a retry.
    assert len(pair.pooled_wire.limits) <= len(pair.plain_wire.limits) == retries + 1
    assert len(pair.slept()) <= retries


@pytest.mark.anyio
@pytest.mark.parametrize("retries", [0, 1])
async def test_a_black_holed_connect_fails_as_the_plain_client_fails_and_never_later(
    make_pair: Callable[..., Pair], retries: int
) -> None:
    timeout = httpx2.Timeout(5.0, connect=0.2)
    with black_hole() as url:
        pair = make_pair(base_url=url, max_retries=retries, timeout=timeout)
        plain = await failure(chat(pair.plain))
        pooled = await failure(chat(pair.pooled))
    assert isinstance(plain, openai.APITimeoutError)
    same_family(pooled, plain)
    plain_most = pair.plain_wire.spent("connect") + plain_backoff_floor(retries)
    pooled_most = pair.pooled_wire.spent("connect") + sum(pair.slept())
    assert pooled_most <= plain_most + 1e-6
    # As many connects as the plain client's, each a failure of the endpoint (not the caller's
    # deadline: the connect limit was far shorter).
    assert len(pair.pooled_wire.limits) == len(pair.plain_wire.limits) == retries + 1
    failures = sum(pair.pool.key_stats(key_id, "deepseek")["total_failures"] for key_id in KEYS)
    assert failures == retries + 1
    assert pair.pooled_requests() == 0  # nothing ever reached an upstream


# -- throttles ----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_short_retry_after_is_waited_for_no_longer_than_the_plain_client_waits(
    make_pair: Callable[..., Pair],
) -> None:
    pair = make_pair(max_retries=1)
    pair.upstream.set_default_fault(Fault.rate_limited(0.2))
    plain = await failure(chat(pair.plain))
    pooled = await failure(chat(pair.pooled))
    assert isinstance(plain, openai.RateLimitError)
    same_family(pooled, plain)
    assert pair.plain_requests() == 2  # it waited the 0.2 s once and asked again
    assert sum(pair.slept()) <= 0.2 + 1e-9
    assert max(pair.per_key().values()) <= pair.plain_requests()


@pytest.mark.anyio
@pytest.mark.parametrize("retries", [0, 2])
async def test_a_throttle_without_retry_after_is_never_waited_for_longer_than_openais_backoff(
    make_pair: Callable[..., Pair], retries: int
) -> None:
    pair = make_pair(max_retries=retries)
    pair.upstream.set_default_fault(Fault.rate_limited(None))
    plain = await failure(chat(pair.plain))
    pooled = await failure(chat(pair.pooled))
    assert isinstance(plain, openai.RateLimitError)
    same_family(pooled, plain)
    assert pair.plain_requests() == retries + 1
    assert sum(pair.slept()) <= plain_backoff_floor(retries) + 1e-9
    assert max(pair.per_key().values()) <= pair.plain_requests()


@pytest.mark.anyio
@pytest.mark.parametrize("retries", [0, 2])
async def test_keys_throttled_without_retry_after_are_not_waited_for_by_the_next_calls(
    make_pair: Callable[..., Pair], retries: int
) -> None:
    """Every key has had a 429 without Retry-After: its end (``default_retry_after``) is only a
    guess. The next calls are refused at once, as the plain client's 429 would be after its first
    backoff at the latest, instead of waiting out the guess."""
    pair = make_pair(max_retries=retries)
    pair.upstream.set_default_fault(Fault.rate_limited(None))
    plain = await failure(chat(pair.plain))
    while pair.pool.capacity("deepseek").status != "down":
        same_family(await failure(chat(pair.pooled)), plain)
    before, slept = pair.pooled_requests(), len(pair.slept())
    for _ in range(3):
        refused = await failure(chat(pair.pooled))
        same_family(refused, plain)
        assert isinstance(refused, keypool.NoKeyAvailable)
        assert refused.reason == "throttled"
    assert pair.pooled_requests() == before  # nothing sent, and no wait on a guess
    assert pair.slept()[slept:] == []


@pytest.mark.anyio
async def test_a_long_retry_after_is_refused_at_once_where_the_plain_client_sleeps(
    make_pair: Callable[..., Pair],
) -> None:
    pair = make_pair(max_retries=0)
    pair.upstream.set_default_fault(Fault.rate_limited(30))
    plain = await failure(chat(pair.plain))
    assert isinstance(plain, openai.RateLimitError)
    while pair.pool.capacity("deepseek").status != "down":  # each key's 429, never a sleep
        same_family(await failure(chat(pair.pooled)), plain)
    assert pair.slept() == []
    again = await failure(chat(pair.pooled))
    assert isinstance(again, openai.RateLimitError)
    assert isinstance(again, keypool.NoKeyAvailable)
    assert again.response.headers["retry-after"] == "30"
    assert pair.slept() == []


# -- broken streams -----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("after_chunks", [0, 2], ids=["before-data", "after-data"])
async def test_a_stream_cut_on_every_key_raises_the_plain_clients_family(
    make_pair: Callable[..., Pair], after_chunks: int
) -> None:
    pair = make_pair(max_retries=0)
    pair.upstream.set_default_fault(Fault.cut_stream(after_chunks, mode="abort"))
    plain = await failure(stream_chat(pair.plain))
    pooled = await failure(stream_chat(pair.pooled))
    assert isinstance(plain, openai.APIConnectionError)
    same_family(pooled, plain)
    if after_chunks:  # data reached the caller: never re-run, only continued (twice, then given up)
        assert isinstance(pooled, StreamInterruptedError)
        assert pair.pooled_requests() == 1 + 2
        assert sum(pair.upstream.counters(s).prefills for s in KEYS.values()) == 2
    assert max(pair.per_key().values()) <= pair.plain_requests()


@pytest.mark.anyio
async def test_a_stream_that_stalls_raises_the_plain_clients_timeout(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair(fake_clock=False, max_retries=0, timeout=0.5)
    pair.upstream.set_default_fault(Fault.stall(after_chunks=2))
    plain = await failure(stream_chat(pair.plain))
    pooled = await failure(stream_chat(pair.pooled))
    assert isinstance(plain, openai.APITimeoutError)
    same_family(pooled, plain)
    assert isinstance(pooled, keypool.StreamInterrupted)
    assert pair.pooled_wire.spent("read") <= pair.plain_wire.spent("read") + 1e-6


# -- the caller's timeout while keys are busy or down --------------------------------------------


async def until(check: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not check():  # noqa: ASYNC110 -- the pool has no event for "a caller queued"
            await anyio.sleep(0.005)


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["with_options", "per_call"])
async def test_the_callers_timeout_bounds_a_wait_for_a_busy_key(
    make_pair: Callable[..., Pair], where: str
) -> None:
    pair = make_pair(max_concurrency=1)
    assert pair.clock is not None
    held = [await pair.pool.acquire("deepseek") for _ in KEYS]  # every key busy with a call
    client: Any = pair.pooled.with_options(timeout=0.5) if where == "with_options" else pair.pooled
    options: dict[str, Any] = {"timeout": 0.5} if where == "per_call" else {}
    errors: list[BaseException] = []

    async def call() -> None:
        errors.append(await failure(chat(client, **options)))

    async with anyio.create_task_group() as group:
        group.start_soon(call)
        await until(lambda: pair.pool.capacity("deepseek").waiting == 1)
        pair.clock.advance(0.4)
        await anyio.sleep(0.02)
        assert errors == []  # still inside its 0.5 s
        pair.clock.advance(0.2)
    (error,) = errors
    assert isinstance(error, openai.APITimeoutError)
    assert isinstance(error, keypool.NoKeyAvailable)
    assert error.reason == "busy"
    assert pair.pool.capacity("deepseek").waiting == 0
    assert pair.pooled_requests() == 0
    for lease in held:
        lease.release()
    assert await chat(client, **options) == "hello"


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["with_options", "per_call"])
async def test_the_callers_timeout_bounds_a_wait_for_a_down_provider(
    make_pair: Callable[..., Pair], where: str
) -> None:
    pair = make_pair(pooled_only={"max_wait": 120.0})  # would wait for the 60 s recovery
    pair.pool.trip("deepseek")
    client: Any = pair.pooled.with_options(timeout=0.5) if where == "with_options" else pair.pooled
    options: dict[str, Any] = {"timeout": 0.5} if where == "per_call" else {}
    error = await failure(chat(client, **options))
    assert isinstance(error, openai.InternalServerError)
    assert isinstance(error, keypool.NoKeyAvailable)
    assert error.retry_after == pytest.approx(60.0)
    assert pair.slept() == []  # refused at once: the recovery is past the caller's deadline
    assert await chat(pair.pooled) == "hello"  # without the short deadline it waits the 60 s
    assert sum(pair.slept()) == pytest.approx(60.0)


# -- a provider-wide rejection that heals ---------------------------------------------------------


@pytest.mark.anyio
async def test_a_provider_wide_401_heals_by_itself_within_the_recheck_schedule(
    make_pair: Callable[..., Pair],
) -> None:
    pair = make_pair(max_retries=0)
    assert pair.clock is not None
    pair.upstream.set_default_fault(Fault.rejected())
    error = await failure(chat(pair.pooled))
    assert isinstance(error, openai.AuthenticationError)
    again = await failure(chat(pair.pooled))
    assert isinstance(again, openai.AuthenticationError)
    assert isinstance(again, keypool.NoKeyAvailable)
    assert again.retry_after is not None  # an incident: the keys are re-checked by themselves
    pair.upstream.clear_faults()  # the provider is fixed; nobody resets anything
    pair.clock.advance(30.0 * 1.5)  # past every key's first recheck (recheck_after, spread by half)
    for n in range(40):
        assert await chat(pair.pooled, f"n{n}") == f"n{n}"
        states = {key_id: pair.pool.key_stats(key_id, "deepseek")["state"] for key_id in KEYS}
        if set(states.values()) == {"closed"}:
            break
    assert states == {key_id: "closed" for key_id in KEYS}


# -- drop-in options, side by side ----------------------------------------------------------------


@pytest.mark.anyio
async def test_an_explicit_api_key_beats_the_environment_as_for_the_plain_client(
    loopback: tuple[Swap, LoopbackServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    swap, server = loopback
    upstream = swap.app = FakeUpstream([*KEYS.values(), PLAIN], flavor="deepseek")
    monkeypatch.setenv("DEEPSEEK_API_KEYS", f"{KEYS['bravo']},{KEYS['charlie']}")
    monkeypatch.setenv("OPENAI_API_KEY", KEYS["bravo"])
    plain = openai.AsyncOpenAI(api_key=KEYS["alpha"], base_url=server.base_url)
    pooled = AsyncDeepSeek(api_key=KEYS["alpha"], base_url=server.base_url)
    try:
        assert await chat(plain) == await chat(pooled) == "hello"
        assert pooled.pool.key_count("deepseek") == 1
        with pytest.raises(ConfigError, match="api_key"):
            pooled.with_options(api_key=KEYS["bravo"])  # plain switches keys; pooled says why not
    finally:
        await plain.close()
        await pooled.close()
    assert upstream.counters(KEYS["alpha"]).requests == 2
    assert upstream.counters(KEYS["bravo"]).requests == upstream.counters(KEYS["charlie"]).requests == 0


@pytest.mark.anyio
async def test_an_http_client_keeps_its_hooks_and_headers_as_for_the_plain_client(
    loopback: tuple[Swap, LoopbackServer],
) -> None:
    swap, server = loopback
    upstream = swap.app = FakeUpstream([*KEYS.values(), PLAIN], flavor="deepseek")
    seen: dict[str, list[tuple[str, int]]] = {"plain": [], "pooled": []}

    def http(name: str) -> httpx2.AsyncClient:
        async def on_response(response: httpx2.Response) -> None:
            seen[name].append((response.request.headers.get("x-team", ""), response.status_code))

        return httpx2.AsyncClient(headers={"x-team": "search"}, event_hooks={"response": [on_response]})

    plain = openai.AsyncOpenAI(api_key=PLAIN, base_url=server.base_url, http_client=http("plain"))
    pooled = AsyncDeepSeek(api_keys=list(KEYS.values()), base_url=server.base_url, http_client=http("pooled"))
    try:
        assert await chat(plain) == await chat(pooled) == "hello"
    finally:
        await plain.close()
        await pooled.close()
    assert seen["plain"] == seen["pooled"] == [("search", 200)]
    assert sum(upstream.counters(s).requests for s in KEYS.values()) == 1


@pytest.mark.anyio
async def test_proxies_from_the_environment_are_used_as_by_the_plain_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream = FakeUpstream([KEYS["alpha"], PLAIN], flavor="deepseek")
    proxied: list[str] = []

    async def proxy(scope: Any, receive: Any, send: Any) -> None:
        """A forward proxy: takes the absolute-form request and serves it from the upstream."""
        if scope["type"] == "http":
            proxied.append(scope["path"])
            path = "/" + scope["path"].split("/", 3)[3]
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await upstream(scope, receive, send)

    with refused_port() as target, LoopbackServer(proxy) as server:  # nothing answers at target
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", server.base_url)
        plain = openai.AsyncOpenAI(api_key=PLAIN, base_url=target, max_retries=0)
        pooled = AsyncDeepSeek(api_key=KEYS["alpha"], base_url=target, max_retries=0)
        try:
            assert await chat(plain) == await chat(pooled) == "hello"
        finally:
            await plain.close()
            await pooled.close()
    assert proxied == [f"{target}/chat/completions"] * 2
    assert upstream.counters(KEYS["alpha"]).requests == upstream.counters(PLAIN).requests == 1


@pytest.mark.anyio
async def test_a_multipart_upload_is_retried_as_often_as_by_the_plain_client() -> None:
    bodies: list[bytes] = []
    answered: list[int] = []

    async def files(scope: Any, receive: Any, send: Any) -> None:
        """``POST /files``: 503 to the first two attempts of each client, then the file object."""
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        bodies.append(body)
        status = 503 if len(bodies) % 3 else 200
        answered.append(status)
        payload = {
            "id": "file-1",
            "object": "file",
            "bytes": 11,
            "created_at": 0,
            "filename": "a.txt",
            "purpose": "assistants",
            "status": "processed",
        }
        data = json.dumps(payload if status == 200 else {"error": {"message": "overloaded"}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": data})

    clock = FakeClock()
    pool = KeyPool(clock=clock, seed=3)
    pool.add_provider({"name": "files", "keys": [KeySpec(secret=KEYS["alpha"], key_id="alpha")]})
    with LoopbackServer(files) as server:
        plain = openai.AsyncOpenAI(api_key=PLAIN, base_url=server.base_url)
        pooled = AsyncPooledOpenAI(provider="files", pool=pool, base_url=server.base_url)
        try:
            for client in (plain, pooled):
                uploaded = await client.files.create(file=("a.txt", b"hello world"), purpose="assistants")
                assert uploaded.id == "file-1"
        finally:
            await plain.close()
            await pooled.close()
    assert answered == [503, 503, 200] * 2  # three attempts each: openai's default max_retries=2
    plain_bodies, pooled_bodies = bodies[:3], bodies[3:]
    boundary = plain_bodies[0].split(b"\r\n", 1)[0]
    assert all(b"hello world" in body for body in bodies)
    assert len(set(pooled_bodies)) == 1  # sent again byte for byte
    assert boundary.startswith(b"--")
    assert len(clock.slept) == 2  # and after the plain client's own backoffs
    assert sum(clock.slept) <= FIRST_BACKOFF * 3


@pytest.mark.anyio
async def test_the_default_limits_are_the_plain_clients_with_a_time_to_headers_limit(
    make_pair: Callable[..., Pair],
) -> None:
    pair = make_pair()
    assert await chat(pair.plain) == await chat(pair.pooled) == "hello"
    (plain,), (pooled,) = pair.plain_wire.limits, pair.pooled_wire.limits
    assert plain == {"connect": 5.0, "read": 600.0, "write": 600.0, "pool": 600.0}  # openai's
    # The same connect limit (never none) and deadline; a silent key is left after 30 s, not 600.
    assert pooled == {**plain, "read": 30.0}


def test_the_sync_clients_fail_alike_on_a_refused_connect_and_a_cut_stream(
    loopback: tuple[Swap, LoopbackServer],
) -> None:
    swap, server = loopback
    clock = FakeClock()
    events: list[keypool.PoolEvent] = []
    pool = KeyPool(clock=clock, seed=5, hooks=[events.append])
    pool.add_provider({"name": "deepseek", "keys": [KeySpec(secret=s, key_id=k) for k, s in KEYS.items()]})

    def plain_failure(client: openai.OpenAI, stream: bool) -> BaseException:
        try:
            if stream:
                with client.chat.completions.create(
                    model=MODEL, messages=messages("a b c d"), stream=True
                ) as s:
                    for _ in s:
                        pass
            else:
                client.chat.completions.create(model=MODEL, messages=messages("x"))
        except Exception as exc:
            return exc
        raise AssertionError("the call was expected to fail")

    with refused_port() as url:
        plain = openai.OpenAI(api_key=PLAIN, base_url=url, max_retries=1)
        pooled = DeepSeek(pool=pool, base_url=url, max_retries=1)
        plain_error, pooled_error = plain_failure(plain, False), plain_failure(pooled, False)
        plain.close()
        pooled.close()
    assert isinstance(plain_error, openai.APIConnectionError)
    same_family(pooled_error, plain_error)
    attempts = [e for e in events if isinstance(e, keypool.CallRecorded)]
    assert len(attempts) == 2  # as many connects as the plain client's 1 + max_retries

    upstream = swap.app = FakeUpstream([*KEYS.values(), PLAIN], flavor="deepseek")
    upstream.set_default_fault(Fault.cut_stream(2, mode="abort"))
    plain = openai.OpenAI(api_key=PLAIN, base_url=server.base_url, max_retries=0)
    pooled = DeepSeek(pool=pool, base_url=server.base_url, max_retries=0)
    try:
        plain_error, pooled_error = plain_failure(plain, True), plain_failure(pooled, True)
    finally:
        plain.close()
        pooled.close()
    assert isinstance(plain_error, openai.APIConnectionError)
    same_family(pooled_error, plain_error)
    assert isinstance(pooled_error, StreamInterruptedError)


def test_the_sync_clients_attempt_timeout_caps_an_attempt_as_the_async_ones_do() -> None:
    upstream = FakeUpstream(["sk-sync-slow-0a1b2c"], flavor="deepseek")
    upstream.set_default_fault(Fault.slow(2.0))
    with LoopbackServer(upstream) as server:
        client = DeepSeek(
            api_key="sk-sync-slow-0a1b2c",
            base_url=server.base_url,
            attempt_timeout=0.3,
            headers_timeout=None,
            max_retries=0,
        )
        try:
            with pytest.raises(openai.APITimeoutError):  # not the answer that comes after 2 s
                client.chat.completions.create(model=MODEL, messages=messages("slow"))  # type: ignore[arg-type]
        finally:
            client.close()
