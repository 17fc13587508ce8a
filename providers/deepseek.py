"""DeepSeek over a key pool: ``AsyncDeepSeek`` / ``DeepSeek`` are ``openai`` clients.

A 402 (insufficient balance) quarantines the key with reason ``quota``; ``reasoning_content`` from
``deepseek-reasoner`` passes through untouched; health probes use ``GET /user/balance``, which also
tells an exhausted key from a working one. Keys come from ``api_keys=`` or ``DEEPSEEK_API_KEYS``
(comma-separated), falling back to ``DEEPSEEK_API_KEY``.
"""

from __future__ import annotations

from typing import ClassVar

from ._health import Probe
from ._openai import AsyncPooledOpenAI, PooledOpenAI

__all__ = ["DEEPSEEK_BASE_URL", "AsyncDeepSeek", "DeepSeek"]

DEEPSEEK_BASE_URL = "https://api.deepseek.com"


class _DeepSeekSettings:
    provider_name: ClassVar[str] = "deepseek"
    default_base_url: ClassVar[str | None] = DEEPSEEK_BASE_URL
    env_prefix: ClassVar[str | None] = "DEEPSEEK"
    probe: ClassVar[Probe] = Probe(method="GET", path="/user/balance")
    require_stream_terminator: ClassVar[bool] = True


class AsyncDeepSeek(_DeepSeekSettings, AsyncPooledOpenAI):
    """``openai.AsyncOpenAI`` for DeepSeek, every request through the pool."""


class DeepSeek(_DeepSeekSettings, PooledOpenAI):
    """``openai.OpenAI`` for DeepSeek, every request through the pool."""
