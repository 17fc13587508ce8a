"""Health probes that go through the breakers: a probe's outcome moves the same breaker as real
traffic, and a key whose breaker refuses calls is not probed (the skip is counted instead).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx2

from keypool import KeyPool, Lease, OutcomeKind, classify_exception, classify_status

__all__ = ["HealthReport", "KeyHealth", "Probe", "check_health", "check_health_sync"]

ProbeResult = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True, slots=True)
class Probe:
    """The request that tells whether a key works: ``GET /models`` by default."""

    method: str = "GET"
    path: str = "/models"
    json: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class KeyHealth:
    """One key's probe: ``ok``, ``failed`` (with the outcome kind and status) or ``skipped``."""

    key_id: str
    result: ProbeResult
    outcome: str | None = None
    status: int | None = None
    latency: float | None = None
    state: str = ""


@dataclass(frozen=True, slots=True)
class HealthReport:
    """Every key of a provider after one round of probes."""

    provider: str
    keys: tuple[KeyHealth, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> int:
        return sum(1 for k in self.keys if k.result == "ok")

    @property
    def failed(self) -> int:
        return sum(1 for k in self.keys if k.result == "failed")

    @property
    def skipped(self) -> int:
        return sum(1 for k in self.keys if k.result == "skipped")


def _request(base_url: str, probe: Probe, lease: Lease, header: str, scheme: str | None) -> httpx2.Request:
    secret = lease.secret.get_secret_value()
    url = base_url.rstrip("/") + "/" + probe.path.lstrip("/")
    return httpx2.Request(
        probe.method,
        url,
        json=probe.json,
        headers={header: f"{scheme} {secret}" if scheme else secret},
    )


def _leases(pool: KeyPool, provider: str) -> list[tuple[str, Lease | None]]:
    """A lease per key whose breaker admits a probe now; ``None`` (and a skip event) otherwise."""
    out: list[tuple[str, Lease | None]] = []
    for key_id in pool.key_ids(provider):
        lease = pool.try_acquire_key(provider, key_id)
        if lease is None:
            pool.note_rejected(provider, "probe_skipped", key_id)
        out.append((key_id, lease))
    return out


def _finish(
    pool: KeyPool,
    provider: str,
    key_id: str,
    lease: Lease,
    status: int | None,
    error: BaseException | None,
    started: float,
) -> KeyHealth:
    outcome = classify_exception(error) if error is not None else classify_status(status or 0)
    if error is not None and outcome.kind is OutcomeKind.IGNORED and isinstance(error, Exception):
        outcome = classify_status(599)  # an unexplained error while probing is the endpoint's
    lease.record(outcome)
    ok = outcome.kind is OutcomeKind.SUCCESS
    return KeyHealth(
        key_id,
        "ok" if ok else "failed",
        outcome.kind.value,
        status,
        time.perf_counter() - started,
        pool.key_stats(key_id, provider)["state"],
    )


def _skipped(pool: KeyPool, provider: str, key_id: str) -> KeyHealth:
    return KeyHealth(key_id, "skipped", state=pool.key_stats(key_id, provider)["state"])


async def check_health(
    pool: KeyPool, provider: str, transport: Any, base_url: str, probe: Probe
) -> HealthReport:
    """Probe every admitted key of ``provider`` once, sequentially, through its breaker."""
    rows: list[KeyHealth] = []
    for key_id, lease in _leases(pool, provider):
        if lease is None:
            rows.append(_skipped(pool, provider, key_id))
            continue
        started = time.perf_counter()
        request = _request(base_url, probe, lease, transport.auth_header, transport.auth_scheme)
        status: int | None = None
        error: BaseException | None = None
        try:
            response = await transport.inner.handle_async_request(request)
            status = response.status_code
            await response.aread()
            await response.aclose()
        except Exception as exc:
            error = exc
        except BaseException:
            lease.release()
            raise
        rows.append(_finish(pool, provider, key_id, lease, status, error, started))
    return HealthReport(provider, tuple(rows))


def check_health_sync(
    pool: KeyPool, provider: str, transport: Any, base_url: str, probe: Probe
) -> HealthReport:
    """:func:`check_health` for sync clients."""
    rows: list[KeyHealth] = []
    for key_id, lease in _leases(pool, provider):
        if lease is None:
            rows.append(_skipped(pool, provider, key_id))
            continue
        started = time.perf_counter()
        request = _request(base_url, probe, lease, transport.auth_header, transport.auth_scheme)
        status: int | None = None
        error: BaseException | None = None
        try:
            response = transport.inner.handle_request(request)
            status = response.status_code
            response.read()
            response.close()
        except Exception as exc:
            error = exc
        except BaseException:
            lease.release()
            raise
        rows.append(_finish(pool, provider, key_id, lease, status, error, started))
    return HealthReport(provider, tuple(rows))
