"""DeepSeek over a key pool: ``AsyncDeepSeek`` / ``DeepSeek`` are ``openai`` clients.

A 402 (insufficient balance) quarantines the key with reason ``quota``; ``reasoning_content`` from
``deepseek-reasoner`` passes through untouched; health probes use ``GET /user/balance``, which also
tells an exhausted key from a working one. Keys come from ``api_keys=`` or ``DEEPSEEK_API_KEYS``
(comma-separated), falling back to ``DEEPSEEK_API_KEY``.
"""

from __future__ import annotations

import json
from typing import ClassVar

from keypool import CallSettings

from ._health import Probe
from ._openai import AsyncPooledOpenAI, PooledOpenAI

__all__ = ["DEEPSEEK_BASE_URL", "AsyncDeepSeek", "DeepSeek"]

DEEPSEEK_BASE_URL = "https://api.deepseek.com"


def _balance_status(status: int, body: bytes) -> int:
    """``/user/balance`` answers 200 even for an empty balance: ``is_available: false`` means 402."""
    if status != 200:
        return status
    try:
        balance = json.loads(body)
    except ValueError:
        return status
    if isinstance(balance, dict) and balance.get("is_available") is False:
        return 402
    return status


class _DeepSeekSettings:
    provider_name: ClassVar[str] = "deepseek"
    default_base_url: ClassVar[str | None] = DEEPSEEK_BASE_URL
    env_prefix: ClassVar[str | None] = "DEEPSEEK"
    probe: ClassVar[Probe] = Probe(method="GET", path="/user/balance", status_of=_balance_status)
    require_stream_terminator: ClassVar[bool] = True
    # DeepSeek answers at once and keeps a waiting call alive with empty lines (or ``: keep-alive``
    # comments when streaming), so a key that sends no headers within 30 s is failed over.
    # A broken answer is finished with DeepSeek's chat prefix completion (its beta API).
    default_settings: ClassVar[CallSettings] = CallSettings(headers_timeout=30.0, prefill="deepseek")


class AsyncDeepSeek(_DeepSeekSettings, AsyncPooledOpenAI):
    """``openai.AsyncOpenAI`` for DeepSeek, every request through the pool."""


class DeepSeek(_DeepSeekSettings, PooledOpenAI):
    """``openai.OpenAI`` for DeepSeek, every request through the pool."""
