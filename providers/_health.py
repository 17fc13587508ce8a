"""Health probes that go through the breakers: a probe's outcome moves the same breaker as real
traffic, and a key whose breaker refuses calls is not probed (the skip is counted instead).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import httpx2

from keypool import KeyPool, Lease, OutcomeKind, classify_exception, classify_status

__all__ = ["HealthReport", "KeyHealth", "Probe", "check_health", "check_health_sync"]

ProbeResult = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True, slots=True)
class Probe:
    """The request that tells whether a key works: ``GET /models`` by default.

    ``timeout`` bounds each probe (a hanging key counts as a failure, never hangs the check);
    ``status_of`` maps an answer's status and body to the status it stands for, for APIs that
    report a key's trouble in a 200 body (DeepSeek's balance says ``is_available: false``).
    """

    method: str = "GET"
    path: str = "/models"
    json: dict[str, Any] | None = None
    timeout: float = 10.0
    status_of: Callable[[int, bytes], int] | None = None

    def judge(self, status: int, body: bytes) -> int:
        return self.status_of(status, body) if self.status_of is not None else status


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
        extensions={"timeout": httpx2.Timeout(probe.timeout).as_dict()},
    )


def _lease_or_skip(pool: KeyPool, provider: str, key_id: str, first: bool) -> Lease | None:
    """A lease if the key's breaker admits a probe now; a skipped probe is counted once."""
    lease = pool.try_acquire_key(provider, key_id)
    if lease is None and first:
        pool.note_rejected(provider, "probe_skipped", key_id)
    return lease


def _again(row: KeyHealth, lease: Lease, rounds: int, pool: KeyPool, provider: str) -> bool:
    """Probe a half-open key again after a successful trial, until it closes (or has had enough)."""
    if row.result != "ok" or not lease.trial or row.state != "half_open":
        return False
    needed = pool.breaker_config(row.key_id, provider).success_threshold
    return rounds < needed


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


_Sent = tuple[int | None, Exception | None]


def _probe_rounds(
    pool: KeyPool, provider: str, transport: Any, base_url: str, probe: Probe
) -> Generator[httpx2.Request, _Sent, HealthReport]:
    """The probing logic without I/O: yields each request, receives (status, error) back.

    A half-open key is probed until its trials close it (``success_threshold`` successes), so a
    recovered key is back within one round; an open key is skipped and the skip counted. The
    sync and async drivers below only send the requests.
    """
    rows: list[KeyHealth] = []
    for key_id in pool.key_ids(provider):
        rounds = 0
        while True:
            lease = _lease_or_skip(pool, provider, key_id, first=rounds == 0)
            if lease is None:
                if rounds == 0:
                    rows.append(_skipped(pool, provider, key_id))
                break
            rounds += 1
            started = time.perf_counter()
            try:
                status, error = yield _request(
                    base_url, probe, lease, transport.auth_header, transport.auth_scheme
                )
            except BaseException:  # cancelled while probing: give the trial slot back
                lease.release()
                raise
            row = _finish(pool, provider, key_id, lease, status, error, started)
            if not _again(row, lease, rounds, pool, provider):
                rows.append(row)
                break
    return HealthReport(provider, tuple(rows))


async def check_health(
    pool: KeyPool, provider: str, transport: Any, base_url: str, probe: Probe
) -> HealthReport:
    """Probe every key of ``provider`` whose breaker admits a call, one after another."""
    rounds = _probe_rounds(pool, provider, transport, base_url, probe)
    try:
        request = next(rounds)
        while True:
            try:
                # Also for transports that ignore the request's timeout (e.g. in-process ones).
                with anyio.fail_after(probe.timeout):
                    response = await transport.inner.handle_async_request(request)
                    try:
                        body = await response.aread()
                    finally:
                        with anyio.CancelScope(shield=True):
                            await response.aclose()
                sent: _Sent = (probe.judge(response.status_code, body), None)
            except Exception as exc:
                sent = (None, exc)
            except BaseException as exc:
                rounds.throw(exc)
                raise
            request = rounds.send(sent)
    except StopIteration as done:
        report: HealthReport = done.value
        return report


def check_health_sync(
    pool: KeyPool, provider: str, transport: Any, base_url: str, probe: Probe
) -> HealthReport:
    """:func:`check_health` for sync clients."""
    rounds = _probe_rounds(pool, provider, transport, base_url, probe)
    try:
        request = next(rounds)
        while True:
            try:
                response = transport.inner.handle_request(request)
                try:
                    body = response.read()
                finally:
                    response.close()
                sent: _Sent = (probe.judge(response.status_code, body), None)
            except Exception as exc:
                sent = (None, exc)
            except BaseException as exc:
                rounds.throw(exc)
                raise
            request = rounds.send(sent)
    except StopIteration as done:
        report: HealthReport = done.value
        return report
