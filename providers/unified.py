"""UnifiedAgent: one door to every chat provider and tool server, with fallback and load shedding.

``chat()`` takes OpenAI-style arguments plus a priority, streamed (``stream=True``: an
:class:`AgentStream`) or not (an :class:`AgentResponse`). Routes are tried in the configured
order, each with its own model name (``deepseek-chat`` on DeepSeek is ``sonar`` on Perplexity):
a provider with a trial call due goes first (a healed provider gets the calls that close it again
even while a fallback is healthy), then healthy and degraded ones, then ``critical`` ones, then
``down`` ones. One attempt budget and one deadline cover every retry and fallback of a call
(:func:`keypool.request_budget` with ``fallback=True``): a provider that times out or fails twice
in a row hands over to the next route at once instead of being retried key after key, and no
provider is tried twice.

Errors by class: an endpoint failure or a refusal moves to the next route; a request too long
for the model (``context_length_exceeded``) goes to the route's ``on_context_length`` fallback if
it has one; a content-policy rejection and every other 4xx propagate at once, unchanged.

Load shedding protects critical traffic: when the healthy share of all providers together falls
below ``shed_low_below``, ``low`` calls are refused at once with :class:`keypool.LoadShed` (which
carries ``retry_after``); below ``shed_normal_below``, ``normal`` calls too. ``critical`` calls
always get whatever keys remain.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol, cast, overload

import httpx2
import openai
from openai import AsyncStream
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from keypool import (
    Capacity,
    ConfigError,
    KeyPoolError,
    LoadShed,
    NoKeyAvailable,
    RequestBudget,
    Splice,
    StreamInterrupted,
    classify_exception,
    request_budget,
)

from ._openai import AsyncPooledOpenAI

__all__ = [
    "AgentResponse",
    "AgentStream",
    "ChatRoute",
    "Priority",
    "SheddingPolicy",
    "ToolServer",
    "UnifiedAgent",
]

Priority = Literal["critical", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("critical", "normal", "low")
_DEFAULT_RETRY_AFTER = 1.0
_CONTEXT_LENGTH_CODES = frozenset({"context_length_exceeded", "context_window_exceeded"})
_CONTEXT_LENGTH_WORDS = ("maximum context length", "context_length_exceeded", "context window")


@dataclass(frozen=True, slots=True)
class ChatRoute:
    """A chat provider in the fallback order, with how canonical model names map onto its own.

    ``on_context_length``: where a request too long for the model goes instead of failing: a
    model name on this route's provider (one with a larger context), or another route.
    """

    client: AsyncPooledOpenAI
    models: Mapping[str, str] = field(default_factory=dict)
    on_context_length: str | ChatRoute | None = None

    @property
    def name(self) -> str:
        return self.client.provider

    def model_for(self, model: str) -> str:
        return self.models.get(model, model)


_Leg = tuple[ChatRoute, str]  # a route and the provider's model name it is asked for


@dataclass(frozen=True, slots=True)
class SheddingPolicy:
    """Healthy-share levels below which ``low``, then ``normal``, calls are refused."""

    shed_low_below: float = 0.5
    shed_normal_below: float = 0.25

    def __post_init__(self) -> None:
        for name in ("shed_low_below", "shed_normal_below"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}: must be within [0, 1] (got {value})")
        if self.shed_normal_below > self.shed_low_below:
            raise ConfigError("shed_normal_below: must be <= shed_low_below (low is shed first)")

    def sheds(self, priority: Priority, healthy_share: float) -> bool:
        if priority == "low":
            return healthy_share < self.shed_low_below
        if priority == "normal":
            return healthy_share < self.shed_normal_below
        return False


@dataclass(frozen=True, slots=True)
class AgentResponse:
    """A provider's response, and which provider, model and key served it after how many attempts.

    ``model`` is the model that answered (the response's own ``model`` field, else the one asked
    for). ``fallbacks`` names the providers passed over before the one that served, in the
    configured order, whether they were tried and failed or skipped because they could not take
    calls.
    """

    response: ChatCompletion
    provider: str
    model: str
    key_id: str
    attempts: int
    fallbacks: tuple[str, ...]


class AgentStream:
    """A streamed answer from the route that served it: iterate it like the ``openai`` stream it
    wraps (the same :class:`ChatCompletionChunk` objects), use it as a context manager, or
    ``close()`` it. Routes were failed over before its first content token; ``provider``,
    ``key_id``, ``attempts`` and ``fallbacks`` say who served; ``model`` is the model that answered
    and ``usage`` the serving route's, once its final chunk has arrived.

    A stream that breaks after content, once its own provider could not finish it, is continued on
    the next routes that take a prefill (``continued_by`` names them): the caller reads one answer
    with one ``id``. If none can, the original break is raised (an ``openai.APIError`` that is also
    a :class:`keypool.StreamInterrupted`)."""

    def __init__(
        self,
        stream: AsyncStream[ChatCompletionChunk],
        head: list[ChatCompletionChunk],
        rest: AsyncIterator[ChatCompletionChunk],
        *,
        provider: str,
        model: str,
        key_id: str,
        attempts: int,
        fallbacks: tuple[str, ...],
        onward: Sequence[_Leg] = (),
        request: Mapping[str, Any] | None = None,
        max_continuations: int = 0,
        budget: RequestBudget,
    ) -> None:
        self.stream = stream
        self._head = head
        self._rest = rest
        self.provider = provider
        self.model = model
        self.key_id = key_id
        self.attempts = attempts
        self.fallbacks = fallbacks
        self.usage: CompletionUsage | None = None
        self.continued_by: list[str] = []
        self._onward = list(onward)
        self._request = dict(request or {})
        self._left = max_continuations
        self._budget = budget  # the call's: continuations spend what its attempts and time left
        self._first: ChatCompletionChunk | None = None
        self._text: list[str] = []
        self._plain = True  # one choice of plain content so far: a prefill can finish it
        self._open: list[AsyncStream[ChatCompletionChunk]] = [stream]
        for chunk in head:
            self._note(chunk)

    @property
    def response(self) -> Any:
        """The HTTP response of the serving attempt (as on ``openai``'s stream)."""
        return self.stream.response

    def _note(self, chunk: ChatCompletionChunk) -> None:
        if self._first is None:
            self._first = chunk
        if chunk.model:
            self.model = chunk.model
        if chunk.usage is not None:
            self.usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            if (
                choice.index
                or delta.tool_calls
                or delta.function_call
                or getattr(delta, "reasoning_content", None)
            ):
                self._plain = False
            elif delta.content:
                self._text.append(delta.content)

    def __aiter__(self) -> AgentStream:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        if self._head:
            return self._head.pop(0)
        while True:
            try:
                chunk = await self._rest.__anext__()
            except StreamInterrupted as broke:
                self._rest = await self._continue(broke)
                continue
            self._note(chunk)
            return chunk

    async def _continue(self, broke: StreamInterrupted) -> AsyncIterator[ChatCompletionChunk]:
        """The rest of the answer from the next route that can finish it, or the break itself."""
        delivered = "".join(self._text)
        while self._left > 0 and self._onward and self._plain and delivered and self._first is not None:
            route, model = self._onward.pop(0)
            if route.client.keypool_settings.prefill is None:
                continue  # this route cannot take the text so far as a prefill
            budget = self._budget
            if budget.exhausted():
                break  # the call's deadline or attempts are spent: the break stands
            self._left -= 1
            try:
                client, kwargs = route.client.continuation({**self._request, "model": model}, delivered)
                with request_budget(
                    attempts=budget.attempts_left,
                    timeout=budget.remaining_time(),
                    fallback=bool(self._onward),
                ) as spent:
                    try:
                        stream = await client.chat.completions.create(**kwargs, stream=True)
                    finally:
                        budget.attempts_left -= spent.attempts_used
            except (openai.APIError, KeyPoolError, httpx2.TransportError):
                continue  # refused (a 400 to the prefill, no key): the next route, else the break
            self._open.append(stream)
            self.continued_by.append(route.name)
            return _spliced(stream, Splice(self._first.id, self._first.model, self._first.created))
        raise broke

    async def close(self) -> None:
        for stream in self._open:
            await stream.close()

    async def __aenter__(self) -> AgentStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AgentStream(provider={self.provider!r}, model={self.model!r}, key_id={self.key_id!r})"


async def _spliced(
    stream: AsyncStream[ChatCompletionChunk], splice: Splice
) -> AsyncIterator[ChatCompletionChunk]:
    async for chunk in stream:
        yield cast("ChatCompletionChunk", splice.chunk(chunk))


class ToolServer(Protocol):
    """What the agent needs from a tool client (``providers.MCPClient`` is one)."""

    name: str

    async def call_tool(self, name: str, arguments: Mapping[str, Any] | None = None) -> Any: ...

    def capacity(self) -> Capacity: ...


def context_length_exceeded(exc: openai.APIStatusError) -> bool:
    """Whether a 400 says the request is too long for the model (OpenAI's code, or the message
    OpenAI-compatible servers such as DeepSeek send)."""
    if exc.status_code != 400:
        return False
    if exc.code in _CONTEXT_LENGTH_CODES:
        return True
    text = str(exc.message).lower()
    return any(word in text for word in _CONTEXT_LENGTH_WORDS)


def _has_content(chunk: ChatCompletionChunk) -> bool:
    """A chunk the caller would see as part of the answer (content, a tool call, reasoning, or the
    end of a choice), as opposed to a role-only opening chunk."""
    for choice in chunk.choices:
        delta = choice.delta
        if choice.finish_reason or delta.content or delta.tool_calls or delta.function_call:
            return True
        if getattr(delta, "reasoning_content", None):
            return True
    return chunk.usage is not None


class UnifiedAgent:
    """Chat across providers in order, tools through their breakers, and shed load by priority.

    ``timeout`` is the whole call's deadline (every attempt, wait and fallback), ``max_attempts``
    its attempt budget; ``max_wait`` is how long a route that is not the last may wait for a
    throttle or a recovery before the next route is tried instead (the last route waits as long as
    its provider's ``max_wait``). ``max_continuations``: how many other routes may be asked to finish
    a streamed answer that broke after content (each a prefill of the text so far).
    """

    def __init__(
        self,
        routes: Sequence[ChatRoute],
        *,
        tools: Iterable[ToolServer] = (),
        shedding: SheddingPolicy | None = None,
        max_attempts: int = 6,
        timeout: float | None = 600.0,
        max_wait: float = 1.0,
        max_continuations: int = 2,
    ) -> None:
        if not routes:
            raise ConfigError("routes: at least one chat provider is required")
        names = [r.name for r in routes]
        if len(set(names)) != len(names):
            raise ConfigError(f"routes: provider names must be unique (got {names})")
        if max_attempts < 1:
            raise ConfigError(f"max_attempts: must be >= 1 (got {max_attempts})")
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"timeout: must be a number of seconds > 0, or None (got {timeout!r})")
        if not max_wait >= 0:
            raise ConfigError(f"max_wait: must be a number of seconds >= 0 (got {max_wait!r})")
        if (
            isinstance(max_continuations, bool)
            or not isinstance(max_continuations, int)
            or max_continuations < 0
        ):
            raise ConfigError(f"max_continuations: must be an integer >= 0 (got {max_continuations!r})")
        self.routes = tuple(routes)
        self.tools = {t.name: t for t in tools}
        self.shedding = shedding or SheddingPolicy()
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.max_wait = max_wait
        self.max_continuations = max_continuations
        self._hasty: dict[int, AsyncPooledOpenAI] = {}
        self.accepted: Counter[str] = Counter()
        self.shed: Counter[str] = Counter()

    # ------------------------------------------------------------------ capacity and shedding

    def capacity(self) -> dict[str, Capacity]:
        """Every chat provider's and tool server's capacity, by name."""
        out = {r.name: r.client.pool.capacity(r.name) for r in self.routes}
        out.update({name: tool.capacity() for name, tool in self.tools.items()})
        return out

    def healthy_share(self, capacities: Mapping[str, Capacity] | None = None) -> float:
        """Closed keys over the keys that serve, of every chat provider together (idle backup
        keys are a reserve, not capacity)."""
        caps = capacities or {r.name: r.client.pool.capacity(r.name) for r in self.routes}
        total = sum(c.serving for c in caps.values())
        return sum(c.healthy_share * c.serving for c in caps.values()) / total if total else 0.0

    def priority_stats(self) -> dict[str, dict[str, int]]:
        """Accepted and shed calls per priority (for metrics)."""
        return {p: {"accepted": self.accepted[p], "shed": self.shed[p]} for p in PRIORITIES}

    def _admit(self, priority: Priority, caps: Mapping[str, Capacity]) -> None:
        if priority not in PRIORITIES:
            raise ConfigError(f"priority: must be one of {list(PRIORITIES)} (got {priority!r})")
        share = self.healthy_share(caps)
        if self.shedding.sheds(priority, share):
            self.shed[priority] += 1
            waits = [c.next_recovery_in for c in caps.values() if c.next_recovery_in is not None]
            retry_after = min(waits) if waits else _DEFAULT_RETRY_AFTER
            for route in self.routes:
                route.client.pool.note_rejected(route.name, "load_shed")
            raise LoadShed(
                ",".join(caps),
                retry_after,
                f"{priority!r} call shed: healthy share {share:.0%} is below the level for it",
            )
        self.accepted[priority] += 1

    def _order(self, caps: Mapping[str, Capacity]) -> list[ChatRoute]:
        """A provider with a trial call due first (its recovery needs calls), then healthy and
        degraded providers, then critical ones, then down ones (a down provider may still recover
        inside the deadline), each group in the configured order."""
        rank = {"healthy": 1, "degraded": 1, "critical": 2, "down": 3}

        def place(route: ChatRoute) -> int:
            cap = caps[route.name]
            return 0 if cap.trial_ready else rank[cap.status]

        return sorted(self.routes, key=place)

    def _passed_over(self, served: ChatRoute, tried: Sequence[str]) -> tuple[str, ...]:
        """The providers the call fell back from, in the configured order: those tried before the
        one that served, and those ahead of it that were skipped (down, or moved back as critical).
        """
        index = self.routes.index(served) if served in self.routes else len(self.routes)
        ahead = {r.name for r in self.routes[:index]}
        passed = (ahead | set(tried)) - {served.name}
        return tuple(r.name for r in self.routes if r.name in passed)

    def _client(self, route: ChatRoute, last: bool) -> AsyncPooledOpenAI:
        """The route's client; one that is not the last to try waits at most ``max_wait``."""
        if last:
            return route.client
        hasty = self._hasty.get(id(route))
        if hasty is None:
            hasty = self._hasty[id(route)] = route.client.with_options(max_wait=self.max_wait)
        return hasty

    # ------------------------------------------------------------------ chat

    @overload
    async def chat(
        self,
        *,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        priority: Priority = ...,
        stream: Literal[False] = ...,
        **options: Any,
    ) -> AgentResponse: ...

    @overload
    async def chat(
        self,
        *,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        priority: Priority = ...,
        stream: Literal[True],
        **options: Any,
    ) -> AgentStream: ...

    async def chat(
        self,
        *,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        priority: Priority = "normal",
        stream: bool = False,
        **options: Any,
    ) -> AgentResponse | AgentStream:
        """Answer a chat request from the first route that can, in the order above; streamed
        (``stream=True``), the routes are failed over until one has sent its first content token."""
        caps = {r.name: r.client.pool.capacity(r.name) for r in self.routes}
        self._admit(priority, caps)
        order = self._order(caps)
        tried: list[str] = []
        last: BaseException | None = None
        sent = cast("list[ChatCompletionMessageParam]", list(messages))
        stretched: set[int] = set()  # routes (by id) whose context-length fallback was taken
        with request_budget(attempts=self.max_attempts, timeout=self.timeout, fallback=True) as budget:
            for index, route in enumerate(order):
                leg: _Leg | None = (route, route.model_for(model))
                final = index == len(order) - 1
                # With a route after this one, a failing provider is left at once; the last one
                # gets the pooled client's own retries (spaced by its backoff) instead.
                budget.fallback = not final
                while leg is not None and not budget.exhausted():
                    current, asked = leg
                    leg = None
                    if current.name not in tried:
                        tried.append(current.name)
                    client = self._client(current, final and current is route)
                    try:
                        if stream:
                            onward = [(r, r.model_for(model)) for r in order[index + 1 :]]
                            return await self._stream(
                                client, current, asked, sent, options, budget, tried, onward
                            )
                        response = await client.chat.completions.create(model=asked, messages=sent, **options)
                    except openai.APIStatusError as exc:
                        if context_length_exceeded(exc) and current.on_context_length is not None:
                            if id(current) in stretched:
                                raise  # the larger context was too small as well
                            stretched.add(id(current))
                            leg = _larger(current, model)
                            last = exc
                            continue
                        if not classify_exception(exc).kind.retry_elsewhere:
                            raise  # the request is wrong: another provider would refuse it too
                        last = exc
                        continue
                    except (NoKeyAvailable, openai.APIError, KeyPoolError, httpx2.TransportError) as exc:
                        last = exc
                        continue
                    provider, key_id = budget.served_by or (current.name, "")
                    return AgentResponse(
                        response=response,
                        provider=provider,
                        model=response.model or asked,
                        key_id=key_id,
                        attempts=budget.attempts_used,
                        fallbacks=self._passed_over(current, tried),
                    )
                if budget.exhausted():
                    break
        raise self._exhausted(tried, budget, last) from last

    async def _stream(
        self,
        client: AsyncPooledOpenAI,
        route: ChatRoute,
        model: str,
        messages: list[ChatCompletionMessageParam],
        options: Mapping[str, Any],
        budget: RequestBudget,
        tried: list[str],
        onward: Sequence[_Leg],
    ) -> AgentStream:
        """Open a stream on one route and read it up to its first content token: a failure before
        that is invisible to the caller, so it raises here and the next route is tried."""
        stream = await client.chat.completions.create(model=model, messages=messages, stream=True, **options)
        rest = stream.__aiter__()
        head: list[ChatCompletionChunk] = []
        try:
            async for chunk in rest:
                head.append(chunk)
                if _has_content(chunk):
                    break
        except BaseException:
            await stream.close()
            raise
        provider, key_id = budget.served_by or (route.name, "")
        return AgentStream(
            stream,
            head,
            rest,
            provider=provider,
            model=model,
            key_id=key_id,
            attempts=budget.attempts_used,
            fallbacks=self._passed_over(route, tried),
            onward=onward,
            request={"messages": messages, **options},
            max_continuations=self.max_continuations,
            budget=budget,
        )

    def _exhausted(
        self, tried: list[str], budget: RequestBudget, last: BaseException | None
    ) -> NoKeyAvailable:
        caps = {r.name: r.client.pool.capacity(r.name) for r in self.routes}
        waits = [c.next_recovery_in for c in caps.values() if c.next_recovery_in is not None]
        if any(c.status != "down" for c in caps.values()):
            waits.append(_DEFAULT_RETRY_AFTER)  # keys are still in service: the budget ran out first
        return NoKeyAvailable(
            ",".join(r.name for r in self.routes),
            min(waits) if waits else None,
            f"tried {tried or 'no provider'} with {budget.attempts_used} attempt(s)"
            + (f"; last error: {type(last).__name__}" if last else ""),
        )

    # ------------------------------------------------------------------ tools

    async def call_tool(self, server: str, name: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Call a tool on a named tool server, through that server's breakers."""
        try:
            tool = self.tools[server]
        except KeyError:
            raise ConfigError(
                f"server: unknown tool server {server!r}; known: {sorted(self.tools)}"
            ) from None
        return await tool.call_tool(name, arguments)


def _larger(route: ChatRoute, model: str) -> _Leg:
    """Where a request too long for ``route`` goes: a larger model there, or another route."""
    target = route.on_context_length
    if isinstance(target, ChatRoute):
        return target, target.model_for(model)
    assert target is not None
    return route, target
