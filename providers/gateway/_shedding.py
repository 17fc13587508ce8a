"""Load shedding by caller priority, with :class:`providers.unified.SheddingPolicy`'s levels.

When the healthy share of the providers a request could use falls below ``shed_low_below``,
``low`` callers are refused at once (503 with ``Retry-After``); below ``shed_normal_below``,
``normal`` ones too; ``critical`` callers always get whatever keys remain.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from keypool import Capacity, KeyPool, LoadShed

from ..unified import PRIORITIES, SheddingPolicy
from ._errors import refusal_error

__all__ = ["Shedder"]

_DEFAULT_RETRY_AFTER = 1.0


def healthy_share(caps: Mapping[str, Capacity]) -> float:
    """Closed keys over serving keys, of every provider together (as ``UnifiedAgent`` counts)."""
    total = sum(c.serving for c in caps.values())
    return sum(c.healthy_share * c.serving for c in caps.values()) / total if total else 0.0


class Shedder:
    def __init__(self, pool: KeyPool, shed_low_below: float, shed_normal_below: float) -> None:
        self.pool = pool
        self.policy = SheddingPolicy(shed_low_below=shed_low_below, shed_normal_below=shed_normal_below)
        self.accepted: Counter[str] = Counter()
        self.shed: Counter[str] = Counter()

    def admit(self, priority: str, caps: Mapping[str, Capacity]) -> None:
        """Return if a call of ``priority`` may go on; raise the 503 a shed call gets."""
        share = healthy_share(caps)
        if priority in PRIORITIES and self.policy.sheds(priority, share):
            self.shed[priority] += 1
            waits = [c.next_recovery_in for c in caps.values() if c.next_recovery_in is not None]
            for provider in caps:
                self.pool.note_rejected(provider, "load_shed")
            refusal = LoadShed(
                ",".join(caps),
                min(waits) if waits else _DEFAULT_RETRY_AFTER,
                f"{priority!r} call shed: healthy share {share:.0%} is below the level for it",
                reason="load_shed",
            )
            raise refusal_error([refusal])
        self.accepted[priority] += 1

    def stats(self) -> dict[str, dict[str, int]]:
        return {p: {"accepted": self.accepted[p], "shed": self.shed[p]} for p in PRIORITIES}
