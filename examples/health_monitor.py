"""A health monitor brings a healed key back without waiting for user traffic to find out.

A DeepSeek key starts failing and its breaker opens after two failures. The key's backend is then
fixed. ``HealthMonitor`` probes every key each interval through the breakers: the open key is
skipped (not hammered) until its open timeout passes, then probed and closed again, within the open
timeout plus one interval.

Run: .venv/bin/python examples/health_monitor.py
"""

from __future__ import annotations

import logging
import time

import anyio

from keypool import BreakerConfig, BreakerState, CallRejected, KeySpec, KeyStateChanged, PoolEvent
from keypool.testing import FakeUpstream, Fault, LoopbackServer
from providers import AsyncDeepSeek
from providers.monitor import HealthMonitor

SECRETS = {"one": "sk-one", "two": "sk-two", "three": "sk-three"}
OPEN_TIMEOUT = 1.0
INTERVAL = 0.25


async def main() -> None:
    logging.getLogger("keypool").setLevel(logging.ERROR)  # transitions are printed below instead
    upstream = FakeUpstream(SECRETS.values(), flavor="deepseek")
    started = time.monotonic()

    skipped = 0
    closed = anyio.Event()

    def show(event: PoolEvent) -> None:  # a pool hook: sees every breaker event
        nonlocal skipped
        if isinstance(event, CallRejected) and event.reason == "probe_skipped":
            skipped += 1
        if isinstance(event, KeyStateChanged):
            at = time.monotonic() - started
            print(f"  t={at:4.2f}s key {event.key_id}: {event.old.label} -> {event.new.label}")
            if event.new is BreakerState.CLOSED:
                closed.set()

    async with LoopbackServer(upstream) as server:
        client = AsyncDeepSeek(
            api_keys=[KeySpec(secret=secret, key_id=name) for name, secret in SECRETS.items()],
            base_url=server.base_url,
            breaker=BreakerConfig(failure_threshold=2, timeout=OPEN_TIMEOUT),
        )
        client.pool.add_hook(show)
        upstream.set_fault("sk-two", Fault.status(503))
        print("key 'two' starts failing; traffic keeps flowing on the others")
        calls = 0
        while client.pool.key_stats("two")["state"] != "open" and calls < 200:
            await client.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": "hello"}]
            )
            calls += 1
        print(f"{calls} calls, all answered; capacity: {client.pool.capacity('deepseek').status}")

        upstream.clear_fault("sk-two")
        print(f"key 'two' works again; monitoring every {INTERVAL} s (open timeout {OPEN_TIMEOUT} s)")
        healed = time.monotonic()
        async with HealthMonitor([client], interval=INTERVAL) as monitor:
            with anyio.fail_after(10):
                await closed.wait()
        back, status = time.monotonic() - healed, client.pool.capacity("deepseek").status
        print(f"capacity: {status} again {back:.2f} s later, after {monitor.rounds} monitor rounds")
        print(f"probes skipped while the key was open: {skipped}")
        await client.close()


if __name__ == "__main__":
    anyio.run(main)
