"""An OpenAI-compatible upstream that misbehaves per key on command.

A key pool is only as good as its reaction to a provider's bad moments: a throttled key, a revoked
key, an empty balance, a server that hangs or a stream cut halfway. :class:`FakeUpstream` is a plain
ASGI app that serves the OpenAI API shape (with DeepSeek and Perplexity flavors) and lets a test
switch a :class:`Fault` on any key while requests are in flight, then read exact per-key counters.

Order of checks for every request: the key (401 when unknown or missing), then the route (404), then
the request's content (400: invalid JSON, missing fields, or the model ``"poison"``), then the key's
fault. Bad requests therefore answer 400 whichever key sent them, like a real provider.

Secrets identify keys in the test API (:meth:`FakeUpstream.set_fault`, :meth:`FakeUpstream.counters`)
because the test knows them; they never appear in a response body, a header or a ``repr``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import random
import re
import struct
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias

import anyio

from ._loopback import DropConnection

__all__ = ["FakeUpstream", "Fault", "KeyCounters"]

_Scope: TypeAlias = MutableMapping[str, Any]
_Message: TypeAlias = MutableMapping[str, Any]
_Receive: TypeAlias = Callable[[], Awaitable[_Message]]
_Send: TypeAlias = Callable[[_Message], Awaitable[None]]
_JSON: TypeAlias = dict[str, Any]

Flavor: TypeAlias = Literal["openai", "deepseek", "perplexity"]
RetryAfterHeader: TypeAlias = Literal[
    "retry-after", "retry-after-ms", "retry-after-date", "x-ratelimit-reset-requests"
]
CutMode: TypeAlias = Literal["abort", "truncate"]
FaultKind: TypeAlias = Literal[
    "ok",
    "status",
    "rate_limited",
    "hang",
    "slow",
    "cut_stream",
    "stall",
    "keep_alive_cut",
    "keep_alive",
    "malformed",
    "error_event",
    "rejects_prefill",
    "flaky",
    "sequence",
]

POISON_MODEL: Final = "poison"
"""A request naming this model is a caller error: HTTP 400 whatever the key."""

_SIMPLE_KINDS: Final = frozenset(
    {
        "ok",
        "status",
        "rate_limited",
        "hang",
        "slow",
        "cut_stream",
        "stall",
        "keep_alive_cut",
        "keep_alive",
        "malformed",
        "error_event",
        "rejects_prefill",
    }
)
_KEEP_ALIVE: Final = b": keep-alive\n\n"
_MALFORMED: Final = b'data: {"choices": [{"index": 0, "delta": {"content": "half' + b"\n\n"
_ERROR_EVENT: Final = (
    b'data: {"error": {"message": "The server had an error while processing your request.", '
    b'"type": "server_error", "param": null, "code": "server_error"}}\n\n'
)
_NAMED_STATUS: Final = {401: "rejected", 402: "exhausted", 403: "forbidden"}


@dataclass(frozen=True, slots=True)
class Fault:
    """How a key answers its next requests. Build one with the class methods, e.g.
    ``Fault.rate_limited(retry_after=30)``; a fault is a value, safe to share between keys.

    Stateful faults (``flaky``, ``sequence``) keep their state per key in the upstream: each key
    draws from its own generator seeded from ``seed`` and the key, so a run is reproducible.
    """

    kind: FaultKind = "ok"
    status_code: int = 200
    retry_after: float | None = None
    retry_after_header: RetryAfterHeader = "retry-after"
    delay: float = 0.0
    after_chunks: int = 0
    mode: CutMode = "abort"
    probability: float = 0.0
    seed: int | None = None
    inner: Fault | None = None
    steps: tuple[Fault, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "status" and not 400 <= self.status_code <= 599:
            raise ValueError(f"an error status must be 4xx or 5xx, got {self.status_code}")
        if self.retry_after is not None and not (math.isfinite(self.retry_after) and self.retry_after >= 0):
            raise ValueError(f"retry_after must be a finite number >= 0, got {self.retry_after}")
        if not (math.isfinite(self.delay) and self.delay >= 0):
            raise ValueError(f"delay must be a finite number >= 0, got {self.delay}")
        if self.after_chunks < 0:
            raise ValueError(f"after_chunks must be >= 0, got {self.after_chunks}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")
        if self.kind == "flaky" and (self.inner is None or self.inner.kind not in _SIMPLE_KINDS):
            raise ValueError("flaky() wraps a simple fault (not flaky or sequence)")
        if self.kind == "sequence":
            for step in (*self.steps, self.inner):
                if step is None or step.kind == "sequence":
                    raise ValueError("sequence() steps must be simple or flaky faults")

    @classmethod
    def ok(cls) -> Fault:
        """Answer normally."""
        return cls()

    @classmethod
    def status(cls, code: int) -> Fault:
        """Answer with this HTTP error and an OpenAI-style error body (5xx and 408 are typical)."""
        return cls(kind="status", status_code=code)

    @classmethod
    def rate_limited(
        cls, retry_after: float | None = 30.0, *, header: RetryAfterHeader = "retry-after"
    ) -> Fault:
        """429 with the wait in one header: ``retry-after`` (seconds), ``retry-after-ms``,
        ``retry-after-date`` (an HTTP date in ``Retry-After``) or ``x-ratelimit-reset-requests``
        (OpenAI's duration format, e.g. ``1m30s``). ``retry_after=None`` sends no header."""
        return cls(kind="rate_limited", status_code=429, retry_after=retry_after, retry_after_header=header)

    @classmethod
    def rejected(cls) -> Fault:
        """401: the provider no longer accepts this key."""
        return cls(kind="status", status_code=401)

    @classmethod
    def forbidden(cls) -> Fault:
        """403: the key exists but may not use this resource."""
        return cls(kind="status", status_code=403)

    @classmethod
    def exhausted(cls) -> Fault:
        """402 with DeepSeek's "Insufficient Balance" body; ``/user/balance`` reports it too."""
        return cls(kind="status", status_code=402)

    @classmethod
    def hang(cls) -> Fault:
        """Never answer; the handler ends when the client disconnects or the server stops."""
        return cls(kind="hang")

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Answer normally after ``seconds``."""
        return cls(kind="slow", delay=seconds)

    @classmethod
    def cut_stream(cls, after_chunks: int = 1, *, mode: CutMode = "abort") -> Fault:
        """Send ``after_chunks`` stream chunks, then break the body without the terminator.

        ``mode="abort"`` drops the connection (the client sees a broken transfer);
        ``mode="truncate"`` ends the body cleanly, just without ``data: [DONE]``. A non-streaming
        response under this fault sends half of its JSON body and breaks the same way.
        """
        return cls(kind="cut_stream", after_chunks=after_chunks, mode=mode)

    @classmethod
    def stall(cls, after_chunks: int = 1) -> Fault:
        """Send ``after_chunks`` stream chunks, then nothing more while keeping the connection
        open (a non-streaming response stalls after half of its body)."""
        return cls(kind="stall", after_chunks=after_chunks)

    @classmethod
    def cut_after_tokens(cls, tokens: int, *, mode: CutMode = "abort") -> Fault:
        """A chat stream cut after ``tokens`` content deltas (the role chunk comes first)."""
        return cls.cut_stream(after_chunks=tokens + 1, mode=mode)

    @classmethod
    def stall_after_tokens(cls, tokens: int) -> Fault:
        """A chat stream that goes silent after ``tokens`` content deltas."""
        return cls.stall(after_chunks=tokens + 1)

    @classmethod
    def no_done(cls) -> Fault:
        """Every event, ``finish_reason`` included, then a clean end without ``data: [DONE]``."""
        return cls.cut_stream(after_chunks=1_000_000, mode="truncate")

    @classmethod
    def keep_alive_then_cut(cls, comments: int = 3, *, interval: float = 0.01) -> Fault:
        """A queued stream: ``comments`` ``: keep-alive`` lines ``interval`` apart, then the
        connection drops before any event."""
        return cls(kind="keep_alive_cut", after_chunks=comments, delay=interval)

    @classmethod
    def keep_alive(cls, seconds: float, *, interval: float = 0.05) -> Fault:
        """A queued stream: ``: keep-alive`` lines every ``interval`` for ``seconds``, then the
        answer (a non-streamed call just answers after ``seconds``)."""
        return cls(kind="keep_alive", delay=seconds, retry_after=interval)

    @classmethod
    def malformed_event(cls, at: int = 2) -> Fault:
        """A stream whose event number ``at`` (0 is the role chunk) is not JSON; the rest follows."""
        return cls(kind="malformed", after_chunks=at)

    @classmethod
    def error_event(cls, at: int = 2) -> Fault:
        """A stream that sends an in-band error event (a server error) as its event number ``at``
        (0 is the role chunk), then ends cleanly without ``[DONE]``."""
        return cls(kind="error_event", after_chunks=at)

    @classmethod
    def rejects_prefill(cls) -> Fault:
        """400 to a chat request that ends with an assistant message (a prefill); others are
        answered normally. Without this fault every key continues a prefill."""
        return cls(kind="rejects_prefill")

    @classmethod
    def accepts_prefill(cls) -> Fault:
        """Answer normally, continuing a trailing assistant message (what every key does)."""
        return cls()

    @classmethod
    def flaky(cls, p: float, fault: Fault, *, seed: int | None = None) -> Fault:
        """Apply ``fault`` with probability ``p``, else answer normally; reproducible with a seed."""
        return cls(kind="flaky", probability=p, inner=fault, seed=seed)

    @classmethod
    def sequence(cls, *steps: Fault, then: Fault | None = None) -> Fault:
        """Apply ``steps`` to a key's next requests in order, then ``then`` (default: ok)."""
        return cls(kind="sequence", steps=steps, inner=then if then is not None else cls())

    def __repr__(self) -> str:
        kind = self.kind
        if kind == "status":
            named = _NAMED_STATUS.get(self.status_code)
            return f"Fault.{named}()" if named else f"Fault.status({self.status_code})"
        if kind == "rate_limited":
            return f"Fault.rate_limited(retry_after={self.retry_after!r}, header={self.retry_after_header!r})"
        if kind == "slow":
            return f"Fault.slow({self.delay!r})"
        if kind == "cut_stream":
            return f"Fault.cut_stream(after_chunks={self.after_chunks}, mode={self.mode!r})"
        if kind == "stall":
            return f"Fault.stall(after_chunks={self.after_chunks})"
        if kind == "keep_alive_cut":
            return f"Fault.keep_alive_then_cut({self.after_chunks}, interval={self.delay!r})"
        if kind == "keep_alive":
            return f"Fault.keep_alive({self.delay!r}, interval={self.retry_after!r})"
        if kind == "malformed":
            return f"Fault.malformed_event(at={self.after_chunks})"
        if kind == "error_event":
            return f"Fault.error_event(at={self.after_chunks})"
        if kind == "flaky":
            return f"Fault.flaky({self.probability!r}, {self.inner!r}, seed={self.seed!r})"
        if kind == "sequence":
            steps = ", ".join(repr(step) for step in self.steps)
            return f"Fault.sequence({steps}, then={self.inner!r})"
        return f"Fault.{kind}()"


_OK: Final = Fault()
_STREAM_FAULTS: Final = frozenset(
    {"cut_stream", "stall", "keep_alive_cut", "keep_alive", "malformed", "error_event"}
)


@dataclass(frozen=True, slots=True)
class KeyCounters:
    """What one key saw, counted when each request arrived (so attempts are counted exactly).

    ``by_status`` counts the statuses sent (a hang sends none); ``by_endpoint`` uses normalised
    paths such as ``/chat/completions``; ``cut`` and ``stalled`` count bodies broken on purpose;
    ``prefills`` counts chat requests that ended with an assistant message (continuations).
    """

    requests: int = 0
    by_status: Mapping[int, int] = field(default_factory=lambda: MappingProxyType({}))
    by_endpoint: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    streams_started: int = 0
    streams_completed: int = 0
    cut: int = 0
    stalled: int = 0
    hangs: int = 0
    in_flight: int = 0
    prefills: int = 0

    def status(self, code: int) -> int:
        """How many responses with this status code were sent."""
        return self.by_status.get(code, 0)


@dataclass
class _Tally:
    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_endpoint: Counter[str] = field(default_factory=Counter)
    streams_started: int = 0
    streams_completed: int = 0
    cut: int = 0
    stalled: int = 0
    hangs: int = 0
    in_flight: int = 0
    prefills: int = 0

    def freeze(self) -> KeyCounters:
        return KeyCounters(
            requests=self.requests,
            by_status=MappingProxyType(dict(self.by_status)),
            by_endpoint=MappingProxyType(dict(self.by_endpoint)),
            streams_started=self.streams_started,
            streams_completed=self.streams_completed,
            cut=self.cut,
            stalled=self.stalled,
            hangs=self.hangs,
            in_flight=self.in_flight,
            prefills=self.prefills,
        )


@dataclass
class _Slot:
    """A fault as applied to one key, with that key's generator and sequence cursor."""

    fault: Fault
    rng: random.Random
    cursor: int = 0

    @classmethod
    def for_key(cls, fault: Fault, secret: str) -> _Slot:
        seed = fault.seed if fault.kind == "flaky" else _seed_of(fault)
        rng = random.Random(f"{seed}:{secret}") if seed is not None else random.Random()
        return cls(fault=fault, rng=rng)

    def draw(self) -> Fault:
        fault = self.fault
        if fault.kind == "sequence":
            if self.cursor < len(fault.steps):
                fault = fault.steps[self.cursor]
                self.cursor += 1
            else:
                fault = fault.inner or _OK
        if fault.kind == "flaky":
            hit = self.rng.random() < fault.probability
            return (fault.inner or _OK) if hit else _OK
        return fault


def _seed_of(fault: Fault) -> int | None:
    for step in (*fault.steps, fault.inner):
        if step is not None and step.kind == "flaky" and step.seed is not None:
            return step.seed
    return None


class _HTTPError(Exception):
    """A request answered with an error before any fault applies (401, 404, 405, 400)."""

    def __init__(self, status: int, message: str, type_: str, code: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.body = _error_body(message, type_, code)


def _error_body(message: str, type_: str, code: str | None, param: str | None = None) -> _JSON:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_STATUS_ERRORS: Final[Mapping[int, tuple[str, str, str | None]]] = {
    400: ("Bad request.", "invalid_request_error", None),
    401: ("Authentication failed: the API key is invalid.", "authentication_error", "invalid_api_key"),
    # DeepSeek's body, verbatim: an empty balance is reported as an invalid request.
    402: ("Insufficient Balance", "unknown_error", "invalid_request_error"),
    403: ("This key is not allowed to use this resource.", "permission_denied_error", "permission_denied"),
    404: ("Not found.", "invalid_request_error", "not_found"),
    408: ("The request timed out.", "timeout_error", "request_timeout"),
    429: ("Rate limit reached for requests. Please try again later.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request.", "server_error", None),
    502: ("Bad gateway.", "server_error", "bad_gateway"),
    503: ("The server is overloaded or not ready yet.", "server_error", "service_unavailable"),
    504: ("Gateway timeout.", "server_error", "gateway_timeout"),
}

_DEFAULT_MODELS: Final[Mapping[Flavor, tuple[str, ...]]] = {
    "openai": ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small"),
    "deepseek": ("deepseek-chat", "deepseek-reasoner"),
    "perplexity": ("sonar", "sonar-pro", "sonar-reasoning"),
}

_PIECES: Final = re.compile(r"\S+\s*|\s+")
_EMBEDDING_DIMENSIONS: Final = 8
_CITATIONS: Final = (
    ("Example source one", "https://example.com/source-1"),
    ("Example source two", "https://example.org/source-2"),
)


def _pieces(text: str) -> list[str]:
    """Split text into stream deltas (one word with its trailing space each); joins back exactly."""
    return _PIECES.findall(text)


def _tokens(text: str) -> int:
    return len(text.split())


def _text_of(content: Any) -> str:
    """The text of an OpenAI message content: a string or a list of ``{"type", "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _format_duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` format: ``20ms``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = f"{int(hours)}h" if hours else ""
    if hours or minutes:
        out += f"{int(minutes)}m"
    return out + f"{secs:.3f}".rstrip("0").rstrip(".") + "s"


def _retry_headers(fault: Fault) -> list[tuple[str, str]]:
    wait = fault.retry_after
    if wait is None:
        return []
    header = fault.retry_after_header
    if header == "retry-after":
        return [("retry-after", f"{wait:g}")]
    if header == "retry-after-ms":
        return [("retry-after-ms", str(round(wait * 1000)))]
    if header == "retry-after-date":
        return [("retry-after", formatdate(time.time() + math.ceil(wait), usegmt=True))]
    return [("x-ratelimit-reset-requests", _format_duration(wait))]


def _embedding(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector per text, rounded to float32 so base64 and floats agree."""
    raw = hashlib.shake_256(text.encode()).digest(2 * dimensions)
    values = [(int.from_bytes(raw[i : i + 2], "big") / 65535.0) * 2 - 1 for i in range(0, len(raw), 2)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed))


async def _wait_for_disconnect(receive: _Receive, timeout: float | None) -> bool:
    """Wait up to ``timeout`` seconds (forever if None); True if the client went away."""
    with anyio.move_on_after(timeout):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return True
    return False


async def _read_body(receive: _Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class _Exchange:
    """One request/response, recording what was sent into the key's tally."""

    def __init__(
        self, upstream: FakeUpstream, tally_key: str, receive: _Receive, send: _Send, request_id: str
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

    async def json(self, status: int, payload: _JSON, headers: Iterable[tuple[str, str]] = ()) -> None:
        data = json.dumps(payload).encode()
        await self.start(status, "application/json", [*headers, ("content-length", str(len(data)))])
        await self.body(data, more=False)

    async def error(self, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        message, type_, code = _STATUS_ERRORS.get(
            status,
            (f"Upstream error {status}.", "server_error" if status >= 500 else "invalid_request_error", None),
        )
        await self.json(status, _error_body(message, type_, code), headers)


class FakeUpstream:
    """An OpenAI-compatible ASGI app with per-key faults and counters.

    Serves ``POST /chat/completions`` (streaming or not), ``GET /models`` (and ``/models/{id}``),
    ``POST /embeddings``, ``POST /responses`` (streaming or not) and ``GET /user/balance``, each
    with or without a ``/v1`` prefix. The assistant's answer echoes the last user message so tests
    can assert it. ``flavor="deepseek"`` adds ``reasoning_content`` for
    ``deepseek-reasoner``; ``flavor="perplexity"`` adds ``citations`` and ``search_results`` and,
    like the real service, has no ``/models``.

    Keys arrive as ``Authorization: Bearer <secret>`` or in ``auth_header`` (e.g. ``x-api-key``).
    All methods are thread-safe: a test may switch faults while the app serves from another thread.

    Served in-process by ``httpx2.ASGITransport``, bodies are buffered: a cut surfaces before the
    first byte (as :class:`DropConnection`, an ``httpx2.RemoteProtocolError``) and a stall or hang
    only ends when the caller cancels. Serve it with a ``LoopbackServer`` to test those over TCP.
    """

    def __init__(
        self,
        keys: Iterable[str] = (),
        *,
        accept_any_key: bool = False,
        flavor: Flavor = "openai",
        auth_header: str | None = None,
        models: Sequence[str] | None = None,
        default_fault: Fault | None = None,
    ) -> None:
        if flavor not in _DEFAULT_MODELS:
            raise ValueError(f"unknown flavor {flavor!r}; expected one of {sorted(_DEFAULT_MODELS)}")
        self._flavor: Flavor = flavor
        self._accept_any_key = accept_any_key
        self._auth_header = auth_header.lower() if auth_header else None
        self._models = tuple(models) if models is not None else _DEFAULT_MODELS[flavor]
        self._lock = threading.Lock()
        self._keys: set[str] = {k for k in keys if k}
        self._faults: dict[str, _Slot] = {}
        self._default = default_fault or _OK
        self._default_slots: dict[str, _Slot] = {}
        self._tallies: dict[str, _Tally] = {}
        self._total = 0
        self._ids = itertools.count(1)

    # -- test API ---------------------------------------------------------------------------

    @property
    def flavor(self) -> Flavor:
        return self._flavor

    def add_key(self, secret: str) -> None:
        """Accept this key from now on."""
        if not secret:
            raise ValueError("a key secret must not be empty")
        with self._lock:
            self._keys.add(secret)

    def remove_key(self, secret: str) -> None:
        """Stop accepting this key (401 from now on, unless ``accept_any_key``)."""
        with self._lock:
            self._keys.discard(secret)

    def set_fault(self, secret: str, fault: Fault) -> None:
        """Make this key answer with ``fault`` from its next request on (restarts its state)."""
        with self._lock:
            self._faults[secret] = _Slot.for_key(fault, secret)

    def clear_fault(self, secret: str) -> None:
        """Let this key follow the default fault again."""
        with self._lock:
            self._faults.pop(secret, None)

    def set_default_fault(self, fault: Fault) -> None:
        """The fault of every key without its own; stateful faults keep state per key."""
        with self._lock:
            self._default = fault
            self._default_slots.clear()

    def clear_faults(self) -> None:
        """Every key answers normally again: per-key faults and the default fault are cleared."""
        with self._lock:
            self._faults.clear()
            self._default = _OK
            self._default_slots.clear()

    def fault_of(self, secret: str) -> Fault:
        """The fault configured for this key (its own, else the default)."""
        with self._lock:
            slot = self._faults.get(secret)
            return slot.fault if slot is not None else self._default

    def counters(self, secret: str | None) -> KeyCounters:
        """What this key saw; ``None`` (or ``""``) addresses requests that carried no key."""
        with self._lock:
            tally = self._tallies.get(secret or "")
            return tally.freeze() if tally is not None else KeyCounters()

    def total_requests(self) -> int:
        """Requests that reached the app, with or without a valid key."""
        with self._lock:
            return self._total

    def reset_counters(self) -> None:
        """Zero every counter (requests still in flight keep being tracked as in flight)."""
        with self._lock:
            for secret, tally in list(self._tallies.items()):
                if tally.in_flight:
                    self._tallies[secret] = _Tally(in_flight=tally.in_flight)
                else:
                    del self._tallies[secret]
            self._total = 0

    def __repr__(self) -> str:
        with self._lock:
            keys = "any" if self._accept_any_key else str(len(self._keys))
            faulted = len(self._faults)
            default = self._default
        return (
            f"FakeUpstream(flavor={self._flavor!r}, keys={keys}, faulted_keys={faulted}, "
            f"default_fault={default!r})"
        )

    # -- bookkeeping (called from the serving thread) ---------------------------------------

    def _tally(self, key: str) -> _Tally:
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = _Tally()
        return tally

    def _arrive(self, key: str, endpoint: str) -> None:
        with self._lock:
            self._total += 1
            tally = self._tally(key)
            tally.requests += 1
            tally.in_flight += 1
            tally.by_endpoint[endpoint] += 1

    def _leave(self, key: str) -> None:
        with self._lock:
            tally = self._tally(key)
            tally.in_flight = max(0, tally.in_flight - 1)

    def _record_status(self, key: str, status: int) -> None:
        with self._lock:
            self._tally(key).by_status[status] += 1

    def _bump(self, key: str, **increments: int) -> None:
        with self._lock:
            tally = self._tally(key)
            for name, amount in increments.items():
                setattr(tally, name, getattr(tally, name) + amount)

    def _known(self, secret: str | None) -> bool:
        if not secret:
            return False
        with self._lock:
            return self._accept_any_key or secret in self._keys

    def _draw(self, secret: str) -> Fault:
        with self._lock:
            slot = self._faults.get(secret)
            if slot is None:
                if self._default.kind not in ("flaky", "sequence"):
                    return self._default
                slot = self._default_slots.get(secret)
                if slot is None:
                    slot = self._default_slots[secret] = _Slot.for_key(self._default, secret)
            return slot.draw()

    def _secret(self, headers: Mapping[str, str]) -> str | None:
        if self._auth_header is not None:
            value = headers.get(self._auth_header, "").strip()
            if value.lower().startswith("bearer "):
                value = value[7:].strip()
            if value:
                return value
        scheme, _, token = headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None

    # -- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1003})
            return
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope.get("headers", [])
        }
        path = scope["path"]
        if path.startswith("/v1/") or path == "/v1":
            path = path[3:] or "/"
        beta = path.startswith("/beta/")
        if beta:
            path = path[5:]
        endpoint = "/models" if path.startswith("/models/") else path
        secret = self._secret(headers)
        tally_key = secret or ""
        self._arrive(tally_key, endpoint)
        exchange = _Exchange(self, tally_key, receive, send, f"req_fake_{next(self._ids)}")
        try:
            await self._handle(exchange, scope["method"], path, secret, beta)
        finally:
            self._leave(tally_key)

    @staticmethod
    async def _lifespan(receive: _Receive, send: _Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, ex: _Exchange, method: str, path: str, secret: str | None, beta: bool) -> None:
        try:
            if secret is None or not self._known(secret):
                raise _HTTPError(
                    401,
                    "Authentication failed: missing or unknown API key.",
                    "authentication_error",
                    "invalid_api_key",
                )
            handler = self._route(method, path)
            payload: _JSON = {}
            if method == "POST":
                body = await _read_body(ex.receive)
                if body is None:
                    return
                payload = _parse(body)
            if beta:
                payload["__beta__"] = True
            respond = handler(path, payload)
        except _HTTPError as exc:
            await ex.json(exc.status, exc.body)
            return
        fault = self._draw(secret)
        if respond.prefilled:
            ex.count(prefills=1)
            if fault.kind == "rejects_prefill":
                await ex.json(400, _error_body("Prefill is not supported.", "invalid_request_error", None))
                return
        await self._apply(ex, fault, path, respond)

    def _route(self, method: str, path: str) -> Callable[[str, _JSON], _Answer]:
        routes: dict[str, tuple[str, Callable[[str, _JSON], _Answer]]] = {
            "/chat/completions": ("POST", self._chat),
            "/embeddings": ("POST", self._embeddings),
            "/responses": ("POST", self._responses),
            "/user/balance": ("GET", self._balance),
        }
        if self._flavor != "perplexity":  # like the real service: no model listing
            routes["/models"] = ("GET", self._model_list)
            if path.startswith("/models/"):
                routes[path] = ("GET", self._model)
        if path not in routes:
            raise _HTTPError(
                404, f"Unknown request URL: {method} {path}.", "invalid_request_error", "unknown_url"
            )
        expected, handler = routes[path]
        if method != expected:
            raise _HTTPError(
                405,
                f"Method {method} is not allowed on {path}.",
                "invalid_request_error",
                "method_not_allowed",
            )
        return handler

    async def _apply(self, ex: _Exchange, fault: Fault, path: str, answer: _Answer) -> None:
        kind = fault.kind
        if kind == "status":
            if fault.status_code == 402 and path == "/user/balance":
                await ex.json(200, _balance_body(available=False))
                return
            await ex.error(fault.status_code)
            return
        if kind == "rate_limited":
            await ex.error(429, _retry_headers(fault))
            return
        if kind == "hang":
            ex.count(hangs=1)
            await _wait_for_disconnect(ex.receive, None)
            return
        if kind == "slow" and await _wait_for_disconnect(ex.receive, fault.delay):
            return
        if (
            kind == "keep_alive"
            and answer.events is None
            and await _wait_for_disconnect(ex.receive, fault.delay)
        ):
            return
        breaking = fault if kind in _STREAM_FAULTS else None
        if answer.events is None:
            whole_break = breaking if kind in ("cut_stream", "stall") else None
            await self._send_whole(ex, answer.body, whole_break)
        else:
            await self._send_stream(ex, answer, breaking)

    async def _send_whole(self, ex: _Exchange, payload: _JSON, breaking: Fault | None) -> None:
        data = json.dumps(payload).encode()
        if breaking is None:
            await ex.json(200, payload)
            return
        await ex.start(200, "application/json")
        await ex.body(data[: len(data) // 2], more=True)
        await self._break(ex, breaking)

    async def _send_stream(self, ex: _Exchange, answer: _Answer, breaking: Fault | None) -> None:
        events = answer.events or []
        await ex.start(
            200,
            "text/event-stream; charset=utf-8",
            [("cache-control", "no-cache"), ("connection", "keep-alive")],
        )
        ex.count(streams_started=1)
        kind = breaking.kind if breaking is not None else "ok"
        if breaking is not None and kind in ("keep_alive_cut", "keep_alive"):
            if await self._keep_alive(ex, breaking):
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
            await self._break(ex, breaking)
            return
        await ex.body(answer.terminator, more=False)
        ex.count(streams_completed=1)

    @staticmethod
    async def _keep_alive(ex: _Exchange, fault: Fault) -> bool:
        """Send keep-alive comments; ``True`` if the stream ends there (cut, or the client left)."""
        if fault.kind == "keep_alive_cut":
            for _ in range(fault.after_chunks):
                await ex.body(_KEEP_ALIVE, more=True)
                if await _wait_for_disconnect(ex.receive, fault.delay):
                    return True
            ex.count(cut=1)
            raise DropConnection("stream cut after keep-alives on purpose by FakeUpstream")
        interval = fault.retry_after or 0.05
        deadline = time.monotonic() + fault.delay
        while time.monotonic() < deadline:
            await ex.body(_KEEP_ALIVE, more=True)
            if await _wait_for_disconnect(ex.receive, min(interval, max(0.0, deadline - time.monotonic()))):
                return True
        return False

    @staticmethod
    async def _break(ex: _Exchange, fault: Fault) -> None:
        if fault.kind == "stall":
            ex.count(stalled=1)
            await _wait_for_disconnect(ex.receive, None)
            return
        ex.count(cut=1)
        if fault.mode == "truncate":
            await ex.body(b"", more=False)
            return
        raise DropConnection("response body cut on purpose by FakeUpstream")

    # -- endpoints: validate the request, return the answer to send --------------------------

    def _model_entry(self, model: str) -> _JSON:
        owner = {"openai": "openai", "deepseek": "deepseek", "perplexity": "perplexity"}
        return {"id": model, "object": "model", "created": 1700000000, "owned_by": owner[self._flavor]}

    def _model_list(self, path: str, payload: _JSON) -> _Answer:
        return _Answer({"object": "list", "data": [self._model_entry(m) for m in self._models]})

    def _model(self, path: str, payload: _JSON) -> _Answer:
        model = path.removeprefix("/models/")
        if model not in self._models:
            raise _HTTPError(
                404, f"The model '{model}' does not exist.", "invalid_request_error", "model_not_found"
            )
        return _Answer(self._model_entry(model))

    def _balance(self, path: str, payload: _JSON) -> _Answer:
        return _Answer(_balance_body(available=True))

    def _chat(self, path: str, payload: _JSON) -> _Answer:
        model = _model_of(payload)
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise _HTTPError(
                400,
                "'messages' must be a non-empty list of message objects.",
                "invalid_request_error",
                "invalid_request_error",
            )
        user = [m for m in messages if m.get("role") == "user"]
        text = _text_of(user[-1].get("content")) if user else ""
        prefilled = messages[-1].get("role") == "assistant"
        if prefilled:
            last = messages[-1]
            if self._flavor == "deepseek" and not (last.get("prefix") is True and payload.get("__beta__")):
                raise _HTTPError(
                    400,
                    "A trailing assistant message needs prefix=true on the beta API (/beta).",
                    "invalid_request_error",
                    "invalid_request_error",
                )
            prefix = _text_of(last.get("content"))
            text = text[len(prefix) :] if text.startswith(prefix) else text
        reasoning = (
            f"The user wrote: {text}" if self._flavor == "deepseek" and model == "deepseek-reasoner" else None
        )
        prompt_tokens = sum(_tokens(_text_of(m.get("content"))) for m in messages)
        completion_tokens = _tokens(text) + (_tokens(reasoning) if reasoning else 0)
        usage: _JSON = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if reasoning is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": _tokens(reasoning)}
        extra: _JSON = {}
        if self._flavor == "perplexity":
            extra = {
                "citations": [url for _, url in _CITATIONS],
                "search_results": [{"title": t, "url": u, "date": "2024-01-01"} for t, u in _CITATIONS],
            }
        base: _JSON = {
            "id": f"chatcmpl-fake-{next(self._ids)}",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake",
        }
        if not payload.get("stream"):
            message: _JSON = {"role": "assistant", "content": text}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            return _Answer(
                prefilled=prefilled,
                body={
                    **base,
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
                    "usage": usage,
                    **extra,
                },
            )

        def chunk(delta: _JSON, finish: str | None = None, **more: Any) -> bytes:
            obj = {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                **extra,
                **more,
            }
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        first: _JSON = {"role": "assistant", "content": ""}
        if reasoning is not None:
            first = {"role": "assistant", "content": None, "reasoning_content": ""}
        events = [chunk(first)]
        events += [chunk({"content": None, "reasoning_content": p}) for p in _pieces(reasoning or "")]
        events += [chunk({"content": p}) for p in _pieces(text)]
        options = payload.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        if self._flavor == "deepseek":
            events.append(chunk({}, "stop", usage=usage))
        else:
            events.append(chunk({}, "stop"))
            if include_usage:
                obj = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage, **extra}
                events.append(b"data: " + json.dumps(obj).encode() + b"\n\n")
        return _Answer({}, events, b"data: [DONE]\n\n", prefilled=prefilled)

    def _embeddings(self, path: str, payload: _JSON) -> _Answer:
        model = _model_of(payload)
        raw = payload.get("input")
        items: list[Any]
        if isinstance(raw, str) or (isinstance(raw, list) and raw and all(isinstance(i, int) for i in raw)):
            items = [raw]
        elif isinstance(raw, list) and raw:
            items = raw
        else:
            raise _HTTPError(
                400,
                "'input' must be a string or a non-empty list.",
                "invalid_request_error",
                "invalid_request_error",
            )
        dimensions = payload.get("dimensions", _EMBEDDING_DIMENSIONS)
        if not isinstance(dimensions, int) or not 1 <= dimensions <= 4096:
            raise _HTTPError(
                400,
                "'dimensions' must be an integer in 1..4096.",
                "invalid_request_error",
                "invalid_request_error",
            )
        as_base64 = payload.get("encoding_format") == "base64"
        data = []
        tokens = 0
        for index, item in enumerate(items):
            text = item if isinstance(item, str) else json.dumps(item)
            tokens += _tokens(text) if isinstance(item, str) else len(item)
            vector = _embedding(text, dimensions)
            value: Any = (
                base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode() if as_base64 else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": value})
        return _Answer(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def _responses(self, path: str, payload: _JSON) -> _Answer:
        model = _model_of(payload)
        raw = payload.get("input")
        if isinstance(raw, str):
            text = raw
        elif isinstance(raw, list) and raw:
            user = [i for i in raw if isinstance(i, dict) and i.get("role", "user") == "user"]
            text = _text_of(user[-1].get("content")) if user else ""
        else:
            raise _HTTPError(
                400,
                "'input' must be a string or a non-empty list of items.",
                "invalid_request_error",
                "invalid_request_error",
            )
        number = next(self._ids)
        response_id, message_id = f"resp_fake_{number}", f"msg_fake_{number}"
        in_tokens, out_tokens = _tokens(text), _tokens(text)

        def response(status: str, output_text: str | None) -> _JSON:
            output = (
                []
                if output_text is None
                else [
                    {
                        "type": "message",
                        "id": message_id,
                        "status": "completed",
                        "role": "assistant",
                        "content": [
                            {"type": "output_text", "text": output_text, "annotations": [], "logprobs": []}
                        ],
                    }
                ]
            )
            return {
                "id": response_id,
                "object": "response",
                "created_at": int(time.time()),
                "status": status,
                "model": model,
                "output": output,
                "error": None,
                "incomplete_details": None,
                "instructions": payload.get("instructions"),
                "metadata": {},
                "parallel_tool_calls": True,
                "temperature": 1.0,
                "tool_choice": "auto",
                "tools": [],
                "top_p": 1.0,
                "text": {"format": {"type": "text"}},
                "usage": None
                if output_text is None
                else {
                    "input_tokens": in_tokens,
                    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                    "output_tokens": out_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": in_tokens + out_tokens,
                },
            }

        if not payload.get("stream"):
            return _Answer(response("completed", text))
        sequence = itertools.count()

        def event(obj: _JSON) -> bytes:
            obj["sequence_number"] = next(sequence)
            return f"event: {obj['type']}\ndata: {json.dumps(obj)}\n\n".encode()

        events = [event({"type": "response.created", "response": response("in_progress", None)})]
        events += [
            event(
                {
                    "type": "response.output_text.delta",
                    "item_id": message_id,
                    "output_index": 0,
                    "content_index": 0,
                    "delta": piece,
                    "logprobs": [],
                }
            )
            for piece in _pieces(text)
        ]
        events.append(event({"type": "response.completed", "response": response("completed", text)}))
        # The Responses API ends its stream after response.completed, without a [DONE] line.
        return _Answer({}, events[:-1], events[-1])


@dataclass(frozen=True, slots=True)
class _Answer:
    """A successful answer: a JSON body, or stream events followed by a terminator."""

    body: _JSON
    events: list[bytes] | None = None
    terminator: bytes = b""
    prefilled: bool = False  # a chat request ending with an assistant message


def _parse(body: bytes) -> _JSON:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _HTTPError(
            400, "We could not parse the JSON body of your request.", "invalid_request_error", "invalid_json"
        ) from None
    if not isinstance(payload, dict):
        raise _HTTPError(
            400, "The request body must be a JSON object.", "invalid_request_error", "invalid_json"
        )
    return payload


def _model_of(payload: _JSON) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise _HTTPError(400, "'model' is required.", "invalid_request_error", "invalid_request_error")
    if model == POISON_MODEL:
        raise _HTTPError(
            400,
            f"The model '{POISON_MODEL}' is rejected on purpose.",
            "invalid_request_error",
            "invalid_model",
        )
    return model


def _balance_body(*, available: bool) -> _JSON:
    amount = "10.00" if available else "0.00"
    return {
        "is_available": available,
        "balance_infos": [
            {
                "currency": "USD",
                "total_balance": amount,
                "granted_balance": "0.00",
                "topped_up_balance": amount,
            }
        ],
    }
