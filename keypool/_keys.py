"""The pool's bookkeeping per key, tier and provider: what each key can take, kept in step with
its breaker.

These objects are only touched with the pool's lock held. A key's weight in its tier's sampler, the
tier's counts by state and the provider's heap of timed wake-ups are derived from the breaker by
:meth:`KeyState.refresh`, which every change calls, so a pick never has to look at a key twice.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import TYPE_CHECKING

from ._breaker import BreakerState, CircuitBreaker
from ._capacity import TierCapacity
from ._config import KeySpec, ProviderConfig, Tier
from ._events import BackupTierChanged, KeyStateChanged, PoolEvent
from ._sampler import WeightedSampler

if TYPE_CHECKING:
    from ._waiting import Waiter

__all__ = ["CATEGORIES", "KeyState", "ProviderState", "TierState"]

WEIGHT_SCALE = 1000  # weights become integers in thousandths: exact sums in the sampler
CATEGORIES = ("closed", "half_open", "open", "throttled", "quarantined")

_heap_seq = iter(range(1 << 62))


class KeyState:
    __slots__ = (
        "breaker",
        "busy",
        "category",
        "eligible",
        "failing",
        "id",
        "in_flight",
        "index",
        "probation_until",
        "proven",
        "provider",
        "quarantine_kind",
        "quarantined_at",
        "rejected_status",
        "removed",
        "scheduled_at",
        "shared_failures",
        "spec",
        "tier",
        "units",
    )

    def __init__(self, provider: ProviderState, spec: KeySpec, breaker: CircuitBreaker) -> None:
        self.provider = provider
        self.spec = spec
        self.id = spec.id
        self.tier = provider.tiers[spec.tier]
        self.units = max(1, round(spec.weight * WEIGHT_SCALE))
        self.breaker = breaker
        self.in_flight = 0
        self.eligible = 0
        self.category = "closed"
        self.scheduled_at: float | None = None
        self.removed = False
        self.shared_failures = 0  # consecutive failures all pools together have seen (shared store)
        self.proven = False  # no success yet: on probation (one call at a time, briefly)
        self.probation_until: float | None = None
        self.busy = False  # can take no call now, but will when one of its calls ends
        self.failing = False  # closed, with consecutive failures counted
        self.quarantine_kind: str | None = None  # while counted as quarantined: why (a refusal reason)
        self.rejected_status = 401  # the status of the last rejection (403 is "forbidden")
        self.quarantined_at = 0.0  # when the key was last counted as quarantined
        self.index = self.tier.sampler.append(0)
        self.tier.keys.append(self)
        self.tier.counts["closed"] += 1

    def category_at(self, now: float) -> str:
        b = self.breaker
        state = b.state(now)
        if state is BreakerState.OPEN:
            if b.quarantined:
                return "quarantined"
            return "throttled" if b.throttled_until > now else "open"
        return state.label

    def on_probation(self, now: float) -> bool:
        """A key not yet proven by a success carries one call at a time for its first moments,
        so a key that is dead or rate-limited from the start wastes one call, not a burst."""
        return (
            not self.proven
            and self.in_flight > 0
            and self.probation_until is not None
            and now < self.probation_until
            and self.breaker.state(now) is BreakerState.CLOSED  # trials have their own limit
        )

    def refusal_kind(self, now: float) -> str:
        """Why this key cannot serve, as a refusal reason (``open``, ``throttled``, ``rejected``...)."""
        category = self.category_at(now)
        if category == "quarantined":
            reason = self.breaker.quarantine_reason or "manual"
            if reason == "rejected" and self.rejected_status == 403:
                return "forbidden"
            return reason
        return category if category in ("open", "throttled") else "busy"

    def _load_blocked(self, now: float) -> bool:
        """Whether only calls in flight keep the key from taking one (it is busy, not down)."""
        b = self.breaker
        return b.can_admit(now) or b.trial_slots_full(now)

    def _count(self, busy: bool, failing: bool, kind: str | None) -> None:
        """Keep the tier's busy, failing and quarantine counts in step with this key."""
        tier = self.tier
        if busy != self.busy:
            tier.busy += 1 if busy else -1
            if self.busy and not busy and not self.eligible:
                self.provider.replan = True  # waiters counting on this key must think again
            self.busy = busy
        if failing != self.failing:
            tier.failing += 1 if failing else -1
            self.failing = failing
        if kind != self.quarantine_kind:
            if self.quarantine_kind is not None:
                tier.quarantine_kinds[self.quarantine_kind] -= 1
            if kind is not None:
                tier.quarantine_kinds[kind] = tier.quarantine_kinds.get(kind, 0) + 1
            self.quarantine_kind = kind

    def admits(self, now: float) -> bool:
        if self.removed or not self.breaker.can_admit(now):
            return False
        cap = self.spec.max_concurrency
        if cap is not None and self.in_flight >= cap:
            return False
        if self.on_probation(now):
            return False
        # Lean away from a failing key: never more calls in flight than failures it has left
        # before tripping, so a dead key wastes at most failure_threshold calls per trip.
        failures = self.breaker.failure_count if self.in_flight else 0
        if failures:
            left = self.breaker.config.failure_threshold - failures
            return self.in_flight < max(1, left)
        return True

    def refresh(self, now: float, events: list[PoolEvent]) -> None:
        """Bring the key's sampler weight, state counts and wake-up time in line with its breaker."""
        breaker = self.breaker
        if breaker.plainly_closed() and self.category == "closed" and self.scheduled_at is None:
            # The common case, kept cheap: a closed key with nothing pending; only load changes.
            weight = self.units if self.admits(now) else 0
            if weight != self.eligible:
                self.tier.sampler.set(self.index, weight)
                self.eligible = weight
            if not weight and self.on_probation(now) and self.probation_until is not None:
                self.schedule(self.probation_until)
            if not self.removed:  # closed: a key that admits no call is only held by its load
                self._count(not weight, breaker.failure_count > 0, None)
            return
        breaker.poll()
        for t in breaker.drain_transitions():
            events.append(KeyStateChanged(self.provider.name, self.id, t.old, t.new, t.reason, t.at))
        if self.removed:
            if self.eligible:
                self.tier.sampler.set(self.index, 0)
                self.eligible = 0
            self.scheduled_at = None
            self._count(False, False, None)
            return
        weight = self.units if self.admits(now) else 0
        if weight != self.eligible:
            self.tier.sampler.set(self.index, weight)
            self.eligible = weight
        category = self.category_at(now)
        if category != self.category:
            self.tier.counts[self.category] -= 1
            self.tier.counts[category] += 1
            if category == "quarantined" and self.category != "half_open":  # not a recheck's end
                self.quarantined_at = now
            self.category = category
        self._count(
            not weight and self._load_blocked(now),
            category == "closed" and breaker.failure_count > 0,
            self.refusal_kind(now) if category == "quarantined" else None,
        )
        wake = breaker.next_transition_at(now)
        if now < breaker.throttled_until and (wake is None or breaker.throttled_until < wake):
            wake = breaker.throttled_until  # throttled -> open: the same state, another category
        admits = breaker.admits_at(now)
        if self.on_probation(now) and self.probation_until is not None:
            admits = max(admits, self.probation_until) if admits is not None else None
        if admits is not None and admits > now and (wake is None or admits < wake):
            wake = admits
        # A heap entry is live only while it matches the key's scheduled_at: a reset, quarantine or
        # extended throttle leaves the old entry behind as stale, and stale entries are skipped.
        if wake != self.scheduled_at:
            self.scheduled_at = wake
            if wake is not None:
                heapq.heappush(self.provider.heap, (wake, next(_heap_seq), self))

    def schedule(self, at: float) -> None:
        self.scheduled_at = at
        heapq.heappush(self.provider.heap, (at, next(_heap_seq), self))


