"""``turnout inject``: round trips, idempotence, user fields kept, refusals, schema-valid output."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dataplane.config import parse_config_text
from turnout.inject import (
    CONTAINER_NAME,
    InjectError,
    InjectOptions,
    dump_documents,
    inject_documents,
    run_inject,
)

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (the test extra) is needed for offline schema validation")

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "deploy" / "kubernetes" / "examples" / "sidecar"

SAMPLES = """\
apiVersion: v1
kind: Service
metadata: {name: users, namespace: shop}
spec:
  selector: {app: users}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: users
  namespace: shop
  labels: {app: users, team: payments}
  annotations: {owner: alice, "example.com/note": "keep me"}
spec:
  replicas: 3
  revisionHistoryLimit: 4
  selector: {matchLabels: {app: users}}
  template:
    metadata:
      labels: {app: users}
      annotations: {prometheus.io/scrape: "true"}
    spec:
      terminationGracePeriodSeconds: 45
      nodeSelector: {pool: general}
      initContainers:
        - {name: migrate, image: "users:1.2", command: [./migrate]}
      containers:
        - name: users
          image: users:1.2
          env: [{name: MODE, value: staging}]
          ports: [{name: http, containerPort: 8080}, {name: udp-stats, containerPort: 8125, protocol: UDP}]
          resources: {requests: {cpu: 100m}}
      volumes:
        - {name: cache, emptyDir: {}}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: orders, namespace: shop}
spec:
  serviceName: orders
  selector: {matchLabels: {app: orders}}
  template:
    metadata: {labels: {app: orders}}
    spec:
      containers:
        - {name: orders, image: "orders:3", ports: [{containerPort: 9000}]}
  volumeClaimTemplates:
    - metadata: {name: data}
      spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      containers:
        - {name: agent, image: "agent:1", ports: [{containerPort: 7000}]}
