"""Operators' changes that every pool sharing a store applies: breaker config (global, per
provider, per key), backup rotation, keys added and removed.

A pool that makes such a change applies it, then hands the store an *entry* (plain JSON). The
store appends it to one log shared by every pool (a Redis list, or a list in memory) and tells
the others, which apply the entries they have not seen yet, in log order, so every pool ends on
the same configuration, and a pool that starts later replays the log and adopts it. Applying an
entry is idempotent (a key added twice is added once), so a pool may safely see its own entries
come back. Reset, trip and quarantine need no entry: they are breaker state, shared already.

An added key's entry carries its secret (other pools must be able to call with it): on Redis it
is as safe as the Redis that holds it (use a password and TLS).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from .._config import KeySpec, validate
from .._errors import KeyPoolError

if TYPE_CHECKING:
    from .._pool import KeyPool

__all__ = ["apply", "backup_entry", "config_entry", "key_added_entry", "key_removed_entry"]

log = logging.getLogger("keypool.store")

Entry = dict[str, Any]


def config_entry(changes: Mapping[str, Any], provider: str | None, key_id: str | None) -> Entry:
    return {"op": "config", "provider": provider, "key_id": key_id, "changes": dict(changes)}


def backup_entry(provider: str, active: bool | None) -> Entry:
    return {"op": "backup", "provider": provider, "active": active}


def key_added_entry(provider: str, spec: KeySpec) -> Entry:
    key = {
        "secret": spec.secret.get_secret_value(),
        "key_id": spec.id,
        "weight": spec.weight,
        "tier": spec.tier,
        "max_concurrency": spec.max_concurrency,
    }
    return {"op": "add_key", "provider": provider, "key": key}


def key_removed_entry(provider: str, key_id: str) -> Entry:
    return {"op": "remove_key", "provider": provider, "key_id": key_id}


def apply(pool: KeyPool, entry: Mapping[str, Any]) -> tuple[str, str] | None:
    """Apply another pool's change to ``pool`` (no sharing again); the (provider, key id) of a key
    it adds, whose shared breaker state the store then merges. A change that does not fit this
    pool (a provider or key it lacks) is logged and skipped: the other pools still apply it."""
    op = entry.get("op")
    try:
        if op == "config":
            pool._update_config(entry["changes"], provider=entry.get("provider"), key_id=entry.get("key_id"))
        elif op == "backup":
            pool._activate_backup(str(entry["provider"]), entry.get("active"))
        elif op == "add_key":
            provider, raw = str(entry["provider"]), dict(entry["key"])
            spec = validate(KeySpec, {**raw, "secret": SecretStr(str(raw["secret"]))})
            if spec.id not in pool.key_ids(provider):
                pool._add_key_now(provider, spec)
            return provider, spec.id
        elif op == "remove_key":
            provider, key_id = str(entry["provider"]), str(entry["key_id"])
            if key_id in pool.key_ids(provider):
                pool._remove_key_now(provider, key_id)
        else:
            log.warning("keypool: unknown shared admin change %r skipped", op)
    except (KeyPoolError, KeyError, TypeError, ValueError) as exc:
        log.warning("keypool: shared admin change %r not applied here: %s", op, exc)
    return None
