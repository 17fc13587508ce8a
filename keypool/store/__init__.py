"""Where breaker state can be shared: between pools of one process, or across processes on Redis.

Without a store a pool keeps its breakers to itself (the embedded default). With one, every pool
bound to it agrees on which keys are open, when they reopen, how many trial calls run at once, and
which keys are throttled or quarantined.
"""

from ._base import SharedStore, SharedView, StoreUnavailable
from ._memory import MemoryStore
from ._model import SharedBreaker

__all__ = ["MemoryStore", "RedisStore", "SharedBreaker", "SharedStore", "SharedView", "StoreUnavailable"]


def __getattr__(name: str) -> object:
    if name == "RedisStore":  # needs the ``redis`` extra: imported only when asked for
        from ._redis import RedisStore

        return RedisStore
    raise AttributeError(name)
