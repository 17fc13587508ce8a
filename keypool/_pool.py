"""KeyPool: providers -> tiers -> keys; leases, waiting, capacity and admin operations.

The bookkeeping per key lives in ``_keys``, the choice of a key in ``_selection``, the lease in
``_lease`` and the capacity answer in ``_capacity``.

The pool does no I/O. One lock guards its state and is held only for the few microseconds of a
pick or a record, never across a call, so the same pool serves async tasks and threads at once.
Picks cost O(log n) in the number of keys: eligible keys live in a weighted sampler, and keys that
will change by the passing of time alone (open -> half-open, throttle expiry) sit in a heap that is
drained lazily when the pool is next used.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import anyio
import anyio.to_thread
from pydantic import SecretStr

from ._breaker import BreakerState, CircuitBreaker, OpenReason, Permit
from ._capacity import Capacity, CapacityStatus, TierCapacity, assess
from ._clock import Clock, MonotonicClock
from ._config import BreakerConfig, KeySpec, PoolConfig, ProviderConfig, validate
from ._errors import ConfigError, NoKeyAvailable, UnknownKeyError, UnknownProviderError
from ._events import CallRecorded, CallRejected, Hook, KeyStateChanged, PoolEvent
from ._keys import KeyState, ProviderState
from ._lease import Lease
from ._outcome import Outcome, OutcomeKind
from ._selection import pick
from ._waiting import Plan, Waiter, soonest_timer, wait_async, wait_sync
from ._waiting import plan as plan_for
from .store._base import SharedStore, SharedView
from .store._model import Op

__all__ = ["Capacity", "CapacityStatus", "KeyPool", "Lease", "TierCapacity"]

log = logging.getLogger("keypool")

_BUSY_POLL = 0.005  # seconds between looks while a trial slot is held by another process


class KeyPool:
    """Keys per provider, a breaker per key, and the choice of which key serves the next call.

    Build it from a :class:`PoolConfig` (or a mapping of the same shape), or start empty and call
    :meth:`add_provider`. ``clock`` is injectable so tests run on a fake clock; ``hooks`` receive
    every :mod:`event <keypool._events>`.
    """

    def __init__(
        self,
        config: PoolConfig | Mapping[str, Any] | None = None,
        *,
        clock: Clock | None = None,
        hooks: Iterable[Hook] = (),
        seed: int | None = None,
        store: SharedStore | None = None,
    ) -> None:
        self._clock: Clock = clock or MonotonicClock()
        self._store: SharedStore | None = None
        self._instance = uuid.uuid4().hex[:12]  # names this pool's trial slots in a shared store
        self._now = self._clock.now
        self._lock = threading.Lock()
        self._providers: dict[str, ProviderState] = {}
        self._hooks: list[Hook] = list(hooks)
        self._rng = random.Random(seed)
        if config is not None:
            cfg = config if isinstance(config, PoolConfig) else validate(PoolConfig, config)
            for provider in cfg.providers:
                self.add_provider(provider)
        if store is not None:
            self._store = store
            store.bind(self)

    @classmethod
    def from_keys(
        cls,
        provider: str,
        keys: Sequence[str | KeySpec],
        *,
        backup_keys: Sequence[str | KeySpec] = (),
        weights: Sequence[float] | None = None,
        breaker: BreakerConfig | None = None,
        backup_threshold: float = 0.5,
        clock: Clock | None = None,
        hooks: Iterable[Hook] = (),
    ) -> KeyPool:
        """A pool with one provider, from plain secrets."""
        from ._config import keys_from

        pool = cls(clock=clock, hooks=hooks)
        pool.add_provider(
            ProviderConfig(
                name=provider,
                keys=keys_from(keys, backup=backup_keys, weights=weights),
                breaker=breaker or BreakerConfig(),
                backup_threshold=backup_threshold,
            )
        )
        return pool

    # ------------------------------------------------------------------ structure

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(self._providers)

    def add_provider(self, config: ProviderConfig | Mapping[str, Any]) -> None:
        cfg = config if isinstance(config, ProviderConfig) else validate(ProviderConfig, config)
        with self._lock:
            if cfg.name in self._providers:
                raise ConfigError(f"provider {cfg.name!r} already exists")
            prov = ProviderState(cfg)
            self._providers[cfg.name] = prov
            for spec in cfg.keys:
                self._add_key(prov, spec)
        if self._store is not None:
            self._store.bind(self)  # share the new keys too

    def add_key(self, provider: str, key: KeySpec | str) -> str:
        """Add a key at run time; returns its id."""
        spec = key if isinstance(key, KeySpec) else KeySpec(secret=SecretStr(key))
        events: list[PoolEvent] = []
        with self._lock:
            prov = self._provider(provider)
            if spec.id in prov.keys and not prov.keys[spec.id].removed:
                raise ConfigError(f"key id {spec.id!r} already exists for provider {provider!r}")
            self._add_key(prov, spec)
            if prov.waiters:
                self._serve(prov, self._now(), events)
        self._emit(events)
        return spec.id

    def remove_key(self, provider: str, key_id: str) -> None:
        """Stop routing to a key. Calls already holding it finish normally."""
        events: list[PoolEvent] = []
        with self._lock:
            key = self._key(provider, key_id)
            key.removed = True
            now = self._now()
            key.refresh(now, events)
            key.tier.counts[key.category] -= 1
            key.category = "removed"
            del key.provider.keys[key_id]
            if key.provider.waiters:  # callers waiting for this key must think again
                key.provider.replan = True
                self._serve(key.provider, now, events)
        self._emit(events)

    def _add_key(self, prov: ProviderState, spec: KeySpec) -> None:
        breaker = CircuitBreaker(prov.config.breaker, clock=self._now, rng=self._rng.random)
        key = KeyState(prov, spec, breaker)
        prov.keys[key.id] = key
        key.refresh(self._now(), [])

    def key_count(self, provider: str) -> int:
        """How many keys a provider has (O(1))."""
        with self._lock:
            return len(self._provider(provider).keys)

    def key_ids(self, provider: str | None = None) -> list[str]:
        with self._lock:
            provs = [self._provider(provider)] if provider is not None else list(self._providers.values())
            return [k for p in provs for k in p.keys]

    def _provider(self, name: str) -> ProviderState:
        try:
            return self._providers[name]
        except KeyError:
            raise UnknownProviderError(name, self._providers) from None

    def _key(self, provider: str | None, key_id: str) -> KeyState:
        provs = [self._provider(provider)] if provider is not None else list(self._providers.values())
        for prov in provs:
            if key_id in prov.keys:
                return prov.keys[key_id]
        known = [k for p in provs for k in p.keys]
        raise UnknownKeyError(key_id, known, provider)

    # ------------------------------------------------------------------ hooks

    def add_hook(self, hook: Hook) -> None:
        self._hooks.append(hook)

    def remove_hook(self, hook: Hook) -> None:
        self._hooks.remove(hook)

    def _emit(self, events: list[PoolEvent]) -> None:
        for event in events:
            if isinstance(event, KeyStateChanged):
                log.log(
                    logging.WARNING if event.new is BreakerState.OPEN else logging.INFO,
                    "circuit_breaker provider=%s key_id=%s %s -> %s (%s)",
                    event.provider,
                    event.key_id,
                    event.old.label,
                    event.new.label,
                    event.reason,
                )
            for hook in self._hooks:
                try:
                    hook(event)
                except Exception:
                    log.exception("keypool hook %r failed on %s", hook, type(event).__name__)

    # ------------------------------------------------------------------ leasing

    def try_acquire(self, provider: str, *, exclude: Iterable[str] = ()) -> Lease:
        """Lease a key now, or raise :class:`NoKeyAvailable` with the reason (never waits)."""
        excluded = frozenset(exclude)
        contested = False
        while True:
            lease, plan = self._attempt(provider, excluded, None, self._now(), 0.0, contested)
            if lease is None:
                assert plan is not None
                raise self._refusal(provider, plan, excluded)
            if self._claimed(lease):
                return lease
            excluded, contested = excluded | {lease.key_id}, True

    async def acquire(
        self,
        provider: str,
        *,
        timeout: float | None = None,
        exclude: Iterable[str] = (),
        max_wait: float | None = None,
    ) -> Lease:
        """Lease a key, waiting inside ``timeout`` seconds (``None``: no deadline) when it helps.

        A *busy* provider (a key frees up when a call in flight ends) queues the caller, first
        come first served, until a key is handed to it or the deadline passes. A *down* provider
        (nothing serves until a timer or an operator acts) is waited for only if the soonest
        recovery is at most ``max_wait`` seconds away (``None``: the provider's ``max_wait``;
        ``math.inf``: any recovery inside the deadline). Otherwise :class:`NoKeyAvailable` is raised
        at once, saying why (``reason``) and when to retry (``retry_after``). Keys in ``exclude``
        are neither leased nor waited for.
        """
        excluded = frozenset(exclude)
        deadline, limit = self._limits(provider, timeout, max_wait)
        waiter: Waiter | None = None
        contested = False
        try:
            while True:
                lease, plan = self._attempt(provider, excluded, waiter, deadline, limit, contested)
                if lease is not None:
                    if self._store is None or not lease.trial:
                        return lease
                    if await anyio.to_thread.run_sync(self._claimed, lease):
                        return lease
                    excluded, contested = excluded | {lease.key_id}, True
                    waiter = None  # the waiter was served; a new one excludes the contested key
                    continue
                assert plan is not None
                if not plan.wait:
                    raise self._refusal(provider, plan, excluded)
                if waiter is None:  # join the queue atomically with the next look, missing no wake
                    waiter = Waiter(excluded, sync=False)
                    continue
                await wait_async(self._clock, waiter, self._wait_time(plan, contested), timer=plan.timer)
        except BaseException:
            if waiter is not None:
                self._abandon(provider, waiter)
            raise

    def acquire_sync(
        self,
        provider: str,
        *,
        timeout: float | None = None,
        exclude: Iterable[str] = (),
        max_wait: float | None = None,
    ) -> Lease:
        """:meth:`acquire` for threads: blocks the calling thread while it waits."""
        excluded = frozenset(exclude)
        deadline, limit = self._limits(provider, timeout, max_wait)
        waiter: Waiter | None = None
        contested = False
        try:
            while True:
                lease, plan = self._attempt(provider, excluded, waiter, deadline, limit, contested)
                if lease is not None:
                    if self._claimed(lease):
                        return lease
                    excluded, contested = excluded | {lease.key_id}, True
                    waiter = None
                    continue
                assert plan is not None
                if not plan.wait:
                    raise self._refusal(provider, plan, excluded)
                if waiter is None:
                    waiter = Waiter(excluded, sync=True)
                    continue
                wait_sync(self._clock, waiter, self._wait_time(plan, contested), timer=plan.timer)
        except BaseException:
            if waiter is not None:
                self._abandon(provider, waiter)
            raise

    def _limits(
        self, provider: str, timeout: float | None, max_wait: float | None
    ) -> tuple[float | None, float]:
        if timeout is not None and not timeout >= 0:
            raise ConfigError(f"timeout: must be >= 0 seconds or None (got {timeout})")
        if max_wait is not None and not max_wait >= 0:
            raise ConfigError(f"max_wait: must be >= 0 seconds or None (got {max_wait})")
        with self._lock:
            limit = self._provider(provider).config.max_wait if max_wait is None else max_wait
        return (None if timeout is None else self._now() + timeout), limit

    def _wait_time(self, plan: Plan, contested: bool) -> float | None:
        wait = None if plan.until is None else max(0.0, plan.until - self._now())
        if contested:  # a trial slot held by another process: the store says when it frees, or poll
            wait = _BUSY_POLL if wait is None else min(wait, _BUSY_POLL)
        return wait

    def _attempt(
        self,
        provider: str,
        exclude: frozenset[str],
        waiter: Waiter | None,
        deadline: float | None,
        max_wait: float,
        contested: bool,
    ) -> tuple[Lease | None, Plan | None]:
        """Under the lock: the lease handed to ``waiter``, or one free now, or what to do next.

        A waiter that must wait joins the provider's queue here (and gets a fresh signal), in the
        same critical section that found no key, so a slot freed a moment later reaches it.
        """
        events: list[PoolEvent] = []
        with self._lock:
            prov = self._provider(provider)
            now = self._now()
            self._settle(prov, now, events)
            lease = None
            if waiter is not None and waiter.lease is not None:
                lease, waiter.lease = waiter.lease, None
            elif waiter is None or not waiter.queued:
                lease = self._lease_from(prov, now, exclude, events)
            plan = None
            if lease is None:
                plan = plan_for(prov, now, exclude, deadline, max_wait, contested)
                if waiter is not None:
                    if plan.wait:
                        if not waiter.queued:
                            waiter.queued = True
                            prov.waiters.append(waiter)
                            prov.waiting += 1
                        waiter.arm()
                    else:
                        self._dequeue(prov, waiter)
        if events:
            self._emit(events)
        return lease, plan

    def _lease_from(
        self, prov: ProviderState, now: float, exclude: frozenset[str], events: list[PoolEvent]
    ) -> Lease | None:
        """Pick a key and take a permit from its breaker (lock held)."""
        for _ in range(4):
            key = pick(prov, exclude, self._rng)
            if key is None:
                return None
            permit = key.breaker.try_acquire()
            if permit is None:  # out of step with the sampler: fix it and draw again
                key.refresh(now, events)
                continue
            key.in_flight += 1
            key.tier.in_flight += 1
            if not key.proven and key.probation_until is None:
                key.probation_until = now + prov.config.probation
            key.refresh(now, events)
            return Lease(self, key, permit, now)
        return None

    def _settle(self, prov: ProviderState, now: float, events: list[PoolEvent]) -> None:
        """Apply what time has done to the provider's keys, then serve its queue (lock held)."""
        prov.wake(now, events)
        if prov.waiters:
            self._serve(prov, now, events)

    def _serve(self, prov: ProviderState, now: float, events: list[PoolEvent]) -> None:
        """Hand free keys to queued callers in arrival order; wake the rest to think again if a
        key they counted on went out (lock held)."""
        waiters = prov.waiters
        kept: deque[Waiter] = deque()
        while waiters:
            if not any(t.sampler.total for t in prov.serving_tiers()):
                break  # nothing to hand out: everyone keeps their place
            waiter = waiters.popleft()
            if waiter.gone:
                continue
            lease = self._lease_from(prov, now, waiter.exclude, events)
            if lease is None:  # every free key is one this caller will not take
                kept.append(waiter)
                continue
            waiter.lease = lease
            self._dequeue(prov, waiter)
            waiter.wake()
        kept.extend(w for w in waiters if not w.gone)
        prov.waiters = kept
        if prov.replan:
            prov.replan = False
            for waiter in kept:
                waiter.wake()

    @staticmethod
    def _dequeue(prov: ProviderState, waiter: Waiter) -> None:
        """Take a waiter out of the count (its queue entry is dropped when next passed)."""
        if waiter.queued and not waiter.gone:
            waiter.gone = True
            prov.waiting -= 1

    def _abandon(self, provider: str, waiter: Waiter) -> None:
        """A waiter leaves (cancelled, timed out, refused): give back a lease it never used."""
        with self._lock:
            prov = self._providers.get(provider)
            lease, waiter.lease = waiter.lease, None
            if prov is not None:
                self._dequeue(prov, waiter)
            waiter.gone = True
        if lease is not None:
            lease.release()

    def _refusal(self, provider: str, plan: Plan, excluded: frozenset[str]) -> NoKeyAvailable:
        """The error for a caller no key can serve; counted unless the call already reached keys
        (a failover that ran out of them is not a refusal)."""
        if not excluded:
            self._emit([CallRejected(provider, plan.reason)])
        return NoKeyAvailable(provider, plan.retry_after, reason=plan.reason)

    def _claimed(self, lease: Lease) -> bool:
        """Whether a trial lease holds a slot in the shared store too (always, without a store)."""
        if self._store is None or not lease.trial:
            return True
        token = f"{self._instance}:{lease._permit.token}"
        if self._store.claim(lease.provider, lease.key_id, token, lease.key.breaker.config):
            return True
        lease.release()
        return False

    def try_acquire_key(self, provider: str, key_id: str) -> Lease | None:
        """Lease one named key if its breaker admits a call now, else ``None`` (health probes).

        Ignores tiers, weights and per-key concurrency: a probe asks about this key only.
        """
        events: list[PoolEvent] = []
        with self._lock:
            key = self._key(provider, key_id)
            now = self._now()
            permit = None if key.removed else key.breaker.try_acquire()
            lease = None
            if permit is not None:
                key.in_flight += 1
                key.tier.in_flight += 1
                lease = Lease(self, key, permit, now)
            key.refresh(now, events)
        self._emit(events)
        return lease if lease is None or self._claimed(lease) else None

    def healthy_elsewhere(self, provider: str, exclude: Iterable[str] = ()) -> bool:
        """Whether a serving key not in ``exclude`` is closed with no failures counted (O(excluded)):
        a failure elsewhere then looks like that key's own, not the provider's."""
        with self._lock:
            prov = self._provider(provider)
            tiers = prov.serving_tiers()
            clean = sum(t.counts["closed"] - t.failing for t in tiers)
            for key_id in exclude:
                key = prov.keys.get(key_id)
                if key is not None and key.tier in tiers and key.category == "closed" and not key.failing:
                    clean -= 1
            return clean > 0

    def note_rejected(self, provider: str, reason: str, key_id: str | None = None) -> None:
        """Tell observers a call was refused before reaching a key (e.g. ``load_shed``, ``probe_skipped``)."""
        self._emit([CallRejected(provider, reason, key_id)])

    def _record(self, lease: Lease, permit: Permit, outcome: Outcome, started: float) -> None:
        events: list[PoolEvent] = []
        key = lease.key
        with self._lock:
            if lease._done:  # one outcome per lease, even when two threads race to report
                return
            lease._done = True
            now = self._now()
            breaker = key.breaker
            kind = outcome.kind
            token = f"{self._instance}:{permit.token}" if permit.trial else ""
            share: tuple[Op, int, str] | None = ("release", 0, "") if permit.trial else None
            if kind is OutcomeKind.SUCCESS:
                key.proven = True
                had_failures = breaker.failure_count > 0 or key.shared_failures > 0
                if breaker.record_success(permit) and (permit.trial or had_failures):
                    share = ("success", 0, "")  # a healthy key's success costs the store nothing
            elif kind is OutcomeKind.FAILURE:
                if breaker.record_failure(permit):
                    share = ("failure", 0, "")
            elif kind is OutcomeKind.THROTTLED:
                until = breaker.throttle(outcome.retry_after, permit)
                share = ("throttle", max(0, round((until - now) * 1000)), "")
            elif kind is OutcomeKind.REJECTED:
                key.rejected_status = outcome.status or 401
                breaker.quarantine(OpenReason.REJECTED, permit)
                share = ("quarantine", 0, OpenReason.REJECTED.value)
            elif kind is OutcomeKind.EXHAUSTED:
                breaker.quarantine(OpenReason.QUOTA, permit)
                share = ("quarantine", 0, OpenReason.QUOTA.value)
            else:
                breaker.release(permit)
            config = breaker.config
            key.in_flight -= 1
            key.tier.in_flight -= 1
            key.refresh(now, events)
            prov = key.provider
            if kind in (OutcomeKind.REJECTED, OutcomeKind.EXHAUSTED):
                self._check_incident(prov, now, events)
            prov.update_backup(events)
            if prov.waiters:
                self._serve(prov, now, events)
        events.append(
            CallRecorded(lease.provider, key.id, outcome.kind, outcome.status, now - started, permit.trial)
        )
        if self._store is not None and share is not None:
            op, arg, reason = share
            self._store.submit(lease.provider, key.id, op, config, token=token, arg=arg, reason=reason)
        self._emit(events)

    def _check_incident(self, prov: ProviderState, now: float, events: list[PoolEvent]) -> None:
        """Every key refused (401/403/402) within ``incident_window``: a provider incident (an auth
        or billing outage), not a verdict on each key. The keys stay out but are re-verified, each
        by one trial on a backoff schedule; each key that answers comes back (lock held)."""
        config = prov.config
        live = [k for k in prov.keys.values() if not k.removed]
        if not live or any(k.category != "quarantined" for k in live):
            return
        fresh = [k for k in live if k.breaker.recheck_at is None]
        if not fresh or any(k.quarantine_kind not in ("rejected", "forbidden", "quota") for k in fresh):
            return  # an operator's quarantine is a decision, not an incident
        if any(now - k.quarantined_at > config.incident_window for k in fresh):
            return  # refused over a long time: these are verdicts on the keys
        for key in fresh:  # spread the rechecks so the keys are not all probed at once
            key.breaker.schedule_recheck(config.recheck_after * (1.0 + 0.5 * self._rng.random()))
            key.refresh(now, events)
        log.warning(
            "keypool provider=%s: every key was refused within %.0f s; treating it as a provider "
            "incident and re-verifying the keys from %.0f s on",
            prov.name,
            config.incident_window,
            config.recheck_after,
        )

    def adopt_shared(self, provider: str, key_id: str, view: SharedView) -> None:
        """Take on a key's state as a shared store reports it (other pools' decisions)."""
        events: list[PoolEvent] = []
        with self._lock:
            prov = self._providers.get(provider)
            if prov is None or key_id not in prov.keys:  # not this pool's key: another pool's
                return
            key = prov.keys[key_id]
            key.shared_failures = view.failures
            key.breaker.adopt(
                open_=view.open,
                open_until=view.open_until,
                throttled_until=view.throttled_until,
                quarantine=OpenReason(view.quarantine) if view.quarantine else None,
                reason=OpenReason(view.reason) if view.reason else None,
                failures=view.failures,
                successes=view.successes,
            )
            now = self._now()
            key.refresh(now, events)
            prov.update_backup(events)
            if prov.waiters:
                self._serve(prov, now, events)
        self._emit(events)

    def shared_views(self) -> list[tuple[str, str, SharedView]]:
        """Every key's local state as a shared store would hold it (to re-seed a store)."""
        with self._lock:
            now = self._now()
            rows = []
            for prov in self._providers.values():
                for key in prov.keys.values():
                    b = key.breaker
                    tripped = b.tripped_until()
                    rows.append(
                        (
                            prov.name,
                            key.id,
                            SharedView(
                                open=tripped is not None,
                                open_until=tripped or 0.0,
                                throttled_until=b.throttled_until if b.throttled_until > now else 0.0,
                                quarantine=b.quarantine_reason or "",
                                reason="",
                                failures=b.failure_count,
                                successes=0,
                                version=0,
                            ),
                        )
                    )
        return rows

    @property
    def instance(self) -> str:
        """This pool's name in a shared store (random per pool)."""
        return self._instance

    # ------------------------------------------------------------------ observation

    def poll(self) -> None:
        """Notice every transition that time alone has caused (observers call this before reading)."""
        events: list[PoolEvent] = []
        with self._lock:
            now = self._now()
            for prov in self._providers.values():
                prov.wake(now, events)
                for key in prov.keys.values():
                    key.refresh(now, events)
                if prov.waiters:
                    self._serve(prov, now, events)
        self._emit(events)

    def capacity(self, provider: str) -> Capacity:
        events: list[PoolEvent] = []
        with self._lock:
            prov = self._provider(provider)
            now = self._now()
            self._settle(prov, now, events)
            serving = prov.serving_tiers()
            primary = prov.tiers["primary"].capacity()
            backup = prov.tiers["backup"].capacity()
            timer = soonest_timer(prov, frozenset())
            soon = None if timer is None else timer[0] - now
            any_eligible = any(t.sampler.total > 0 for t in serving)
            busy = any(t.busy for t in serving)
            failing = any(t.failing for t in serving)
            active = len(serving) > 1
            forced = prov.backup_forced
            waiting = prov.waiting
        self._emit(events)
        return assess(
            provider,
            primary,
            backup,
            can_serve=any_eligible or busy,
            failing=failing,
            backup_active=active,
            backup_forced=forced,
            soon=soon,
            waiting=waiting,
        )

    def _key_stats(self, key: KeyState, now: float) -> dict[str, Any]:
        snap = key.breaker.snapshot(now)
        cfg = key.breaker.config
        return {
            "key_id": key.id,
            "provider": key.provider.name,
            "state": snap.state.label,
            "failure_count": snap.failure_count,
            "success_count": snap.success_count,
            "config": {
                "failure_threshold": cfg.failure_threshold,
                "success_threshold": cfg.success_threshold,
                "timeout": cfg.timeout,
                "half_open_max_calls": cfg.half_open_max_calls,
            },
            "tier": key.spec.tier,
            "weight": key.spec.weight,
            "in_flight": key.in_flight,
            "trials_in_flight": snap.trials_in_flight,
            "open_reason": snap.open_reason.value if snap.open_reason else None,
            "quarantined": snap.quarantined,
            "retry_in": None if snap.admits_at is None else max(0.0, snap.admits_at - now),
            "trips": snap.trips,
            "total_successes": snap.total_successes,
            "total_failures": snap.total_failures,
        }

    def stats(self, provider: str | None = None) -> list[dict[str, Any]]:
        """Every key's breaker in the runbook's JSON shape (plus a few extra fields)."""
        with self._lock:
            now = self._now()
            provs = [self._provider(provider)] if provider is not None else list(self._providers.values())
            return [self._key_stats(k, now) for p in provs for k in p.keys.values()]

    def key_stats(self, key_id: str, provider: str | None = None) -> dict[str, Any]:
        with self._lock:
            return self._key_stats(self._key(provider, key_id), self._now())

    def breaker_config(self, key_id: str, provider: str | None = None) -> BreakerConfig:
        with self._lock:
            return self._key(provider, key_id).breaker.config

    def time_in_states(self) -> Iterator[tuple[str, str, tuple[float, float, float]]]:
        """(provider, key_id, seconds closed/half-open/open) for every key."""
        with self._lock:
            now = self._now()
            rows = [
                (p.name, k.id, k.breaker.time_in_states(now))
                for p in self._providers.values()
                for k in p.keys.values()
            ]
        return iter(rows)

    # ------------------------------------------------------------------ operations

    def _mutate(self, keys: Iterable[KeyState], action: Any, share: tuple[Op, str] | None = None) -> int:
        """Apply an operator's ``action`` to ``keys``; ``share`` is the same change for the store."""
        events: list[PoolEvent] = []
        shared: list[tuple[str, str, BreakerConfig]] = []
        count = 0
        with self._lock:
            now = self._now()
            for key in list(keys):
                action(key)
                key.refresh(now, events)
                count += 1
                if share is not None and self._store is not None:
                    shared.append((key.provider.name, key.id, key.breaker.config))
            for prov in self._providers.values():
                prov.update_backup(events)
                if prov.waiters:  # a reset or a new config may free keys for queued callers
                    self._serve(prov, now, events)
        if share is not None and self._store is not None:
            op, reason = share
            for provider, key_id, config in shared:  # outside the lock, like every store call
                self._store.submit(provider, key_id, op, config, reason=reason)
        self._emit(events)
        return count

    def _select(self, provider: str | None, key_id: str | None) -> list[KeyState]:
        with self._lock:
            if key_id is not None:
                return [self._key(provider, key_id)]
            provs = [self._provider(provider)] if provider is not None else list(self._providers.values())
            return [k for p in provs for k in p.keys.values()]

    def reset(self, provider: str | None = None, key_id: str | None = None) -> int:
        """Close breakers (one key, one provider, or all) and clear throttles and quarantines."""

        def reset(key: KeyState) -> None:
            key.breaker.reset()
            key.proven, key.probation_until = False, None  # a rotated key proves itself again

        return self._mutate(self._select(provider, key_id), reset, ("reset", ""))

    def trip(self, provider: str | None = None, key_id: str | None = None) -> int:
        """Open breakers now, as if their failure threshold had been reached."""
        return self._mutate(self._select(provider, key_id), lambda k: k.breaker.force_open(), ("trip", ""))

    def quarantine(self, key_id: str, provider: str | None = None) -> None:
        """Take one key out of rotation until it is reset."""
        self._mutate(
            self._select(provider, key_id),
            lambda k: k.breaker.quarantine(OpenReason.MANUAL),
            ("quarantine", OpenReason.MANUAL.value),
        )

    def update_config(
        self,
        changes: Mapping[str, Any] | BreakerConfig,
        *,
        provider: str | None = None,
        key_id: str | None = None,
    ) -> int:
        """Change breaker settings hot, keeping every breaker's state.

        All target keys are validated first; if any change is invalid nothing changes. A global or
        per-provider change keeps per-key overrides' own fields.
        """
        keys = self._select(provider, key_id)
        if isinstance(changes, BreakerConfig):
            changes = changes.model_dump()
        planned = {id(k): k.breaker.config.updated(changes) for k in keys}  # validates all first
        with self._lock:
            provs: list[ProviderState] = []
            if key_id is None:
                provs = [self._provider(provider)] if provider is not None else list(self._providers.values())
            # Validate every provider's new default before changing any of them.
            defaults = [(prov, prov.config.breaker.updated(changes)) for prov in provs]
            for prov, breaker in defaults:
                prov.config = prov.config.model_copy(update={"breaker": breaker})
        return self._mutate(keys, lambda k: k.breaker.update_config(planned[id(k)]))

    def activate_backup(self, provider: str, active: bool | None = True) -> None:
        """Force the backup tier on (``True``) or off (``False``), or back to automatic (``None``)."""
        events: list[PoolEvent] = []
        with self._lock:
            prov = self._provider(provider)
            prov.backup_forced = active
            prov.update_backup(events)
            if prov.waiters:
                self._serve(prov, self._now(), events)
        self._emit(events)

    def __repr__(self) -> str:
        counts = {p.name: len(p.keys) for p in self._providers.values()}
        return f"KeyPool(providers={counts})"
