"""deploy/observability: the Grafana dashboard and the Prometheus alert rules.

Both must parse, be well formed, and use only metrics turnout really exports: the names
are read from the /metrics of a running control plane and of a running proxy connected to
it (families with no samples yet still announce themselves with # TYPE).
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.cp_support import eventually, running_control_plane, write_token
from tests.integration.support import RecordingUpstream, free_port, inbound, running_proxy

ROOT = Path(__file__).resolve().parents[3]
OBSERVABILITY = ROOT / "deploy" / "observability"
_METRIC = re.compile(r"\bturnout_[a-z0-9_]+\b")
_DURATION = re.compile(r"^\d+[smhd]$")
# Suffixes of the samples each Prometheus metric type exposes.
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "gauge": ("",), "untyped": ("",), "summary": ("", "_sum", "_count", "_created")}


def _names(exposition: str) -> set[str]:
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            base = family.removesuffix("_total") if kind == "counter" else family
            names.update(base + suffix for suffix in _SUFFIXES[kind])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """Every metric name a connected proxy and the control plane expose."""
    tmp = tmp_path_factory.mktemp("observability")
    baseline = RecordingUpstream("baseline")
    try:
        with running_control_plane(tmp) as cp:
            token = write_token(tmp, "proxy.token")
            port = free_port()
            config = {"listeners": [inbound("users-in", port, "users", baseline.address)],
                      "control_plane": {"address": cp.grpc_target, "token_file": str(token), "state_path": None}}
            with running_proxy(config, tmp) as proxy:
                proxy_metrics = eventually(
                    lambda: (text := proxy.admin_get("/metrics")[1]) and
                    "turnout_control_plane_connected{worker=\"supervisor\"} 1.0" in text and text)
                cp_metrics = _get(cp.api_url + "/metrics")
                yield _names(proxy_metrics) | _names(cp_metrics)
    finally:
        baseline.stop()


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _dashboard_exprs() -> list[str]:
    dashboard = _dashboard()
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def _balanced(expr: str) -> bool:
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):  # brackets inside label values do not count
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack


def test_metric_names_come_from_real_expositions(exported: set[str]) -> None:
    # The reader of expositions itself: the families the README documents are found.
    for name in ("turnout_requests_total", "turnout_request_duration_seconds_bucket", "turnout_fallbacks_total",
                 "turnout_control_plane_connected", "turnout_control_plane_last_update_timestamp_seconds",
                 "turnout_cp_revision", "turnout_cp_push_answers_total"):
        assert name in exported
    assert "turnout_no_such_metric" not in exported


def test_dashboard_uses_only_exported_metrics(exported: set[str]) -> None:
    exprs = _dashboard_exprs()
    used = {name for expr in exprs for name in _METRIC.findall(expr)}
    assert used, "the dashboard queries nothing"
    assert used <= exported, f"not exported by turnout: {sorted(used - exported)}"


def test_alerts_use_only_exported_metrics(exported: set[str]) -> None:
    used = {name for rule in _rules() for name in _METRIC.findall(rule["expr"])}
    assert used <= exported, f"not exported by turnout: {sorted(used - exported)}"


def test_dashboard_is_well_formed() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"]
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert _balanced(target["expr"]), target["expr"]
            for used in re.findall(r"\$(\w+)", target["expr"]):
                assert used in variables or used.startswith("__"), f"{panel['title']}: unknown variable ${used}"
    # The panels the operators asked for are there.
    titles = " | ".join(p["title"] for p in panels)
    for wanted in ("Requests by route", "Sandbox upstream errors", "Fallbacks", "Proxies connected", "Push lag",
                   "NACK"):
        assert wanted in titles


def test_alert_rules_are_well_formed() -> None:
    data = yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())
    groups = [g["name"] for g in data["groups"]]
    assert len(groups) == len(set(groups))
    names = [rule["alert"] for rule in _rules()]
    assert len(names) == len(set(names))
    for rule in _rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert _balanced(rule["expr"]), rule["alert"]
        assert "for" not in rule or _DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert re.match(r"^Turnout[A-Za-z]+$", rule["alert"])
    for wanted in ("TurnoutProxyDisconnectedFromControlPlane", "TurnoutPushNacked", "TurnoutSandboxUnreachable",
                   "TurnoutPushesUnanswered", "TurnoutControlPlaneDown"):
        assert wanted in names
