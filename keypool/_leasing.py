"""A lease's life in the pool: taking one (waiting when that helps), and recording its outcome.

:class:`KeyPool` gets these methods from :class:`Leasing`; they run on its state (its lock, its
providers, its clock) and are kept here so that the pool's own module holds its structure,
observation and operations, and this one the hot path. See ``_waiting`` for busy versus down.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from ._breaker import BreakerState, OpenReason, Permit
from ._clock import Clock
from ._errors import ConfigError, NoKeyAvailable
from ._events import CallRecorded, CallRejected, PoolEvent, ProviderStateChanged
from ._keys import KeyState, ProviderState
from ._lease import Lease
from ._outcome import Outcome, OutcomeKind
from ._selection import pick
from ._waiting import Plan, Waiter, wait_async, wait_sync
from ._waiting import plan as plan_for
from .store._base import SharedStore
from .store._model import Op

__all__ = ["Leasing"]

log = logging.getLogger("keypool")

_BUSY_POLL = 0.005  # seconds between looks while a trial slot is held by another process


class Leasing:
    """Taking and returning leases; mixed into :class:`~keypool.KeyPool`."""

    _lock: threading.Lock
    _providers: dict[str, ProviderState]
    _clock: Clock
    _rng: random.Random
    _store: SharedStore | None
    _instance: str
    _now: Callable[[], float]

    if TYPE_CHECKING:

        def _emit(self, events: list[PoolEvent]) -> None: ...
        def _provider(self, name: str) -> ProviderState: ...
        def _key(self, provider: str | None, key_id: str) -> KeyState: ...

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
        deadline = self._limits(timeout, max_wait)
        waiter: Waiter | None = None
        contested = False
        try:
            while True:
                lease, plan = self._attempt(provider, excluded, waiter, deadline, max_wait, contested)
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
        deadline = self._limits(timeout, max_wait)
        waiter: Waiter | None = None
        contested = False
        try:
            while True:
                lease, plan = self._attempt(provider, excluded, waiter, deadline, max_wait, contested)
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

    def _limits(self, timeout: float | None, max_wait: float | None) -> float | None:
        """The deadline on the pool's clock (``max_wait`` is resolved per provider, under the lock)."""
        if timeout is not None and not timeout >= 0:
            raise ConfigError(f"timeout: must be >= 0 seconds or None (got {timeout})")
        if max_wait is not None and not max_wait >= 0:
            raise ConfigError(f"max_wait: must be >= 0 seconds or None (got {max_wait})")
        return None if timeout is None else self._now() + timeout

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
        max_wait: float | None,
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
                limit = prov.config.max_wait if max_wait is None else max_wait
                plan = plan_for(prov, now, exclude, deadline, limit, contested)
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
        """Pick a key and take a permit from its breaker and from the provider's (lock held)."""
        for _ in range(4):
            key = pick(prov, exclude, self._rng)
            if key is None:
                return None
            health = prov.health.admit()
            if health is None:  # the provider is out, or its trial calls are all running
                return None
            permit = key.breaker.try_acquire()
            if permit is None:  # out of step with the sampler: fix it and draw again
                prov.health.record(health, OutcomeKind.IGNORED, key.id, 0)
                key.refresh(now, events)
                continue
            key.in_flight += 1
            key.tier.in_flight += 1
            if not key.proven and key.probation_until is None:
                key.probation_until = now + prov.config.probation
            key.refresh(now, events)
            return Lease(self, key, permit, now, health)
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
            if prov.health.enabled and prov.health.state is not BreakerState.CLOSED:
                return False  # the provider itself is out or probing: nothing is key-local now
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
            benched: list[KeyState] = []
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
                benched = self._bench_account(key, until, now, events)
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
            if lease._health is not None and prov.health.record(lease._health, kind, key.id, len(prov.keys)):
                self._provider_changed(prov, now, events)
            if kind in (OutcomeKind.REJECTED, OutcomeKind.EXHAUSTED):
                self._check_incident(prov, now, events)
            prov.update_backup(events)
            if prov.waiters:
                self._serve(prov, now, events)
            tripped, prov.tripped = prov.tripped, []
        events.append(
            CallRecorded(lease.provider, key.id, outcome.kind, outcome.status, now - started, permit.trial)
        )
        if self._store is not None and share is not None:
            op, arg, reason = share
            self._store.submit(lease.provider, key.id, op, config, token=token, arg=arg, reason=reason)
            for sibling in benched:  # the account's other keys, benched until the same instant
                self._store.submit(lease.provider, sibling.id, "throttle", sibling.breaker.config, arg=arg)
        if self._store is not None and tripped:  # a provider-wide trip, shared like an operator's
            for key_id in tripped:
                self._store.submit(lease.provider, key_id, "trip", config)
        self._emit(events)

    def _bench_account(
        self, key: KeyState, until: float, now: float, events: list[PoolEvent]
    ) -> list[KeyState]:
        """A 429 on a key that shares an account benches every key of the account until the same
        instant: the limit is the account's, not the key's (lock held)."""
        account = key.spec.account
        if account is None or until <= now:
            return []
        siblings = [k for k in key.provider.accounts.get(account, ()) if k is not key and not k.removed]
        for sibling in siblings:
            sibling.breaker.throttle(until - now)
            sibling.refresh(now, events)
        return siblings

    def _provider_changed(self, prov: ProviderState, now: float, events: list[PoolEvent]) -> None:
        """The provider's own breaker moved: tell observers, and the queue to think again."""
        state = prov.health.state
        for t in prov.health.breaker.drain_transitions():
            events.append(ProviderStateChanged(prov.name, t.old, t.new, t.reason, t.at))
        prov.replan = True
        if state is BreakerState.OPEN:
            # A provider-wide outage opens every key at once, so the pool, its metrics and the
            # alerts all say so; trial calls stay bounded by the provider's own breaker. A key
            # left half-open would wait there, with no trial allowed, for as long as the provider
            # stays out (and look stuck half-open): it opens again too.
            for key in prov.keys.values():
                if key.category in ("closed", "half_open") and not key.removed:
                    key.breaker.force_open()
                    key.refresh(now, events)
                    prov.tripped.append(key.id)
            log.warning(
                "keypool provider=%s: endpoint failures across its keys: the provider is out; no key of "
                "it is tried until its trial calls succeed",
                prov.name,
            )

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
