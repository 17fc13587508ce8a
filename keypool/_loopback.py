"""Serve any ASGI app on a loopback port from a background thread.

Tests need a real socket between client and server: timeouts, broken connections and
``Retry-After`` handling only behave like production over TCP, and an in-process transport buffers
whole bodies. A server running in its own thread and event loop keeps answering while the test
blocks on a synchronous client or runs its own event loop. The server binds the same port again
after :meth:`LoopbackServer.stop`, so a test can kill a replica and bring it back at the same URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import math
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import anyio
import anyio.to_thread
import httpx2

if TYPE_CHECKING:
    import uvicorn

__all__ = ["ASGIApp", "DropConnection", "LoopbackServer", "serve_asgi"]

ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]

_POLL = 0.005  # seconds between readiness checks
_HARD_STOP = 10.0  # seconds to wait for the server thread once connections are dropped


class DropConnection(httpx2.RemoteProtocolError):
    """Raised by an ASGI app to drop its connection mid-response on purpose.

    Over a socket the server closes the connection without logging a traceback, so the client sees
    an incomplete body. In-process (``httpx2.ASGITransport``) the exception reaches the client
    directly; it is a ``RemoteProtocolError`` so both paths surface as the same transport error.
    """

    def __init__(self, message: str = "connection dropped on purpose by the test server") -> None:
        super().__init__(message)


class _QuietDrops(logging.Filter):
    """Hide uvicorn's "Exception in ASGI application" record for deliberate drops only."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, DropConnection)


_QUIET_DROPS = _QuietDrops()


def _install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if _QUIET_DROPS not in logger.filters:
        logger.addFilter(_QUIET_DROPS)


def _loopback_host(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host must be a loopback IP address, got {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"host must be a loopback address, got {host!r}")
    return str(address)


@dataclass
class _Run:
    """One start/stop cycle: the uvicorn server, its thread and its event loop."""

    server: uvicorn.Server
    thread: threading.Thread | None = None
    loop: asyncio.AbstractEventLoop | None = None
    error: BaseException | None = None


class LoopbackServer:
    """Run an ASGI app under uvicorn on ``127.0.0.1`` (or another loopback address).

    Use it as a context manager, sync or async::

        with LoopbackServer(app) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="sk-a")

    ``stop()`` gives in-flight requests ``shutdown_timeout`` seconds, then drops their connections,
    so a request stuck in a hanging handler cannot keep the server (or the test) alive.
    ``start()`` after ``stop()`` serves on the same port again.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        shutdown_timeout: float = 1.0,
        startup_timeout: float = 10.0,
        lifespan: Literal["auto", "on", "off"] = "auto",
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        if shutdown_timeout < 0 or startup_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self._app = app
        self._host = _loopback_host(host)
        self._port = port
        self._shutdown_timeout = shutdown_timeout
        self._startup_timeout = startup_timeout
        self._lifespan: Literal["auto", "on", "off"] = lifespan
        self._lock = threading.Lock()
        self._run: _Run | None = None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port; known once the server has started at least once."""
        if self._port == 0:
            raise RuntimeError("the server has not been started yet: no port is bound")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` without a trailing slash; append ``/v1`` if the client needs it."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        run = self._run
        return run is not None and run.thread is not None and run.thread.is_alive()

    def start(self) -> Self:
        """Bind the port (the same one as before, after a stop) and wait until it accepts."""
        import uvicorn

        with self._lock:
            if self._run is not None:
                raise RuntimeError("the server is already running")
            _install_log_filter()
            sock = self._bind()
            config = uvicorn.Config(
                self._app,
                host=self._host,
                port=self._port,
                http="h11",
                loop="asyncio",
                lifespan=self._lifespan,
                log_config=None,
                log_level="warning",
                access_log=False,
                server_header=False,
                # Last resort for apps that ignore disconnects: uvicorn cancels their tasks.
                timeout_graceful_shutdown=math.ceil(self._shutdown_timeout) + 2,
            )
            run = _Run(server=uvicorn.Server(config))
            run.thread = threading.Thread(
                target=self._serve,
                args=(run, sock),
                name=f"keypool-loopback-{self._port}",
                daemon=True,
            )
            self._run = run
            run.thread.start()
            deadline = time.monotonic() + self._startup_timeout
            while not run.server.started:
                if not run.thread.is_alive() or time.monotonic() > deadline:
                    self._run = None
                    run.server.should_exit = True
                    run.thread.join(self._startup_timeout)
                    sock.close()
                    raise RuntimeError(f"the loopback server did not start on {self.base_url}") from (
                        run.error
                    )
                time.sleep(_POLL)
        return self

    def stop(self) -> None:
        """Stop serving: finish in-flight requests within ``shutdown_timeout``, then drop them."""
        with self._lock:
            run, self._run = self._run, None
            if run is None or run.thread is None:
                return
            run.server.should_exit = True
            run.thread.join(self._shutdown_timeout + 0.3)
            if run.thread.is_alive() and run.loop is not None:
                # RuntimeError: the loop closed meanwhile, so the thread is finishing anyway.
                with contextlib.suppress(RuntimeError):
                    run.loop.call_soon_threadsafe(_drop_connections, run.server)
                run.thread.join(_HARD_STOP)
            if run.thread.is_alive():
                raise RuntimeError(f"the loopback server on {self.base_url} did not stop")

    def restart(self) -> Self:
        """Stop, then start again on the same port."""
        self.stop()
        return self.start()

    async def astart(self) -> Self:
        """:meth:`start` from async code without blocking the caller's event loop."""
        await anyio.to_thread.run_sync(self.start)
        return self

    async def astop(self) -> None:
        """:meth:`stop` from async code without blocking the caller's event loop."""
        await anyio.to_thread.run_sync(self.stop)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    def __repr__(self) -> str:
        where = f"{self._host}:{self._port}" if self._port else self._host
        state = "running" if self.running else "stopped"
        return f"LoopbackServer({where}, {state})"

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        deadline = time.monotonic() + self._startup_timeout
        while True:
            # proto=IPPROTO_TCP matters: asyncio enables TCP_NODELAY on accepted sockets only when
            # the listener says TCP explicitly; without it every response waits ~40 ms (Nagle).
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self._host, self._port))
            except OSError as exc:
                sock.close()
                # A restart can race the previous listener's teardown: retry briefly.
                if exc.errno != errno.EADDRINUSE or self._port == 0:
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(_POLL * 4)
                continue
            self._port = int(sock.getsockname()[1])
            return sock

    @staticmethod
    def _serve(run: _Run, sock: socket.socket) -> None:
        async def main() -> None:
            run.loop = asyncio.get_running_loop()
            await run.server.serve(sockets=[sock])

        try:
            asyncio.run(main())
        except BaseException as exc:  # uvicorn exits with SystemExit when startup fails
            run.error = exc
        finally:
            sock.close()


def _drop_connections(server: uvicorn.Server) -> None:
    """Abort every open connection: handlers waiting on ``receive()`` see a disconnect."""
    for connection in list(server.server_state.connections):
        transport = getattr(connection, "transport", None)
        if transport is not None:
            transport.abort()


def serve_asgi(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    shutdown_timeout: float = 1.0,
) -> LoopbackServer:
    """Return an unstarted :class:`LoopbackServer`; enter it with ``with`` or ``async with``."""
    return LoopbackServer(app, host=host, port=port, shutdown_timeout=shutdown_timeout)
