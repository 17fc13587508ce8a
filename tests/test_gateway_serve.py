"""``keypool serve`` as a process: the embedded demo (no config, no keys), ``--admin-port``, and a
graceful stop that lets a request in flight finish."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx2
import openai
import pytest

from keypool.testing import FakeUpstream, Fault, LoopbackServer
from providers.gateway import hash_caller_key
from providers.gateway._embedded import DEMO_CALLER_KEY
from tests.gateway_fixtures import Served

CALLER = "kp-0000dddd-drain-test-caller-key-xyz"

pytestmark = pytest.mark.slow
# uvicorn finishes its graceful shutdown, then re-raises the SIGTERM it caught
STOPPED = (0, -signal.SIGTERM)


def test_the_embedded_demo_serves_with_no_config_and_no_keys() -> None:
    served = Served()
    try:
        said = "".join(served.lines)
        assert DEMO_CALLER_KEY in said  # the demo prints its caller key (a public demo value)
        assert "curl" in said
        with openai.OpenAI(base_url=f"{served.url}/v1", api_key=DEMO_CALLER_KEY, max_retries=0) as client:
            answer = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "demo works"}]
            )
            assert answer.choices[0].message.content == "demo works"
            assert "gpt-4o-mini" in [m.id for m in client.models.list()]
        with httpx2.Client() as http:
            assert http.get(f"{served.url}/healthz").json()["providers"] == {"embedded": "healthy"}
    finally:
        assert served.stop() in STOPPED


def test_admin_port_serves_the_admin_api_apart() -> None:
    served = Served("--admin-port", "0")
    try:
        assert served.admin_url != served.url
        with httpx2.Client() as http:
            stats = http.get(f"{served.admin_url}/api/v1/circuit-breaker/stats")
            assert stats.status_code == 200
            assert {k["key_id"] for k in stats.json()} == {"embedded-1", "embedded-2", "embedded-3"}
            assert http.get(f"{served.admin_url}/metrics").status_code == 200
            away = http.get(f"{served.url}/api/v1/circuit-breaker/stats")
            assert away.status_code == 404  # not on the public port
            assert away.json()["error"]["code"] == "unknown_url"
    finally:
        assert served.stop() in STOPPED


def test_sigterm_drains_a_request_in_flight(tmp_path: Path) -> None:
    fake = FakeUpstream(["sk-d-1"], default_fault=Fault.slow(1.0))
    with LoopbackServer(fake) as upstream:
        config = tmp_path / "gateway.toml"
        config.write_text(
            f"""
[[providers]]
name = "slow"
base_url = "{upstream.base_url}/v1"
keys = ["sk-d-1"]

[models.chat]
routes = [{{ provider = "slow", model = "gpt-4o-mini" }}]

[[callers]]
name = "svc"
key_hash = "{hash_caller_key(CALLER, n=2**10)}"
"""
        )
        served = Served("--config", str(config), env={"KEYPOOL_ADMIN_TOKEN": "drain-test-token-0123456789"})
        answers: list[httpx2.Response] = []

        def call() -> None:
            with httpx2.Client(timeout=30) as http:
                answers.append(
                    http.post(
                        f"{served.url}/v1/chat/completions",
                        json={"model": "chat", "messages": [{"role": "user", "content": "drained"}]},
                        headers={"Authorization": f"Bearer {CALLER}"},
                    )
                )

        caller = threading.Thread(target=call)
        caller.start()
        try:
            deadline = time.monotonic() + 20
            while fake.counters("sk-d-1").in_flight == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert fake.counters("sk-d-1").in_flight == 1
            served.process.send_signal(signal.SIGTERM)  # while the answer is on its way
            caller.join(30)
        finally:
            served.stop()
    assert answers
    assert answers[0].status_code == 200
    assert answers[0].json()["choices"][0]["message"]["content"] == "drained"
