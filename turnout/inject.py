"""``turnout inject``: add the turnout sidecar to Kubernetes workload manifests.

Reads Deployment, StatefulSet, DaemonSet, ReplicaSet and Pod documents (multi-document
YAML, ``List`` items included) and adds to each pod template the turnout container, its
volumes (bootstrap ConfigMap, state emptyDir, /tmp emptyDir, proxy token Secret) and its
ports, then a ConfigMap with the bootstrap file after the workload, like ``linkerd
inject``. Every other field and document is kept, in order. A pod that already has a
container named ``turnout`` is left as it is, so injecting twice equals injecting once.
Comments are not kept (YAML is parsed and written again, as kubectl does).
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

import yaml

from filters.documents import load_yaml_all
from filters.errors import ValidationError

CONTAINER_NAME = "turnout"
PROXY_PORT_NAME = "turnout-http"
ADMIN_PORT_NAME = "turnout-admin"
CONFIG_VOLUME = "turnout-config"
STATE_VOLUME = "turnout-state"
TMP_VOLUME = "turnout-tmp"
TOKEN_VOLUME = "turnout-token"
TOKEN_SECRET = "turnout-proxy-token"
CONFIG_DIR = "/etc/turnout"
TOKEN_DIR = "/var/run/secrets/turnout"
# The image's non-root user (deploy/Dockerfile).
RUN_AS_USER = 10001
# preStop pause (endpoints stop sending new connections) + limits.drain_timeout_s (20 s)
# + 5 s margin before SIGKILL.
PRESTOP_PAUSE_S = 5
DRAIN_TIMEOUT_S = 20
TERMINATION_GRACE_S = PRESTOP_PAUSE_S + DRAIN_TIMEOUT_S + 5

# Where the pod spec is, per kind; anything else passes through unchanged.
_POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
}


class InjectError(Exception):
    """A document turnout cannot inject; the message names the document and what to do."""


@dataclass(frozen=True)
class InjectOptions:
    """What the sidecar fronts and where it gets its sessions."""

    service: str | None = None  # default: the workload's name
    app_port: int | None = None  # default: the only TCP containerPort of the app's containers
    proxy_port: int = 15001
    admin_port: int = 9901
    control_plane: str = "turnout-control-plane.turnout.svc:18000"  # "": static sessions only
    image: str = "turnout:0.1.0"
    config_map: bool = True  # also write the bootstrap ConfigMap after each injected workload


@dataclass
class InjectResult:
    """The documents to write and one line per workload saying what happened to it."""

    documents: list[Any]
    notes: list[str]


def inject_documents(documents: Iterable[Any], options: InjectOptions) -> InjectResult:
    """Inject every workload in ``documents``; raises ``InjectError`` on the first refusal."""
    docs = [d for d in documents if d is not None]
    existing_maps = {_ident(d) for d in docs if isinstance(d, dict) and d.get("kind") == "ConfigMap"}
    out: list[Any] = []
    notes: list[str] = []
    for index, doc in enumerate(docs):
        out.extend(_inject_one(doc, options, f"document {index + 1}", existing_maps, notes))
    return InjectResult(out, notes)


def _ident(doc: dict[str, Any]) -> tuple[str, str]:
    meta = doc.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _describe(doc: dict[str, Any], where: str) -> str:
    namespace, name = _ident(doc)
    return f"{where} ({doc.get('kind')} {namespace + '/' if namespace else ''}{name or '<unnamed>'})"


def _inject_one(doc: Any, options: InjectOptions, where: str, existing_maps: set[tuple[str, str]],
                notes: list[str]) -> list[Any]:
    if not isinstance(doc, dict):
        return [doc]
    kind = doc.get("kind")
    if kind == "List" and isinstance(doc.get("items"), list):
        items: list[Any] = []
        for i, item in enumerate(doc["items"]):
            items.extend(_inject_one(item, options, f"{where} item {i + 1}", existing_maps, notes))
        return [{**doc, "items": items}]
    path = _POD_SPEC_PATHS.get(str(kind))
    if path is None:
        return [doc]
    what = _describe(doc, where)
    injected = copy.deepcopy(doc)
    spec: Any = injected
    for key in path:
        spec = spec.get(key) if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("containers"), list):
        raise InjectError(f"{what}: has no pod spec with containers at {'.'.join(path)}")
    containers = spec["containers"]
    if any(isinstance(c, dict) and c.get("name") == CONTAINER_NAME for c in containers):
        notes.append(f"{what}: already has a {CONTAINER_NAME} container, unchanged")
        return [doc]
    if spec.get("hostNetwork"):
        raise InjectError(f"{what}: uses hostNetwork, so a sidecar's ports would be the node's and clash "
                          "between pods; run turnout in node mode (deploy/kubernetes/base/node) instead")
    _check_clashes(spec, options, what)
    app_port = options.app_port if options.app_port is not None else _only_app_port(containers, what)
    if app_port in (options.proxy_port, options.admin_port):
        raise InjectError(f"{what}: the app port {app_port} is also turnout's "
                          f"{PROXY_PORT_NAME if app_port == options.proxy_port else ADMIN_PORT_NAME} port; "
                          "choose another --proxy-port or --admin-port")
    name = _ident(doc)[1]
    service = options.service or name
    if not service:
        raise InjectError(f"{what}: has no metadata.name; give --service")
    namespace = _ident(doc)[0]
    map_name = f"turnout-{service}"
    _add_sidecar(spec, map_name, options)
    notes.append(f"{what}: injected; service {service}, turnout on port {options.proxy_port} "
                 f"({PROXY_PORT_NAME}) in front of 127.0.0.1:{app_port}; point its Service's targetPort "
                 f"at {PROXY_PORT_NAME}")
    out = [injected]
    if options.config_map and (namespace, map_name) not in existing_maps:
        existing_maps.add((namespace, map_name))
        out.append(bootstrap_config_map(map_name, namespace, service, app_port, options))
    return out


def _only_app_port(containers: list[Any], what: str) -> int:
    ports = sorted({
        p["containerPort"] for c in containers if isinstance(c, dict)
        for p in c.get("ports") or [] if isinstance(p, dict) and isinstance(p.get("containerPort"), int)
        and p.get("protocol", "TCP") == "TCP"
    })
    if len(ports) != 1:
        found = ", ".join(map(str, ports)) or "none"
        raise InjectError(f"{what}: cannot tell which port the app serves on (TCP containerPorts: {found}); "
                          "give --app-port")
    return int(ports[0])


def _check_clashes(spec: dict[str, Any], options: InjectOptions, what: str) -> None:
    ours = {options.proxy_port: PROXY_PORT_NAME, options.admin_port: ADMIN_PORT_NAME}
    if len(ours) != 2:
        raise InjectError(f"{what}: --proxy-port and --admin-port must differ")
    # Containers of a pod share one network namespace: any port a container declares is taken.
    for container in [*(spec.get("initContainers") or []), *spec["containers"]]:
        if not isinstance(container, dict):
            continue
        for port in container.get("ports") or []:
            if not isinstance(port, dict):
                continue
            if port.get("containerPort") in ours:
                raise InjectError(f"{what}: container {container.get('name')} already uses port "
                                  f"{port['containerPort']}, which turnout needs for {ours[port['containerPort']]}; "
                                  "choose another --proxy-port or --admin-port")
            if port.get("name") in (PROXY_PORT_NAME, ADMIN_PORT_NAME):
                raise InjectError(f"{what}: container {container.get('name')} already has a port named "
                                  f"{port['name']}")
    names = {v.get("name") for v in spec.get("volumes") or [] if isinstance(v, dict)}
    taken = names & {CONFIG_VOLUME, STATE_VOLUME, TMP_VOLUME, TOKEN_VOLUME}
    if taken:
        raise InjectError(f"{what}: already has volume(s) {', '.join(sorted(map(str, taken)))}, "
                          "which the turnout sidecar uses")


def sidecar_container(options: InjectOptions) -> dict[str, Any]:
    """The turnout container added to a pod."""
    mounts = [
        {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": STATE_VOLUME, "mountPath": "/var/lib/turnout"},
        {"name": TMP_VOLUME, "mountPath": "/tmp"},
    ]
    if options.control_plane:
        mounts.append({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True})
    return {
        "name": CONTAINER_NAME,
        "image": options.image,
        "args": ["proxy", "--config", CONFIG_DIR + "/turnout.yaml", "--workers", "1"],
        "env": [{"name": "TURNOUT_NODE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [{"name": PROXY_PORT_NAME, "containerPort": options.proxy_port},
                  {"name": ADMIN_PORT_NAME, "containerPort": options.admin_port}],
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_PAUSE_S)]}}},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": ADMIN_PORT_NAME}, "periodSeconds": 5,
                           "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": ADMIN_PORT_NAME}, "initialDelaySeconds": 10,
                          "periodSeconds": 10, "failureThreshold": 3},
        # Measured: ~35 MB for the supervisor and ~35 MB per worker, ~0.075 CPU cores per
        # 1,000 req/s. One worker: the request covers ~650 req/s, the limit ~6,500.
        "resources": {"requests": {"cpu": "50m", "memory": "96Mi"},
                      "limits": {"cpu": "500m", "memory": "192Mi"}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }


def _add_sidecar(spec: dict[str, Any], map_name: str, options: InjectOptions) -> None:
    spec["containers"].append(sidecar_container(options))
    volumes = spec.setdefault("volumes", [])
    volumes.append({"name": CONFIG_VOLUME, "configMap": {"name": map_name}})
    volumes.append({"name": STATE_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}})
    volumes.append({"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}})
    if options.control_plane:
        volumes.append({"name": TOKEN_VOLUME, "secret": {"secretName": TOKEN_SECRET}})
    # A pod that states its own grace period keeps it (the user knows their app); one that
    # does not gets enough for the pause and the drain instead of Kubernetes' 30 s default.
    spec.setdefault("terminationGracePeriodSeconds", TERMINATION_GRACE_S)


def bootstrap_text(service: str, app_port: int, options: InjectOptions) -> str:
    """The sidecar's bootstrap YAML: one inbound listener in front of the app."""
    config: dict[str, Any] = {
        "admin": {"address": f"0.0.0.0:{options.admin_port}"},
        "listeners": [{"name": f"{service}-in", "address": f"0.0.0.0:{options.proxy_port}", "mode": "inbound",
                       "service": service, "baseline": f"127.0.0.1:{app_port}"}],
    }
    if options.control_plane:
        config["control_plane"] = {"address": options.control_plane, "token_file": TOKEN_DIR + "/token"}
    config["limits"] = {"drain_timeout_s": DRAIN_TIMEOUT_S}
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def bootstrap_config_map(name: str, namespace: str, service: str, app_port: int,
                         options: InjectOptions) -> dict[str, Any]:
    """The ConfigMap holding the sidecar's bootstrap file."""
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    metadata["labels"] = {"app.kubernetes.io/name": "turnout", "app.kubernetes.io/component": "sidecar"}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata,
            "data": {"turnout.yaml": bootstrap_text(service, app_port, options)}}


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the bootstrap file) as literal blocks, as people write them."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_documents(documents: list[Any], out: TextIO) -> None:
    """Write documents as multi-document YAML, keys in their original order."""
    yaml.dump_all(documents, out, Dumper=_Dumper, sort_keys=False, explicit_start=True,
                  default_flow_style=False, allow_unicode=True)


