"""Prometheus metrics for a :class:`~keypool.KeyPool`: the runbook's ``circuit_breaker_*`` series and
keypool's own ``keypool_*`` series.

::

    from prometheus_client import start_http_server
    from keypool.metrics import instrument

    metrics = instrument(pool)  # the global registry; or instrument(pool, registry=my_registry)
    start_http_server(9100)     # or serve /metrics with keypool.admin.create_app(pool, ...)
    ...
    metrics.close()             # stop counting and unregister

Two kinds of series:

* Counters fed by pool events through a hook (calls, failures, trips, transitions, rejections and
  the request duration histogram). Every counter a rule or a panel reads starts at zero for each of
  its label sets (per key, outcome, trip reason and transition; per provider and refusal reason),
  so ``increase()`` sees the first trip, the first failure and the first refused burst.
* Values computed at scrape time: the collector calls :meth:`KeyPool.poll` and then reads
  :meth:`~KeyPool.stats`, :meth:`~KeyPool.capacity` and :meth:`~KeyPool.time_in_states`, so state
  gauges, time in each state, keys by state, healthy share and backup activity are never stale,
  even when no traffic flows.

Every label value is a provider name, a key id or a member of a fixed set, so the number of series
grows with the number of keys only; a key's secret never becomes a label. Series of removed keys
disappear at the next scrape.

Several pools may share one registry as long as their provider names differ (one collector per
registry serves them all, so each metric family is exposed once). Two pools with the same provider
names would produce clashing series: give each its own ``CollectorRegistry``; :func:`instrument`
refuses the clash with :class:`~keypool.ConfigError`.

``prometheus_client`` is imported only when :func:`instrument` is called, so ``import keypool``
never needs it (install the ``metrics`` extra).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ._breaker import BreakerState, OpenReason
from ._errors import ConfigError
from ._events import (
    REFUSAL_REASONS,
    BackupTierChanged,
    CallRecorded,
    CallRejected,
    KeyStateChanged,
    PoolEvent,
)
from ._outcome import OutcomeKind

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from ._pool import KeyPool

__all__ = ["DEFAULT_BUCKETS", "PoolMetrics", "instrument"]

#: Request duration buckets (seconds): LLM calls range from tens of milliseconds to minutes.
DEFAULT_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)

_STATE_LABELS = tuple(s.label for s in BreakerState)  # closed, half_open, open
_TRIP_REASONS = tuple(r.value for r in OpenReason)  # failures, trial_failed, throttled, ...
_TRANSITIONS = (
    ("closed", "open"),
    ("open", "half_open"),
    ("half_open", "closed"),
    ("half_open", "open"),
    ("open", "closed"),
)
#: Why a call was refused before reaching a key: the ``reason`` label of ``keypool_rejected_calls_total``,
#: each exposed from zero for every provider. A reason a pool reports that is not listed here is
#: counted as ``other``. The pool's reasons live in ``keypool._events.REFUSAL_REASONS``.
_REJECT_REASONS: tuple[str, ...] = REFUSAL_REASONS
_OTHER_REASON = "other"
_OUTCOMES = tuple(kind.value for kind in OutcomeKind)  # the outcome label of keypool_requests_total
_KEY_CATEGORIES = ("closed", "half_open", "open", "throttled", "quarantined")
_STATE_VALUE = {s.label: float(s.value) for s in BreakerState}

_Key = tuple[str, str]  # (provider, key_id)


class PoolMetrics:
    """The metrics of one pool on one registry; also the hook the pool feeds.

    Create it with :func:`instrument`. :meth:`close` removes the hook and unregisters the pool's
    series (the shared collector leaves the registry with the last pool).
    """

    def __init__(self, pool: KeyPool, registry: CollectorRegistry, buckets: Sequence[float]) -> None:
        bounds = sorted({float(b) for b in buckets if b != float("inf")})
        if not bounds or bounds[0] <= 0:
            raise ConfigError("buckets: expected at least one positive upper bound")
        self.pool = pool
        self.registry = registry
        self._buckets = tuple(bounds)
        self._lock = threading.Lock()
        self._closed = False
        # event-fed counters
        self._failures: dict[_Key, int] = defaultdict(int)
        self._successes: dict[_Key, int] = defaultdict(int)
        self._trial_calls: dict[_Key, int] = defaultdict(int)
        self._trial_successes: dict[_Key, int] = defaultdict(int)
        self._trips: dict[tuple[str, str, str], int] = defaultdict(int)
        self._transitions: dict[tuple[str, str, str, str], int] = defaultdict(int)
        self._requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self._rejected: dict[tuple[str, str], int] = defaultdict(int)
        # histogram per provider: (bucket counts (non-cumulative, last is +Inf), sum)
        self._durations: dict[str, list[int]] = {}
        self._duration_sums: dict[str, float] = defaultdict(float)

    # ------------------------------------------------------------------ the hook

    def __call__(self, event: PoolEvent, /) -> None:
        if isinstance(event, CallRecorded):
            self._on_call(event)
        elif isinstance(event, KeyStateChanged):
            self._on_state(event)
        elif isinstance(event, CallRejected):
            reason = event.reason if event.reason in _REJECT_REASONS else _OTHER_REASON
            with self._lock:
                self._rejected[event.provider, reason] += 1
        elif isinstance(event, BackupTierChanged):
            pass  # keypool_backup_active is read at scrape time

    def _on_call(self, event: CallRecorded) -> None:
        key = (event.provider, event.key_id)
        duration = max(0.0, event.duration)
        with self._lock:
            self._requests[event.provider, event.key_id, event.outcome.value] += 1
            if event.outcome is OutcomeKind.SUCCESS:
                self._successes[key] += 1
            elif event.outcome is OutcomeKind.FAILURE:
                self._failures[key] += 1
            if event.trial:
                self._trial_calls[key] += 1
                if event.outcome is OutcomeKind.SUCCESS:
                    self._trial_successes[key] += 1
            counts = self._durations.get(event.provider)
            if counts is None:
                counts = self._durations[event.provider] = [0] * (len(self._buckets) + 1)
            counts[bisect_left(self._buckets, duration)] += 1
            self._duration_sums[event.provider] += duration

    def _on_state(self, event: KeyStateChanged) -> None:
        old, new = event.old.label, event.new.label
        with self._lock:
            self._transitions[event.provider, event.key_id, old, new] += 1
            if event.new is BreakerState.OPEN and event.reason in _TRIP_REASONS:
                self._trips[event.provider, event.key_id, event.reason] += 1

    # ------------------------------------------------------------------ scrape

    def close(self) -> None:
        """Stop counting and remove this pool's series from the registry. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError):  # already removed by hand
            self.pool.remove_hook(self)
        _detach(self)

    def __enter__(self) -> PoolMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _collect_into(self, out: _Families, taken: set[str]) -> None:
        pool = self.pool
        pool.poll()  # materialise transitions time alone has caused (feeds our own hook)
        providers = [p for p in pool.providers if p not in taken]
        taken.update(providers)
        wanted = set(providers)
        stats = [s for s in pool.stats() if s["provider"] in wanted]
        times = [row for row in pool.time_in_states() if row[0] in wanted]
        capacities = []
        for name in providers:
            try:
                capacities.append(pool.capacity(name))
            except LookupError:  # removed between the two reads
                continue
        live = {(s["provider"], s["key_id"]) for s in stats}

        for s in stats:
            labels = [s["provider"], s["key_id"]]
            out.state.add_metric(labels, _STATE_VALUE[s["state"]])
            out.failure_count.add_metric(labels, float(s["failure_count"]))
        for provider, key_id, spent in times:
            for state, seconds in zip(_STATE_LABELS, spent, strict=True):
                out.duration.add_metric([provider, key_id, state], seconds)
        for cap in capacities:
            out.backup_active.add_metric([cap.provider], 1.0 if cap.backup_active else 0.0)
            out.healthy_share.add_metric([cap.provider], cap.healthy_share)
            out.waiting.add_metric([cap.provider], float(cap.waiting))
            tiers = (cap.primary, cap.backup)
            for category in _KEY_CATEGORIES:
                count = sum(getattr(t, category) for t in tiers)
                out.keys.add_metric([cap.provider, category], float(count))

        with self._lock:
            self._prune(live, wanted)
            for provider, key_id in sorted(live):
                key = (provider, key_id)
                labels = [provider, key_id]
                out.failures.add_metric(labels, self._failures.get(key, 0))
                out.successes.add_metric(labels, self._successes.get(key, 0))
                out.trial_calls.add_metric(labels, self._trial_calls.get(key, 0))
                out.trial_successes.add_metric(labels, self._trial_successes.get(key, 0))
                for outcome in _OUTCOMES:
                    out.requests.add_metric([*labels, outcome], self._requests.get((*key, outcome), 0))
                for reason in _TRIP_REASONS:
                    out.trips.add_metric([*labels, reason], self._trips.get((*key, reason), 0))
                for old, new in _TRANSITIONS:
                    out.transitions.add_metric(
                        [*labels, old, new], self._transitions.get((*key, old, new), 0)
                    )
            for (provider, key_id, old, new), n in sorted(self._transitions.items()):
                if (old, new) not in _TRANSITIONS:  # not expected; expose rather than hide it
                    out.transitions.add_metric([provider, key_id, old, new], n)
            for provider in providers:
                for reason in (*_REJECT_REASONS, _OTHER_REASON):
                    out.rejected.add_metric([provider, reason], self._rejected.get((provider, reason), 0))
                counts = self._durations.get(provider) or [0] * (len(self._buckets) + 1)
                cumulative: list[tuple[str, float]] = []
                running = 0
                for bound, n in zip([*self._buckets, float("inf")], counts, strict=True):
                    running += n
                    cumulative.append((_le(bound), float(running)))
                out.request_duration.add_metric(
                    [provider], buckets=cumulative, sum_value=self._duration_sums.get(provider, 0.0)
                )

    def _prune(self, live: set[_Key], providers: set[str]) -> None:
        """Forget counters of keys and providers that left the pool (lock held)."""
        for table in (self._failures, self._successes, self._trial_calls, self._trial_successes):
            for key in [k for k in table if k not in live]:
                del table[key]
        for k3 in [k for k in self._trips if (k[0], k[1]) not in live]:
            del self._trips[k3]
        for k4 in [k for k in self._transitions if (k[0], k[1]) not in live]:
            del self._transitions[k4]
        for k3 in [k for k in self._requests if (k[0], k[1]) not in live]:
            del self._requests[k3]
        for pk in [k for k in self._rejected if k[0] not in providers]:
            del self._rejected[pk]
        for provider in [p for p in self._durations if p not in providers]:
            del self._durations[provider]
            self._duration_sums.pop(provider, None)

    def __repr__(self) -> str:
        return f"PoolMetrics(pool={self.pool!r}, closed={self._closed})"


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class _Families:
    """One family object per metric name for one scrape."""

    def __init__(self) -> None:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        key = ["provider", "key_id"]
        self.state = GaugeMetricFamily(
            "circuit_breaker_state",
            "Circuit breaker state per key: 0 closed, 1 half-open, 2 open (throttled and quarantined "
            "keys are open).",
            labels=key,
        )
        self.failure_count = GaugeMetricFamily(
            "circuit_breaker_failure_count",
            "Consecutive failures counted by the key's breaker in its current closed period.",
            labels=key,
        )
        self.failures = CounterMetricFamily(
            "circuit_breaker_failures_total",
            "Calls that failed (5xx, 408, timeouts, connection errors) and counted against the key.",
            labels=key,
        )
        self.trips = CounterMetricFamily(
            "circuit_breaker_trips_total",
            "Times the key's breaker opened, by reason (failures, trial_failed, throttled, rejected, "
            "quota, manual).",
            labels=[*key, "reason"],
        )
        self.transitions = CounterMetricFamily(
            "circuit_breaker_state_transitions_total",
            "Breaker state changes of the key (closed, half_open, open).",
            labels=[*key, "from_state", "to_state"],
        )
        self.duration = CounterMetricFamily(
            "circuit_breaker_state_duration_seconds",
            "Seconds the key's breaker has spent in each state.",
            labels=[*key, "state"],
        )
        self.successes = CounterMetricFamily(
            "circuit_breaker_successful_requests_total",
            "Calls through the key that succeeded.",
            labels=key,
        )
        self.trial_calls = CounterMetricFamily(
            "circuit_breaker_half_open_calls_total",
            "Trial calls made while the key's breaker was half-open.",
            labels=key,
        )
        self.trial_successes = CounterMetricFamily(
            "circuit_breaker_half_open_successes_total",
            "Trial calls that succeeded while the key's breaker was half-open (success_threshold of "
            "them close it).",
            labels=key,
        )
        self.requests = CounterMetricFamily(
            "keypool_requests",
            "Calls recorded against a key, by outcome (success, throttled, rejected, exhausted, "
            "failure, caller_error, ignored).",
            labels=[*key, "outcome"],
        )
        self.request_duration = HistogramMetricFamily(
            "keypool_request_duration_seconds",
            "Duration of calls through the pool's keys, from lease to recorded outcome.",
            labels=["provider"],
        )
        self.rejected = CounterMetricFamily(
            "keypool_rejected_calls",
            f"Calls refused before reaching any key ({', '.join(_REJECT_REASONS)}, {_OTHER_REASON}).",
            labels=["provider", "reason"],
        )
        self.backup_active = GaugeMetricFamily(
            "keypool_backup_active",
            "1 while the provider's backup keys are serving, else 0.",
            labels=["provider"],
        )
        self.healthy_share = GaugeMetricFamily(
            "keypool_capacity_healthy_share",
            "Share (0..1) of the provider's serving keys (primaries, and backups while active) whose "
            "breaker is closed.",
            labels=["provider"],
        )
        self.waiting = GaugeMetricFamily(
            "keypool_waiting_callers",
            "Callers queued for a key of the provider (every key busy with calls in flight, or a "
            "short recovery waited for within max_wait).",
            labels=["provider"],
        )
        self.keys = GaugeMetricFamily(
            "keypool_keys",
            "Keys of the provider by state (closed, half_open, open, throttled, quarantined; "
            "disjoint, they add up to the number of keys).",
            labels=["provider", "state"],
        )

    def all(self) -> list[Metric]:
        return [
            self.state,
            self.failure_count,
            self.failures,
            self.trips,
            self.transitions,
            self.duration,
            self.successes,
            self.trial_calls,
            self.trial_successes,
            self.requests,
            self.request_duration,
            self.rejected,
            self.backup_active,
            self.healthy_share,
            self.waiting,
            self.keys,
        ]


