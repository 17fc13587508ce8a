"""Perplexity over a key pool: ``AsyncPerplexity`` / ``Perplexity`` are ``openai`` clients.

Perplexity has no ``/models`` endpoint, so health probes send a one-token chat request; its
``citations`` and ``search_results`` ride through on the response objects untouched. Keys come from
``api_keys=`` or ``PERPLEXITY_API_KEYS`` (comma-separated), falling back to ``PERPLEXITY_API_KEY``.
"""

from __future__ import annotations

from typing import ClassVar

from ._health import Probe
from ._openai import AsyncPooledOpenAI, PooledOpenAI

__all__ = ["PERPLEXITY_BASE_URL", "AsyncPerplexity", "Perplexity"]

PERPLEXITY_BASE_URL = "https://api.perplexity.ai"


class _PerplexitySettings:
    provider_name: ClassVar[str] = "perplexity"
    default_base_url: ClassVar[str | None] = PERPLEXITY_BASE_URL
    env_prefix: ClassVar[str | None] = "PERPLEXITY"
    probe: ClassVar[Probe] = Probe(
        method="POST",
        path="/chat/completions",
        json={"model": "sonar", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1},
    )
    require_stream_terminator: ClassVar[bool] = False


class AsyncPerplexity(_PerplexitySettings, AsyncPooledOpenAI):
    """``openai.AsyncOpenAI`` for Perplexity, every request through the pool."""


class Perplexity(_PerplexitySettings, PooledOpenAI):
    """``openai.OpenAI`` for Perplexity, every request through the pool."""
