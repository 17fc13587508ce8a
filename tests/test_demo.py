"""``keypool demo``: the scripted outage story, checked against the fake upstream's own counters."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from keypool import KeyPool
from keypool.testing import FakeUpstream
from providers._demo import BACKUP, PRIMARY, _Live, _render, _secret, run_demo, run_scenario

SECONDS = 10.0  # the story is told in fractions of the run; 10 s leaves every breaker time to heal
ALL_KEYS = PRIMARY + BACKUP


@pytest.mark.slow
@pytest.mark.anyio
async def test_scenario_summary_matches_the_upstream(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    upstream = FakeUpstream([_secret(k) for k in ALL_KEYS], flavor="deepseek")
    frames: list[str] = []

    def tick(live: _Live, pool: KeyPool) -> None:
        console = Console(file=io.StringIO(), width=140, color_system=None)
        console.print(_render(live, pool, SECONDS))
        frames.append(console.file.getvalue())  # type: ignore[attr-defined]

    summary, returned = await run_scenario(SECONDS, upstream=upstream, on_tick=tick)
    assert returned is upstream

    counters = {k: upstream.counters(_secret(k)) for k in ALL_KEYS}
    non_200 = sum(n for c in counters.values() for status, n in c.by_status.items() if status != 200)
    answered_200 = sum(c.status(200) for c in counters.values())

    assert summary.failures == 0, summary.errors
    assert not summary.errors
    assert summary.requests == summary.successes > 100
    assert summary.upstream_attempts == upstream.total_requests()
    assert summary.wasted_attempts == non_200 > 0
    # Every request got exactly one 200; every other attempt was a wasted one, retried elsewhere.
    assert answered_200 == summary.successes
    assert upstream.total_requests() == summary.successes + summary.wasted_attempts
    assert upstream.counters(None).requests == 0
    assert summary.trips >= 3
    assert summary.recoveries >= 3
    assert summary.backup_served > 0
    assert summary.backup_served == sum(counters[k].status(200) for k in BACKUP)

    # The story's faults reached the keys they were meant for, and no more than the breakers allow.
    for key in ("key-1", "key-2", "key-5"):
        assert counters[key].status(503) >= 5  # failure_threshold, then a failed trial or two
    assert counters["key-3"].status(429) >= 1
    assert counters["key-4"].status(401) >= 1
    assert counters["key-6"].by_status.keys() == {200}

    assert len(frames) > 50
    assert "keys of provider 'deepseek'" in frames[-1]
    for key in ALL_KEYS:
        assert key in frames[-1]
    shown = "\n".join(frames) + caplog.text
    assert "sk-demo-" not in shown


@pytest.mark.slow
def test_run_demo_quiet_prints_a_summary_and_no_secret(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert run_demo(seconds=4.0, quiet=True) == 0
    out, err = capsys.readouterr()
    assert "keypool demo: summary" in out
    assert "failed                        0" in out
    assert "sk-demo-" not in out + err + caplog.text


@pytest.mark.parametrize("seconds", [0, -1, 601])
def test_run_demo_rejects_a_silly_duration(seconds: float, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(seconds=seconds, quiet=True) == 2
    assert "--seconds" in capsys.readouterr().out
