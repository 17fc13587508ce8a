"""``keypool serve``: build the gateway from its TOML and run it under uvicorn.

The pool keeps its breakers in memory, or on Redis when ``KEYPOOL_REDIS_URL`` is set (needed for
``--workers`` above 1, so the workers agree on which keys are out). The admin API and ``/metrics``
are served on the gateway's port, or on ``--admin-port``, with ``KEYPOOL_ADMIN_TOKEN`` (the same
rules as ``serve-admin``). Configuration problems print one line naming the field and exit 2; an
address that cannot be listened on exits 1. "serving" is printed once the port is bound.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx2

from keypool import ConfigError, KeyPool
from keypool._serve import TOKEN_ENV, _listen, _process_registry, is_loopback, no_token_allowed

from ._app import Gateway
from ._config import GatewayConfig, load_gateway_config

__all__ = ["GatewayOptions", "build_gateway", "serve_gateway", "worker_app"]

REDIS_ENV = "KEYPOOL_REDIS_URL"
_OPTIONS_ENV = "KEYPOOL_GATEWAY_OPTIONS"  # how a worker process learns what its parent was asked


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    config: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    admin_port: int | None = None
    protect_reads: bool = False
    insecure_no_token: bool = False

    def encode(self) -> str:
        import json

        return json.dumps({name: getattr(self, name) for name in self.__slots__})

    @classmethod
    def decode(cls, text: str) -> GatewayOptions:
        import json

        return cls(**json.loads(text))


def _store(env: Mapping[str, str]) -> Any:
    url = env.get(REDIS_ENV, "").strip()
    if not url:
        return None
    try:
        from keypool.store._redis import RedisStore
    except ImportError as exc:  # pragma: no cover - the redis extra is missing
        raise ConfigError(f"{REDIS_ENV}: the Redis store needs the 'redis' extra: {exc}") from None
    return RedisStore(url)


def build_gateway(
    config: GatewayConfig,
    *,
    token: str | None,
    allow_no_token: bool,
    protect_reads: bool = False,
    mount_admin: bool = True,
    store: Any = None,
    transports: Mapping[str, httpx2.AsyncBaseTransport] | None = None,
    registry: Any = None,
) -> tuple[Gateway, Any]:
    """The gateway app and the admin app (mounted on it when ``mount_admin``)."""
    from keypool.admin import create_app

    from ._metrics import register

    pool = KeyPool(config.pool, store=store)
    registry = registry if registry is not None else _process_registry()
    admin = create_app(
        pool, token=token, protect_reads=protect_reads, allow_no_token=allow_no_token, registry=registry
    )
    gateway = Gateway(config, pool, admin=admin if mount_admin else None, transports=transports)
    register(registry, gateway.counts, gateway.shedder)
    return gateway, admin


def _prepare(options: GatewayOptions, env: Mapping[str, str]) -> tuple[Gateway, Any, Any]:
    """The gateway, its admin app and the embedded upstream (if any) for ``options``."""
    if not 0 <= options.port <= 65535:
        raise ConfigError(f"--port: expected 0..65535, got {options.port}")
    if options.admin_port is not None and not 0 <= options.admin_port <= 65535:
        raise ConfigError(f"--admin-port: expected 0..65535, got {options.admin_port}")
    if options.workers < 1 or options.workers > 64:
        raise ConfigError(f"--workers: expected 1..64, got {options.workers}")
    token = env.get(TOKEN_ENV, "").strip() or None
    embedded = None
    if options.config is None:
        if not is_loopback(options.host):
            raise ConfigError("--config: the embedded demo (no --config) serves on a loopback host only")
        if options.workers > 1:
            raise ConfigError("--workers: the embedded demo (no --config) runs one worker; pass --config")
        from ._embedded import embedded_config, start_embedded_upstream

        embedded = start_embedded_upstream()
        config = embedded_config(f"{embedded.base_url}/v1")
        allow = token is None
    else:
        config = load_gateway_config(options.config, env)
        allow = no_token_allowed(options.host, token, options.insecure_no_token)
    if options.protect_reads and token is None:
        raise ConfigError(f"--protect-reads: the read endpoints would need {TOKEN_ENV}, which is not set")
    store = _store(env)
    if options.workers > 1 and store is None:
        raise ConfigError(f"--workers: {options.workers} workers must share breakers: set {REDIS_ENV}")
    gateway, admin = build_gateway(
        config,
        token=token,
        allow_no_token=allow,
        protect_reads=options.protect_reads,
        mount_admin=options.admin_port is None,
        store=store,
    )
    return gateway, admin, embedded


def worker_app() -> Gateway:
    """The app of one ``--workers`` process (uvicorn calls this factory in each of them)."""
    options = GatewayOptions.decode(os.environ[_OPTIONS_ENV])
    gateway, _, _ = _prepare(options, os.environ)
    return gateway


def _say(message: str) -> None:
    print(f"keypool serve: {message}", file=sys.stderr, flush=True)


def _where(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve_gateway(options: GatewayOptions) -> int:
    """Run the gateway until interrupted; the exit status."""
    try:
        gateway, admin, embedded = _prepare(options, os.environ)
    except ConfigError as exc:
        _say(str(exc))
        return 2
    try:
        sockets = [_listen(options.host, options.port)]
        if options.admin_port is not None:
            sockets.append(_listen(options.host, options.admin_port))
    except OSError as exc:
        _say(f"--host/--port: cannot listen on {options.host}: {exc.strerror or exc}")
        return 1
    config = gateway.config
    models = ", ".join(config.models)
    where = _where(sockets[0])
    extra = f", admin on {_where(sockets[1])}" if len(sockets) > 1 else ""
    shared = "breakers on Redis" if os.environ.get(REDIS_ENV, "").strip() else "breakers in memory"
    _say(
        f"serving models {models} for {len(config.callers)} caller(s) on {where} "
        f"({options.workers} worker(s), {shared}{extra})"
    )
    if embedded is not None:
        from ._embedded import DEMO_CALLER_KEY

        _say(f"embedded demo upstream at {embedded.base_url}; caller key: {DEMO_CALLER_KEY}")
        body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
        _say(
            f"try: curl -s {where}/v1/chat/completions -H 'Authorization: Bearer {DEMO_CALLER_KEY}' "
            f"-H 'content-type: application/json' -d '{body}'"
        )
    try:
        _run(gateway, admin, sockets, options)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def _logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("keypool")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _uvicorn_config(app: Any, drain: float, **more: Any) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=max(1, round(drain)),
        **more,
    )


def _run(gateway: Gateway, admin: Any, sockets: list[socket.socket], options: GatewayOptions) -> None:
    import uvicorn

    _logging()
    drain = gateway.config.settings.drain_timeout
    if options.workers > 1:
        from uvicorn.supervisors import Multiprocess

        os.environ[_OPTIONS_ENV] = GatewayOptions(**{**_fields(options), "admin_port": None}).encode()
        config = _uvicorn_config(
            "providers.gateway._serve:worker_app", drain, factory=True, workers=options.workers
        )
        Multiprocess(config, sockets=sockets[:1]).run()
        return
    servers = [(uvicorn.Server(_uvicorn_config(gateway, drain)), sockets[0])]
    if len(sockets) > 1:
        servers.append((uvicorn.Server(_uvicorn_config(admin, drain, lifespan="off")), sockets[1]))

    async def main() -> None:
        await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in servers))

    try:
        asyncio.run(main())
    finally:
        for _, sock in servers:
            sock.close()


def _fields(options: GatewayOptions) -> dict[str, Any]:
    return {name: getattr(options, name) for name in options.__slots__}
