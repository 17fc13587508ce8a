"""Trial-slot bookkeeping of a RedisStore: a claim's fate (answered in time, or given up on by
its caller, so that a late answer gives the slot back) and the slots a process holds (renewed
while their trials run, at most until ``probe_timeout`` from the claim)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .._config import BreakerConfig
from ._wire import Change

if TYPE_CHECKING:
    from ._redis import RedisStore

__all__ = ["Slot", "Ticket", "Trials"]


class Ticket:
    """A claim's fate, decided once: answered in time, or abandoned by its caller."""

    __slots__ = ("abandoned", "answered", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.answered = False

    def abandon(self) -> bool:
        with self.lock:
            self.abandoned = not self.answered
            return self.abandoned

    def answer(self) -> bool:
        """``False`` if the caller gave up first."""
        with self.lock:
            self.answered = not self.abandoned
            return self.answered


@dataclass(frozen=True, slots=True)
class Slot:
    """A trial slot this process holds: renewed until its outcome is sent, at most until ``cap``."""

    provider: str
    key_id: str
    config: BreakerConfig
    cap: int


class Trials:
    """The trial slots one store holds: claimed, renewed, given back."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.slots: dict[str, Slot] = {}  # token -> slot (guarded by the store's lock)

    async def claim(self, change: Change, ticket: Ticket) -> bool:
        """Run a claim; if its caller gave up before the answer, give a granted slot back."""
        store = self.store
        try:
            reply = (await store._batch([change]))[0]
        except Exception as exc:  # RedisError, OSError, a timeout: judged like any failed call
            store._trouble(exc)
            return store.degraded  # Redis gone: the local breaker decides; merely slow: refused
        if reply is None:
            return True  # Redis refused the script for this key (logged): the local breaker decides
        held = reply.allowed and reply.open  # closed keys need no slot
        if held:
            cap = reply.now + round(change.config.probe_timeout * 1000)
            with store._lock:
                self.slots[change.token] = Slot(change.provider, change.key_id, change.config, cap)
        if not ticket.answer():
            if held:  # the caller gave up before the answer came: give the slot back
                with store._lock:
                    self.slots.pop(change.token, None)
                store._enqueue(replace(change, op="release", arg=0))
            return False
        if reply.changed:
            store._news(change.provider, change.key_id, reply)
        return reply.allowed

    async def renew(self) -> None:
        """Renew the leases of the slots held, a few times per lease."""
        store = self.store
        while not store._closed:
            await asyncio.sleep(store.trial_lease / 3)
            if store.degraded:
                continue
            with store._lock:
                held = list(self.slots.items())
            for token, slot in held:
                renew = Change(slot.provider, slot.key_id, "renew", slot.config, token, store._lease_ms)
                store._enqueue(replace(renew, cap=slot.cap))

    def give_back(self) -> list[Change]:
        """Releases for every slot still held (the store is closing: their outcomes never come)."""
        with self.store._lock:
            held, self.slots = self.slots, {}
        return [Change(s.provider, s.key_id, "release", s.config, token) for token, s in held.items()]
