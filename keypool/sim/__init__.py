"""keypool.sim: the real pool on a fake clock, under scripted traffic and faults.

:func:`simulate` runs a :class:`Scenario` (providers with their keys and breaker settings, traffic,
fault processes) through a real :class:`~keypool.KeyPool` in virtual time, deterministically for a
seed. :func:`run_probability` and its neighbours are the exact figures the simulator is checked
against. The ``keypool study`` and ``keypool tune`` commands are built on these. The core only:
nothing here imports ``providers``.
"""

from ._engine import Answers, SimResult, Simulation, StateChange, simulate
from ._exact import (
    clopper_pearson,
    expected_attempts_to_run,
    mean_interval,
    poisson_run_probability,
    renewal_cycle,
    run_probability,
    run_probability_curve,
)
from ._faults import Answer, FaultProcess
from ._scenario import (
    Blips,
    CallerErrors,
    FailureRate,
    Fault,
    Flapping,
    Latency,
    Outage,
    Scenario,
    SimKey,
    SimProvider,
    Throttle,
    Traffic,
)

__all__ = [
    "Answer",
    "Answers",
    "Blips",
    "CallerErrors",
    "FailureRate",
    "Fault",
    "FaultProcess",
    "Flapping",
    "Latency",
    "Outage",
    "Scenario",
    "SimKey",
    "SimProvider",
    "SimResult",
    "Simulation",
    "StateChange",
    "Throttle",
    "Traffic",
    "clopper_pearson",
    "expected_attempts_to_run",
    "mean_interval",
    "poisson_run_probability",
    "renewal_cycle",
    "run_probability",
    "run_probability_curve",
    "simulate",
]
