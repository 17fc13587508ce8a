"""Caller keys: stored as salted scrypt hashes, checked once, then remembered by a keyed digest.

A key made by :func:`new_caller_key` looks like ``kp-<id>-<secret>``: the ``id`` is a public
lookup index (random, not derived from the secret) that the stored hash repeats, so a wrong key
costs at most one slow hash, and a key with an unknown id costs none. Keys chosen by hand (any
other form) are checked against every hash without an id. A verified key is then remembered
under an HMAC with a per-process random secret, so the hot path costs one fast digest; refused
keys are remembered the same way (boundedly) so guessing cannot make the gateway hash in a loop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import anyio

from keypool import ConfigError

__all__ = ["Caller", "CallerKeys", "hash_caller_key", "new_caller_key", "verify_caller_key"]

Priority = str  # "critical" | "normal" | "low", checked by the config
PRIORITIES = ("critical", "normal", "low")

_SCHEME = "scrypt"
_N, _R, _P = 2**14, 8, 1  # ~40 ms per check: slow for a guesser, fine once per key per process
_KEY_FORM = re.compile(r"^kp-([0-9a-f]{8})-[A-Za-z0-9_-]{20,}$")
_ID_FORM = re.compile(r"^[0-9a-f]{8}$")
_REFUSED_MEMORY = 4096


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_caller_key() -> str:
    """A fresh random caller key ``kp-<id>-<secret>`` (256 bits of secret)."""
    return f"kp-{secrets.token_hex(4)}-{secrets.token_urlsafe(32)}"


def _lookup_id(key: str) -> str:
    match = _KEY_FORM.match(key)
    return match.group(1) if match else ""


def hash_caller_key(key: str, *, n: int = _N, r: int = _R, p: int = _P) -> str:
    """The string to store for ``key``: ``scrypt$<id>$<n>$<r>$<p>$<salt>$<digest>``."""
    if not key or key != key.strip():
        raise ConfigError("key: a caller key must be non-empty and have no surrounding whitespace")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(key.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"{_SCHEME}${_lookup_id(key)}${n}${r}${p}${_b64(salt)}${_b64(digest)}"


@dataclass(frozen=True, slots=True)
class _Hash:
    lookup_id: str
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def parse_hash(stored: str, where: str) -> _Hash:
    """The parts of a stored hash; :class:`ConfigError` naming ``where`` if it is malformed."""
    parts = stored.split("$") if isinstance(stored, str) else []
    problem = f"{where}: expected a hash printed by 'keypool hash-key' (scrypt$id$n$r$p$salt$digest)"
    if len(parts) != 7 or parts[0] != _SCHEME:
        raise ConfigError(problem)
    lookup_id, n, r, p, salt, digest = parts[1:]
    if lookup_id and not _ID_FORM.match(lookup_id):
        raise ConfigError(problem)
    try:
        parsed = _Hash(lookup_id, int(n), int(r), int(p), _unb64(salt), _unb64(digest))
    except ValueError:
        raise ConfigError(problem) from None
    if parsed.n < 2**10 or parsed.n & (parsed.n - 1) or not 1 <= parsed.r <= 32 or not 1 <= parsed.p <= 16:
        raise ConfigError(
            f"{where}: scrypt parameters out of range (n a power of two >= 1024, r 1..32, p 1..16)"
        )
    if len(parsed.salt) < 8 or len(parsed.digest) != 32:
        raise ConfigError(problem)
    return parsed


def _matches(key: str, stored: _Hash) -> bool:
    digest = hashlib.scrypt(
        key.encode(),
        salt=stored.salt,
        n=stored.n,
        r=stored.r,
        p=stored.p,
        dklen=len(stored.digest),
        maxmem=2**27,
    )
    return hmac.compare_digest(digest, stored.digest)


def verify_caller_key(key: str, stored: str) -> bool:
    """Whether ``key`` is the one ``stored`` was made from (constant-time compare)."""
    return _matches(key, parse_hash(stored, "key_hash"))


@dataclass(frozen=True, slots=True)
class Caller:
    """A configured caller: its name (the only thing logs and metrics show), models, priority."""

    name: str
    key_hash: str
    models: frozenset[str] | None  # None: every model
    priority: Priority = "normal"

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def __repr__(self) -> str:  # the hash is not a secret, but nothing gains from printing it
        return f"Caller(name={self.name!r}, priority={self.priority!r})"


class CallerKeys:
    """Finds the caller a presented key belongs to (see the module docstring for the cost)."""

    def __init__(self, callers: Sequence[Caller]) -> None:
        self._pepper = secrets.token_bytes(32)
        self._by_id: dict[str, list[tuple[Caller, _Hash]]] = {}
        for i, caller in enumerate(callers):
            parsed = parse_hash(caller.key_hash, f"callers[{i}] ({caller.name}).key_hash")
            self._by_id.setdefault(parsed.lookup_id, []).append((caller, parsed))
        self._known: dict[bytes, Caller] = {}
        self._refused: OrderedDict[bytes, None] = OrderedDict()
        self._limiter = anyio.CapacityLimiter(2)  # slow checks at once: a flood waits, the loop runs

    @property
    def callers(self) -> Iterable[Caller]:
        for entries in self._by_id.values():
            for caller, _ in entries:
                yield caller

    def _tag(self, key: str) -> bytes:
        return hmac.new(self._pepper, key.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()

    def cached(self, key: str) -> tuple[bool, Caller | None]:
        """``(known, caller)``: whether the answer for this key is remembered, and what it is."""
        tag = self._tag(key)
        caller = self._known.get(tag)
        if caller is not None:
            return True, caller
        return tag in self._refused, None

    def check(self, key: str) -> Caller | None:
        """The slow path: hash ``key`` against its candidates and remember the answer."""
        tag = self._tag(key)
        found = None
        for caller, stored in self._by_id.get(_lookup_id(key), ()):
            if _matches(key, stored):
                found = caller
                break
        if found is not None:
            self._known[tag] = found
        else:
            self._refused[tag] = None
            while len(self._refused) > _REFUSED_MEMORY:
                self._refused.popitem(last=False)
        return found

    async def authenticate(self, key: str | None) -> Caller | None:
        """The caller of ``key``, or ``None``; the slow check runs in a worker thread."""
        if not key or len(key) > 512:
            return None
        known, caller = self.cached(key)
        if known:
            return caller
        if not self._by_id.get(_lookup_id(key)):
            return None  # nothing could match: no hashing at all
        return await anyio.to_thread.run_sync(self.check, key, limiter=self._limiter)
