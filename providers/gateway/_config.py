"""The gateway's TOML: providers (the pool's, plus where they live), public models, callers.

::

    [gateway]                         # optional; the defaults are shown
    request_timeout = 120             # seconds for one request, every attempt and failover included
    max_attempts = 6                  # upstream attempts per request, across keys and routes
    max_body_bytes = 8388608          # larger request bodies get 413
    shed_low_below = 0.5              # healthy share under which 'low' callers are shed
    shed_normal_below = 0.25          # ... and 'normal' ones ('critical' never are)
    drain_timeout = 30                # seconds in-flight requests get on shutdown

    [[providers]]                     # the serve-admin table, plus base_url and responses
    name = "deepseek"
    base_url = "https://api.deepseek.com/v1"
    keys_env = "DEEPSEEK_API_KEYS"
    responses = false                 # whether it serves POST /responses
    prefill = "deepseek"              # optional: continues a broken stream ("deepseek", "assistant")

    [models.chat]                     # a public model name and its routes, tried in order
    routes = [{ provider = "deepseek", model = "deepseek-chat" },
              { provider = "perplexity", model = "sonar" }]
    on_context_length = "chat-long"   # optional: a public model to use when the prompt is too long

    [[callers]]
    name = "billing"                  # what logs and metrics show
    key_hash = "scrypt$..."           # from 'keypool hash-key'
    models = ["chat"]                 # or ["*"]
    priority = "critical"             # critical | normal | low

Every problem is one :class:`~keypool.ConfigError` naming the field.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keypool import ConfigError, PoolConfig, Prefill
from keypool._config import validate
from keypool._continuation import PREFILLS
from keypool._serve import _provider

from ._callers import PRIORITIES, Caller, parse_hash

__all__ = ["GatewayConfig", "GatewaySettings", "ModelRoutes", "Route", "Upstream", "load_gateway_config"]

_TOP = frozenset({"gateway", "providers", "models", "callers"})
_UPSTREAM_FIELDS = frozenset({"base_url", "responses", "auth_header", "auth_scheme", "prefill"})
_MODEL_FIELDS = frozenset({"routes", "on_context_length"})
_ROUTE_FIELDS = frozenset({"provider", "model"})
_CALLER_FIELDS = frozenset({"name", "key_hash", "models", "priority"})


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Limits of the gateway itself (the ``[gateway]`` table)."""

    request_timeout: float = 120.0
    max_attempts: int = 6
    max_body_bytes: int = 8 * 1024 * 1024
    shed_low_below: float = 0.5
    shed_normal_below: float = 0.25
    drain_timeout: float = 30.0


_SETTING_RANGES: dict[str, tuple[type, float, float]] = {
    "request_timeout": (float, 0.001, 86400.0),
    "max_attempts": (int, 1, 100),
    "max_body_bytes": (int, 1024, 1 << 30),
    "shed_low_below": (float, 0.0, 1.0),
    "shed_normal_below": (float, 0.0, 1.0),
    "drain_timeout": (float, 0.0, 3600.0),
}


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a provider's API lives and what it serves."""

    name: str
    base_url: str
    responses: bool = False
    auth_header: str = "Authorization"
    auth_scheme: str | None = "Bearer"
    prefill: Prefill | None = None  # how it continues a broken stream: "deepseek", "assistant"


@dataclass(frozen=True, slots=True)
class Route:
    provider: str
    model: str


@dataclass(frozen=True, slots=True)
class ModelRoutes:
    """A public model name: its routes in order, and where a too-long prompt goes instead."""

    name: str
    routes: tuple[Route, ...]
    on_context_length: str | None = None


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    pool: PoolConfig
    upstreams: Mapping[str, Upstream]
    models: Mapping[str, ModelRoutes]
    callers: tuple[Caller, ...]
    settings: GatewaySettings = field(default_factory=GatewaySettings)


