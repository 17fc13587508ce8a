"""keypool.metrics: exact samples on a fresh registry while a pool on a fake clock trips, probes,
recovers, is throttled and quarantined; exposition validity; no secrets; registry hygiene."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import SecretStr

from keypool import ConfigError, KeyPool, KeySpec, Outcome, OutcomeKind
from keypool._events import REFUSAL_REASONS
from keypool.metrics import PoolMetrics, instrument
from keypool.testing import FakeClock

P = "deepseek"
SECRETS = {"a": "sk-metrics-secret-aaaa1111", "b": "sk-metrics-secret-bbbb2222", "c": "sk-metrics-bak-cccc"}
REJECTED_BY_CALLER_429 = Outcome(OutcomeKind.THROTTLED, 429, retry_after=30.0)


def make_pool(clock: FakeClock, provider: str = P) -> KeyPool:
    keys = [KeySpec(secret=SecretStr(SECRETS[k]), key_id=k) for k in ("a", "b")]
    backup = [KeySpec(secret=SecretStr(SECRETS["c"]), key_id="c", tier="backup")]
    return KeyPool.from_keys(provider, keys, backup_keys=backup, clock=clock)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def pool(clock: FakeClock) -> KeyPool:
    return make_pool(clock)


@pytest.fixture
def metrics(pool: KeyPool, registry: CollectorRegistry) -> Iterator[PoolMetrics]:
    with instrument(pool, registry) as m:
        yield m


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def key_value(registry: CollectorRegistry, name: str, key: str, **labels: str) -> float | None:
    return value(registry, name, provider=P, key_id=key, **labels)


def call(pool: KeyPool, key: str, outcome: Outcome | None = None, *, clock: FakeClock | None = None) -> None:
    lease = pool.try_acquire_key(P, key)
    assert lease is not None, f"key {key} refused a call"
    if clock is not None:
        clock.advance(0.3)
    lease.record(outcome or Outcome(OutcomeKind.SUCCESS, 200))


def fail(pool: KeyPool, key: str, times: int = 1) -> None:
    for _ in range(times):
        call(pool, key, Outcome(OutcomeKind.FAILURE, 503))


# ---------------------------------------------------------------------- the life of a key


@pytest.mark.usefixtures("metrics")
def test_fresh_pool_reports_every_key_closed_and_zeroed_counters(registry: CollectorRegistry) -> None:
    for key in "abc":
        assert key_value(registry, "circuit_breaker_state", key) == 0
        assert key_value(registry, "circuit_breaker_failure_count", key) == 0
        assert key_value(registry, "circuit_breaker_failures_total", key) == 0
        assert key_value(registry, "circuit_breaker_successful_requests_total", key) == 0
        assert key_value(registry, "circuit_breaker_half_open_calls_total", key) == 0
        assert key_value(registry, "circuit_breaker_half_open_successes_total", key) == 0
        for outcome in OutcomeKind:
            assert key_value(registry, "keypool_requests_total", key, outcome=outcome.value) == 0
        for reason in ("failures", "trial_failed", "throttled", "rejected", "quota", "manual"):
            assert key_value(registry, "circuit_breaker_trips_total", key, reason=reason) == 0
        for old, new in [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]:
            labels = {"from_state": old, "to_state": new}
            assert key_value(registry, "circuit_breaker_state_transitions_total", key, **labels) == 0
    assert value(registry, "keypool_keys", provider=P, state="closed") == 3
    for state in ("half_open", "open", "throttled", "quarantined"):
        assert value(registry, "keypool_keys", provider=P, state=state) == 0
    assert value(registry, "keypool_capacity_healthy_share", provider=P) == 1.0
    assert value(registry, "keypool_backup_active", provider=P) == 0
    assert value(registry, "keypool_request_duration_seconds_count", provider=P) == 0
    # Refusals too, for every reason: increase() then sees the first refused burst.
    for reason in ("open", "throttled", "rejected", "busy", "load_shed", "probe_skipped", "other"):
        assert value(registry, "keypool_rejected_calls_total", provider=P, reason=reason) == 0


def test_every_provider_and_key_gets_zero_samples_as_it_arrives(
    pool: KeyPool, registry: CollectorRegistry, metrics: PoolMetrics
) -> None:
    late = KeySpec(secret=SecretStr("pplx-late-0001"), key_id="p")
    pool.add_provider({"name": "perplexity", "keys": [late]})
    pool.add_key(P, KeySpec(secret=SecretStr("sk-metrics-late-dddd"), key_id="d"))
    assert value(registry, "keypool_rejected_calls_total", provider="perplexity", reason="open") == 0
    labels = {"provider": "perplexity", "key_id": "p", "outcome": "failure"}
    assert value(registry, "keypool_requests_total", **labels) == 0
    assert key_value(registry, "keypool_requests_total", "d", outcome="throttled") == 0
    text = exposition(registry)
    # One sample per key and outcome, one per provider and reason: nothing else, nothing twice.
    assert text.count("keypool_requests_total{") == 5 * len(OutcomeKind)
    assert text.count("keypool_rejected_calls_total{") == 2 * (len(REFUSAL_REASONS) + 1)  # + other


@pytest.mark.usefixtures("metrics")
def test_trip_half_open_and_close(pool: KeyPool, clock: FakeClock, registry: CollectorRegistry) -> None:
    fail(pool, "a", 3)
    assert key_value(registry, "circuit_breaker_failure_count", "a") == 3
    assert key_value(registry, "circuit_breaker_state", "a") == 0

    fail(pool, "a", 2)  # the fifth consecutive failure opens it
    assert key_value(registry, "circuit_breaker_state", "a") == 2
    assert key_value(registry, "circuit_breaker_failure_count", "a") == 0
    assert key_value(registry, "circuit_breaker_failures_total", "a") == 5
    assert key_value(registry, "circuit_breaker_trips_total", "a", reason="failures") == 1
    transitions = "circuit_breaker_state_transitions_total"
    assert key_value(registry, transitions, "a", from_state="closed", to_state="open") == 1
    assert key_value(registry, "keypool_requests_total", "a", outcome="failure") == 5
    assert value(registry, "keypool_keys", provider=P, state="open") == 1
    # The idle backup "c" is a reserve, not capacity: one of the two serving primaries is closed.
    assert value(registry, "keypool_capacity_healthy_share", provider=P) == pytest.approx(1 / 2)

    # No traffic at all: the scrape alone notices that the timeout has passed.
    clock.advance(60)
    assert key_value(registry, "circuit_breaker_state", "a") == 1
    assert key_value(registry, transitions, "a", from_state="open", to_state="half_open") == 1
    assert key_value(registry, "circuit_breaker_state_duration_seconds_total", "a", state="open") == 60
    assert value(registry, "keypool_keys", provider=P, state="half_open") == 1

    clock.advance(5)
    call(pool, "a")
    assert key_value(registry, "circuit_breaker_state", "a") == 1  # success_threshold is 2
    call(pool, "a")
    assert key_value(registry, "circuit_breaker_state", "a") == 0
    assert key_value(registry, "circuit_breaker_half_open_calls_total", "a") == 2
    assert key_value(registry, "circuit_breaker_half_open_successes_total", "a") == 2
    assert key_value(registry, "circuit_breaker_successful_requests_total", "a") == 2
    call(pool, "a")  # closed again: an ordinary success, not a trial
    assert key_value(registry, "circuit_breaker_successful_requests_total", "a") == 3
    assert key_value(registry, "circuit_breaker_half_open_successes_total", "a") == 2
    assert key_value(registry, transitions, "a", from_state="half_open", to_state="closed") == 1
    duration = "circuit_breaker_state_duration_seconds_total"
    assert key_value(registry, duration, "a", state="half_open") == 5
    assert key_value(registry, duration, "a", state="closed") == 0
    clock.advance(10)
    assert key_value(registry, duration, "a", state="closed") == 10
    assert key_value(registry, duration, "b", state="closed") == 75
    assert value(registry, "keypool_capacity_healthy_share", provider=P) == 1.0


@pytest.mark.usefixtures("metrics")
def test_failed_trial_reopens(pool: KeyPool, clock: FakeClock, registry: CollectorRegistry) -> None:
    fail(pool, "a", 5)
    clock.advance(60)
    fail(pool, "a")
    assert key_value(registry, "circuit_breaker_state", "a") == 2
    assert key_value(registry, "circuit_breaker_trips_total", "a", reason="trial_failed") == 1
    assert key_value(registry, "circuit_breaker_half_open_calls_total", "a") == 1
    assert key_value(registry, "circuit_breaker_half_open_successes_total", "a") == 0
    labels = {"from_state": "half_open", "to_state": "open"}
    assert key_value(registry, "circuit_breaker_state_transitions_total", "a", **labels) == 1


@pytest.mark.usefixtures("metrics")
def test_throttle_quarantine_and_backups(
    pool: KeyPool, clock: FakeClock, registry: CollectorRegistry
) -> None:
    call(pool, "b", REJECTED_BY_CALLER_429)
    assert key_value(registry, "circuit_breaker_state", "b") == 2
    assert key_value(registry, "circuit_breaker_trips_total", "b", reason="throttled") == 1
    assert key_value(registry, "keypool_requests_total", "b", outcome="throttled") == 1
    assert value(registry, "keypool_keys", provider=P, state="throttled") == 1
    assert value(registry, "keypool_keys", provider=P, state="open") == 0

    call(pool, "a", Outcome(OutcomeKind.REJECTED, 401))
    assert key_value(registry, "circuit_breaker_state", "a") == 2
    assert key_value(registry, "circuit_breaker_trips_total", "a", reason="rejected") == 1
    assert value(registry, "keypool_keys", provider=P, state="quarantined") == 1
    # Both primaries are out: the backup tier serves.
    assert value(registry, "keypool_backup_active", provider=P) == 1
    assert value(registry, "keypool_capacity_healthy_share", provider=P) == pytest.approx(1 / 3)

    call(pool, "c", Outcome(OutcomeKind.EXHAUSTED, 402))
    assert key_value(registry, "circuit_breaker_trips_total", "c", reason="quota") == 1
    assert value(registry, "keypool_keys", provider=P, state="quarantined") == 2
    assert value(registry, "keypool_capacity_healthy_share", provider=P) == 0

    clock.advance(30)  # the Retry-After instant passes: b is back
    assert key_value(registry, "circuit_breaker_state", "b") == 0
    labels = {"from_state": "open", "to_state": "closed"}
    assert key_value(registry, "circuit_breaker_state_transitions_total", "b", **labels) == 1
    assert value(registry, "keypool_keys", provider=P, state="throttled") == 0

    pool.reset()
    assert value(registry, "keypool_keys", provider=P, state="closed") == 3
    assert value(registry, "keypool_backup_active", provider=P) == 0


def test_a_trip_another_pool_decided_is_a_transition_here_too(clock: FakeClock) -> None:
    # CircuitBreakerFlapping counts closed -> open per process and takes the worst process: with a
    # shared store that holds only if every pool's breaker notes the trips the others decided.
    from keypool.store import MemoryStore

    store = MemoryStore(clock)
    config = {"providers": [{"name": P, "keys": [{"secret": SECRETS["a"], "key_id": "a"}]}]}
    deciding, watching = KeyPool(config, clock=clock, store=store), KeyPool(config, clock=clock, store=store)
    registry = CollectorRegistry()
    with instrument(watching, registry):
        fail(deciding, "a", 5)
        labels = {"from_state": "closed", "to_state": "open"}
        assert key_value(registry, "circuit_breaker_state", "a") == 2
        assert key_value(registry, "circuit_breaker_state_transitions_total", "a", **labels) == 1
    store.close()


@pytest.mark.usefixtures("metrics")
def test_manual_quarantine_and_trip(pool: KeyPool, registry: CollectorRegistry) -> None:
    pool.quarantine("a", P)
    pool.trip(P, "b")
    assert key_value(registry, "circuit_breaker_trips_total", "a", reason="manual") == 1
    assert key_value(registry, "circuit_breaker_trips_total", "b", reason="failures") == 1
    assert value(registry, "keypool_keys", provider=P, state="quarantined") == 1
    assert value(registry, "keypool_keys", provider=P, state="open") == 1


@pytest.mark.usefixtures("metrics")
def test_rejected_calls_by_reason(pool: KeyPool, registry: CollectorRegistry) -> None:
    pool.quarantine("a", P)
    pool.quarantine("b", P)
    pool.quarantine("c", P)
    with pytest.raises(Exception, match="no key"):
        pool.try_acquire(P)
    pool.note_rejected(P, "load_shed")
    pool.note_rejected(P, "probe_skipped", "a")
    pool.note_rejected(P, "something-new")
    assert value(registry, "keypool_rejected_calls_total", provider=P, reason="manual") == 1
    assert value(registry, "keypool_rejected_calls_total", provider=P, reason="load_shed") == 1
    assert value(registry, "keypool_rejected_calls_total", provider=P, reason="probe_skipped") == 1
    assert value(registry, "keypool_rejected_calls_total", provider=P, reason="other") == 1


@pytest.mark.usefixtures("metrics")
def test_request_outcomes_and_duration_histogram(
    pool: KeyPool, clock: FakeClock, registry: CollectorRegistry
) -> None:
    call(pool, "a", clock=clock)  # 0.3 s
    call(pool, "b", Outcome(OutcomeKind.CALLER_ERROR, 400), clock=clock)
    lease = pool.try_acquire_key(P, "a")
    assert lease is not None
    clock.advance(7)
    lease.release()
    assert key_value(registry, "keypool_requests_total", "a", outcome="success") == 1
    assert key_value(registry, "keypool_requests_total", "b", outcome="caller_error") == 1
    assert key_value(registry, "keypool_requests_total", "a", outcome="ignored") == 1
    assert key_value(registry, "circuit_breaker_failures_total", "b") == 0  # a 400 is not the key's
    hist = "keypool_request_duration_seconds"
    assert value(registry, f"{hist}_count", provider=P) == 3
    assert value(registry, f"{hist}_sum", provider=P) == pytest.approx(7.6)
    assert value(registry, f"{hist}_bucket", provider=P, le="0.25") == 0
    assert value(registry, f"{hist}_bucket", provider=P, le="0.5") == 2
    assert value(registry, f"{hist}_bucket", provider=P, le="5.0") == 2
    assert value(registry, f"{hist}_bucket", provider=P, le="10.0") == 3
    assert value(registry, f"{hist}_bucket", provider=P, le="+Inf") == 3


# ---------------------------------------------------------------------- exposition


def exposition(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_exposition_never_contains_a_secret(
    pool: KeyPool, clock: FakeClock, registry: CollectorRegistry, metrics: PoolMetrics
) -> None:
    fail(pool, "a", 5)
    call(pool, "b", REJECTED_BY_CALLER_429)
    pool.quarantine("c", P)
    clock.advance(61)
    text = exposition(registry)
    assert 'key_id="a"' in text
    for secret in SECRETS.values():
        assert secret not in text
        assert secret[3:12] not in text


def test_key_ids_default_to_fingerprints_never_secrets(clock: FakeClock, registry: CollectorRegistry) -> None:
    pool = KeyPool.from_keys("perplexity", ["pplx-plain-secret-0001", "pplx-plain-secret-0002"], clock=clock)
    with instrument(pool, registry):
        text = exposition(registry)
    assert "pplx-plain-secret" not in text
    assert 'key_id="key-' in text


# Names that the runbook fixes; promtool's naming lint flags them, nothing else may be flagged.
# docs/runbook.md documents each exception (the test below checks that it does).
_CONTRACT_LINT = {"circuit_breaker_failure_count non-histogram and non-summary metrics should not have "}
RUNBOOK = Path(__file__).resolve().parents[1] / "docs" / "runbook.md"


def test_promtool_accepts_the_exposition(
    pool: KeyPool, clock: FakeClock, registry: CollectorRegistry, metrics: PoolMetrics
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not on PATH (install Debian's 'prometheus' package)")
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus)")
    fail(pool, "a", 5)
    call(pool, "b", clock=clock)
    pool.note_rejected(P, "load_shed")
    clock.advance(61)
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition(registry),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    unexpected = [p for p in problems if not any(p.startswith(ok) for ok in _CONTRACT_LINT)]
    assert not unexpected, problems
    # 0: clean; 3: lint problems only (the contract name above); anything else is a parse error.
    assert result.returncode in (0, 3), problems
    runbook = RUNBOOK.read_text(encoding="utf-8")
    for exception in _CONTRACT_LINT:
        assert exception in runbook, f"docs/runbook.md does not document the lint exception {exception!r}"


def test_every_contract_metric_is_exposed(registry: CollectorRegistry, metrics: PoolMetrics) -> None:
    text = exposition(registry)
    for name, kind in [
        ("circuit_breaker_state", "gauge"),
        ("circuit_breaker_failure_count", "gauge"),
        ("circuit_breaker_failures_total", "counter"),
        ("circuit_breaker_trips_total", "counter"),
        ("circuit_breaker_state_transitions_total", "counter"),
        ("circuit_breaker_state_duration_seconds_total", "counter"),
        ("circuit_breaker_successful_requests_total", "counter"),
        ("circuit_breaker_half_open_calls_total", "counter"),
        ("circuit_breaker_half_open_successes_total", "counter"),
        ("keypool_requests_total", "counter"),
        ("keypool_request_duration_seconds", "histogram"),
        ("keypool_rejected_calls_total", "counter"),
        ("keypool_backup_active", "gauge"),
        ("keypool_capacity_healthy_share", "gauge"),
        ("keypool_waiting_callers", "gauge"),
        ("keypool_keys", "gauge"),
    ]:
        assert f"# TYPE {name} {kind}\n" in text, name


# ---------------------------------------------------------------------- registry hygiene


def test_pools_with_different_providers_share_a_registry(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    first = instrument(make_pool(clock, "deepseek"), registry)
    second = instrument(make_pool(clock, "perplexity"), registry)
    text = exposition(registry)
    assert text.count("# TYPE circuit_breaker_state gauge") == 1  # one family for both pools
    assert 'circuit_breaker_state{key_id="a",provider="perplexity"}' in text
    assert 'circuit_breaker_state{key_id="a",provider="deepseek"}' in text
    first.close()
    text = exposition(registry)
    assert 'provider="deepseek"' not in text
    assert 'provider="perplexity"' in text
    second.close()
    assert exposition(registry) == ""


def test_same_provider_names_need_separate_registries(clock: FakeClock, registry: CollectorRegistry) -> None:
    pool = make_pool(clock)
    with instrument(pool, registry):
        with pytest.raises(ConfigError, match="separate registries"):
            instrument(make_pool(clock), registry)
        with pytest.raises(ConfigError, match="already instrumented"):
            instrument(pool, registry)
        other = CollectorRegistry()
        with instrument(make_pool(clock), other):
            assert value(other, "circuit_breaker_state", provider=P, key_id="a") == 0


def test_close_unregisters_and_stops_counting(clock: FakeClock, registry: CollectorRegistry) -> None:
    pool = make_pool(clock)
    metrics = instrument(pool, registry)
    metrics.close()
    metrics.close()  # idempotent
    fail(pool, "a", 5)
    assert exposition(registry) == ""
    again = instrument(pool, registry)  # the names are free again
    assert value(registry, "circuit_breaker_trips_total", provider=P, key_id="a", reason="failures") == 0
    again.close()


def test_removed_keys_leave_the_exposition(
    pool: KeyPool, registry: CollectorRegistry, metrics: PoolMetrics
) -> None:
    fail(pool, "a", 2)
    pool.remove_key(P, "a")
    text = exposition(registry)
    assert 'key_id="a"' not in text
    assert 'key_id="b"' in text


def test_default_registry_is_the_global_one(clock: FakeClock) -> None:
    from prometheus_client import REGISTRY

    pool = KeyPool.from_keys("global-registry-test", ["sk-global-1"], clock=clock)
    with instrument(pool):
        assert (
            REGISTRY.get_sample_value("keypool_keys", {"provider": "global-registry-test", "state": "closed"})
            == 1
        )
    assert (
        REGISTRY.get_sample_value("keypool_keys", {"provider": "global-registry-test", "state": "closed"})
        is None
    )


def test_bad_buckets_are_refused(pool: KeyPool, registry: CollectorRegistry) -> None:
    with pytest.raises(ConfigError, match="buckets"):
        instrument(pool, registry, buckets=[0, -1])


def test_import_keypool_does_not_import_prometheus_client() -> None:
    code = "import sys, keypool; assert 'prometheus_client' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_callers_waiting_for_a_key_are_a_gauge_from_zero(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    busy = KeyPool.from_keys(
        P, [KeySpec(secret=SecretStr(SECRETS["a"]), key_id="a", max_concurrency=1)], clock=clock
    )
    with instrument(busy, registry):
        assert value(registry, "keypool_waiting_callers", provider=P) == 0
        held = busy.try_acquire(P)
        waiters = [
            threading.Thread(target=lambda: busy.acquire_sync(P, timeout=30).success()) for _ in range(3)
        ]
        for t in waiters:
            t.start()
        deadline = time.monotonic() + 10
        while value(registry, "keypool_waiting_callers", provider=P) != 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert value(registry, "keypool_waiting_callers", provider=P) == 3
        held.success()  # the queue is served, one after another
        for t in waiters:
            t.join(10)
        assert value(registry, "keypool_waiting_callers", provider=P) == 0
