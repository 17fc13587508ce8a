"""The official ``openai`` Node SDK against a running gateway on loopback (installed from the npm
registry by :mod:`tests.node_sdk`): chat, stream, models, embeddings, and the errors a caller sees
(401 bad key, 404 unknown model, 429 and 503 with ``Retry-After``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from keypool.testing import Fault
from tests.gateway_fixtures import A_SECRETS, ALL_SECRETS, CRITICAL_KEY, Running, running_gateway
from tests.node_sdk import SCRIPT, node_with_openai

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gw() -> Iterator[Running]:
    with running_gateway() as running:
        yield running


def run_node(gw: Running, phase: str) -> dict[str, Any]:
    node, modules = node_with_openai()
    script = modules.parent / SCRIPT.name  # ES modules resolve 'openai' from the script's folder
    shutil.copyfile(SCRIPT, script)
    env = {**os.environ, "GATEWAY_URL": gw.url, "GATEWAY_KEY": CRITICAL_KEY}
    done = subprocess.run(
        [node, str(script), phase], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for secret in ALL_SECRETS:
        if secret != CRITICAL_KEY:
            assert secret not in done.stdout
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_node_sdk_chat_stream_models_and_errors(gw: Running) -> None:
    out = run_node(gw, "ok")
    assert out["chat"] == {"content": "hello from node", "model": "gpt-4o-mini"}
    assert out["provider"] == "alpha"
    assert out["attempts"] == "1"
    assert out["stream"] == "hello from node"
    assert out["models"] == ["chat", "chat-beta", "embed", "poisoned"]
    assert out["embedding"] > 0
    assert out["badKey"]["status"] == 401
    assert out["badKey"]["name"] == "AuthenticationError"
    assert out["unknownModel"]["status"] == 404


def test_node_sdk_sees_429_and_503_with_retry_after(gw: Running) -> None:
    for secret in A_SECRETS:
        gw.alpha.set_fault(secret, Fault.rate_limited(20))
    gw.pool.trip("beta")
    try:
        out = run_node(gw, "errors")
    finally:
        gw.alpha.clear_faults()
        gw.pool.reset()
    assert out["throttled"]["status"] == 429
    assert out["throttled"]["name"] == "RateLimitError"
    assert 1 <= int(out["throttled"]["retryAfter"]) <= 21
    assert out["down"]["status"] == 503
    assert int(out["down"]["retryAfter"]) >= 1
