"""Every script in ``examples/`` runs to completion on its own (each brings its own fake upstream)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    assert EXAMPLES, "examples/ holds no script"


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path) -> None:
    # Examples must not depend on real keys in the environment.
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_API_KEYS"))}
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=script.parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{script.name} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