def _unknown(table: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise ConfigError(f"{where}: unknown field(s) {extra}; allowed: {', '.join(sorted(allowed))}")


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a non-empty string")
    return value


def _settings(data: Any) -> GatewaySettings:
    table = _table(data, "gateway")
    _unknown(table, frozenset(_SETTING_RANGES), "gateway")
    values: dict[str, Any] = {}
    for name, (kind, low, high) in _SETTING_RANGES.items():
        if name not in table:
            continue
        value = table[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (kind is int and not isinstance(value, int))
        ):
            raise ConfigError(f"gateway.{name}: expected {'an integer' if kind is int else 'a number'}")
        if not (math.isfinite(value) and low <= value <= high):
            raise ConfigError(f"gateway.{name}: must be within [{low:g}, {high:g}] (got {value})")
        values[name] = kind(value)
    settings = GatewaySettings(**values)
    if settings.shed_normal_below > settings.shed_low_below:
        raise ConfigError("gateway.shed_normal_below: must be <= shed_low_below (low callers are shed first)")
    return settings


def _upstream(table: Mapping[str, Any], where: str) -> Upstream:
    name = table.get("name")
    url = table.get("base_url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.base_url: expected an http:// or https:// URL")
    responses = table.get("responses", False)
    if not isinstance(responses, bool):
        raise ConfigError(f"{where}.responses: expected true or false")
    header = _text(table.get("auth_header", "Authorization"), f"{where}.auth_header")
    scheme = table.get("auth_scheme", "Bearer")
    if scheme is not None and not isinstance(scheme, str):
        raise ConfigError(f"{where}.auth_scheme: expected a string ('' for none)")
    prefill = table.get("prefill")
    if prefill is not None and prefill not in PREFILLS:
        raise ConfigError(f"{where}.prefill: must be one of {list(PREFILLS)} (got {prefill!r})")
    return Upstream(str(name), url.rstrip("/"), responses, header, scheme or None, prefill)


def _providers(data: Any, env: Mapping[str, str], source: str) -> tuple[PoolConfig, dict[str, Upstream]]:
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{source}: no [[providers]] table")
    pool_tables: list[dict[str, Any]] = []
    upstreams: dict[str, Upstream] = {}
    for i, raw in enumerate(data):
        where = f"{source}: providers[{i}]"
        table = _table(raw, where)
        rest = {k: v for k, v in table.items() if k not in _UPSTREAM_FIELDS}
        provider = _provider(rest, where, env)  # the pool's own fields, checked as serve-admin does
        where = f"{where} ({provider['name']})"
        if provider["name"] in upstreams:
            raise ConfigError(f"{where}.name: provider names must be unique")
        upstreams[provider["name"]] = _upstream(table, where)
        pool_tables.append(provider)
    try:
        pool = validate(PoolConfig, {"providers": pool_tables})
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return pool, upstreams


def _models(data: Any, upstreams: Mapping[str, Upstream]) -> dict[str, ModelRoutes]:
    tables = _table(data, "models")
    if not tables:
        raise ConfigError("models: no public model; add a [models.<name>] table with routes")
    models: dict[str, ModelRoutes] = {}
    for name, raw in tables.items():
        where = f"models.{name}"
        table = _table(raw, where)
        _unknown(table, _MODEL_FIELDS, where)
        routes = table.get("routes")
        if not isinstance(routes, list) or not routes:
            raise ConfigError(f"{where}.routes: expected a non-empty list of {{provider, model}} tables")
        parsed = []
        for j, route in enumerate(routes):
            at = f"{where}.routes[{j}]"
            route_table = _table(route, at)
            _unknown(route_table, _ROUTE_FIELDS, at)
            provider = _text(route_table.get("provider"), f"{at}.provider")
            if provider not in upstreams:
                raise ConfigError(f"{at}.provider: unknown provider {provider!r}; known: {sorted(upstreams)}")
            parsed.append(Route(provider, _text(route_table.get("model"), f"{at}.model")))
        fallback = table.get("on_context_length")
        if fallback is not None:
            fallback = _text(fallback, f"{where}.on_context_length")
        models[name] = ModelRoutes(name, tuple(parsed), fallback)
    for model in models.values():
        target = model.on_context_length
        if target is not None and (target == model.name or target not in models):
            raise ConfigError(
                f"models.{model.name}.on_context_length: expected another public model; "
                f"known: {sorted(models)}"
            )
    return models


def _callers(data: Any, models: Mapping[str, ModelRoutes]) -> tuple[Caller, ...]:
    if not isinstance(data, list) or not data:
        raise ConfigError("callers: no [[callers]] table; every request needs a caller key")
    callers: list[Caller] = []
    for i, raw in enumerate(data):
        where = f"callers[{i}]"
        table = _table(raw, where)
        _unknown(table, _CALLER_FIELDS, where)
        name = _text(table.get("name"), f"{where}.name")
        where = f"{where} ({name})"
        if any(c.name == name for c in callers):
            raise ConfigError(f"{where}.name: caller names must be unique")
        key_hash = _text(table.get("key_hash"), f"{where}.key_hash")
        parse_hash(key_hash, f"{where}.key_hash")
        allowed = table.get("models", ["*"])
        if not isinstance(allowed, list) or not allowed or not all(isinstance(m, str) for m in allowed):
            raise ConfigError(f"{where}.models: expected a non-empty list of public model names (or ['*'])")
        unknown = sorted(set(allowed) - set(models) - {"*"})
        if unknown:
            raise ConfigError(f"{where}.models: unknown model(s) {unknown}; known: {sorted(models)}")
        priority = table.get("priority", "normal")
        if priority not in PRIORITIES:
            raise ConfigError(f"{where}.priority: must be one of {list(PRIORITIES)} (got {priority!r})")
        callers.append(Caller(name, key_hash, None if "*" in allowed else frozenset(allowed), priority))
    return tuple(callers)


def gateway_config_from_mapping(
    data: Mapping[str, Any], env: Mapping[str, str] | None = None, source: str = "config"
) -> GatewayConfig:
    """A validated :class:`GatewayConfig` from parsed TOML; :class:`ConfigError` names the field."""
    environ = os.environ if env is None else env
    _unknown(data, _TOP, source)
    settings = _settings(data.get("gateway", {}))
    pool, upstreams = _providers(data.get("providers"), environ, source)
    try:
        models = _models(data.get("models", {}), upstreams)
        callers = _callers(data.get("callers"), models)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return GatewayConfig(pool, upstreams, models, callers, settings)


def load_gateway_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate a gateway TOML file."""
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the config file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: the config file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return gateway_config_from_mapping(data, env, str(file))
