"""The Kubernetes manifests under deploy/kubernetes: schema-valid, and consistent with turnout.

Every manifest file and every kustomize build is validated offline against the Kubernetes
JSON schemas (kubernetes-validate, strict: unknown fields fail). Then the rendered objects
are checked against turnout itself: container arguments parse with turnout's own command
line, bootstrap ConfigMaps and the policy parse with turnout's own validators, ports,
probes, grace periods and memory agree with the proxy's config and the benchmark.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.policy import parse_policy
from dataplane.config import Limits, ProxyConfig, parse_config_text
from turnout.cli import build_parser

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (the test extra) is needed for offline schema validation")

ROOT = Path(__file__).resolve().parents[3]
KUBE = ROOT / "deploy" / "kubernetes"
# An older minor that managed clusters still run, and the newest the package ships: the
# manifests use nothing newer than 1.26 (internalTrafficPolicy GA; policy/v1 is 1.21).
K8S_VERSIONS = ("1.32", kubernetes_validate.latest_version())
BUILDS = ["base/control-plane", "base/gateway", "base/node", "examples/sidecar", "overlays/staging"]
# Measured in bench/http1: RSS of the supervisor and of each worker.
SUPERVISOR_MB = 35
WORKER_MB = 35


def _load_all(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _kustomizations() -> list[Path]:
    return sorted(KUBE.rglob("kustomization.yaml"))


def _patch_files() -> set[Path]:
    patches: set[Path] = set()
    for path in _kustomizations():
        spec = yaml.safe_load(path.read_text())
        for patch in spec.get("patches") or []:
            if "path" in patch:
                patches.add((path.parent / patch["path"]).resolve())
    return patches


def _manifest_files() -> list[Path]:
    patches = _patch_files()
    return [p for p in sorted(KUBE.rglob("*.yaml")) if p.name != "kustomization.yaml" and p.resolve() not in patches]


def _validate(doc: dict[str, Any], where: str) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.absolute_path)
            pytest.fail(f"{where}: {doc['kind']} {doc['metadata'].get('name')} (Kubernetes {version}): "
                        f"{path}: {exc.message}")


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(reason="kubectl is not installed: `kubectl kustomize` is needed to build the overlays")
    return kubectl


_BUILT: dict[str, list[dict[str, Any]]] = {}


def build(name: str) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of one directory, parsed (cached for the module)."""
    if name not in _BUILT:
        result = subprocess.run([_kubectl(), "kustomize", str(KUBE / name)], capture_output=True, text=True,
                                timeout=120, check=False)
        assert result.returncode == 0, f"kubectl kustomize {name} failed:\n{result.stderr}"
        _BUILT[name] = _load_all(result.stdout)
    return _BUILT[name]


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(KUBE)))
def test_every_manifest_file_validates(path: Path) -> None:
    docs = _load_all(path.read_text())
    assert docs, f"{path} holds no document"
    for doc in docs:
        _validate(doc, str(path.relative_to(ROOT)))


@pytest.mark.parametrize("name", BUILDS)
def test_kustomize_build_validates(name: str) -> None:
    docs = build(name)
    assert docs
    for doc in docs:
        _validate(doc, f"kubectl kustomize {name}")


def test_every_kustomization_is_tested() -> None:
    assert {str(p.parent.relative_to(KUBE)) for p in _kustomizations()} == set(BUILDS)


