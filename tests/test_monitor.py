"""``providers.HealthMonitor``: rounds of probes through the breakers, on a fake clock.

The pool and the monitor share one ``FakeClock``; a test drives rounds with ``run_once()`` and
moves the clock in steps of the interval, so the recovery bound (open timeout + one interval) is
checked exactly. Probes go to a ``FakeUpstream`` in-process, which counts every request per key.
One test runs the monitor for real (``async with``) to show it starts and stops cleanly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import httpx2
import pytest
from pydantic import SecretStr

from keypool import BreakerConfig, CallRejected, ConfigError, KeyPool, KeySpec, KeyStateChanged, PoolEvent
from keypool.testing import FakeClock, FakeUpstream, Fault
from providers import AsyncDeepSeek, HealthReport
from providers.mcp import MCPClient, MCPEndpoint
from providers.monitor import HealthMonitor
from tests.mcp_servers import McpReplica

pytestmark = pytest.mark.anyio

SECRETS = {"alpha": "sk-mon-alpha-1f9c", "bravo": "sk-mon-bravo-8e2d", "charlie": "sk-mon-charlie-3a7b"}
OPEN_TIMEOUT = 30.0
THRESHOLD = 5


@dataclass
class Rig:
    clock: FakeClock
    pool: KeyPool
    upstream: FakeUpstream
    client: AsyncDeepSeek
    events: list[PoolEvent] = field(default_factory=list)

    def state(self, key_id: str) -> str:
        return str(self.pool.key_stats(key_id, "deepseek")["state"])

    def requests(self, key_id: str) -> int:
        return self.upstream.counters(SECRETS[key_id]).requests

    def skipped_events(self, key_id: str) -> int:
        return sum(
            1
            for e in self.events
            if isinstance(e, CallRejected) and e.reason == "probe_skipped" and e.key_id == key_id
        )

    def opened_at(self, key_id: str) -> float:
        return [e.at for e in self.events if isinstance(e, KeyStateChanged) and e.key_id == key_id][-1]


def build_rig(clock: FakeClock | None = None) -> Rig:
    events: list[PoolEvent] = []
    pool = KeyPool(clock=clock, hooks=[events.append])
    pool.add_provider(
        {
            "name": "deepseek",
            "keys": [KeySpec(secret=SecretStr(s), key_id=k) for k, s in SECRETS.items()],
            "breaker": BreakerConfig(failure_threshold=THRESHOLD, timeout=OPEN_TIMEOUT),
        }
    )
    upstream = FakeUpstream(SECRETS.values(), flavor="deepseek")
    client = AsyncDeepSeek(
        pool=pool, base_url="http://deepseek.test", transport=httpx2.ASGITransport(app=upstream)
    )
    return Rig(clock if isinstance(clock, FakeClock) else FakeClock(), pool, upstream, client, events)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    built = build_rig(FakeClock())
    try:
        yield built
    finally:
        await built.client.close()


def row(reports: list[HealthReport], key_id: str) -> str:
    return next(k.result for r in reports for k in r.keys if k.key_id == key_id)


async def trip_with_probes(rig: Rig, monitor: HealthMonitor) -> int:
    """Rounds, ``interval`` apart, until bravo's failing probes open its breaker; returns rounds."""
    rig.upstream.set_fault(SECRETS["bravo"], Fault.status(503))
    rounds = 0
    while rig.state("bravo") != "open":
        if rounds:
            rig.clock.advance(monitor.interval)
        reports = await monitor.run_once()
        rounds += 1
        assert row(reports, "alpha") == "ok"
        assert row(reports, "bravo") == "failed"
    return rounds


@pytest.mark.parametrize("interval", [5.0, 7.0, 13.0])
async def test_a_healed_key_is_back_within_open_timeout_plus_one_interval(rig: Rig, interval: float) -> None:
    monitor = HealthMonitor([rig.client], interval=interval, clock=rig.clock)
    assert await trip_with_probes(rig, monitor) == THRESHOLD
    opened = rig.opened_at("bravo")
    assert opened == rig.clock.now()
    rig.upstream.clear_fault(SECRETS["bravo"])  # the key works again from now on
    sent_while_open = rig.requests("bravo")

    closed_at = None
    while closed_at is None:
        rig.clock.advance(interval)
        reports = await monitor.run_once()
        now = rig.clock.now()
        if now < opened + OPEN_TIMEOUT:  # the breaker does not admit a probe yet
            assert row(reports, "bravo") == "skipped"
            assert rig.requests("bravo") == sent_while_open
            assert rig.state("bravo") == "open"
        elif rig.state("bravo") == "closed":
            closed_at = now
        assert now <= opened + OPEN_TIMEOUT + interval, "not back within timeout + one interval"
    assert opened + OPEN_TIMEOUT <= closed_at <= opened + OPEN_TIMEOUT + interval
    assert rig.requests("bravo") == sent_while_open + 2  # success_threshold trials in one round
    changes = [(e.old.label, e.new.label) for e in rig.events if isinstance(e, KeyStateChanged)]
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


