"""A private ``redis-server`` for tests: started on a free loopback port in a temp dir, stopped,
restarted on the same port (state lost, as after a real restart), paused (SIGSTOP: a Redis that
answers nothing) and resumed.

Tests never touch a Redis they did not start. Without ``redis-server`` on PATH the tests that need
it skip, naming Debian's ``redis-server`` package; with ``CI=true`` they fail instead.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOOPBACK", "RedisServer", "free_port", "redis_server_binary", "running_redis"]

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def redis_server_binary() -> str:
    """The path of ``redis-server``; skips the calling test without it (fails under ``CI=true``)."""
    import pytest

    path = shutil.which("redis-server")
    if path is not None:
        return path
    message = (
        "`redis-server` is not on PATH; it comes with Debian's `redis-server` package "
        "(apt-get install redis-server)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; it is required when CI=true", pytrace=False)
    pytest.skip(message)


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port``, no persistence, its own temp dir."""

    def __init__(self, binary: str = "redis-server", *extra: str, port: int | None = None) -> None:
        self.binary = binary
        self.extra = extra
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="keypool-redis-")
        self._proc: subprocess.Popen[bytes] | None = None
        self.password: str | None = None
        self._at_exit = False
        if "--requirepass" in extra:
            self.password = extra[extra.index("--requirepass") + 1]

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

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
            with socket.create_connection((LOOPBACK, self.port), timeout=timeout) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
        except OSError:
            return False
        return reply.startswith((b"+PONG", b"-NOAUTH"))

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


def running_redis(*extra: str) -> Iterator[RedisServer]:
    """A module fixture's body: a private server for the whole module, closed afterwards."""
    server = RedisServer(redis_server_binary(), *extra)
    server.start()
    try:
        yield server
    finally:
        server.close()
