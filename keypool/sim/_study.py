"""The threshold study: the runbook's load-test table, measured on the real pool and checked exactly.

:func:`run_study` repeats each measurement of :mod:`._measures` over seeds (in worker processes if
``jobs > 1``; results do not depend on it) and returns one JSON document, schema
``keypool-threshold-study/1`` (documented in ``docs/threshold-study.md``). Every figure carries its
window, its rate and its interval; every simulated false-trip figure carries the exact value and
whether the interval holds it. The document is deterministic for its seeds: no clock reading,
host name or timing goes into it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ._exact import (
    clopper_pearson,
    expected_attempts_to_run,
    mean_interval,
    poisson_run_probability,
    renewal_cycle,
    run_probability,
)
from ._measures import MEASURES

__all__ = ["SCHEMA", "StudyPlan", "run_study"]

SCHEMA = "keypool-threshold-study/1"
THRESHOLDS = (3, 5, 7, 10)
MIX_FAILURE_RATE = 0.05  # the runbook's "95 % success" mixed workload
RATE = 50.0  # the runbook's 50 requests/s
WINDOWS = (60.0, 300.0)
EXACT_WINDOWS = (1.0, 10.0, 60.0, 300.0, 3600.0, 86_400.0)
# Failure rates at which each threshold false-trips often enough within a minute to measure well.
VALIDATION_POINTS = ((3, 0.05), (5, 0.2), (7, 0.35), (10, 0.5))
FLAP_RATES = (0.1, 0.2, 0.3, 0.5)


@dataclass(frozen=True)
class StudyPlan:
    """How many seeds each measurement gets. ``quick`` is for tests: small, same shape."""

    mix_seeds_k3: int = 150
    mix_seeds_rare: int = 20
    pool_seeds: int = 80
    validation_seeds: int = 120
    trip_seeds: int = 40
    recovery_seeds: int = 60
    flap_seeds: int = 6
    waste_seeds: int = 8
    half_open_seeds: int = 30
    flap_window: float = 600.0
    outage_length: float = 300.0

    @classmethod
    def quick(cls) -> StudyPlan:
        return cls(
            mix_seeds_k3=12,
            mix_seeds_rare=2,
            pool_seeds=8,
            validation_seeds=16,
            trip_seeds=4,
            recovery_seeds=4,
            flap_seeds=2,
            waste_seeds=2,
            half_open_seeds=3,
            flap_window=120.0,
            outage_length=60.0,
        )


Task = tuple[str, dict[str, Any], int]


def _execute(task: Task) -> Any:
    name, params, seed = task
    return MEASURES[name](seed=seed, **params)


class _Runner:
    """Runs tasks here or in worker processes; the order of results is the order of tasks."""

    def __init__(self, jobs: int, progress: Callable[[str], None]) -> None:
        self.jobs = jobs
        self.progress = progress
        self._pool = ProcessPoolExecutor(jobs) if jobs > 1 else None

    def map(self, label: str, tasks: list[Task]) -> list[Any]:
        started = time.perf_counter()
        if self._pool is None:
            results = [_execute(t) for t in tasks]
        else:
            results = list(self._pool.map(_execute, tasks))  # one run per task: runs differ in cost
        self.progress(f"{label}: {len(tasks)} runs in {time.perf_counter() - started:.1f} s")
        return results

    def grouped(
        self,
        label: str,
        measure: str,
        combos: Sequence[tuple[Any, ...]],
        params: Callable[..., dict[str, Any]],
        seeds: range,
    ) -> list[list[Any]]:
        """``measure`` with ``params(*combo)`` over the same seeds for every combination: the runs
        of each combination, in the order of ``combos``."""
        results = self.map(label, [(measure, params(*combo), s) for combo in combos for s in seeds])
        n = len(seeds)
        return [results[i * n : (i + 1) * n] for i in range(len(combos))]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _seeds(base: int, n: int) -> range:
    return range(base, base + n)


def _r(x: float | None, digits: int = 6) -> float | None:
    """Round to ``digits`` significant digits (stable JSON), keeping None, 0 and infinities."""
    if x is None or x == 0 or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def _proportion(hits: int, trials: int, exact: float | None, confidence: float) -> dict[str, Any]:
    lo, hi = clopper_pearson(hits, trials, confidence)
    row: dict[str, Any] = {
        "hits": hits,
        "trials": trials,
        "estimate": _r(hits / trials),
        "ci": [_r(lo), _r(hi)],
    }
    if exact is not None:
        row["exact"] = _r(exact)
        row["agrees"] = lo <= exact <= hi
    return row


def _mean(values: Sequence[float], confidence: float) -> dict[str, Any]:
    if not values:
        return {"n": 0, "mean": None, "ci": [None, None]}
    mean, lo, hi = mean_interval(values, confidence)
    return {
        "n": len(values),
        "mean": _r(mean),
        "ci": [_r(lo), _r(hi)],
        "min": _r(min(values)),
        "max": _r(max(values)),
    }


def _paired(runs: Sequence[Any], baseline: Sequence[Any], field: str, confidence: float) -> dict[str, Any]:
    """The per-seed difference to a baseline run with the same seed (same outage, same phase)."""
    diffs = [
        r[field] - b[field]
        for r, b in zip(runs, baseline, strict=True)
        if r[field] is not None and b[field] is not None
    ]
    return _mean(diffs, confidence)


# ---------------------------------------------------------------------- sections


def _false_trips(run: _Runner, plan: StudyPlan, base: int, confidence: float) -> dict[str, Any]:
    p = MIX_FAILURE_RATE
    window = max(WINDOWS)
    tasks: list[Task] = []
    layout: list[tuple[int, int]] = []
    for k in THRESHOLDS:
        n = plan.mix_seeds_k3 if k == 3 else plan.mix_seeds_rare
        params = {"k": k, "p": p, "rate": RATE, "keys": 1, "window": window, "arrivals": "uniform"}
        tasks += [("first_trip", params, s) for s in _seeds(base, n)]
        layout.append((k, n))
    results = run.map("false trips, one key at 50 attempts/s", tasks)
    rows = []
    at = 0
    for k, n in layout:
        firsts = results[at : at + n]
        at += n
        for w in WINDOWS:
            attempts = int(RATE * w)
            hits = sum(1 for f in firsts if f is not None and f < w)
            row = {"failure_threshold": k, "window_s": w, "attempts_per_window": attempts}
            row.update(_proportion(hits, n, run_probability(attempts, k, p), confidence))
            rows.append(row)
    exact = [
        {
            "failure_threshold": k,
            "window_s": w,
            "attempts": int(RATE * w),
            "probability": _r(run_probability(int(RATE * w), k, p)),
        }
        for k in THRESHOLDS
        for w in EXACT_WINDOWS
    ]
    per_day = [
        {
            "failure_threshold": k,
            "expected_attempts_between_trips": _r(expected_attempts_to_run(k, p)),
            "expected_trips_per_day": _r(RATE * 86_400 / expected_attempts_to_run(k, p)),
        }
        for k in THRESHOLDS
    ]
    return {
        "what": "P(at least one breaker trip caused by i.i.d. failures) in a window that starts with a "
        "fresh breaker",
        "failure_rate": p,
        "one_key": {
            "setup": "one key, 50 attempts/s evenly spaced (random phase), answers at once, "
            "no failover; exact = run-length probability over exactly rate*window attempts",
            "rate_per_key": RATE,
            "rows": rows,
        },
        "exact": exact,
        "exact_per_day": per_day,
        "pool": _pool_false_trips(run, plan, base, confidence),
        "validation": _validation(run, plan, base, confidence),
    }


def _pool_false_trips(run: _Runner, plan: StudyPlan, base: int, confidence: float) -> dict[str, Any]:
    keys, k, p, window = 4, 3, MIX_FAILURE_RATE, max(WINDOWS)
    params = {"k": k, "p": p, "rate": RATE, "keys": keys, "window": window, "arrivals": "poisson"}
    firsts = run.map(
        "false trips, 4-key pool at 50 req/s",
        [("first_trip", params, s) for s in _seeds(base, plan.pool_seeds)],
    )
    # Failover: a failed attempt is retried on another key, so each request makes
    # 1 + p + p^2 + ... (at most `keys`) attempts; by symmetry each key gets a quarter of them.
    # The provider's own breaker sees the same attempts as one stream: k endpoint failures in a
    # row across its keys open the whole provider, which counts as a trip too.
    attempts_per_request = sum(p**j for j in range(keys))
    per_key_rate = RATE * attempts_per_request / keys
    rows = []
    for w in WINDOWS:
        one = poisson_run_probability(per_key_rate * w, k, p)
        provider = poisson_run_probability(RATE * attempts_per_request * w, k, p)
        exact = 1.0 - (1.0 - one) ** keys * (1.0 - provider)
        hits = sum(1 for f in firsts if f is not None and f < w)
        row = {"failure_threshold": k, "window_s": w, "attempts_per_key_per_window": _r(per_key_rate * w)}
        row.update(_proportion(hits, len(firsts), exact, confidence))
        rows.append(row)
    return {
        "setup": f"{keys} keys share {RATE:g} requests/s (Poisson) with failover; a trip of any key, "
        "or of the provider's own breaker, counts; exact = 1 - (1 - P_key)^4 (1 - P_provider), "
        "P_key over Poisson(per-key attempts) attempts, P_provider over Poisson(all attempts), "
        "the streams taken as independent",
        "keys": keys,
        "request_rate": RATE,
        "attempts_per_key_per_second": _r(per_key_rate),
        "rows": rows,
    }


def _validation(run: _Runner, plan: StudyPlan, base: int, confidence: float) -> dict[str, Any]:
    window = 60.0
    tasks: list[Task] = []
    for k, p in VALIDATION_POINTS:
        params = {"k": k, "p": p, "rate": RATE, "keys": 1, "window": window, "arrivals": "uniform"}
        tasks += [("first_trip", params, s) for s in _seeds(base, plan.validation_seeds)]
    results = run.map("false trips, validation grid", tasks)
    rows = []
    n = plan.validation_seeds
    for i, (k, p) in enumerate(VALIDATION_POINTS):
        firsts = results[i * n : (i + 1) * n]
        for w in (10.0, 30.0, 60.0):
            attempts = int(RATE * w)
            hits = sum(1 for f in firsts if f is not None and f < w)
            row: dict[str, Any] = {
                "failure_threshold": k,
                "failure_rate": p,
                "window_s": w,
                "attempts_per_window": attempts,
            }
            row.update(_proportion(hits, n, run_probability(attempts, k, p), confidence))
            rows.append(row)
        rows[-1]["first_trip_times"] = [_r(f, 5) for f in sorted(f for f in firsts if f is not None)]
    return {
        "setup": "one key, 50 attempts/s evenly spaced; failure rates high enough that trips happen "
        "within a minute, so the simulation can be checked against the exact figure where it is precise",
        "rows": rows,
    }


def _time_to_trip(run: _Runner, plan: StudyPlan, base: int, confidence: float) -> dict[str, Any]:
    setups = {
        "one_key": "one key at 50 attempts/s goes dead",
        "one_of_five": "one of 5 keys sharing 50 req/s goes dead (about 10 first attempts/s reach it)",
        "all_five": "the whole provider (5 keys, 50 req/s) goes dead; a request moves on to the next "
        "key for free while one is clean, then spends its 2 retries",
    }
    combos = [(k, setup, mode) for k in THRESHOLDS for setup in setups for mode in ("fast", "timeout")]
    grouped = run.grouped(
        "time to trip",
        "time_to_trip",
        combos,
        lambda k, setup, mode: {"k": k, "setup": setup, "mode": mode},
        _seeds(base, plan.trip_seeds),
    )
    rows = []
    for (k, setup, mode), runs in zip(combos, grouped, strict=True):
        delays = [d for r in runs for d in r["delays"]]
        rows.append(
            {
                "failure_threshold": k,
                "setup": setup,
                "failure": mode,
                "delay_s": _mean(delays, confidence),
                "all_dead_keys_open_s": _mean(
                    [r["all_open"] for r in runs if r["all_open"] is not None], confidence
                ),
                "wasted_attempts": _mean([float(r["wasted"]) for r in runs], confidence),
            }
        )
    return {
        "what": "seconds from the start of a persistent outage until the dead keys' breakers open",
        "failures": {
            "fast": "the upstream answers 503 at once",
            "timeout": "the upstream stops answering; attempts time out after 10 s",
        },
        "setups": setups,
        "rows": rows,
    }


def _recovery(run: _Runner, plan: StudyPlan, base: int, confidence: float) -> dict[str, Any]:
    combos = [
        (timeout, s, outage)
        for outage in ("blip", "long")
        for timeout in (30.0, 60.0, 120.0)
        for s in (1, 2, 3)
    ]
    grouped = run.grouped(
        "recovery",
        "recovery",
        combos,
        lambda t, s, o: {"timeout": t, "s": s, "outage": o, "p_after": MIX_FAILURE_RATE},
        _seeds(base, plan.recovery_seeds),
    )
    rows = []
    n = plan.recovery_seeds
    by_combo = dict(zip(combos, grouped, strict=True))
    for timeout, s, outage in combos:
        runs = by_combo[(timeout, s, outage)]
        baseline = by_combo[(timeout, 2, outage)]  # the same seeds with success_threshold 2
        after = [r["after_heal"] for r in runs if r["after_heal"] is not None]
        out = [r["out_of_service"] for r in runs if r["out_of_service"] is not None]
        first_try = sum(1 for r in runs if r["episodes_after_heal"] == 1)
        rows.append(
            {
                "timeout": timeout,
                "success_threshold": s,
                "outage": outage,
                "after_heal_s": _mean(after, confidence),
                "out_of_service_s": _mean(out, confidence),
                "after_heal_minus_s2_s": _paired(runs, baseline, "after_heal", confidence),
                "closed_at_first_half_open": _proportion(
                    first_try, n, (1 - MIX_FAILURE_RATE) ** s if outage == "long" else None, confidence
                ),
            }
        )
    return {
        "what": "a key trips in an outage (fast 503s); after the heal, how long until its breaker closes",
        "setup": "one key, 50 attempts/s, failure_threshold 5, 5 % i.i.d. failures around the outage; "
        "outage 'blip' = 5 s (shorter than the timeout), 'long' = 30-300 s (heal at a random point "
        "of the open/half-open cycle)",
        "rows": rows,
    }


def _flapping(run: _Runner, plan: StudyPlan, base: int, confidence: float) -> dict[str, Any]:
    window = plan.flap_window
    combos = [(k, p) for k in THRESHOLDS for p in FLAP_RATES]
    seeds = _seeds(base, plan.flap_seeds)
    grouped = run.grouped(
        "transitions under i.i.d. failures",
        "flapping",
        combos,
        lambda k, p: {"k": k, "p": p, "timeout": 60.0, "s": 2, "window": window},
        seeds,
    )
    rows = []
    for (k, p), runs in zip(combos, grouped, strict=True):
        seconds, transitions = renewal_cycle(rate=RATE, k=k, p=p, timeout=60.0, success_threshold=2)
        rows.append(
            {
                "failure_threshold": k,
                "failure_rate": p,
                "per_minute": _mean([r["per_minute"] for r in runs], confidence),
                "renewal_per_minute": _r(60.0 * transitions / seconds),
            }
        )
    upstream_combos = [(5, 30.0), (5, 60.0), (5, 90.0), (3, 60.0), (10, 60.0)]
    upstream = run.grouped(
        "transitions under a flapping upstream",
        "flapping_upstream",
        upstream_combos,
        lambda k, t: {"k": k, "timeout": t, "down": 10.0, "up": 50.0, "window": window},
        seeds,
    )
    upstream_rows = [
        {
            "failure_threshold": k,
            "timeout": t,
            "per_minute": _mean([r["per_minute"] for r in runs], confidence),
        }
        for (k, t), runs in zip(upstream_combos, upstream, strict=True)
    ]
    throttle_combos = [(0.01, 1.0), (0.05, 1.0), (0.05, 5.0)]
    throttled = run.grouped(
        "transitions under 429s",
        "throttle_flapping",
        throttle_combos,
        lambda p, ra: {"p": p, "retry_after": ra, "window": window},
        seeds,
    )
    throttle_rows = [
        {
            "share_429": p,
            "retry_after_s": ra,
            "per_minute": _mean([r["per_minute"] for r in runs], confidence),
        }
        for (p, ra), runs in zip(throttle_combos, throttled, strict=True)
    ]
    return {
        "what": "breaker state transitions per minute of one key at 50 attempts/s",
        "window_s": window,
        "iid": {
            "setup": "i.i.d. failures at the given rate; timeout 60 s, success_threshold 2; renewal = "
            "the long-run rate of a trip/probe/close cycle computed from the exact run length",
            "rows": rows,
        },
        "flapping_upstream": {
            "setup": "the upstream is down 10 s, up 50 s, repeatedly (random phase)",
            "rows": upstream_rows,
        },
        "throttled": {
            "setup": "a share of calls gets 429 with a short Retry-After (the key is out until then)",
            "rows": throttle_rows,
        },
        "max_per_minute_from_failures": {str(t): _r(3 * 60.0 / t) for t in (30.0, 60.0, 90.0, 120.0)},
    }


def _waste(run: _Runner, plan: StudyPlan, base: int, confidence: float) -> dict[str, Any]:
    length = plan.outage_length
    combos = [
        (k, t, mode)
        for mode in ("fast", "timeout")
        for k in (*THRESHOLDS, 1_000_000)
        for t in (30.0, 60.0, 120.0)
    ]
    combos = [c for c in combos if c[0] != 1_000_000 or c[1] == 60.0]
    # Without a breaker every request tries every key: nearly deterministic, and the costliest run.
    counts = [
        plan.waste_seeds if k != 1_000_000 else min(2, plan.waste_seeds // 2 or 1) for k, _, _ in combos
    ]
    tasks = [
        ("outage_waste", {"k": k, "timeout": t, "m": 3, "mode": mode, "length": length}, s)
        for (k, t, mode), n in zip(combos, counts, strict=True)
        for s in _seeds(base, n)
    ]
    results = run.map("wasted attempts", tasks)
    rows = []
    at = 0
    for (k, t, mode), n in zip(combos, counts, strict=True):
        runs = results[at : at + n]
        at += n
        rows.append(
            {
                "failure_threshold": k if k != 1_000_000 else None,
                "timeout": t,
                "failure": mode,
                "wasted_attempts": _mean([float(r["wasted"]) for r in runs], confidence),
            }
        )
    return {
        "what": "attempts sent to a dead upstream during a provider-wide outage",
        "setup": f"4 keys, 50 req/s (Poisson), outage of {length:g} s; half_open_max_calls 3; "
        "failure_threshold null = no breaker (a threshold never reached)",
        "outage_s": length,
        "rows": rows,
    }


def _half_open(run: _Runner, plan: StudyPlan, base: int, confidence: float) -> dict[str, Any]:
    combos = [(m, s, mode) for mode in ("fast", "timeout") for s in (2, 3) for m in (1, 2, 3, 5)]
    grouped = run.grouped(
        "half-open trials",
        "half_open",
        combos,
        lambda m, s, mode: {"m": m, "s": s, "mode": mode, "timeout": 60.0},
        _seeds(base, plan.half_open_seeds),
    )
    rows = []
    by_combo = dict(zip(combos, grouped, strict=True))
    for m, s, mode in combos:
        runs = by_combo[(m, s, mode)]
        per_episode = [r["trial_failures"] / r["episodes"] for r in runs if r["episodes"]]
        rows.append(
            {
                "half_open_max_calls": m,
                "success_threshold": s,
                "failure": mode,
                "failed_trials_per_probe": _mean(per_episode, confidence),
                "after_heal_s": _mean(
                    [r["after_heal"] for r in runs if r["after_heal"] is not None], confidence
                ),
                "after_heal_minus_m3_s": _paired(runs, by_combo[(3, s, mode)], "after_heal", confidence),
            }
        )
    return {
        "what": "what half_open_max_calls changes: trials wasted per probe of a dead key, "
        "time to close after a heal",
        "setup": "one key, 50 req/s, answers take 1 s; outage of 60-240 s (fast = 503 after 0.2 s, "
        "timeout = no answer, 10 s attempt timeout); timeout 60 s",
        "rows": rows,
    }


SECTIONS: dict[str, Callable[[_Runner, StudyPlan, int, float], dict[str, Any]]] = {
    "false_trips": _false_trips,
    "time_to_trip": _time_to_trip,
    "recovery": _recovery,
    "flapping": _flapping,
    "wasted_attempts": _waste,
    "half_open_max_calls": _half_open,
}


def run_study(
    *,
    plan: StudyPlan | None = None,
    seed: int = 0,
    confidence: float = 0.99,
    jobs: int = 1,
    sections: Iterable[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the study and return its JSON document (see ``docs/threshold-study.md`` for the schema)."""
    plan = plan or StudyPlan()
    say = progress or (lambda line: print(line, file=sys.stderr))
    chosen = list(sections) if sections is not None else list(SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        from .._errors import ConfigError

        raise ConfigError(f"sections: unknown {unknown}; known: {sorted(SECTIONS)}")
    runner = _Runner(jobs, say)
    try:
        body = {name: SECTIONS[name](runner, plan, seed, confidence) for name in chosen}
    finally:
        runner.close()
    checks = [
        row
        for group in ("one_key", "pool", "validation")
        for row in body.get("false_trips", {}).get(group, {}).get("rows", [])
    ]
    return {
        "schema": SCHEMA,
        "generated_by": "keypool study",
        "keypool_version": __version__,
        "seed": seed,
        "confidence": confidence,
        "plan": plan.__dict__,
        "defaults": {
            "failure_threshold": 5,
            "success_threshold": 2,
            "timeout": 60.0,
            "half_open_max_calls": 3,
        },
        "agreement": {
            "checked": len(checks),
            "agree": sum(1 for r in checks if r.get("agrees")),
            "all_agree": all(r.get("agrees", True) for r in checks),
        },
        **body,
    }
