"""Reading keys from the environment: ``NAME_API_KEYS`` (comma-separated) or ``NAME_API_KEY``."""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["keys_from_env"]


def keys_from_env(prefix: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """Secrets from ``{prefix}_API_KEYS`` (comma-separated), else ``{prefix}_API_KEY``; may be empty."""
    env = os.environ if environ is None else environ
    many = env.get(f"{prefix}_API_KEYS", "")
    keys = [k.strip() for k in many.split(",") if k.strip()]
    if keys:
        return keys
    single = env.get(f"{prefix}_API_KEY", "").strip()
    return [single] if single else []
