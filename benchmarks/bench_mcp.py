"""What ``MCPClient`` costs per tool call over a bare ``mcp.Client`` session.

One MCP tool server (an async ``echo`` tool) runs under uvicorn on loopback. In the same run, a
bare ``mcp.Client`` session and an ``MCPClient`` (one endpoint, its breaker, the observing
transport, the per-call deadline) call ``echo`` in interleaved rounds, so machine noise hits both
alike. Prints each median, the ratio and the overhead in milliseconds.

Run: .venv/bin/python benchmarks/bench_mcp.py [--rounds N] [--calls N]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Awaitable, Callable

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer

from keypool.testing import LoopbackServer
from providers.mcp import MCPClient

WARMUP = 30


def tool_server() -> LoopbackServer:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    server = MCPServer("bench-tools", log_level="ERROR")
    root.setLevel(level)  # MCPServer configures root logging; undo it
    root.handlers[:] = handlers

    @server.tool()
    async def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    return LoopbackServer(server.streamable_http_app(host="127.0.0.1"), shutdown_timeout=0.2)


async def timed(call: Callable[[], Awaitable[object]], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


async def main(rounds: int, calls: int) -> None:
    async with tool_server() as server:
        url = f"{server.base_url}/mcp"
        async with (
            httpx2.AsyncClient(timeout=httpx2.Timeout(30.0)) as http,
            Client(streamable_http_client(url, http_client=http)) as bare,
            MCPClient("bench-tools", [url]) as pooled,
        ):

            async def bare_call() -> None:
                result = await bare.call_tool("echo", {"text": "x"})
                assert not result.is_error

            async def pooled_call() -> None:
                result = await pooled.call_tool("echo", {"text": "x"})
                assert not result.is_error

            await timed(bare_call, WARMUP)
            await timed(pooled_call, WARMUP)
            base: list[float] = []
            ours: list[float] = []
            for i in range(rounds):  # interleaved, alternating which goes first
                first, second = (bare_call, pooled_call) if i % 2 == 0 else (pooled_call, bare_call)
                a = await timed(first, calls)
                b = await timed(second, calls)
                base += a if first is bare_call else b
                ours += b if first is bare_call else a
    b_med, o_med = statistics.median(base), statistics.median(ours)
    b_p90 = statistics.quantiles(base, n=10)[-1]
    o_p90 = statistics.quantiles(ours, n=10)[-1]
    print(f"call_tool('echo') on loopback, {rounds} interleaved rounds x {calls} calls each")
    print(f"  bare mcp.Client : median {b_med * 1000:6.3f} ms   p90 {b_p90 * 1000:6.3f} ms")
    print(f"  MCPClient       : median {o_med * 1000:6.3f} ms   p90 {o_p90 * 1000:6.3f} ms")
    print(f"  ratio {o_med / b_med:.3f}, overhead {(o_med - b_med) * 1000:+.3f} ms per call")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    anyio.run(main, args.rounds, args.calls)
