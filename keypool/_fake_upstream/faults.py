"""What a key of the fake upstream does wrong: :class:`Fault` values and their per-key state.

A fault is an immutable value a test builds with a class method and hands to the upstream; the
state of the stateful ones (``flaky``, ``sequence``) lives in a :class:`Slot`, one per key, so a
fault can be shared between keys and a seeded run is reproducible.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

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


OK: Final = Fault()
STREAM_FAULTS: Final = frozenset(
    {"cut_stream", "stall", "keep_alive_cut", "keep_alive", "malformed", "error_event"}
)


@dataclass
class Slot:
    """A fault as applied to one key, with that key's generator and sequence cursor."""

    fault: Fault
    rng: random.Random
    cursor: int = 0

    @classmethod
    def for_key(cls, fault: Fault, secret: str) -> Slot:
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
                fault = fault.inner or OK
        if fault.kind == "flaky":
            hit = self.rng.random() < fault.probability
            return (fault.inner or OK) if hit else OK
        return fault


def _seed_of(fault: Fault) -> int | None:
    for step in (*fault.steps, fault.inner):
        if step is not None and step.kind == "flaky" and step.seed is not None:
            return step.seed
    return None
