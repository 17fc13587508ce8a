"""The embedded default: ``keypool serve`` without ``--config`` proxies a fake upstream on loopback.

No keys, no network: :class:`keypool.testing.FakeUpstream` serves three demo keys on a free
loopback port in this process, and one demo caller key (printed at start) may use every model.
"""

from __future__ import annotations

from typing import Any

from keypool.testing import FakeUpstream, LoopbackServer

from ._callers import hash_caller_key
from ._config import GatewayConfig, gateway_config_from_mapping

__all__ = ["DEMO_CALLER_KEY", "embedded_config", "start_embedded_upstream"]

DEMO_CALLER_KEY = "kp-00000000-embedded-demo-caller-key"
DEMO_SECRETS = ("sk-embedded-1", "sk-embedded-2", "sk-embedded-3")
DEMO_MODELS = {
    "gpt-4o-mini": "gpt-4o-mini",
    "gpt-4o": "gpt-4o",
    "text-embedding-3-small": "text-embedding-3-small",
}


def start_embedded_upstream() -> LoopbackServer:
    """The fake upstream, started (stop it when the gateway stops)."""
    return LoopbackServer(FakeUpstream(DEMO_SECRETS), shutdown_timeout=0.5).start()


def embedded_config(base_url: str) -> GatewayConfig:
    """The demo gateway's configuration for an upstream at ``base_url`` (``.../v1``)."""
    data: dict[str, Any] = {
        "providers": [
            {
                "name": "embedded",
                "base_url": base_url,
                "responses": True,
                "keys": [{"secret": s, "key_id": f"embedded-{i}"} for i, s in enumerate(DEMO_SECRETS, 1)],
            }
        ],
        "models": {
            public: {"routes": [{"provider": "embedded", "model": upstream}]}
            for public, upstream in DEMO_MODELS.items()
        },
        "callers": [{"name": "demo", "key_hash": hash_caller_key(DEMO_CALLER_KEY), "priority": "critical"}],
    }
    return gateway_config_from_mapping(data, {}, "embedded default")
