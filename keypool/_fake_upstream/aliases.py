"""Type aliases the fake upstream's modules share: the ASGI callables, a JSON object, a flavor."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal, TypeAlias

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
JSON: TypeAlias = dict[str, Any]

Flavor: TypeAlias = Literal["openai", "deepseek", "perplexity"]
