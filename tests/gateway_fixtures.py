"""A running gateway for tests: fake upstreams on loopback, the gateway on loopback in front.

Caller keys are hashed with scrypt's smallest allowed cost so the suite stays quick; the path is
the same as with the default cost.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2

from keypool.testing import FakeUpstream, LoopbackServer
from providers.gateway import Gateway, build_gateway, gateway_config_from_mapping, hash_caller_key

ADMIN_TOKEN = "admin-token-for-tests-0123456789"
CRITICAL_KEY = "kp-0000c0de-critical-caller-key-abcdef"
NORMAL_KEY = "kp-0000beef-normal-caller-key-abcdefgh"
LOW_KEY = "kp-0000f00d-low-caller-key-abcdefghijkl"
CHAT_ONLY_KEY = "hand-picked-chat-only-key"
A_SECRETS = ("sk-a-1", "sk-a-2", "sk-a-3", "sk-a-4")
B_SECRETS = ("sk-b-1", "sk-b-2")
ALL_SECRETS = A_SECRETS + B_SECRETS + (CRITICAL_KEY, NORMAL_KEY, LOW_KEY, CHAT_ONLY_KEY, ADMIN_TOKEN)


def _hash(key: str) -> str:
    return hash_caller_key(key, n=2**10)


def config_data(a_url: str, b_url: str, prefill: str | None = None, **gateway: Any) -> dict[str, Any]:
    breaker = {"failure_threshold": 2, "timeout": 60}
    data: dict[str, Any] = {
        "gateway": {"request_timeout": 20, **gateway},
        "providers": [
            {
                "name": "alpha",
                "base_url": a_url,
                "responses": True,
                "keys": [{"secret": s, "key_id": f"a{i}"} for i, s in enumerate(A_SECRETS, 1)],
                "breaker": breaker,
            },
            {
                "name": "beta",
                "base_url": b_url,
                "keys": [{"secret": s, "key_id": f"b{i}"} for i, s in enumerate(B_SECRETS, 1)],
                "breaker": breaker,
            },
        ],
        "models": {
            "chat": {
                "routes": [
                    {"provider": "alpha", "model": "gpt-4o-mini"},
                    {"provider": "beta", "model": "gpt-4o"},
                ]
            },
            "chat-beta": {"routes": [{"provider": "beta", "model": "gpt-4o"}]},
            "embed": {"routes": [{"provider": "alpha", "model": "text-embedding-3-small"}]},
            "poisoned": {
                "routes": [{"provider": "alpha", "model": "poison"}, {"provider": "beta", "model": "gpt-4o"}]
            },
        },
        "callers": [
            {"name": "ops", "key_hash": _hash(CRITICAL_KEY), "priority": "critical"},
            {"name": "web", "key_hash": _hash(NORMAL_KEY), "priority": "normal"},
            {"name": "batch", "key_hash": _hash(LOW_KEY), "priority": "low"},
            {"name": "chatter", "key_hash": _hash(CHAT_ONLY_KEY), "models": ["chat"], "priority": "normal"},
        ],
    }
    if prefill is not None:
        for provider in data["providers"]:
            provider["prefill"] = prefill
    return data


class Recorder:
    """An ASGI wrapper that keeps the last request body an upstream received."""

    def __init__(self, app: FakeUpstream) -> None:
        self.app = app
        self.last_body = b""
        self.last_headers: dict[str, str] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        parts: list[bytes] = []
        self.last_headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}

        async def tapped() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                parts.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.last_body = b"".join(parts)
            return message

        await self.app(scope, tapped, send)


@dataclass
class Running:
    gateway: Gateway
    server: LoopbackServer
    alpha: FakeUpstream
    beta: FakeUpstream
    alpha_bodies: Recorder

    @property
    def url(self) -> str:
        return f"{self.server.base_url}/v1"

    @property
    def pool(self) -> Any:
        return self.gateway.pool

    def in_flight(self) -> int:
        return sum(self.pool.capacity(p).in_flight for p in self.pool.providers)


@contextmanager
def running_gateway(
    transports: Mapping[str, httpx2.AsyncBaseTransport] | None = None,
    prefill: str | None = None,
    **gateway: Any,
) -> Iterator[Running]:
    alpha, beta = FakeUpstream(A_SECRETS), FakeUpstream(B_SECRETS)
    recorder = Recorder(alpha)
    with LoopbackServer(recorder) as a_server, LoopbackServer(beta) as b_server:
        data = config_data(f"{a_server.base_url}/v1", f"{b_server.base_url}/v1", prefill, **gateway)
        config = gateway_config_from_mapping(data, {}, "test")
        app, _ = build_gateway(config, token=ADMIN_TOKEN, allow_no_token=False, transports=transports)
        with LoopbackServer(app) as server:
            yield Running(app, server, alpha, beta, recorder)


ROOT = Path(__file__).resolve().parent.parent


class Served:
    """A ``keypool serve`` process; ``url`` once it says where it serves."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "providers.cli", "serve", "--port", "0", *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        assert self.process.stderr is not None
        stream = self.process.stderr
        threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
        deadline = time.monotonic() + 30
        seen = self.lines
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            seen.append(line)
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if "serving" in line and found:
                self.url = found.group(1)
                admin = re.search(r"admin on (http://127\.0\.0\.1:\d+)", line)
                self.admin_url = admin.group(1) if admin else self.url
                if "--config" not in args:
                    # the embedded demo prints two more lines: its upstream, the caller key
                    for _ in range(2):
                        self.lines.append(lines.get(timeout=10))
                return
        self.stop()
        raise AssertionError(f"keypool serve did not start: {''.join(seen)}")

    def stop(self) -> int:
        """Stop it (SIGTERM: a graceful shutdown) and return its exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stderr is not None:
            self.process.stderr.close()
        return self.process.returncode
