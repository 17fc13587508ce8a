"""``keypool study``: run the threshold study and write its JSON, plots and the doc's tables."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .._errors import ConfigError
from ._report import claims, tables, update_doc
from ._study import StudyPlan, run_study

__all__ = ["RESULTS_FILE", "study_command", "tune_command"]

RESULTS_FILE = "circuit_breaker_load_test_results.json"


def _default_jobs() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def study_command(
    *,
    out: str = "docs/threshold-study",
    doc: str | None = "docs/threshold-study.md",
    quick: bool = False,
    seed: int = 0,
    jobs: int | None = None,
    plots: bool = True,
) -> int:
    """Run the study; write ``out/circuit_breaker_load_test_results.json``, the PNGs and ``doc``'s tables.

    Returns 0 when every simulated false-trip figure agrees with its exact value, 1 otherwise.
    """
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs: must be >= 1 (got {jobs})")
    started = time.perf_counter()
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = run_study(
        plan=StudyPlan.quick() if quick else StudyPlan(), seed=seed, jobs=jobs or _default_jobs()
    )
    document["runbook_claims"] = claims(document)
    results = target / RESULTS_FILE
    results.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {results}")
    if plots:
        from ._plots import write_plots

        for path in write_plots(document, target):
            print(f"wrote {path}")
    if doc is not None:
        doc_path = Path(doc)
        if doc_path.exists():
            replaced = update_doc(doc_path, tables(document))
            print(f"updated {len(replaced)} tables in {doc_path}")
        else:
            print(f"{doc_path} not found: tables not written (pass --doc PATH)", file=sys.stderr)
    agreement = document["agreement"]
    print(
        f"exact vs simulated false-trip figures: {agreement['agree']}/{agreement['checked']} agree "
        f"({time.perf_counter() - started:.0f} s)"
    )
    return 0 if agreement["all_agree"] else 1


def _values(text: str, kind: type[float] | type[int], field: str) -> list[Any]:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{field}: expected comma-separated numbers (got {text!r})") from None


def tune_command(
    *,
    log: str | None,
    provider: str | None = None,
    rate: float | None = None,
    keys: int = 1,
    failure_rate: float = 0.0,
    latency: float = 0.0,
    thresholds: str = "3,5,7,10",
    timeouts: str | None = None,
    successes: str | None = None,
    half_open: str | None = None,
    budget: float = 1.0,
    seeds: int = 12,
    as_json: bool = False,
    progress: bool = True,
) -> int:
    """Rank candidate breaker settings for a log or a synthetic workload; print the table and a PATCH body."""
    from ._replay import read_event_log
    from ._tune import Workload, candidates, evaluate, plain_progress, workload_from_log

    if budget < 0 or not budget == budget:
        raise ConfigError(f"--max-false-trips: must be >= 0 (got {budget})")
    replay = None
    current: dict[str, Any] = {}
    notes: list[str] = []
    if log is not None:
        data = read_event_log(log)
        if data.errors:
            shown = "; ".join(f"line {n}: {why}" for n, why in data.errors[:5])
            more = f" (and {len(data.errors) - 5} more)" if len(data.errors) > 5 else ""
            notes.append(f"{len(data.errors)} of {data.lines} lines malformed and skipped: {shown}{more}")
        workload, replay, current = workload_from_log(data, provider)
        notes.append(
            f"log: {len(replay.scenario.traffic[0].times or ())} requests to {workload.provider!r} over "
            f"{replay.hours * 3600:.1f} s, {workload.keys} keys"
        )
    else:
        if rate is None:
            raise ConfigError(
                "give an event log (PATH) or a synthetic workload (--rate, --keys, --failure-rate)"
            )
        workload = Workload(rate=rate, keys=keys, failure_rate=failure_rate, latency=latency)
    base_timeout = float(current.get("timeout", 60.0))
    timeout_values = (
        _values(timeouts, float, "timeouts") if timeouts else sorted({30.0, 60.0, 120.0, base_timeout})
    )
    configs = candidates(
        _values(thresholds, int, "thresholds"),
        timeout_values,
        _values(successes, int, "success") if successes else [int(current.get("success_threshold", 2))],
        _values(half_open, int, "half-open") if half_open else [int(current.get("half_open_max_calls", 3))],
        current,
    )
    ranked = evaluate(
        workload,
        configs,
        replay=replay,
        seeds=seeds,
        budget=budget,
        current=current,
        progress=plain_progress if progress else None,
    )
    if as_json:
        print(
            json.dumps(
                {
                    "workload": workload.model_dump(),
                    "notes": notes,
                    "candidates": [
                        {
                            **c.patch(),
                            "false_trips_per_day": c.false_trips_per_day,
                            "detection_s": c.detection_s,
                            "recovery_s": c.recovery_s,
                            "outage_wasted": c.outage_wasted,
                            "replay_wasted_per_hour": c.replay_wasted_per_hour,
                            "feasible": c.feasible,
                            "current": c.current,
                        }
                        for c in ranked
                    ],
                },
                indent=1,
            )
        )
        return 0
    _print_ranking(workload, ranked, notes, budget)
    return 0


def _print_ranking(workload: Any, ranked: list[Any], notes: list[str], budget: float) -> None:
    for note in notes:
        print(note)
    per_key = workload.per_key()
    print(
        f"workload: {workload.rate:.3g} req/s over {workload.keys} keys, "
        f"{sum(r for r, _ in per_key) / len(per_key):.3g} attempts/s per key, background failure rate "
        f"{100 * workload.failure_rate:.3g} %, answers in {workload.latency:.3g} s"
    )
    header = (
        "rank",
        "k",
        "timeout",
        "succ",
        "half",
        "false trips/day",
        "detect s",
        "recover s",
        "wasted/outage",
        "replay wasted/h",
        "",
    )
    rows = []
    for i, c in enumerate(ranked, start=1):
        cfg = c.config
        rows.append(
            (
                str(i),
                str(cfg.failure_threshold),
                f"{cfg.timeout:g}",
                str(cfg.success_threshold),
                str(cfg.half_open_max_calls),
                f"{c.false_trips_per_day:.3g}",
                f"{c.detection_s:.3g}",
                f"{c.recovery_s:.3g}",
                f"{c.outage_wasted:.3g}",
                "–" if c.replay_wasted_per_hour is None else f"{c.replay_wasted_per_hour:.3g}",
                ("current " if c.current else "") + ("" if c.feasible else "over budget"),
            )
        )
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(header)]
    for line in (header, *rows):
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    best = ranked[0]
    if not best.feasible:
        print(f"no candidate stays within {budget:g} false trips per day; the fewest is ranked first")
    print(
        f"recommended: failure_threshold={best.config.failure_threshold} timeout={best.config.timeout:g} "
        f"success_threshold={best.config.success_threshold} "
        f"half_open_max_calls={best.config.half_open_max_calls}"
        " (within the false-trip budget, the least detection + recovery time, then the fewest wasted "
        "attempts)"
    )
    body = json.dumps(best.patch())
    print("apply it:")
    print("  curl -X PATCH http://localhost:8000/api/v1/circuit-breaker/config \\")
    print('    -H "Authorization: Bearer $KEYPOOL_ADMIN_TOKEN" -H "Content-Type: application/json" \\')
    print(f"    -d '{body}'")
