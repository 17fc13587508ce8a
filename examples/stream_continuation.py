"""A streamed answer cut halfway is finished on another key: the caller reads one whole answer.

The embedded upstream cuts the first key's stream after five words; the pooled client sends the
conversation again to the other key with those five words as a prefill (DeepSeek's prefix
completion) and splices the rest into the same stream.

Run: .venv/bin/python examples/stream_continuation.py
"""

from __future__ import annotations

import anyio

from keypool import KeyPool, KeySpec
from keypool.testing import FakeUpstream, Fault, LoopbackServer
from providers import AsyncDeepSeek

QUESTION = "tell me a story about a fox who crossed the river at dawn and found a lantern"


async def main() -> None:
    upstream = FakeUpstream(["sk-one", "sk-two"], flavor="deepseek")
    upstream.set_fault("sk-one", Fault.cut_after_tokens(5))  # sk-one's streams break mid-answer
    pool = KeyPool()
    # sk-one takes the call first (the weights make the demonstration deterministic).
    pool.add_provider(
        {"name": "deepseek", "keys": [KeySpec(secret="sk-one", weight=1000), KeySpec(secret="sk-two")]}
    )
    with LoopbackServer(upstream) as server:
        async with AsyncDeepSeek(pool=pool, base_url=server.base_url) as client:
            stream = await client.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": QUESTION}], stream=True
            )
            text, ids = "", set()
            async with stream:
                async for chunk in stream:
                    ids.add(chunk.id)
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
    assert text == QUESTION, text  # the fake answers with the question: whole, not truncated
    print(text)
    print(f"one answer id: {len(ids) == 1}; continued on sk-two: {upstream.counters('sk-two').prefills == 1}")


if __name__ == "__main__":
    anyio.run(main)
