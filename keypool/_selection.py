"""Which key serves the next call: weighted draws with a lean away from loaded keys."""

from __future__ import annotations

import random

from ._keys import KeyState, ProviderState

__all__ = ["pick", "soonest"]


def pick(prov: ProviderState, exclude: frozenset[str], rng: random.Random) -> KeyState | None:
    """A key that can take a call now, or ``None``.

    Two weighted draws, keeping the less loaded per unit of weight ("power of two choices"); an
    idle first draw cannot be beaten, so it skips the second. Backups are drawn only while their
    tier is active.
    """
    tiers = [prov.tiers["primary"]]
    backup = prov.tiers["backup"]
    if backup.keys and prov.backup_active:  # backups serve only when their tier is active
        tiers.append(backup)
    totals = [t.sampler.total for t in tiers]
    grand = sum(totals)
    if grand <= 0:
        return None
    best: KeyState | None = None
    for _ in range(2 if not exclude else 8):
        if best is not None and not best.in_flight:
            break
        u = rng.randrange(grand)
        tier = tiers[0] if u < totals[0] else tiers[1]
        if tier is not tiers[0]:
            u -= totals[0]
        candidate = tier.keys[tier.sampler.find(u)]
        if candidate.id in exclude:
            continue
        if best is None or candidate.in_flight * best.units < best.in_flight * candidate.units:
            best = candidate
            if exclude:
                break
    if best is None and exclude:
        # Rare: the draws kept landing on excluded keys. Look at every eligible key once.
        for tier in tiers:
            for key in tier.keys:
                if key.eligible and key.id not in exclude:
                    return key
    return best


def soonest(
    prov: ProviderState, now: float, exclude: frozenset[str] = frozenset()
) -> tuple[float | None, bool]:
    """(seconds until the soonest scheduled recovery, whether some key is merely busy).

    Keys in ``exclude`` are left out: waiting for a key the caller will not take is pointless.
    """
    wake = prov.next_wake()
    if exclude and wake is not None:  # slow path, only while failing over
        live = (at for at, _, k in prov.heap if at == k.scheduled_at and k.id not in exclude)
        wake = min(live, default=None)
    soon = None if wake is None else wake - now
    busy = False
    if soon is None:
        busy = any(k.in_flight for k in prov.keys.values() if k.id not in exclude)
    return soon, busy
