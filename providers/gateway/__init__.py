"""``keypool serve``: an OpenAI-compatible HTTP gateway on keypool's pools.

Public model names map to ordered routes (provider + upstream model); each provider is a pool of
keys behind a :class:`keypool.KeyPoolTransport`; caller keys are stored hashed and carry their
allowed models and a priority class for load shedding. See ``_config`` for the TOML.
"""

from ._app import Gateway
from ._callers import Caller, hash_caller_key, new_caller_key, verify_caller_key
from ._config import (
    GatewayConfig,
    GatewaySettings,
    ModelRoutes,
    Route,
    Upstream,
    gateway_config_from_mapping,
    load_gateway_config,
)
from ._serve import GatewayOptions, build_gateway, serve_gateway

__all__ = [
    "Caller",
    "Gateway",
    "GatewayConfig",
    "GatewayOptions",
    "GatewaySettings",
    "ModelRoutes",
    "Route",
    "Upstream",
    "build_gateway",
    "gateway_config_from_mapping",
    "hash_caller_key",
    "load_gateway_config",
    "new_caller_key",
    "serve_gateway",
    "verify_caller_key",
]
