"""A fleet of OS processes (``spawn``), each running ``target(*args, conn)`` and answering
commands sent over its end of a pipe with ``("ok", value)`` or ``("error", traceback)``. The
first message of each is its "ready". This is a helper module, not a test module."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["Fleet"]


class Fleet:
    """``size`` processes; ``args(barrier)`` gives each its arguments before the connection;
    ``namespace`` is the store namespace they share (for the tests' own look at Redis)."""

    def __init__(
        self,
        size: int,
        target: Callable[..., None],
        args: Callable[[Any], tuple[Any, ...]],
        namespace: str = "",
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.size = size
        self.namespace = namespace
        self.barrier = ctx.Barrier(size)
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(size):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=target, args=(*args(self.barrier), theirs), daemon=True)
            proc.start()
            self.conns.append(mine)
            self.procs.append(proc)
        for i in range(size):
            self.receive(i, timeout=60)

    def send(self, i: int, command: str, arg: Any = None) -> None:
        self.conns[i].send((command, arg))

    def receive(self, i: int, timeout: float = 30) -> Any:
        if not self.conns[i].poll(timeout):
            raise AssertionError(f"process {i} did not answer in {timeout} s")
        status, value = self.conns[i].recv()
        if status == "error":
            raise AssertionError(f"process {i} failed:\n{value}")
        return value

    def ask(self, i: int, command: str, arg: Any = None) -> Any:
        self.send(i, command, arg)
        return self.receive(i)

    def ask_all(self, command: str, arg: Any = None, who: list[int] | None = None) -> list[Any]:
        who = list(range(self.size)) if who is None else who
        for i in who:
            self.send(i, command, arg)
        return [self.receive(i) for i in who]

    def kill(self, i: int) -> None:
        """SIGKILL: the process gets no chance to tidy anything up."""
        os.kill(self.procs[i].pid, signal.SIGKILL)
        self.procs[i].join(timeout=10)

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs, strict=True):
            if proc.is_alive():
                with contextlib.suppress(OSError):  # it may be gone already
                    conn.send(("stop", None))
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()
