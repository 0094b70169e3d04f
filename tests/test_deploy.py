"""What `deploy/` promises: alert rules that parse and fire as described, a dashboard and rules
naming only metrics shipmon exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from worker.core import metrics

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "shipmon.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)"
)

# A metric name as PromQL writes it; every shipmon metric starts so.
METRIC = re.compile(r"\bshipmon_[a-z0-9_]+\b")
# The samples each metric type exposes, after the family's name.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}
DURATION = re.compile(r"^\d+[smhd]$")


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every sample name shipmon's registry exposes, read from `worker.core.metrics`."""
    names: set[str] = set()
    for family in metrics.registry().collect():
        if family.name.startswith("shipmon_"):
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def rule_list() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_queries(node: Any) -> Iterator[str]:
    """Every PromQL string of a Grafana dashboard: panel targets and template variables."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, dict) and "query" in value:
                yield value["query"]
            else:
                yield from dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_queries(item)


def test_the_alert_rules_have_the_shape_prometheus_loads() -> None:
    document = yaml.safe_load(RULES.read_text())
    assert set(document) == {"groups"}
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"]
    rules = rule_list()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert DURATION.match(rule.get("for", "0s")), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # The alerts README and the issue promise.
    assert {
        "ShipmonNothingPolling",
        "ShipmonQuotaAheadOfPace",
        "ShipmonDeliveriesDead",
        "ShipmonEndpointDisabled",
        "ShipmonStalledShipmentsRising",
    } <= set(names)


def test_the_rules_name_only_metrics_shipmon_exports(exported: set[str]) -> None:
    for rule in rule_list():
        named = set(METRIC.findall(rule["expr"]))
        assert named, f"{rule['alert']} names no shipmon metric"
        assert named <= exported, f"{rule['alert']}: {sorted(named - exported)} not exported"


def test_the_dashboard_names_only_metrics_shipmon_exports(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = list(dashboard_queries(dashboard))
    named = {name for query in queries for name in METRIC.findall(query)}
    assert len(queries) > 20
    assert named <= exported, sorted(named - exported)
    # Every panel shows something, and every target names a metric.
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert METRIC.search(target["expr"]), (panel["title"], target["expr"])
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


@needs_promtool
def test_promtool_loads_the_rules_and_their_unit_tests_pass() -> None:
    assert PROMTOOL is not None
    for command in (["check", "rules", RULES.name], ["test", "rules", RULE_TESTS.name]):
        done = subprocess.run(
            [PROMTOOL, *command], cwd=RULES.parent, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_the_exposition_passes_promtools_naming_lint() -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=metrics.exposition(),
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
