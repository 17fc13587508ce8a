"""What a simulation runs: the pool's keys and breakers, the traffic, and the faults, as data.

Every piece is a frozen, validated model (the same base as :class:`~keypool.BreakerConfig`), so a
scenario can come from JSON or TOML and an impossible one (a negative rate, a probability above 1,
an outage that ends before it starts, a fault on a key that does not exist) is refused with
:class:`~keypool.ConfigError` naming the field. Times are seconds from the start of the run.

Faults apply to a provider's keys (all of them, or those named in ``keys``) between ``start`` and
``end``; for each attempt the first fault in the list that fires decides the answer, and an
attempt no fault claims succeeds after the ``latency`` fault's delay (0 by default).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from .._config import KEY_ID_PATTERN, BreakerConfig, KeySpec, ProviderConfig, Tier, _Model, validate

__all__ = [
    "Blips",
    "CallerErrors",
    "FailureRate",
    "Fault",
    "Flapping",
    "Latency",
    "Outage",
    "Scenario",
    "SimKey",
    "SimProvider",
    "Throttle",
    "Traffic",
]

_DAY = 86_400.0
_MAX_DURATION = 366 * _DAY
Seconds = Annotated[float, Field(ge=0.0, le=_MAX_DURATION)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
# None: the upstream never answers, so the attempt fails when the traffic's attempt_timeout ends.
ErrorStatus = Annotated[int, Field(ge=400, le=599)] | None


class SimKey(_Model):
    """One simulated key: an id, a routing weight, a tier, an optional concurrency cap."""

    key_id: str = Field(pattern=KEY_ID_PATTERN)
    weight: float = Field(1.0, gt=0, le=1_000_000)
    tier: Tier = "primary"
    max_concurrency: int | None = Field(None, ge=1, le=1_000_000)


def _provider_field(name: str) -> Any:
    """ProviderConfig's field ``name``, default, range and description included."""
    return ProviderConfig.model_fields[name]


