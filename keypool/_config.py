"""Validated configuration: breaker settings, key specs, providers and the whole pool.

Everything is a frozen pydantic model, so a config object can be shared and compared safely. Invalid
values raise :class:`~keypool.ConfigError` naming the field and the allowed range, never the value of
a secret.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from ._errors import ConfigError

__all__ = [
    "BreakerConfig",
    "KeySpec",
    "PoolConfig",
    "ProviderConfig",
    "Tier",
    "fingerprint",
    "validate",
]

Tier = Literal["primary", "backup"]
KEY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$"
_KEY_ID_RE = re.compile(KEY_ID_PATTERN)

_M = TypeVar("_M", bound=BaseModel)


def fingerprint(secret: str, prefix: str = "key") -> str:
    """A stable, non-reversible label for a secret: ``prefix-`` and 10 hex digits of its SHA-256."""
    return f"{prefix}-{hashlib.sha256(secret.encode()).hexdigest()[:10]}"


# Fields whose string values are labels, safe to echo back in an error message.
_ECHOED_STRING_FIELDS = frozenset({"key_id", "name", "tier"})


def _describe(error: Mapping[str, Any]) -> str:
    loc = ".".join(str(p) for p in error.get("loc", ())) or "config"
    message = str(error.get("msg", "invalid value"))
    secret_field = any("secret" in str(p) for p in error.get("loc", ()))
    whole_object = not error.get("loc") or isinstance(error.get("input"), Mapping)
    # Any other string (or container of strings) may be a secret in the wrong place: a key list
    # given as plain secrets, or a misspelt field such as ``api_key``. Echo numbers and labels only.
    value = error.get("input")
    label = bool(error.get("loc")) and str(error["loc"][-1]) in _ECHOED_STRING_FIELDS
    echoable = value is None or isinstance(value, int | float) or (isinstance(value, str) and label)
    if secret_field or whole_object or not echoable or "input" not in error or error.get("type") == "missing":
        return f"{loc}: {message}"
    shown = repr(error["input"])
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{loc}: {message} (got {shown})"


def _summary(exc: ValidationError) -> str:
    """One line per real problem: a list's "too short" echo of its failing items is dropped."""
    errors = exc.errors(include_url=False)
    inner = {tuple(e["loc"][:1]) for e in errors if len(e["loc"]) > 1}
    kept = [e for e in errors if not (e["type"] == "too_short" and tuple(e["loc"]) in inner)]
    return "; ".join(_describe(e) for e in kept)


_validating: ContextVar[bool] = ContextVar("keypool_validating", default=False)


def validate(model: type[_M], data: Any) -> _M:
    """Validate ``data`` into ``model``, turning pydantic's error into a :class:`ConfigError`."""
    token = _validating.set(True)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {model.__name__}: " + _summary(exc)) from None
    finally:
        _validating.reset(token)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    def __init__(self, /, **data: Any) -> None:
        if _validating.get():  # nested model: let the outermost one report every error once
            super().__init__(**data)
            return
        token = _validating.set(True)
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(f"invalid {type(self).__name__}: " + _summary(exc)) from None
        finally:
            _validating.reset(token)


class BreakerConfig(_Model):
    """When a key's breaker opens, how long it stays open and how it probes its way back.

    The first four fields and their defaults are the runbook's. The rest go beyond it: the open
    time can grow per consecutive trip (``backoff_multiplier``, capped by ``max_timeout``) with up to
    ``jitter`` of extra time so keys that tripped together do not re-probe in step; a trial slot
    that never reports back is reclaimed after ``probe_timeout``; a 429 without a usable
    ``Retry-After`` keeps the key out for ``default_retry_after`` and no header keeps it out longer
    than ``max_retry_after``.
    """

    failure_threshold: int = Field(
        5, ge=1, le=1_000_000, description="consecutive failures that open the breaker"
    )
    success_threshold: int = Field(2, ge=1, le=1_000_000, description="trial successes that close it")
    timeout: float = Field(60.0, gt=0, le=86_400, description="seconds open before half-open")
    half_open_max_calls: int = Field(3, ge=1, le=1_000_000, description="trial calls in flight at once")
    backoff_multiplier: float = Field(1.0, ge=1.0, le=100.0)
    max_timeout: float = Field(600.0, gt=0, le=86_400)
    jitter: float = Field(0.0, ge=0.0, le=1.0, description="extra open time, as a fraction")
    probe_timeout: float = Field(
        120.0, gt=0, le=86_400, description="seconds before an unreported trial slot is reclaimed"
    )
    default_retry_after: float = Field(5.0, gt=0, le=86_400)
    max_retry_after: float = Field(3600.0, gt=0, le=7 * 86_400)

    @model_validator(mode="after")
    def _consistent(self) -> BreakerConfig:
        if self.max_timeout < self.timeout:
            raise ValueError(f"max_timeout ({self.max_timeout}) must be >= timeout ({self.timeout})")
        if self.max_retry_after < self.default_retry_after:
            raise ValueError("max_retry_after must be >= default_retry_after")
        return self

    def updated(self, changes: Mapping[str, Any]) -> BreakerConfig:
        """A copy with ``changes`` applied and the whole result validated again."""
        unknown = set(changes) - set(type(self).model_fields)
        if unknown:
            allowed = ", ".join(sorted(type(self).model_fields))
            raise ConfigError(f"unknown breaker config field(s) {sorted(unknown)}; allowed: {allowed}")
        for name, value in changes.items():  # as strict as the admin API: no True for 1, no "10"
            integral = type(self).model_fields[name].annotation is int
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or (integral and not isinstance(value, int)):
                wanted = "an integer" if integral else "a number"
                raise ConfigError(f"{name}: expected {wanted} (got {type(value).__name__})")
        return validate(BreakerConfig, {**self.model_dump(), **changes})


