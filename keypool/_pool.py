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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from pydantic import SecretStr

from ._breaker import BreakerState, CircuitBreaker, OpenReason
from ._capacity import AccountCapacity, Capacity, CapacityStatus, TierCapacity, assess
from ._clock import Clock, MonotonicClock
from ._config import BreakerConfig, KeySpec, PoolConfig, ProviderConfig, validate
from ._errors import ConfigError, UnknownKeyError, UnknownProviderError
from ._events import Hook, KeyStateChanged, PoolEvent
from ._keys import KeyState, ProviderState
from ._lease import Lease
from ._leasing import Leasing
from ._provider_health import ProviderHealth
from ._waiting import soonest_timer
from .store import _admin as admin
from .store._base import SharedStore, SharedView
from .store._model import Op

__all__ = ["Capacity", "CapacityStatus", "KeyPool", "Lease", "TierCapacity"]

log = logging.getLogger("keypool")

_TRIP_REASONS = (OpenReason.FAILURES, OpenReason.TRIAL_FAILED)  # what a shared store calls a trip


class KeyPool(Leasing):
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
            prov.health = ProviderHealth(
                cfg.breaker, clock=self._now, rng=self._rng.random, enabled=cfg.shared_endpoint
            )
            self._providers[cfg.name] = prov
            for spec in cfg.keys:
                self._add_key(prov, spec)
        if self._store is not None:
            self._store.bind(self)  # share the new keys too

    def add_key(self, provider: str, key: KeySpec | str) -> str:
        """Add a key at run time; returns its id. With a shared store, every pool adds it."""
        spec = key if isinstance(key, KeySpec) else KeySpec(secret=SecretStr(key))
        key_id = self._add_key_now(provider, spec)
        self._share_admin(admin.key_added_entry(provider, spec))
        return key_id

    def _add_key_now(self, provider: str, spec: KeySpec) -> str:
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
        """Stop routing to a key (in every pool sharing a store). Calls holding it finish normally."""
        self._remove_key_now(provider, key_id)
        self._share_admin(admin.key_removed_entry(provider, key_id))

    def _remove_key_now(self, provider: str, key_id: str) -> None:
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

    def set_shared_endpoint(self, provider: str, shared: bool) -> None:
        """Whether the provider's keys call one endpoint (``ProviderConfig.shared_endpoint``): if
        so, endpoint failures across keys are seen as one outage of the provider. A client whose
        keys are separate endpoints (MCP replicas) turns it off."""
        with self._lock:
            prov = self._provider(provider)
            prov.config = prov.config.model_copy(update={"shared_endpoint": shared})
            prov.health.enabled = shared
            if not shared:
                prov.health.reset()

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

    def _share_admin(self, entry: dict[str, Any]) -> None:
        if self._store is not None:
            self._store.share_admin(self, entry)

    def apply_admin(self, entry: Mapping[str, Any]) -> tuple[str, str] | None:
        """Apply an operator's change another pool made (a shared store replays them in order);
        the (provider, key id) of a key it added, if any."""
        return admin.apply(self, entry)

    def adopt_shared(self, provider: str, key_id: str, view: SharedView) -> None:
        """Take on a key's state as a shared store reports it (other pools' decisions)."""
        events: list[PoolEvent] = []
        with self._lock:
            prov = self._providers.get(provider)
            if prov is None or key_id not in prov.keys:  # not this pool's key: another pool's
                return
            key = prov.keys[key_id]
            key.shared_failures = view.failures
            mine = f"{self._instance}:"
            key.breaker.adopt(
                open_=view.open,
                open_until=view.open_until,
                throttled_until=view.throttled_until,
                quarantine=OpenReason(view.quarantine) if view.quarantine else None,
                reason=OpenReason(view.reason) if view.reason else None,
                failures=view.failures,
                successes=view.successes,
                # Trials other pools run: this pool then claims only slots that look free.
                foreign_trials=[at for token, at in view.trials if not token.startswith(mine)],
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
                    why = b.open_reason if tripped is not None and not b.quarantined else None
                    rows.append(
                        (
                            prov.name,
                            key.id,
                            SharedView(
                                open=tripped is not None,
                                open_until=tripped or 0.0,
                                throttled_until=b.throttled_until if b.throttled_until > now else 0.0,
                                quarantine=b.quarantine_reason or "",
                                reason=why.value if why in _TRIP_REASONS else "",
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
            provider_state = prov.health.state.label
            trial_ready = prov.health.trial_ready(now) or any(
                key.breaker.state(now) is BreakerState.HALF_OPEN and key.breaker.can_admit(now)
                for tier in serving
                if tier.counts["half_open"]
                for key in tier.keys
            )
            accounts = tuple(_account(name, keys, now) for name, keys in prov.accounts.items())
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
            provider_state=provider_state,
            trial_ready=trial_ready,
            accounts=accounts,
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
            key.provider.health.reset()  # the provider's own view starts again with its keys

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
        """Change breaker settings hot, keeping every breaker's state (in every pool sharing a
        store, and in pools that start later).

        All target keys are validated first; if any change is invalid nothing changes. A global or
        per-provider change keeps per-key overrides' own fields.
        """
        if isinstance(changes, BreakerConfig):
            changes = changes.model_dump()
        count = self._update_config(changes, provider=provider, key_id=key_id)
        self._share_admin(admin.config_entry(changes, provider, key_id))
        return count

    def _update_config(
        self, changes: Mapping[str, Any], *, provider: str | None = None, key_id: str | None = None
    ) -> int:
        keys = self._select(provider, key_id)
        planned = {id(k): k.breaker.config.updated(changes) for k in keys}  # validates all first
        with self._lock:
            provs: list[ProviderState] = []
            if key_id is None:
                provs = [self._provider(provider)] if provider is not None else list(self._providers.values())
            # Validate every provider's new default before changing any of them.
            defaults = [(prov, prov.config.breaker.updated(changes)) for prov in provs]
            for prov, breaker in defaults:
                prov.config = prov.config.model_copy(update={"breaker": breaker})
                prov.health.update_config(breaker)  # the provider's own view follows its defaults
        return self._mutate(keys, lambda k: k.breaker.update_config(planned[id(k)]))

    def activate_backup(self, provider: str, active: bool | None = True) -> None:
        """Force the backup tier on (``True``) or off (``False``), or back to automatic (``None``),
        in every pool sharing a store."""
        self._activate_backup(provider, active)
        self._share_admin(admin.backup_entry(provider, active))

    def _activate_backup(self, provider: str, active: bool | None) -> None:
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


def _account(name: str, keys: list[KeyState], now: float) -> AccountCapacity:
    live = [k for k in keys if not k.removed]
    until = max((k.breaker.throttled_until for k in live), default=0.0)
    return AccountCapacity(
        name=name,
        keys=len(live),
        throttled=sum(1 for k in live if k.breaker.throttled_until > now),
        throttled_for=until - now if until > now else None,
    )