def run_inject(source: str, options: InjectOptions, stdin: TextIO, stdout: TextIO, stderr: TextIO,
               as_json: bool = False) -> int:
    """The ``turnout inject`` command: 0 written, 2 refused (nothing written); ``as_json``: a
    Kubernetes ``List`` of the documents as JSON (what ``kubectl apply -f -`` also reads)."""
    try:
        if source == "-":
            text = stdin.read()
        else:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        documents = load_yaml_all(text)
    except OSError as exc:
        stderr.write(f"turnout inject: cannot read {source}: {exc.strerror}\n")
        return 2
    except yaml.YAMLError as exc:
        stderr.write(f"turnout inject: {source} is not valid YAML: {exc}\n")
        return 2
    except ValidationError as exc:  # a number too long to convert
        stderr.write(f"turnout inject: {source}: {exc}\n")
        return 2
    try:
        result = inject_documents(documents, options)
    except InjectError as exc:
        stderr.write(f"turnout inject: refused {exc}\n")
        return 2
    if as_json:
        json.dump({"apiVersion": "v1", "kind": "List", "items": [d for d in result.documents if d is not None]},
                  stdout, indent=2)
        stdout.write("\n")
    else:
        dump_documents(result.documents, stdout)
    for note in result.notes:
        stderr.write(f"turnout inject: {note}\n")
    return 0