class KeySpec(_Model):
    """One API key: its secret, a public id, a routing weight, a tier and an optional concurrency cap."""

    secret: SecretStr
    key_id: str | None = Field(None, pattern=KEY_ID_PATTERN)
    weight: float = Field(1.0, gt=0, le=1_000_000)
    tier: Tier = "primary"
    max_concurrency: int | None = Field(None, ge=1, le=1_000_000)

    @field_validator("secret")
    @classmethod
    def _non_empty(cls, secret: SecretStr) -> SecretStr:
        if not secret.get_secret_value().strip():
            raise ValueError("secret must not be empty")
        return secret

    @property
    def id(self) -> str:
        """The explicit ``key_id``, or a fingerprint of the secret."""
        return self.key_id or fingerprint(self.secret.get_secret_value())


class ProviderConfig(_Model):
    """A provider's keys and the breaker settings they share (keys may be overridden later)."""

    name: str = Field(pattern=KEY_ID_PATTERN)
    keys: tuple[KeySpec, ...] = Field(min_length=1)
    breaker: BreakerConfig = BreakerConfig()
    backup_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="primary healthy share below which backup keys serve"
    )
    probation: float = Field(
        0.25,
        ge=0.0,
        le=60.0,
        description="seconds a new key carries one call at a time until its first success",
    )
    max_wait: float = Field(
        5.0,
        ge=0.0,
        le=86_400.0,
        description="seconds a caller may wait for a down provider's soonest recovery (a short "
        "Retry-After) before it is refused at once; a busy provider is waited for up to the deadline",
    )
    incident_window: float = Field(
        60.0,
        ge=0.0,
        le=86_400.0,
        description="every key refused (401/403/402) within this many seconds is a provider "
        "incident: the keys are re-verified on a backoff schedule instead of staying quarantined",
    )
    recheck_after: float = Field(
        30.0,
        gt=0.0,
        le=86_400.0,
        description="seconds before a key refused in a provider incident is first re-verified",
    )

    @model_validator(mode="after")
    def _unique_ids(self) -> ProviderConfig:
        seen: set[str] = set()
        secrets: dict[str, str] = {}
        for spec in self.keys:
            if spec.id in seen:
                raise ValueError(
                    f"duplicate key id {spec.id!r} (the same secret twice, or a repeated key_id)"
                )
            seen.add(spec.id)
            other = secrets.setdefault(spec.secret.get_secret_value(), spec.id)
            if other != spec.id:
                raise ValueError(f"keys {other!r} and {spec.id!r} have the same secret")
        return self


class PoolConfig(_Model):
    """All providers of a pool."""

    providers: tuple[ProviderConfig, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> PoolConfig:
        names = [p.name for p in self.providers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate provider name(s) {dupes}")
        return self


def keys_from(
    secrets: Sequence[str | KeySpec] | None = None,
    *,
    backup: Sequence[str | KeySpec] = (),
    weights: Sequence[float] | None = None,
) -> tuple[KeySpec, ...]:
    """Build key specs from plain secrets (primary), optional weights and backup secrets."""
    for name, given in (("api_keys", secrets), ("backup_keys", backup)):
        if isinstance(given, str):  # a string is a sequence too: one key per character
            raise ConfigError(f'{name}: expected a list of keys, got one string; write {name}=["..."]')
    primary = list(secrets or ())
    if weights is not None and len(weights) != len(primary):
        raise ConfigError(f"weights: expected {len(primary)} values (one per key), got {len(weights)}")
    specs: list[KeySpec] = []
    for i, item in enumerate(primary):
        if isinstance(item, KeySpec):
            specs.append(item)
        else:
            w = weights[i] if weights is not None else 1.0
            specs.append(KeySpec(secret=SecretStr(item), weight=w))
    for item in backup:
        specs.append(item if isinstance(item, KeySpec) else KeySpec(secret=SecretStr(item), tier="backup"))
    return tuple(specs)


def valid_key_id(key_id: str) -> bool:
    return bool(_KEY_ID_RE.match(key_id))
