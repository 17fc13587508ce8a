"""Shared test configuration."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from keypool.testing import LoopbackServer
from tests.upstreams import Swap


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def loopback() -> Iterator[tuple[Swap, LoopbackServer]]:
    """One uvicorn server per test module; tests swap the upstream behind it."""
    swap = Swap()
    with LoopbackServer(swap, shutdown_timeout=0.2) as server:
        yield swap, server
