"""Exact figures the simulator is checked against, and the confidence intervals it reports.

A breaker with ``failure_threshold = k`` opens on the first run of ``k`` consecutive failures. For
i.i.d. outcomes that fail with probability ``p`` the chance of such a run among ``n`` attempts is a
Markov-chain computation (states: the current streak 0..k-1, plus "a run has happened"), done here
two ways that add only non-negative terms, so even a probability of 1e-15 keeps its digits:

* a first-completion recursion, O(n): a first run ends at attempt ``m`` iff attempts
  ``m-k+1..m`` failed, attempt ``m-k`` succeeded and no run ended among the first ``m-k-1``:
  ``P[m] = P[m-1] + (1-p) p^k (1 - P[m-k-1])``;
* the k+1-state transition matrix raised to the n-th power by squaring, O(k^3 log n), used for
  long windows (a day at 50 attempts/s is 4.3 million attempts).

Nothing here imports the pool: these are the figures a correct breaker must produce.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from .._errors import ConfigError

__all__ = [
    "clopper_pearson",
    "expected_attempts_to_run",
    "mean_interval",
    "poisson_run_probability",
    "renewal_cycle",
    "run_probability",
    "run_probability_curve",
]

_MATRIX_MAX_K = 64  # above this, k^3 log n outgrows the O(n) recursion for any window we use


def _check(n: float | None, k: int, p: float) -> None:
    if n is not None and (not math.isfinite(n) or n < 0):
        raise ConfigError(f"attempts: must be a finite number >= 0 (got {n!r})")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"failure_threshold: must be an integer >= 1 (got {k!r})")
    if not (isinstance(p, int | float) and 0.0 <= p <= 1.0):
        raise ConfigError(f"failure_rate: must be a probability in [0, 1] (got {p!r})")


def run_probability(n: int, k: int, p: float) -> float:
    """P(at least one run of ``k`` consecutive failures among ``n`` i.i.d. attempts failing w.p. ``p``)."""
    _check(n, k, p)
    n = int(n)
    if n < k or p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    if k <= _MATRIX_MAX_K and n > 64 * k:
        return _matrix_power_probability(n, k, p)
    return run_probability_curve(n, k, p)[n]


def run_probability_curve(n: int, k: int, p: float) -> list[float]:
    """``[P(run within m attempts) for m in 0..n]`` by the first-completion recursion."""
    _check(n, k, p)
    n = int(n)
    curve = [0.0] * (n + 1)
    if n < k or p == 0.0:
        return curve
    pk = p**k
    step = (1.0 - p) * pk
    curve[k] = pk
    for m in range(k + 1, n + 1):
        curve[m] = curve[m - 1] + step * (1.0 - curve[m - k - 1])
    return curve


def _matrix_power_probability(n: int, k: int, p: float) -> float:
    # States 0..k-1: the current failure streak; state k: a run has happened (absorbing).
    size = k + 1
    step = [[0.0] * size for _ in range(size)]
    for s in range(k):
        step[s][0] = 1.0 - p
        step[s][s + 1] = p
    step[k][k] = 1.0
    result = _identity(size)
    power = step
    while n:
        if n & 1:
            result = _multiply(result, power)
        n >>= 1
        if n:
            power = _multiply(power, power)
    return min(1.0, result[0][k])


def _identity(size: int) -> list[list[float]]:
    return [[1.0 if i == j else 0.0 for j in range(size)] for i in range(size)]


def _multiply(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    columns = list(zip(*b, strict=True))
    return [[math.fsum(x * y for x, y in zip(row, col, strict=True)) for col in columns] for row in a]


def poisson_run_probability(mean: float, k: int, p: float) -> float:
    """:func:`run_probability` when the number of attempts is Poisson with ``mean`` (Poisson arrivals)."""
    _check(mean, k, p)
    if mean == 0.0 or p == 0.0:
        return 0.0
    top = int(mean + 12.0 * math.sqrt(mean) + 12 * k + 20)
    curve = run_probability_curve(top, k, p)
    total = 0.0
    log_mean = math.log(mean)
    for m in range(k, top + 1):
        total += math.exp(m * log_mean - mean - math.lgamma(m + 1)) * curve[m]
    return min(1.0, total)


def expected_attempts_to_run(k: int, p: float) -> float:
    """Mean number of attempts until the first run of ``k`` failures: ``(1 - p^k) / ((1-p) p^k)``."""
    _check(None, k, p)
    if p == 0.0:
        return math.inf
    if p == 1.0:
        return float(k)
    pk = p**k
    return (1.0 - pk) / ((1.0 - p) * pk) if pk > 0 else math.inf


def renewal_cycle(
    *, rate: float, k: int, p: float, timeout: float, success_threshold: int
) -> tuple[float, float]:
    """(mean seconds, mean transitions) of one trip-to-close cycle of a lone key's breaker.

    The key gets ``rate`` attempts/s, evenly spaced and answered at once, failing i.i.d. with
    ``p``. A cycle: closed until ``k`` failures in a row (``expected_attempts_to_run / rate``), then
    open for ``timeout`` and half-open; a half-open episode closes if its first
    ``success_threshold`` trials all succeed (``q = (1-p)^s``), else it opens again. Episodes until
    a close are geometric with mean ``1/q``; each costs ``timeout`` plus its trials. Transitions:
    one trip, then two per episode (to half-open, and to open or closed).
    """
    _check(None, k, p)
    if rate <= 0 or not math.isfinite(rate):
        raise ConfigError(f"rate: must be a finite number > 0 (got {rate!r})")
    if p == 1.0:
        return math.inf, math.inf
    q = (1.0 - p) ** success_threshold
    closed = expected_attempts_to_run(k, p) / rate
    # Trials of an episode: the first arrives half an interval after the half-open instant on
    # average; a failed episode ends at its first failing trial, a closing one after s trials.
    expected_trials = (1.0 - q) / p if p > 0 else float(success_threshold)
    episode = timeout + 0.5 / rate + max(0.0, expected_trials - 1.0) / rate
    seconds = closed + episode / q
    transitions = 1.0 + 2.0 / q
    return seconds, transitions


# ---------------------------------------------------------------------- confidence intervals


def _binomial_tail_at_least(x: int, n: int, p: float) -> float:
    """P(X >= x) for X ~ Binomial(n, p)."""
    if x <= 0:
        return 1.0
    if x > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    return min(
        1.0,
        math.fsum(
            math.exp(base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq)
            for i in range(x, n + 1)
        ),
    )


def _bisect(func: Callable[[float], float], target: float, rising: bool) -> float:
    """The p in [0, 1] where a monotone ``func`` crosses ``target``."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        value = func(mid)
        if (value < target) == rising:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(hits: int, trials: int, confidence: float = 0.99) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval for a binomial proportion: never too narrow."""
    if trials < 1 or not 0 <= hits <= trials:
        raise ConfigError(f"trials: need 0 <= hits <= trials and trials >= 1 (got {hits}/{trials})")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence: must be in (0, 1) (got {confidence!r})")
    alpha = 1.0 - confidence
    lower = 0.0
    upper = 1.0
    if hits > 0:  # smallest p with P(X >= hits) >= alpha/2
        lower = _bisect(lambda q: _binomial_tail_at_least(hits, trials, q), alpha / 2, rising=True)
    if hits < trials:  # largest p with P(X <= hits) >= alpha/2
        upper = _bisect(lambda q: 1.0 - _binomial_tail_at_least(hits + 1, trials, q), alpha / 2, rising=False)
    return lower, upper


# Two-sided Student t quantiles for 95 % and 99 %, by degrees of freedom (beyond 30: the normal's).
_T95 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]
_T99 = [
    63.657,
    9.925,
    5.841,
    4.604,
    4.032,
    3.707,
    3.499,
    3.355,
    3.250,
    3.169,
    3.106,
    3.055,
    3.012,
    2.977,
    2.947,
    2.921,
    2.898,
    2.878,
    2.861,
    2.845,
    2.831,
    2.819,
    2.807,
    2.797,
    2.787,
    2.779,
    2.771,
    2.763,
    2.756,
    2.750,
]


def _t_quantile(dof: int, confidence: float) -> float:
    table, normal = (_T99, 2.576) if confidence >= 0.99 else (_T95, 1.960)
    if dof <= len(table):
        return table[dof - 1]
    return normal + (table[-1] - normal) * (len(table) / dof) ** 2  # smooth toward the normal


def mean_interval(values: Sequence[float], confidence: float = 0.99) -> tuple[float, float, float]:
    """(mean, lower, upper): a Student-t interval over independent runs (one value per seed).

    Confidence levels other than 0.95 and 0.99 use the nearer of the two tables.
    """
    if not values:
        raise ConfigError("values: need at least one run")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return mean, mean, mean
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = _t_quantile(n - 1, confidence) * math.sqrt(var / n)
    return mean, mean - half, mean + half