def _pod_specs(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    out = []
    for doc in docs:
        if doc["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            out.append((doc, doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "Pod":
            out.append((doc, doc["spec"]))
    return out


def _turnout_containers(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    found = []
    for doc, spec in _pod_specs(docs):
        for container in spec["containers"]:
            if "turnout" in container["image"].rsplit("/", 1)[-1]:
                found.append((doc, spec, container))
    return found


def _config_map(docs: list[dict[str, Any]], namespace: str | None, name: str) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == name and \
                doc["metadata"].get("namespace") == namespace:
            return doc
    raise AssertionError(f"ConfigMap {namespace}/{name} is not in the build")


def _mounted_file(docs: list[dict[str, Any]], namespace: str | None, spec: dict[str, Any],
                  container: dict[str, Any], path: str) -> str:
    """The text of a file a container reads from a ConfigMap volume."""
    for mount in container["volumeMounts"]:
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            key = path[len(mount["mountPath"].rstrip("/")) + 1:]
            return str(_config_map(docs, namespace, volume["configMap"]["name"])["data"][key])
    raise AssertionError(f"{container['name']}: nothing is mounted at {path}")


def _args(container: dict[str, Any]) -> Any:
    # Kubernetes expands $(VAR) from the container's env; any value parses the same way.
    return build_parser().parse_args([re.sub(r"\$\(\w+\)", "x", a) for a in container["args"]])


def _proxy_config(docs: list[dict[str, Any]], doc: dict[str, Any], spec: dict[str, Any],
                  container: dict[str, Any]) -> ProxyConfig:
    args = _args(container)
    text = _mounted_file(docs, doc["metadata"].get("namespace"), spec, container, args.config)
    return parse_config_text(text, f"{doc['metadata']['name']}: {args.config}")


def _mem_mb(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1.0, "Gi": 1024.0, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity) / 2**20


@pytest.mark.parametrize("name", BUILDS)
def test_turnout_containers_are_locked_down_and_sized(name: str) -> None:
    containers = _turnout_containers(build(name))
    assert containers, f"{name} runs no turnout container"
    for doc, spec, container in containers:
        where = f"{name}: {doc['kind']} {doc['metadata']['name']}/{container['name']}"
        pod_sc = spec.get("securityContext", {})
        sc = container["securityContext"]
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) != 0, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"]["drop"] == ["ALL"], where
        assert "add" not in sc["capabilities"], where
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{where}: {kind}"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == mounts["/tmp"]), where
        args = _args(container)
        if args.command == "proxy":
            workers = args.workers
            needed_mb = SUPERVISOR_MB + WORKER_MB * workers
            assert _mem_mb(container["resources"]["requests"]["memory"]) >= needed_mb, where
            assert _mem_mb(container["resources"]["limits"]["memory"]) >= 1.5 * needed_mb, where
            state = next(v for v in spec["volumes"] if v["name"] == mounts["/var/lib/turnout"])
            assert "emptyDir" in state, f"{where}: the state file needs an emptyDir at /var/lib/turnout"
        else:
            assert args.command in ("control-plane", "gateway"), where


@pytest.mark.parametrize("name", BUILDS)
def test_proxy_probes_ports_and_drain_agree_with_its_bootstrap(name: str) -> None:
    docs = build(name)
    proxies = [c for c in _turnout_containers(docs) if _args(c[2]).command == "proxy"]
    if name in ("base/control-plane", "base/gateway"):
        assert not proxies
        return
    assert proxies
    for doc, spec, container in proxies:
        where = f"{name}: {doc['metadata']['name']}/{container['name']}"
        config = _proxy_config(docs, doc, spec, container)
        ports = {p["name"]: p for p in container["ports"]}
        by_number = {p["containerPort"]: p["name"] for p in container["ports"]}
        assert config.admin is not None and config.admin.host == "0.0.0.0", f"{where}: kubelet probes the pod IP"
        admin_port = by_number[config.admin.port]
        assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": admin_port}, where
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": admin_port}, where
        for listener in config.listeners:
            assert listener.address.port in by_number, f"{where}: listener {listener.name} port not declared"
        pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
        grace = spec["terminationGracePeriodSeconds"]
        assert config.limits.drain_timeout_s == Limits().drain_timeout_s
        assert grace >= pause + config.limits.drain_timeout_s + 2, \
            f"{where}: {grace} s grace < {pause} s pause + {config.limits.drain_timeout_s} s drain + margin"
        if config.control_plane is not None:
            assert config.control_plane.token_file is not None
            token_dir = config.control_plane.token_file.rsplit("/", 1)[0]
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == token_dir)
            volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            assert volume["secret"]["secretName"] == "turnout-proxy-token", where
            env = {e["name"]: e for e in container["env"]}
            assert env["TURNOUT_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", where
            assert config.control_plane.address.startswith("turnout-control-plane.turnout.svc:"), where
        assert ports, where


def _services_point_at_named_ports(docs: list[dict[str, Any]]) -> None:
    pods = _pod_specs(docs)
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        matching = [(doc, spec) for doc, spec in pods
                    if selector.items() <= (doc["spec"].get("template", {}).get("metadata", {}).get("labels")
                                            or doc["metadata"].get("labels", {})).items()]
        assert matching, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            for _doc, spec in matching:
                names = {p.get("name") for c in spec["containers"] for p in c.get("ports", [])}
                numbers = {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
                assert port["targetPort"] in names | numbers, \
                    f"Service {service['metadata']['name']} port {port['name']}: no container port {port['targetPort']}"


@pytest.mark.parametrize("name", BUILDS)
def test_services_target_declared_ports(name: str) -> None:
    _services_point_at_named_ports(build(name))


def test_sidecar_service_sends_traffic_to_turnout_not_the_app() -> None:
    docs = build("examples/sidecar")
    service = next(d for d in docs if d["kind"] == "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["turnout-http"]
    (doc, spec, container), = _turnout_containers(docs)
    config = _proxy_config(docs, doc, spec, container)
    (listener,) = config.listeners
    app_ports = {p["containerPort"] for c in spec["containers"] if c is not container for p in c["ports"]}
    assert listener.mode == "inbound" and listener.baseline is not None
    assert str(listener.baseline.host) == "127.0.0.1" and listener.baseline.port in app_ports


def test_node_mode_is_local_to_each_node() -> None:
    docs = build("base/node")
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert service["spec"]["internalTrafficPolicy"] == "Local"
    spec = daemonset["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    config = _proxy_config(docs, daemonset, spec, container)
    outbound = [lst for lst in config.listeners if lst.mode == "outbound"]
    assert outbound, "node mode needs an outbound listener"
    host_ports = {p["containerPort"]: p.get("hostPort") for p in container["ports"]}
    for listener in outbound:
        assert host_ports[listener.address.port] == listener.address.port


@pytest.mark.parametrize("name", ["base/control-plane", "overlays/staging"])
def test_control_plane_runs_one_writer_with_its_policy_and_tokens(name: str) -> None:
    docs = build(name)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "turnout-control-plane"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = _args(container)
    assert args.command == "control-plane"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
    policy_text = _mounted_file(docs, "turnout", spec, container, args.policy)
    parse_policy(yaml.safe_load(policy_text))
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    db_volume = next(v for v in spec["volumes"] if v["name"] == mounts[str(Path(args.db).parent)])
    claim = db_volume["persistentVolumeClaim"]["claimName"]
    assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim for d in docs)
    assert any(d["kind"] == "PodDisruptionBudget" for d in docs)
    template = _load_all((KUBE / "base/control-plane/secret.yaml").read_text())
    template += _load_all((KUBE / "base/gateway/secret.yaml").read_text())
    templated = {d["metadata"]["name"]: d for d in template}
    for flag in (args.token_file, args.proxy_token_file, args.gateway_token_file):
        volume = next(v for v in spec["volumes"] if v["name"] == mounts[str(Path(flag).parent)])
        secret = templated[volume["secret"]["secretName"]]
        # The template never carries a real token: the control plane refuses an empty one.
        assert secret["stringData"] == {Path(flag).name: ""}
    assert not [d for d in docs if d["kind"] == "Secret"], "applying a Secret template would blank real tokens"
    service = next(d for d in docs if d["kind"] == "Service")
    _services_point_at_named_ports(docs)
    assert {p["port"] for p in service["spec"]["ports"]} == {18080, 18000}


def test_the_gateway_shares_its_token_with_the_control_plane_and_advertises_its_pod_ip() -> None:
    docs = build("base/gateway")
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = _args(container)
    assert args.command == "gateway" and args.data_host == "0.0.0.0"
    assert "--advertise-host=$(POD_IP)" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = next(v for v in spec["volumes"] if v["name"] == mounts[str(Path(args.token_file).parent)])
    assert volume["secret"]["secretName"] == "turnout-gateway-token"
    cp = next(d for d in build("base/control-plane") if d["kind"] == "Deployment")
    cp_container = cp["spec"]["template"]["spec"]["containers"][0]
    cp_mounts = {m["mountPath"]: m["name"] for m in cp_container["volumeMounts"]}
    cp_args = _args(cp_container)
    cp_volume = next(v for v in cp["spec"]["template"]["spec"]["volumes"]
                     if v["name"] == cp_mounts[str(Path(cp_args.gateway_token_file).parent)])
    assert cp_volume["secret"]["secretName"] == "turnout-gateway-token"
    assert args.control_plane.startswith("http://turnout-control-plane.turnout.svc:")
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
    _services_point_at_named_ports(docs)


def test_staging_overlay_sets_image_and_cluster() -> None:
    docs = build("overlays/staging")
    images = {c["image"] for _, _, c in _turnout_containers(docs)}
    assert images == {"registry.example.com/platform/turnout:0.1.0"}
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    env = {e["name"]: e.get("value") for e in daemonset["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TURNOUT_CLUSTER"] == "staging"
