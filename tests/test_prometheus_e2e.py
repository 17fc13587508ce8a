"""End to end with a real Prometheus: it scrapes the admin app of a pool, the rules in
``ops/prometheus/alerts.yml`` fire while keys are broken and resolve after healing, and every PromQL
expression of the dashboard and of ``docs/runbook.md`` parses and returns data.

Real time runs here (Prometheus cannot be given a fake clock), so the alert rules are loaded with
their ``for:`` durations and rate window shortened; the expressions themselves are the shipped ones.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from keypool import BreakerConfig, KeyPool, KeySpec, NoKeyAvailable
from keypool.admin import create_app
from keypool.testing import LoopbackServer
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
SHORTER = {"for: 2m": "for: 2s", "for: 5m": "for: 3s", "[10m]": "[20s]"}


def shortened_rules(target: Path) -> Path:
    text = ALERTS.read_text()
    for long, short in SHORTER.items():
        assert long in text, long
        text = text.replace(long, short)
    target.write_text(text)
    return target


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
            "breaker": slow,
            "probation": 0,
        }
    )
    return pool


def query(base_url: str, expr: str) -> dict[str, Any]:
    url = f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=10) as response:
        result: dict[str, Any] = json.load(response)
    return result


def firing(base_url: str) -> set[tuple[str, str]]:
    with urllib.request.urlopen(f"{base_url}/api/v1/alerts", timeout=10) as response:
        alerts = json.load(response)["data"]["alerts"]
    return {
        (a["labels"]["alertname"], a["labels"].get("provider", "")) for a in alerts if a["state"] == "firing"
    }


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def runbook_queries() -> list[str]:
    blocks = re.findall(r"^```promql\n(.*?)^```", RUNBOOK.read_text(), flags=re.MULTILINE | re.DOTALL)
    return [block.strip().replace("<KEY_ID>", "ds-0") for block in blocks]


class Flapper:
    """Trips and resets one key several times a second, like a breaker that cannot make up its mind."""

    def __init__(self, pool: KeyPool) -> None:
        self.pool = pool
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.1):
            self.pool.trip("tools", "tool-0")
            self.pool.reset("tools", "tool-0")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[KeyPool, str]]:
    binary = require_binary("prometheus")
    pool = build_pool()
    registry = CollectorRegistry()
    app = create_app(pool, token="e2e-admin-token", registry=registry)
    with LoopbackServer(app) as admin:
        target = admin.base_url.removeprefix("http://")
        rules = shortened_rules(tmp_path / "alerts.yml")
        config = tmp_path / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules)],
                    "scrape_configs": [{"job_name": "keypool", "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        with running_prometheus(binary, config, tmp_path) as base_url:
            yield pool, base_url


def test_alerts_fire_and_resolve_and_every_documented_query_returns_data(stack: tuple[KeyPool, str]) -> None:
    pool, prometheus = stack
    # Healthy traffic first, so request, success and latency series exist.
    for _ in range(20):
        pool.try_acquire("deepseek").success()
        pool.try_acquire("tools", exclude=["tool-0"]).success()
    wait_for(lambda: bool(query(prometheus, "circuit_breaker_state")["data"]["result"]), 30, "a first scrape")

    # Break things: DeepSeek's keys fail until every one is open; Perplexity's key goes half-open
    # and stays there (its trial never reports back); a tools key flaps.
    for key_id in pool.key_ids("deepseek"):
        for _ in range(5):
            pool.try_acquire(
                "deepseek", exclude=[k for k in pool.key_ids("deepseek") if k != key_id]
            ).failure()
    with pytest.raises(NoKeyAvailable):
        pool.try_acquire("deepseek")  # a rejected call, for keypool_rejected_calls_total
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
        alerts = firing(prometheus)
        assert ("AllKeysCircuitBreakerOpen", "deepseek") in alerts
        assert ("MajorityKeysCircuitBreakerOpen", "deepseek") in alerts
        assert ("CircuitBreakerStuckHalfOpen", "perplexity") in alerts
        assert ("CircuitBreakerFlapping", "tools") in alerts
        assert ("AllKeysCircuitBreakerOpen", "tools") not in alerts

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
        "the open and half-open alerts to resolve",
    )
    wait_for(lambda: not firing(prometheus), 60, "flapping to resolve once the rate window has passed")
