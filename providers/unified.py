"""UnifiedAgent: one door to every chat provider and tool server, with fallback and load shedding.

``chat()`` takes OpenAI-style arguments plus a priority. Providers are tried in the configured
order, each with its own model name (``deepseek-chat`` on DeepSeek is ``sonar`` on Perplexity); a
provider whose capacity is ``critical`` or ``down`` goes to the back of the line, and a provider
whose attempts are spent hands over to the next. One attempt budget and one deadline cover every
retry and fallback of a call (:func:`keypool.request_budget`), and no provider is tried twice.

Load shedding protects critical traffic: when the healthy share of all providers together falls
below ``shed_low_below``, ``low`` calls are refused at once with :class:`keypool.LoadShed` (which
carries ``retry_after``); below ``shed_normal_below``, ``normal`` calls too. ``critical`` calls
always get whatever keys remain.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import openai
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from keypool import (
    Capacity,
    ConfigError,
    KeyPoolError,
    LoadShed,
    NoKeyAvailable,
    classify_exception,
    request_budget,
)

from ._openai import AsyncPooledOpenAI

__all__ = ["AgentResponse", "ChatRoute", "Priority", "SheddingPolicy", "ToolServer", "UnifiedAgent"]

Priority = Literal["critical", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("critical", "normal", "low")
_DEFAULT_RETRY_AFTER = 1.0


@dataclass(frozen=True, slots=True)
class ChatRoute:
    """A chat provider in the fallback order, with how canonical model names map onto its own."""

    client: AsyncPooledOpenAI
    models: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.client.provider

    def model_for(self, model: str) -> str:
        return self.models.get(model, model)


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

    ``fallbacks`` names the providers passed over before the one that served, in the configured
    order, whether they were tried and failed or skipped because they could not take calls.
    """

    response: ChatCompletion
    provider: str
    model: str
    key_id: str
    attempts: int
    fallbacks: tuple[str, ...]


class ToolServer(Protocol):
    """What the agent needs from a tool client (``providers.MCPClient`` is one)."""

    name: str

    async def call_tool(self, name: str, arguments: Mapping[str, Any] | None = None) -> Any: ...

    def capacity(self) -> Capacity: ...


class UnifiedAgent:
    """Chat across providers in order, tools through their breakers, and shed load by priority."""

    def __init__(
        self,
        routes: Sequence[ChatRoute],
        *,
        tools: Iterable[ToolServer] = (),
        shedding: SheddingPolicy | None = None,
        max_attempts: int = 6,
        timeout: float | None = 60.0,
    ) -> None:
        if not routes:
            raise ConfigError("routes: at least one chat provider is required")
        names = [r.name for r in routes]
        if len(set(names)) != len(names):
            raise ConfigError(f"routes: provider names must be unique (got {names})")
        if max_attempts < 1:
            raise ConfigError(f"max_attempts: must be >= 1 (got {max_attempts})")
        self.routes = tuple(routes)
        self.tools = {t.name: t for t in tools}
        self.shedding = shedding or SheddingPolicy()
        self.max_attempts = max_attempts
        self.timeout = timeout
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
        """Healthy and degraded providers first, then critical ones, then down ones (a down
        provider may still recover inside the deadline), each group in the configured order."""
        rank = {"healthy": 0, "degraded": 0, "critical": 1, "down": 2}
        return sorted(self.routes, key=lambda r: rank[caps[r.name].status])

    def _passed_over(self, served: ChatRoute, tried: Sequence[str]) -> tuple[str, ...]:
        """The providers the call fell back from, in the configured order: those tried before the
        one that served, and those ahead of it that were skipped (down, or moved back as critical).
        """
        ahead = {r.name for r in self.routes[: self.routes.index(served)]}
        passed = ahead | set(tried[:-1])
        return tuple(r.name for r in self.routes if r.name in passed)

    # ------------------------------------------------------------------ chat

    async def chat(
        self,
        *,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        priority: Priority = "normal",
        **options: Any,
    ) -> AgentResponse:
        """Answer a chat request from the first provider that can, in the configured order."""
        if options.get("stream"):
            raise ConfigError("stream: UnifiedAgent.chat returns whole responses; use a client to stream")
        caps = {r.name: r.client.pool.capacity(r.name) for r in self.routes}
        self._admit(priority, caps)
        order = self._order(caps)
        tried: list[str] = []
        last: BaseException | None = None
        with request_budget(attempts=self.max_attempts, timeout=self.timeout) as budget:
            for route in order:
                if budget.exhausted():
                    break
                tried.append(route.name)
                provider_model = route.model_for(model)
                try:
                    response = await route.client.chat.completions.create(
                        model=provider_model,
                        messages=cast("list[ChatCompletionMessageParam]", list(messages)),
                        **options,
                    )
                except (NoKeyAvailable, openai.APIConnectionError) as exc:
                    last = exc
                    continue
                except openai.APIStatusError as exc:
                    if not classify_exception(exc).kind.retry_elsewhere:
                        raise  # the request is wrong: another provider would refuse it too
                    last = exc
                    continue
                except KeyPoolError as exc:
                    last = exc
                    continue
                provider, key_id = budget.served_by or (route.name, "")
                return AgentResponse(
                    response=response,
                    provider=provider,
                    model=provider_model,
                    key_id=key_id,
                    attempts=budget.attempts_used,
                    fallbacks=self._passed_over(route, tried),
                )
        caps = {r.name: r.client.pool.capacity(r.name) for r in self.routes}
        waits = [c.next_recovery_in for c in caps.values() if c.next_recovery_in is not None]
        if any(c.status != "down" for c in caps.values()):
            waits.append(_DEFAULT_RETRY_AFTER)  # keys are still in service: the budget ran out first
        raise NoKeyAvailable(
            ",".join(r.name for r in self.routes),
            min(waits) if waits else None,
            f"tried {tried or 'no provider'} with {budget.attempts_used} attempt(s)"
            + (f"; last error: {type(last).__name__}" if last else ""),
        ) from last

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