class _Collector:
    """The one collector keypool registers per registry; it serves every instrumented pool."""

    def __init__(self) -> None:
        self.pools: list[PoolMetrics] = []

    def describe(self) -> Iterable[Metric]:
        return _Families().all()

    def collect(self) -> Iterator[Metric]:
        families = _Families()
        taken: set[str] = set()
        for pm in list(self.pools):
            pm._collect_into(families, taken)
        yield from families.all()


_registry_lock = threading.Lock()
_collectors: weakref.WeakKeyDictionary[Any, _Collector] = weakref.WeakKeyDictionary()


def instrument(
    pool: KeyPool,
    registry: CollectorRegistry | None = None,
    *,
    buckets: Sequence[float] = DEFAULT_BUCKETS,
) -> PoolMetrics:
    """Expose ``pool`` on ``registry`` (default: ``prometheus_client``'s global ``REGISTRY``).

    Raises :class:`~keypool.ConfigError` if the pool is already instrumented on that registry, or
    if another pool on it has a provider of the same name (use a separate registry for it).
    """
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("keypool.metrics needs prometheus_client: pip install 'keypool[metrics]'") from exc

    reg: CollectorRegistry = prometheus_client.REGISTRY if registry is None else registry
    metrics = PoolMetrics(pool, reg, buckets)
    with _registry_lock:
        collector = _collectors.get(reg)
        if collector is not None:
            for other in collector.pools:
                if other.pool is pool:
                    raise ConfigError("this pool is already instrumented on this registry")
                clash = sorted(set(other.pool.providers) & set(pool.providers))
                if clash:
                    raise ConfigError(
                        f"provider name(s) {clash} are already exposed on this registry by another "
                        "pool; instrument pools with the same provider names on separate registries"
                    )
        else:
            collector = _Collector()
            reg.register(collector)  # raises ValueError if someone else owns these metric names
            _collectors[reg] = collector
        collector.pools.append(metrics)
    pool.add_hook(metrics)
    return metrics


def _lookup(pool: KeyPool, registry: CollectorRegistry) -> PoolMetrics | None:
    """The live :class:`PoolMetrics` of ``pool`` on ``registry``, if any."""
    with _registry_lock:
        collector = _collectors.get(registry)
        if collector is None:
            return None
        return next((pm for pm in collector.pools if pm.pool is pool), None)


def _detach(metrics: PoolMetrics) -> None:
    with _registry_lock:
        collector = _collectors.get(metrics.registry)
        if collector is None or metrics not in collector.pools:
            return
        collector.pools.remove(metrics)
        if not collector.pools:
            del _collectors[metrics.registry]
            metrics.registry.unregister(collector)