def add_command(sub: Any) -> None:
    """Register ``turnout inject``."""
    inject = sub.add_parser(
        "inject", help="add the turnout sidecar to Kubernetes manifests",
        description="Read Deployment / StatefulSet / DaemonSet / ReplicaSet / Pod YAML and write it back with "
        "the turnout sidecar, its volumes and ports added, plus a ConfigMap with its bootstrap file. Other "
        "documents pass through unchanged; a pod that already has a 'turnout' container is left as it is. "
        "Refuses (exit 2, nothing written) hostNetwork pods and port or volume clashes.",
    )
    inject.add_argument("file", metavar="FILE", help="manifest file, or - for standard input")
    inject.add_argument("--service", help="the service the sidecar fronts (default: the workload's name)")
    inject.add_argument("--app-port", type=int, metavar="PORT",
                        help="the app's port; baseline is 127.0.0.1:PORT (default: the pod's only TCP containerPort)")
    inject.add_argument("--proxy-port", type=int, default=15001, metavar="PORT",
                        help="turnout's listener; point the Service's targetPort here (default 15001)")
    inject.add_argument("--admin-port", type=int, default=9901, metavar="PORT",
                        help="turnout's admin listener for probes and /metrics (default 9901)")
    inject.add_argument("--control-plane", default=InjectOptions.control_plane, metavar="HOST:PORT",
                        help="the control plane's push service ('' for static sessions only; default "
                        "%(default)s)")
    inject.add_argument("--image", default=InjectOptions.image, help="turnout image (default %(default)s)")
    inject.add_argument("--no-config-map", action="store_true",
                        help="do not write the bootstrap ConfigMap (it exists already)")
    inject.add_argument("--json", action="store_true", help="write a JSON List instead of YAML documents")
    inject.set_defaults(func=_cmd_inject)


def _cmd_inject(args: Any) -> int:
    for flag, port in (("--app-port", args.app_port), ("--proxy-port", args.proxy_port),
                       ("--admin-port", args.admin_port)):
        if port is not None and not 0 < port < 65536:
            sys.stderr.write(f"turnout inject: {flag} must be a port number (1-65535)\n")
            return 2
    options = InjectOptions(args.service, args.app_port, args.proxy_port, args.admin_port, args.control_plane,
                            args.image, not args.no_config_map)
    return run_inject(args.file, options, sys.stdin, sys.stdout, sys.stderr, args.json)
