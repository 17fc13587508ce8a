"""Helpers shared by the provider test modules: one loopback server whose upstream can be swapped."""

from __future__ import annotations

from typing import Any

from keypool.testing import FakeUpstream


class Swap:
    """An ASGI app that forwards to whichever upstream the current test installed."""

    def __init__(self) -> None:
        self.app: FakeUpstream = FakeUpstream()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def messages(text: str) -> Any:
    return [{"role": "user", "content": text}]
