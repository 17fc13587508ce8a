"""End to end with a real Prometheus: it scrapes the admin app of a pool, the rules in
``ops/prometheus/alerts.yml`` fire while keys are broken and resolve after healing, and every PromQL
expression of the dashboard and of ``docs/runbook.md`` parses and returns data.

Real time runs here (Prometheus cannot be given a fake clock), so the alert rules are loaded with
their ``for:`` durations and windows scaled down by about 40 (2 m -> 3 s, 5 m -> 8 s, 10 m -> 15 s),
breakers use timeouts of a second or less, and Prometheus scrapes and evaluates every second; the
expressions themselves are the shipped ones.

The hanging-trials test prints the alert timings it measured (run with ``-s`` to see them).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from prometheus_client import CollectorRegistry

from keypool import BreakerConfig, KeyPool, KeyPoolTransport, KeySpec, NoKeyAvailable
from keypool.admin import create_app
from keypool.testing import FakeUpstream, Fault, LoopbackServer
from tests.test_ops_rules import (
    ALERTS,
    DASHBOARD,
    RUNBOOK,
    _dashboard_exprs,
    require_binary,
    running_prometheus,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ALERT_NAMES = {
    "AllKeysCircuitBreakerOpen",
    "MajorityKeysCircuitBreakerOpen",
    "CircuitBreakerFlapping",
    "CircuitBreakerStuckHalfOpen",
}
SHORTER = {"for: 2m": "for: 3s", "for: 5m": "for: 8s", "[10m]": "[15s]"}
SCRAPE = "1s"  # scrape and evaluation interval (a scrape that times out would make the series stale)


def shortened_rules(target: Path) -> Path:
    text = ALERTS.read_text()
    for long, short in SHORTER.items():
        assert long in text, long
        text = text.replace(long, short)
    target.write_text(text)
    return target


@contextlib.contextmanager
def prometheus_scraping(pool: KeyPool, workdir: Path) -> Iterator[str]:
    """The pool's admin app on a loopback port, a real Prometheus scraping it with the shortened
    rules; yields Prometheus's base URL."""
    binary = require_binary("prometheus")
    app = create_app(pool, token="e2e-admin-token", registry=CollectorRegistry())
    with LoopbackServer(app) as admin:
        target = admin.base_url.removeprefix("http://")
        rules = shortened_rules(workdir / "alerts.yml")
        config = workdir / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": SCRAPE, "evaluation_interval": SCRAPE},
                    "rule_files": [str(rules)],
                    "scrape_configs": [{"job_name": "keypool", "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        with running_prometheus(binary, config, workdir) as base_url:
            yield base_url


def query(base_url: str, expr: str) -> dict[str, Any]:
    url = f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=10) as response:
        result: dict[str, Any] = json.load(response)
    return result


def scalar(base_url: str, expr: str) -> float | None:
    """The value of a query that returns at most one sample."""
    result = query(base_url, expr)["data"]["result"]
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


def alerts(base_url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{base_url}/api/v1/alerts", timeout=10) as response:
        found: list[dict[str, Any]] = json.load(response)["data"]["alerts"]
    return found


def firing(base_url: str) -> set[tuple[str, str]]:
    return {
        (a["labels"]["alertname"], a["labels"].get("provider", ""))
        for a in alerts(base_url)
        if a["state"] == "firing"
    }


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def runbook_queries() -> list[str]:
    blocks = re.findall(r"^```promql\n(.*?)^```", RUNBOOK.read_text(), flags=re.MULTILINE | re.DOTALL)
    return [block.strip().replace("<KEY_ID>", "ds-0") for block in blocks]


# ------------------------------------------------------------------ every alert, every query


def build_pool() -> KeyPool:
    pool = KeyPool()
    slow = BreakerConfig(timeout=600, max_timeout=600)
    pool.add_provider(
        {
            "name": "deepseek",
            "keys": [KeySpec(secret=f"sk-e2e-deepseek-{i}", key_id=f"ds-{i}") for i in range(4)],
            "breaker": slow,
            "probation": 0,
        }
    )
    pool.add_provider(
        {
            "name": "perplexity",
            "keys": [KeySpec(secret="sk-e2e-perplexity-0", key_id="px-0")],
            "breaker": BreakerConfig(timeout=1.0),
            "probation": 0,
        }
    )
    pool.add_provider(
        {
            "name": "tools",
            "keys": [
                KeySpec(secret="sk-e2e-tools-0", key_id="tool-0"),
                KeySpec(secret="sk-e2e-tools-1", key_id="tool-1"),
            ],
            # The runbook's first flapping cause: a threshold far too sensitive for the errors.
            "breaker": BreakerConfig(failure_threshold=1, timeout=0.2),
            "probation": 0,
        }
    )
    return pool


class Flapper:
    """Intermittent failures on one tools key whose breaker trips on the first one: it fails a
    call, opens, half-opens 0.2 s later, its trials succeed and close it, and the next call fails
    again."""

    def __init__(self, pool: KeyPool) -> None:
        self.pool = pool
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.03):
            lease = self.pool.try_acquire_key("tools", "tool-0")
            if lease is None:
                continue
            if lease.trial:
                lease.success()
            else:
                lease.failure("intermittent")


def test_alerts_fire_and_resolve_and_every_documented_query_returns_data(tmp_path: Path) -> None:
    pool = build_pool()
    with prometheus_scraping(pool, tmp_path) as prometheus:
        # Healthy traffic first, so request, success and latency series exist.
        for _ in range(20):
            pool.try_acquire("deepseek").success()
            pool.try_acquire("tools", exclude=["tool-0"]).success()
        wait_for(lambda: bool(query(prometheus, "circuit_breaker_state")["data"]["result"]), 30, "a scrape")
        # The refusal counters are there, at zero, before the first refusal.
        breaker_open = 'keypool_rejected_calls_total{provider="deepseek",reason="open"}'
        assert scalar(prometheus, breaker_open) == 0

        # Break things: DeepSeek's keys fail until every one is open; Perplexity's key goes
        # half-open and stays there (its trial never reports back); a tools key flaps.
        for key_id in pool.key_ids("deepseek"):
            for _ in range(5):
                pool.try_acquire(
                    "deepseek", exclude=[k for k in pool.key_ids("deepseek") if k != key_id]
                ).failure()
        with pytest.raises(NoKeyAvailable):
            pool.try_acquire("deepseek")  # a refused call: the first of its series
        for _ in range(5):
            pool.try_acquire("perplexity").failure()
        time.sleep(1.1)
        trial = pool.try_acquire("perplexity")
        assert trial.trial
        trial.release()  # a half-open call that decides nothing: the breaker stays half-open
        flapper = Flapper(pool)
        flapper.thread.start()
        try:
            wait_for(
                lambda: {name for name, _ in firing(prometheus)} >= ALERT_NAMES,
                60,
                f"all four alerts to fire (firing now: {firing(prometheus)})",
            )
            active = firing(prometheus)
            assert ("AllKeysCircuitBreakerOpen", "deepseek") in active
            assert ("MajorityKeysCircuitBreakerOpen", "deepseek") in active
            assert ("CircuitBreakerStuckHalfOpen", "perplexity") in active
            # Perplexity's only key is half-open: that is no capacity either.
            assert ("AllKeysCircuitBreakerOpen", "perplexity") in active
            assert ("CircuitBreakerFlapping", "tools") in active
            assert ("AllKeysCircuitBreakerOpen", "tools") not in active
            assert ("CircuitBreakerFlapping", "deepseek") not in active  # tripped once, not flapping
            # Zero samples first, so increase() counts the first refusal.
            first_burst = scalar(prometheus, f"increase({breaker_open}[1m])")
            assert first_burst is not None
            assert first_burst > 0

            # Every query an operator is told to run parses and returns data while things are broken.
            dashboard = json.loads(DASHBOARD.read_text())
            expressions = list(_dashboard_exprs(dashboard).values()) + runbook_queries()
            assert len(expressions) > 20
            empty = []
            for expr in expressions:
                answer = query(prometheus, expr)
                assert answer["status"] == "success", (expr, answer)
                if not answer["data"]["result"]:
                    empty.append(expr)
            assert empty == [], f"queries that returned no data: {empty}"
        finally:
            flapper.stop.set()
            flapper.thread.join()

        # Heal: operators reset every breaker and traffic succeeds again; the alerts resolve.
        pool.reset()
        for _ in range(10):
            pool.try_acquire("deepseek").success()
        wait_for(
            lambda: not {name for name, _ in firing(prometheus)} & (ALERT_NAMES - {"CircuitBreakerFlapping"}),
            30,
            "the capacity and half-open alerts to resolve",
        )
        wait_for(lambda: not firing(prometheus), 60, "flapping to resolve once its window has passed")


# ------------------------------------------------------------------ an outage of hanging trials


@dataclass
class Traffic:
    """Callers sending chat completions through the pool's transport, from a thread of their own.

    Each request may take 3 s in all and each attempt 1 s (the transport's own limits), so a call
    to a key that hangs fails over after a second, and a trial that hangs fails after a second.
    """

    pool: KeyPool
    base_url: str
    callers: int = 6
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the callers did not stop"
        assert not self.errors, self.errors

    def _run(self) -> None:
        try:
            anyio.run(self._main)
        except BaseException as exc:  # reported by __exit__
            self.errors.append(exc)

    async def _main(self) -> None:
        transport = KeyPoolTransport(self.pool, "deepseek", timeout=3.0, attempt_timeout=1.0)
        async with (
            httpx2.AsyncClient(transport=transport, base_url=self.base_url) as client,
            anyio.create_task_group() as tasks,
        ):
            for _ in range(self.callers):
                tasks.start_soon(self._caller, client)

    async def _caller(self, client: httpx2.AsyncClient) -> None:
        body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hello"}]}
        while not self.stop.is_set():
            try:
                response = await client.post("/chat/completions", json=body)
                self.outcomes[str(response.status_code)] += 1
            except NoKeyAvailable:
                self.outcomes["no key"] += 1
            except httpx2.HTTPError as exc:
                self.outcomes[type(exc).__name__] += 1
            await anyio.sleep(0.02)


@dataclass
class AlertWatch:
    """Polls Prometheus's alerts and keeps, per (alert, provider), when it was seen in which state
    (``firing`` if any of the provider's alerts of that name fires, else ``pending``)."""

    base_url: str
    seen: dict[tuple[str, str], list[tuple[float, str]]] = field(default_factory=dict)

    def poll(self) -> dict[tuple[str, str], str]:
        now = time.monotonic()
        states: dict[tuple[str, str], str] = {}
        for alert in alerts(self.base_url):
            key = (alert["labels"]["alertname"], alert["labels"].get("provider", ""))
            if states.get(key) != "firing":
                states[key] = alert["state"]
        for key, state in states.items():
            self.seen.setdefault(key, []).append((now, state))
        return states

    def watch(
        self, seconds: float, until: Callable[[dict[tuple[str, str], str]], bool] | None = None
    ) -> float:
        """Poll for ``seconds`` (or until ``until`` holds); returns when it stopped."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            states = self.poll()
            if until is not None and until(states):
                return time.monotonic()
            time.sleep(0.1)
        if until is not None:
            raise AssertionError(f"timed out after {seconds} s; alerts now: {self.poll()}")
        return time.monotonic()

    def first(self, key: tuple[str, str], state: str, after: float = 0.0) -> float | None:
        return next((t for t, s in self.seen.get(key, []) if s == state and t >= after), None)


def test_all_keys_alert_holds_through_an_outage_of_hanging_trials(tmp_path: Path) -> None:
    """All four keys hang (every call and every trial times out after 1 s), then fail fast (503),
    then heal. Breakers re-open for 1 s after each failed trial, so the keys are half-open about
    half the time: AllKeys must fire, stay firing until the provider heals, and resolve after."""
    secrets = [f"sk-e2e-hang-{i}" for i in range(4)]
    upstream = FakeUpstream(secrets, flavor="deepseek")
    pool = KeyPool()
    pool.add_provider(
        {
            "name": "deepseek",
            "keys": [KeySpec(secret=s, key_id=f"ds-{i}") for i, s in enumerate(secrets)],
            "breaker": BreakerConfig(timeout=1.0, probe_timeout=5.0),
            "probation": 0,
        }
    )
    allkeys = ("AllKeysCircuitBreakerOpen", "deepseek")
    with (
        LoopbackServer(upstream) as provider,
        prometheus_scraping(pool, tmp_path) as prometheus,
        Traffic(pool, provider.base_url) as traffic,
    ):
        watch = AlertWatch(prometheus)
        wait_for(lambda: traffic.outcomes["200"] >= 20, 30, "healthy traffic")
        states = 'sum(circuit_breaker_state{provider="deepseek"})'
        wait_for(lambda: scalar(prometheus, states) == 0, 30, "a scrape of the healthy pool")
        assert allkeys not in watch.poll()

        fault = time.monotonic()
        upstream.set_default_fault(Fault.hang())
        wait_for(lambda: pool.capacity("deepseek").closed == 0, 30, "every key out")
        all_out = time.monotonic()
        fired = watch.watch(30, until=lambda states: states.get(allkeys) == "firing")
        watch.watch(6)  # hanging trials, on and on
        upstream.set_default_fault(Fault.status(503))
        watch.watch(4)  # then failing ones
        heal = time.monotonic()
        upstream.set_default_fault(Fault.ok())
        resolved = watch.watch(30, until=lambda states: allkeys not in states)
        watch.watch(1)

    pending = watch.first(allkeys, "pending")
    assert pending is not None
    assert pending <= fired <= heal
    # Firing at every poll from when it fired until the provider healed: it never resolved or
    # went back to pending in between.
    during = [state for t, state in watch.seen[allkeys] if fired <= t <= heal]
    assert during
    assert set(during) == {"firing"}, during
    # An outage whose trials fail is neither "stuck half-open" (it goes pending whenever a scrape
    # sees a key half-open, and never lasts) nor "flapping".
    for name in ("CircuitBreakerStuckHalfOpen", "CircuitBreakerFlapping"):
        assert watch.first((name, "deepseek"), "firing") is None, name
    assert ("MajorityKeysCircuitBreakerOpen", "deepseek") in watch.seen
    assert traffic.outcomes["200"] > 0

    print(
        "\nAllKeysCircuitBreakerOpen, hanging-trials outage (for: 3s, scrape and evaluation every"
        f" {SCRAPE}, breaker timeout 1 s, attempt timeout 1 s):"
        f"\n  fault -> every key out: {all_out - fault:.2f} s"
        f"\n  fault -> pending: {pending - fault:.2f} s"
        f"\n  fault -> firing: {fired - fault:.2f} s (pending -> firing {fired - pending:.2f} s)"
        f"\n  firing until healed: {heal - fired:.2f} s, {len(during)} polls, all firing"
        f"\n  heal -> resolved: {resolved - heal:.2f} s"
        f"\n  calls: {dict(traffic.outcomes)}"
    )