async def test_no_probe_reaches_an_open_key_and_skips_are_counted(rig: Rig) -> None:
    monitor = HealthMonitor([rig.client], interval=4.0, clock=rig.clock)
    await trip_with_probes(rig, monitor)  # bravo stays broken this time
    opened, sent = rig.opened_at("bravo"), rig.requests("bravo")
    skipped_rounds = 0
    for _ in range(30):  # 120 s: several open periods
        rig.clock.advance(monitor.interval)
        reports = await monitor.run_once()
        report = reports[0]
        now = rig.clock.now()
        if row(reports, "bravo") == "skipped":
            skipped_rounds += 1
            assert report.skipped == 1
            assert monitor.skipped == 1
            assert (report.ok, report.failed) == (2, 0)
            assert rig.requests("bravo") == sent  # nothing was sent to the open key
        else:
            assert now >= opened + OPEN_TIMEOUT  # probed only once its breaker admits a trial
            assert rig.requests("bravo") == sent + 1  # one trial, which fails and re-opens it
            assert rig.state("bravo") == "open"
            opened, sent = rig.opened_at("bravo"), rig.requests("bravo")
            assert opened == now
    assert skipped_rounds >= 20
    assert rig.skipped_events("bravo") == skipped_rounds
    assert rig.skipped_events("alpha") == rig.skipped_events("charlie") == 0
    assert monitor.rounds == THRESHOLD + 30


async def test_a_target_whose_check_raises_does_not_kill_the_monitor(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        calls = 0

        async def health_check(self) -> HealthReport:
            self.calls += 1
            raise RuntimeError("probe machinery exploded")

        def __repr__(self) -> str:
            return "Broken()"

    broken = Broken()
    monitor = HealthMonitor([broken, rig.client, broken], interval=1.0, clock=rig.clock)
    for _ in range(3):
        reports = await monitor.run_once()
        assert [r.provider for r in reports] == ["deepseek"]
        assert reports[0].ok == 3
        rig.clock.advance(1.0)
    assert (monitor.rounds, monitor.errors, broken.calls) == (3, 6, 6)
    assert "health check of Broken() failed" in caplog.text
    assert "probe machinery exploded" in caplog.text


async def test_the_monitor_runs_in_the_background_and_stops_cleanly() -> None:
    rig = build_rig()  # real clock: a short real run
    try:
        rig.upstream.set_fault(SECRETS["charlie"], Fault.status(503))

        class Broken:
            async def health_check(self) -> HealthReport:
                raise RuntimeError("always")

        async with HealthMonitor([Broken(), rig.client], interval=0.02) as monitor:
            with anyio.fail_after(5):
                while monitor.rounds < 5:  # noqa: ASYNC110 -- the monitor has no event to wait on
                    await anyio.sleep(0.01)
            assert monitor.errors >= 5
        stopped_at = monitor.rounds
        assert rig.state("charlie") == "open"  # probes alone tripped it
        assert rig.requests("charlie") == THRESHOLD
        await anyio.sleep(0.1)
        assert monitor.rounds == stopped_at  # nothing runs after the block
        assert rig.pool.capacity("deepseek").in_flight == 0
        with pytest.raises(KeyError, match="caller"):
            async with HealthMonitor([rig.client], interval=0.02):
                raise KeyError("the caller's own error")  # propagates as is, not in a group
    finally:
        await rig.client.close()


async def test_leaving_the_block_mid_probe_gives_the_slot_back() -> None:
    rig = build_rig()
    try:
        rig.upstream.set_fault(SECRETS["alpha"], Fault.slow(5))
        async with HealthMonitor([rig.client], interval=10) as monitor:
            with anyio.fail_after(5):
                while rig.pool.capacity("deepseek").in_flight == 0:  # noqa: ASYNC110 -- polled state
                    await anyio.sleep(0.005)
        assert monitor.rounds == 0
        assert rig.pool.capacity("deepseek").in_flight == 0
        assert all(row["failure_count"] == 0 for row in rig.pool.stats())
    finally:
        await rig.client.close()


async def test_an_mcp_endpoint_is_back_within_one_round_after_its_timeout() -> None:
    clock = FakeClock()
    events: list[PoolEvent] = []
    pool = KeyPool(clock=clock, hooks=[events.append])
    async with McpReplica(token="mcp-monitor-token-6d") as replica:
        endpoint = MCPEndpoint(replica.url, SecretStr("mcp-monitor-token-6d"), "east")
        tools = MCPClient("tools", [endpoint], pool=pool, breaker=BreakerConfig(timeout=OPEN_TIMEOUT))
        async with tools:
            monitor = HealthMonitor([tools], interval=10, clock=clock)
            pool.trip("tools", "east")
            before = replica.request_count
            for _ in range(2):
                clock.advance(10)
                reports = await monitor.run_once()
                assert row(reports, "east") == "skipped"
            assert replica.request_count == before
            clock.advance(10)  # 30 s: the open timeout has passed
            reports = await monitor.run_once()
            assert reports[0].keys[0].result == "ok"
            assert pool.key_stats("east")["state"] == "closed"
    assert [e.key_id for e in events if isinstance(e, CallRejected) and e.reason == "probe_skipped"] == [
        "east",
        "east",
    ]


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="interval"):
        HealthMonitor([], interval=0)
