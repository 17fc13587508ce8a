"""Two ``keypool serve`` processes on one private Redis: a key tripped through one is skipped by
the other, and a config ``PATCH`` through one applies to both; ``--workers 2`` serves too."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from keypool.testing import FakeUpstream, Fault, LoopbackServer
from providers.gateway import hash_caller_key
from tests.gateway_fixtures import Served
from tests.redis_server import RedisServer, running_redis

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SECRETS = ("sk-r-1", "sk-r-2", "sk-r-3")
CALLER = "kp-0000aaaa-redis-test-caller-key-xyz"
TOKEN = "redis-test-admin-token-0123456789"
BODY = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
AUTH = {"Authorization": f"Bearer {CALLER}"}
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from running_redis()


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream(SECRETS)
    with LoopbackServer(fake) as server:
        yield fake, f"{server.base_url}/v1"


def _config(tmp: Path, base_url: str) -> Path:
    keys = ", ".join(f'{{ secret = "{s}", key_id = "r{i}" }}' for i, s in enumerate(SECRETS, 1))
    path = tmp / "gateway.toml"
    path.write_text(
        f"""
[[providers]]
name = "alpha"
base_url = "{base_url}"
keys = [{keys}]
[providers.breaker]
failure_threshold = 2
timeout = 300

[models.chat]
routes = [{{ provider = "alpha", model = "gpt-4o-mini" }}]

[[callers]]
name = "svc"
key_hash = "{hash_caller_key(CALLER, n=2**10)}"
"""
    )
    return path


def _until(condition: Callable[[], bool], seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _stats(http: httpx2.Client, url: str) -> dict[str, Any]:
    return {k["key_id"]: k for k in http.get(f"{url}/api/v1/circuit-breaker/stats").json()}


def test_two_gateways_share_breakers_and_config(
    redis_server: RedisServer, upstream: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    fake, base_url = upstream
    config = _config(tmp_path, base_url)
    env = {"KEYPOOL_REDIS_URL": redis_server.url, "KEYPOOL_ADMIN_TOKEN": TOKEN}
    a = Served("--config", str(config), env=env)
    b = Served("--config", str(config), env=env)
    try:
        with httpx2.Client(timeout=15) as http:
            fake.set_fault(SECRETS[0], Fault.status(503))
            for _ in range(60):  # r1 fails and the request moves on, until r1 trips
                assert http.post(f"{a.url}/v1/chat/completions", json=BODY, headers=AUTH).status_code == 200
                if _stats(http, a.url)["r1"]["state"] == "open":
                    break
            assert _stats(http, a.url)["r1"]["state"] == "open"
            assert _until(lambda: _stats(http, b.url)["r1"]["state"] == "open")
            before = fake.counters(SECRETS[0]).requests
            for _ in range(20):
                answer = http.post(f"{b.url}/v1/chat/completions", json=BODY, headers=AUTH)
                assert answer.status_code == 200
                assert answer.headers["x-keypool-key-id"] != "r1"
            assert fake.counters(SECRETS[0]).requests == before  # b never sent r1's secret

            changed = http.patch(
                f"{a.url}/api/v1/circuit-breaker/config", json={"failure_threshold": 7}, headers=ADMIN
            )
            assert changed.status_code == 200, changed.text
            assert _until(
                lambda: all(k["config"]["failure_threshold"] == 7 for k in _stats(http, b.url).values())
            )
    finally:
        fake.clear_faults()
        a.stop()
        b.stop()


def test_workers_share_one_port(
    redis_server: RedisServer, upstream: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    env = {"KEYPOOL_REDIS_URL": redis_server.url, "KEYPOOL_ADMIN_TOKEN": TOKEN}
    served = Served("--config", str(_config(tmp_path, upstream[1])), "--workers", "2", env=env)
    try:
        with httpx2.Client(timeout=15) as http:
            assert _until(lambda: http.get(f"{served.url}/healthz").status_code == 200)
            for _ in range(10):
                assert (
                    http.post(f"{served.url}/v1/chat/completions", json=BODY, headers=AUTH).status_code == 200
                )
    finally:
        served.stop()


def test_workers_need_redis(tmp_path: Path, upstream: tuple[FakeUpstream, str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KEYPOOL_REDIS_URL"} | {"KEYPOOL_ADMIN_TOKEN": TOKEN}
    config = str(_config(tmp_path, upstream[1]))
    done = subprocess.run(
        [sys.executable, "-m", "providers.cli", "serve", "--config", config, "--workers", "2", "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "KEYPOOL_REDIS_URL" in done.stderr
