"""Lease: one key, leased for one call, and the one outcome it reports back."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Self

from pydantic import SecretStr

from ._breaker import Permit
from ._config import Tier
from ._keys import KeyState
from ._outcome import IGNORED, SUCCESS, Outcome, OutcomeKind, classify_exception

if TYPE_CHECKING:
    from ._leasing import Leasing

__all__ = ["Lease"]


class Lease:
    """One key, leased for one call. Report exactly one outcome; later reports are ignored.

    Use it as a context manager: a clean exit records success, an exception is classified (a
    cancellation or a bug in the caller's code counts against nothing), and an explicit
    :meth:`record` inside the block wins over both.
    """

    __slots__ = ("_done", "_permit", "_pool", "_started", "key", "provider")

    def __init__(self, pool: Leasing, key: KeyState, permit: Permit, started: float) -> None:
        self._pool = pool
        self.key = key
        self.provider = key.provider.name
        self._permit = permit
        self._started = started
        self._done = False

    @property
    def key_id(self) -> str:
        return self.key.id

    @property
    def tier(self) -> Tier:
        return self.key.spec.tier

    @property
    def secret(self) -> SecretStr:
        return self.key.spec.secret

    @property
    def trial(self) -> bool:
        return self._permit.trial

    @property
    def done(self) -> bool:
        return self._done

    def record(self, outcome: Outcome) -> None:
        self._pool._record(self, self._permit, outcome, self._started)

    def success(self) -> None:
        self.record(SUCCESS)

    def failure(self, detail: str = "") -> None:
        self.record(Outcome(OutcomeKind.FAILURE, detail=detail))

    def release(self) -> None:
        """Give the key back without an outcome."""
        self.record(IGNORED)

    def _exit(self, exc: BaseException | None) -> None:
        self.record(SUCCESS if exc is None else classify_exception(exc))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._exit(exc)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._exit(exc)

    def __repr__(self) -> str:
        return f"Lease(provider={self.provider!r}, key_id={self.key_id!r}, done={self._done})"
