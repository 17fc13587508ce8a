"""``keypool serve-admin``: build a pool from a TOML file (or the environment) and serve the admin API.

The TOML file::

    [[providers]]
    name = "deepseek"
    keys_env = "DEEPSEEK_API_KEYS"            # comma-separated secrets in this variable
    backup_keys_env = "DEEPSEEK_BACKUP_API_KEYS"
    backup_threshold = 0.5                    # optional

    [providers.breaker]                       # optional: any BreakerConfig field
    failure_threshold = 5
    timeout = 60

    [[providers]]
    name = "perplexity"
    keys = ["pplx-...", { secret_env = "PPLX_KEY_2", key_id = "pplx-2", weight = 2 }]

A key is a secret string or a table with ``secret`` or ``secret_env`` and optionally ``key_id``,
``weight`` and ``max_concurrency``. Prefer ``keys_env``/``secret_env``: secrets in a file end up in
backups and diffs. The admin token comes from ``KEYPOOL_ADMIN_TOKEN``; ``--protect-reads`` makes the
read endpoints (stats, capacity, ``/metrics``) need it too. Every configuration problem is reported
as one line naming the field, and the command exits with status 2; an address it cannot listen on
exits with status 1. "serving" is printed once the port is bound (``--port 0``: a free port, and
the line says which).

The access log names a key id only when it is known or looks like one: a secret pasted into a URL
by mistake appears as its fingerprint (see :func:`keypool.admin.shown_path`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._config import PoolConfig, validate
from ._errors import ConfigError

if TYPE_CHECKING:
    from ._pool import KeyPool

__all__ = ["build", "is_loopback", "load_config", "no_token_allowed", "serve_admin"]

TOKEN_ENV = "KEYPOOL_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a token
#: Providers read from the environment when no ``--config`` is given: name -> (keys, backup keys).
ENV_PROVIDERS = {
    "deepseek": ("DEEPSEEK_API_KEYS", "DEEPSEEK_BACKUP_API_KEYS"),
    "perplexity": ("PERPLEXITY_API_KEYS", "PERPLEXITY_BACKUP_API_KEYS"),
}

_PROVIDER_FIELDS = frozenset(
    {"name", "keys", "keys_env", "backup_keys", "backup_keys_env", "breaker", "backup_threshold"}
)
_KEY_FIELDS = frozenset({"secret", "secret_env", "key_id", "weight", "max_concurrency"})


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.replace("\n", ",").split(",") if part.strip()]


def _from_env(env: Mapping[str, str], var: Any, where: str) -> list[str]:
    if not isinstance(var, str) or not var:
        raise ConfigError(f"{where}: expected the name of an environment variable")
    secrets = _split(env.get(var, ""))
    if not secrets:
        raise ConfigError(f"{where}: environment variable {var!r} is not set or holds no key")
    return secrets


def _key(item: Any, where: str, tier: str, env: Mapping[str, str]) -> dict[str, Any]:
    if isinstance(item, str):
        return {"secret": item, "tier": tier}
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: expected a secret string or a table, got {type(item).__name__}")
    unknown = sorted(set(item) - _KEY_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {', '.join(sorted(_KEY_FIELDS))}")
    spec = {k: v for k, v in item.items() if k not in {"secret", "secret_env"}}
    if ("secret" in item) == ("secret_env" in item):
        raise ConfigError(f"{where}: give exactly one of 'secret' and 'secret_env'")
    if "secret_env" in item:
        secret = env.get(item["secret_env"], "").strip() if isinstance(item["secret_env"], str) else ""
        if not secret:
            raise ConfigError(
                f"{where}.secret_env: environment variable {item['secret_env']!r} is not set or empty"
            )
        spec["secret"] = secret
    else:
        spec["secret"] = item["secret"]
    spec["tier"] = tier
    return spec


def _keys(table: Mapping[str, Any], field: str, where: str, tier: str, env: Mapping[str, str]) -> list[Any]:
    literal, from_env = table.get(field), table.get(f"{field}_env")
    if literal is not None and from_env is not None:
        raise ConfigError(f"{where}: give {field!r} or {field + '_env'!r}, not both")
    if from_env is not None:
        return [{"secret": s, "tier": tier} for s in _from_env(env, from_env, f"{where}.{field}_env")]
    if literal is None:
        return []
    if not isinstance(literal, list):
        raise ConfigError(f"{where}.{field}: expected a list of keys")
    return [_key(item, f"{where}.{field}[{i}]", tier, env) for i, item in enumerate(literal)]


def _provider(table: Any, where: str, env: Mapping[str, str]) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table ([[providers]])")
    unknown = sorted(set(table) - _PROVIDER_FIELDS)
    if unknown:
        allowed = ", ".join(sorted(_PROVIDER_FIELDS))
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {allowed}")
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: expected the provider's name")
    where = f"{where} ({name})"
    keys = _keys(table, "keys", where, "primary", env)
    if not keys:
        raise ConfigError(f"{where}: no keys; set 'keys' or 'keys_env'")
    keys += _keys(table, "backup_keys", where, "backup", env)
    provider: dict[str, Any] = {"name": name, "keys": keys}
    for field in ("breaker", "backup_threshold"):
        if field in table:
            provider[field] = table[field]
    return provider


def config_from_mapping(
    data: Mapping[str, Any], env: Mapping[str, str], source: str = "config"
) -> PoolConfig:
    """A validated :class:`PoolConfig` from parsed TOML; raises :class:`ConfigError` naming the field."""
    unknown = sorted(set(data) - {"providers"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level field(s) {unknown}; allowed: providers")
    tables = data.get("providers")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{source}: no [[providers]] table")
    providers = [_provider(t, f"{source}: providers[{i}]", env) for i, t in enumerate(tables)]
    try:
        return validate(PoolConfig, {"providers": providers})
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def config_from_env(env: Mapping[str, str]) -> PoolConfig:
    """Providers from ``DEEPSEEK_API_KEYS`` / ``PERPLEXITY_API_KEYS`` (and their ``_BACKUP_`` twins)."""
    providers: list[dict[str, Any]] = []
    for name, (var, backup_var) in ENV_PROVIDERS.items():
        secrets = _split(env.get(var, ""))
        if not secrets:
            continue
        keys: list[dict[str, Any]] = [{"secret": s, "tier": "primary"} for s in secrets]
        keys += [{"secret": s, "tier": "backup"} for s in _split(env.get(backup_var, ""))]
        providers.append({"name": name, "keys": keys})
    if not providers:
        names = " or ".join(var for var, _ in ENV_PROVIDERS.values())
        raise ConfigError(
            f"no --config file given and neither {names} is set; pass --config FILE.toml "
            "or export comma-separated keys in one of those variables"
        )
    try:
        return validate(PoolConfig, {"providers": providers})
    except ConfigError as exc:
        raise ConfigError(f"environment: {exc}") from None


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> PoolConfig:
    """The pool configuration from a TOML file, or from the environment when ``path`` is ``None``."""
    environ = os.environ if env is None else env
    if path is None:
        return config_from_env(environ)
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the config file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: the config file is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return config_from_mapping(data, environ, str(file))


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # any other host name may resolve to a public address


def no_token_allowed(host: str, token: str | None, insecure_no_token: bool) -> bool:
    """Decide whether the admin API may run without a token (``allow_no_token``).

    With a token: ``False`` (the token protects it). Without one: ``True`` only for
    ``--insecure-no-token`` on a loopback host; otherwise raise :class:`ConfigError` saying why.
    """
    if token:
        return False
    if not insecure_no_token:
        raise ConfigError(
            f"{TOKEN_ENV} is not set: the admin API can reset breakers and change settings, so it "
            f"needs a token (export {TOKEN_ENV}=<a long random string>; or, for a local test only, "
            "pass --insecure-no-token with --host 127.0.0.1)"
        )
    if not is_loopback(host):
        raise ConfigError(
            f"--insecure-no-token is only allowed on a loopback host (127.0.0.1, ::1, localhost), "
            f"not {host!r}: set {TOKEN_ENV} to serve on other addresses"
        )
    return True


def build(
    config: str | os.PathLike[str] | None,
    host: str,
    port: int,
    insecure_no_token: bool,
    env: Mapping[str, str] | None = None,
    *,
    protect_reads: bool = False,
) -> tuple[KeyPool, Any]:
    """The pool and the admin app ``serve_admin`` would serve; raises :class:`ConfigError`."""
    from ._pool import KeyPool

    environ = os.environ if env is None else env
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port: expected 0..65535, got {port}")
    token = environ.get(TOKEN_ENV, "").strip() or None
    allow = no_token_allowed(host, token, insecure_no_token)
    if protect_reads and token is None:
        raise ConfigError(f"--protect-reads: the read endpoints would need {TOKEN_ENV}, which is not set")
    pool = KeyPool(load_config(config, environ))
    try:
        import uvicorn  # noqa: F401 - fail here, with the config errors, if the extra is missing

        from .admin import create_app
    except ImportError as exc:
        raise ConfigError(
            f"the admin API needs the 'admin' extra (pip install 'keypool[admin]'): {exc}"
        ) from None
    app = create_app(
        pool, token=token, protect_reads=protect_reads, allow_no_token=allow, registry=_process_registry()
    )
    return pool, _AccessLog(app, pool)


class _AccessLog:
    """One log line per request (client, method, path, status), with :func:`shown_path`'s paths:
    uvicorn's own access log would print a secret pasted into a URL as it is."""

    def __init__(self, app: Any, pool: KeyPool) -> None:
        self.app = app
        self.pool = pool
        self.log = logging.getLogger("keypool.admin.access")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app fails before it answers

        async def send_noting_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            from .admin import shown_path

            client = scope.get("client")
            who = f"{client[0]}:{client[1]}" if client else "-"
            path = shown_path(scope.get("path", ""), self.pool.key_ids())
            self.log.info('%s - "%s %s" %d', who, scope.get("method", ""), path, status)


