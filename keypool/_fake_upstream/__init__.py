"""An OpenAI-compatible upstream that misbehaves per key on command.

A key pool is only as good as its reaction to a provider's bad moments: a throttled key, a revoked
key, an empty balance, a server that hangs or a stream cut halfway. :class:`FakeUpstream` is a plain
ASGI app that serves the OpenAI API shape (with DeepSeek and Perplexity flavors) and lets a test
switch a :class:`Fault` on any key while requests are in flight, then read exact per-key counters.

Order of checks for every request: the key (401 when unknown or missing), then the route (404), then
the request's content (400: invalid JSON, missing fields, or the model ``"poison"``), then the key's
fault. Bad requests therefore answer 400 whichever key sent them, like a real provider.

Secrets identify keys in the test API (:meth:`FakeUpstream.set_fault`, :meth:`FakeUpstream.counters`)
because the test knows them; they never appear in a response body, a header or a ``repr``.
"""

from __future__ import annotations

from .app import FakeUpstream
from .counters import KeyCounters
from .faults import Fault
from .validation import POISON_MODEL as POISON_MODEL

__all__ = ["FakeUpstream", "Fault", "KeyCounters"]
