"""Clients built on the keypool core: drop-in ``openai`` clients per provider, batches, probes.

``AsyncDeepSeek(api_keys=[...])`` is an ``openai.AsyncOpenAI`` whose requests all go through a key
pool; ``AsyncPooledOpenAI(provider=..., base_url=..., api_keys=[...])`` does the same for any other
OpenAI-compatible API.
"""

from ._batch import BatchItem, run_batch
from ._errors import (
    NoKeyAvailableError,
    PoolExhaustedError,
    PoolForbiddenError,
    PoolRateLimitError,
    PoolRejectedError,
    PoolTimeoutError,
    PoolUnavailableError,
    StreamInterruptedError,
    StreamStalledError,
)
from ._health import HealthReport, KeyHealth, Probe
from ._openai import AsyncPooledOpenAI, PooledOpenAI
from .deepseek import DEEPSEEK_BASE_URL, AsyncDeepSeek, DeepSeek
from .perplexity import PERPLEXITY_BASE_URL, AsyncPerplexity, Perplexity

__all__ = [
    "DEEPSEEK_BASE_URL",
    "PERPLEXITY_BASE_URL",
    "AsyncDeepSeek",
    "AsyncPerplexity",
    "AsyncPooledOpenAI",
    "BatchItem",
    "DeepSeek",
    "HealthReport",
    "KeyHealth",
    "NoKeyAvailableError",
    "Perplexity",
    "PoolExhaustedError",
    "PoolForbiddenError",
    "PoolRateLimitError",
    "PoolRejectedError",
    "PoolTimeoutError",
    "PoolUnavailableError",
    "PooledOpenAI",
    "Probe",
    "StreamInterruptedError",
    "StreamStalledError",
    "run_batch",
]