def _process_registry() -> Any:
    """A registry of the pool plus this process's own metrics (CPU, memory, GC, Python version)."""
    from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def serve_admin(
    *,
    config: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    insecure_no_token: bool = False,
    protect_reads: bool = False,
) -> int:
    """Run the admin API until interrupted; the exit status (2 for a configuration error, 1 when
    the address cannot be listened on)."""
    try:
        pool, app = build(config, host, port, insecure_no_token, protect_reads=protect_reads)
    except ConfigError as exc:
        print(f"keypool serve-admin: {exc}", file=sys.stderr)
        return 2
    try:
        sock = _listen(host, port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(
            f"keypool serve-admin: --host/--port: cannot listen on {host}:{port}: {reason}", file=sys.stderr
        )
        return 1
    if not os.environ.get(TOKEN_ENV, "").strip():  # build() allowed it: --insecure-no-token, loopback
        guarded = "no token"
        print("keypool serve-admin: WARNING: mutations need no token (loopback only)", file=sys.stderr)
    else:
        guarded = "reads and changes need the token" if protect_reads else "changes need the token"
    summary = ", ".join(f"{p} ({len(pool.key_ids(p))} keys)" for p in pool.providers)
    bound_host, bound_port = sock.getsockname()[:2]
    where = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(
        f"keypool serve-admin: serving {summary} on http://{where}:{bound_port} ({guarded})", file=sys.stderr
    )
    _run(app, sock)
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (bound before "serving" is printed).

    ``proto=IPPROTO_TCP`` matters: asyncio turns on ``TCP_NODELAY`` for accepted sockets only when
    their protocol says TCP, and without it a keep-alive client waits ~40 ms (Nagle against
    delayed ACKs) for the body of every answer written after its headers.
    """
    name = host.strip().strip("[]")
    family = socket.AF_INET6 if ":" in name else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((name, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _run(app: Any, sock: socket.socket) -> None:  # pragma: no cover - serves until interrupted
    import uvicorn

    # The admin API's audit trail (resets, config changes, refused tokens) and its access log
    # (paths with secrets fingerprinted), next to uvicorn's lines.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger = logging.getLogger("keypool")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=False))
    with sock:
        server.run(sockets=[sock])
