"""Fuzz the gateway's public endpoints over loopback: malformed JSON, wrong types, unknown models,
huge bodies, odd paths and methods. Every answer is a 2xx or a 4xx in OpenAI's error shape with a
reason, never a 5xx, and no secret (upstream key, caller key, admin token) appears in it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gateway_fixtures import ALL_SECRETS, CRITICAL_KEY, Running, running_gateway

LIMIT = 64 * 1024
ENDPOINTS = ["/v1/chat/completions", "/v1/embeddings", "/v1/responses"]
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)


@pytest.fixture(scope="module")
def gw() -> Iterator[Running]:
    with running_gateway(max_body_bytes=LIMIT) as running:
        yield running


@pytest.fixture(scope="module")
def http(gw: Running) -> Iterator[httpx2.Client]:
    headers = {"Authorization": f"Bearer {CRITICAL_KEY}", "content-type": "application/json"}
    with httpx2.Client(base_url=gw.server.base_url, headers=headers, timeout=20) as client:
        yield client


def check(answer: httpx2.Response) -> None:
    assert answer.status_code < 500, answer.text[:300]
    text = answer.text
    for secret in ALL_SECRETS:
        assert secret not in text
    if answer.status_code >= 400:
        error = answer.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}
        assert error["message"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
models = st.sampled_from(["chat", "embed", "chat-beta", "poisoned"]) | st.text(max_size=30) | json_values


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS), body=st.binary(max_size=2048))
def test_arbitrary_bytes(http: httpx2.Client, gw: Running, endpoint: str, body: bytes) -> None:
    check(http.post(endpoint, content=body))


@FUZZ
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    model=models,
    stream=st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    extra=st.dictionaries(st.sampled_from(["messages", "input", "n", "temperature", "tools"]), json_values),
)
def test_wrong_types_and_unknown_models(
    http: httpx2.Client, gw: Running, endpoint: str, model: Any, stream: Any, extra: dict[str, Any]
) -> None:
    body = {"model": model, "stream": stream, **extra}
    check(http.post(endpoint, content=json.dumps(body)))


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    path=st.text(alphabet="abcdefv1/._-%", max_size=30),
)
def test_odd_paths_and_methods(http: httpx2.Client, gw: Running, method: str, path: str) -> None:
    answer = http.request(method, "/" + path.lstrip("/"))
    if answer.request.url.path.startswith(("/api/", "/metrics")):
        assert answer.status_code < 500
        return
    check(answer)


def test_huge_bodies_get_413(http: httpx2.Client, gw: Running) -> None:
    big = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "x" * (LIMIT * 2)}]})
    answer = http.post("/v1/chat/completions", content=big)
    assert answer.status_code == 413
    check(answer)

    def chunks() -> Iterator[bytes]:  # no content-length: counted while it arrives
        yield b'{"model": "chat", "messages": "'
        for _ in range(40):
            yield b"y" * 4096
        yield b'"}'

    streamed = http.post("/v1/chat/completions", content=chunks())
    assert streamed.status_code == 413
    check(streamed)


def test_no_key_was_blamed(http: httpx2.Client, gw: Running) -> None:
    """After all the fuzzing, the caller's junk has opened no breaker."""
    stats = gw.pool.stats()
    assert all(k["state"] == "closed" for k in stats), [(k["key_id"], k["state"]) for k in stats]
