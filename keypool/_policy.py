"""What one request may still do: the decisions between its attempts, with no I/O.

A request has one deadline and one budget. :class:`RequestPlan` holds both and answers the
transport's questions: which keys to leave out of the next lease, whether a failed attempt is
retried, how long to back off before a key that already failed is tried again, and what limits
the next attempt runs under. It reads the clock it is given and never sleeps or sends anything,
so every decision is tested on a fake clock.

The rules (the outcome table in ``docs/architecture.md``):

* a failure that is the key's (429, 401/403, 402) moves the request to another key and costs no
  retry, up to the number of keys;
* an endpoint failure (5xx, 408, timeouts, resets, a stream cut before its first byte) costs one
  of ``retries`` (``max_retries``, 2 by default, as in the ``openai`` client), unless it is the
  first failure in a row and another key of the provider is closed with no failures counted: then
  it looks like the key's own and moving on is free;
* a throttle (429) moves on for free the first time; a second one in a row looks like the
  provider's or the account's limit and costs a retry, like the ``openai`` client's retry of a 429;
* every attempt after one that cost a retry waits the ``openai`` client's own backoff first (0.5 s,
  then 1 s, ... up to 8 s, less a quarter to a half: never longer than the plain client sleeps),
  so keypool never gives up later than the plain client would with the same ``max_retries``
  (after a 429 with Retry-After the pool waits for that instant instead, within ``max_wait``);
* a key already tried is tried again only when no other key can serve (after a throttle, once the
  pool may wait for its Retry-After: ``max_wait``);
* with another route to go to (``request_budget(fallback=True)``, as ``UnifiedAgent`` opens),
  anything but a free move ends the request at this provider at once: a timeout, a second endpoint
  failure or throttle in a row. The next route is the better retry;
* nothing outlasts the deadline: waits for a key, every attempt and every backoff.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ._budget import RequestBudget
from ._continuation import Prefill, check_prefill
from ._errors import ConfigError
from ._outcome import Outcome, OutcomeKind
from ._sse import Grammar

__all__ = ["EXTENSION", "SHORTEST_FIRST_BACKOFF", "CallSettings", "RequestPlan", "capped", "deadline_of"]

#: The ``httpx2.Request.extensions`` key under which a client passes a request's settings.
EXTENSION = "keypool"

_STREAM_HEADERS_TIMEOUT = 30.0  # every OpenAI-compatible server sends a stream's headers at once
# An LLM stream silent for this long has stalled: tokens come many times a second, and servers
# that keep a waiting request alive send keep-alives every few seconds.
_LLM_STREAM_IDLE = 30.0
# Long enough for a long prompt's prefill on a busy server; short enough that a request queued
# behind others (DeepSeek streams keep-alives for up to 10 minutes) moves to another key.
FIRST_TOKEN_TIMEOUT = 60.0
_BACKOFF_FIRST, _BACKOFF_CAP = 0.5, 8.0  # the openai client's own retry delays
_PLAIN_LEAST = 0.75  # the plain client takes off at most a quarter of each delay
#: The least the plain client waits before its first retry: no wait of keypool's is longer.
SHORTEST_FIRST_BACKOFF = _BACKOFF_FIRST * _PLAIN_LEAST


HeadersTimeout = float | Literal["auto"] | None
_JITTER = random.Random()


@dataclass(frozen=True, slots=True)
class CallSettings:
    """How a call may spend its time and attempts; a client's defaults, overridable per request.

    ``retries``: endpoint failures retried (the ``openai`` client's ``max_retries``).
    ``max_attempts``: a hard cap on attempts of every kind (default: the keys plus ``retries``).
    ``max_wait``: seconds a call may wait for a down provider's soonest recovery (``None``: the
    provider's own ``max_wait``). ``headers_timeout``: the longest one attempt may wait for the
    response to start, and for any one read after that, before the next key is tried; ``"auto"``
    is 30 s for streamed calls (servers send a stream's headers at once) and half the call's
    deadline otherwise; ``None`` is no limit beyond the deadline. ``attempt_timeout``: a hard cap
    on one attempt, body included.

    Streams: ``first_token_timeout``: the longest an attempt may take to show its first content,
    reasoning or tool-call delta (keep-alives do not count) before the call moves to another key,
    invisibly to the caller. ``stream_idle_timeout``: the longest silence inside a stream (a
    stall; for LLM streams every read of an attempt is no longer, keep-alives included);
    ``"auto"`` is 30 s for LLM streams (chat, completions, Responses) and none for other streams.
    ``stream_timeout``: a cap on a whole stream, from the call's start (none unless set).
    ``max_continuations``: how often a chat answer whose stream broke after
    content is continued elsewhere, when the route can take a ``prefill`` (``"deepseek"``,
    ``"assistant"``, or ``None``: no continuation); see :mod:`keypool._continuation`.
    """

    retries: int = 2
    max_attempts: int | None = None
    max_wait: float | None = None
    headers_timeout: HeadersTimeout = "auto"
    attempt_timeout: float | None = None
    stream_idle_timeout: float | Literal["auto"] | None = "auto"
    first_token_timeout: float | None = FIRST_TOKEN_TIMEOUT
    stream_timeout: float | None = None
    max_continuations: int = 2
    prefill: Prefill | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ConfigError(f"max_retries: must be an integer >= 0 (got {self.retries!r})")
        if self.max_attempts is not None and (
            not isinstance(self.max_attempts, int)
            or isinstance(self.max_attempts, bool)
            or self.max_attempts < 1
        ):
            raise ConfigError(f"max_attempts: must be an integer >= 1 or None (got {self.max_attempts!r})")
        _seconds("max_wait", self.max_wait, zero=True)
        if self.headers_timeout != "auto":
            _seconds("headers_timeout", self.headers_timeout)
        _seconds("attempt_timeout", self.attempt_timeout)
        if self.stream_idle_timeout != "auto":
            _seconds("stream_idle_timeout", self.stream_idle_timeout)
        _seconds("first_token_timeout", self.first_token_timeout)
        _seconds("stream_timeout", self.stream_timeout)
        if not _count(self.max_continuations, 0):
            raise ConfigError(f"max_continuations: must be an integer >= 0 (got {self.max_continuations!r})")
        check_prefill(self.prefill)

    def merged(self, changes: Mapping[str, Any]) -> CallSettings:
        """A copy with ``changes`` (only the fields given), validated again."""
        unknown = set(changes) - set(self.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"unknown call setting(s) {sorted(unknown)}; allowed: {sorted(self.__dataclass_fields__)}"
            )
        return replace(self, **changes)

    def idle_limit(self, llm_stream: bool) -> float | None:
        """The longest gap between events of a stream (``llm_stream``: one with an event grammar)."""
        if self.stream_idle_timeout == "auto":
            return _LLM_STREAM_IDLE if llm_stream else None
        return self.stream_idle_timeout

    def headers_limit(self, stream: bool, total: float | None) -> float | None:
        """The time-to-headers limit of one attempt for a call with deadline ``total`` seconds."""
        if self.headers_timeout != "auto":
            return self.headers_timeout
        if stream:
            return _STREAM_HEADERS_TIMEOUT
        return None if total is None else total / 2


def _count(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _seconds(name: str, value: object, *, zero: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    if not ok or (value < 0 if zero else value <= 0):  # type: ignore[operator]
        bound = ">= 0" if zero else "> 0"
        raise ConfigError(f"{name}: must be a number of seconds {bound}, or None (got {value!r})")


def capped(value: float | None, bound: float | None) -> float | None:
    """``value`` no larger than ``bound`` (``None`` is no limit on either side)."""
    if bound is None:
        return value
    return bound if value is None else min(value, bound)


def deadline_of(timeout: Mapping[str, float | None] | None) -> float | None:
    """The whole-call deadline (seconds) in an ``httpx2`` request's timeout: its longest phase.

    ``openai`` turns ``timeout=30`` into 30 s for every phase and its default into 600 s with a
    5 s connect: the deadline is then 30 s or 600 s. ``None`` anywhere but ``connect`` means none.
    """
    if not timeout:
        return None
    phases = [timeout.get(name) for name in ("read", "write", "pool")]
    if any(value is None for value in phases):
        return None
    return max(float(value) for value in phases if value is not None)


@dataclass
class RequestPlan:
    """One request's deadline, budget and memory of what was tried (see the module docstring)."""

    started: float
    deadline: float | None
    settings: CallSettings
    attempts_left: int
    replayable: bool
    stream: bool = False
    shared: RequestBudget | None = None
    rng: random.Random = _JITTER  # one generator for every plan: seeding one costs ~9 µs
    tried: set[str] = field(default_factory=set)
    exclude: frozenset[str] = frozenset()
    retries_left: int = 0
    last_kind: OutcomeKind | None = None
    backoffs: int = 0
    strikes: int = 0  # endpoint failures and throttles in a row
    pause_due: float = 0.0  # the backoff owed before the next attempt
    charged: bool = False  # the last strike has paid its retry
    deadline_bound: bool = False  # the current attempt's reads end at the caller's deadline
    connect_bound: bool = False  # the current attempt's connect ends at the caller's deadline
    last_retry_after: float | None = None  # the Retry-After of the last throttle (None: no header)
    wait_cap: float | None = None  # the longest the next lease may wait for a recovery (None: max_wait)
    grammar: Grammar | None = None  # an LLM event stream's grammar (``keypool._sse``)

    def __post_init__(self) -> None:
        self.retries_left = self.settings.retries

    @classmethod
    def start(
        cls,
        now: float,
        *,
        total: float | None,
        settings: CallSettings,
        keys: int,
        replayable: bool,
        stream: bool = False,
        shared: RequestBudget | None = None,
    ) -> RequestPlan:
        """A request's plan: ``total`` seconds to its deadline, ``keys`` keys to fail over to."""
        attempts = settings.max_attempts or max(1, keys + settings.retries)
        deadline = None if total is None else now + total
        if shared is not None:  # an enclosing request_budget() caps attempts and the deadline
            attempts = max(1, min(attempts, shared.attempts_left))
            left = shared.remaining_time()
            if left is not None:
                end = now + max(0.0, left)
                deadline = end if deadline is None else min(deadline, end)
        return cls(
            started=now,
            deadline=deadline,
            settings=settings,
            attempts_left=attempts,
            replayable=replayable,
            stream=stream,
            shared=shared,
        )

    # ----------------------------------------------------------------- time

    def remaining(self, now: float) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - now)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def attempt_limits(
        self, now: float, timeout: Mapping[str, float | None] | None
    ) -> dict[str, float | None]:
        """The ``httpx2`` timeouts of the next attempt: the request's own, each no longer than the
        time left, and reads no longer than the time-to-headers limit."""
        left = self.remaining(now)
        total = None if self.deadline is None else self.deadline - self.started
        headers = self.settings.headers_limit(self.stream, total)
        given = timeout or {}
        read = given.get("read")
        # A timeout of this attempt is then the caller's own deadline, not a silent key (unless
        # the attempt's own cap, attempt_timeout, ends it first: then it is the key's).
        cap = self.settings.attempt_timeout
        self.deadline_bound = (
            left is not None
            and (headers is None or left <= headers)
            and (read is None or left <= read)
            and (cap is None or left <= cap)
        )
        connect = given.get("connect")
        self.connect_bound = left is not None and (connect is None or left <= connect)
        if headers is not None:
            read = headers if read is None else min(read, headers)
        return {
            "connect": capped(connect, left),
            "read": capped(read, left),
            "write": capped(given.get("write"), left),
            "pool": capped(given.get("pool"), left),
        }

    def at_deadline(self, detail: str) -> bool:
        """Whether a timeout (``detail``: its exception's name) of the current attempt was the
        caller's own deadline rather than a silent key or endpoint."""
        return self.connect_bound if detail == "ConnectTimeout" else self.deadline_bound

    def max_wait(self, provider_default: float) -> float:
        """How long the next lease may wait for a down provider's soonest recovery."""
        given = provider_default if self.settings.max_wait is None else self.settings.max_wait
        return given if self.wait_cap is None else min(given, self.wait_cap)

    def hard_limit(self, now: float) -> float | None:
        """A cap on the whole attempt, body included: ``attempt_timeout``, never past the deadline."""
        cap = self.settings.attempt_timeout
        if cap is None:
            return None
        left = self.remaining(now)
        return cap if left is None else min(cap, left)

    # ----------------------------------------------------------------- attempts

    def begin(self, key_id: str, provider: str) -> bool:
        """Count an attempt on ``key_id``; ``False`` if a shared budget has none left for it."""
        if self.shared is not None and not self.shared.take(provider, key_id):
            return False
        self.attempts_left -= 1
        self.tried.add(key_id)
        self.exclude = self.exclude | {key_id}
        return True

    def retry_after(self, outcome: Outcome, now: float, *, healthy_elsewhere: bool = False) -> bool:
        """Whether the request goes on after an attempt with this (non-success) outcome.

        ``healthy_elsewhere``: another key of the provider is closed with no failures counted, so
        a first endpoint failure looks like the key's own and moving on costs no retry.
        """
        kind = outcome.kind
        self.last_kind = kind
        self.last_retry_after = outcome.retry_after
        prior = self.strikes
        strike = kind is OutcomeKind.FAILURE or kind is OutcomeKind.THROTTLED
        self.strikes = prior + 1 if strike else 0
        if not kind.retry_elsewhere or not self.replayable:
            return False
        if self.attempts_left <= 0 or self.expired(now):
            return False
        self.charged = False
        if not strike:
            return True  # a key's own refusal (401/403/402): another key is a clean retry
        free = prior == 0 and (kind is OutcomeKind.THROTTLED or healthy_elsewhere)
        fallback = self.shared is not None and self.shared.fallback
        if fallback and (not free or "Timeout" in outcome.detail):
            return False  # the provider is failing or silent: the next route is the better retry
        if not free:
            if self.retries_left <= 0:
                return False
            self.retries_left -= 1
            self.charged = True
            if kind is OutcomeKind.FAILURE or outcome.retry_after is None:
                self.pause_due = self._backoff()  # after a Retry-After the pool waits as it says
        return True

    def _backoff(self) -> float:
        """A delay on the openai client's schedule (0.5 s, 1 s, ... 8 s), jittered but never longer
        than the shortest the plain client would sleep (it takes off up to a quarter; this takes off
        a quarter to a half), so keypool never gives up later than it."""
        delay = min(_BACKOFF_FIRST * 2.0**self.backoffs, _BACKOFF_CAP) * (
            _PLAIN_LEAST - 0.25 * self.rng.random()
        )
        self.backoffs += 1
        return delay

    def take_pause(self, now: float) -> float | None:
        """The backoff owed before the next attempt (0.0 if none), or ``None`` if it would reach
        past the deadline: then the request ends with what it has."""
        delay, self.pause_due = self.pause_due, 0.0
        left = self.remaining(now)
        if delay and left is not None and delay >= left:
            return None
        return delay

    def look_again(self, now: float) -> float | None:
        """No other key can serve: seconds to back off before the keys already tried are looked
        at again, or ``None`` if the request has nothing left to try with.

        Inside a :func:`~keypool.request_budget` (a caller with other routes, such as
        ``UnifiedAgent``) keys are not reused: the next route is the better retry. Reusing a key
        costs a retry unless the failure that led here already paid one (and its backoff).
        """
        if not self.exclude or self.attempts_left <= 0 or self.last_kind is None or self.shared is not None:
            return None
        self.wait_cap = None
        delay = 0.0
        if self.strikes and not self.charged:  # a free move found no key: reusing one costs
            if self.retries_left <= 0:
                return None
            self.retries_left -= 1
            self.charged = True
            if self.last_kind is OutcomeKind.FAILURE:
                delay = self._backoff()
            elif self.last_retry_after is None:
                # A 429 without Retry-After: the keys' recovery is only a guess, so the next lease
                # waits for it no longer than the openai client's own backoff before its retry would.
                self.wait_cap = self._backoff()
        elif self.last_kind is OutcomeKind.THROTTLED and self.last_retry_after is None:
            self.wait_cap = 0.0  # the backoff is paid already: no more waiting on a guess
        left = self.remaining(now)
        if left is not None and delay >= left:
            return None
        self.exclude = frozenset()
        return delay
