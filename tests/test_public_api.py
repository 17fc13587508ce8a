"""The public surface is exactly ``keypool.__all__``: sorted, resolvable, and nothing private in it."""

from __future__ import annotations

import importlib
import inspect
import io
import types

import pytest

import keypool

INCLUDED_DUNDERS = {"__version__"}
PUBLIC_MODULES = {"admin", "metrics", "sim", "store", "testing"}


def is_private(name: str) -> bool:
    return name.startswith("_")


def test_all_is_sorted_and_unique() -> None:
    assert keypool.__all__ == sorted(keypool.__all__)
    assert len(set(keypool.__all__)) == len(keypool.__all__)


def test_all_imports_are_exported() -> None:
    """Every public name bound in the package is listed, like httpx's own check."""
    public = sorted(
        name
        for name, value in vars(keypool).items()
        if (not is_private(name) or name in INCLUDED_DUNDERS) and not isinstance(value, types.ModuleType)
    )
    assert keypool.__all__ == public


@pytest.mark.parametrize("name", keypool.__all__)
def test_every_name_resolves(name: str) -> None:
    value = getattr(keypool, name)
    assert value is not None
    module = getattr(value, "__module__", None)
    if module is not None and (inspect.isclass(value) or inspect.isfunction(value)):
        # defined inside keypool, in a private module: the package root is the one way in
        assert module.startswith("keypool.")
        assert is_private(module.split(".")[1])


def test_nothing_private_is_exported() -> None:
    leaked = [n for n in keypool.__all__ if is_private(n) and n not in INCLUDED_DUNDERS]
    assert leaked == []


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from keypool import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(keypool.__all__)


def test_public_submodules_are_the_known_ones() -> None:
    bound = {
        name for name, v in vars(keypool).items() if isinstance(v, types.ModuleType) and not is_private(name)
    }
    assert bound <= PUBLIC_MODULES


def test_private_modules_export_what_their_all_says() -> None:
    for module_name in (
        "_breaker",
        "_config",
        "_errors",
        "_eventlog",
        "_events",
        "_outcome",
        "_pool",
        "_sampler",
        "_transport",
    ):
        module = importlib.import_module(f"keypool.{module_name}")
        for name in module.__all__:
            assert hasattr(module, name), f"keypool.{module_name}.{name}"


def test_version() -> None:
    assert isinstance(keypool.__version__, str)
    assert keypool.__version__.count(".") >= 2


def test_exceptions_share_one_base() -> None:
    errors = [
        getattr(keypool, n)
        for n in keypool.__all__
        if n.endswith(("Error", "Interrupted", "Available", "Shed"))
    ]
    assert errors
    for error in errors:
        assert issubclass(error, keypool.KeyPoolError)


def test_testing_module_surface() -> None:
    testing = importlib.import_module("keypool.testing")
    assert testing.__all__ == sorted(testing.__all__)
    for name in testing.__all__:
        assert getattr(testing, name) is not None
    assert "FakeClock" in testing.__all__


def test_event_log_is_a_public_hook() -> None:
    assert "EventLog" in keypool.__all__
    assert keypool.EventLog.__module__ == "keypool._eventlog"
    hook: keypool.Hook = keypool.EventLog(io.StringIO())
    assert callable(hook)


def test_sim_module_surface() -> None:
    sim = importlib.import_module("keypool.sim")
    assert sim.__all__ == sorted(sim.__all__)
    for name in sim.__all__:
        assert getattr(sim, name) is not None
    assert {"Scenario", "simulate", "run_probability"} <= set(sim.__all__)
