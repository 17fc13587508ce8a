"""``keypool demo``: watch a pool of DeepSeek keys ride out an outage, a rate limit and a revoked key.

Everything runs on this machine: a fake OpenAI-compatible upstream on a loopback port, and a real
``openai`` client (:class:`providers.AsyncDeepSeek`) pointed at it. The script breaks keys on a
timeline, heals them, and shows each key's breaker live. Timeouts are shortened so the story fits
in well under a minute; the screen says so.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from keypool import (
    BreakerConfig,
    BreakerState,
    CallRecorded,
    EventLog,
    KeyPool,
    KeySpec,
    KeyStateChanged,
    OutcomeKind,
    PoolEvent,
)
from keypool.testing import FakeUpstream, Fault, LoopbackServer

from .deepseek import AsyncDeepSeek

__all__ = ["DemoSummary", "run_demo", "run_scenario"]

PRIMARY = [f"key-{i}" for i in range(1, 7)]
BACKUP = ["backup-1", "backup-2"]
DEMO_BREAKER = BreakerConfig(failure_threshold=5, success_threshold=2, timeout=3.0, half_open_max_calls=3)
RATE_LIMIT_SECONDS = 4.0
WORKERS = 8
REQUESTS_PER_WORKER_PER_SECOND = 12.0


def _secret(key_id: str) -> str:
    return f"sk-demo-{key_id}"  # never shown: the screen names keys by key_id only


@dataclass
class DemoSummary:
    """What the demo measured, next to what the fake upstream counted."""

    requests: int = 0
    successes: int = 0
    failures: int = 0
    upstream_attempts: int = 0
    wasted_attempts: int = 0
    trips: int = 0
    recoveries: int = 0
    backup_served: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def success_rate(self) -> float:
        return self.successes / self.requests if self.requests else 1.0


@dataclass
class _Live:
    """What the display reads: counters fed by pool events and by the traffic loop."""

    started: float = field(default_factory=time.monotonic)
    phase: str = "all keys healthy"
    served: Counter[str] = field(default_factory=Counter)
    events: deque[str] = field(default_factory=lambda: deque(maxlen=8))
    recent: deque[tuple[float, bool]] = field(default_factory=lambda: deque(maxlen=4000))
    summary: DemoSummary = field(default_factory=DemoSummary)

    def on_event(self, event: PoolEvent) -> None:
        if isinstance(event, CallRecorded) and event.outcome is OutcomeKind.SUCCESS:
            self.served[event.key_id] += 1
            if event.key_id in BACKUP:
                self.summary.backup_served += 1
        elif isinstance(event, KeyStateChanged):
            if event.new is BreakerState.OPEN:
                self.summary.trips += 1
            if event.new is BreakerState.CLOSED and event.old is not BreakerState.CLOSED:
                self.summary.recoveries += 1
            t = time.monotonic() - self.started
            self.events.append(
                f"{t:5.1f}s  {event.key_id}: {event.old.label} -> {event.new.label} ({event.reason})"
            )

    def request_rate(self, window: float = 2.0) -> tuple[float, float]:
        now = time.monotonic()
        inside = [ok for t, ok in self.recent if now - t <= window]
        if not inside:
            return 0.0, 1.0
        return len(inside) / window, sum(inside) / len(inside)


def _timeline(seconds: float) -> list[tuple[float, str, Callable[[FakeUpstream, KeyPool], None]]]:
    """(when, what the screen says, what to do) — faults in the upstream, one operator action."""

    def outage(*keys: str) -> Callable[[FakeUpstream, KeyPool], None]:
        def act(up: FakeUpstream, _pool: KeyPool) -> None:
            for k in keys:
                up.set_fault(_secret(k), Fault.status(503))

        return act

    def heal(*keys: str) -> Callable[[FakeUpstream, KeyPool], None]:
        def act(up: FakeUpstream, _pool: KeyPool) -> None:
            for k in keys:
                up.clear_fault(_secret(k))

        return act

    def rate_limit(up: FakeUpstream, _pool: KeyPool) -> None:
        up.set_fault(_secret("key-3"), Fault.rate_limited(RATE_LIMIT_SECONDS))

    def revoke(up: FakeUpstream, _pool: KeyPool) -> None:
        up.set_fault(_secret("key-4"), Fault.rejected())

    def rotate(up: FakeUpstream, pool: KeyPool) -> None:
        up.clear_fault(_secret("key-4"))
        pool.reset("deepseek", "key-4")

    return [
        (0.12, "outage: key-1 and key-2 answer 503", outage("key-1", "key-2")),
        (0.25, f"rate limit: key-3 answers 429, retry after {RATE_LIMIT_SECONDS:g} s", rate_limit),
        (0.35, "key-4 is revoked upstream (401): quarantined, no auto-retry", revoke),
        (0.45, "key-5 fails too: under half the primaries healthy, backups step in", outage("key-5")),
        (
            0.62,
            "key-1, key-2, key-5 recover: half-open probes close their breakers",
            heal("key-1", "key-2", "key-5"),
        ),
        (0.64, "key-3's rate limit lifts", heal("key-3")),
        (0.80, "operator rotates key-4 and resets its breaker", rotate),
    ]


async def run_scenario(
    seconds: float = 40.0,
    *,
    on_tick: Callable[[_Live, KeyPool], None] | None = None,
    upstream: FakeUpstream | None = None,
    event_log: EventLog | None = None,
) -> tuple[DemoSummary, FakeUpstream]:
    """Drive the whole story for ``seconds`` and return the summary and the upstream's counters.

    ``event_log`` (if given) receives every pool event, for ``keypool tune``.
    """
    secrets = [_secret(k) for k in PRIMARY + BACKUP]
    upstream = upstream or FakeUpstream(secrets, flavor="deepseek")
    live = _Live()
    pool = KeyPool(hooks=[live.on_event, *([event_log] if event_log is not None else [])])
    pool.add_provider(
        {
            "name": "deepseek",
            "keys": [KeySpec(secret=_secret(k), key_id=k) for k in PRIMARY]
            + [KeySpec(secret=_secret(k), key_id=k, tier="backup") for k in BACKUP],
            "breaker": DEMO_BREAKER,
        }
    )
    if event_log is not None:
        event_log.describe(pool)
    summary = live.summary
    with LoopbackServer(upstream) as server:
        client = AsyncDeepSeek(pool=pool, base_url=server.base_url, timeout=5.0)
        end = live.started + seconds
        steps = iter(_timeline(seconds))
        pending = next(steps, None)

        async def traffic(worker: int) -> None:
            n = 0
            pause = 1.0 / REQUESTS_PER_WORKER_PER_SECOND
            while time.monotonic() < end:
                n += 1
                try:
                    await client.chat.completions.create(
                        model="deepseek-chat",
                        messages=[{"role": "user", "content": f"request {worker}-{n}"}],
                    )
                    summary.successes += 1
                    live.recent.append((time.monotonic(), True))
                except Exception as exc:
                    summary.failures += 1
                    summary.errors[type(exc).__name__] += 1
                    live.recent.append((time.monotonic(), False))
                summary.requests += 1
                await anyio.sleep(pause)

        async with anyio.create_task_group() as group:
            for worker in range(WORKERS):
                group.start_soon(traffic, worker)
            while time.monotonic() < end:
                elapsed = time.monotonic() - live.started
                while pending is not None and elapsed >= pending[0] * seconds:
                    live.phase = pending[1]
                    live.events.append(f"{elapsed:5.1f}s  >> {pending[1]}")
                    pending[2](upstream, pool)
                    pending = next(steps, None)
                if on_tick is not None:
                    on_tick(live, pool)
                await anyio.sleep(0.1)
        pool.poll()
        await client.close()
    summary.upstream_attempts = upstream.total_requests()
    summary.wasted_attempts = sum(
        count
        for secret in secrets
        for status, count in upstream.counters(secret).by_status.items()
        if status != 200
    )
    return summary, upstream


def _render(live: _Live, pool: KeyPool, seconds: float) -> object:
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    colours = {"closed": "green", "half_open": "yellow", "open": "red"}
    table = Table(expand=True, title="keys of provider 'deepseek'")
    for column in ("key", "tier", "breaker", "why", "failures", "served", "back in"):
        table.add_column(column)
    for row in pool.stats("deepseek"):
        state = row["state"]
        why = row["open_reason"] if state != "closed" else ""
        if row["quarantined"]:
            why = f"quarantined ({why})"
        back = "" if state == "closed" or row["retry_in"] is None else f"{row['retry_in']:.1f}s"
        if row["quarantined"]:
            back = "reset needed"
        table.add_row(
            row["key_id"],
            row["tier"],
            Text(state.upper(), style=f"bold {colours[state]}"),
            why or "",
            str(row["failure_count"]),
            str(live.served[row["key_id"]]),
            back,
        )
    cap = pool.capacity("deepseek")
    rate, ok = live.request_rate()
    elapsed = time.monotonic() - live.started
    head = Text.assemble(
        (f"keypool demo  {elapsed:4.1f}/{seconds:.0f}s", "bold"),
        f"   capacity: {cap.status} ({cap.closed}/{cap.total} closed)",
        f"   backups {'ACTIVE' if cap.backup_active else 'idle'}",
        f"\nrequests/s: {rate:5.1f}   success rate (2 s): {ok:6.1%}   total: {live.summary.requests}"
        f"   failed: {live.summary.failures}",
        ("\nnow: " + live.phase, "cyan"),
        (
            f"\ndemo timings: breaker timeout {DEMO_BREAKER.timeout:g} s (default 60 s), "
            f"failure_threshold {DEMO_BREAKER.failure_threshold}, "
            f"success_threshold {DEMO_BREAKER.success_threshold}",
            "dim",
        ),
    )
    log = Text("\n".join(live.events) or "(no transitions yet)")
    return Group(Panel(head), table, Panel(log, title="breaker transitions"))


def _print_summary(summary: DemoSummary) -> None:
    lines = [
        "",
        "keypool demo: summary",
        f"  requests sent by the app      {summary.requests}",
        f"  answered successfully         {summary.successes} ({summary.success_rate:.2%})",
        f"  failed                        {summary.failures}"
        + (f"  {dict(summary.errors)}" if summary.errors else ""),
        f"  attempts reaching upstream    {summary.upstream_attempts}",
        f"  attempts wasted on bad keys   {summary.wasted_attempts}  (each was retried on another key)",
        f"  breaker trips                 {summary.trips}",
        f"  recoveries (back to closed)   {summary.recoveries}",
        f"  served by backup keys         {summary.backup_served}",
        "",
        "Every key was named by its id; no secret was printed. Real timeouts are 60 s; the demo used "
        f"{DEMO_BREAKER.timeout:g} s.",
    ]
    print("\n".join(lines))


def run_demo(seconds: float = 40.0, *, quiet: bool = False, event_log: str | None = None) -> int:
    """The ``keypool demo`` command. Returns 0 when no request failed.

    ``event_log``: a path to write the pool's events to as JSON lines (``keypool tune`` reads it).
    """
    if seconds <= 0 or seconds > 600:
        print("--seconds: must be in (0, 600]")
        return 2
    log = None
    if event_log is not None:
        try:
            log = EventLog(event_log)
        except OSError as exc:
            print(f"--event-log: cannot write {event_log!r}: {exc.strerror or exc}")
            return 2
    try:
        return _run_demo(seconds, quiet, log)
    finally:
        if log is not None:
            log.close()
            print(f"event log: {log.lines} lines in {event_log} (keypool tune {event_log})")


def _run_demo(seconds: float, quiet: bool, log: EventLog | None) -> int:
    if quiet:
        summary, _ = anyio.run(lambda: run_scenario(seconds, event_log=log))
    else:
        from rich.console import Console
        from rich.live import Live

        console = Console()
        with Live(console=console, refresh_per_second=8, transient=False) as display:

            def tick(live: _Live, pool: KeyPool) -> None:
                display.update(_render(live, pool, seconds))  # type: ignore[arg-type]

            summary, _ = anyio.run(lambda: run_scenario(seconds, on_tick=tick, event_log=log))
    _print_summary(summary)
    return 0 if summary.failures == 0 else 1
