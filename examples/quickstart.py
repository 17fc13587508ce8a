"""Quickstart: a DeepSeek client over three keys, one of them down, against the embedded upstream.

Run: .venv/bin/python examples/quickstart.py
"""

from __future__ import annotations

import anyio

from keypool import BreakerConfig
from keypool.testing import FakeUpstream, Fault, LoopbackServer
from providers import AsyncDeepSeek


async def main() -> None:
    upstream = FakeUpstream(["sk-one", "sk-two", "sk-three"], flavor="deepseek")
    upstream.set_fault("sk-two", Fault.status(503))  # one key's backend is down
    with LoopbackServer(upstream) as server:
        client = AsyncDeepSeek(
            api_keys=["sk-one", "sk-two", "sk-three"],
            base_url=server.base_url,
            breaker=BreakerConfig(failure_threshold=5, timeout=60),
        )
        for _ in range(40):
            reply = await client.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": "hello"}]
            )
        print(reply.choices[0].message.content)  # every call succeeded
        capacity = client.pool.capacity("deepseek")
        print(f"status={capacity.status} open={capacity.open} closed={capacity.closed}")
        print(f"attempts on the dead key: {upstream.counters('sk-two').requests}")
        await client.close()


if __name__ == "__main__":
    anyio.run(main)
