"""MCP tools behind a circuit breaker per endpoint: two replicas of one tool server, one killed.

Two replicas of a tiny MCP tool server run on loopback, each requiring its own bearer token.
``MCPClient`` spreads calls over both; when one replica dies its breaker opens and every call is
answered by the other; when both are gone a call returns a structured fallback at once instead of
hanging or raising.

Run: .venv/bin/python examples/mcp_tools.py
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from pydantic import SecretStr

from keypool import BreakerConfig
from keypool.testing import LoopbackServer
from providers.mcp import MCPClient, MCPEndpoint


def replica(token: str) -> LoopbackServer:
    """One replica of the tool server, answering 401 to any other token."""
    server = MCPServer("search-tools", log_level="ERROR")

    @server.tool()
    async def search(query: str) -> str:
        """Pretend to search."""
        return f"3 results for {query!r}"

    app = server.streamable_http_app(host="127.0.0.1")
    expected = f"Bearer {token}".encode()

    async def require_token(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != expected:
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await app(scope, receive, send)

    return LoopbackServer(require_token, shutdown_timeout=0.2)


async def main() -> None:
    logging.getLogger().setLevel(logging.CRITICAL)  # MCPServer configures root logging; keep it quiet
    east, west = replica("token-east"), replica("token-west")
    await east.astart()
    await west.astart()
    endpoints = [
        MCPEndpoint(f"{east.base_url}/mcp", SecretStr("token-east"), key_id="east"),
        MCPEndpoint(f"{west.base_url}/mcp", SecretStr("token-west"), key_id="west"),
    ]
    breaker = BreakerConfig(failure_threshold=3, timeout=30)
    async with MCPClient("search-tools", endpoints, breaker=breaker, call_timeout=5) as tools:
        result = await tools.call_tool("search", {"query": "circuit breakers"})
        print(f"both replicas up: {result.structured_content['result']}")

        await east.astop()
        print("replica 'east' killed")
        calls = 0
        while tools.pool.key_stats("east")["state"] != "open" and calls < 100:
            result = await tools.call_tool("search", {"query": f"query {calls}"})
            assert not result.is_error, result
            calls += 1
        down, up = tools.pool.key_stats("east"), tools.pool.key_stats("west")
        print(
            f"{calls} calls, all answered; east is {down['state']} after {down['total_failures']} "
            f"failures, west served {up['total_successes']}"
        )

        await west.astop()
        print("replica 'west' killed too")
        for n in range(4):
            started = time.perf_counter()
            fallback = await tools.call_tool("search", {"query": "anything"})
            elapsed = (time.perf_counter() - started) * 1000
            content = fallback.structured_content or {}
            print(
                f"call {n}: fallback in {elapsed:.1f} ms, is_error={fallback.is_error}, "
                f"error={content['error']!r}, endpoints={content['endpoints']}, "
                f"retry_after={content['retry_after']:.1f} s"
            )
        print(f"  {fallback.content[0].text}")  # type: ignore[union-attr]
        print(f"capacity: {tools.capacity().status}")


if __name__ == "__main__":
    anyio.run(main)