---
apiVersion: v1
kind: Pod
metadata: {name: debug, namespace: shop}
spec:
  containers:
    - {name: web, image: "nginx:1.27", ports: [{containerPort: 80}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: unrelated, namespace: shop}
data: {a: "1"}
"""


def _inject(text: str, options: InjectOptions | None = None) -> list[Any]:
    return inject_documents(yaml.safe_load_all(text), options or InjectOptions()).documents


def _roundtrip(documents: list[Any]) -> list[Any]:
    out = io.StringIO()
    dump_documents(documents, out)
    return [d for d in yaml.safe_load_all(out.getvalue()) if d is not None]


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
    return spec


def _contains(original: Any, injected: Any, path: str = "") -> None:
    """Every field of ``original`` is in ``injected`` with its value; lists may only grow at the end."""
    if isinstance(original, dict):
        assert isinstance(injected, dict), path
        assert list(original) == [k for k in injected if k in original], f"{path}: key order changed"
        for key, value in original.items():
            assert key in injected, f"{path}.{key} was dropped"
            _contains(value, injected[key], f"{path}.{key}")
    elif isinstance(original, list):
        assert isinstance(injected, list) and len(injected) >= len(original), path
        for i, value in enumerate(original):
            _contains(value, injected[i], f"{path}[{i}]")
    else:
        assert original == injected, path


def test_injects_every_workload_kind_and_keeps_the_rest_in_order() -> None:
    original = [d for d in yaml.safe_load_all(SAMPLES)]
    out = _roundtrip(_inject(SAMPLES, InjectOptions(service=None, app_port=None)))
    kinds = [(d["kind"], d["metadata"]["name"]) for d in out]
    assert kinds == [
        ("Service", "users"),
        ("Deployment", "users"), ("ConfigMap", "turnout-users"),
        ("StatefulSet", "orders"), ("ConfigMap", "turnout-orders"),
        ("DaemonSet", "agent"), ("ConfigMap", "turnout-agent"),
        ("Pod", "debug"), ("ConfigMap", "turnout-debug"),
        ("ConfigMap", "unrelated"),
    ]
    workloads = [d for d in out if d["kind"] != "ConfigMap" and d["kind"] != "Service"]
    originals = [d for d in original if d["kind"] not in ("ConfigMap", "Service")]
    for before, after in zip(originals, workloads, strict=True):
        _contains(before, after, after["kind"])
        containers = _pod_spec(after)["containers"]
        assert [c["name"] for c in containers][-1] == CONTAINER_NAME
    assert out[0] == original[0] and out[-1] == original[-1], "documents inject does not handle are unchanged"
    # The user's own grace period is kept; a pod without one gets room for pause + drain.
    assert _pod_spec(out[1])["terminationGracePeriodSeconds"] == 45
    assert _pod_spec(out[3])["terminationGracePeriodSeconds"] == 30


def test_output_validates_against_the_kubernetes_schemas() -> None:
    for doc in _roundtrip(_inject(SAMPLES)):
        kubernetes_validate.validate(doc, "1.32", strict=True)


def test_bootstrap_config_map_is_a_valid_proxy_config_in_front_of_the_app() -> None:
    out = _inject(SAMPLES, InjectOptions(proxy_port=15011, admin_port=9911))
    maps = {d["metadata"]["name"]: d for d in out if d["kind"] == "ConfigMap"}
    config = parse_config_text(maps["turnout-users"]["data"]["turnout.yaml"])
    (listener,) = config.listeners
    assert (listener.service, str(listener.baseline), listener.address.port) == ("users", "127.0.0.1:8080", 15011)
    assert config.admin is not None and config.admin.port == 9911
    assert config.control_plane is not None and config.control_plane.token_file == "/var/run/secrets/turnout/token"
    assert maps["turnout-users"]["metadata"]["namespace"] == "shop"
    sidecar = _pod_spec(out[1])["containers"][-1]
    assert {p["name"]: p["containerPort"] for p in sidecar["ports"]} == {"turnout-http": 15011, "turnout-admin": 9911}
    orders = parse_config_text(maps["turnout-orders"]["data"]["turnout.yaml"])
    assert str(orders.listeners[0].baseline) == "127.0.0.1:9000"


def test_injecting_twice_equals_injecting_once() -> None:
    once = _roundtrip(_inject(SAMPLES))
    out = io.StringIO()
    dump_documents(once, out)
    twice = _roundtrip(_inject(out.getvalue()))
    assert twice == once


def test_already_injected_pod_is_left_alone() -> None:
    once = _inject(SAMPLES)
    result = inject_documents(copy.deepcopy(once), InjectOptions(image="other:9"))
    assert result.documents == once
    assert any("already has a turnout container" in note for note in result.notes)


def test_static_sessions_only_mounts_no_token() -> None:
    out = _inject(SAMPLES, InjectOptions(control_plane=""))
    spec = _pod_spec(out[1])
    assert "turnout-token" not in {v["name"] for v in spec["volumes"]}
    config = parse_config_text(out[2]["data"]["turnout.yaml"])
    assert config.control_plane is None


def test_list_items_are_injected() -> None:
    docs = list(yaml.safe_load_all(SAMPLES))
    listed = {"apiVersion": "v1", "kind": "List", "items": [docs[4]]}
    (out,) = inject_documents([listed], InjectOptions()).documents
    assert [i["kind"] for i in out["items"]] == ["Pod", "ConfigMap"]


@pytest.mark.parametrize(("patch", "message"), [
    ({"hostNetwork": True}, "hostNetwork"),
    ({"containers": [{"name": "a", "image": "a", "ports": [{"containerPort": 8080}, {"containerPort": 15001}]}]},
     "already uses port 15001"),
    ({"containers": [{"name": "a", "image": "a", "ports": [{"containerPort": 8080}, {"containerPort": 8081}]}]},
     "give --app-port"),
    ({"containers": [{"name": "a", "image": "a"}]}, "TCP containerPorts: none"),
    ({"volumes": [{"name": "turnout-state", "emptyDir": {}}]}, "turnout-state"),
])
def test_refusals_name_the_document(patch: dict[str, Any], message: str) -> None:
    docs = list(yaml.safe_load_all(SAMPLES))
    _pod_spec(docs[1]).update(patch)
    with pytest.raises(InjectError) as err:
        inject_documents(docs, InjectOptions())
    assert str(err.value).startswith("document 2 (Deployment shop/users): ")
    assert message in str(err.value)


def test_app_port_clashing_with_turnout_is_refused() -> None:
    with pytest.raises(InjectError, match="app port 9901 is also turnout's turnout-admin port"):
        inject_documents(yaml.safe_load_all(SAMPLES), InjectOptions(app_port=9901))


def test_the_sidecar_example_is_what_inject_writes() -> None:
    """deploy/kubernetes/examples/sidecar/injected.yaml stays in step with this code."""
    app = (EXAMPLE / "app.yaml").read_text()
    expected = _roundtrip(_inject(app, InjectOptions(service="users", app_port=8080)))
    committed = [d for d in yaml.safe_load_all((EXAMPLE / "injected.yaml").read_text()) if d is not None]
    assert committed == expected, "regenerate: turnout inject --service users --app-port 8080 app.yaml"


def test_run_inject_writes_nothing_when_refusing() -> None:
    stdout, stderr = io.StringIO(), io.StringIO()
    bad = SAMPLES.replace("nodeSelector: {pool: general}", "hostNetwork: true")
    assert run_inject("-", InjectOptions(), io.StringIO(bad), stdout, stderr) == 2
    assert stdout.getvalue() == ""
    assert "refused document 2 (Deployment shop/users): uses hostNetwork" in stderr.getvalue()
    assert run_inject("-", InjectOptions(), io.StringIO("a: [b"), stdout, stderr) == 2
    assert "not valid YAML" in stderr.getvalue()


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "turnout.cli", "inject", *args], input=stdin, capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=60, check=False)


def test_cli_reads_stdin_and_files(tmp_path: Path) -> None:
    result = _cli("--image", "registry.example.com/turnout:1", "-", stdin=SAMPLES)
    assert result.returncode == 0, result.stderr
    out = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
    assert len(out) == 10
    assert _pod_spec(out[1])["containers"][-1]["image"] == "registry.example.com/turnout:1"
    assert "injected; service users" in result.stderr
    path = tmp_path / "in.yaml"
    path.write_text(result.stdout)
    again = _cli(str(path))
    assert again.returncode == 0 and [d for d in yaml.safe_load_all(again.stdout) if d is not None] == out
    missing = _cli(str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_run_inject_names_a_number_too_long_to_convert() -> None:
    # 5,000 digits: YAML's loader hands them to int(), which refuses more than 4,300.
    stdout, stderr = io.StringIO(), io.StringIO()
    manifest = "apiVersion: apps/v1\nkind: Deployment\nspec:\n  replicas: " + "3" * 5000 + "\n"
    assert run_inject("-", InjectOptions(), io.StringIO(manifest), stdout, stderr) == 2
    assert "spec.replicas: a number of 5000 characters" in stderr.getvalue()
    assert stdout.getvalue() == ""
