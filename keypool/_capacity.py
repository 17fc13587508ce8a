"""What a provider can take now: the frozen :class:`Capacity` answer and how its status is judged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["AccountCapacity", "Capacity", "CapacityStatus", "TierCapacity"]

CapacityStatus = Literal["healthy", "degraded", "critical", "down"]


@dataclass(frozen=True, slots=True)
class TierCapacity:
    """Counts for one tier of one provider."""

    total: int
    closed: int
    half_open: int
    open: int
    throttled: int
    quarantined: int
    in_flight: int


@dataclass(frozen=True, slots=True)
class AccountCapacity:
    """The keys of one account (which share its limits) and how long the account is throttled."""

    name: str
    keys: int
    throttled: int
    throttled_for: float | None  # seconds until the account's last Retry-After passes, if it has not


@dataclass(frozen=True, slots=True)
class Capacity:
    """How much of a provider can take calls now, for code (the runbook asks Grafana the same).

    ``open`` counts every key that refuses calls (tripped, throttled or quarantined); the latter two
    are also counted on their own. ``serving`` is the number of keys in the tiers that serve now
    (the primaries, and the backups while ``backup_active``); ``healthy_share`` is the share of
    those that are closed (idle backups are a reserve, not capacity). ``status``: ``down`` when no
    key can take a call now nor when one in flight ends, ``critical`` when fewer than half the
    serving keys are closed (the runbook's "majority open"), ``degraded`` when any serving key is
    not closed or has failures counted. ``waiting`` is the number of callers queued for a key.
    ``next_recovery_in`` is the number of seconds until the soonest key should be back, if known.
    ``provider_state`` is the provider's own breaker (endpoint failures across its keys: ``closed``,
    ``open``, ``half_open``); ``trial_ready`` is true when a call now would be a trial that could
    bring the provider or one of its keys back (routing sends it there first, so a healed provider
    gets its trials even while a fallback is healthy). ``accounts``: keys grouped by account.
    """

    provider: str
    total: int
    closed: int
    half_open: int
    open: int
    throttled: int
    quarantined: int
    in_flight: int
    healthy_share: float
    status: CapacityStatus
    backup_active: bool
    backup_forced: bool | None
    next_recovery_in: float | None
    primary: TierCapacity
    backup: TierCapacity
    serving: int = 0
    waiting: int = 0
    provider_state: str = "closed"
    trial_ready: bool = False
    accounts: tuple[AccountCapacity, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "status": self.status,
            "total": self.total,
            "closed": self.closed,
            "half_open": self.half_open,
            "open": self.open,
            "throttled": self.throttled,
            "quarantined": self.quarantined,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "serving": self.serving,
            "healthy_share": round(self.healthy_share, 6),
            "backup_active": self.backup_active,
            "backup_forced": self.backup_forced,
            "next_recovery_in": self.next_recovery_in,
            "provider_state": self.provider_state,
            "trial_ready": self.trial_ready,
            "accounts": [
                {"name": a.name, "keys": a.keys, "throttled": a.throttled, "throttled_for": a.throttled_for}
                for a in self.accounts
            ],
            "primary": _tier_dict(self.primary),
            "backup": _tier_dict(self.backup),
        }


def _tier_dict(tier: TierCapacity) -> dict[str, int]:
    return {name: getattr(tier, name) for name in TierCapacity.__slots__}


def assess(
    provider: str,
    primary: TierCapacity,
    backup: TierCapacity,
    *,
    can_serve: bool,
    failing: bool,
    backup_active: bool,
    backup_forced: bool | None,
    soon: float | None,
    waiting: int,
    provider_state: str = "closed",
    trial_ready: bool = False,
    accounts: tuple[AccountCapacity, ...] = (),
) -> Capacity:
    """Put a provider's tier counts together into one :class:`Capacity` with its status.

    Only the tiers that serve now count toward ``healthy_share``: idle backup keys are in reserve,
    not capacity. ``can_serve`` is whether a call can be leased now or as soon as one in flight
    ends; ``failing`` whether a serving key has failures counted that have not tripped it yet.
    """
    serving = [primary, backup] if backup_active else [primary]
    serving_total = sum(t.total for t in serving)
    serving_closed = sum(t.closed for t in serving)
    share = serving_closed / serving_total if serving_total else 0.0
    status: CapacityStatus
    if not can_serve:
        status = "down"
    elif share < 0.5:  # the runbook's "majority open", the same line as the backup tier
        status = "critical"
    elif serving_closed < serving_total or failing:
        status = "degraded"
    else:
        status = "healthy"
    throttled = primary.throttled + backup.throttled
    quarantined = primary.quarantined + backup.quarantined
    return Capacity(
        provider=provider,
        total=primary.total + backup.total,
        closed=primary.closed + backup.closed,
        half_open=primary.half_open + backup.half_open,
        open=primary.open + backup.open + throttled + quarantined,
        throttled=throttled,
        quarantined=quarantined,
        in_flight=primary.in_flight + backup.in_flight,
        healthy_share=share,
        status=status,
        backup_active=backup_active,
        backup_forced=backup_forced,
        next_recovery_in=None if soon is None else max(0.0, soon),
        primary=primary,
        backup=backup,
        serving=serving_total,
        waiting=waiting,
        provider_state=provider_state,
        trial_ready=trial_ready,
        accounts=accounts,
    )