class TierState:
    __slots__ = ("busy", "counts", "failing", "in_flight", "keys", "name", "quarantine_kinds", "sampler")

    def __init__(self, name: Tier) -> None:
        self.name = name
        self.keys: list[KeyState] = []
        self.sampler = WeightedSampler()
        self.counts = dict.fromkeys(CATEGORIES, 0)
        self.in_flight = 0
        self.busy = 0  # keys that take a call again as soon as one of theirs ends
        self.failing = 0  # closed keys with consecutive failures counted
        self.quarantine_kinds: dict[str, int] = {}  # quarantined keys by refusal reason

    def capacity(self) -> TierCapacity:
        return TierCapacity(
            total=sum(self.counts.values()),
            closed=self.counts["closed"],
            half_open=self.counts["half_open"],
            open=self.counts["open"],
            throttled=self.counts["throttled"],
            quarantined=self.counts["quarantined"],
            in_flight=self.in_flight,
        )


class ProviderState:
    __slots__ = (
        "backup_active",
        "backup_forced",
        "config",
        "heap",
        "keys",
        "name",
        "replan",
        "tiers",
        "waiters",
        "waiting",
    )

    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self.config = config
        self.tiers: dict[str, TierState] = {"primary": TierState("primary"), "backup": TierState("backup")}
        self.keys: dict[str, KeyState] = {}
        self.heap: list[tuple[float, int, KeyState]] = []
        self.backup_forced: bool | None = None
        self.backup_active = False
        self.waiters: deque[Waiter] = deque()  # callers queued for a key, first come first served
        self.waiting = 0  # callers in the queue now (the queue may still hold some that left)
        self.replan = False  # a key the waiters counted on stopped being busy without serving

    def wake(self, now: float, events: list[PoolEvent]) -> None:
        """Refresh every key whose scheduled instant has come."""
        heap = self.heap
        if not heap or heap[0][0] > now:
            return  # nothing due: the common case, kept cheap
        while heap and heap[0][0] <= now:
            at, _, key = heapq.heappop(heap)
            if at != key.scheduled_at:
                continue
            key.scheduled_at = None
            key.refresh(now, events)
        self.update_backup(events)

    def serving_tiers(self) -> list[TierState]:
        """The tiers keys are drawn from now: primary, and backup while it is active."""
        backup = self.tiers["backup"]
        if backup.keys and self.backup_active:
            return [self.tiers["primary"], backup]
        return [self.tiers["primary"]]

    def next_wake(self) -> float | None:
        """The soonest live scheduled instant of the keys, dropping stale heap entries."""
        heap = self.heap
        while heap and heap[0][0] != heap[0][2].scheduled_at:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def update_backup(self, events: list[PoolEvent]) -> None:
        primary = self.tiers["primary"]
        total = sum(primary.counts.values())
        share = primary.counts["closed"] / total if total else 0.0
        if self.backup_forced is not None:
            active, reason = self.backup_forced, "operator"
        else:
            active = share < self.config.backup_threshold
            reason = "primary_unhealthy" if active else "primary_recovered"
        if active != self.backup_active:
            self.backup_active = active
            if self.tiers["backup"].keys:  # nothing to announce for a provider without backups
                events.append(BackupTierChanged(self.name, active, reason))
