"""The gateway through the official ``openai`` client: a real gateway on loopback in front of two
fake upstreams on loopback (``alpha`` with four keys, ``beta`` with two)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx2
import openai
import pytest

from keypool.testing import FakeUpstream, Fault, LoopbackServer
from providers.gateway import build_gateway, gateway_config_from_mapping, hash_caller_key
from tests.gateway_fixtures import (
    A_SECRETS,
    ADMIN_TOKEN,
    ALL_SECRETS,
    B_SECRETS,
    CHAT_ONLY_KEY,
    CRITICAL_KEY,
    LOW_KEY,
    NORMAL_KEY,
    Running,
    running_gateway,
)

MESSAGES = [{"role": "user", "content": "hello through the gateway"}]


_clients: dict[str, openai.OpenAI] = {}


@pytest.fixture(scope="module")
def gw() -> Iterator[Running]:
    with running_gateway() as running:
        yield running
        for made in _clients.values():
            made.close()
        _clients.clear()


@pytest.fixture(autouse=True)
def _clean(gw: Running) -> Iterator[None]:
    yield
    gw.alpha.clear_faults()
    gw.beta.clear_faults()
    gw.pool.reset()


def client(gw: Running, key: str = CRITICAL_KEY) -> openai.OpenAI:
    """One client per caller key for the module (closed with the gateway)."""
    if key not in _clients:
        _clients[key] = openai.OpenAI(base_url=gw.url, api_key=key, max_retries=0, timeout=15)
    return _clients[key]


def raw(gw: Running, key: str | None = CRITICAL_KEY) -> httpx2.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx2.Client(base_url=gw.server.base_url, headers=headers, timeout=15)


def assert_clean(text: str) -> None:
    for secret in ALL_SECRETS:
        assert secret not in text


def test_chat_answers_with_the_route_that_served(gw: Running) -> None:
    response = client(gw).chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, extra_headers={"x-request-id": "req-given-1"}
    )
    completion = response.parse()
    assert completion.choices[0].message.content == "hello through the gateway"
    assert completion.model == "gpt-4o-mini"  # the model that answered
    assert response.headers["x-keypool-provider"] == "alpha"
    assert response.headers["x-keypool-key-id"] in {"a1", "a2", "a3", "a4"}
    assert response.headers["x-keypool-attempts"] == "1"
    assert response.headers["x-keypool-model"] == "gpt-4o-mini"
    assert response.headers["x-request-id"] == "req-given-1"
    assert gw.alpha_bodies.last_headers["x-request-id"] == "req-given-1"  # propagated upstream
    assert gw.alpha_bodies.last_headers["authorization"].startswith("Bearer sk-a-")  # the pool's key


def test_chat_stream(gw: Running) -> None:
    stream = client(gw).chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "hello through the gateway"
    assert gw.in_flight() == 0


def test_embeddings_and_models(gw: Running) -> None:
    c = client(gw)
    embedded = c.embeddings.create(model="embed", input=["one", "two"])
    assert len(embedded.data) == 2
    assert embedded.model == "text-embedding-3-small"
    assert sorted(m.id for m in c.models.list()) == ["chat", "chat-beta", "embed", "poisoned"]
    assert [m.id for m in client(gw, CHAT_ONLY_KEY).models.list()] == ["chat"]
    assert client(gw).models.retrieve("chat").id == "chat"
    with pytest.raises(openai.NotFoundError):
        client(gw, CHAT_ONLY_KEY).models.retrieve("embed")


def test_responses_where_a_route_serves_them(gw: Running) -> None:
    answer = client(gw).responses.create(model="chat", input="say this")
    assert "say this" in answer.output_text
    events = client(gw).responses.create(model="chat", input="stream this", stream=True)
    done = [e for e in events if e.type == "response.completed"]
    assert done
    assert "stream this" in done[0].response.output_text
    with pytest.raises(openai.BadRequestError, match="/v1/responses"):
        client(gw).responses.create(model="chat-beta", input="say this")


def test_request_body_reaches_upstream_unchanged_but_for_the_model(gw: Running) -> None:
    body = b'{ "messages" : [{"role":"user","content":"caf\xc3\xa9"}],\n "model":"chat", "x_unknown": 1.50 }'
    with raw(gw) as http:
        answer = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == "café"
    assert gw.alpha_bodies.last_body == body.replace(b'"model":"chat"', b'"model":"gpt-4o-mini"')


def test_bad_caller_keys_get_401(gw: Running) -> None:
    for key in ("kp-0000c0de-not-the-right-secret-xxxx", "anything", "kp-12345678-unknown-id-secret-xxxxx"):
        with pytest.raises(openai.AuthenticationError) as caught:
            client(gw, key).chat.completions.create(model="chat", messages=MESSAGES)
        assert caught.value.status_code == 401
        assert_clean(str(caught.value.body))
    with raw(gw, None) as http:
        answer = http.get("/v1/models")
    assert answer.status_code == 401
    assert answer.json()["error"]["type"] == "authentication_error"


def test_models_a_caller_may_not_use_and_unknown_models(gw: Running) -> None:
    with pytest.raises(openai.PermissionDeniedError):
        client(gw, CHAT_ONLY_KEY).embeddings.create(model="embed", input="x")
    with pytest.raises(openai.NotFoundError) as caught:
        client(gw).chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as caught:
        client(gw).chat.completions.create(model="m" * 100_000, messages=MESSAGES)
    assert len(caught.value.message) < 400  # the caller's input is not echoed without bound


def test_failover_to_the_next_route_before_any_byte(gw: Running) -> None:
    for secret in A_SECRETS:
        gw.alpha.set_fault(secret, Fault.status(503))
    response = client(gw).chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
    assert response.headers["x-keypool-provider"] == "beta"
    assert response.parse().model == "gpt-4o"
    assert int(response.headers["x-keypool-attempts"]) >= 2
    stream = client(gw).chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == MESSAGES[0]["content"]


def test_a_down_provider_goes_to_the_back_of_the_line(gw: Running) -> None:
    gw.pool.trip("alpha")
    before = gw.alpha.total_requests()
    response = client(gw).chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
    assert response.headers["x-keypool-provider"] == "beta"
    assert response.headers["x-keypool-attempts"] == "1"  # beta first: no attempt spent on alpha
    assert gw.alpha.total_requests() == before


def test_upstream_400_is_passed_through_and_counts_against_no_key(gw: Running) -> None:
    before = gw.beta.total_requests()
    with pytest.raises(openai.BadRequestError) as caught:
        client(gw).chat.completions.create(model="poisoned", messages=MESSAGES)
    assert caught.value.status_code == 400
    assert gw.beta.total_requests() == before  # no failover for a caller error
    assert all(k["failure_count"] == 0 and k["state"] == "closed" for k in gw.pool.stats("alpha"))


def test_throttled_everywhere_is_429_with_retry_after(gw: Running) -> None:
    for secret in A_SECRETS:
        gw.alpha.set_fault(secret, Fault.rate_limited(30))
    for secret in B_SECRETS:
        gw.beta.set_fault(secret, Fault.rate_limited(30))
    for _ in range(2):  # the upstream's own 429, then the pool's refusal: both 429 with a wait
        with pytest.raises(openai.RateLimitError) as caught:
            client(gw).chat.completions.create(model="chat", messages=MESSAGES)
        retry_after = caught.value.response.headers["retry-after"]
        assert 1 <= float(retry_after) <= 31
    assert caught.value.code == "rate_limit_exceeded"


def test_down_everywhere_is_503_with_retry_after(gw: Running) -> None:
    gw.pool.trip("alpha")
    gw.pool.trip("beta")
    with pytest.raises(openai.InternalServerError) as caught:
        client(gw).chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.status_code == 503
    assert float(caught.value.response.headers["retry-after"]) >= 1
    assert "no key" in caught.value.message.lower() or "no upstream key" in caught.value.message.lower()


def test_load_shedding_by_priority(gw: Running) -> None:
    # 'chat' can use alpha (4 keys) and beta (2): trip three of six, healthy share 50 % -> low is fine
    for key_id in ("a1", "a2"):
        gw.pool.trip("alpha", key_id)
    gw.pool.trip("beta", "b1")
    assert client(gw, LOW_KEY).chat.completions.create(model="chat", messages=MESSAGES)
    gw.pool.trip("alpha", "a3")  # 2 of 6 closed: 33 % -> low is shed, normal and critical served
    with pytest.raises(openai.InternalServerError) as caught:
        client(gw, LOW_KEY).chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.status_code == 503
    assert caught.value.code == "load_shed"
    assert float(caught.value.response.headers["retry-after"]) >= 1
    assert client(gw, NORMAL_KEY).chat.completions.create(model="chat", messages=MESSAGES)
    gw.pool.trip("alpha", "a4")  # 1 of 6: 17 % -> normal is shed too, critical still served
    with pytest.raises(openai.InternalServerError):
        client(gw, NORMAL_KEY).chat.completions.create(model="chat", messages=MESSAGES)
    assert client(gw, CRITICAL_KEY).chat.completions.create(model="chat", messages=MESSAGES)
    assert gw.gateway.shedder.stats()["low"]["shed"] >= 1


def _wait_until(condition, seconds: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_client_disconnect_mid_stream_frees_the_lease(gw: Running) -> None:
    for secret in A_SECRETS:
        gw.alpha.set_fault(secret, Fault.stall(after_chunks=2))
    body = {"model": "chat", "messages": MESSAGES, "stream": True}
    with raw(gw) as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        chunks = response.iter_raw()  # held: a dropped iterator would close the response at once
        first = next(chunks)
        assert first.startswith(b"data: ")
        assert response.headers["x-keypool-provider"] == "alpha", dict(response.headers)
        assert gw.in_flight() == 1
    # The caller went away: the gateway cancels the upstream attempt and releases its key.
    assert _wait_until(lambda: gw.in_flight() == 0)
    stats = {k["key_id"]: k for k in gw.pool.stats("alpha")}
    assert all(k["failure_count"] == 0 for k in stats.values())  # a caller leaving blames nobody


def test_client_giving_up_on_a_slow_answer_cancels_the_upstream_attempt(gw: Running) -> None:
    for secret in A_SECRETS:
        gw.alpha.set_fault(secret, Fault.hang())
    body = {"model": "chat", "messages": MESSAGES}
    with raw(gw) as http, pytest.raises(httpx2.ReadTimeout):
        http.post("/v1/chat/completions", json=body, timeout=httpx2.Timeout(15, read=0.5))
    assert _wait_until(lambda: gw.in_flight() == 0)
    assert all(k["failure_count"] == 0 for k in gw.pool.stats("alpha"))  # nobody is blamed
    assert _wait_until(lambda: sum(gw.alpha.counters(s).in_flight for s in A_SECRETS) == 0)


def test_a_stream_cut_after_bytes_ends_with_an_error_event(gw: Running) -> None:
    for secret in A_SECRETS:
        gw.alpha.set_fault(secret, Fault.cut_stream(after_chunks=2))
    stream = client(gw).chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    assert gw.in_flight() == 0


def test_a_stream_cut_after_content_is_continued_on_a_route_that_takes_a_prefill() -> None:
    with running_gateway(prefill="assistant") as gw2:
        for secret in A_SECRETS:  # each key's first answer breaks after two deltas
            gw2.alpha.set_fault(secret, Fault.sequence(Fault.cut_stream(after_chunks=3), then=Fault.ok()))
        words = "one two three four five six seven"
        with openai.OpenAI(base_url=gw2.url, api_key=CRITICAL_KEY, max_retries=0, timeout=15) as c:
            chunks = list(
                c.chat.completions.create(
                    model="chat", messages=[{"role": "user", "content": words}], stream=True
                )
            )
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == words  # one answer, nothing lost or repeated
        assert len({ch.id for ch in chunks}) == 1  # spliced into the same answer
        assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.role) == 1
        assert any(ch.choices and ch.choices[0].finish_reason == "stop" for ch in chunks)
        prefills = sum(gw2.alpha.counters(s).prefills for s in A_SECRETS)
        prefills += sum(gw2.beta.counters(s).prefills for s in B_SECRETS)
        assert prefills >= 1
        assert _wait_until(lambda: gw2.in_flight() == 0)


def test_health_admin_and_metrics_on_the_same_port(gw: Running) -> None:
    with raw(gw, None) as http:
        health = http.get("/healthz")
        assert health.status_code == 200
        assert health.json()["providers"] == {"alpha": "healthy", "beta": "healthy"}
        stats = http.get("/api/v1/circuit-breaker/stats")
        assert stats.status_code == 200
        assert {k["key_id"] for k in stats.json()} == {"a1", "a2", "a3", "a4", "b1", "b2"}
        patch = {"failure_threshold": 3}
        assert http.patch("/api/v1/circuit-breaker/config", json=patch).status_code == 401
        changed = http.patch(
            "/api/v1/circuit-breaker/config", json=patch, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert changed.status_code == 200
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        assert 'keypool_gateway_requests_total{caller="ops",model="chat",status="200"}' in metrics.text
        assert 'keypool_gateway_shed_total{priority="low"}' in metrics.text
        assert "circuit_breaker_state" in metrics.text
        assert_clean(metrics.text)


def test_access_log_names_callers_not_keys(gw: Running, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="keypool.gateway.access"):
        client(gw).chat.completions.create(
            model="chat", messages=MESSAGES, extra_headers={"x-request-id": "r-42"}
        )
        with pytest.raises(openai.AuthenticationError):
            client(gw, CRITICAL_KEY + "x").chat.completions.create(model="chat", messages=MESSAGES)

        def lines() -> list[dict[str, object]]:
            return [json.loads(r.getMessage()) for r in caplog.records if r.name == "keypool.gateway.access"]

        # The line is written once the answer is out: the caller may see the answer first.
        assert _wait_until(
            lambda: (
                {line.get("request_id") for line in lines()} >= {"r-42"}
                and any(line["status"] == 401 for line in lines())
            )
        )
    logged = lines()
    served = next(line for line in logged if line.get("request_id") == "r-42")
    assert served["caller"] == "ops"
    assert served["status"] == 200
    assert served["provider"] == "alpha"
    assert any(line["status"] == 401 for line in logged)
    assert_clean(caplog.text)


def test_deepseek_continues_on_its_beta_api_with_a_prefix_message() -> None:
    key = "kp-0000abcd-deepseek-continuation-key-x"
    upstream = FakeUpstream(["sk-ds-1", "sk-ds-2"], flavor="deepseek")
    for secret in ("sk-ds-1", "sk-ds-2"):
        upstream.set_fault(secret, Fault.sequence(Fault.cut_stream(after_chunks=3), then=Fault.ok()))
    with LoopbackServer(upstream) as server:
        provider = {"name": "deepseek", "base_url": f"{server.base_url}/v1", "keys": ["sk-ds-1", "sk-ds-2"]}
        config = gateway_config_from_mapping(
            {
                "providers": [{**provider, "prefill": "deepseek"}],
                "models": {"chat": {"routes": [{"provider": "deepseek", "model": "deepseek-chat"}]}},
                "callers": [{"name": "svc", "key_hash": hash_caller_key(key, n=2**10)}],
            }
        )
        app, _ = build_gateway(config, token="t" * 32, allow_no_token=False)
        words = "alpha beta gamma delta epsilon zeta"
        with (
            LoopbackServer(app) as gateway,
            openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=0, timeout=15) as c,
        ):
            stream = c.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": words}], stream=True
            )
            text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == words
    assert sum(upstream.counters(s).prefills for s in ("sk-ds-1", "sk-ds-2")) >= 1
