"""keypool: a pool of API keys per provider, a circuit breaker per key, and routing that fails over.

The public API is everything in ``__all__``; modules starting with ``_`` are private.
"""

import logging as _logging

from ._breaker import BreakerSnapshot, BreakerState, CircuitBreaker, OpenReason, Permit, Transition
from ._budget import RequestBudget, current_budget, request_budget
from ._capacity import AccountCapacity, Capacity, CapacityStatus, TierCapacity
from ._clock import Clock, MonotonicClock
from ._config import BreakerConfig, KeySpec, PoolConfig, ProviderConfig, fingerprint
from ._continuation import Prefill, Splice, continuation_body, continuation_path, continuation_request
from ._errors import (
    ConfigError,
    KeyPoolError,
    LoadShed,
    NoKeyAvailable,
    StreamInterrupted,
    UnknownKeyError,
    UnknownProviderError,
)
from ._eventlog import EventLog
from ._events import (
    BackupTierChanged,
    CallRecorded,
    CallRejected,
    Hook,
    KeyStateChanged,
    PoolEvent,
)
from ._lease import Lease
from ._outcome import Outcome, OutcomeKind, classify_exception, classify_status, parse_retry_after
from ._policy import CallSettings
from ._pool import KeyPool
from ._sse import EventScanner, Grammar, grammar_of
from ._transport import KeyPoolTransport, SyncKeyPoolTransport

__version__ = "0.1.0"

# A library logs to its own logger and leaves output to the application.
_logging.getLogger("keypool").addHandler(_logging.NullHandler())

__all__ = [
    "AccountCapacity",
    "BackupTierChanged",
    "BreakerConfig",
    "BreakerSnapshot",
    "BreakerState",
    "CallRecorded",
    "CallRejected",
    "CallSettings",
    "Capacity",
    "CapacityStatus",
    "CircuitBreaker",
    "Clock",
    "ConfigError",
    "EventLog",
    "EventScanner",
    "Grammar",
    "Hook",
    "KeyPool",
    "KeyPoolError",
    "KeyPoolTransport",
    "KeySpec",
    "KeyStateChanged",
    "Lease",
    "LoadShed",
    "MonotonicClock",
    "NoKeyAvailable",
    "OpenReason",
    "Outcome",
    "OutcomeKind",
    "Permit",
    "PoolConfig",
    "PoolEvent",
    "Prefill",
    "ProviderConfig",
    "RequestBudget",
    "Splice",
    "StreamInterrupted",
    "SyncKeyPoolTransport",
    "TierCapacity",
    "Transition",
    "UnknownKeyError",
    "UnknownProviderError",
    "__version__",
    "classify_exception",
    "classify_status",
    "continuation_body",
    "continuation_path",
    "continuation_request",
    "current_budget",
    "fingerprint",
    "grammar_of",
    "parse_retry_after",
    "request_budget",
]
