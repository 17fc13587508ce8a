"""One agent over DeepSeek and Perplexity: fall back when DeepSeek is down, shed low-priority load.

DeepSeek and Perplexity are simulated on loopback (``keypool.testing.FakeUpstream``), DeepSeek
answering 503 on every key. Every call is answered by Perplexity with the mapped model. After a few
calls DeepSeek's breakers are open, the healthy share of all keys drops below half, and ``low``
calls are refused at once with ``LoadShed`` while ``critical`` ones are still served.

Run: .venv/bin/python examples/unified_agent.py
"""

from __future__ import annotations

import logging

import anyio

from keypool import LoadShed
from keypool.testing import FakeUpstream, Fault, LoopbackServer
from providers import AsyncDeepSeek, AsyncPerplexity
from providers.unified import ChatRoute, Priority, UnifiedAgent

DEEPSEEK_KEYS = ["sk-ds-1", "sk-ds-2", "sk-ds-3"]
PERPLEXITY_KEYS = ["pplx-1", "pplx-2"]


async def main() -> None:
    logging.basicConfig(format="   [log] %(message)s")  # breaker transitions are logged as warnings
    deepseek_upstream = FakeUpstream(DEEPSEEK_KEYS, flavor="deepseek")
    deepseek_upstream.set_default_fault(Fault.status(503))  # DeepSeek is having a bad hour
    perplexity_upstream = FakeUpstream(PERPLEXITY_KEYS, flavor="perplexity")
    question = [{"role": "user", "content": "What is a circuit breaker?"}]
    async with LoopbackServer(deepseek_upstream) as ds, LoopbackServer(perplexity_upstream) as px:
        # -- the agent, as you would write it ---------------------------------------------------
        deepseek = AsyncDeepSeek(api_keys=DEEPSEEK_KEYS, base_url=ds.base_url)
        perplexity = AsyncPerplexity(api_keys=PERPLEXITY_KEYS, base_url=px.base_url)
        agent = UnifiedAgent([ChatRoute(deepseek), ChatRoute(perplexity, models={"deepseek-chat": "sonar"})])
        for n in range(10):
            priority: Priority = "low" if n % 2 else "critical"
            try:
                answer = await agent.chat(model="deepseek-chat", messages=question, priority=priority)
                print(
                    f"{n} {priority:8}: {answer.provider}/{answer.model}, fell back from {answer.fallbacks}"
                )
            except LoadShed as shed:
                print(f"{n} {priority:8}: shed, retry in {shed.retry_after:.0f} s")
        async with await agent.chat(model="deepseek-chat", messages=question, stream=True) as stream:
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        print(f"streamed by {stream.provider}/{stream.model}: {text!r}")
        # ----------------------------------------------------------------------------------------
        print(f"citations came along: {answer.response.citations}")  # type: ignore[attr-defined]
        print("capacity:", {name: c.status for name, c in agent.capacity().items()})
        print("per priority:", agent.priority_stats())
        await deepseek.close()
        await perplexity.close()


if __name__ == "__main__":
    anyio.run(main)
