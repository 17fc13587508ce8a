"""Streams through a pooled client vs the plain ``openai`` client, same upstream, same run.

Against ``FakeUpstream`` on loopback (``LoopbackServer``), interleaved rounds:

* time to first token: ``create(stream=True)`` until the first content delta;
* per-chunk overhead: a long answer (one chunk per word) read to its end, pooled minus plain,
  divided by its chunks; and ``EventScanner.feed`` alone, per event;
* continuation: the extra time an answer takes when its stream is cut halfway and finished on
  another key (prefill), against the same answer streamed cleanly by the pooled client.

Run: .venv/bin/python benchmarks/bench_streams.py
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import anyio
import openai

from keypool import KeyPool, KeySpec
from keypool._sse import EventScanner
from keypool.testing import FakeUpstream, Fault, LoopbackServer
from providers import AsyncDeepSeek

ROUNDS = 15
SHORT_CALLS = 40  # per round, for time to first token
LONG_WORDS = 2_000  # chunks of the long answer
SECRETS = {"alpha": "sk-bench-streams-alpha", "bravo": "sk-bench-streams-bravo"}
SHORT = "one two three four five six seven eight"
LONG = " ".join(f"w{i}" for i in range(LONG_WORDS))


def pool() -> KeyPool:
    made = KeyPool(seed=1)
    weights = {"alpha": 1_000_000.0, "bravo": 1.0}  # alpha serves first, bravo continues
    keys = [KeySpec(secret=s, key_id=k, weight=weights[k]) for k, s in SECRETS.items()]
    made.add_provider({"name": "deepseek", "keys": keys})
    return made


async def first_token(client: Any) -> float:
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": SHORT}], stream=True
    )
    async with stream:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                elapsed = time.perf_counter() - start
                break
        async for _ in stream:
            pass
    return elapsed


PAUSES: list[float] = []  # the longest pause between two chunks of each answer read by whole()


async def whole(client: Any, text: str) -> tuple[float, str]:
    start = time.perf_counter()
    parts: list[str] = []
    stream = await client.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": text}], stream=True
    )
    last, pause = time.perf_counter(), 0.0
    async with stream:
        async for chunk in stream:
            now = time.perf_counter()
            pause, last = max(pause, now - last), now
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
    PAUSES.append(pause)
    return time.perf_counter() - start, "".join(parts)


def scanner_cost() -> float:
    """µs per event of the scanner alone, on the fake upstream's own chunk shape."""
    event = (
        b"data: "
        + json.dumps(
            {
                "id": "chatcmpl-fake-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "deepseek-chat",
                "system_fingerprint": "fp_fake",
                "choices": [
                    {"index": 0, "delta": {"content": "word "}, "finish_reason": None, "logprobs": None}
                ],
            }
        ).encode()
        + b"\n\n"
    )
    best = float("inf")
    for _ in range(5):
        scanner = EventScanner("chat")
        start = time.perf_counter()
        for _ in range(20_000):
            scanner.feed(event)
        best = min(best, (time.perf_counter() - start) / 20_000)
    return best * 1e6


async def main() -> None:
    upstream = FakeUpstream(SECRETS.values(), flavor="deepseek")
    with LoopbackServer(upstream) as server:
        url = server.base_url
        plain = openai.AsyncOpenAI(api_key=SECRETS["alpha"], base_url=url, max_retries=0)
        pooled = AsyncDeepSeek(pool=pool(), base_url=url)
        ttft: dict[str, list[float]] = {"plain": [], "pooled": []}
        long: dict[str, list[float]] = {"plain": [], "pooled": []}
        clean: list[float] = []
        continued: list[float] = []
        clean_pause: list[float] = []
        continued_pause: list[float] = []
        for _ in range(ROUNDS):
            for name, client in (("plain", plain), ("pooled", pooled)):
                ttft[name].append(statistics.median([await first_token(client) for _ in range(SHORT_CALLS)]))
                took, text = await whole(client, LONG)
                assert text == LONG
                long[name].append(took)
            took, text = await whole(pooled, LONG)
            clean.append(took)
            clean_pause.append(PAUSES[-1])
            upstream.set_fault(SECRETS["alpha"], Fault.cut_after_tokens(LONG_WORDS // 2))
            took, text = await whole(pooled, LONG)
            assert text == LONG, "the continued answer must be whole"
            upstream.clear_faults()
            continued.append(took)
            continued_pause.append(PAUSES[-1])
        await plain.close()
        await pooled.close()
    p_ttft, k_ttft = statistics.median(ttft["plain"]), statistics.median(ttft["pooled"])
    p_long, k_long = statistics.median(long["plain"]), statistics.median(long["pooled"])
    chunks = LONG_WORDS + 2  # the role chunk, one per word, the finish chunk
    ms = 1e3
    # Each round's pooled figure against the plain one measured just before it: a ratio per round
    # is steadier on a busy machine than a ratio of medians.
    ttft_ratios = sorted(k / p for p, k in zip(ttft["plain"], ttft["pooled"], strict=True))
    long_ratios = sorted(k / p for p, k in zip(long["plain"], long["pooled"], strict=True))
    print(f"time to first token: plain {p_ttft * ms:.2f} ms, pooled {k_ttft * ms:.2f} ms")
    print(f"  pooled / plain, median of {ROUNDS} rounds {statistics.median(ttft_ratios):.2f}")
    print(f"  (range {ttft_ratios[0]:.2f}-{ttft_ratios[-1]:.2f})")
    print(f"{chunks}-chunk answer: plain {p_long * ms:.1f} ms, pooled {k_long * ms:.1f} ms")
    print(f"  pooled / plain, median of {ROUNDS} rounds {statistics.median(long_ratios):.3f}")
    print(f"  (range {long_ratios[0]:.3f}-{long_ratios[-1]:.3f})")
    print(f"  pooled - plain = {(k_long - p_long) / chunks * 1e6:.1f} µs per chunk")
    print(f"  the plain client's own work: {p_long / chunks * 1e6:.1f} µs per chunk")
    print(f"EventScanner.feed alone: {scanner_cost():.2f} µs per event")
    cut, whole_ms = statistics.median(continued), statistics.median(clean)
    print(f"cut after {LONG_WORDS // 2} of {LONG_WORDS} tokens and continued: {cut * ms:.1f} ms")
    print(f"  vs the same answer streamed cleanly {whole_ms * ms:.1f} ms: {(cut - whole_ms) * ms:+.1f} ms")
    gap, calm = statistics.median(continued_pause), statistics.median(clean_pause)
    print(f"  longest pause the caller sees: {gap * ms:.1f} ms continued, {calm * ms:.1f} ms clean")


if __name__ == "__main__":
    anyio.run(main)
