"""A private ``redis-server`` for tests: started on a free loopback port in a temp dir, stopped,
restarted on the same port (state lost, as after a real restart, or reloaded from a snapshot taken
with :meth:`RedisServer.snapshot`), paused (SIGSTOP: a Redis that answers nothing) and resumed;
optionally with TLS (a self-signed certificate made with ``openssl``) or a password.

:class:`TcpProxy` sits between clients and a server on loopback: it adds latency to every answer,
or cuts every connection and refuses new ones (a network partition for the clients behind it).

Tests never touch a Redis they did not start. Without ``redis-server`` (or ``openssl``) on PATH the
tests that need it skip, naming the Debian package; with ``CI=true`` they fail instead.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "LOOPBACK",
    "RedisServer",
    "TcpProxy",
    "closed_afterwards",
    "free_port",
    "redis_server_binary",
    "running_redis",
]

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _tool(name: str, package: str) -> str:
    """The path of a tool; skips the calling test without it (fails under ``CI=true``)."""
    import pytest

    path = shutil.which(name)
    if path is not None:
        return path
    message = (
        f"`{name}` is not on PATH; it comes with Debian's `{package}` package (apt-get install {package})"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; it is required when CI=true", pytrace=False)
    pytest.skip(message)


def redis_server_binary() -> str:
    """The path of ``redis-server``; skips the calling test without it (fails under ``CI=true``)."""
    return _tool("redis-server", "redis-server")


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, made with ``openssl``; the certificate is its own CA."""
    openssl = _tool("openssl", "openssl")
    cert, key = directory / "redis.crt", directory / "redis.key"
    args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
    args += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        [openssl, *args],
        check=True,
        capture_output=True,
    )
    return cert, key


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port``, no persistence, its own temp dir."""

    def __init__(
        self, binary: str = "redis-server", *extra: str, port: int | None = None, tls: bool = False
    ) -> None:
        self.binary = binary
        self.extra = extra
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="keypool-redis-")
        self._proc: subprocess.Popen[bytes] | None = None
        self.password: str | None = None
        self._at_exit = False
        if "--requirepass" in extra:
            self.password = extra[extra.index("--requirepass") + 1]
        self.certificate: Path | None = None
        self._tls_args: list[str] = []
        if tls:  # TLS only, on ``port``: the certificate is self-signed (pass it as ssl_ca_certs)
            self.certificate, key = self_signed_certificate(Path(self._dir.name))
            self._tls_args = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            self._tls_args += ["--tls-cert-file", str(self.certificate), "--tls-key-file", str(key)]

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.certificate else "redis"
        return f"{scheme}://{auth}{LOOPBACK}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir.name,
            "--logfile",
            str(Path(self._dir.name) / "redis.log"),
            *self.extra,
            *self._tls_args,
        ]
        if not self._at_exit:  # a test run that dies early must not leave a server behind
            atexit.register(self.stop)
            self._at_exit = True
        deadline = time.monotonic() + timeout
        while True:  # the port may still be held for a moment after a stop: try again
            self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._wait_ready(deadline):
                return
            self._terminate()
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}: {self.log_tail()}")
            time.sleep(0.05)

    def _wait_ready(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            if self.ping():
                return True
            time.sleep(0.01)
        return False

    def ping(self, timeout: float = 0.5) -> bool:
        """Whether the server answers PING (NOAUTH counts: it is up)."""
        try:
            return self.command(b"PING", timeout=timeout).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def command(self, *words: bytes, timeout: float = 5.0) -> bytes:
        """Send one command (authenticated if the server has a password); its raw reply."""
        request = b""
        if self.password:
            request += b"AUTH " + self.password.encode() + b"\r\n"
        request += b" ".join(words) + b"\r\n"
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(socket.create_connection((LOOPBACK, self.port), timeout=timeout))
            if self.certificate is not None:
                context = ssl.create_default_context(cafile=str(self.certificate))
                sock = stack.enter_context(context.wrap_socket(sock, server_hostname=LOOPBACK))
            sock.sendall(request)
            reply = sock.recv(4096)
            if self.password and reply.startswith(b"+OK\r\n"):
                reply = reply[5:] or sock.recv(4096)
            return reply

    def snapshot(self) -> None:
        """Write the data set to disk now (``SAVE``); the next start loads it (an older state)."""
        reply = self.command(b"SAVE")
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"SAVE failed: {reply!r}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
        self._terminate()

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def restart(self) -> None:
        """Stop, then start again on the same port: every key is gone (no persistence)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a slow Redis)."""
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGCONT)

    def log_tail(self, lines: int = 20) -> str:
        path = Path(self._dir.name) / "redis.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, running={self.running})"


def closed_afterwards() -> Iterator[list[Any]]:
    """A fixture's body: a list the test fills with stores, each closed after the test."""
    made: list[Any] = []
    yield made
    for store in made:
        store.close()


def running_redis(*extra: str) -> Iterator[RedisServer]:
    """A module fixture's body: a private server for the whole module, closed afterwards."""
    server = RedisServer(redis_server_binary(), *extra)
    server.start()
    try:
        yield server
    finally:
        server.close()


class TcpProxy:
    """A TCP proxy on loopback in front of ``target_port``, run by an event loop in a thread.

    ``latency`` seconds are added to everything the server sends back (so to every round trip);
    :meth:`cut` closes every connection and refuses new ones until :meth:`restore`.
    """

    def __init__(self, target_port: int, *, latency: float = 0.0) -> None:
        self.target_port = target_port
        self.latency = latency
        self.port = free_port()
        self.connections = 0
        self._cut = False
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._streams: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)

    def url(self, server_url: str) -> str:
        """``server_url`` with the port of this proxy."""
        return server_url.replace(f":{self.target_port}/", f":{self.port}/")

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, self.port)

    def _call(self, coro: object, timeout: float = 10.0) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    def cut(self) -> None:
        """Every connection dropped, new ones closed at once: the server is unreachable."""
        self._cut = True
        self._loop.call_soon_threadsafe(self._drop_all)

    def restore(self) -> None:
        self._cut = False

    def _drop_all(self) -> None:
        for writer in list(self._streams):
            writer.transport.abort()
        self._streams.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._streams.update((writer, up_writer))
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, 0.0), self._pipe(up_reader, writer, self.latency)
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                self._streams.discard(w)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        """Copy bytes; with a delay, each chunk goes out ``delay`` after it came in, in order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    return
                wait = due - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                chunk = await reader.read(65536)
                queue.put_nowait((self._loop.time() + delay, chunk))
                if not chunk:
                    break
            await sender
        finally:
            sender.cancel()
            writer.transport.abort()

    def stop(self) -> None:
        async def close() -> None:
            self._drop_all()
            if self._server is not None:
                self._server.close()

        with contextlib.suppress(Exception):
            self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
