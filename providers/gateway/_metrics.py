"""The gateway's own series beside the pool's: requests by caller, public model and status, and
shed calls by priority. Labels are configured names (callers, models) or fixed sets, so the
number of series is bounded by the config; an unauthenticated request is caller ``-`` and a model
name that is not configured is ``-``."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

__all__ = ["GatewayCounts", "register"]


class GatewayCounts:
    """Counters the request path bumps (a dict increment under a lock); read at scrape time."""

    def __init__(self, models: Any) -> None:
        self._models = frozenset(models)
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str, str]] = Counter()

    def count(self, caller: str | None, model: str | None, status: int) -> None:
        shown = model if model is not None and model in self._models else "-"
        key = (caller or "-", shown, str(status))
        with self._lock:
            self.requests[key] += 1

    def snapshot(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            return dict(self.requests)


class _Collector:
    def __init__(self, counts: GatewayCounts, shed: Any) -> None:
        self.counts = counts
        self.shed = shed

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        requests = CounterMetricFamily(
            "keypool_gateway_requests",
            "Gateway requests by caller, public model and HTTP status",
            labels=["caller", "model", "status"],
        )
        for (caller, model, status), value in sorted(self.counts.snapshot().items()):
            requests.add_metric([caller, model, status], value)
        yield requests
        shed = CounterMetricFamily(
            "keypool_gateway_shed", "Gateway requests shed by caller priority", labels=["priority"]
        )
        for priority, counts in self.shed.stats().items():
            shed.add_metric([priority], counts["shed"])
        yield shed


def register(registry: Any, counts: GatewayCounts, shedder: Any) -> None:
    """Expose the gateway's series on ``registry`` (the one the admin app's ``/metrics`` serves)."""
    registry.register(_Collector(counts, shedder))
