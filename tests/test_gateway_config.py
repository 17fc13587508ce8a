"""The gateway's config, caller keys, body rewriting and context-length fallback, without a network."""

from __future__ import annotations

import copy
import json
from typing import Any

import anyio
import httpx2
import pytest

from keypool import ConfigError
from providers.cli import main
from providers.gateway import (
    build_gateway,
    gateway_config_from_mapping,
    hash_caller_key,
    load_gateway_config,
    new_caller_key,
    verify_caller_key,
)
from providers.gateway._body import BadBody, parse_body
from providers.gateway._callers import Caller, CallerKeys
from tests.gateway_fixtures import CRITICAL_KEY, config_data

BASE = config_data("http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1")


def with_change(path: list[Any], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    target: Any = data
    for step in path[:-1]:
        target = target[step]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        (["gateway", "max_attempts"], 0, "gateway.max_attempts"),
        (["gateway", "request_timeout"], "soon", "gateway.request_timeout"),
        (["gateway", "shed_normal_below"], 0.9, "gateway.shed_normal_below"),
        (["gateway", "surprise"], 1, "gateway: unknown field"),
        (["providers", 0, "base_url"], "ftp://x", "providers[0] (alpha).base_url"),
        (["providers", 0, "responses"], "yes", "providers[0] (alpha).responses"),
        (["providers", 0, "prefill"], "magic", "providers[0] (alpha).prefill"),
        (["providers", 1, "name"], "alpha", "providers[1] (alpha).name"),
        (["providers", 0, "keys"], KeyError, "providers[0] (alpha): no keys"),
        (["models", "chat", "routes"], [], "models.chat.routes"),
        (["models", "chat", "routes", 0, "provider"], "gamma", "models.chat.routes[0].provider"),
        (["models", "chat", "routes", 0, "model"], 3, "models.chat.routes[0].model"),
        (["models", "chat", "on_context_length"], "nope", "models.chat.on_context_length"),
        (["models", "chat", "on_context_length"], "chat", "models.chat.on_context_length"),
        (["callers", 0, "priority"], "urgent", "callers[0] (ops).priority"),
        (["callers", 0, "key_hash"], "sha256$abc", "callers[0] (ops).key_hash"),
        (["callers", 0, "models"], ["chat", "ghost"], "callers[0] (ops).models"),
        (["callers", 1, "name"], "ops", "callers[1] (ops).name"),
        (["callers"], [], "callers: no [[callers]]"),
        (["extra"], 1, "unknown field(s) ['extra']"),
    ],
)
def test_config_errors_name_the_field(path: list[Any], value: Any, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        gateway_config_from_mapping(with_change(path, value), {}, "gw.toml")
    assert named in str(caught.value)
    assert "sk-a-" not in str(caught.value)


def test_a_valid_config_loads_from_toml(tmp_path: Any) -> None:
    key_hash = hash_caller_key("kp-1234abcd-some-long-secret-value-xx", n=2**10)
    (tmp_path / "gw.toml").write_text(
        f"""
[gateway]
max_attempts = 4

[[providers]]
name = "deepseek"
base_url = "https://api.deepseek.com/v1"
keys_env = "DS_KEYS"

[models.chat]
routes = [{{ provider = "deepseek", model = "deepseek-chat" }}]

[[callers]]
name = "svc"
key_hash = "{key_hash}"
models = ["chat"]
priority = "low"
"""
    )
    config = load_gateway_config(tmp_path / "gw.toml", {"DS_KEYS": "sk-1,sk-2"})
    assert config.settings.max_attempts == 4
    assert config.models["chat"].routes[0].model == "deepseek-chat"
    assert config.callers[0].priority == "low"
    assert len(config.pool.providers[0].keys) == 2
    with pytest.raises(ConfigError, match="DS_KEYS"):
        load_gateway_config(tmp_path / "gw.toml", {})


def test_caller_keys_hash_and_verify() -> None:
    key = new_caller_key()
    stored = hash_caller_key(key, n=2**10)
    assert key not in stored
    assert verify_caller_key(key, stored)
    assert not verify_caller_key(key + "x", stored)
    assert stored.split("$")[1] == key.split("-")[1]  # the lookup id, not derived from the secret
    assert hash_caller_key(key, n=2**10) != stored  # salted


def test_known_keys_are_remembered_and_wrong_ones_cost_no_hash_without_a_candidate() -> None:
    hand_picked = "my-own-caller-key"
    callers = [
        Caller("a", hash_caller_key(CRITICAL_KEY, n=2**10), None),
        Caller("b", hash_caller_key(hand_picked, n=2**10), None),
    ]
    keys = CallerKeys(callers)

    async def run() -> None:
        assert (await keys.authenticate(CRITICAL_KEY)) is callers[0]
        assert keys.cached(CRITICAL_KEY) == (True, callers[0])
        assert (await keys.authenticate(hand_picked)) is callers[1]
        assert (await keys.authenticate("kp-99999999-unknown-lookup-id-xxxxxxx")) is None
        assert keys.cached("kp-99999999-unknown-lookup-id-xxxxxxx") == (False, None)  # never hashed
        assert (await keys.authenticate("wrong-hand-picked")) is None
        assert keys.cached("wrong-hand-picked") == (True, None)  # refused once, remembered
        assert (await keys.authenticate(None)) is None
        assert (await keys.authenticate("x" * 10_000)) is None

    anyio.run(run)
    assert CRITICAL_KEY not in repr(callers[0])


def test_hash_key_command(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["hash-key"]) == 0
    out = capsys.readouterr().out.splitlines()
    key = out[0].split()[1]
    assert verify_caller_key(key, out[1].split()[1])
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("chosen-key\n"))
    assert main(["hash-key", "--stdin"]) == 0
    assert verify_caller_key("chosen-key", capsys.readouterr().out.strip())
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["hash-key", "--stdin"]) == 2


