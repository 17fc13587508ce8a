"""The gateway (``keypool serve``) in one process: DeepSeek down, Perplexity answering, any OpenAI SDK.

DeepSeek and Perplexity are simulated on loopback (``keypool.testing.FakeUpstream``), DeepSeek
answering 503 on every key. The public model ``chat`` routes to DeepSeek first, then Perplexity;
the plain ``openai`` client below only knows the gateway's address and its caller key. Once
DeepSeek's breakers are open, a ``low`` caller is shed (503 with ``Retry-After``) while the
``critical`` one is still served. ``keypool serve --config gateway.toml`` runs the same app.

Run: .venv/bin/python examples/gateway.py
"""

from __future__ import annotations

import openai

from keypool.testing import FakeUpstream, Fault, LoopbackServer
from providers.gateway import build_gateway, gateway_config_from_mapping, hash_caller_key, new_caller_key

DEEPSEEK_KEYS = ["sk-ds-1", "sk-ds-2", "sk-ds-3"]
PERPLEXITY_KEYS = ["pplx-1", "pplx-2"]


def main() -> None:
    deepseek = FakeUpstream(DEEPSEEK_KEYS, flavor="deepseek", default_fault=Fault.status(503))
    perplexity = FakeUpstream(PERPLEXITY_KEYS, flavor="perplexity")
    critical_key, low_key = new_caller_key(), new_caller_key()
    with LoopbackServer(deepseek) as ds, LoopbackServer(perplexity) as px:
        config = gateway_config_from_mapping(
            {
                "providers": [
                    {"name": "deepseek", "base_url": f"{ds.base_url}/v1", "keys": DEEPSEEK_KEYS},
                    {"name": "perplexity", "base_url": px.base_url, "keys": PERPLEXITY_KEYS},
                ],
                "models": {
                    "chat": {
                        "routes": [
                            {"provider": "deepseek", "model": "deepseek-chat"},
                            {"provider": "perplexity", "model": "sonar"},
                        ]
                    }
                },
                "callers": [
                    {"name": "checkout", "key_hash": hash_caller_key(critical_key), "priority": "critical"},
                    {"name": "nightly-batch", "key_hash": hash_caller_key(low_key), "priority": "low"},
                ],
            }
        )
        app, _ = build_gateway(config, token="example-admin-token-0123456789", allow_no_token=False)
        with LoopbackServer(app) as gateway:
            print(f"gateway on {gateway.base_url}; 'chat' routes to deepseek, then perplexity\n")
            client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=critical_key, max_retries=0)
            batch = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=low_key, max_retries=0)
            for i in range(4):
                raw = client.chat.completions.with_raw_response.create(
                    model="chat", messages=[{"role": "user", "content": f"question {i}"}]
                )
                answer = raw.parse()
                print(
                    f"critical call {i}: {answer.choices[0].message.content!r} from "
                    f"{raw.headers['x-keypool-provider']} ({answer.model}, key "
                    f"{raw.headers['x-keypool-key-id']}, {raw.headers['x-keypool-attempts']} attempt(s))"
                )
            stream = client.chat.completions.create(
                model="chat",
                messages=[{"role": "user", "content": "streamed through the gateway"}],
                stream=True,
            )
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            print(f"streamed: {text!r}")
            try:
                batch.chat.completions.create(model="chat", messages=[{"role": "user", "content": "report"}])
                print("low call served")
            except openai.APIStatusError as exc:
                retry = exc.response.headers.get("retry-after")
                print(f"low call refused: {exc.status_code} {exc.code} (Retry-After: {retry} s)")
            client.close()
            batch.close()


if __name__ == "__main__":
    main()
