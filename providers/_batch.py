"""Parallel batches over a pool: bounded concurrency, results in input order, one error per item.

A fixed number of workers pull items in order, so a batch of 100,000 items holds ``concurrency``
tasks, not 100,000. A failed item carries its own exception and never sinks the batch; cancelling
the batch cancels the workers promptly, and the transport gives every leased key back.
Per-key bounds come from the pool (``max_concurrency`` on each key).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio

from keypool import ConfigError

__all__ = ["BatchItem", "run_batch"]

T = TypeVar("T")
R = TypeVar("R")

Progress = Callable[[int, int, int], None]  # (done, failed, total)


@dataclass(frozen=True, slots=True)
class BatchItem(Generic[T, R]):
    """One item's fate: exactly one of ``result`` and ``error`` is set."""

    index: int
    input: T
    result: R | None = None
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _terminal_progress(every: float = 0.25) -> Progress:
    """A one-line progress display on stderr, refreshed at most every ``every`` seconds."""
    last = [0.0]

    def show(done: int, failed: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < every:
            return
        last[0] = now
        end = "\n" if done == total else ""
        sys.stderr.write(f"\rbatch: {done}/{total} done, {failed} failed{end}")
        sys.stderr.flush()

    return show


async def run_batch(
    fn: Callable[[T], Awaitable[R]],
    items: Sequence[T],
    *,
    concurrency: int = 16,
    progress: bool | Progress = False,
) -> list[BatchItem[T, R]]:
    """Run ``fn`` on every item with at most ``concurrency`` at once; results in input order."""
    if concurrency < 1:
        raise ConfigError(f"concurrency: must be >= 1 (got {concurrency})")
    total = len(items)
    results: list[BatchItem[T, R] | None] = [None] * total
    report: Progress | None = _terminal_progress() if progress is True else (progress or None)
    next_index = 0
    done = failed = 0

    async def worker() -> None:
        nonlocal next_index, done, failed
        while next_index < total:
            index = next_index
            next_index += 1
            item = items[index]
            try:
                results[index] = BatchItem(index, item, result=await fn(item))
            except Exception as exc:
                results[index] = BatchItem(index, item, error=exc)
                failed += 1
            done += 1
            if report is not None:
                report(done, failed, total)

    async with anyio.create_task_group() as group:
        for _ in range(min(concurrency, total)):
            group.start_soon(worker)
    return [r for r in results if r is not None]
