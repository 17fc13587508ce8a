"""The official ``openai`` Node SDK, installed from the npm registry once into ``.venv/node-openai``.

Without ``node``/``npm`` the tests that need it skip, naming what is missing; with ``CI=true`` they
fail instead, so a CI machine cannot pass without running them.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PREFIX = ROOT / ".venv" / "node-openai"
SCRIPT = Path(__file__).resolve().parent / "node" / "gateway_client.mjs"

__all__ = ["SCRIPT", "node_with_openai"]


def _missing(what: str) -> None:
    message = f"{what}; the Node SDK tests need Node.js 18+ and npm (apt-get install nodejs npm)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def node_with_openai() -> tuple[str, Path]:
    """``node``'s path and a ``NODE_PATH`` where ``openai`` is installed (installed if needed)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _missing("`node` or `npm` is not on PATH")
    assert node is not None
    assert npm is not None
    modules = PREFIX / "node_modules"
    PREFIX.mkdir(parents=True, exist_ok=True)
    with open(PREFIX / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install even if several test processes start at once
        if not (modules / "openai" / "package.json").exists():
            done = subprocess.run(
                [
                    npm,
                    "install",
                    "--prefix",
                    str(PREFIX),
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                    "openai",
                ],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if done.returncode != 0:
                _missing(f"`npm install openai` failed: {done.stderr.strip()[-500:]}")
    return node, modules