class SimProvider(_Model):
    """A provider of the simulated pool. ``keys`` may be a count: ``4`` means key-1..key-4.

    The provider settings besides the keys are :class:`~keypool.ProviderConfig`'s own fields, with
    its defaults and ranges (``max_wait`` is how long a caller waits for a down provider).
    """

    name: str = Field(pattern=KEY_ID_PATTERN)
    keys: tuple[SimKey, ...] = Field(min_length=1, max_length=100_000)
    breaker: BreakerConfig = BreakerConfig()
    backup_threshold: float = _provider_field("backup_threshold")
    probation: float = _provider_field("probation")
    max_wait: float = _provider_field("max_wait")
    incident_window: float = _provider_field("incident_window")
    recheck_after: float = _provider_field("recheck_after")

    @field_validator("keys", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            if not 1 <= value <= 100_000:
                raise ValueError(f"a key count must be in [1, 100000] (got {value})")
            return [{"key_id": f"key-{i}"} for i in range(1, value + 1)]
        if isinstance(value, list | tuple):
            return [{"key_id": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _unique(self) -> SimProvider:
        ids = [k.key_id for k in self.keys]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate key id(s) {dupes}")
        return self

    def pool_config(self) -> ProviderConfig:
        """The real provider config: each key gets a made-up secret that never leaves the run."""
        return ProviderConfig(
            name=self.name,
            keys=tuple(
                KeySpec(
                    secret=SecretStr(f"sim-{self.name}-{k.key_id}"),
                    key_id=k.key_id,
                    weight=k.weight,
                    tier=k.tier,
                    max_concurrency=k.max_concurrency,
                )
                for k in self.keys
            ),
            breaker=self.breaker,
            backup_threshold=self.backup_threshold,
            probation=self.probation,
            max_wait=self.max_wait,
            incident_window=self.incident_window,
            recheck_after=self.recheck_after,
        )


class Traffic(_Model):
    """Requests to one provider, sent the way :class:`~keypool.KeyPoolTransport` sends them.

    Open loop: ``rate`` requests/s, ``poisson`` or evenly spaced (``uniform``, first at a random
    phase), or the exact instants in ``times``. Closed loop: ``workers`` callers that each send
    their next request ``think`` seconds after the last one ended.

    Each request's attempts are decided by the transport's own rules (``keypool``'s request
    policy, with these fields as its settings): a key's failure (429, 401/403, 402) moves it to
    another key for free; an endpoint failure (5xx, timeouts) costs one of ``retries`` unless another
    key is clean; a key already tried is tried again, after the ``openai`` client's backoff, only
    when no other key can serve; at most ``max_attempts`` attempts (default: the keys plus
    ``retries``), all within ``request_timeout``. An attempt waits for its answer at most
    ``attempt_timeout`` and the time-to-headers limit (``headers_timeout``; ``"auto"``: half the
    deadline). When no key can take it, it waits as
    :meth:`KeyPool.acquire <keypool.KeyPool.acquire>` does: for a *busy* provider (a key frees up
    when a call in flight ends) in a first-come queue until its deadline; for a *down* one only if
    the soonest recovery is at most ``max_wait`` seconds away (``None``: the provider's
    ``max_wait``), else it is refused at once.
    """

    provider: str
    rate: float = Field(50.0, ge=0.0, le=1_000_000.0, description="requests per second")
    arrivals: Literal["poisson", "uniform"] = "poisson"
    times: tuple[Seconds, ...] | None = Field(None, description="a trace of request instants")
    workers: int | None = Field(None, ge=1, le=100_000)
    think: Seconds = 0.0
    start: Seconds = 0.0
    end: Seconds | None = None
    retries: int = Field(2, ge=0, le=100, description="endpoint failures retried (openai's max_retries)")
    max_attempts: int | None = Field(None, ge=1, le=1_000, description="None: the keys plus retries")
    request_timeout: float = Field(60.0, gt=0.0, le=_DAY)
    headers_timeout: Annotated[float, Field(gt=0.0, le=_DAY)] | Literal["auto"] | None = "auto"
    attempt_timeout: float | None = Field(10.0, gt=0.0, le=_DAY)
    max_wait: Seconds | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Traffic:
        if self.end is not None and self.end < self.start:
            raise ValueError(f"end ({self.end}) must be >= start ({self.start})")
        if self.workers is not None and self.times is not None:
            raise ValueError("give workers (closed loop) or times (a trace), not both")
        return self


class _FaultBase(_Model):
    provider: str | None = Field(None, description="None: every provider")
    keys: tuple[str, ...] | None = Field(None, description="None: every key of the provider")
    start: Seconds = 0.0
    end: Seconds | None = None

    @model_validator(mode="after")
    def _window(self) -> _FaultBase:
        if self.end is not None and self.end < self.start:
            raise ValueError(f"end ({self.end}) must be >= start ({self.start})")
        return self


class FailureRate(_FaultBase):
    """Each attempt fails with probability ``p``, independently (an i.i.d. error mix)."""

    kind: Literal["failure_rate"] = "failure_rate"
    p: Probability
    status: ErrorStatus = 503
    latency: Seconds = 0.0


class Outage(_FaultBase):
    """Every attempt fails from ``start`` to ``end`` (``None``: to the end of the run)."""

    kind: Literal["outage"] = "outage"
    status: ErrorStatus = 503
    latency: Seconds = 0.0


class Blips(_FaultBase):
    """Short outages at random: ``per_hour`` on average (Poisson), each ``duration`` long.

    ``shared``: one schedule for every targeted key (a provider blip), else one per key.
    """

    kind: Literal["blips"] = "blips"
    per_hour: float = Field(ge=0.0, le=1_000_000.0)
    duration: float = Field(gt=0.0, le=_DAY)
    status: ErrorStatus = 503
    latency: Seconds = 0.0
    shared: bool = True


class Flapping(_FaultBase):
    """Down for ``down`` seconds, up for ``up`` seconds, again and again (``phase`` shifts it)."""

    kind: Literal["flapping"] = "flapping"
    down: float = Field(gt=0.0, le=_DAY)
    up: float = Field(gt=0.0, le=_DAY)
    phase: Seconds = 0.0
    status: ErrorStatus = 503
    latency: Seconds = 0.0


class Throttle(_FaultBase):
    """429 with probability ``p`` and ``Retry-After: retry_after`` (``None``: no header)."""

    kind: Literal["throttle"] = "throttle"
    p: Probability = 1.0
    retry_after: Seconds | None = 30.0
    latency: Seconds = 0.0


class CallerErrors(_FaultBase):
    """A share ``p`` of requests are the caller's mistake (400 whatever the key): never a key's fault."""

    kind: Literal["caller_errors"] = "caller_errors"
    p: Probability
    status: int = Field(400, ge=400, le=499)


class Latency(_FaultBase):
    """How long answers take: ``mean`` seconds (``fixed``, ``exponential`` or ``lognormal`` with
    ``sigma``), and a share ``stall_p`` of attempts that never answer (they time out)."""

    kind: Literal["latency"] = "latency"
    mean: Seconds = 0.0
    distribution: Literal["fixed", "exponential", "lognormal"] = "fixed"
    sigma: float = Field(0.5, gt=0.0, le=10.0)
    stall_p: Probability = 0.0


Fault = Annotated[
    FailureRate | Outage | Blips | Flapping | Throttle | CallerErrors | Latency,
    Field(discriminator="kind"),
]


class Scenario(_Model):
    """A whole simulated run: providers (with their keys and breakers), traffic and faults."""

    providers: tuple[SimProvider, ...] = Field(min_length=1)
    traffic: tuple[Traffic, ...] = Field(min_length=1)
    faults: tuple[Fault, ...] = ()
    duration: float = Field(gt=0.0, le=_MAX_DURATION)

    @model_validator(mode="after")
    def _references(self) -> Scenario:
        keys = {p.name: {k.key_id for k in p.keys} for p in self.providers}
        if len(keys) != len(self.providers):
            raise ValueError("duplicate provider names")
        for i, traffic in enumerate(self.traffic):
            if traffic.provider not in keys:
                raise ValueError(
                    f"traffic.{i}.provider: no provider {traffic.provider!r} (have {sorted(keys)})"
                )
        for i, fault in enumerate(self.faults):
            if fault.provider is not None and fault.provider not in keys:
                raise ValueError(f"faults.{i}.provider: no provider {fault.provider!r} (have {sorted(keys)})")
            if fault.keys is not None:
                scope = keys[fault.provider] if fault.provider else set().union(*keys.values())
                unknown = sorted(set(fault.keys) - scope)
                if unknown:
                    raise ValueError(f"faults.{i}.keys: unknown key id(s) {unknown} (have {sorted(scope)})")
        return self

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Scenario:
        """Validate a mapping (from JSON or TOML), raising :class:`~keypool.ConfigError`."""
        return validate(cls, data)

    def with_breaker(self, breaker: BreakerConfig, provider: str | None = None) -> Scenario:
        """The same scenario with other breaker settings (for one provider, or all)."""
        providers = tuple(
            p.model_copy(update={"breaker": breaker}) if provider in (None, p.name) else p
            for p in self.providers
        )
        return self.model_copy(update={"providers": providers})
