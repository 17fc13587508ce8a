"""Which key serves the next call: weighted draws with a lean away from loaded keys."""

from __future__ import annotations

import random

from ._keys import KeyState, ProviderState, TierState

__all__ = ["pick"]


def pick(prov: ProviderState, exclude: frozenset[str], rng: random.Random) -> KeyState | None:
    """A key that can take a call now, or ``None``.

    Two weighted draws, keeping the less loaded per unit of weight ("power of two choices"); an
    idle first draw cannot be beaten, so it skips the second. Backups are drawn only while their
    tier is active.
    """
    tiers = prov.serving_tiers()  # backups serve only while their tier is active
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
        # Rare: the draws kept landing on excluded keys. Set those aside and draw once more, by
        # weight like every other pick (never by list order), in O(excluded * log n).
        return _draw_without(prov, tiers, exclude, rng)
    return best


def _draw_without(
    prov: ProviderState, tiers: list[TierState], exclude: frozenset[str], rng: random.Random
) -> KeyState | None:
    aside = [
        k for k in (prov.keys.get(i) for i in exclude) if k is not None and k.eligible and k.tier in tiers
    ]
    for key in aside:
        key.tier.sampler.set(key.index, 0)
    try:
        totals = [t.sampler.total for t in tiers]
        grand = sum(totals)
        if grand <= 0:
            return None
        u = rng.randrange(grand)
        for tier, total in zip(tiers, totals, strict=True):
            if u < total:
                return tier.keys[tier.sampler.find(u)]
            u -= total
        return None
    finally:
        for key in aside:
            key.tier.sampler.set(key.index, key.eligible)
