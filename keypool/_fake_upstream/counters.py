"""What each key of the fake upstream saw: a mutable tally while serving, frozen counters to read.

Counting happens under the upstream's lock as each request arrives, so a test reads exact attempt
counts while requests are still in flight.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class KeyCounters:
    """What one key saw, counted when each request arrived (so attempts are counted exactly).

    ``by_status`` counts the statuses sent (a hang sends none); ``by_endpoint`` uses normalised
    paths such as ``/chat/completions``; ``cut`` and ``stalled`` count bodies broken on purpose;
    ``prefills`` counts chat requests that ended with an assistant message (continuations).
    """

    requests: int = 0
    by_status: Mapping[int, int] = field(default_factory=lambda: MappingProxyType({}))
    by_endpoint: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    streams_started: int = 0
    streams_completed: int = 0
    cut: int = 0
    stalled: int = 0
    hangs: int = 0
    in_flight: int = 0
    prefills: int = 0

    def status(self, code: int) -> int:
        """How many responses with this status code were sent."""
        return self.by_status.get(code, 0)


@dataclass
class Tally:
    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_endpoint: Counter[str] = field(default_factory=Counter)
    streams_started: int = 0
    streams_completed: int = 0
    cut: int = 0
    stalled: int = 0
    hangs: int = 0
    in_flight: int = 0
    prefills: int = 0

    def freeze(self) -> KeyCounters:
        return KeyCounters(
            requests=self.requests,
            by_status=MappingProxyType(dict(self.by_status)),
            by_endpoint=MappingProxyType(dict(self.by_endpoint)),
            streams_started=self.streams_started,
            streams_completed=self.streams_completed,
            cut=self.cut,
            stalled=self.stalled,
            hangs=self.hangs,
            in_flight=self.in_flight,
            prefills=self.prefills,
        )
