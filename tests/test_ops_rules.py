"""The operations artefacts under ``ops/`` hold up: Prometheus rules, their
promtool unit tests, the example Prometheus config and the Grafana dashboard.

These tests need ``promtool`` and ``prometheus`` (Debian's ``prometheus``
package; ``scripts/install-prometheus`` installs it). Without them the tests
skip, except when ``CI=true``, where a missing binary is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "ops" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TESTS = PROMETHEUS_DIR / "alerts.test.yml"
EXAMPLE_CONFIG = PROMETHEUS_DIR / "prometheus.example.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "circuit-breaker.json"
RUNBOOK = ROOT / "docs" / "runbook.md"

RUNBOOK_URL = "https://github.com/keypool/keypool/blob/main/docs/runbook.md"

# The runbook's alert contract: name -> (`for` in seconds, severity, runbook anchor).
ALERT_CONTRACT: dict[str, tuple[int, str, str]] = {
    "AllKeysCircuitBreakerOpen": (120, "critical", "alert-allkeyscircuitbreakeropen"),
    "MajorityKeysCircuitBreakerOpen": (300, "critical", "alert-majoritykeyscircuitbreakeropen"),
    # The 10 minutes are the rate() window; the alert fires on the first evaluation.
    "CircuitBreakerFlapping": (0, "warning", "alert-circuitbreakerflapping"),
    "CircuitBreakerStuckHalfOpen": (300, "warning", "alert-circuitbreakerstuckhalfopen"),
}

REQUIRED_PANELS = {
    # named by the runbook
    "Circuit Breaker States by Key",
    "Circuit Breaker Trip Counter",
    "State Transitions",
    "API Request Rate",
    # keypool's own
    "Capacity (healthy share)",
    "Keys by state",
    "Rejected calls",
    "Backup tier active",
}

# Grafana variables a panel expression may use, with the value each gets when
# the expression is checked outside Grafana.
DASHBOARD_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$provider": ".*",
}


def require_binary(name: str) -> str:
    """Return the path of executable ``name``; skip the test if it is missing.

    With ``CI=true`` a missing binary fails the test instead, so CI cannot go
    green by skipping.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    message = (
        f"`{name}` is not on PATH; it comes with Debian's `prometheus` package "
        "(run scripts/install-tools, or apt-get install prometheus)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; it is required when CI=true", pytrace=False)
    pytest.skip(message)


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )


def check_promql(promtool: str, exprs: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Parse PromQL with promtool.

    promtool has no stand-alone "parse this query" command in the versions
    Debian ships, so each expression becomes a recording rule, named by its
    key, and ``promtool check rules`` parses it. JSON is valid YAML, so no YAML
    library is needed.
    """
    rules = [{"record": name, "expr": expr} for name, expr in exprs.items()]
    rule_file = tmp_path / "exprs.rules.yml"
    rule_file.write_text(json.dumps({"groups": [{"name": "exprs", "rules": rules}]}, indent=2))
    return run(promtool, "check", "rules", rule_file)


# --------------------------------------------------------------------------- rules


def test_alert_rules_pass_promtool_check() -> None:
    promtool = require_binary("promtool")
    assert_ok(run(promtool, "check", "rules", ALERTS))


def test_alert_rules_pass_their_unit_tests() -> None:
    promtool = require_binary("promtool")
    result = run(promtool, "test", "rules", ALERTS_TESTS)
    assert_ok(result)
    assert "SUCCESS" in result.stdout


def test_example_config_is_valid_and_scrapes_the_admin_endpoint() -> None:
    promtool = require_binary("promtool")
    # `check config` also loads and checks the rule files it names.
    result = run(promtool, "check", "config", EXAMPLE_CONFIG)
    assert_ok(result)
    assert "alerts.yml" in result.stdout
    text = EXAMPLE_CONFIG.read_text()
    assert re.search(r"^\s*-\s*job_name:\s*['\"]?keypool['\"]?\s*$", text, re.M)
    assert "localhost:8000" in text
    assert re.search(r"^rule_files:\s*\n\s*-\s*['\"]?alerts\.yml['\"]?\s*$", text, re.M)


def test_each_alert_has_firing_and_quiet_unit_tests() -> None:
    text = ALERTS_TESTS.read_text()
    cases = re.findall(r"alertname:\s*(\w+)\s*\n\s*exp_alerts:[ \t]*(\[\])?", text)
    for name in ALERT_CONTRACT:
        outcomes = {bool(empty) for alert, empty in cases if alert == name}
        assert outcomes == {True, False}, f"{name}: need a firing and a non-firing unit test"


@pytest.fixture(scope="module")
def loaded_rules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The rules as a real Prometheus loads them, by name, from /api/v1/rules."""
    binary = require_binary("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps({"rule_files": [str(ALERTS)]}))
    with (
        running_prometheus(binary, config, workdir) as base_url,
        urllib.request.urlopen(f"{base_url}/api/v1/rules", timeout=10) as response,
    ):
        payload = json.load(response)
    assert payload["status"] == "success"
    rules: dict[str, dict[str, Any]] = {}
    for group in payload["data"]["groups"]:
        for rule in group["rules"]:
            assert rule["name"] not in rules, f"duplicate rule {rule['name']}"
            rules[rule["name"]] = rule
    return rules


@contextlib.contextmanager
def running_prometheus(binary: str, config: Path, workdir: Path) -> Iterator[str]:
    """Run ``prometheus`` on a free loopback port; yield its base URL."""
    log_path = workdir / "prometheus.log"
    for _ in range(3):  # the free port may be taken between probe and bind
        port = _free_port()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            base_url = f"http://127.0.0.1:{port}"
            if _wait_ready(proc, base_url):
                yield base_url
                return
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            proc.wait()
    pytest.fail(f"prometheus did not start:\n{log_path.read_text()}", pytrace=False)


def _wait_ready(proc: subprocess.Popen[bytes], base_url: str) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{base_url}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_alerts_match_the_runbook_contract(loaded_rules: dict[str, dict[str, Any]]) -> None:
    alerts = {name: rule for name, rule in loaded_rules.items() if rule["type"] == "alerting"}
    assert set(alerts) == set(ALERT_CONTRACT)
    for name, (for_seconds, severity, anchor) in ALERT_CONTRACT.items():
        rule = alerts[name]
        assert rule["duration"] == for_seconds, name
        assert rule["labels"].get("severity") == severity, name
        annotations = rule["annotations"]
        assert annotations.get("summary"), name
        assert "{{ $labels.provider }}" in annotations.get("description", ""), name
        assert annotations.get("runbook_url") == f"{RUNBOOK_URL}#{anchor}", name


def test_alert_thresholds_match_the_runbook(loaded_rules: dict[str, dict[str, Any]]) -> None:
    # Prometheus reports each query in its canonical form.
    queries = {name: rule["query"] for name, rule in loaded_rules.items()}
    # Capacity is counted in keys that are not closed: a half-open key is not capacity.
    assert "count by (provider) (circuit_breaker_state > 0)" in queries["AllKeysCircuitBreakerOpen"]
    assert "sum by (provider) (circuit_breaker_state > bool 0)" in queries["MajorityKeysCircuitBreakerOpen"]
    assert queries["MajorityKeysCircuitBreakerOpen"].endswith("> 0.5")
    flapping = queries["CircuitBreakerFlapping"]
    retrips = 'increase(circuit_breaker_state_transitions_total{from_state="closed",to_state="open"}[10m])'
    assert retrips in flapping
    assert flapping.endswith(">= 4")
    assert queries["CircuitBreakerStuckHalfOpen"] == "circuit_breaker_state == 1"
    for name in ("AllKeysCircuitBreakerOpen", "MajorityKeysCircuitBreakerOpen"):
        assert "by (provider)" in queries[name], name
    for name in ("keypool:keys_out:ratio", "keypool:keys_closed:count"):
        assert loaded_rules[name]["type"] == "recording", name
    assert retrips in queries["keypool:circuit_breaker_retrips:increase10m"]


def _github_anchors(markdown: str) -> set[str]:
    anchors = set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", markdown))
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_runbook_urls_point_at_runbook_sections() -> None:
    if not RUNBOOK.exists():
        pytest.skip("docs/runbook.md does not exist yet")
    anchors = _github_anchors(RUNBOOK.read_text(encoding="utf-8"))
    missing = [anchor for _, _, anchor in ALERT_CONTRACT.values() if anchor not in anchors]
    assert not missing, f"docs/runbook.md has no section for {missing}"


# ----------------------------------------------------------------------- dashboard


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def test_dashboard_identity_and_variables(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "circuit-breaker"
    assert dashboard["title"] == "Circuit Breaker"
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    provider = variables["provider"]
    assert provider["type"] == "query"
    query = provider["query"]
    query = query["query"] if isinstance(query, dict) else query
    assert query == "label_values(circuit_breaker_state, provider)"
    assert provider["includeAll"]
    assert provider["allValue"] == ".*"


def test_dashboard_has_the_runbook_panels(dashboard: dict[str, Any]) -> None:
    panels = list(_panels(dashboard))
    titles = [p["title"] for p in panels]
    missing = REQUIRED_PANELS - set(titles)
    assert not missing, f"missing panels: {sorted(missing)}"
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]


def test_states_panel_maps_values_to_state_names(dashboard: dict[str, Any]) -> None:
    panel = next(p for p in _panels(dashboard) if p["title"] == "Circuit Breaker States by Key")
    defaults = panel["fieldConfig"]["defaults"]
    (mapping,) = defaults["mappings"]
    texts = {value: (opt["text"], opt["color"]) for value, opt in mapping["options"].items()}
    assert texts == {"0": ("CLOSED", "green"), "1": ("HALF_OPEN", "yellow"), "2": ("OPEN", "red")}
    steps = [(s["value"], s["color"]) for s in defaults["thresholds"]["steps"]]
    assert steps == [(None, "green"), (1, "yellow"), (2, "red")]
    assert "circuit_breaker_state{" in panel["targets"][0]["expr"]


def _dashboard_exprs(dashboard: dict[str, Any]) -> dict[str, str]:
    """Every panel query, keyed by a recording-rule name, variables substituted."""
    exprs: dict[str, str] = {}
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in DASHBOARD_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {target['expr']!r}"
            exprs[f"dashboard:panel_{panel['id']}_{target['refId']}"] = expr
    return exprs


def test_dashboard_queries_filter_by_provider(dashboard: dict[str, Any]) -> None:
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            assert 'provider=~"$provider"' in target["expr"], panel["title"]


def test_dashboard_queries_are_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    exprs = _dashboard_exprs(dashboard)
    assert len(exprs) >= len(REQUIRED_PANELS)
    assert_ok(check_promql(promtool, exprs, tmp_path))


def test_promql_check_rejects_invalid_queries(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    # sum() of a range vector: the classic mistake the check has to catch.
    result = check_promql(promtool, {"bad:expr": "sum(circuit_breaker_state[1h])"}, tmp_path)
    assert result.returncode != 0
    assert "bad:expr" in result.stdout + result.stderr


def _runbook_promql() -> list[str]:
    return re.findall(r"^```promql\n(.*?)^```", RUNBOOK.read_text(encoding="utf-8"), flags=re.M | re.S)


def test_transition_rates_are_per_minute_on_the_dashboard_and_in_the_runbook(
    dashboard: dict[str, Any],
) -> None:
    rate = re.compile(r"rate\(circuit_breaker_state_transitions_total")
    exprs = [e.strip() for e in _runbook_promql() if rate.search(e)]
    exprs += [e for e in _dashboard_exprs(dashboard).values() if rate.search(e)]
    assert len(exprs) >= 2, "the runbook and the dashboard each show a transition rate"
    for expr in exprs:
        assert expr.endswith("* 60"), f"not per minute: {expr}"
    panel = next(p for p in _panels(dashboard) if p["title"] == "State Transitions")
    assert panel["fieldConfig"]["defaults"]["unit"] == "suffix: /min"
    assert "per minute" in panel["description"]


def test_half_open_panel_counts_trial_successes(dashboard: dict[str, Any]) -> None:
    panel = next(p for p in _panels(dashboard) if p["title"] == "Half-open trial calls")
    exprs = {t["legendFormat"]: t["expr"] for t in panel["targets"]}
    assert "circuit_breaker_half_open_calls_total" in exprs["{{provider}} trials"]
    assert "circuit_breaker_half_open_successes_total" in exprs["{{provider}} trial successes"]
    assert not any("successful_requests_total" in e for e in exprs.values())  # every success, not trials
