"""keypool.EventLog and keypool tune: a log written by the pool, read back, replayed and ranked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keypool import EventLog
from keypool.sim import Scenario, Simulation
from keypool.sim._commands import tune_command
from keypool.sim._replay import read_event_log
from keypool.sim._tune import candidates, evaluate, workload_from_log
from providers.cli import main


def record_log(path: Path, *, p: float, minutes: float, keys: int = 4) -> None:
    """A 50 req/s pool with an i.i.d. failure rate ``p``, logged by the real hook on the fake clock."""
    scenario = Scenario.parse(
        {
            "providers": [{"name": "deepseek", "keys": keys}],
            "traffic": [{"provider": "deepseek", "rate": 50}],
            "faults": [{"kind": "failure_rate", "p": p}],
            "duration": minutes * 60,
        }
    )
    with EventLog(path) as log:
        sim = Simulation(scenario, 5, hooks=[log], fast_refusals=False)
        log.describe(sim.pool)
        sim.run()


def test_the_log_has_every_event_and_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    record_log(path, p=0.3, minutes=0.5, keys=2)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["type"] == "log"
    assert lines[1]["type"] == "pool"
    assert {"call", "state"} <= {line["type"] for line in lines}
    call = next(line for line in lines if line["type"] == "call")
    assert set(call) == {
        "v",
        "type",
        "provider",
        "key_id",
        "outcome",
        "status",
        "duration",
        "trial",
        "t",
        "wall",
    }
    assert "sim-deepseek" not in path.read_text()  # the simulated keys' secrets
    data = read_event_log(path)
    assert not data.errors
    assert len(data.calls) == sum(1 for line in lines if line["type"] == "call")


def test_tune_ranks_a_log_whose_best_answer_is_known(tmp_path: Path) -> None:
    """4 keys at 50 req/s, 5 % failures: ~13 attempts/s per key. Exact false trips per day across
    the pool: k=3 hundreds, k=5 about 1.4 (over the budget of 1), k=7 about 0.01. The fastest
    detection within the budget is k=7, and the shortest timeout recovers soonest on average over
    the heals (8 outages: a heal in the last 30 s of a 60 s cycle waits as long for either probe,
    and a tie goes to the fewer wasted attempts, so a handful of outages would not tell)."""
    path = tmp_path / "events.jsonl"
    record_log(path, p=0.05, minutes=5)
    workload, replay, current = workload_from_log(read_event_log(path))
    assert workload.keys == 4
    assert workload.failure_rate == pytest.approx(0.05, abs=0.005)
    assert workload.rate == pytest.approx(50, rel=0.05)
    ranked = evaluate(
        workload,
        candidates([3, 5, 7, 10], [30, 60], [2], [3], current),
        replay=replay,
        seeds=8,
        current=current,
    )
    best = ranked[0]
    assert (best.config.failure_threshold, best.config.timeout) == (7, 30)
    by_k = {c.config.failure_threshold: c for c in ranked if c.config.timeout == 60}
    assert by_k[3].false_trips_per_day > 100
    assert not by_k[3].feasible
    assert 1.0 < by_k[5].false_trips_per_day < 2.0
    assert not by_k[5].feasible
    assert by_k[7].false_trips_per_day < 0.05
    assert by_k[7].feasible
    assert by_k[3].detection_s < by_k[5].detection_s < by_k[7].detection_s < by_k[10].detection_s
    assert best.patch() == {
        "failure_threshold": 7,
        "success_threshold": 2,
        "timeout": 30.0,
        "half_open_max_calls": 3,
    }
    assert next(c for c in ranked if c.current).config.failure_threshold == 5  # the log's own settings


def test_malformed_lines_are_counted_by_number_and_the_rest_is_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "events.jsonl"
    record_log(path, p=0.1, minutes=0.5, keys=2)
    lines = path.read_text().splitlines()
    lines.insert(3, "{not json")
    lines.insert(5, json.dumps({"v": 1, "type": "call", "provider": "deepseek", "key_id": "key-1"}))
    lines.insert(7, "[1, 2]")
    path.write_text("\n".join(lines) + "\n")
    data = read_event_log(path)
    assert [n for n, _ in data.errors] == [4, 6, 8]
    assert "outcome" in data.errors[1][1]
    assert tune_command(log=str(path), thresholds="3,5", timeouts="30", seeds=2, progress=False) == 0
    out = capsys.readouterr().out
    assert "3 of" in out
    assert "line 4: not JSON" in out
    assert "PATCH http://localhost:8000/api/v1/circuit-breaker/config" in out
    assert json.loads(out.split("-d '")[1].split("'")[0])["failure_threshold"] in (3, 5)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--rate", "-5"], "rate"),
        (["--rate", "50", "--failure-rate", "1.5"], "failure_rate"),
        (["--rate", "50", "--keys", "0"], "keys"),
        (["--rate", "50", "--thresholds", "0"], "failure_threshold"),
        (["--rate", "50", "--timeouts", "x"], "timeouts"),
        ([], "event log"),
        (["/nonexistent/events.jsonl"], "cannot read"),
    ],
)
def test_impossible_parameters_are_refused_with_the_field_named(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tune", "--no-progress", *argv]) == 2
    assert named in capsys.readouterr().err


def test_synthetic_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["tune", "--rate", "50", "--keys", "4", "--failure-rate", "0.05", "--seeds", "8", "--json"]) == 0
    )
    ranking = json.loads(capsys.readouterr().out)["candidates"]
    assert ranking[0]["failure_threshold"] == 7
    assert ranking[0]["timeout"] == 30.0


@pytest.mark.slow
def test_tune_works_on_a_log_recorded_from_the_demo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "demo.jsonl"
    assert main(["demo", "--seconds", "4", "--quiet", "--event-log", str(path)]) == 0
    assert "sk-demo-" not in path.read_text()
    capsys.readouterr()
    assert (
        main(["tune", str(path), "--thresholds", "5,7", "--timeouts", "30", "--seeds", "2", "--no-progress"])
        == 0
    )
    out = capsys.readouterr().out
    assert "requests to 'deepseek'" in out
    assert "recommended:" in out