def test_serve_reports_config_errors_with_status_2(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.toml").write_text("[[providers]]\nname = 'x'\nkeys = ['sk-1']\n")
    assert main(["serve", "--config", str(tmp_path / "bad.toml"), "--insecure-no-token"]) == 2
    assert "base_url" in capsys.readouterr().err
    assert main(["serve", "--host", "0.0.0.0"]) == 2  # the embedded demo is loopback only
    assert main(["serve", "--workers", "2", "--config", str(tmp_path / "bad.toml")]) == 2


def test_body_keeps_every_byte_but_the_model() -> None:
    body = '{"stream" :true,  "model":\n"chat" ,"n":1.0e0,"extra":{"model":"inner"},"msg":"\u00e9"}'.encode()
    parsed = parse_body(body)
    assert parsed.model == "chat"
    assert parsed.stream is True
    out = parsed.with_model("deepseek-chat")
    assert out == body.replace(b'"chat"', b'"deepseek-chat"')
    assert json.loads(out)["extra"]["model"] == "inner"
    assert parse_body(body).with_model("chat") == body


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"", None),
        (b"[]", None),
        (b'{"model": 3}', "model"),
        (b'{"messages": []}', "model"),
        (b'{"model": "m", "stream": "yes"}', "stream"),
        (b'{"model": "m"} trailing', None),
        (b'{"model": "m",}', None),
        (b"\xff\xfe", None),
        (b"[" * 100_000, None),
        (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b', "model": "m"}', None),
    ],
)
def test_bad_bodies_are_named(body: bytes, param: str | None) -> None:
    with pytest.raises(BadBody) as caught:
        parse_body(body)
    assert caught.value.param == param


def test_a_prompt_too_long_goes_to_the_on_context_length_model() -> None:
    """One exact upstream answer is needed here (a context-length 400), so a MockTransport."""
    seen: list[str] = []

    def upstream(request: httpx2.Request) -> httpx2.Response:
        model = json.loads(request.content)["model"]
        seen.append(model)
        if model == "small":
            error = {
                "message": "This model's maximum context length is 8 tokens",
                "code": "context_length_exceeded",
            }
            return httpx2.Response(400, json={"error": error})
        return httpx2.Response(200, json={"object": "chat.completion", "model": model, "choices": []})

    data = copy.deepcopy(BASE)
    data["models"]["short"] = {
        "routes": [{"provider": "alpha", "model": "small"}],
        "on_context_length": "long",
    }
    data["models"]["long"] = {"routes": [{"provider": "beta", "model": "large"}]}
    config = gateway_config_from_mapping(data, {}, "test")
    transports = {"alpha": httpx2.MockTransport(upstream), "beta": httpx2.MockTransport(upstream)}
    app, _ = build_gateway(config, token="t" * 32, allow_no_token=False, transports=transports)

    async def run() -> httpx2.Response:
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gw") as http:
            return await http.post(
                "/v1/chat/completions",
                json={"model": "short", "messages": [{"role": "user", "content": "long"}]},
                headers={"Authorization": f"Bearer {CRITICAL_KEY}"},
            )

    answer = anyio.run(run)
    assert answer.status_code == 200
    assert answer.json()["model"] == "large"
    assert answer.headers["x-keypool-provider"] == "beta"
    assert seen == ["small", "large"]
    assert all(k["failure_count"] == 0 for k in app.pool.stats("alpha"))
