"""The seam between a pool and a shared store of breaker state, and what crosses it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .._config import BreakerConfig
from .._errors import KeyPoolError
from ._model import Op

if TYPE_CHECKING:
    from .._pool import KeyPool

__all__ = ["SharedStore", "SharedView", "StoreUnavailable", "view_of"]


class StoreUnavailable(KeyPoolError):
    """A strict shared store could not be reached (or refused us) at start-up; names the cause."""


@dataclass(frozen=True, slots=True)
class SharedView:
    """A key's shared state translated to the pool's clock (seconds)."""

    open: bool
    open_until: float
    throttled_until: float
    quarantine: str
    reason: str
    failures: int
    successes: int
    version: int
    trials: tuple[tuple[str, float], ...] = ()  # (token, expires at): trial slots held everywhere


class _StoreState(Protocol):
    """A key's state as a store holds it: deadlines in store-clock milliseconds (0: none)."""

    @property
    def open(self) -> bool: ...
    @property
    def open_until(self) -> int: ...
    @property
    def throttled_until(self) -> int: ...
    @property
    def quarantine(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def failures(self) -> int: ...
    @property
    def successes(self) -> int: ...
    @property
    def version(self) -> int: ...
    @property
    def trials(self) -> tuple[tuple[str, int], ...]: ...


def view_of(state: _StoreState, offset: float) -> SharedView:
    """A store's state in a pool's clock: store milliseconds minus ``offset`` seconds."""

    def local(ms: int) -> float:
        return ms / 1000.0 - offset if ms else 0.0

    return SharedView(
        open=state.open,
        open_until=local(state.open_until),
        throttled_until=local(state.throttled_until),
        quarantine=state.quarantine,
        reason=state.reason,
        failures=state.failures,
        successes=state.successes,
        version=state.version,
        trials=tuple((token, local(at)) for token, at in state.trials),
    )


class SharedStore(Protocol):
    """Where breaker state is shared between pools (processes, hosts).

    The pool keeps deciding on its own local breakers, so a call to a healthy key never waits for
    the store: it hands each change to :meth:`submit` (which must not block) and adopts what the
    store tells it back through :meth:`KeyPool.adopt_shared`. Only taking a half-open trial slot
    asks the store synchronously (:meth:`claim`), so the trial limit holds across all pools.
    Operators' configuration changes go through :meth:`share_admin` and come back to the other
    pools through :meth:`KeyPool.apply_admin`.
    """

    def bind(self, pool: KeyPool) -> None:
        """Start sharing this pool's keys (called once by the pool)."""

    def submit(
        self,
        provider: str,
        key_id: str,
        op: Op,
        config: BreakerConfig,
        *,
        token: str = "",
        arg: int = 0,
        reason: str = "",
    ) -> None:
        """Apply a change in the background; never raises, never blocks for long."""

    def claim(self, provider: str, key_id: str, token: str, config: BreakerConfig) -> bool:
        """Take a shared trial slot. ``False`` when every slot is taken, and also when the store
        cannot answer in time (the caller tries another key); ``True`` without asking while the
        store is known to be unreachable (the local breaker decides)."""
        ...

    def share_admin(self, pool: KeyPool, entry: dict[str, Any]) -> None:
        """An operator's change ``pool`` made (see :mod:`keypool.store._admin`): log it and have
        every other pool apply it, now and when it binds later. Never raises, never blocks long."""

    def close(self) -> None:
        """Stop sharing and release connections."""
