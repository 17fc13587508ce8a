"""PNG plots of a study document (matplotlib, the ``study`` extra, imported only here and lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._errors import ConfigError
from ._exact import run_probability, run_probability_curve

__all__ = ["PLOTS", "write_plots"]

PLOTS = {
    "false_trips": "false-trips.png",
    "validation": "false-trips-validation.png",
    "time_to_trip": "time-to-trip.png",
    "recovery": "recovery.png",
    "flapping": "transitions.png",
    "waste": "wasted-attempts.png",
}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "plots need matplotlib: pip install 'keypool[study]' (or pass --no-plots)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: stable bytes


def write_plots(doc: dict[str, Any], out: Path) -> list[Path]:
    """Draw every plot the document has data for into ``out``; returns the files written."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    drawers = {
        "false_trips": _false_trips,
        "validation": _validation,
        "time_to_trip": _time_to_trip,
        "recovery": _recovery,
        "flapping": _flapping,
        "waste": _waste,
    }
    for name, draw in drawers.items():
        fig = draw(plt, doc)
        if fig is None:
            continue
        path = out / PLOTS[name]
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def _false_trips(plt: Any, doc: dict[str, Any]) -> Any:
    section = doc.get("false_trips")
    if not section:
        return None
    p = section["failure_rate"]
    rate = section["one_key"]["rate_per_key"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    windows = [10 ** (e / 20) for e in range(0, 20 * 5 + 1)]  # 1 s .. 1 day, log-spaced
    windows = [w for w in windows if w <= 86_400] + [86_400.0]
    for k, colour in zip((3, 5, 7, 10), ("C3", "C1", "C2", "C0"), strict=True):
        ys = [max(run_probability(int(rate * w), k, p), 1e-16) for w in windows]
        ax.plot(windows, ys, color=colour, label=f"failure_threshold {k} (exact)")
        for row in section["one_key"]["rows"]:
            if row["failure_threshold"] != k:
                continue
            lo, hi = row["ci"]
            est = row["estimate"]
            if row["hits"]:
                ax.errorbar([row["window_s"]], [est], yerr=[[est - lo], [hi - est]], fmt="o", color=colour)
            else:
                ax.plot([row["window_s"]], [hi], marker="v", color=colour, linestyle="none")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(1e-12, 2)
    ax.set_xlabel("window (s), one key at 50 attempts/s")
    ax.set_ylabel("P(at least one false trip)")
    ax.set_title(f"False trips at {100 * (1 - p):g} % success: exact (lines), simulated (points)")
    for x, label in ((60, "1 min"), (300, "5 min"), (3600, "1 h"), (86_400, "1 day")):
        ax.axvline(x, color="0.85", linewidth=0.8, zorder=0)
        ax.text(x, 1.2e-12, label, fontsize=7, ha="center", color="0.4")
    ax.legend(fontsize=8, loc="lower right")
    ax.text(
        0.01,
        0.98,
        "triangles: upper end of the simulated interval (no trip seen)",
        transform=ax.transAxes,
        fontsize=7,
        va="top",
        color="0.3",
    )
    return fig


def _validation(plt: Any, doc: dict[str, Any]) -> Any:
    section = doc.get("false_trips", {}).get("validation")
    if not section:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    rate = doc["false_trips"]["one_key"]["rate_per_key"]
    for i, row in enumerate(r for r in section["rows"] if "first_trip_times" in r):
        k, p, n = row["failure_threshold"], row["failure_rate"], row["trials"]
        colour = f"C{i}"
        curve = run_probability_curve(int(rate * 60), k, p)
        ax.plot([m / rate for m in range(len(curve))], curve, color=colour, label=f"k={k}, p={p:g} exact")
        times = row["first_trip_times"]
        xs = [0.0] + [t for t in times for _ in (0, 1)] + [60.0]
        ys = [0.0] + [v for j in range(len(times)) for v in (j / n, (j + 1) / n)] + [len(times) / n]
        ax.plot(
            xs, ys, color=colour, linestyle="--", linewidth=1, label=f"k={k}, p={p:g} simulated ({n} seeds)"
        )
    ax.set_xlabel("seconds (one key at 50 attempts/s)")
    ax.set_ylabel("P(first false trip before t)")
    ax.set_title("Simulated first-trip times against the exact run-length probability")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    return fig


def _time_to_trip(plt: Any, doc: dict[str, Any]) -> Any:
    section = doc.get("time_to_trip")
    if not section:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {"fast": "-", "timeout": ":"}
    for j, setup in enumerate(section["setups"]):
        for mode, style in styles.items():
            rows = [r for r in section["rows"] if r["setup"] == setup and r["failure"] == mode]
            ks = [r["failure_threshold"] for r in rows]
            means = [r["delay_s"]["mean"] for r in rows]
            ax.plot(ks, means, linestyle=style, marker="o", color=f"C{j}", label=f"{setup}, {mode}")
    ax.set_yscale("log")
    ax.set_xlabel("failure_threshold")
    ax.set_ylabel("seconds from outage start to trip")
    ax.set_title("Detection delay of a persistent outage (50 req/s)")
    ax.legend(fontsize=7)
    return fig


def _recovery(plt: Any, doc: dict[str, Any]) -> Any:
    section = doc.get("recovery")
    if not section:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, outage, field, title in (
        (axes[0], "blip", "out_of_service_s", "5 s blip: trip to close"),
        (axes[1], "long", "after_heal_s", "30-300 s outage: heal to close"),
    ):
        for s, offset in zip((1, 2, 3), (-0.25, 0.0, 0.25), strict=True):
            rows = [r for r in section["rows"] if r["outage"] == outage and r["success_threshold"] == s]
            xs = [i + offset for i in range(len(rows))]
            means = [r[field]["mean"] for r in rows]
            errs = [
                [m - r[field]["ci"][0] for m, r in zip(means, rows, strict=True)],
                [r[field]["ci"][1] - m for m, r in zip(means, rows, strict=True)],
            ]
            ax.bar(xs, means, width=0.25, yerr=errs, label=f"success_threshold {s}", capsize=2)
        ax.set_xticks(range(3), [f"timeout {int(t)} s" for t in (30, 60, 120)])
        ax.set_ylabel("seconds")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("Recovery, one key at 50 attempts/s in a 95 % success mix", fontsize=10)
    return fig


def _flapping(plt: Any, doc: dict[str, Any]) -> Any:
    section = doc.get("flapping")
    if not section:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    rows = section["iid"]["rows"]
    for j, k in enumerate(sorted({r["failure_threshold"] for r in rows})):
        mine = [r for r in rows if r["failure_threshold"] == k]
        ps = [r["failure_rate"] for r in mine]
        means = [r["per_minute"]["mean"] for r in mine]
        errs = [
            [m - r["per_minute"]["ci"][0] for m, r in zip(means, mine, strict=True)],
            [r["per_minute"]["ci"][1] - m for m, r in zip(means, mine, strict=True)],
        ]
        ax.errorbar(ps, means, yerr=errs, fmt="o", color=f"C{j}", capsize=2, label=f"k={k} simulated")
        ax.plot(
            ps, [r["renewal_per_minute"] for r in mine], color=f"C{j}", linewidth=1, label=f"k={k} renewal"
        )
    ax.set_xlabel("i.i.d. failure rate")
    ax.set_ylabel("transitions per minute (one key)")
    ax.set_title(f"Transitions under intermittent failures (timeout 60 s, {section['window_s']:g} s windows)")
    ax.legend(fontsize=7, ncol=2)
    return fig


def _waste(plt: Any, doc: dict[str, Any]) -> Any:
    waste = doc.get("wasted_attempts")
    half = doc.get("half_open_max_calls")
    if not waste or not half:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.2))
    ax = axes[0]
    for j, timeout in enumerate((30.0, 60.0, 120.0)):
        for mode, style in (("fast", "-"), ("timeout", ":")):
            rows = [
                r
                for r in waste["rows"]
                if r["timeout"] == timeout and r["failure"] == mode and r["failure_threshold"] is not None
            ]
            ax.plot(
                [r["failure_threshold"] for r in rows],
                [r["wasted_attempts"]["mean"] for r in rows],
                linestyle=style,
                marker="o",
                color=f"C{j}",
                label=f"timeout {int(timeout)} s, {mode}",
            )
    ax.set_yscale("log")
    ax.set_xlabel("failure_threshold")
    ax.set_ylabel(f"attempts sent to a dead upstream ({waste['outage_s']:g} s outage)")
    ax.set_title("4 keys, 50 req/s, provider-wide outage", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    for j, mode in enumerate(("fast", "timeout")):
        rows = [r for r in half["rows"] if r["failure"] == mode and r["success_threshold"] == 2]
        ax.plot(
            [r["half_open_max_calls"] for r in rows],
            [r["failed_trials_per_probe"]["mean"] for r in rows],
            marker="o",
            color=f"C{j}",
            label=f"{mode}: failed trials per probe",
        )
    ax.set_xlabel("half_open_max_calls")
    ax.set_ylabel("failed trial calls per half-open probe")
    ax.set_title("Probing a still-dead key (answers take 1 s)", fontsize=10)
    ax.legend(fontsize=7)
    return fig
